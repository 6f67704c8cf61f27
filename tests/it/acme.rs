//! Certificates from an ACME authority (`[server.tls.acme]`), for real
//! against Pebble, the ACME test server, with `pebble-challtestsrv` as its
//! DNS (Debian packages `pebble`; `.ci/run` installs it and sets
//! `LEADFLO_REQUIRE_PEBBLE`, without which the Pebble test skips when
//! Pebble is missing): obtained with the TLS-ALPN-01 challenge on the
//! ingest port and served, renewed when the cached one is near its end,
//! and served from the cache after a restart with the authority gone.
//! Before the first certificate, handshakes fail as `no_certificate` and
//! `/readyz` says why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::activation::{pass_sockets, with_listen_pid};
use crate::common::certs::TestCa;
use crate::common::load::lead;
use crate::common::*;

/// The name the relay's certificate is for; Pebble's DNS stub resolves
/// every name to 127.0.0.1.
const DOMAIN: &str = "relay.leadflo.test";

/// Time for one ACME order against Pebble (it validates at once).
const ORDER: Duration = Duration::from_secs(60);

/// `N` distinct loopback ports that were free a moment ago (held together
/// while they are chosen, so none is chosen twice).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|n| held[n].local_addr().unwrap().port())
}

/// Pebble and its DNS stub, stopped when dropped.
struct Pebble {
    pebble: Child,
    dns: Child,
    /// The ACME directory URL.
    directory: String,
    management: SocketAddr,
    /// The root of Pebble's own HTTPS (the directory, the management API).
    ca: TestCa,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pebble {
    /// Starts both, validating TLS-ALPN-01 on 127.0.0.1:`tls_port`; `None`
    /// (the test skips) when Pebble is not installed and not required.
    async fn start(tls_port: u16) -> Option<Pebble> {
        if Command::new("pebble").arg("-h").output().is_err() {
            assert!(
                std::env::var_os("LEADFLO_REQUIRE_PEBBLE").is_none(),
                "pebble is not installed and LEADFLO_REQUIRE_PEBBLE is set"
            );
            eprintln!("SKIPPED: pebble is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let leaf = ca.leaf();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (cert, key, ca_file) = (
            write("cert.pem", &leaf.chain),
            write("key.pem", &leaf.key),
            write("ca.pem", &ca.pem),
        );
        let [
            acme_port,
            management_port,
            dns_port,
            http_port,
            dns_management,
        ] = free_ports();
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": cert,
            "privateKey": key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_file = write("pebble.json", &config.to_string());
        let dns = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv starts");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            // No random sleeps before validation, no nonces refused at
            // random, and every order validated anew (a renewal too).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble starts");
        let pebble = Pebble {
            pebble,
            dns,
            directory: format!("https://127.0.0.1:{acme_port}/dir"),
            management: format!("127.0.0.1:{management_port}").parse().unwrap(),
            ca,
            ca_file,
            _dir: dir,
        };
        for port in [acme_port, management_port, dns_port] {
            eventually("Pebble listening", WAIT, async || {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            })
            .await;
        }
        Some(pebble)
    }

    /// The root Pebble issues under (made anew at each Pebble start).
    async fn issuing_root(&self) -> reqwest::Certificate {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca.pem.as_bytes()).unwrap()])
            .build()
            .unwrap();
        let pem = client
            .get(format!("https://{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .await
            .unwrap();
        reqwest::Certificate::from_pem(&pem).unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [&mut self.pebble, &mut self.dns] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A configuration file for `[server.tls.acme]` with `directory`.
fn acme_config(dir: &Path, directory: &str, ca_file: Option<&Path>) -> PathBuf {
    let mut text = format!(
        "[server.tls.acme]\ndomains = [{DOMAIN:?}]\ncontact = \"ops@leadflo.test\"\ndirectory = \
         {directory:?}\n"
    );
    if let Some(ca_file) = ca_file {
        text.push_str(&format!("ca_file = {:?}\n", ca_file.to_str().unwrap()));
    }
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The real binary with `config`, its ingest on loopback port 0.
fn start_relay(data: &Path, config: &Path) -> RelayProcess {
    let mut command = RelayProcess::command(data, &["--config", config.to_str().unwrap()]);
    command.env("LEADFLO_WEBHOOK_SECRET", SECRET);
    tokio::task::block_in_place(|| RelayProcess::spawn(command))
}

/// The real binary with `config`, its ingest on `ingest`, a socket the
/// test holds across restarts (passed as systemd would): Pebble validates
/// on that port, and no other test can take it between two starts.
fn start_relay_on(data: &Path, config: &Path, ingest: &std::net::TcpListener) -> RelayProcess {
    let mut inner = RelayProcess::command(data, &["--config", config.to_str().unwrap()]);
    inner.env("LEADFLO_WEBHOOK_SECRET", SECRET);
    let mut command = with_listen_pid(&inner);
    pass_sockets(&mut command, &[("ingest", ingest)]);
    tokio::task::block_in_place(|| RelayProcess::spawn(command))
}

/// A client that trusts only `root` and reaches [`DOMAIN`] at `addr`.
fn client_for(root: &reqwest::Certificate, addr: SocketAddr) -> reqwest::Client {
    leadflo_relay::deliver::install_crypto_provider();
    reqwest::Client::builder()
        .tls_certs_only([root.clone()])
        .resolve(DOMAIN, addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// POSTs a lead over HTTPS to [`DOMAIN`]; the status, or the error.
async fn post_lead(client: &reqwest::Client, addr: SocketAddr) -> Result<u16, String> {
    client
        .post(format!("https://{DOMAIN}:{}/leadflo-webhook", addr.port()))
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET)
        .body(lead(1))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|err| format!("{err:?}"))
}

/// A lead POSTed over HTTPS to `relay` by a client that trusts only
/// `root` is answered 200.
async fn assert_lead_accepted(root: &reqwest::Certificate, relay: &RelayProcess) {
    let https = client_for(root, relay.ingest);
    let answer = post_lead(&https, relay.ingest).await;
    assert_eq!(answer, Ok(200), "{}", relay.stderr_text());
}

async fn readyz(admin: SocketAddr) -> (u16, String) {
    let response = client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The one certificate file in the relay's ACME cache.
fn cached_certificate(data: &Path) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(data.join("acme"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("certificate-")
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// A self-signed certificate for [`DOMAIN`] that has two days left of
/// sixty: past two thirds of its life, so it is due for renewal. In the
/// cache's form (the key, then the certificate).
fn nearly_expired() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![DOMAIN.to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(58);
    params.not_after = now + time::Duration::days(2);
    let cert = params.self_signed(&key).unwrap();
    format!("{}\n{}", key.serialize_pem(), cert.pem())
}

async fn stop(mut relay: RelayProcess) {
    relay.sigterm();
    assert!(relay.wait_for_exit(Duration::from_secs(30)).success());
}

/// Obtain, serve, renew, restart from the cache: each against Pebble.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_obtained_renewed_and_served_from_the_cache() {
    let ingest = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let Some(pebble) = Pebble::start(ingest.local_addr().unwrap().port()).await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    // The directory's CA file outlives Pebble: the last start reads it.
    let ca_file = data.path().join("pebble-ca.pem");
    std::fs::copy(&pebble.ca_file, &ca_file).unwrap();
    let config = acme_config(data.path(), &pebble.directory, Some(&ca_file));

    // Obtain: the TLS-ALPN-01 challenge is answered on the ingest port.
    let relay = start_relay_on(data.path(), &config, &ingest);
    eventually("the first certificate", ORDER, async || {
        (readyz(relay.admin).await.0 == 200).then_some(())
    })
    .await;
    let root = pebble.issuing_root().await;
    assert_lead_accepted(&root, &relay).await;
    let orders = "leadflo_relay_acme_orders_total{result=\"ok\"}";
    assert_eq!(scrape(relay.admin, orders).await, 1.0);
    // Set from the cache's copy, written just after the certificate is
    // served.
    let expiry = "leadflo_relay_tls_certificate_expiry_timestamp_seconds";
    eventually("the expiry gauge", WAIT, async || {
        (scrape(relay.admin, expiry).await > 0.0).then_some(())
    })
    .await;
    stop(relay).await;

    // Renew: a cached certificate past two thirds of its life is served
    // at once, and replaced by a new order.
    let cached = cached_certificate(data.path());
    let old = nearly_expired();
    std::fs::write(&cached, &old).unwrap();
    let relay = start_relay_on(data.path(), &config, &ingest);
    eventually("the renewal", ORDER, async || {
        (scrape(relay.admin, orders).await == 1.0).then_some(())
    })
    .await;
    assert_lead_accepted(&root, &relay).await;
    eventually("the renewal cached", WAIT, async || {
        (std::fs::read_to_string(&cached).unwrap() != old).then_some(())
    })
    .await;
    stop(relay).await;

    // Restart from the cache, with the authority gone: nothing is ordered.
    drop(pebble);
    let relay = start_relay_on(data.path(), &config, &ingest);
    eventually("the cached certificate served", WAIT, async || {
        (readyz(relay.admin).await.0 == 200).then_some(())
    })
    .await;
    assert_lead_accepted(&root, &relay).await;
    let failed = "leadflo_relay_acme_orders_total{result=\"failed\"}";
    assert_eq!(scrape(relay.admin, orders).await, 0.0);
    assert_eq!(scrape(relay.admin, failed).await, 0.0);
    assert!(
        relay
            .stderr_text()
            .contains("serving the cached ACME certificate")
    );
    stop(relay).await;
}

/// Before the first certificate (the authority unreachable here), ingest
/// handshakes fail as `no_certificate` with one clear log line, `/readyz`
/// answers 503 saying why, and the failed order is counted and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_first_certificate_handshakes_fail_and_readyz_says_why() {
    let nobody = RefusingPort::new();
    let directory = format!("https://{}/dir", nobody.addr);
    let data = tempfile::tempdir().unwrap();
    let config = acme_config(data.path(), &directory, None);
    let relay = start_relay(data.path(), &config);

    let (status, body) = readyz(relay.admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no certificate yet") && body.contains(DOMAIN),
        "{body}"
    );

    let root = reqwest::Certificate::from_pem(TestCa::new().pem.as_bytes()).unwrap();
    for _ in 0..3 {
        assert!(
            post_lead(&client_for(&root, relay.ingest), relay.ingest)
                .await
                .is_err()
        );
    }
    let refused = "leadflo_relay_tls_handshake_failures_total{reason=\"no_certificate\"}";
    wait_for_metric(relay.admin, refused, 3.0, "handshakes refused").await;
    let failed = "leadflo_relay_acme_orders_total{result=\"failed\"}";
    eventually("a failed order counted", ORDER, async || {
        (scrape(relay.admin, failed).await >= 1.0).then_some(())
    })
    .await;
    let log = relay.stderr_text();
    assert_eq!(
        log.matches("refused HTTPS handshakes: no certificate")
            .count(),
        1,
        "one line a minute at most:\n{log}"
    );
    assert!(
        log.contains("the ACME order for relay.leadflo.test failed"),
        "{log}"
    );
    stop(relay).await;
}

/// `check-config` reads the CA file and says what the cache holds, and a
/// CA file that is not PEM is refused naming the key and the file.
#[tokio::test]
async fn check_config_shows_the_acme_settings_and_refuses_a_bad_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, TestCa::new().pem).unwrap();
    let config = acme_config(dir.path(), "letsencrypt-staging", Some(&ca_file));
    let data = dir.path().join("data");
    let check = || {
        crate::common::cli::cli(crate::common::cli::args(&[
            "check-config",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ]))
    };
    let out = crate::common::cli::ok(check().await);
    let cache = format!("ACME cache {}: ", data.join("acme").display());
    assert!(
        out.contains(&cache),
        "the cache is not in the data directory: {out}"
    );
    assert!(
        out.contains("ACME certificate for relay.leadflo.test from https://acme-staging-v02"),
        "{out}"
    );
    assert!(out.contains("no certificate cached yet"), "{out}");

    std::fs::write(&ca_file, "not a certificate").unwrap();
    let output = check().await;
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("server.tls.acme.ca_file") && err.contains("ca.pem"),
        "{err}"
    );
}

/// A reload reports a changed `[server.tls.acme]` as needing a restart
/// (the ACME client is not rebuilt under a running relay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reports_changed_acme_settings_as_needing_a_restart() {
    let nobody = RefusingPort::new();
    let directory = format!("https://{}/dir", nobody.addr);
    let data = tempfile::tempdir().unwrap();
    let config = acme_config(data.path(), &directory, None);
    let relay = start_relay(data.path(), &config);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(DOMAIN, "www.leadflo.test");
    std::fs::write(&config, text).unwrap();
    // host:port as the relay prints it, without a scheme.
    let admin = relay.admin.to_string();
    let out = crate::common::cli::ok(
        crate::common::cli::cli(crate::common::cli::args(&["reload", "--admin", &admin])).await,
    );
    assert!(out.contains("needs a restart: server.tls.acme"), "{out}");
    stop(relay).await;
}
