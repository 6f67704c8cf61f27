//! The certificate in use, and how it changes under a running relay: read
//! again on reload (the reloader stages it with the rest of the
//! configuration and installs it once everything read), and when its files
//! change on disk (certbot and other ACME clients renew in place), found by
//! polling their modification times. A certificate that does not read
//! leaves the one in use in place; handshakes never wait for a swap.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{Acceptor, CertResolver, Certificate, CertificateError, TlsFiles, read};
use crate::metrics::Metrics;

/// The certificate the ingest listener serves, and the files it came from.
pub struct Certificates {
    resolver: Arc<CertResolver>,
    acceptor: Acceptor,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

/// What the watcher knows of the files.
struct State {
    files: TlsFiles,
    /// Their stamps when the certificate in use was read.
    installed: Stamps,
    /// Their stamps at the last look: a change is read once it has
    /// settled (the same at two looks), so that a renewal caught between
    /// its two files is not reported as broken.
    seen: Stamps,
    /// Stamps of files that did not read, already reported: not read
    /// again until they change.
    failed: Option<Stamps>,
}

/// Modification time and size of the certificate and the key file (each
/// `None` while it cannot be looked at); symbolic links are followed, so a
/// link moved to a new file (certbot's `live/` directory) is a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamps([Option<(SystemTime, u64)>; 2]);

impl Stamps {
    fn of(files: &TlsFiles) -> Stamps {
        let stamp = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        };
        Stamps([stamp(&files.cert_file), stamp(&files.key_file)])
    }
}

/// A certificate read for a reload, not yet served.
pub struct Staged {
    files: TlsFiles,
    stamps: Stamps,
    certificate: Certificate,
}

impl Staged {
    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }
}

/// Which event read the certificate again; in its log line.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Reload,
    FilesChanged,
}

impl Certificates {
    /// Reads the files for the first time: a relay does not start with a
    /// certificate that does not read. Sets the expiry gauge.
    pub fn load(
        files: TlsFiles,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Certificates>, Certificate), CertificateError> {
        let stamps = Stamps::of(&files);
        let certificate = read(&files)?;
        let resolver = Arc::new(CertResolver::new(certificate.key.clone()));
        let config = super::server_config(resolver.clone(), &[super::ALPN_HTTP_1_1])
            .expect("the ring provider supports TLS 1.2 and 1.3 and session tickets");
        metrics.tls_certificate_expiry.set(certificate.not_after);
        let certificates = Certificates {
            resolver,
            acceptor: Acceptor::new(Arc::new(config)),
            state: Mutex::new(State {
                files,
                installed: stamps.clone(),
                seen: stamps,
                failed: None,
            }),
            metrics,
        };
        Ok((Arc::new(certificates), certificate))
    }

    /// Accepts connections with the certificate in use at each handshake.
    pub fn acceptor(&self) -> Acceptor {
        self.acceptor.clone()
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.resolver.current()
    }

    /// Reads `files` (those the configuration names now) for a reload;
    /// nothing changes until [`Certificates::install`]. A failure is
    /// counted; the caller reports it.
    pub fn stage(&self, files: &TlsFiles) -> Result<Staged, CertificateError> {
        let stamps = Stamps::of(files);
        match read(files) {
            Ok(certificate) => Ok(Staged {
                files: files.clone(),
                stamps,
                certificate,
            }),
            Err(err) => {
                self.count(false);
                Err(err)
            }
        }
    }

    /// Serves `staged` from the next handshake on, and watches its files.
    pub fn install(&self, staged: Staged) {
        let mut state = self.lock();
        self.swap(&staged.certificate, Trigger::Reload);
        state.files = staged.files;
        state.installed = staged.stamps.clone();
        state.seen = staged.stamps;
        state.failed = None;
    }

    /// Looks at the files every `interval` until `shutdown`
    /// ([`Certificates::poll`]).
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            self.poll();
        }
    }

    /// One look at the files. A change that has settled is read: a good
    /// certificate is served from the next handshake on; one that does not
    /// read is logged and counted once, and the one in use stays.
    pub fn poll(&self) {
        let mut state = self.lock();
        let now = Stamps::of(&state.files);
        let settled = now == state.seen;
        state.seen = now.clone();
        if now == state.installed || !settled || state.failed.as_ref() == Some(&now) {
            return;
        }
        match read(&state.files) {
            Ok(certificate) => {
                self.swap(&certificate, Trigger::FilesChanged);
                state.installed = now;
                state.failed = None;
            }
            Err(err) => {
                self.count(false);
                tracing::warn!(
                    error = %err,
                    "the certificate files changed but do not read; still serving the certificate \
                     in use"
                );
                state.failed = Some(now);
            }
        }
    }

    fn swap(&self, certificate: &Certificate, trigger: Trigger) {
        self.resolver.swap(certificate.key.clone());
        self.metrics
            .tls_certificate_expiry
            .set(certificate.not_after);
        self.count(true);
        tracing::info!(trigger = ?trigger, "serving a new {}", certificate.summary());
        warn_if_expired(certificate);
    }

    fn count(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.metrics.tls_reloads.with_label_values(&[result]).inc();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("certificate state lock")
    }
}

/// Warns when `certificate` has expired: it is served all the same (a
/// client that checks refuses it), since refusing to serve would take the
/// endpoint down while a renewal may be on its way.
pub fn warn_if_expired(certificate: &Certificate) {
    if certificate.expired() {
        tracing::warn!(
            "the certificate for {} EXPIRED on {}: clients refuse it until it is renewed",
            certificate.names.join(", "),
            certificate.expiry()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, as PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes both files, with modification times of their own: two
    /// writes within one tick of the kernel's coarse clock may otherwise
    /// share one.
    fn write(files: &TlsFiles, (cert, key): &(String, String)) {
        for (path, text) in [(&files.key_file, key), (&files.cert_file, cert)] {
            std::fs::write(path, text).unwrap();
            bump(path);
        }
    }

    fn bump(path: &Path) {
        static TICK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let tick = TICK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(tick))
            .unwrap();
    }

    /// A change is read once it has settled (two looks), a good one is
    /// served, and a broken one is counted once and keeps the one in use.
    #[test]
    fn a_settled_change_is_served_and_a_broken_one_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
        };
        let first = pair();
        write(&files, &first);
        let metrics = Arc::new(Metrics::new());
        let (certificates, _) = Certificates::load(files.clone(), metrics.clone()).unwrap();
        let served = |c: &Certificates| c.current().cert[0].to_vec();
        let first_der = served(&certificates);
        certificates.poll();
        assert_eq!(metrics.tls_reloads("ok"), 0, "nothing changed");

        let second = pair();
        write(&files, &second);
        certificates.poll();
        assert_eq!(served(&certificates), first_der, "read before it settled");
        certificates.poll();
        assert_ne!(
            served(&certificates),
            first_der,
            "the renewal is not served"
        );
        assert_eq!(metrics.tls_reloads("ok"), 1);
        let second_der = served(&certificates);

        std::fs::write(&files.cert_file, "not a certificate").unwrap();
        bump(&files.cert_file);
        for _ in 0..4 {
            certificates.poll();
        }
        assert_eq!(metrics.tls_reloads("failed"), 1, "counted once");
        assert_eq!(served(&certificates), second_der);

        write(&files, &pair());
        certificates.poll();
        certificates.poll();
        assert_eq!(metrics.tls_reloads("ok"), 2);
        assert_ne!(served(&certificates), second_der);
    }
}
