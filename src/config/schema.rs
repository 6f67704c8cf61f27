//! Each section of the configuration file, its keys and their defaults.
//! Every field's `///` doc is what the key means; `relay.example.toml`
//! lists them all with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_SECRET_ENV, Format, Headers, HumanDuration, Signing};

/// `[[targets]]`: one downstream system.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `[a-z0-9_-]+`, unique; used in metrics and logs (never the URL).
    pub name: String,
    /// `http` or `https` URL that receives a POST per event. Or, for a URL
    /// that is itself a credential (a Slack incoming webhook, a Zapier
    /// hook), `url_env` or `url_file`: exactly one of the three.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Environment variable holding the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// Or a file holding it (trailing newline ignored); read again on
    /// reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// Event types this target receives; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// Environment variable whose value is sent as `x-webhook-secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// Or a file holding it (trailing newline ignored); wins over `secret_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Time limit of one attempt, connection to last byte.
    #[serde(default = "default_target_timeout")]
    pub timeout: HumanDuration,
    /// Attempts in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Attempt starts per second; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Consecutive failures that open the circuit breaker.
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    /// Longest wait between two probes while the circuit is open, so a
    /// target back from a long outage gets its backlog within this time.
    #[serde(default = "default_probe_max_interval")]
    pub probe_max_interval: HumanDuration,
    #[serde(default)]
    pub retry: RetryConfig,
    /// `raw` (the exact bytes received), `slack` (a Slack message) or
    /// `template` (rendered from `template` or `template_file`).
    #[serde(default)]
    pub format: Format,
    /// An inline minijinja template of the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Or a file holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_file: Option<PathBuf>,
    /// `content-type` of a templated body; `application/json` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Extra request headers: a value, `{ env = "NAME" }` or
    /// `{ file = "path" }`, either with an optional `prefix`.
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
    /// Statuses retried besides 408, 425, 429 and 5xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<u16>,
    /// Statuses counted as delivered besides 2xx (e.g. 409 "already exists").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered_on: Vec<u16>,
    /// `standard-webhooks`: sign every attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<Signing>,
    /// Environment variable holding the `whsec_…` signing secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_env: Option<String>,
    /// Or a file holding it; wins over `signing_secret_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_file: Option<PathBuf>,
}

fn default_target_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_concurrency() -> usize {
    4
}

fn default_probe_max_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_circuit_failures() -> u32 {
    5
}

impl TargetConfig {
    /// A target with every default, as `--target NAME=URL` makes.
    pub fn new(name: &str, url: &str) -> TargetConfig {
        TargetConfig {
            name: name.to_owned(),
            url: url.to_owned(),
            url_env: None,
            url_file: None,
            events: None,
            secret_env: None,
            secret_file: None,
            timeout: default_target_timeout(),
            concurrency: default_concurrency(),
            rate_per_second: None,
            circuit_failures: default_circuit_failures(),
            probe_max_interval: default_probe_max_interval(),
            retry: RetryConfig::default(),
            format: Format::Raw,
            template: None,
            template_file: None,
            content_type: None,
            headers: Headers::new(),
            retry_on: Vec::new(),
            delivered_on: Vec::new(),
            signing: None,
            signing_secret_env: None,
            signing_secret_file: None,
        }
    }

    /// The URL for humans: scheme, host and port only, never credentials,
    /// path or query (which may hold tokens, e.g. Zapier hook ids).
    pub fn redacted_url(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(url) => format!(
                "{}://{}{}/…",
                url.scheme(),
                url.host_str().unwrap_or("?"),
                url.port().map(|p| format!(":{p}")).unwrap_or_default()
            ),
            Err(_) => "(invalid url)".to_owned(),
        }
    }

    pub fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy {
            initial: self.retry.initial.get(),
            multiplier: self.retry.multiplier,
            max_interval: self.retry.max_interval.get(),
            max_age: self.retry.max_age.get(),
        }
    }
}

/// `[targets.retry]`: exponential backoff with full jitter.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Backoff ceiling after the first failure.
    pub initial: HumanDuration,
    /// Growth of the ceiling per failure.
    pub multiplier: f64,
    /// Largest wait between two attempts (also caps Retry-After).
    pub max_interval: HumanDuration,
    /// Age after which a failing delivery becomes a dead letter.
    pub max_age: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: HumanDuration(Duration::from_secs(1)),
            multiplier: 2.0,
            max_interval: HumanDuration(Duration::from_secs(3600)),
            max_age: HumanDuration(Duration::from_secs(72 * 3600)),
        }
    }
}

/// `[server]`: the ingest and admin listeners and their limits.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the ingest listener binds (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The only path that accepts webhooks.
    pub path: String,
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Largest accepted body; larger ones get 413 before they are read.
    pub max_body_bytes: u64,
    /// Open connections at most; at the cap a new connection closes the
    /// one idle longest (or waits, when every connection has a request in
    /// progress).
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and an idle
    /// keep-alive connection to start its next request).
    pub header_read_timeout: HumanDuration,
    /// Time a client has to send a request's body.
    pub request_timeout: HumanDuration,
    /// Time in-flight requests get to finish at shutdown.
    pub shutdown_grace: HumanDuration,
    /// After SIGTERM, how long `/readyz` answers 503 while leads are still
    /// taken, so that a load balancer moves traffic away before the port
    /// closes (5s behind one; 0s alone).
    pub drain_delay: HumanDuration,
    /// This relay's node identity (0 to 65535), mixed into every event id
    /// so that no two relays issue the same one. Unset: a random identity
    /// made with the data directory and kept in it (`node_id`).
    pub node_id: Option<u16>,
    /// `[server.tls]`: HTTPS on the ingest listener; plain HTTP when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: the ingest listener serves HTTPS with a certificate read
/// from files (certbot's, or any other ACME client's, renewed in place).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate first, then its chain (certbot's
    /// `fullchain.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM file with its private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)
    /// (certbot's `privkey.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// How often the two files are checked for a change on disk; a changed
    /// certificate is read again and used for the next handshakes.
    #[serde(default = "default_tls_watch_interval")]
    pub watch_interval: HumanDuration,
    /// `[server.tls.acme]`: the relay obtains and renews its certificate
    /// itself, instead of reading `cert_file` and `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeConfig>,
}

/// `[server.tls.acme]`: a certificate from an ACME certificate authority
/// (Let's Encrypt by default), answered with the TLS-ALPN-01 challenge on
/// the ingest port, cached, and renewed a third of its lifetime before it
/// expires.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The names the certificate is for; each must resolve to this relay,
    /// whose ingest port must be reachable on 443 from the internet.
    pub domains: Vec<String>,
    /// An email address the authority may write to about the account
    /// (expiry notices, policy changes); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
    /// `letsencrypt` (default), `letsencrypt-staging` (for trying things
    /// out: its certificates are not trusted), or another authority's
    /// directory URL (`https://…`).
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// Where the account key and certificates are kept, so that a restart
    /// does not order again; `<storage.data_dir>/acme` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// A PEM file of root certificates to trust for the directory besides
    /// the system's (a private ACME authority; Pebble in the tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_acme_directory() -> String {
    "letsencrypt".to_owned()
}

fn default_tls_watch_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

impl TlsConfig {
    /// Both files, from the given paths.
    pub fn from_files(cert_file: PathBuf, key_file: PathBuf) -> TlsConfig {
        TlsConfig {
            cert_file: Some(cert_file),
            key_file: Some(key_file),
            watch_interval: default_tls_watch_interval(),
            acme: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            path: "/leadflo-webhook".to_owned(),
            admin_listen: "127.0.0.1:9090".parse().expect("valid default"),
            max_body_bytes: 1024 * 1024,
            max_connections: 1024,
            header_read_timeout: HumanDuration(Duration::from_secs(5)),
            request_timeout: HumanDuration(Duration::from_secs(10)),
            shutdown_grace: HumanDuration(Duration::from_secs(10)),
            drain_delay: HumanDuration(Duration::ZERO),
            node_id: None,
            tls: None,
        }
    }
}

/// `[auth]`: where the inbound shared secret comes from.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Environment variable holding the secret LeadFloAgent sends in
    /// `x-webhook-secret`.
    pub secret_env: String,
    /// A file holding the secret (trailing newline ignored); wins over
    /// `secret_env` when set.
    pub secret_file: Option<PathBuf>,
    /// Accept requests without checking any secret. Refused unless asked for.
    pub allow_unauthenticated: bool,
    /// During a secret rotation: an environment variable holding the
    /// previous secret, accepted alongside the current one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_secret_env: Option<String>,
    /// Or a file holding it; wins over `previous_secret_env`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_secret_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret_env: DEFAULT_SECRET_ENV.to_owned(),
            secret_file: None,
            allow_unauthenticated: false,
            previous_secret_env: None,
            previous_secret_file: None,
        }
    }
}

/// `[storage]`: the sled log.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of the sled database (created if missing).
    pub data_dir: PathBuf,
    /// sled's page cache; bounds the relay's memory use.
    pub cache_capacity_bytes: u64,
    /// Longest a request waits for its group commit before it is answered
    /// 503; must stay inside the sender's 5 s deadline.
    pub commit_timeout: HumanDuration,
    /// Time between two checkpoints while events arrive: sled made durable
    /// on its own and the write-ahead log emptied. Longer means less work,
    /// and more to replay from the write-ahead log after a crash.
    pub checkpoint_interval: HumanDuration,
    /// Most malformed bodies kept in quarantine; the oldest go first.
    pub quarantine_max_events: usize,
    /// Most bytes of malformed bodies kept in quarantine.
    pub quarantine_max_bytes: u64,
    /// Free space below which ingest answers 503 and `/readyz` fails; by
    /// default the smaller of 5 % of the filesystem and 1 GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free_bytes: Option<u64>,
    /// Size of the store at which ingest answers 503; unlimited by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// How long delivered events stay replayable before they are pruned.
    /// Dead letters and undelivered events are never pruned.
    pub retention: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./data"),
            cache_capacity_bytes: 8 * 1024 * 1024,
            commit_timeout: HumanDuration(Duration::from_secs(3)),
            checkpoint_interval: HumanDuration(Duration::from_secs(1)),
            quarantine_max_events: 1000,
            quarantine_max_bytes: 64 * 1024 * 1024,
            min_free_bytes: None,
            max_bytes: None,
            retention: HumanDuration(Duration::from_secs(7 * 86_400)),
        }
    }
}

/// `[logging]`: the relay's own log lines (stderr).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `leadflo_relay=debug`;
    /// `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}
