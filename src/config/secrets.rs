//! Secrets: read from a file or an environment variable when the settings
//! are resolved (and again at each reload), never from flags, never shown.

use std::fmt;
use std::path::Path;

use super::{ADMIN_TOKEN_ENV, Config, ConfigError, TargetConfig};

impl TargetConfig {
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

impl Config {
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

    /// The admin API token from `LEADFLO_RELAY_ADMIN_TOKEN`, if set. Whether
    /// one is required is decided where the admin listener is known
    /// ([`crate::app::require_admin_token`]): under socket activation it is
    /// not on `server.admin_listen`.
    pub fn admin_token(&self) -> Option<Secret> {
        std::env::var_os(ADMIN_TOKEN_ENV)
            .filter(|value| !value.is_empty())
            .map(|value| Secret::new(value.into_encoded_bytes()))
    }

    /// Where the inbound secret comes from, for humans (never the value).
    pub fn secret_source(&self) -> String {
        match &self.auth.secret_file {
            Some(path) => format!("file {}", path.display()),
            None => format!("environment variable {}", self.auth.secret_env),
        }
    }
}

/// Whether `url` is an absolute http(s) URL with a host.
pub(super) fn is_target_url(url: &str) -> bool {
    reqwest::Url::parse(url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

impl TargetConfig {
    /// Where the target's POSTs go: `url`, or read from `url_file` or
    /// `url_env`. Errors name the target and the key, never the value.
    pub fn endpoint(&self) -> anyhow::Result<reqwest::Url> {
        let (text, key) = if !self.url.is_empty() {
            (self.url.clone(), "url".to_owned())
        } else {
            let value = target_value(
                &self.name,
                "url",
                self.url_file.as_deref(),
                self.url_env.as_deref(),
            )?
            .ok_or_else(|| anyhow::anyhow!("target {}: no url", self.name))?;
            let key = match (&self.url_file, &self.url_env) {
                (Some(path), _) => format!("url_file {}", path.display()),
                (None, Some(env)) => format!("url_env {env}"),
                (None, None) => "url".to_owned(),
            };
            let text = String::from_utf8(value.expose().to_vec())
                .map_err(|_| anyhow::anyhow!("target {}: {key}: not UTF-8 text", self.name))?;
            (text.trim().to_owned(), key)
        };
        if !is_target_url(&text) {
            anyhow::bail!(
                "target {}: {key}: expected an absolute http:// or https:// URL (the value is not \
                 shown: it may hold credentials)",
                self.name
            );
        }
        Ok(reqwest::Url::parse(&text)?)
    }

    /// Where the URL comes from, for people: the redacted URL, or the
    /// variable or file that holds it.
    pub fn url_source(&self) -> String {
        match (&self.url_file, &self.url_env) {
            (Some(path), _) => format!("url from file {}", path.display()),
            (None, Some(env)) => format!("url from environment variable {env}"),
            (None, None) => format!("url {}", self.redacted_url()),
        }
    }
}

/// A target's secret-like value (a header, a signing secret) from `file`,
/// else from the environment variable `env`; `key` names it in errors.
pub fn target_value(
    target: &str,
    key: &str,
    file: Option<&Path>,
    env: Option<&str>,
) -> anyhow::Result<Option<Secret>> {
    if let Some(path) = file {
        let secret = read_secret_file(path)
            .map_err(|err| anyhow::anyhow!("target {target}: {key}: {err}"))?;
        return Ok(Some(secret));
    }
    let Some(env) = env else {
        return Ok(None);
    };
    match std::env::var_os(env) {
        Some(value) if !value.is_empty() => Ok(Some(Secret::new(value.into_encoded_bytes()))),
        _ => {
            anyhow::bail!("target {target}: {key}: environment variable {env} is not set or empty")
        }
    }
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
