//! How the load driver's senders reach the relay: plain HTTP or HTTPS, one
//! keep-alive connection per sender or a new connection (and handshake)
//! per request, as LeadFloAgent sends. Certificates are made for the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{LoadRun, SECRET, lead_payload};

/// How senders connect.
#[derive(Clone)]
pub struct Transport {
    /// TLS trusting the run's own CA; plain HTTP when `None`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// A new connection per request; one keep-alive connection per sender
    /// otherwise.
    pub per_request: bool,
    /// Each sender keeps the sessions the relay gave it and resumes them,
    /// in a store of its own: one shared store holds 8 tickets per server,
    /// too few for 64 senders.
    pub resume: bool,
}

impl Transport {
    /// One sender's TLS settings: with a session store of its own.
    fn for_sender(&self) -> Option<Arc<rustls::ClientConfig>> {
        let shared = self.tls.as_ref()?;
        let mut own = (**shared).clone();
        own.resumption = if self.resume {
            rustls::client::Resumption::in_memory_sessions(4)
        } else {
            rustls::client::Resumption::disabled()
        };
        Some(Arc::new(own))
    }
}

/// A certificate for `localhost` from a CA of the run's own: the files the
/// relay serves, and a client configuration that trusts it.
pub struct BenchCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    ca: rustls::pki_types::CertificateDer<'static>,
}

impl BenchCertificate {
    pub fn new() -> BenchCertificate {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        BenchCertificate {
            cert_pem: format!("{}{}", leaf.pem(), ca.pem()),
            key_pem: key.serialize_pem(),
            ca: ca.der().clone(),
        }
    }

    /// `[server.tls]` for the relay, the files written into `dir`.
    pub fn config_file(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let (cert, key) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        let path = dir.join("tls.toml");
        let text = format!("[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A client trusting the CA ([`Transport::resume`] says whether each
    /// sender resumes sessions).
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// What a load run over a [`Transport`] saw.
pub struct TransportRun {
    pub run: LoadRun,
    /// TLS handshakes made, and how many of them resumed a session.
    pub handshakes: u64,
    pub resumed: u64,
}

/// One HTTP/1.1 connection to `addr` over `tls` (or plain), handshaken;
/// whether its TLS handshake resumed a session.
async fn connect(
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> (SendRequest<Full<Bytes>>, bool) {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    match tls {
        None => {
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(connection);
            (sender, false)
        }
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, stream)
                .await
                .unwrap();
            let resumed =
                stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(connection);
            (sender, resumed)
        }
    }
}

/// `connections` senders POST distinct leads for `duration` over
/// `transport`, timing every request (a new connection's connect and
/// handshake included).
pub async fn timed_load_over(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    duration: Duration,
    transport: &Transport,
) -> TransportRun {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (path, transport) = (path.to_owned(), transport.clone());
            let tls = transport.for_sender();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut handshakes, mut resumed) = (0u64, 0u64);
                let mut kept = None;
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if transport.per_request || kept.is_none() {
                        let (sender, was_resumed) = connect(addr, tls.as_ref()).await;
                        kept = Some(sender);
                        handshakes += u64::from(tls.is_some());
                        resumed += u64::from(was_resumed);
                    }
                    let sender = kept.as_mut().unwrap();
                    post(sender, &path, lead_payload(c as u64 * 1_000_000_000 + n)).await;
                    latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    if transport.per_request {
                        kept = None;
                    }
                    n += 1;
                }
                (latencies, handshakes, resumed)
            })
        })
        .collect();
    let (mut latencies_us, mut handshakes, mut resumed) = (Vec::new(), 0, 0);
    for task in tasks {
        let (latencies, made, resumes) = task.await.unwrap();
        latencies_us.extend(latencies);
        handshakes += made;
        resumed += resumes;
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    TransportRun {
        run: LoadRun {
            acked: latencies_us.len() as u64,
            elapsed,
            latencies_us,
        },
        handshakes,
        resumed,
    }
}

async fn post(sender: &mut SendRequest<Full<Bytes>>, path: &str, body: Bytes) {
    let request = Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET)
        .body(Full::new(body))
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
}
