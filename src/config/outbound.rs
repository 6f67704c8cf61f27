//! The keys that shape what a target is sent: its format, extra headers,
//! status rules and signing; and the `[alerts]` section. What they do at
//! delivery time is in [`crate::outbound`] and [`crate::alerts`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{HumanDuration, TargetConfig};

/// `format`: what the target's request body is.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The exact bytes LeadFloAgent sent.
    #[default]
    Raw,
    /// A Slack incoming-webhook message (`text` and `blocks`).
    Slack,
    /// `template` or `template_file`, rendered with minijinja.
    Template,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Slack => "slack",
            Format::Template => "template",
        }
    }
}

/// One `[targets.headers]` value: a literal, or read from an environment
/// variable or a file, with an optional prefix (`"Bearer "`).
///
/// Read by hand rather than as an untagged enum: serde's untagged enums
/// ignore unknown keys (a misspelt `prefx` would send the token without
/// its `Bearer `), take `{ env, file }` as whichever comes first, and say
/// only "did not match any variant" when nothing fits.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum HeaderSource {
    Literal(String),
    Env {
        env: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        prefix: String,
    },
    File {
        file: PathBuf,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        prefix: String,
    },
}

/// What a `[targets.headers]` value may be, for errors.
const HEADER_SOURCE_EXPECTED: &str = "a string, { env = \"NAME\" } or { file = \"path\" } \
     (either with an optional prefix = \"Bearer \")";

impl<'de> Deserialize<'de> for HeaderSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(HeaderSourceVisitor)
    }
}

struct HeaderSourceVisitor;

impl<'de> serde::de::Visitor<'de> for HeaderSourceVisitor {
    type Value = HeaderSource;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(HEADER_SOURCE_EXPECTED)
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<HeaderSource, E> {
        Ok(HeaderSource::Literal(value.to_owned()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<HeaderSource, A::Error> {
        use serde::de::Error;
        let (mut env, mut file, mut prefix) = (None, None, String::new());
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "env" => env = Some(map.next_value::<String>()?),
                "file" => file = Some(map.next_value::<PathBuf>()?),
                "prefix" => prefix = map.next_value::<String>()?,
                other => return Err(A::Error::unknown_field(other, &["env", "file", "prefix"])),
            }
        }
        match (env, file) {
            (Some(env), None) => Ok(HeaderSource::Env { env, prefix }),
            (None, Some(file)) => Ok(HeaderSource::File { file, prefix }),
            (Some(_), Some(_)) => Err(A::Error::custom(
                "expected env or file, not both: which one holds the value?",
            )),
            (None, None) => Err(A::Error::custom(format!(
                "expected {HEADER_SOURCE_EXPECTED}"
            ))),
        }
    }
}

/// `signing`: how deliveries are signed for receivers that verify them.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Signing {
    /// <https://www.standardwebhooks.com/>: `webhook-id`,
    /// `webhook-timestamp`, `webhook-signature` (HMAC-SHA256).
    StandardWebhooks,
}

/// Headers the relay sets itself: a `[targets.headers]` entry may not
/// replace them.
pub const OWN_HEADERS: [&str; 7] = [
    "idempotency-key",
    "x-relay-attempt",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// The headers Standard Webhooks signing sets.
pub const SIGNING_HEADERS: [&str; 3] = ["webhook-id", "webhook-timestamp", "webhook-signature"];

impl TargetConfig {
    /// What the target is sent, for `check-config`: format, template
    /// source, header names (never values) and signing.
    pub fn shape_summary(&self) -> String {
        let mut parts = vec![self.url_source(), format!("format {}", self.format.name())];
        if let Some(path) = &self.template_file {
            parts.push(format!("template from {}", path.display()));
        } else if self.template.is_some() {
            parts.push("template inline".to_owned());
        }
        if !self.headers.is_empty() {
            let names: Vec<&str> = self.headers.keys().map(String::as_str).collect();
            parts.push(format!("headers {} (values redacted)", names.join(", ")));
        }
        if self.signing.is_some() {
            parts.push("signed (standard-webhooks)".to_owned());
        }
        parts.join("; ")
    }
}

/// Checks a target's format, header, status and signing keys; on error
/// returns the key and what was expected.
pub(super) fn validate_outbound(t: &TargetConfig) -> Result<(), (String, String)> {
    validate_format(t)?;
    validate_headers(t)?;
    validate_statuses(t)?;
    validate_signing(t)
}

fn validate_format(t: &TargetConfig) -> Result<(), (String, String)> {
    let sources = usize::from(t.template.is_some()) + usize::from(t.template_file.is_some());
    match t.format {
        Format::Template if sources != 1 => Err((
            "template".to_owned(),
            "expected exactly one of template (inline) or template_file with format = \"template\""
                .to_owned(),
        )),
        Format::Raw | Format::Slack if sources > 0 => Err((
            if t.template.is_some() {
                "template"
            } else {
                "template_file"
            }
            .to_owned(),
            format!(
                "a template is only used with format = \"template\", not {:?}",
                t.format.name()
            ),
        )),
        Format::Raw | Format::Slack if t.content_type.is_some() => Err((
            "content_type".to_owned(),
            format!(
                "content_type is only used with format = \"template\" (format {:?} sets its own)",
                t.format.name()
            ),
        )),
        _ => match &t.content_type {
            Some(value) if value.parse::<reqwest::header::HeaderValue>().is_err() => Err((
                "content_type".to_owned(),
                format!("expected a media type such as \"application/json\", got {value:?}"),
            )),
            _ => Ok(()),
        },
    }
}

fn validate_headers(t: &TargetConfig) -> Result<(), (String, String)> {
    let mut seen = std::collections::HashSet::new();
    for (name, source) in &t.headers {
        let key = format!("headers.{name}");
        let lower = name.to_ascii_lowercase();
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err((key, "expected a valid HTTP header name".to_owned()));
        }
        // Header names are case-insensitive: `Authorization` and
        // `authorization` would be one header, and one value lost.
        if !seen.insert(lower.clone()) {
            return Err((key, format!("{lower} is given twice (names ignore case)")));
        }
        if OWN_HEADERS.contains(&lower.as_str()) {
            return Err((
                key,
                format!("{lower} is set by the relay itself and cannot be replaced"),
            ));
        }
        if t.signing.is_some() && SIGNING_HEADERS.contains(&lower.as_str()) {
            return Err((key, format!("{lower} is set by signing")));
        }
        if lower == "x-webhook-secret" && (t.secret_env.is_some() || t.secret_file.is_some()) {
            return Err((
                key,
                "x-webhook-secret is already sent from secret_env/secret_file".to_owned(),
            ));
        }
        if lower == "authorization" && url_has_credentials(&t.url) {
            return Err((
                key,
                "authorization is already sent from the credentials in url".to_owned(),
            ));
        }
        let (empty, fixed) = match source {
            HeaderSource::Literal(value) => (false, value.as_str()),
            HeaderSource::Env { env, prefix } => (env.is_empty(), prefix.as_str()),
            HeaderSource::File { file, prefix } => (file.as_os_str().is_empty(), prefix.as_str()),
        };
        if empty {
            return Err((key, format!("expected {HEADER_SOURCE_EXPECTED}")));
        }
        // The value itself is not quoted: a literal is often a credential.
        if reqwest::header::HeaderValue::from_str(fixed).is_err() {
            return Err((
                key,
                "expected a valid header value (no control characters or line breaks)".to_owned(),
            ));
        }
    }
    Ok(())
}

/// Whether `url` carries a user or password (sent as `Authorization: Basic`).
fn url_has_credentials(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|url| !url.username().is_empty() || url.password().is_some())
}

fn validate_statuses(t: &TargetConfig) -> Result<(), (String, String)> {
    for (key, statuses) in [("retry_on", &t.retry_on), ("delivered_on", &t.delivered_on)] {
        for &status in statuses.iter() {
            if (200..300).contains(&status) {
                return Err((
                    key.to_owned(),
                    format!("{status} is a 2xx status, which is always delivered"),
                ));
            }
            // 1xx answers are interim: an attempt never ends on one.
            if !(300..=599).contains(&status) {
                return Err((
                    key.to_owned(),
                    format!("expected HTTP statuses from 300 to 599, got {status}"),
                ));
            }
        }
    }
    if let Some(both) = t.retry_on.iter().find(|s| t.delivered_on.contains(s)) {
        return Err((
            "delivered_on".to_owned(),
            format!("{both} is also in retry_on: a status is either retried or delivered"),
        ));
    }
    Ok(())
}

fn validate_signing(t: &TargetConfig) -> Result<(), (String, String)> {
    let secrets =
        usize::from(t.signing_secret_env.is_some()) + usize::from(t.signing_secret_file.is_some());
    if t.signing_secret_env.as_deref() == Some("") {
        return Err((
            "signing_secret_env".to_owned(),
            "expected an environment variable name, got \"\"".to_owned(),
        ));
    }
    match t.signing {
        Some(Signing::StandardWebhooks) if secrets == 0 => Err((
            "signing".to_owned(),
            "expected signing_secret_env or signing_secret_file (a whsec_… secret)".to_owned(),
        )),
        None if secrets > 0 => Err((
            if t.signing_secret_env.is_some() {
                "signing_secret_env"
            } else {
                "signing_secret_file"
            }
            .to_owned(),
            "a signing secret is only used with signing = \"standard-webhooks\"".to_owned(),
        )),
        _ => Ok(()),
    }
}

/// `[alerts]`: where the relay posts a message when a lead is
/// dead-lettered, a circuit opens or closes, or disk space runs low.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Environment variable holding the webhook URL (a Slack incoming
    /// webhook URL is a credential: it is never written in the file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// Or a file holding it; wins over `url_env`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// `slack` (a message with `text`) or `json` (a plain JSON object).
    pub format: AlertFormat,
    /// At most one message per kind and target in this time; what comes
    /// meanwhile is counted into the next one.
    pub min_interval: HumanDuration,
    /// Time limit of one post.
    pub timeout: HumanDuration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            url_env: None,
            url_file: None,
            format: AlertFormat::Slack,
            min_interval: HumanDuration(Duration::from_secs(60)),
            timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

impl AlertsConfig {
    /// Whether alerts are configured at all.
    pub fn enabled(&self) -> bool {
        self.url_env.is_some() || self.url_file.is_some()
    }
}

/// Checks the `[alerts]` keys; on error returns the key (`alerts.…`) and
/// what was expected. The URL itself is read, and checked, when the relay
/// starts or reloads ([`crate::alerts::AlertSettings::resolve`]).
pub(super) fn validate_alerts(a: &AlertsConfig) -> Result<(), (String, String)> {
    if a.url_env.as_deref() == Some("") {
        return Err((
            "alerts.url_env".to_owned(),
            "expected an environment variable name, got \"\"".to_owned(),
        ));
    }
    if a.url_file
        .as_ref()
        .is_some_and(|path| path.as_os_str().is_empty())
    {
        return Err((
            "alerts.url_file".to_owned(),
            "expected the path of a file holding the webhook URL, got \"\"".to_owned(),
        ));
    }
    for (key, value) in [
        ("alerts.min_interval", a.min_interval),
        ("alerts.timeout", a.timeout),
    ] {
        if value.0.is_zero() {
            return Err((
                key.to_owned(),
                "expected a duration above zero, got 0".to_owned(),
            ));
        }
    }
    Ok(())
}

/// `alerts.format`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AlertFormat {
    #[default]
    Slack,
    Json,
}

/// The `[targets.headers]` table type.
pub type Headers = BTreeMap<String, HeaderSource>;

#[cfg(test)]
mod alerts_tests {
    use crate::config::Config;

    #[test]
    fn the_alerts_section_takes_defaults_and_bad_values_name_the_key() {
        let config = Config::parse(
            "[alerts]\nurl_file = \"/run/secrets/slack-alerts\"\nformat = \"json\"\n",
            "relay.toml",
        )
        .unwrap();
        assert!(config.alerts.enabled());
        assert_eq!(config.alerts.min_interval.to_string(), "1m");
        assert_eq!(config.alerts.timeout.to_string(), "5s");
        for (bad, key) in [
            ("[alerts]\nurl_env = \"\"\n", "alerts.url_env"),
            ("[alerts]\nurl_file = \"\"\n", "alerts.url_file"),
            (
                "[alerts]\nurl_env = \"X\"\nmin_interval = \"0s\"\n",
                "alerts.min_interval",
            ),
            (
                "[alerts]\nurl_env = \"X\"\ntimeout = \"0s\"\n",
                "alerts.timeout",
            ),
            ("[alerts]\nformat = \"teams\"\n", "alerts.format"),
            ("[alerts]\nurl = \"https://hooks.slack.com/x\"\n", "alerts"),
        ] {
            let err = Config::parse(bad, "relay.toml").unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("relay.toml"),
                "{bad}: {err}"
            );
        }
    }
}
