//! Shared test helpers: an in-process relay on port 0 with a temp data dir,
//! the real binary for crash tests, raw HTTP for protocol-level checks, and
//! polling with deadlines (never bare sleeps).
#![allow(dead_code)]

pub mod activation;
pub mod certs;
pub mod cli;
pub mod load;
pub mod mount;
pub mod receiver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leadflo_relay::Relay;
use leadflo_relay::config::{Config, Secret};
use leadflo_relay::metrics::Metrics;
use leadflo_relay::store::{DeadLetter, EventId, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-0123456789abcdef";

/// How long a test waits for what should happen within seconds (a
/// delivery, a retry, a gauge settling) before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A config for tests: loopback port 0 everywhere, data in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = dir.to_owned();
    config
}

/// A relay running in this process.
pub struct TestRelay {
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub dir: tempfile::TempDir,
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        TestRelay::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestRelay {
        TestRelay::start_in(tempfile::tempdir().unwrap(), adjust).await
    }

    /// Starts on an existing data directory (a restart).
    pub async fn start_in(dir: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> TestRelay {
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let secret = if config.auth.allow_unauthenticated {
            None
        } else {
            Some(Secret::new(SECRET))
        };
        let relay = Relay::build(config, secret).await.expect("relay builds");
        let (ingest, admin, store, metrics) = (
            relay.ingest_addr(),
            relay.admin_addr(),
            relay.store(),
            relay.metrics(),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run_until_stopped(shutdown.clone()));
        TestRelay {
            ingest,
            admin,
            store,
            metrics,
            shutdown,
            task,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/leadflo-webhook", self.ingest)
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        self.dir
    }
}

pub fn client() -> reqwest::Client {
    leadflo_relay::deliver::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// POSTs `body` with `secret` (if any); returns status and parsed JSON body.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let (status, text) = try_post(client, url, secret, body)
        .await
        .expect("request reaches the relay");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    (status, json)
}

/// POSTs `body` to `relay` with the right secret; the relay must accept it
/// (200). Returns the event's id.
pub async fn send(relay: &TestRelay, body: Vec<u8>) -> EventId {
    let (status, json) = post(&client(), &relay.url(), Some(SECRET), body).await;
    assert_eq!(status, 200, "{json}");
    json["id"].as_str().unwrap().parse().unwrap()
}

/// [`post`], with a request that got no answer (refused, reset) as an
/// error instead of a panic, and the body as text.
pub async fn try_post(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, String), reqwest::Error> {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(secret) = secret {
        request = request.header("x-webhook-secret", secret);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// Sends raw bytes on a fresh connection and reads until the server closes
/// it or `deadline` passes; returns what was read.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], deadline: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until_close(&mut stream, deadline).await
}

pub async fn read_until_close(stream: &mut TcpStream, deadline: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(deadline, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP response's head and JSON body from a raw stream.
pub async fn read_response(stream: &mut TcpStream, deadline: Duration) -> Option<String> {
    let mut out = Vec::new();
    let result = tokio::time::timeout(deadline, async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return if out.is_empty() { None } else { Some(()) };
            }
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out);
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if out.len() >= head_end + 4 + length {
                    return Some(());
                }
            }
        }
    })
    .await;
    match result {
        Ok(Some(())) => Some(String::from_utf8_lossy(&out).into_owned()),
        _ => None,
    }
}

/// A TCP connection to `addr` within 5 s: the kernel's accept queue hides a
/// listener that stopped accepting for a while, then connecting blocks.
pub async fn connect_within_deadline(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("the relay stopped accepting connections")
        .unwrap()
}

/// Polls `check` every 20 ms until it returns `Some` or `deadline` passes.
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole /metrics page (empty when the relay does not answer).
pub async fn metrics_text(admin: SocketAddr) -> String {
    match client().get(format!("http://{admin}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Reads a metric sample (`name` with labels exactly as printed, e.g.
/// `leadflo_relay_ingest_requests_total{result="accepted"}`) from /metrics.
pub async fn scrape(admin: SocketAddr, sample: &str) -> f64 {
    let text = metrics_text(admin).await;
    metric_value(&text, sample).unwrap_or_else(|| panic!("{sample} not in /metrics:\n{text}"))
}

/// Waits (up to [`WAIT`]) until the metric `sample` (as in [`scrape`])
/// reads `want`; `what` names the wait in the failure.
pub async fn wait_for_metric(admin: SocketAddr, sample: &str, want: f64, what: &str) {
    eventually(what, WAIT, async || {
        (scrape(admin, sample).await == want).then_some(())
    })
    .await;
}

pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(sample)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The real `leadflo-relay serve` in a child process.
pub struct RelayProcess {
    pub child: Child,
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_leadflo-relay"))
}

impl RelayProcess {
    /// Starts `serve` on port 0 with `data_dir` and waits until both
    /// listeners have printed their addresses.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> RelayProcess {
        RelayProcess::start_with_env(data_dir, extra_args, &[("LEADFLO_WEBHOOK_SECRET", SECRET)])
    }

    /// Like [`RelayProcess::start`], with exactly the variables in `env`
    /// (the inbound secret is not set unless `env` names it).
    pub fn start_with_env(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> RelayProcess {
        let mut command = RelayProcess::command(data_dir, extra_args);
        command.envs(env.iter().copied());
        RelayProcess::spawn(command)
    }

    /// The `serve` command [`RelayProcess::start`] runs, without the
    /// inbound secret, for callers that add to it.
    pub fn command(data_dir: &Path, extra_args: &[&str]) -> Command {
        // Loopback port 0 unless the caller names its own addresses.
        let mut defaults = vec!["serve"];
        for (flag, value) in [
            ("--listen", "127.0.0.1:0"),
            ("--admin-listen", "127.0.0.1:0"),
        ] {
            if !extra_args.contains(&flag) {
                defaults.extend([flag, value]);
            }
        }
        let mut command = Command::new(binary());
        command
            .args(defaults)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .env_remove("LEADFLO_WEBHOOK_SECRET")
            .env("RUST_LOG", "info");
        command
    }

    /// Spawns `command` (a relay's `serve`) and waits until both listeners
    /// have printed their addresses.
    pub fn spawn(mut command: Command) -> RelayProcess {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the relay binary starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                // Text lines carry `addr=…`; JSON lines an "addr" field.
                let addr = |tag: &str| -> Option<SocketAddr> {
                    if !line.contains(tag) {
                        return None;
                    }
                    if line.starts_with('{') {
                        let json: serde_json::Value = serde_json::from_str(&line).ok()?;
                        return json["addr"].as_str()?.parse().ok();
                    }
                    let token = line
                        .split_whitespace()
                        .find_map(|t| t.strip_prefix("addr="))?;
                    token.parse().ok()
                };
                if let Some(a) = addr("ingest listening") {
                    let _ = tx.send(("ingest", a));
                }
                if let Some(a) = addr("admin listening") {
                    let _ = tx.send(("admin", a));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let (mut ingest, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while ingest.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("ingest", a)) => ingest = Some(a),
                Ok((_, a)) => admin = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "relay did not report its addresses within 30 s; stderr:\n{}",
                        stderr.lock().unwrap().join("\n")
                    );
                }
            }
        }
        RelayProcess {
            child,
            ingest: ingest.unwrap(),
            admin: admin.unwrap(),
            stderr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/leadflo-webhook", self.ingest)
    }

    /// SIGTERM: the clean shutdown.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `within` for the process to exit (polling: a blocking
    /// wait has no deadline).
    pub fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9 the relay");
        self.child.wait().unwrap();
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Opens the log of a stopped relay directly, as the offline CLI would.
pub fn open_store(dir: &Path) -> Store {
    let config = test_config(dir);
    let store = Store::open(&leadflo_relay::app::store_options(
        &config,
        leadflo_relay::node::NodeId(0),
    ))
    .expect("log opens after the relay stopped");
    store.load_watermarks().expect("watermarks load");
    store
}

/// A loopback port where connections are refused and that no other socket
/// can take while this lives (bound, never listening). A port merely
/// reserved and closed again can be handed to another test's listener
/// running in parallel, which then answers in the "down" target's place.
pub struct RefusingPort {
    socket: Option<tokio::net::TcpSocket>,
    pub addr: SocketAddr,
}

impl RefusingPort {
    pub fn new() -> RefusingPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        RefusingPort {
            socket: Some(socket),
            addr,
        }
    }

    /// A target URL on this port.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Frees the port so that a server can listen on it (the target comes
    /// back).
    pub fn release(&mut self) -> SocketAddr {
        self.socket.take();
        self.addr
    }
}

/// The stored event `id`, waiting (with a deadline) for it to reach sled:
/// a 200 means the event is durable in the write-ahead log, and sled gets
/// it from the apply thread a moment later.
pub async fn stored_event(store: &Store, id: EventId) -> leadflo_relay::store::StoredEvent {
    eventually(
        "the acknowledged event in sled",
        Duration::from_secs(10),
        async || store.event(id).unwrap(),
    )
    .await
}

/// Waits (up to [`WAIT`]) until nothing is queued for `target`; `what`
/// names the wait in the failure.
pub async fn wait_for_empty_queue(store: &Store, target: &str, what: &str) {
    eventually(what, WAIT, async || {
        (store.queued_count(target) == 0).then_some(())
    })
    .await;
}

/// The dead letters of `target` once there are exactly `count` of them
/// (waiting up to [`WAIT`]).
pub async fn wait_for_dead_letters(store: &Store, target: &str, count: usize) -> Vec<DeadLetter> {
    eventually(
        &format!("{count} dead letter(s) at {target}"),
        WAIT,
        async || {
            let dead = store.dead_letters(target).unwrap();
            (dead.len() == count).then_some(dead)
        },
    )
    .await
}
