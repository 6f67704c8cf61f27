//! Reading the certificate and key files, and every check they must pass
//! before the relay serves them: readable, PEM, a certificate, a key, the
//! key matching the certificate. Each error names the file and what is
//! wrong. An expired certificate is not an error here: the caller warns,
//! with the date, and serves it (refusing to start would take the endpoint
//! down, while a renewal may be on its way).
//!
//! It never logs, and never prints a key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// The two files a certificate is read from (they may be the same file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the certificate first, then its chain.
    pub cert_file: PathBuf,
    /// PEM: its private key, PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: PathBuf,
}

impl TlsFiles {
    /// The files `[server.tls]` names; `None` when it names none (the
    /// configuration's validation refuses one without the other).
    pub fn from_config(tls: &TlsConfig) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert_file: tls.cert_file.clone()?,
            key_file: tls.key_file.clone()?,
        })
    }
}

/// What is wrong with the certificate or key file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a PEM file: {reason}", path.display())]
    NotPem { path: PathBuf, reason: String },
    #[error("{} holds no certificate (no -----BEGIN CERTIFICATE----- section){hint}", path.display())]
    NoCertificate { path: PathBuf, hint: &'static str },
    #[error(
        "{} holds no private key (no -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY \
         section){hint}",
        path.display()
    )]
    NoKey { path: PathBuf, hint: &'static str },
    #[error("{}: the certificate cannot be parsed: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: the private key cannot be used: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "the private key in {} does not match the certificate in {} (a key from another \
         certificate, or one file renewed without the other)",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// Said when a file holds the other kind of section.
const SWAPPED: &str = "; it holds the other kind: are cert_file and key_file swapped?";

/// A certificate and key that passed every check, ready to serve.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub key: CertifiedKey,
    /// What it is for: the DNS names and addresses of its subject
    /// alternative names, or else its common name.
    pub names: Vec<String>,
    /// Its notAfter, in seconds since the epoch.
    pub not_after: i64,
}

impl Certificate {
    /// Whether it has expired at `now` (seconds since the epoch).
    pub fn expired_at(&self, now: i64) -> bool {
        now > self.not_after
    }

    /// Whether it has expired now.
    pub fn expired(&self) -> bool {
        self.expired_at(time::OffsetDateTime::now_utc().unix_timestamp())
    }

    /// Its notAfter as an RFC 3339 date.
    pub fn expiry(&self) -> String {
        time::OffsetDateTime::from_unix_timestamp(self.not_after)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.not_after.to_string())
    }

    /// "certificate for NAMES, expires DATE", for people.
    pub fn summary(&self) -> String {
        let names = if self.names.is_empty() {
            "(no name)".to_owned()
        } else {
            self.names.join(", ")
        };
        format!("certificate for {names}, expires {}", self.expiry())
    }
}

/// Reads both files and checks them; the key is loaded with the `ring`
/// provider the relay serves with.
pub fn read(files: &TlsFiles) -> Result<Certificate, CertificateError> {
    let cert_sections = sections(&files.cert_file)?;
    let key_sections = if files.key_file == files.cert_file {
        cert_sections.clone()
    } else {
        sections(&files.key_file)?
    };
    assemble(cert_sections, key_sections, files)
}

/// A certificate and its key from one PEM text (the ACME cache's form);
/// `path` names it in errors.
pub fn from_pem(bytes: &[u8], path: &Path) -> Result<Certificate, CertificateError> {
    let found = pem_sections(bytes, path)?;
    let files = TlsFiles {
        cert_file: path.to_owned(),
        key_file: path.to_owned(),
    };
    assemble(found.clone(), found, &files)
}

/// Checks the sections of the certificate file and of the key file.
fn assemble(
    cert_sections: Vec<(SectionKind, Vec<u8>)>,
    key_sections: Vec<(SectionKind, Vec<u8>)>,
    files: &TlsFiles,
) -> Result<Certificate, CertificateError> {
    let chain: Vec<CertificateDer<'static>> = cert_sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    let Some(leaf) = chain.first() else {
        let has_key = cert_sections
            .iter()
            .any(|(kind, der)| PrivateKeyDer::from_pem(*kind, der.clone()).is_some());
        return Err(CertificateError::NoCertificate {
            path: files.cert_file.clone(),
            hint: if has_key { SWAPPED } else { "" },
        });
    };
    let (names, not_after) = describe(leaf).map_err(|reason| CertificateError::BadCertificate {
        path: files.cert_file.clone(),
        reason,
    })?;
    let has_certificate = key_sections
        .iter()
        .any(|(kind, _)| *kind == SectionKind::Certificate);
    let key = key_sections
        .into_iter()
        .find_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der))
        .ok_or_else(|| CertificateError::NoKey {
            path: files.key_file.clone(),
            hint: if has_certificate { SWAPPED } else { "" },
        })?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|err| match err {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            CertificateError::KeyMismatch {
                cert: files.cert_file.clone(),
                key: files.key_file.clone(),
            }
        }
        other => CertificateError::BadKey {
            path: files.key_file.clone(),
            reason: other.to_string(),
        },
    })?;
    Ok(Certificate {
        key,
        names,
        not_after,
    })
}

/// Every PEM section of `path` that rustls knows, in order.
fn sections(path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, CertificateError> {
    let bytes = std::fs::read(path).map_err(|source| CertificateError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    pem_sections(&bytes, path)
}

/// Every PEM section of `bytes` (read from `path`) that rustls knows.
fn pem_sections(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<(SectionKind, Vec<u8>)>, CertificateError> {
    let mut found = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        found.push(section.map_err(|err| CertificateError::NotPem {
            path: path.to_owned(),
            reason: err.to_string(),
        })?);
    }
    if found.is_empty() {
        return Err(CertificateError::NotPem {
            path: path.to_owned(),
            reason: "no -----BEGIN CERTIFICATE----- or -----BEGIN … PRIVATE KEY----- section"
                .to_owned(),
        });
    }
    Ok(found)
}

/// The names a certificate is for, and its notAfter (seconds since the
/// epoch).
fn describe(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|err| err.to_string())?;
    let not_after = cert.validity().not_after.timestamp();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(dns.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_address(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_owned),
        );
    }
    Ok((names, not_after))
}

fn ip_address(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA-signed leaf for `names`, valid from yesterday until
    /// `not_after`; returns (certificate chain PEM, key PEM).
    fn leaf(names: &[&str], not_after: time::OffsetDateTime) -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer).unwrap();
        (
            format!("{}{}", cert.pem(), ca_cert.pem()),
            key.serialize_pem(),
        )
    }

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let files = TlsFiles {
            cert_file: dir.join("fullchain.pem"),
            key_file: dir.join("privkey.pem"),
        };
        std::fs::write(&files.cert_file, cert).unwrap();
        std::fs::write(&files.key_file, key).unwrap();
        files
    }

    fn in_a_year() -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc() + time::Duration::days(365)
    }

    #[test]
    fn a_good_pair_is_read_with_its_names_chain_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let not_after = in_a_year();
        let (cert, key) = leaf(&["relay.example.com", "127.0.0.1"], not_after);
        let certificate = read(&files(dir.path(), &cert, &key)).unwrap();
        assert_eq!(certificate.names, ["relay.example.com", "127.0.0.1"]);
        assert_eq!(certificate.key.cert.len(), 2, "the chain is served whole");
        assert_eq!(certificate.not_after, not_after.unix_timestamp());
        assert!(!certificate.expired());
        assert!(
            certificate
                .summary()
                .starts_with("certificate for relay.example.com, 127.0.0.1, expires 20"),
            "{}",
            certificate.summary()
        );
        // One file holding both works too.
        let both = dir.path().join("both.pem");
        std::fs::write(&both, format!("{cert}{key}")).unwrap();
        read(&TlsFiles {
            cert_file: both.clone(),
            key_file: both,
        })
        .unwrap();
    }

    #[test]
    fn every_bad_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = leaf(&["localhost"], in_a_year());
        let (_, other_key) = leaf(&["localhost"], in_a_year());
        let (cert, key, other_key) = (cert.as_str(), key.as_str(), other_key.as_str());
        let cases = [
            (
                "not PEM",
                "hello, world\n",
                key,
                "fullchain.pem is not a PEM file",
            ),
            (
                "key as cert",
                key,
                key,
                "fullchain.pem holds no certificate",
            ),
            (
                "cert as key",
                cert,
                cert,
                "privkey.pem holds no private key",
            ),
            (
                "another key",
                cert,
                other_key,
                "does not match the certificate",
            ),
            (
                "broken base64",
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                key,
                "fullchain.pem is not a PEM file",
            ),
            (
                "not a certificate inside",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                key,
                "fullchain.pem: the certificate cannot be parsed",
            ),
        ];
        for (case, cert, key, want) in cases {
            let err = read(&files(dir.path(), cert, key)).unwrap_err().to_string();
            assert!(err.contains(want), "{case}: {err}");
        }
        let err = read(&files(dir.path(), key, cert)).unwrap_err().to_string();
        assert!(err.contains("swapped"), "{err}");
        let err = read(&TlsFiles {
            cert_file: dir.path().join("missing.pem"),
            key_file: dir.path().join("privkey.pem"),
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("cannot read ") && err.contains("missing.pem"),
            "{err}"
        );
    }

    #[test]
    fn an_expired_certificate_is_read_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let yesterday = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
        let (cert, key) = leaf(&["localhost"], yesterday);
        let certificate = read(&files(dir.path(), &cert, &key)).unwrap();
        assert!(certificate.expired());
        assert_eq!(certificate.not_after, yesterday.unix_timestamp());
    }
}
