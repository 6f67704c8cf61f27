//! Where and how alerts are posted ([`AlertSettings`]), read from
//! `[alerts]`. The URL is a credential: never logged, shown, or put in an
//! error.

use std::time::Duration;

use anyhow::Context;

use crate::config::{AlertFormat, AlertsConfig};

/// Where and how alerts are posted, read from `[alerts]` at start and at
/// each reload.
pub struct AlertSettings {
    pub(super) client: reqwest::Client,
    /// A credential: never logged or shown.
    pub(super) url: reqwest::Url,
    pub(super) format: AlertFormat,
    pub(super) min_interval: Duration,
    pub(super) timeout: Duration,
}

impl std::fmt::Debug for AlertSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSettings")
            .field("url", &"[redacted]")
            .field("format", &self.format)
            .field("min_interval", &self.min_interval)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl AlertSettings {
    /// Reads the URL `config` names; `None` when alerts are not configured.
    /// Errors name the key, never the URL.
    pub fn resolve(config: &AlertsConfig) -> anyhow::Result<Option<AlertSettings>> {
        let Some(url) = read_url(config)? else {
            return Ok(None);
        };
        crate::deliver::install_crypto_provider();
        let timeout = config.timeout.get();
        let client = reqwest::Client::builder()
            .user_agent(crate::deliver::USER_AGENT_VALUE)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .context("alerts: cannot build the HTTP client")?;
        Ok(Some(AlertSettings {
            client,
            url,
            format: config.format,
            min_interval: config.min_interval.get(),
            timeout,
        }))
    }
}

/// The webhook URL from `alerts.url_file` (which wins) or `alerts.url_env`.
fn read_url(config: &AlertsConfig) -> anyhow::Result<Option<reqwest::Url>> {
    let (key, text) = if let Some(path) = &config.url_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("alerts.url_file: cannot read {}", path.display()))?;
        ("alerts.url_file", text)
    } else if let Some(env) = &config.url_env {
        match std::env::var(env) {
            Ok(value) if !value.trim().is_empty() => ("alerts.url_env", value),
            _ => anyhow::bail!("alerts.url_env: environment variable {env} is not set or empty"),
        }
    } else {
        return Ok(None);
    };
    reqwest::Url::parse(text.trim())
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
        .map(Some)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{key}: expected an absolute http:// or https:// URL (the value is not shown: \
                 it is a credential)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_must_be_http_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, "ftp://hooks.example/T000/s3cr3t").unwrap();
        let config = AlertsConfig {
            url_file: Some(url_file),
            ..AlertsConfig::default()
        };
        let err = format!("{:#}", AlertSettings::resolve(&config).unwrap_err());
        assert!(err.contains("alerts.url_file"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        let unset = AlertsConfig {
            url_env: Some("LEADFLO_TEST_ALERTS_UNSET".to_owned()),
            ..AlertsConfig::default()
        };
        let err = AlertSettings::resolve(&unset).unwrap_err().to_string();
        assert!(err.contains("alerts.url_env") && err.contains("LEADFLO_TEST_ALERTS_UNSET"));
        assert!(
            AlertSettings::resolve(&AlertsConfig::default())
                .unwrap()
                .is_none()
        );
    }
}
