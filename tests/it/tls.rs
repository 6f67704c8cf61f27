//! HTTPS on the ingest listener (`[server.tls]`): leads over TLS 1.2 and
//! 1.3 (reqwest, and curl once), plain HTTP refused with a 400, bad
//! certificate files refused at start and by `check-config` naming the
//! file, the certificate swapped on reload and when its files change while
//! a sender posts (every POST answered 200), a broken renewal kept out, and
//! the ingest limits during the handshake: a silent client closed after
//! `server.header_read_timeout`, the connection cap held by idle TCP
//! connections that never handshake, and failed handshakes counted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leadflo_relay::Relay;
use leadflo_relay::config::{Config, Secret, TargetConfig, TlsConfig};
use leadflo_relay::metrics::IngestResult;
use leadflo_relay::tls::HandshakeFailure;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::common::certs::{Leaf, TestCa};
use crate::common::cli::*;
use crate::common::load::lead;
use crate::common::receiver::{Receiver, Reply};
use crate::common::*;

// ---- certificates made in the test ------------------------------------------

/// The two files a relay reads its certificate from.
struct CertFiles {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn new() -> CertFiles {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("fullchain.pem");
        let key = dir.path().join("privkey.pem");
        CertFiles { dir, cert, key }
    }

    fn with(leaf: &Leaf) -> CertFiles {
        let files = CertFiles::new();
        files.write(leaf);
        files
    }

    /// Writes both files in place (as a renewal that does not swap links).
    fn write(&self, leaf: &Leaf) {
        std::fs::write(&self.key, &leaf.key).unwrap();
        std::fs::write(&self.cert, &leaf.chain).unwrap();
    }

    fn tls(&self) -> TlsConfig {
        TlsConfig::from_files(self.cert.clone(), self.key.clone())
    }

    /// `[server.tls]` for a configuration file.
    fn toml(&self, watch_interval: &str) -> String {
        format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nwatch_interval = {watch_interval:?}\n",
            self.cert.to_str().unwrap(),
            self.key.to_str().unwrap()
        )
    }
}

// ---- clients -----------------------------------------------------------------

/// A client that trusts only `ca`, speaks `versions`, opens a fresh
/// connection per request and never resumes a session: every request is a
/// whole handshake and shows the certificate served at that moment (a
/// resumed session shows the one it began with).
fn tls_client_with(
    ca: &TestCa,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> reqwest::Client {
    leadflo_relay::deliver::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn tls_client(ca: &TestCa) -> reqwest::Client {
    tls_client_with(ca, rustls::DEFAULT_VERSIONS)
}

fn https_url(addr: std::net::SocketAddr) -> String {
    format!("https://{addr}/leadflo-webhook")
}

/// The answer to a POST of `body` with `secret`, and the certificate the
/// relay presented.
async fn post_tls(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value, Vec<u8>) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-webhook-secret", secret)
        .body(body)
        .send()
        .await
        .expect("the HTTPS request reaches the relay");
    let served = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("the relay presented a certificate")
        .to_vec();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json, served)
}

/// The certificate the relay serves to a new connection now.
async fn served(client: &reqwest::Client, url: &str) -> Vec<u8> {
    post_tls(client, url, "probe", Vec::new()).await.2
}

/// Posts leads over HTTPS, a fresh connection and handshake each, until
/// stopped (at most 5000), recording every answer.
struct TlsSender {
    answers: Arc<Mutex<Vec<Result<u16, String>>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TlsSender {
    fn start(client: reqwest::Client, url: String) -> TlsSender {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (answers, stop) = (answers.clone(), stop.clone());
            async move {
                for n in 0..5000 {
                    if stop.is_cancelled() {
                        break;
                    }
                    let answer = client
                        .post(&url)
                        .header("x-webhook-secret", SECRET)
                        .body(lead(n))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .map_err(|e| format!("{e:?}"));
                    answers.lock().unwrap().push(answer);
                }
            }
        });
        TlsSender {
            answers,
            stop,
            task,
        }
    }

    fn sent(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    async fn wait_for(&self, more: usize) {
        let target = self.sent() + more;
        eventually("the sender's answers", WAIT, async || {
            (self.sent() >= target).then_some(())
        })
        .await;
    }

    /// Stops; every answer must have been 200.
    async fn finish(self) -> usize {
        self.stop.cancel();
        self.task.await.unwrap();
        let answers = self.answers.lock().unwrap().clone();
        let refused: Vec<_> = answers.iter().filter(|a| **a != Ok(200)).collect();
        assert!(
            refused.is_empty(),
            "{} of {} POSTs were not answered 200 during the swaps: {:?}",
            refused.len(),
            answers.len(),
            &refused[..refused.len().min(5)]
        );
        answers.len()
    }
}

async fn tls_relay(files: &CertFiles, adjust: impl FnOnce(&mut Config)) -> TestRelay {
    let tls = files.tls();
    TestRelay::start_with(move |config| {
        config.server.tls = Some(tls);
        adjust(config);
    })
    .await
}

// ---- serving -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_ingest_takes_leads_over_tls_1_2_and_1_3_and_delivers_them() {
    let ca = TestCa::new();
    let leaf = ca.leaf();
    let files = CertFiles::with(&leaf);
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let crm_url = crm.url();
    let relay = tls_relay(&files, |c| {
        c.targets = vec![TargetConfig::new("crm", &crm_url)];
    })
    .await;
    let url = https_url(relay.ingest);
    for (name, versions) in [
        ("TLS 1.3", &[&rustls::version::TLS13][..]),
        ("TLS 1.2", &[&rustls::version::TLS12][..]),
    ] {
        let client = tls_client_with(&ca, versions);
        let (status, json, cert) = post_tls(&client, &url, SECRET, lead(1)).await;
        assert_eq!(status, 200, "{name}: {json}");
        assert_eq!(json["status"], "accepted", "{name}: {json}");
        assert_eq!(cert, leaf.der, "{name}: another certificate was served");
    }
    // The ingest answers hold over TLS as over plain HTTP (413 is left to
    // the plain tests: a client still sending when the relay closes may see
    // a reset instead).
    let client = tls_client(&ca);
    let (status, _, _) = post_tls(&client, &url, "wrong", lead(2)).await;
    assert_eq!(status, 401);
    let (status, _, _) = post_tls(&client, &url, SECRET, b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    let accepted = if curl_posts_a_lead(&ca, &url).await {
        3
    } else {
        2
    };
    wait_for_requests_at(&crm, accepted).await;
    // The admin listener stays plain HTTP, and tells the expiry.
    let expiry = scrape(
        relay.admin,
        "leadflo_relay_tls_certificate_expiry_timestamp_seconds",
    )
    .await;
    let in_89_days = (time::OffsetDateTime::now_utc() + time::Duration::days(89)).unix_timestamp();
    assert!(expiry > in_89_days as f64, "expiry gauge reads {expiry}");
    assert_eq!(
        relay.metrics.requests(IngestResult::Accepted),
        accepted as u64
    );
    relay.stop().await;
}

async fn wait_for_requests_at(receiver: &Receiver, count: usize) {
    eventually("the leads delivered to the target", WAIT, async || {
        (receiver.count() >= count).then_some(())
    })
    .await;
}

/// curl with `--cacert`, as an operator checks the endpoint: it offers h2
/// and gets HTTP/1.1 (ALPN). False when curl is not installed.
async fn curl_posts_a_lead(ca: &TestCa, url: &str) -> bool {
    let Some(curl) = find_on_path("curl") else {
        eprintln!("SKIPPED: the curl check needs `curl` on PATH");
        return false;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let body = String::from_utf8(lead(3)).unwrap();
    let args = [
        "-sS".to_owned(),
        "--cacert".to_owned(),
        ca_file.to_str().unwrap().to_owned(),
        "-H".to_owned(),
        "content-type: application/json".to_owned(),
        "-H".to_owned(),
        format!("x-webhook-secret: {SECRET}"),
        "--data-binary".to_owned(),
        body,
        "-w".to_owned(),
        "\n%{http_version}".to_owned(),
        url.to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(curl)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains(r#""status":"accepted""#),
        "curl: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.trim_end().ends_with("1.1"), "ALPN chose {text}");
    true
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

#[tokio::test]
async fn plain_http_to_the_https_port_gets_400_and_nothing_is_stored() {
    let ca = TestCa::new();
    let files = CertFiles::with(&ca.leaf());
    let relay = tls_relay(&files, |_| {}).await;
    let request = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        lead(1).len(),
        String::from_utf8(lead(1)).unwrap()
    );
    let answer = raw_exchange(relay.ingest, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer:?}");
    assert!(
        answer.contains(r#"{"error":"#) && answer.contains("https://"),
        "{answer}"
    );
    // A real client gets the answer too, not a reset.
    let (status, text) = try_post(
        &client(),
        &format!("http://{}/leadflo-webhook", relay.ingest),
        Some(SECRET),
        lead(2),
    )
    .await
    .expect("plain HTTP gets an answer");
    assert_eq!(status, 400, "{text}");
    eventually("the refusals counted", WAIT, async || {
        (relay
            .metrics
            .handshake_failures(HandshakeFailure::PlainHttp)
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(relay.store.events().count(), 0, "plain HTTP stored a lead");
    assert_eq!(relay.metrics.requests(IngestResult::Accepted), 0);
    // HTTPS still works.
    let (status, json, _) =
        post_tls(&tls_client(&ca), &https_url(relay.ingest), SECRET, lead(3)).await;
    assert_eq!(status, 200, "{json}");
    relay.stop().await;
}

/// A raw TLS connection to `addr` trusting `ca` (for requests reqwest
/// cannot make: a body that stalls half-way).
async fn raw_tls(
    ca: &TestCa,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// The ingest endpoint's answers hold over TLS as over plain HTTP: 200
/// only once the event is stored, 401 for a missing or wrong secret, 400
/// for a body that is not an event (quarantined), 413 for a body over the
/// limit (from its Content-Length, before it is read), 408 for a body that
/// stops half-way; nothing but the lead is stored as an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_answers_hold_over_tls() {
    let ca = TestCa::new();
    let files = CertFiles::with(&ca.leaf());
    let relay = tls_relay(&files, |config| {
        config.server.max_body_bytes = 4096;
        config.server.request_timeout =
            leadflo_relay::config::HumanDuration(Duration::from_millis(500));
    })
    .await;
    let (client, url) = (tls_client(&ca), https_url(relay.ingest));

    let (status, json, _) = post_tls(&client, &url, SECRET, lead(1)).await;
    assert_eq!(status, 200, "{json}");
    let id: leadflo_relay::store::EventId = json["id"].as_str().unwrap().parse().unwrap();
    // Acknowledged once in the write-ahead log; the store shows it once
    // the apply thread has caught up.
    let store = relay.store.clone();
    eventually("the acknowledged lead in the store", WAIT, async || {
        store.event(id).unwrap().map(|_| ())
    })
    .await;

    let (status, json, _) = post_tls(&client, &url, "not-the-secret", lead(2)).await;
    assert_eq!(status, 401, "{json}");
    let (status, json, _) = post_tls(&client, &url, SECRET, br#"{"name":"x"}"#.to_vec()).await;
    assert_eq!(status, 400, "{json}");

    // Headers only: the answer comes from the Content-Length.
    let mut stream = raw_tls(&ca, relay.ingest).await;
    let head = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: localhost\r\nx-webhook-secret: {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_close_tls(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    let mut stream = raw_tls(&ca, relay.ingest).await;
    let head = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: localhost\r\nx-webhook-secret: {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"event\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_close_tls(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    assert_eq!(relay.store.events().count(), 1, "only the lead is an event");
    relay.stop().await;
}

/// What the relay sends on `stream` until it closes it (at most 10 s).
async fn read_until_close_tls(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---- bad files -----------------------------------------------------------------

/// A bad file case: what is written, and what the error must say.
struct BadCase {
    name: &'static str,
    cert: Option<String>,
    key: String,
    want: &'static str,
    /// The file the error must name.
    names_key_file: bool,
}

fn bad_cases(ca: &TestCa) -> Vec<BadCase> {
    let leaf = ca.leaf();
    let other = ca.leaf();
    vec![
        BadCase {
            name: "unreadable",
            cert: None,
            key: leaf.key.clone(),
            want: "cannot read",
            names_key_file: false,
        },
        BadCase {
            name: "not PEM",
            cert: Some("this is not a certificate\n".to_owned()),
            key: leaf.key.clone(),
            want: "is not a PEM file",
            names_key_file: false,
        },
        BadCase {
            name: "no certificate",
            cert: Some(leaf.key.clone()),
            key: leaf.key.clone(),
            want: "holds no certificate",
            names_key_file: false,
        },
        BadCase {
            name: "no key",
            cert: Some(leaf.chain.clone()),
            key: leaf.chain.clone(),
            want: "holds no private key",
            names_key_file: true,
        },
        BadCase {
            name: "key of another certificate",
            cert: Some(leaf.chain.clone()),
            key: other.key.clone(),
            want: "does not match the certificate",
            names_key_file: true,
        },
    ]
}

impl BadCase {
    fn write(&self, files: &CertFiles) {
        let _ = std::fs::remove_file(&files.cert);
        if let Some(cert) = &self.cert {
            std::fs::write(&files.cert, cert).unwrap();
        }
        std::fs::write(&files.key, &self.key).unwrap();
    }

    fn check(&self, files: &CertFiles, err: &str, what: &str) {
        let file = if self.names_key_file {
            &files.key
        } else {
            &files.cert
        };
        assert!(
            err.contains(self.want) && err.contains(file.to_str().unwrap()),
            "{what}, {}: the error must say {:?} and name {}: {err}",
            self.name,
            self.want,
            file.display()
        );
    }
}

/// A configuration file for `check-config` with `[server.tls]` and a data
/// directory of its own.
fn config_file(files: &CertFiles, data: &Path) -> PathBuf {
    let path = files.dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\ndata_dir = {:?}\n\n{}",
            data.to_str().unwrap(),
            files.toml("5s")
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn bad_certificate_files_are_refused_at_start_and_by_check_config_naming_the_file() {
    let ca = TestCa::new();
    let files = CertFiles::new();
    let data = tempfile::tempdir().unwrap();
    let config = config_file(&files, data.path());
    for case in bad_cases(&ca) {
        case.write(&files);
        let mut relay_config = test_config(data.path());
        relay_config.server.tls = Some(files.tls());
        let err = match Relay::build(relay_config, Some(Secret::new(SECRET))).await {
            Ok(_) => panic!(
                "{}: the relay started with a bad certificate file",
                case.name
            ),
            Err(err) => format!("{err:#}"),
        };
        case.check(&files, &err, "serve");
        assert!(err.starts_with("server.tls: "), "{err}");
        let output = cli(args(&[
            "check-config",
            "--config",
            config.to_str().unwrap(),
        ]))
        .await;
        assert_eq!(output.status.code(), Some(1), "{}: check-config", case.name);
        case.check(
            &files,
            &String::from_utf8_lossy(&output.stderr),
            "check-config",
        );
    }
}

#[tokio::test]
async fn an_expired_certificate_is_a_warning_with_its_date_not_an_error() {
    let ca = TestCa::new();
    let expired = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let files = CertFiles::with(&ca.leaf_until(expired));
    let data = tempfile::tempdir().unwrap();
    let config = config_file(&files, data.path());
    let date = expired
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let output = cli(args(&[
        "check-config",
        "--config",
        config.to_str().unwrap(),
    ]))
    .await;
    let text = ok(output);
    assert!(
        text.contains(&format!(
            "# tls: certificate for localhost, 127.0.0.1, expires {date}"
        )),
        "{text}"
    );
    assert!(text.contains(&format!("EXPIRED on {date}")), "{text}");
    // `serve` starts, and serves it (a client that checks refuses it).
    let relay = tls_relay(&files, |_| {}).await;
    let gauge = scrape(
        relay.admin,
        "leadflo_relay_tls_certificate_expiry_timestamp_seconds",
    )
    .await;
    assert_eq!(gauge, expired.unix_timestamp() as f64);
    relay.stop().await;
}

/// The key formats certbot and openssl write: PKCS#8, PKCS#1 (RSA) and
/// SEC1 (EC), each served to a real client.
#[tokio::test]
async fn pkcs8_pkcs1_and_sec1_keys_are_served() {
    let Some(openssl) = find_on_path("openssl") else {
        eprintln!("SKIPPED: the key format check needs `openssl` on PATH");
        return;
    };
    let ca = TestCa::new();
    let work = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(&openssl)
            .args(args)
            .current_dir(work.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "rsa.pem",
    ]);
    run(&[
        "pkey",
        "-in",
        "rsa.pem",
        "-traditional",
        "-out",
        "rsa-pkcs1.pem",
    ]);
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "ec.pem",
    ]);
    run(&[
        "pkey",
        "-in",
        "ec.pem",
        "-traditional",
        "-out",
        "ec-sec1.pem",
    ]);
    let read = |name: &str| std::fs::read_to_string(work.path().join(name)).unwrap();
    for (pkcs8, served_as, label) in [
        (
            "rsa.pem",
            "rsa-pkcs1.pem",
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        ("ec.pem", "ec-sec1.pem", "-----BEGIN EC PRIVATE KEY-----"),
        ("ec.pem", "ec.pem", "-----BEGIN PRIVATE KEY-----"),
    ] {
        let key_pem = read(served_as);
        assert!(key_pem.starts_with(label), "{served_as}: {key_pem}");
        let key = rcgen::KeyPair::from_pem(&read(pkcs8)).unwrap();
        let leaf = ca.leaf_for(
            &key,
            key_pem,
            time::OffsetDateTime::now_utc() + time::Duration::days(30),
        );
        let files = CertFiles::with(&leaf);
        let relay = tls_relay(&files, |_| {}).await;
        let (status, json, cert) =
            post_tls(&tls_client(&ca), &https_url(relay.ingest), SECRET, lead(1)).await;
        assert_eq!(status, 200, "{served_as}: {json}");
        assert_eq!(cert, leaf.der);
        relay.stop().await;
    }
}

// ---- swaps -----------------------------------------------------------------

/// certbot renews in place: the relay serves the new certificate from the
/// next handshake, without a refused connection; a broken renewal is kept
/// out (and counted), and the one after it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_on_disk_is_served_and_a_broken_one_kept_out() {
    let ca = TestCa::new();
    let first = ca.leaf();
    let files = CertFiles::with(&first);
    let relay = tls_relay(&files, |c| {
        c.server.tls.as_mut().unwrap().watch_interval = "100ms".parse().unwrap();
    })
    .await;
    let url = https_url(relay.ingest);
    let probe = tls_client(&ca);
    assert_eq!(served(&probe, &url).await, first.der);
    let sender = TlsSender::start(tls_client(&ca), url.clone());
    sender.wait_for(20).await;

    let renewed = ca.leaf();
    files.write(&renewed);
    eventually("the renewed certificate served", WAIT, async || {
        (served(&probe, &url).await == renewed.der).then_some(())
    })
    .await;
    sender.wait_for(20).await;

    let failed = relay.metrics.tls_reloads("failed");
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    eventually("the broken renewal counted", WAIT, async || {
        (relay.metrics.tls_reloads("failed") > failed).then_some(())
    })
    .await;
    assert_eq!(
        served(&probe, &url).await,
        renewed.der,
        "a broken renewal replaced the certificate in use"
    );
    sender.wait_for(20).await;

    let fixed = ca.leaf();
    files.write(&fixed);
    eventually("the fixed renewal served", WAIT, async || {
        (served(&probe, &url).await == fixed.der).then_some(())
    })
    .await;
    sender.wait_for(20).await;
    let posted = sender.finish().await;
    assert!(relay.metrics.tls_reloads("ok") >= 2);
    let expiry = scrape(
        relay.admin,
        "leadflo_relay_tls_certificate_expiry_timestamp_seconds",
    )
    .await;
    assert!(expiry > 0.0);
    eprintln!("{posted} HTTPS POSTs during two renewals and a broken one, all answered 200");
    relay.stop().await;
}

/// `leadflo-relay reload` and SIGHUP read the certificate again (the real
/// binary, the file watch too slow to matter); a broken file fails the
/// reload, naming it, and the certificate in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_read_again_on_reload_and_a_broken_one_fails_the_reload() {
    let ca = TestCa::new();
    let first = ca.leaf();
    let files = CertFiles::with(&first);
    let config = files.dir.path().join("relay.toml");
    std::fs::write(&config, files.toml("1h")).unwrap();
    let relay = RelayProcess::start(
        &files.dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let admin = format!("http://{}", relay.admin);
    let url = https_url(relay.ingest);
    let probe = tls_client(&ca);
    assert_eq!(served(&probe, &url).await, first.der);
    let sender = TlsSender::start(tls_client(&ca), url.clone());
    sender.wait_for(10).await;

    let second = ca.leaf();
    files.write(&second);
    assert_eq!(
        served(&probe, &url).await,
        first.der,
        "swapped before the reload"
    );
    let report = json(cli(args(&["reload", "--json", "--admin", &admin])).await);
    assert!(
        report["certificate"]
            .as_str()
            .is_some_and(|c| c.starts_with("certificate for localhost, 127.0.0.1, expires ")),
        "{report}"
    );
    assert_eq!(report["needs_restart"], serde_json::json!([]), "{report}");
    assert_eq!(served(&probe, &url).await, second.der);
    sender.wait_for(10).await;

    // The key of another certificate: the reload fails and says why.
    std::fs::write(&files.key, ca.leaf().key).unwrap();
    let output = cli(args(&["reload", "--admin", &admin])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not match the certificate")
            && stderr.contains(files.key.to_str().unwrap()),
        "{stderr}"
    );
    assert_eq!(served(&probe, &url).await, second.der);
    for sample in [
        r#"leadflo_relay_tls_reloads_total{result="failed"}"#,
        r#"leadflo_relay_config_reloads_total{result="failed"}"#,
    ] {
        assert_eq!(scrape(relay.admin, sample).await, 1.0, "{sample}");
    }
    sender.wait_for(10).await;

    // SIGHUP, as `systemctl reload` sends it.
    let third = ca.leaf();
    files.write(&third);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually("the certificate read again at SIGHUP", WAIT, async || {
        (served(&probe, &url).await == third.der).then_some(())
    })
    .await;
    sender.wait_for(10).await;
    let posted = sender.finish().await;
    eprintln!("{posted} HTTPS POSTs during three reloads, all answered 200");
}

// ---- abuse during the handshake -------------------------------------------------

/// A client that opens TCP and sends nothing, and one that stops half-way
/// through its ClientHello, are closed after `server.header_read_timeout`.
#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed_after_the_header_read_timeout() {
    let ca = TestCa::new();
    let files = CertFiles::with(&ca.leaf());
    let relay = tls_relay(&files, |c| {
        c.server.header_read_timeout = "1s".parse().unwrap();
    })
    .await;
    // A TLS record header announcing 512 bytes of handshake, and 3 of them.
    let partial: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01];
    for (what, sent) in [("silent", &[][..]), ("half a ClientHello", partial)] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(relay.ingest).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let answer = read_until_close(&mut stream, Duration::from_secs(10)).await;
        let took = started.elapsed();
        assert!(answer.is_empty(), "{what}: {answer:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{what}: closed after {took:?}, not after the 1 s header read timeout"
        );
    }
    eventually("the timeouts counted", WAIT, async || {
        (relay.metrics.handshake_failures(HandshakeFailure::Timeout) == 2).then_some(())
    })
    .await;
    let (status, json, _) =
        post_tls(&tls_client(&ca), &https_url(relay.ingest), SECRET, lead(1)).await;
    assert_eq!(status, 200, "{json}");
    relay.stop().await;
}

/// Idle TCP connections that never start a handshake hold slots like any
/// other: far more of them than `server.max_connections` leave at most the
/// cap open (the relay closes the idle longest), and honest HTTPS senders
/// still get in, by eviction, long before the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_that_never_handshake_hold_the_cap_and_honest_senders_get_in() {
    const CAP: usize = 16;
    let ca = TestCa::new();
    let files = CertFiles::with(&ca.leaf());
    let relay = tls_relay(&files, |c| {
        c.server.max_connections = CAP;
        c.server.header_read_timeout = "60s".parse().unwrap();
    })
    .await;
    let connect = async || connect_within_deadline(relay.ingest).await;
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(connect().await);
    }
    let client = tls_client(&ca);
    let url = https_url(relay.ingest);
    let mut latencies = Vec::new();
    for n in 0..20 {
        for _ in 0..10 {
            held.push(connect().await);
        }
        let started = Instant::now();
        let (status, json, _) = post_tls(&client, &url, SECRET, lead(n)).await;
        assert_eq!(
            status, 200,
            "honest request {n} during the idle flood: {json}"
        );
        latencies.push(started.elapsed());
    }
    // At most the cap is open: every other idle connection was closed.
    let open = eventually(
        "the idle connections beyond the cap closed",
        WAIT,
        async || {
            let open = held.iter().filter(|s| still_open(s)).count();
            (open <= CAP).then_some(open)
        },
    )
    .await;
    let evicted = scrape(relay.admin, "leadflo_relay_connections_evicted_total").await;
    assert!(
        evicted >= (held.len() / 2) as f64,
        "only {evicted} of {} idle connections evicted",
        held.len()
    );
    latencies.sort();
    eprintln!(
        "{} idle TCP connections at max_connections = {CAP}: {open} still open, honest HTTPS p50 \
         {:?}, max {:?}",
        held.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    drop(held);
    relay.stop().await;
}

/// Whether the relay has not closed `stream` (nothing to read yet).
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A client that does not trust the certificate and one that sends what
/// is not TLS after the handshake byte are counted, not served.
#[tokio::test]
async fn failed_handshakes_are_counted() {
    let ca = TestCa::new();
    let files = CertFiles::with(&ca.leaf());
    let relay = tls_relay(&files, |_| {}).await;
    let url = https_url(relay.ingest);
    let untrusting = tls_client(&TestCa::new());
    let refused = untrusting.post(&url).body(lead(1)).send().await;
    assert!(
        refused.is_err(),
        "a client that does not trust the CA got in"
    );
    let answer = raw_exchange(
        relay.ingest,
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00],
        Duration::from_secs(10),
    )
    .await;
    assert!(!answer.contains("HTTP/"), "{answer:?}");
    eventually("both failures counted", WAIT, async || {
        (relay.metrics.handshake_failures(HandshakeFailure::Error) == 2).then_some(())
    })
    .await;
    let text = metrics_text(relay.admin).await;
    assert_eq!(
        metric_value(
            &text,
            r#"leadflo_relay_tls_handshake_failures_total{reason="error"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(relay.store.events().count(), 0);
    relay.stop().await;
}

/// The abuse suite's slowloris and oversized headers, over TLS: clients
/// that finish the handshake and then dribble header bytes are closed
/// after `server.header_read_timeout` while an honest HTTPS sender gets
/// every lead in, and a header block over hyper's limit (one huge header,
/// or hundreds) is refused and counted as over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_oversized_headers_are_refused_over_tls() {
    let ca = TestCa::new();
    let files = CertFiles::with(&ca.leaf());
    let relay = tls_relay(&files, |c| {
        c.server.header_read_timeout = "2s".parse().unwrap();
    })
    .await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        streams.push(raw_tls(&ca, relay.ingest).await);
    }
    let dribbling = tokio::spawn(dribble_headers(streams, Duration::from_secs(10)));
    let (client, url) = (tls_client(&ca), https_url(relay.ingest));
    for n in 0..20 {
        let (status, json, _) = post_tls(&client, &url, SECRET, lead(n)).await;
        assert_eq!(
            status, 200,
            "honest request {n} during the slowloris: {json}"
        );
    }
    let closed = dribbling.await.unwrap();
    assert!(
        closed.iter().all(Option::is_some),
        "slowloris connections over TLS outlived the header read timeout: {closed:?}"
    );

    let huge = format!("x-padding: {}\r\n", "a".repeat(200 * 1024));
    let many: String = (0..500).map(|n| format!("x-h{n}: v\r\n")).collect();
    for headers in [huge, many] {
        let mut stream = raw_tls(&ca, relay.ingest).await;
        let head = format!(
            "POST /leadflo-webhook HTTP/1.1\r\nhost: localhost\r\nx-webhook-secret: {SECRET}\r\n\
             {headers}content-length: 2\r\n\r\n{{}}"
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let answer = read_until_close_tls(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 431") || answer.is_empty(),
            "{answer}"
        );
    }
    eventually("the refusals counted", WAIT, async || {
        (relay.metrics.requests(IngestResult::BadRequest) == 2).then_some(())
    })
    .await;
    let (status, json, _) = post_tls(&client, &url, SECRET, lead(99)).await;
    assert_eq!(status, 200, "{json}");
    relay.stop().await;
}

/// Handshaken TLS connections that each send the start of a request, then
/// one header byte per connection every 200 ms (slowloris), until the relay
/// ends each or `limit` passes; when each ended, from the start.
async fn dribble_headers(
    mut streams: Vec<tokio_rustls::client::TlsStream<TcpStream>>,
    limit: Duration,
) -> Vec<Option<Duration>> {
    use tokio::io::AsyncReadExt;
    for stream in streams.iter_mut() {
        stream
            .write_all(b"POST /leadflo-webhook HTTP/1.1\r\nx-a: ")
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut closed = vec![None; streams.len()];
    while started.elapsed() < limit && closed.iter().any(Option::is_none) {
        for (n, stream) in streams.iter_mut().enumerate() {
            if closed[n].is_some() {
                continue;
            }
            if stream.write_all(b"a").await.is_err() || stream.flush().await.is_err() {
                closed[n] = Some(started.elapsed());
                continue;
            }
            // Anything to read (a 408, the end of the stream, an error)
            // means the relay ended the connection.
            let mut buf = [0u8; 256];
            let read = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf));
            if read.await.is_ok() {
                closed[n] = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    closed
}
