//! Settings: the TOML file, environment and command-line overrides, and the
//! validation that turns them into something the relay can run with.
//!
//! Precedence is defaults < file < flags. Secrets never come from flags and
//! never appear in `Debug` output or in [`Config::to_toml`]: the file only
//! names where a secret lives (an environment variable or a file), and the
//! secret itself is read into a [`Secret`] when the settings are resolved.
//! Every error names the file, the key and what was expected.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default inbound secret variable, as in LeadFloAgent's own example.
pub const DEFAULT_SECRET_ENV: &str = "LEADFLO_WEBHOOK_SECRET";

/// The admin API token's environment variable.
pub const ADMIN_TOKEN_ENV: &str = "LEADFLO_RELAY_ADMIN_TOKEN";

/// The whole configuration file. Every field has a default, so an empty file
/// (or none) is valid apart from the inbound secret.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
    pub logging: LoggingConfig,
    /// `[[targets]]`: where events are delivered.
    pub targets: Vec<TargetConfig>,
}

/// `[[targets]]`: one downstream system.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `[a-z0-9_-]+`, unique; used in metrics and logs (never the URL).
    pub name: String,
    /// `http` or `https` URL that receives a POST per event.
    pub url: String,
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
            events: None,
            secret_env: None,
            secret_file: None,
            timeout: default_target_timeout(),
            concurrency: default_concurrency(),
            rate_per_second: None,
            circuit_failures: default_circuit_failures(),
            probe_max_interval: default_probe_max_interval(),
            retry: RetryConfig::default(),
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

    /// The secret sent to this target, from `secret_file` or `secret_env`.
    pub fn secret(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(path) = &self.secret_file {
            return read_secret_file(path).map(Some);
        }
        let Some(env) = &self.secret_env else {
            return Ok(None);
        };
        match std::env::var_os(env) {
            Some(value) if !value.is_empty() => Ok(Some(Secret::new(value.into_encoded_bytes()))),
            _ => Err(ConfigError::TargetSecret {
                target: self.name.clone(),
                env: env.clone(),
            }),
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

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub allow_unauthenticated: bool,
    pub log_format: Option<LogFormat>,
    /// `--target NAME=URL`: added to the file's targets, with defaults.
    pub targets: Vec<TargetConfig>,
}

/// A configuration error that says where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
    #[error(
        "no inbound secret: set the environment variable {env} (or `auth.secret_file` in the \
         config file) to the secret configured in LeadFloAgent, or pass \
         --allow-unauthenticated to accept unauthenticated webhooks"
    )]
    NoSecret { env: String },
    #[error("cannot read secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} is empty")]
    EmptySecretFile { path: PathBuf },
    #[error("environment variable {env} (from `auth.previous_secret_env`) is not set or empty")]
    PreviousSecret { env: String },
    #[error("target {target}: environment variable {env} (from `secret_env`) is not set or empty")]
    TargetSecret { target: String, env: String },
    #[error(
        "server.admin_listen = {addr} is not a loopback address, so the admin API needs a token: \
         set {ADMIN_TOKEN_ENV} (clients send it as Authorization: Bearer <token>), or listen on \
         127.0.0.1"
    )]
    NoAdminToken { addr: SocketAddr },
    #[error("--target {value:?}: {message}")]
    TargetFlag { value: String, message: String },
}

impl Config {
    /// Reads and parses `path`; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses TOML `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let key = err.path().to_string();
            ConfigError::Invalid {
                path: origin.to_owned(),
                key: if key == "." {
                    "(top level)".to_owned()
                } else {
                    key
                },
                message: err.into_inner().to_string().trim_end().to_owned(),
            }
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Applies command-line overrides on top of the file's values, and
    /// validates the result again (a flag may add a clashing target).
    pub fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        self.apply_fields(overrides);
        self.targets.extend(overrides.targets.iter().cloned());
        self.validate("command line")
    }

    fn apply_fields(&mut self, overrides: &Overrides) {
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
        }
        if let Some(admin) = overrides.admin_listen {
            self.server.admin_listen = admin;
        }
        if let Some(dir) = &overrides.data_dir {
            self.storage.data_dir = dir.clone();
        }
        if overrides.allow_unauthenticated {
            self.auth.allow_unauthenticated = true;
        }
        if let Some(format) = overrides.log_format {
            self.logging.format = format;
        }
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let server = &self.server;
        if !server.path.starts_with('/') || server.path.contains(['?', '#', ' ']) {
            return Err(invalid(
                "server.path",
                format!(
                    "expected an absolute URL path such as \"/leadflo-webhook\", got {:?}",
                    server.path
                ),
            ));
        }
        if server.max_body_bytes == 0 || server.max_body_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "server.max_body_bytes",
                format!(
                    "expected 1 to 67108864 bytes, got {}",
                    server.max_body_bytes
                ),
            ));
        }
        if server.max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                "expected at least 1, got 0".to_owned(),
            ));
        }
        for (key, value) in [
            ("server.header_read_timeout", server.header_read_timeout),
            ("server.request_timeout", server.request_timeout),
            ("storage.commit_timeout", self.storage.commit_timeout),
            (
                "storage.checkpoint_interval",
                self.storage.checkpoint_interval,
            ),
            ("storage.retention", self.storage.retention),
        ] {
            if value.0.is_zero() {
                return Err(invalid(
                    key,
                    "expected a duration above zero, got 0".to_owned(),
                ));
            }
        }
        if self.storage.commit_timeout.0 >= Duration::from_secs(5) {
            return Err(invalid(
                "storage.commit_timeout",
                format!(
                    "expected less than 5s (LeadFloAgent gives up after 5 s), got {}",
                    self.storage.commit_timeout
                ),
            ));
        }
        if self.storage.cache_capacity_bytes < 1024 * 1024 {
            return Err(invalid(
                "storage.cache_capacity_bytes",
                format!(
                    "expected at least 1048576 (1 MiB), got {}",
                    self.storage.cache_capacity_bytes
                ),
            ));
        }
        if self.storage.max_bytes == Some(0) {
            return Err(invalid(
                "storage.max_bytes",
                "expected a size in bytes above zero (no key for no cap), got 0".to_owned(),
            ));
        }
        if self.auth.secret_env.is_empty() {
            return Err(invalid(
                "auth.secret_env",
                "expected an environment variable name, got \"\"".to_owned(),
            ));
        }
        crate::telemetry::check_level(&self.logging.level).map_err(|message| {
            invalid(
                "logging.level",
                format!("{message}, got {:?}", self.logging.level),
            )
        })?;
        let mut names = std::collections::HashSet::new();
        for (n, target) in self.targets.iter().enumerate() {
            let key = |field: &str| format!("targets[{n}].{field}");
            validate_target(target).map_err(|(field, message)| invalid(&key(field), message))?;
            if !names.insert(target.name.as_str()) {
                return Err(invalid(
                    &key("name"),
                    format!(
                        "expected a unique name, but {:?} is used twice",
                        target.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Finds the inbound secret: `auth.secret_file`, else `auth.secret_env`.
    /// `Ok(None)` only when unauthenticated mode was asked for.
    pub fn inbound_secret(&self) -> Result<Option<Secret>, ConfigError> {
        let from_source = self.read_secret()?;
        match from_source {
            Some(secret) => Ok(Some(secret)),
            None if self.auth.allow_unauthenticated => Ok(None),
            None => Err(ConfigError::NoSecret {
                env: self.auth.secret_env.clone(),
            }),
        }
    }

    fn read_secret(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(path) = &self.auth.secret_file {
            return read_secret_file(path).map(Some);
        }
        match std::env::var_os(&self.auth.secret_env) {
            Some(value) if !value.is_empty() => Ok(Some(Secret::new(value.into_encoded_bytes()))),
            _ => Ok(None),
        }
    }

    /// The previous inbound secret, accepted during a rotation; an error if
    /// it is configured but cannot be read (a rotation that silently
    /// rejected the old secret would drop events).
    pub fn previous_secret(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(path) = &self.auth.previous_secret_file {
            return read_secret_file(path).map(Some);
        }
        let Some(env) = &self.auth.previous_secret_env else {
            return Ok(None);
        };
        match std::env::var_os(env) {
            Some(value) if !value.is_empty() => Ok(Some(Secret::new(value.into_encoded_bytes()))),
            _ => Err(ConfigError::PreviousSecret { env: env.clone() }),
        }
    }

    /// The admin API token from `LEADFLO_RELAY_ADMIN_TOKEN`; required when
    /// `server.admin_listen` is not a loopback address.
    pub fn admin_token(&self) -> Result<Option<Secret>, ConfigError> {
        let token = std::env::var_os(ADMIN_TOKEN_ENV)
            .filter(|value| !value.is_empty())
            .map(|value| Secret::new(value.into_encoded_bytes()));
        if token.is_none() && !self.server.admin_listen.ip().is_loopback() {
            return Err(ConfigError::NoAdminToken {
                addr: self.server.admin_listen,
            });
        }
        Ok(token)
    }

    /// Where the inbound secret comes from, for humans (never the value).
    pub fn secret_source(&self) -> String {
        match &self.auth.secret_file {
            Some(path) => format!("file {}", path.display()),
            None => format!("environment variable {}", self.auth.secret_env),
        }
    }

    /// The effective configuration as TOML. It holds no secret values: only
    /// the names of the variables and files that hold them.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for target in &mut shown.targets {
            if let Ok(mut url) = reqwest::Url::parse(&target.url) {
                if url.password().is_some() {
                    let _ = url.set_password(Some("[redacted]"));
                    // Readable, not percent-encoded: this is for people.
                    target.url = url.to_string().replacen("%5Bredacted%5D", "[redacted]", 1);
                }
            }
        }
        toml::to_string_pretty(&shown).expect("the configuration serializes to TOML")
    }
}

/// The smallest `rate_per_second`: one attempt start a day.
const MIN_RATE_PER_SECOND: f64 = 1.0 / 86_400.0;

/// Checks one target; on error returns the field and what was expected.
fn validate_target(t: &TargetConfig) -> Result<(), (&'static str, String)> {
    let name_ok = !t.name.is_empty()
        && t.name.len() <= 64
        && t.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !name_ok {
        return Err((
            "name",
            format!("expected 1-64 characters of [a-z0-9_-], got {:?}", t.name),
        ));
    }
    match reqwest::Url::parse(&t.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
        // The value may hold credentials: say what is wrong, not what it is.
        _ => {
            return Err((
                "url",
                "expected an absolute http:// or https:// URL".to_owned(),
            ));
        }
    }
    if let Some(events) = &t.events {
        if events.is_empty() || events.iter().any(String::is_empty) {
            return Err(("events", "expected a list of event types such as [\"visitor_created\"], or no key for every event".to_owned()));
        }
    }
    if t.secret_env.as_deref() == Some("") {
        return Err((
            "secret_env",
            "expected an environment variable name, got \"\"".to_owned(),
        ));
    }
    if t.timeout.0.is_zero() {
        return Err(("timeout", "expected a duration above zero".to_owned()));
    }
    if !(1..=1024).contains(&t.concurrency) {
        return Err((
            "concurrency",
            format!("expected 1 to 1024, got {}", t.concurrency),
        ));
    }
    if let Some(rate) = t.rate_per_second {
        // The dispatcher spaces starts `1 / rate` apart: a rate so small
        // that the interval is no `Duration` (or overflows an `Instant`)
        // would panic it. At least one start a day is allowed.
        if !(rate.is_finite() && rate >= MIN_RATE_PER_SECOND) {
            return Err((
                "rate_per_second",
                format!("expected at least one start a day (0.0000116), got {rate}"),
            ));
        }
    }
    if t.circuit_failures == 0 {
        return Err(("circuit_failures", "expected at least 1, got 0".to_owned()));
    }
    if t.probe_max_interval.0.is_zero() {
        return Err((
            "probe_max_interval",
            "expected a duration above zero".to_owned(),
        ));
    }
    let retry = &t.retry;
    if retry.initial.0.is_zero() {
        return Err(("retry.initial", "expected a duration above zero".to_owned()));
    }
    if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
        return Err((
            "retry.multiplier",
            format!(
                "expected a number of at least 1.0, got {}",
                retry.multiplier
            ),
        ));
    }
    if retry.max_interval < retry.initial {
        return Err((
            "retry.max_interval",
            format!(
                "expected at least retry.initial ({}), got {}",
                retry.initial, retry.max_interval
            ),
        ));
    }
    if retry.max_age.0.is_zero() {
        return Err(("retry.max_age", "expected a duration above zero".to_owned()));
    }
    Ok(())
}

/// Parses `--target NAME=URL`.
pub fn parse_target_flag(value: &str) -> Result<TargetConfig, ConfigError> {
    let flag_error = |message: &str| ConfigError::TargetFlag {
        value: value.to_owned(),
        message: message.to_owned(),
    };
    let (name, url) = value
        .split_once('=')
        .ok_or_else(|| flag_error("expected NAME=URL"))?;
    let target = TargetConfig::new(name, url);
    validate_target(&target)
        .map_err(|(field, message)| flag_error(&format!("{field}: {message}")))?;
    Ok(target)
}

/// A secret kept in a file; one trailing newline (or CRLF) is not part of it.
fn read_secret_file(path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::SecretFile {
        path: path.to_owned(),
        source,
    })?;
    let trimmed = trim_line_end(&text);
    if trimmed.is_empty() {
        return Err(ConfigError::EmptySecretFile {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(trimmed.to_vec()))
}

fn trim_line_end(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

/// A secret value. `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A duration written as a number and a unit: `500ms`, `10s`, `5m`, `1h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        const UNITS: [(u128, &str); 4] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1000, "s"),
        ];
        for (size, unit) in UNITS {
            if ms >= size && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let expected = || {
            format!(
                "invalid duration {text:?}: expected a whole number followed by ms, s, m, h or d \
                 (e.g. \"10s\")"
            )
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(expected)?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| expected())?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(expected()),
        };
        let millis = number.checked_mul(millis_per_unit).ok_or_else(expected)?;
        Ok(HumanDuration(Duration::from_millis(millis)))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_every_unit_and_round_trip() {
        for (text, millis) in [
            ("250ms", 250),
            ("10s", 10_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("7d", 604_800_000),
        ] {
            let parsed: HumanDuration = text.parse().unwrap();
            assert_eq!(parsed.0, Duration::from_millis(millis), "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn bad_durations_say_what_is_expected() {
        for text in ["", "10", "s", "10x", "1.5s", "-1s", "99999999999999999999d"] {
            let err = text.parse::<HumanDuration>().unwrap_err();
            assert!(err.contains("expected a whole number"), "{text}: {err}");
        }
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let config = Config::parse("", "relay.toml").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(config.server.path, "/leadflo-webhook");
        assert_eq!(config.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(config.auth.secret_env, "LEADFLO_WEBHOOK_SECRET");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n",
            "relay.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("relay.toml"), "{err}");
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
    }

    #[test]
    fn bad_value_names_file_key_and_expectation() {
        let err = Config::parse("[server]\nrequest_timeout = \"10 seconds\"\n", "relay.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("relay.toml"), "{err}");
        assert!(err.contains("server.request_timeout"), "{err}");
        assert!(err.contains("expected a whole number"), "{err}");

        let err = Config::parse("[server]\nlisten = \"localhost\"\n", "relay.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");

        let err = Config::parse("[storage]\ncommit_timeout = \"6s\"\n", "relay.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("storage.commit_timeout") && err.contains("less than 5s"),
            "{err}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let mut config =
            Config::parse("[server]\nlisten = \"127.0.0.1:1000\"\n", "relay.toml").unwrap();
        config
            .apply(&Overrides {
                listen: Some("127.0.0.1:2000".parse().unwrap()),
                data_dir: Some(PathBuf::from("/tmp/x")),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(config.server.listen.port(), 2000);
        assert_eq!(config.storage.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn targets_take_defaults_and_are_validated() {
        let text = r#"
[[targets]]
name = "crm"
url = "https://crm.example.com/hooks/leadflo"
events = ["visitor_created"]
rate_per_second = 5.0

[targets.retry]
initial = "2s"

[[targets]]
name = "slack"
url = "https://hooks.slack.com/services/T000/B000/XXXX"
"#;
        let config = Config::parse(text, "relay.toml").unwrap();
        let crm = &config.targets[0];
        assert_eq!(crm.concurrency, 4);
        assert_eq!(crm.timeout.to_string(), "10s");
        assert_eq!(crm.retry.initial.to_string(), "2s");
        assert_eq!(crm.retry.max_age.to_string(), "3d");
        assert_eq!(config.targets[1].events, None);
        assert_eq!(
            config.targets[1].redacted_url(),
            "https://hooks.slack.com/…"
        );

        for (bad, key) in [
            (
                "[[targets]]\nname = \"CRM\"\nurl = \"http://x\"\n",
                "targets[0].name",
            ),
            (
                "[[targets]]\nname = \"a\"\nurl = \"ftp://x\"\n",
                "targets[0].url",
            ),
            (
                "[[targets]]\nname = \"a\"\nurl = \"http://x\"\nconcurrency = 0\n",
                "targets[0].concurrency",
            ),
            (
                "[[targets]]\nname = \"a\"\nurl = \"http://x\"\nrate_per_second = 0.0\n",
                "targets[0].rate_per_second",
            ),
            (
                "[[targets]]\nname = \"a\"\nurl = \"http://x\"\n[[targets]]\nname = \"a\"\nurl = \"http://y\"\n",
                "targets[1].name",
            ),
            (
                "[[targets]]\nname = \"a\"\nurl = \"http://x\"\n[targets.retry]\nmultiplier = 0.5\n",
                "targets[0].retry.multiplier",
            ),
            (
                "[[targets]]\nname = \"a\"\nurl = \"http://x\"\ncolour = 1\n",
                "targets[0]",
            ),
        ] {
            let err = Config::parse(bad, "relay.toml").unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("relay.toml"),
                "{bad}: {err}"
            );
        }
        let err = Config::parse(
            "[[targets]]\nname = \"a\"\nurl = \"http://user:pw@x\"\nconcurrency = 0\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(
            !err.contains("pw@"),
            "errors must not print URL credentials: {err}"
        );
        let config = Config::parse(
            "[[targets]]\nname = \"a\"\nurl = \"https://user:pw-s3cr3t@x.example/hook\"\n",
            "f",
        )
        .unwrap();
        let shown = config.to_toml();
        assert!(
            shown.contains("https://user:[redacted]@x.example/hook") && !shown.contains("s3cr3t"),
            "config check must not print URL passwords: {shown}"
        );
    }

    #[test]
    fn target_flags_parse_and_add_to_the_file() {
        let target = parse_target_flag("crm=http://127.0.0.1:9/hook").unwrap();
        assert_eq!((target.name.as_str(), target.concurrency), ("crm", 4));
        assert!(
            parse_target_flag("no-equals")
                .unwrap_err()
                .to_string()
                .contains("NAME=URL")
        );
        assert!(parse_target_flag("Bad=http://x").is_err());
        let mut config =
            Config::parse("[[targets]]\nname = \"crm\"\nurl = \"http://a\"\n", "f").unwrap();
        let clash = Overrides {
            targets: vec![target],
            ..Overrides::default()
        };
        assert!(
            config
                .apply(&clash)
                .unwrap_err()
                .to_string()
                .contains("used twice")
        );
    }

    #[test]
    fn secret_file_wins_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t-value\n").unwrap();
        let mut config = Config::default();
        config.auth.secret_file = Some(path);
        config.auth.secret_env = "LEADFLO_TEST_UNSET_VARIABLE".to_owned();
        let secret = config.inbound_secret().unwrap().unwrap();
        assert_eq!(secret.expose(), b"s3cr3t-value");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert!(!config.to_toml().contains("s3cr3t"));
    }

    #[test]
    fn missing_secret_is_refused_unless_unauthenticated_is_asked_for() {
        let mut config = Config::default();
        config.auth.secret_env = "LEADFLO_TEST_UNSET_VARIABLE".to_owned();
        let err = config.inbound_secret().unwrap_err().to_string();
        assert!(
            err.contains("LEADFLO_TEST_UNSET_VARIABLE") && err.contains("--allow-unauthenticated"),
            "{err}"
        );
        config.auth.allow_unauthenticated = true;
        assert!(config.inbound_secret().unwrap().is_none());
    }

    /// `storage.max_bytes = 0` makes ingest refuse every event (no store is
    /// smaller than 0 bytes) while `check-config` calls the file valid; like
    /// `server.max_connections = 0`, it must be refused, naming file and key.
    #[test]
    fn a_zero_store_cap_is_refused_with_file_and_key() {
        let err = Config::parse("[storage]\nmax_bytes = 0\n", "relay.toml")
            .map(|_| "accepted".to_owned())
            .unwrap_or_else(|e| e.to_string());
        assert!(
            err.contains("relay.toml") && err.contains("storage.max_bytes"),
            "{err}"
        );
    }
}
