//! Certificates the relay obtains and renews itself (`[server.tls.acme]`),
//! with `rustls-acme`: the TLS-ALPN-01 challenge is answered on the ingest
//! port, so only that port (443) must be reachable. The account key and
//! each certificate are kept in the cache directory, so a restart serves
//! the cached certificate at once and orders nothing. A certificate is
//! renewed once two thirds of its lifetime have passed (30 days before a
//! Let's Encrypt certificate expires); a failed order is retried with a
//! backoff that doubles up to about 18 hours, logged and counted.
//!
//! Until the first certificate exists, handshakes other than the
//! challenge's fail ([`Readiness`]).

use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls_acme::acme::{
    ACME_TLS_ALPN_NAME, LETS_ENCRYPT_PRODUCTION_DIRECTORY, LETS_ENCRYPT_STAGING_DIRECTORY,
};
use rustls_acme::{AcmeState, EventError, EventOk};
use tokio_util::sync::CancellationToken;

use super::cache::AcmeCache;
use super::{Acceptor, Readiness};
use crate::config::AcmeConfig;
use crate::metrics::Metrics;

/// The directory URL `directory` names: `letsencrypt`,
/// `letsencrypt-staging`, or an `https://` URL; otherwise what was expected.
pub fn acme_directory_url(directory: &str) -> Result<String, String> {
    match directory {
        "letsencrypt" => Ok(LETS_ENCRYPT_PRODUCTION_DIRECTORY.to_owned()),
        "letsencrypt-staging" => Ok(LETS_ENCRYPT_STAGING_DIRECTORY.to_owned()),
        url if url.starts_with("https://") && url.len() > "https://".len() => Ok(url.to_owned()),
        other => Err(format!(
            "expected \"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL, got \
             {other:?}"
        )),
    }
}

/// `[server.tls.acme]` with its defaults filled in.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub domains: Vec<String>,
    pub contact: Option<String>,
    pub directory_url: String,
    pub cache_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
}

impl AcmeSettings {
    /// The settings `acme` gives, the cache inside `data_dir` by default.
    pub fn from_config(acme: &AcmeConfig, data_dir: &std::path::Path) -> AcmeSettings {
        AcmeSettings {
            domains: acme.domains.clone(),
            contact: acme.contact.clone(),
            directory_url: acme_directory_url(&acme.directory).unwrap_or_default(),
            cache_dir: acme
                .cache_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("acme")),
            ca_file: acme.ca_file.clone(),
        }
    }

    /// The certificate a previous run cached, if any: for `check-config`.
    pub fn cached(&self) -> std::io::Result<Option<super::Certificate>> {
        AcmeCache::new(self.cache_dir.clone(), None).cached(&self.domains, &self.directory_url)
    }
}

/// The ACME client: its state machine, driven by [`Acme::run`], and the
/// acceptor whose handshakes it serves certificates (and challenges) to.
pub struct Acme {
    acceptor: Acceptor,
    readiness: Readiness,
    state: std::sync::Mutex<Option<AcmeState<std::io::Error>>>,
    settings: AcmeSettings,
    metrics: Arc<Metrics>,
}

impl Acme {
    /// Reads the CA file and prepares the client; nothing is ordered
    /// before [`Acme::run`]. Errors name the file.
    pub fn new(settings: AcmeSettings, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Acme>> {
        let client = client_config(settings.ca_file.as_deref())?;
        let cache = AcmeCache::new(settings.cache_dir.clone(), Some(metrics.clone()));
        let mut config = rustls_acme::AcmeConfig::new_with_client_config(&settings.domains, client)
            .directory(&settings.directory_url)
            .cache(cache);
        if let Some(contact) = &settings.contact {
            let address = contact.strip_prefix("mailto:").unwrap_or(contact);
            config = config.contact_push(format!("mailto:{address}"));
        }
        let state = config.state();
        let readiness = Readiness::new(&settings.domains);
        let server = super::server_config(
            state.resolver(),
            &[super::ALPN_HTTP_1_1, ACME_TLS_ALPN_NAME],
        )
        .map_err(|err| anyhow::anyhow!("server.tls.acme: cannot set up TLS: {err}"))?;
        Ok(Arc::new(Acme {
            acceptor: Acceptor::new(Arc::new(server)).waiting_for(readiness.clone()),
            readiness,
            state: std::sync::Mutex::new(Some(state)),
            settings,
            metrics,
        }))
    }

    pub fn acceptor(&self) -> Acceptor {
        self.acceptor.clone()
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// "ACME for DOMAINS from DIRECTORY", for the start-up line.
    pub fn summary(&self) -> String {
        format!(
            "ACME certificate for {} from {}",
            self.settings.domains.join(", "),
            self.settings.directory_url
        )
    }

    /// Orders, serves and renews certificates until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut state) = self.state.lock().expect("acme state lock").take() else {
            return;
        };
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = state.next() => event,
            };
            match event {
                Some(Ok(ok)) => self.on_ok(ok),
                Some(Err(err)) => self.on_error(err),
                None => return,
            }
        }
    }

    fn on_ok(&self, event: EventOk) {
        let domains = self.settings.domains.join(", ");
        match event {
            EventOk::DeployedCachedCert => {
                self.readiness.set_ready();
                tracing::info!("serving the cached ACME certificate for {domains}");
            }
            EventOk::DeployedNewCert => {
                self.readiness.set_ready();
                self.count_order("ok");
                tracing::info!("obtained and serving a new ACME certificate for {domains}");
            }
            EventOk::CertCacheStore | EventOk::AccountCacheStore => {}
        }
    }

    fn count_order(&self, result: &str) {
        self.metrics.acme_orders.with_label_values(&[result]).inc();
    }

    fn on_error(&self, err: EventError<std::io::Error, std::io::Error>) {
        let domains = self.settings.domains.join(", ");
        match err {
            EventError::Order(err) => {
                self.count_order("failed");
                tracing::warn!(
                    error = %err,
                    "the ACME order for {domains} failed; retried with backoff{}",
                    if self.readiness.is_ready() {
                        " (the certificate in use is still served)"
                    } else {
                        ""
                    }
                );
            }
            // rustls-acme orders again at once, without backoff: an
            // order that failed all the same.
            EventError::NewCertParse(err) => {
                self.count_order("failed");
                tracing::warn!(
                    error = %err,
                    "the ACME authority issued a certificate for {domains} that does not parse"
                );
            }
            other => {
                self.metrics.acme_cache_errors.inc();
                tracing::error!(
                    error = %other,
                    cache_dir = %self.settings.cache_dir.display(),
                    "the ACME cache failed for {domains}"
                );
            }
        }
    }
}

/// The TLS settings the ACME client talks to the directory with: the
/// system's roots, and those of `ca_file` if set.
fn client_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut extra = Vec::new();
    if let Some(path) = ca_file {
        let bytes = std::fs::read(path).map_err(|err| {
            anyhow::anyhow!(
                "server.tls.acme.ca_file: cannot read {}: {err}",
                path.display()
            )
        })?;
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            extra.push(cert.map_err(|err| {
                anyhow::anyhow!(
                    "server.tls.acme.ca_file: {} is not PEM: {err}",
                    path.display()
                )
            })?);
        }
        if extra.is_empty() {
            anyhow::bail!(
                "server.tls.acme.ca_file: {} holds no certificate (no -----BEGIN CERTIFICATE----- \
                 section)",
                path.display()
            );
        }
    }
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone()).map_err(
            |err| anyhow::anyhow!("server.tls.acme: cannot load the trusted roots: {err}"),
        )?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}
