//! Certificates made in the tests: a certificate authority of the test's
//! own, and leaves for `localhost` and `127.0.0.1` signed by it.

use rustls::pki_types::CertificateDer;

/// A certificate authority of the test's own; clients trust only it.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

/// A certificate for `localhost` and `127.0.0.1` signed by a [`TestCa`].
pub struct Leaf {
    /// The certificate, then the CA's: a full chain, as certbot writes it.
    pub chain: String,
    pub key: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "leadflo-relay test CA");
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            der: cert.der().clone(),
            pem: cert.pem(),
        }
    }

    pub fn leaf(&self) -> Leaf {
        self.leaf_until(time::OffsetDateTime::now_utc() + time::Duration::days(90))
    }

    pub fn leaf_until(&self, not_after: time::OffsetDateTime) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        self.leaf_for(&key, key.serialize_pem(), not_after)
    }

    /// A leaf for `key` (whose PEM, in any format, is `key_pem`).
    pub fn leaf_for(
        &self,
        key: &rcgen::KeyPair,
        key_pem: String,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        let day = time::Duration::days(1);
        params.not_before = (time::OffsetDateTime::now_utc() - day).min(not_after - day);
        params.not_after = not_after;
        let cert = params.signed_by(key, &self.issuer).unwrap();
        Leaf {
            chain: format!("{}{}", cert.pem(), self.pem),
            key: key_pem,
            der: cert.der().to_vec(),
        }
    }
}
