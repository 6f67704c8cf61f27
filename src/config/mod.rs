//! Settings: the TOML file, environment and command-line overrides, and the
//! validation that turns them into something the relay can run with.
//!
//! Precedence is defaults < file < flags. Secrets never come from flags and
//! never appear in `Debug` output or in [`Config::to_toml`]: the file only
//! names where a secret lives (an environment variable or a file), and the
//! secret itself is read into a [`Secret`] when the settings are resolved.
//! Every error names the file, the key and what was expected.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Config`]: loading, parsing, flag overrides, errors, the TOML shown to people |
//! | [`schema`] | each section's keys, with their defaults |
//! | [`validate`] | the checks a value must pass, and `--target NAME=URL` |
//! | [`secrets`] | reading secrets from files and the environment; [`Secret`] |
//! | [`outbound`] | a target's format, headers, status rules and signing; `[alerts]` |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod outbound;
mod schema;
mod secrets;
mod validate;

pub use crate::duration::HumanDuration;
pub use outbound::*;
pub use schema::*;
pub use secrets::{Secret, target_value};
pub use validate::{check_level, parse_target_flag};

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
    /// `[alerts]`: messages to a small team's channel.
    pub alerts: AlertsConfig,
    /// `[[targets]]`: where events are delivered.
    pub targets: Vec<TargetConfig>,
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
            // A literal header value is often a credential (an API key).
            for source in target.headers.values_mut() {
                if let HeaderSource::Literal(value) = source {
                    *value = "[redacted]".to_owned();
                }
            }
        }
        toml::to_string_pretty(&shown).expect("the configuration serializes to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// `[server.tls]` takes both files or none: each error names the key
    /// that is missing or wrong, and the file.
    #[test]
    fn tls_takes_both_files_and_names_the_missing_key() {
        assert!(
            Config::parse("", "relay.toml")
                .unwrap()
                .server
                .tls
                .is_none()
        );
        for (text, key) in [
            ("[server.tls]\n", "server.tls.cert_file"),
            (
                "[server.tls]\nkey_file = \"k.pem\"\n",
                "server.tls.cert_file",
            ),
            (
                "[server.tls]\ncert_file = \"c.pem\"\n",
                "server.tls.key_file",
            ),
            (
                "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"\"\n",
                "server.tls.key_file",
            ),
            (
                "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nwatch_interval = \"0s\"\n",
                "server.tls.watch_interval",
            ),
            (
                "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\ncert = \"x\"\n",
                "server.tls",
            ),
        ] {
            let err = Config::parse(text, "relay.toml")
                .map(|_| "accepted".to_owned())
                .unwrap_or_else(|e| e.to_string());
            assert!(
                err.contains("relay.toml") && err.contains(key),
                "{text:?}: {err}"
            );
        }
        let config = Config::parse(
            "[server.tls]\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/k.pem\"\n",
            "relay.toml",
        )
        .unwrap();
        let tls = config.server.tls.as_ref().unwrap();
        assert_eq!(tls.watch_interval.to_string(), "5s");
        assert_eq!(
            Config::parse(&config.to_toml(), "printed").unwrap(),
            config,
            "the printed configuration keeps [server.tls]"
        );
    }

    /// A target names exactly one of `url`, `url_env` and `url_file`; the
    /// URL read from a file or variable is checked when read, and no error
    /// shows it (a Slack webhook URL is a credential).
    #[test]
    fn a_target_url_comes_from_exactly_one_place_and_is_never_shown() {
        let target = |body: &str| format!("[[targets]]\nname = \"slack\"\n{body}");
        for (text, key) in [
            (target(""), "targets[0].url"),
            (
                target("url = \"https://a.example/x\"\nurl_env = \"X\"\n"),
                "targets[0].url",
            ),
            (target("url_env = \"\"\n"), "targets[0].url_env"),
            (
                target("url = \"ftp://hooks.example/T0/secret-path\"\n"),
                "targets[0].url",
            ),
        ] {
            let err = Config::parse(&text, "relay.toml")
                .map(|_| "accepted".to_owned())
                .unwrap_or_else(|e| e.to_string());
            assert!(
                err.contains("relay.toml") && err.contains(key),
                "{text:?}: {err}"
            );
            assert!(!err.contains("secret-path"), "the URL is shown: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "https://hooks.example/services/T0/B0/secret-path\n").unwrap();
        let config = Config::parse(
            &target(&format!("url_file = {:?}\n", file.to_str().unwrap())),
            "relay.toml",
        )
        .unwrap();
        let slack = &config.targets[0];
        assert_eq!(
            slack.endpoint().unwrap().as_str(),
            "https://hooks.example/services/T0/B0/secret-path"
        );
        assert!(!config.to_toml().contains("secret-path"));
        std::fs::write(&file, "hooks.example/secret-path\n").unwrap();
        let err = slack.endpoint().unwrap_err().to_string();
        assert!(err.contains("slack") && err.contains("url_file"), "{err}");
        assert!(!err.contains("secret-path"), "the URL is shown: {err}");
        let from_env = Config::parse(
            &target("url_env = \"LEADFLO_TEST_UNSET_SLACK_URL\"\n"),
            "relay.toml",
        )
        .unwrap();
        let err = from_env.targets[0].endpoint().unwrap_err().to_string();
        assert!(err.contains("LEADFLO_TEST_UNSET_SLACK_URL"), "{err}");
    }

    /// `[server.tls.acme]`: domains the TLS-ALPN-01 challenge can prove, an
    /// email contact, a known directory or an https URL, and never with
    /// certificate files; each error names the key and the value.
    #[test]
    fn acme_settings_are_checked_and_name_the_key() {
        let acme = |body: &str| format!("[server.tls.acme]\n{body}");
        for (text, key, shown) in [
            (acme("domains = []\n"), "server.tls.acme.domains", "leads.example.com"),
            (acme("domains = [\"*.example.com\"]\n"), "server.tls.acme.domains", "*.example.com"),
            (acme("domains = [\"192.0.2.1\"]\n"), "server.tls.acme.domains", "192.0.2.1"),
            (acme("domains = [\"Leads.Example.com\"]\n"), "server.tls.acme.domains", "Leads.Example.com"),
            (
                acme("domains = [\"a.example.com\"]\ncontact = \"ops\"\n"),
                "server.tls.acme.contact",
                "\"ops\"",
            ),
            (
                acme("domains = [\"a.example.com\"]\ndirectory = \"http://ca.example/dir\"\n"),
                "server.tls.acme.directory",
                "http://ca.example/dir",
            ),
            (
                "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[server.tls.acme]\ndomains = [\"a.example.com\"]\n".to_owned(),
                "server.tls.acme",
                "not both",
            ),
            (acme("domain = [\"a.example.com\"]\n"), "server.tls.acme", "domain"),
        ] {
            let err = Config::parse(&text, "relay.toml")
                .map(|_| "accepted".to_owned())
                .unwrap_or_else(|e| e.to_string());
            assert!(
                err.contains("relay.toml") && err.contains(key) && err.contains(shown),
                "{text:?}: {err}"
            );
        }
        let config = Config::parse(
            &acme("domains = [\"leads.example.com\"]\ncontact = \"ops@example.com\"\n"),
            "relay.toml",
        )
        .unwrap();
        let acme = config.server.tls.as_ref().unwrap().acme.as_ref().unwrap();
        assert_eq!(acme.directory, "letsencrypt");
        assert_eq!(
            crate::tls::acme_directory_url(&acme.directory).unwrap(),
            "https://acme-v02.api.letsencrypt.org/directory"
        );
        assert_eq!(
            Config::parse(&config.to_toml(), "printed").unwrap(),
            config,
            "the printed configuration keeps [server.tls.acme]"
        );
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
