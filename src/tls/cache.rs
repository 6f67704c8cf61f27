//! Where the ACME account key and certificates are kept between runs: one
//! file each in the cache directory, named by a hash of what it is for
//! (the contact or the domains, and the directory URL), so that changing
//! the domains or the authority orders anew. Files are written whole
//! (a temporary file, fsynced, renamed) and readable by the relay's user
//! only: they hold private keys.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_acme::{AccountCache, CertCache};
use sha2::{Digest, Sha256};

use super::{Certificate, from_pem};
use crate::metrics::Metrics;

/// The cache directory; sets the certificate expiry gauge from what it
/// loads and stores (what the relay serves).
pub struct AcmeCache {
    dir: PathBuf,
    metrics: Option<Arc<Metrics>>,
}

impl AcmeCache {
    pub fn new(dir: PathBuf, metrics: Option<Arc<Metrics>>) -> AcmeCache {
        AcmeCache { dir, metrics }
    }

    fn cert_path(&self, domains: &[String], directory_url: &str) -> PathBuf {
        self.dir.join(format!(
            "certificate-{}.pem",
            digest(domains, directory_url)
        ))
    }

    fn account_path(&self, contact: &[String], directory_url: &str) -> PathBuf {
        self.dir
            .join(format!("account-{}.key", digest(contact, directory_url)))
    }

    /// The certificate cached for `domains` from `directory_url`, checked
    /// as a certificate file is.
    pub fn cached(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> std::io::Result<Option<Certificate>> {
        let path = self.cert_path(domains, directory_url);
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(None);
        };
        from_pem(&bytes, &path)
            .map(Some)
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err.to_string()))
    }

    /// Sets the expiry gauge from a certificate about to be served; warns
    /// when it has expired (it is served until its renewal, which starts at
    /// once).
    fn observe(&self, pem: &[u8], path: &Path) {
        if let (Some(metrics), Ok(certificate)) = (&self.metrics, from_pem(pem, path)) {
            metrics.tls_certificate_expiry.set(certificate.not_after);
            super::warn_if_expired(&certificate);
        }
    }
}

#[async_trait::async_trait]
impl CertCache for AcmeCache {
    type EC = std::io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, Self::EC> {
        let path = self.cert_path(domains, directory_url);
        let found = read_if_exists(&path)?;
        if let Some(pem) = &found {
            self.observe(pem, &path);
        }
        Ok(found)
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> Result<(), Self::EC> {
        let path = self.cert_path(domains, directory_url);
        self.observe(cert, &path);
        write_off_thread(self.dir.clone(), path, cert.to_vec()).await
    }
}

#[async_trait::async_trait]
impl AccountCache for AcmeCache {
    type EA = std::io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, Self::EA> {
        read_if_exists(&self.account_path(contact, directory_url))
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> Result<(), Self::EA> {
        let path = self.account_path(contact, directory_url);
        write_off_thread(self.dir.clone(), path, account.to_vec()).await
    }
}

/// Hex SHA-256 of the parts, each ended by a NUL, then the directory URL.
fn digest(parts: &[String], directory_url: &str) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hash.update(directory_url.as_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn read_if_exists(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(with_path(err, path)),
    }
}

/// [`write_private`] on a blocking thread: it syncs the disk.
async fn write_off_thread(dir: PathBuf, path: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || write_private(&dir, &path, &bytes))
        .await
        .map_err(std::io::Error::other)?
}

/// Writes `bytes` to `path` whole, mode 0600, in a directory of mode 0700
/// (made if missing, tightened if not).
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|err| with_path(err, dir))?;
    // Best effort on a directory made by someone else: the files
    // themselves are 0600 whatever it allows.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    crate::durable_file::write_durably(path, bytes, 0o600).map_err(|err| with_path(err, path))
}

fn with_path(err: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is stored is loaded again under the same names only, and the
    /// files are the relay user's alone.
    #[tokio::test]
    async fn stored_keys_load_again_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let cache = AcmeCache::new(dir.path().join("acme"), None);
        // A directory made loose by hand, and a temporary file with a loose
        // mode that a crash left behind.
        let loose = std::fs::Permissions::from_mode(0o755);
        std::fs::create_dir(dir.path().join("acme")).unwrap();
        std::fs::set_permissions(dir.path().join("acme"), loose.clone()).unwrap();
        let domains = vec!["leads.example.com".to_owned()];
        let contact = vec!["mailto:ops@example.com".to_owned()];
        let url = "https://acme.example/dir";
        assert!(cache.load_cert(&domains, url).await.unwrap().is_none());
        let stale = cache.cert_path(&domains, url).with_extension("tmp");
        std::fs::write(&stale, "left by a crash").unwrap();
        std::fs::set_permissions(&stale, loose).unwrap();
        cache.store_cert(&domains, url, b"cert").await.unwrap();
        cache.store_account(&contact, url, b"key").await.unwrap();
        assert_eq!(
            cache.load_cert(&domains, url).await.unwrap().unwrap(),
            b"cert"
        );
        assert_eq!(
            cache.load_account(&contact, url).await.unwrap().unwrap(),
            b"key"
        );
        assert!(
            cache
                .load_cert(&domains, "https://other/dir")
                .await
                .unwrap()
                .is_none()
        );
        let other = vec!["www.example.com".to_owned()];
        assert!(cache.load_cert(&other, url).await.unwrap().is_none());
        for entry in std::fs::read_dir(dir.path().join("acme")).unwrap() {
            let mode = entry.unwrap().metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "a cached key is readable by others");
        }
        let mode = std::fs::metadata(dir.path().join("acme"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
