//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>):
//! every attempt carries `webhook-id` (the event id, the same on every
//! attempt and replay), `webhook-timestamp` (the attempt's time, seconds)
//! and `webhook-signature`: `v1,` and the base64 HMAC-SHA256, keyed with
//! the secret after its `whsec_` prefix (base64), of `id.timestamp.body`
//! over the exact bytes sent.
//!
//! Never logs or shows the secret (`Debug` is redacted) and never puts it
//! in an error.

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

use crate::config::{Signing, TargetConfig, target_value};
use crate::store::EventId;

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// Reads a secret's base64 with or without its `=` padding: the reference
/// libraries accept both, and some secret generators drop it.
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Signs a target's requests.
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

impl PartialEq for Signer {
    fn eq(&self, other: &Signer) -> bool {
        self.key == other.key
    }
}

impl Signer {
    /// The signer `config` asks for, with its secret read; `None` unsigned.
    pub fn from_config(config: &TargetConfig) -> anyhow::Result<Option<Signer>> {
        let Some(Signing::StandardWebhooks) = config.signing else {
            return Ok(None);
        };
        let key = "signing_secret_file/signing_secret_env";
        let secret = target_value(
            &config.name,
            key,
            config.signing_secret_file.as_deref(),
            config.signing_secret_env.as_deref(),
        )?
        .ok_or_else(|| anyhow::anyhow!("target {}: {key}: not set", config.name))?;
        Signer::new(secret.expose())
            .map(Some)
            .map_err(|why| anyhow::anyhow!("target {}: {key}: {why}", config.name))
    }

    /// From a `whsec_…` secret (the errors never quote it).
    pub fn new(secret: &[u8]) -> Result<Signer, &'static str> {
        let encoded = secret
            .strip_prefix(b"whsec_")
            .ok_or("expected a secret that starts with whsec_")?;
        let key = SECRET_BASE64
            .decode(encoded)
            .map_err(|_| "expected base64 after whsec_")?;
        if key.is_empty() {
            return Err("the secret after whsec_ is empty");
        }
        Ok(Signer { key })
    }

    /// `v1,` and the signature of `body` sent as message `id` at
    /// `timestamp` (the relay's message id is the event id in decimal).
    pub fn signature(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(format!(".{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// Adds the three headers for `body` sent as event `id` at `timestamp`
    /// (Unix seconds).
    pub fn sign(&self, headers: &mut HeaderMap, id: EventId, timestamp: u64, body: &[u8]) {
        let signature = self.signature(&id.to_string(), timestamp, body);
        headers.insert(WEBHOOK_ID, HeaderValue::from(id.0));
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
        headers.insert(
            WEBHOOK_SIGNATURE,
            HeaderValue::try_from(signature).expect("base64 is a valid header value"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_without_the_prefix_or_base64_are_refused() {
        assert!(Signer::new(b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Signer::new(b"whsec_not base64!").is_err());
        assert!(Signer::new(b"whsec_").is_err());
        assert!(Signer::new(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
    }

    /// The vector the specification's reference libraries test their
    /// signing with (standard-webhooks, `libraries/python/tests/
    /// test_webhooks.py`, `test_sign_function`).
    #[test]
    fn signs_the_specifications_test_vector() {
        let signer = Signer::new(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            signer.signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_secret_without_base64_padding_is_the_same_key() {
        // 32 random bytes encode to 43 characters and one `=`.
        let padded = Signer::new(b"whsec_q3dyvLY9M3CmkxXRYIapZlqPvbZaV1Rf5aL0tDAdHZY=").unwrap();
        let bare = Signer::new(b"whsec_q3dyvLY9M3CmkxXRYIapZlqPvbZaV1Rf5aL0tDAdHZY").unwrap();
        assert_eq!(padded.key, bare.key);
        assert_eq!(padded.key.len(), 32);
    }

    #[test]
    fn the_headers_carry_the_event_id_in_decimal_the_time_and_the_signature() {
        let signer = Signer::new(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let mut headers = HeaderMap::new();
        let id = EventId(72_057_594_037_927_936 + 7);
        signer.sign(&mut headers, id, 1614265330, b"{}");
        assert_eq!(headers["webhook-id"], "72057594037927943");
        assert_eq!(headers["webhook-timestamp"], "1614265330");
        assert_eq!(
            headers["webhook-signature"],
            signer
                .signature("72057594037927943", 1614265330, b"{}")
                .as_str()
        );
        assert!(format!("{signer:?}").contains("redacted"));
    }
}
