//! HTTPS on the ingest listener, from certificate files (reading and
//! checking them, the certificate in use swapped on reload and when the
//! files change on disk) or from an ACME authority, and the handshake
//! inside a connection's slot.
//!
//! It never logs a client's data: a failed handshake is counted, and at
//! most logged at debug level with the peer's address. It never stops a
//! running relay: a certificate that cannot be read again leaves the one in
//! use in place.
//!
//! | file | owns |
//! |---|---|
//! | [`files`] | reading the two PEM files and every check: [`Certificate`], [`CertificateError`] |
//! | [`live`] | [`Certificates`]: the certificate in use, read again on reload and on change |
//! | [`handshake`] | [`Acceptor`]: the handshake under a deadline, plain HTTP refused |
//! | [`acme`] | [`Acme`]: certificates ordered and renewed by the relay (`rustls-acme`) |
//! | [`cache`] | the ACME account key and certificates kept between runs |
//! | [`readiness`] | [`Readiness`]: whether there is a certificate to serve yet |

mod acme;
mod cache;
mod files;
mod handshake;
mod live;
mod readiness;

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::reload::Swap;

pub use acme::{Acme, AcmeSettings, acme_directory_url};
pub use files::{Certificate, CertificateError, TlsFiles, from_pem, read};
pub use handshake::{Acceptor, Handshake, HandshakeFailure, PLAIN_HTTP_ANSWER};
pub use live::{Certificates, Staged, warn_if_expired};
pub use readiness::Readiness;

/// Where the ingest listener's certificate comes from.
#[derive(Clone)]
pub enum Https {
    /// `cert_file` and `key_file`, read again on reload and on change.
    Files(Arc<Certificates>),
    /// Ordered and renewed by the relay (`[server.tls.acme]`).
    Acme(Arc<Acme>),
}

impl Https {
    /// Accepts connections with the certificate in use.
    pub fn acceptor(&self) -> Acceptor {
        match self {
            Https::Files(certificates) => certificates.acceptor(),
            Https::Acme(acme) => acme.acceptor(),
        }
    }

    /// The certificate files a reload reads again; `None` with ACME.
    pub fn files(&self) -> Option<Arc<Certificates>> {
        match self {
            Https::Files(certificates) => Some(certificates.clone()),
            Https::Acme(_) => None,
        }
    }

    /// Whether there is a certificate to serve yet; `None`: always.
    pub fn readiness(&self) -> Option<Readiness> {
        match self {
            Https::Files(_) => None,
            Https::Acme(acme) => Some(acme.readiness()),
        }
    }

    /// Keeps the certificate current until `shutdown`: watches the files
    /// every `watch_interval`, or orders and renews.
    pub fn spawn(
        &self,
        watch_interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        match self {
            Https::Files(certificates) => {
                tokio::spawn(certificates.clone().watch(watch_interval, shutdown))
            }
            Https::Acme(acme) => tokio::spawn(acme.clone().run(shutdown)),
        }
    }
}

/// The only application protocol the ingest listener speaks.
pub const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// Hands every handshake the certificate in use; a reload swaps it, and
/// handshakes already under way keep the one they took.
#[derive(Debug)]
pub struct CertResolver {
    current: Swap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(key: CertifiedKey) -> CertResolver {
        CertResolver {
            current: Swap::new(key),
        }
    }

    /// From the next handshake on, `key` is served.
    pub fn swap(&self, key: CertifiedKey) {
        self.current.store(key);
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load())
    }
}

/// rustls' settings for the ingest listener: the `ring` provider, TLS 1.2
/// and 1.3, the `alpn` protocols (`http/1.1`, and ACME's challenge
/// protocol when the relay orders its certificates), the certificate from
/// `resolver`.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Stateless session tickets (keys rotated every 6 hours): a sender
    // that opens a connection per webhook resumes without a server-side
    // cache, however many senders there are.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}
