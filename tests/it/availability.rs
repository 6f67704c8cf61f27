//! The relay's own availability: ids no two replicas share, the drain a
//! load balancer needs, socket activation and readiness notifications, and
//! restarts under load that refuse no lead. Restart tests run the real
//! binary; every wait has a deadline, and load is bounded in count and time.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::activation::{pass_sockets, with_listen_pid};
use crate::common::cli::*;
use crate::common::load::*;
use crate::common::receiver::{Receiver, Reply};
use crate::common::*;
use leadflo_relay::node;
use leadflo_relay::store::{EventId, record};

const WAIT: Duration = Duration::from_secs(30);

async fn send(relay: &TestRelay, body: Vec<u8>) -> EventId {
    let (status, answer) = post_lenient(&client(), &relay.url(), Some(SECRET), body).await;
    assert_eq!(status, 200, "{answer}");
    answer["id"].as_str().unwrap().parse().unwrap()
}

/// `GET /readyz` of `admin`: status and body.
async fn readyz(admin: SocketAddr) -> Option<(u16, String)> {
    let response = client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .ok()?;
    Some((response.status().as_u16(), response.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_never_issue_the_same_id_and_each_carries_its_node() {
    let (a, b) = (TestRelay::start().await, TestRelay::start().await);
    let node_of = async |relay: &TestRelay| -> u64 {
        let admin = format!("http://{}", relay.admin);
        json(cli(args(&["stats", "--json", "--admin", &admin])).await)["node_id"]
            .as_u64()
            .expect("stats shows the node id")
    };
    let (node_a, node_b) = (node_of(&a).await, node_of(&b).await);
    if node_a == node_b {
        // 1 in 65,536: two random identities met (the docs say to set
        // server.node_id where that matters).
        eprintln!("SKIPPED: both relays drew node {node_a}");
        return;
    }
    // Both relays take leads at once, in the same milliseconds.
    let mut ids = HashSet::new();
    for round in 0..50 {
        let (x, y) = tokio::join!(
            send_at_once(a.url(), round * 8..round * 8 + 4),
            send_at_once(b.url(), round * 8 + 4..round * 8 + 8)
        );
        let issued = x.into_iter().map(|id| (id, node_a));
        for (id, node) in issued.chain(y.into_iter().map(|id| (id, node_b))) {
            assert!(ids.insert(id), "id {id} was issued twice");
            assert_eq!(
                id.0 & 0xffff,
                node,
                "id {id} does not carry its relay's node"
            );
        }
    }
    a.stop().await;
    b.stop().await;
}

/// The leads numbered `leads`, posted to `url` all at once.
async fn send_at_once(url: String, leads: std::ops::Range<usize>) -> Vec<EventId> {
    let tasks: Vec<_> = leads
        .map(|n| {
            let url = url.clone();
            tokio::spawn(async move {
                let (status, answer) = post_lenient(&client(), &url, Some(SECRET), lead(n)).await;
                assert_eq!(status, 200, "{answer}");
                answer["id"].as_str().unwrap().parse::<EventId>().unwrap()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    ids
}

/// sled opened directly on a stopped relay's data directory (its last
/// holder may still be letting go of the lock for a moment).
async fn open_sled(dir: &std::path::Path) -> sled::Db {
    eventually("sled to open", WAIT, async || sled::open(dir).ok()).await
}

/// A data directory from a build before node identities: its ids are the
/// receive time in microseconds. The first new id is above every old one,
/// and time windows find events of both layouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_after_an_upgrade_stay_above_the_old_ones_and_windows_find_both() {
    let relay = TestRelay::start().await;
    let dir = relay.stop().await;
    let now = leadflo_relay::clock::now_ms();
    // An old event received a second ago, and the old layout's last id a
    // minute ahead of the clock (a burst ran it ahead).
    let old_id = (now - 1_000) * 1_000 + 7;
    let old_last = (now + 60_000) * 1_000;
    let db = open_sled(dir.path()).await;
    let mut key = vec![b'e'];
    key.extend_from_slice(&old_id.to_be_bytes());
    db.insert(
        key,
        record::encode_event(now - 1_000, "visitor_created", &lead(0)),
    )
    .unwrap();
    db.insert(b"m/last_id", &old_last.to_be_bytes()).unwrap();
    db.flush().unwrap();
    drop(db);

    let relay = TestRelay::start_in(dir, |_| {}).await;
    let new_id = send(&relay, lead(1)).await;
    assert!(
        new_id.0 > old_last,
        "new id {new_id} is not above the old layout's last id {old_last}"
    );
    let admin = format!("http://{}", relay.admin);
    let (from, to) = (
        leadflo_relay::ops::rfc3339(now - 5_000),
        leadflo_relay::ops::rfc3339(leadflo_relay::clock::now_ms() + 1_000),
    );
    let listed = json(
        cli(args(&[
            "events", "list", "--from", &from, "--to", &to, "--json", "--admin", &admin,
        ]))
        .await,
    );
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    for id in [old_id.to_string(), new_id.to_string()] {
        assert!(
            ids.contains(&id.as_str()),
            "event {id} not listed: {listed}"
        );
    }
    relay.stop().await;
}

/// The node identity is made with the data directory, kept across
/// restarts, shown by `check-config` and `stats`, and can be set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_identity_is_kept_in_the_data_directory_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let before = ok(cli(args(&["check-config", "--data-dir", &data])).await);
    assert!(before.contains("# node id: made at random"), "{before}");

    let relay = TestRelay::start_in(dir, |_| {}).await;
    let first = send(&relay, lead(0)).await;
    let dir = relay.stop().await;
    let stored = std::fs::read_to_string(dir.path().join(node::NODE_ID_FILE)).unwrap();
    let node: u64 = stored.trim().parse().unwrap();
    assert_eq!(
        first.0 & 0xffff,
        node,
        "id {first} does not carry node {node}"
    );
    let shown = ok(cli(args(&["check-config", "--data-dir", &data])).await);
    assert!(
        shown.contains(&format!("# node id: {node} (from ")),
        "{shown}"
    );
    let offline = json(cli(args(&["stats", "--json", "--data-dir", &data])).await);
    assert_eq!(offline["node_id"], node, "{offline}");

    // Kept across a restart; ids keep increasing.
    let relay = TestRelay::start_in(dir, |_| {}).await;
    let second = send(&relay, lead(1)).await;
    assert!(
        second > first && second.0 & 0xffff == node,
        "{first} then {second}"
    );
    // Set in the configuration, it wins, and ids still increase.
    let dir = relay.stop().await;
    let configured = (node as u16).wrapping_add(1);
    let relay = TestRelay::start_in(dir, |c| c.server.node_id = Some(configured)).await;
    let third = send(&relay, lead(2)).await;
    assert!(third > second, "{second} then {third}");
    assert_eq!(third.0 & 0xffff, u64::from(configured));
    relay.stop().await;
}

/// SIGTERM with a drain delay: `/readyz` answers 503 `draining` while
/// leads are still answered 200 and delivered; then the relay exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readyz_while_still_taking_leads() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("relay.toml");
    std::fs::write(&config, "[server]\ndrain_delay = \"3s\"\n").unwrap();
    let mut relay = RelayProcess::start(
        work.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--target",
            &format!("crm={}", crm.url()),
        ],
    );
    assert_eq!(readyz(relay.admin).await.unwrap().0, 200);
    relay.sigterm();
    let (status, body) = eventually("/readyz to say draining", WAIT, async || {
        readyz(relay.admin)
            .await
            .filter(|(status, _)| *status != 200)
    })
    .await;
    assert_eq!((status, body.as_str()), (503, r#"{"status":"draining"}"#));
    let (status, answer) = post_lenient(&client(), &relay.url(), Some(SECRET), lead(1)).await;
    assert_eq!(
        status, 200,
        "a lead sent while draining was refused: {answer}"
    );
    assert_eq!(relay.wait_for_exit(WAIT).code(), Some(0));
    assert!(
        crm.requests().iter().any(|r| r.body == lead(1)),
        "the lead taken while draining was not delivered before the stop"
    );
}

/// Passed sockets are taken by name (here in the opposite order), and
/// systemd is told `READY=1` once the relay answers, `STOPPING=1` at
/// SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_passed_sockets_by_name_and_notifies_readiness() {
    let ingest = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let work = tempfile::tempdir().unwrap();
    let notify_path = work.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let mut inner = RelayProcess::command(&work.path().join("data"), &[]);
    inner.env("LEADFLO_WEBHOOK_SECRET", SECRET);
    inner.env("NOTIFY_SOCKET", &notify_path);
    let mut command = with_listen_pid(&inner);
    pass_sockets(&mut command, &[("admin", &admin), ("ingest", &ingest)]);
    let mut relay = tokio::task::block_in_place(|| RelayProcess::spawn(command));
    assert_eq!(
        relay.ingest,
        ingest.local_addr().unwrap(),
        "ingest is not on its passed socket"
    );
    assert_eq!(
        relay.admin,
        admin.local_addr().unwrap(),
        "admin is not on its passed socket"
    );
    let next = || {
        let mut message = [0u8; 256];
        let n = notify
            .recv(&mut message)
            .expect("a notification within the deadline");
        String::from_utf8_lossy(&message[..n]).trim_end().to_owned()
    };
    assert_eq!(next(), "READY=1");
    let (status, answer) = post_lenient(&client(), &relay.url(), Some(SECRET), lead(0)).await;
    assert_eq!(status, 200, "{answer}");
    relay.sigterm();
    assert_eq!(next(), "STOPPING=1");
    assert_eq!(
        tokio::task::block_in_place(|| relay.wait_for_exit(WAIT)).code(),
        Some(0)
    );
}

/// Under socket activation the admin API's token rule follows the passed
/// socket's address, not `server.admin_listen` (loopback here): an admin
/// socket on every interface without a token is refused, saying so.
#[test]
fn a_passed_admin_socket_off_loopback_needs_a_token_whatever_admin_listen_says() {
    let ingest = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Only bound, never reached: the relay must refuse it before serving.
    let admin = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut inner = RelayProcess::command(data.path(), &["--admin-listen", "127.0.0.1:0"]);
    inner
        .env("LEADFLO_WEBHOOK_SECRET", SECRET)
        .env_remove("LEADFLO_RELAY_ADMIN_TOKEN");
    let mut command = with_listen_pid(&inner);
    pass_sockets(&mut command, &[("ingest", &ingest), ("admin", &admin)]);
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay served an admin socket on 0.0.0.0 without a token");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let addr = format!("0.0.0.0:{}", admin.local_addr().unwrap().port());
    assert!(
        stderr.contains("passed by systemd")
            && stderr.contains(&addr)
            && stderr.contains("LEADFLO_RELAY_ADMIN_TOKEN"),
        "the refusal does not name the passed socket {addr} and the token:\n{stderr}"
    );
}

/// One relay on a listening socket that outlives it (held here, as systemd
/// holds it), restarted five times while a sender posts on fresh
/// connections: connections wait in the kernel's queue, and every POST is
/// answered 200 and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_on_a_held_socket_answer_every_lead() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let data = tempfile::tempdir().unwrap();
    let start = || {
        let target = format!("crm={}", crm.url());
        let mut inner = RelayProcess::command(data.path(), &["--target", &target]);
        inner.env("LEADFLO_WEBHOOK_SECRET", SECRET);
        let mut command = with_listen_pid(&inner);
        pass_sockets(&mut command, &[("ingest", &socket)]);
        tokio::task::block_in_place(|| RelayProcess::spawn(command))
    };
    let mut relay = start();
    let url = relay.url();
    let sender = Sender::start(url, 0, 20_000, 1);
    sender.wait_for(100).await;
    let mut gaps = Vec::new();
    for _ in 0..5 {
        relay.sigterm();
        let stopping = Instant::now();
        assert_eq!(
            tokio::task::block_in_place(|| relay.wait_for_exit(WAIT)).code(),
            Some(0)
        );
        relay = start();
        gaps.push(stopping.elapsed());
        sender.wait_for(100).await;
    }
    let answers = sender.finish().await;
    let failed = refused(&answers);
    eprintln!(
        "5 restarts on a held socket: {} POSTs, {} refused; SIGTERM to ready again: {gaps:?}",
        answers.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} POSTs failed: {failed:?}",
        failed.len()
    );
    assert_every_lead_delivered_once_per_key(&answers, &crm).await;
    relay.sigterm();
    tokio::task::block_in_place(|| relay.wait_for_exit(WAIT));
}

/// The real `systemd-socket-activate` (Debian's systemd package) holds the
/// socket and starts the relay at the first connection, which waits in the
/// kernel's queue meanwhile and is answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activate_starts_the_relay_on_its_socket() {
    if Command::new("systemd-socket-activate")
        .arg("--help")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("LEADFLO_REQUIRE_SYSTEMD").is_none(),
            "systemd-socket-activate is not installed (apt-get install systemd)"
        );
        eprintln!("SKIPPED: systemd-socket-activate is not installed");
        return;
    }
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let data = tempfile::tempdir().unwrap();
    let inner = RelayProcess::command(data.path(), &[]);
    let mut command = Command::new("systemd-socket-activate");
    command
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=ingest"])
        .args(["-E", "LEADFLO_WEBHOOK_SECRET", "-E", "RUST_LOG"])
        .arg(inner.get_program())
        .args(inner.get_args())
        .env("LEADFLO_WEBHOOK_SECRET", SECRET)
        .env("RUST_LOG", "info");
    let spawned = tokio::task::spawn_blocking(move || RelayProcess::spawn(command));
    let url = format!("http://127.0.0.1:{port}/leadflo-webhook");
    // Until it listens, a connection is refused: retried, with a deadline.
    let (status, answer) = eventually("systemd-socket-activate to listen", WAIT, async || {
        Some(post_lenient(&client(), &url, Some(SECRET), lead(0)).await)
            .filter(|(status, _)| *status != 0)
    })
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut relay = spawned.await.unwrap();
    assert_eq!(
        relay.ingest.port(),
        port,
        "the relay did not take the passed socket"
    );
    relay.sigterm();
    assert_eq!(
        tokio::task::block_in_place(|| relay.wait_for_exit(WAIT)).code(),
        Some(0)
    );
}

/// The shipped systemd units pass `systemd-analyze verify` with no
/// warning (it exits 0 on unknown keys: its output is what counts), with
/// `ExecStart` pointing at the binary built here; the shipped sysusers.d
/// file creates the user they run as.
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("LEADFLO_REQUIRE_SYSTEMD").is_none(),
            "systemd-analyze is not installed (apt-get install systemd)"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let units = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let entry = entry.unwrap();
        // Units only: the sysusers.d file is checked below.
        if !matches!(
            entry.path().extension().and_then(|e| e.to_str()),
            Some("service" | "socket")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let text = text.replace("/usr/local/bin/leadflo-relay", binary().to_str().unwrap());
        let path = units.path().join(entry.file_name());
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    assert!(
        paths.len() >= 3,
        "expected the service and its two sockets in {shipped:?}"
    );
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    // The shipped sysusers.d file makes the user and group the service
    // runs as, without a login shell (in an empty root, not this system's).
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let output = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(shipped.join("leadflo-relay.sysusers.conf"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "systemd-sysusers: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let service = std::fs::read_to_string(shipped.join("leadflo-relay.service")).unwrap();
    let settings: Vec<&str> = service.lines().map(str::trim).collect();
    assert!(
        settings.contains(&"User=leadflo-relay")
            && settings.contains(&"Group=leadflo-relay")
            && !settings.iter().any(|l| l.starts_with("DynamicUser=")),
        "the service does not run as the static user leadflo-relay"
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("leadflo-relay:") && l.ends_with(":/usr/sbin/nologin")),
        "no user leadflo-relay without a login shell: {passwd}"
    );
    assert!(
        group.lines().any(|l| l.starts_with("leadflo-relay:")),
        "no group leadflo-relay: {group}"
    );
}

/// A loopback address with a port that was free a moment ago (HAProxy's
/// configuration and a restarted relay need fixed ports).
fn free_addr() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}

/// Whether `program` runs here; if not, the test skips, or fails when CI
/// requires it (`require` names the variable).
fn installed(program: &str, require: &str) -> bool {
    if Command::new(program).arg("-v").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os(require).is_none(),
        "{program} is not installed and {require} is set"
    );
    eprintln!("SKIPPED: {program} is not installed");
    false
}

/// HAProxy running `packaging/haproxy/haproxy.cfg` as shipped, with its
/// addresses from the environment; stopped when dropped.
struct Haproxy {
    child: std::process::Child,
    http: String,
    https: String,
    stats: String,
    _dir: tempfile::TempDir,
    ca: Vec<u8>,
}

impl Haproxy {
    fn start(relays: [&RelayProcess; 2]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("leadflo.pem");
        let ca = make_certificate(dir.path(), &pem);
        let (http, https, stats) = (free_addr(), free_addr(), free_addr());
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/haproxy/haproxy.cfg");
        let child = Command::new("haproxy")
            .args(["-db", "-f", config])
            .env("LEADFLO_HTTPS_BIND", &https)
            .env("LEADFLO_TLS_PEM", &pem)
            .env("LEADFLO_HTTP_BIND", &http)
            .env("LEADFLO_STATS_BIND", &stats)
            .env("LEADFLO_RELAY1", relays[0].ingest.to_string())
            .env("LEADFLO_RELAY2", relays[1].ingest.to_string())
            .env(
                "LEADFLO_RELAY1_ADMIN_PORT",
                relays[0].admin.port().to_string(),
            )
            .env(
                "LEADFLO_RELAY2_ADMIN_PORT",
                relays[1].admin.port().to_string(),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy starts");
        Haproxy {
            child,
            http,
            https,
            stats,
            _dir: dir,
            ca,
        }
    }

    /// HAProxy's view of `server` (`UP`, `DOWN`, …), from its stats CSV.
    async fn status(&self, server: &str) -> Option<String> {
        let url = format!("http://{}/stats;csv", self.stats);
        let csv = client().get(url).send().await.ok()?.text().await.ok()?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let column = |name: &str| header.iter().position(|h| *h == name);
        let (proxy, name, status) = (column("pxname")?, column("svname")?, column("status")?);
        lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|row| row.get(proxy) == Some(&"relays") && row.get(name) == Some(&server))
            .and_then(|row| row.get(status).map(|s| (*s).to_owned()))
    }

    async fn wait_until(&self, server: &str, wanted: &str) {
        eventually(
            &format!("HAProxy to see {server} {wanted}"),
            WAIT,
            async || (self.status(server).await.as_deref() == Some(wanted)).then_some(()),
        )
        .await;
    }
}

/// A test CA and a certificate for `localhost` signed by it, written with
/// its key to `pem` (HAProxy's `crt` form); returns the CA's PEM.
fn make_certificate(dir: &std::path::Path, pem: &std::path::Path) -> Vec<u8> {
    let openssl = |args: &[&str]| {
        let made = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    };
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ]
        .into_iter()
        .chain([
            "-subj",
            "/CN=leadflo test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])
        .collect::<Vec<_>>(),
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ]
        .into_iter()
        .chain(["-keyout", "leaf.key", "-out", "leaf.csr"])
        .collect::<Vec<_>>(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.pem",
    ]);
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    std::fs::write(pem, [read("leaf.pem"), read("leaf.key")].concat()).unwrap();
    read("ca.pem")
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two replicas, each with its own data directory and the same target,
/// behind HAProxy with the shipped configuration, while four senders post
/// continuously: a rolling restart (drain, stop, start, ready) refuses no
/// POST; `kill -9` of one fails only requests in flight at the kill, and
/// after its restart every acknowledged lead reaches the target; no
/// idempotency key comes with two bodies. One lead also goes through
/// HAProxy's TLS termination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_haproxy_survive_rolling_restarts_and_a_kill() {
    if !installed("haproxy", "LEADFLO_REQUIRE_HAPROXY") {
        return;
    }
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("relay.toml");
    std::fs::write(&config, "[server]\ndrain_delay = \"2s\"\n").unwrap();
    let target = format!("crm={}", crm.url());
    let start = |n: usize, ingest: &str, admin: &str| {
        let data = work.path().join(format!("relay{n}"));
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--target",
            &target,
            "--listen",
            ingest,
            "--admin-listen",
            admin,
        ];
        tokio::task::block_in_place(|| RelayProcess::start(&data, &args))
    };
    let addrs = [(free_addr(), free_addr()), (free_addr(), free_addr())];
    let mut relays = [
        start(1, &addrs[0].0, &addrs[0].1),
        start(2, &addrs[1].0, &addrs[1].1),
    ];
    let haproxy = Haproxy::start([&relays[0], &relays[1]]);
    for server in ["relay1", "relay2"] {
        haproxy.wait_until(server, "UP").await;
    }
    let url = format!("http://{}/leadflo-webhook", haproxy.http);
    let sender = Sender::start(url, 0, 50_000, 4);
    sender.wait_for(200).await;

    let mut rolling = Vec::new();
    for (n, server) in ["relay1", "relay2"].into_iter().enumerate() {
        let began = Instant::now();
        relays[n].sigterm();
        haproxy.wait_until(server, "DOWN").await;
        assert_eq!(
            tokio::task::block_in_place(|| relays[n].wait_for_exit(WAIT)).code(),
            Some(0)
        );
        relays[n] = start(n + 1, &addrs[n].0, &addrs[n].1);
        haproxy.wait_until(server, "UP").await;
        rolling.push(began.elapsed());
        sender.wait_for(200).await;
    }
    let during_rolling = sender.answers();
    let failed = refused(&during_rolling);
    eprintln!(
        "rolling restart behind HAProxy: {} POSTs, {} failed; each replica SIGTERM to UP again: {rolling:?}",
        during_rolling.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "POSTs failed during the rolling restart: {failed:?}"
    );

    relays[0].kill9();
    let killed = Instant::now();
    haproxy.wait_until("relay1", "DOWN").await;
    let detected = killed.elapsed();
    sender.wait_for(200).await;
    relays[0] = start(1, &addrs[0].0, &addrs[0].1);
    haproxy.wait_until("relay1", "UP").await;
    sender.wait_for(200).await;

    let https = tls_post(&haproxy).await;
    let answers = sender.finish().await;
    let at_kill = refused(&answers[during_rolling.len()..]);
    eprintln!(
        "kill -9 of one replica behind HAProxy: {} POSTs after it, {} failed (in flight at the kill): {at_kill:?}; HAProxy marked it down after {detected:?}",
        answers.len() - during_rolling.len(),
        at_kill.len()
    );
    assert!(
        at_kill.len() <= 4,
        "more POSTs failed than the four senders had in flight at the kill: {at_kill:?}"
    );
    let all: Vec<Answer> = answers.into_iter().chain([https]).collect();
    assert_every_lead_delivered_once_per_key(&all, &crm).await;
    for relay in &mut relays {
        relay.sigterm();
        tokio::task::block_in_place(|| relay.wait_for_exit(WAIT));
    }
}

/// One lead through HAProxy's TLS termination, trusting its test CA.
async fn tls_post(haproxy: &Haproxy) -> Answer {
    leadflo_relay::deliver::install_crypto_provider();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&haproxy.ca).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let port = haproxy.https.rsplit(':').next().unwrap();
    let url = format!("https://localhost:{port}/leadflo-webhook");
    let body = lead(1_000_000);
    let (status, answer) = post_lenient(&client, &url, Some(SECRET), body.clone()).await;
    assert_eq!(status, 200, "HTTPS through HAProxy: {answer}");
    Answer::Accepted {
        id: answer["id"].as_str().unwrap().parse().unwrap(),
        body,
    }
}
