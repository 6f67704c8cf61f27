//! `[targets.headers]`: extra request headers, each a literal or read from
//! an environment variable or a file, with an optional prefix. Values are
//! marked sensitive, so they never show in `Debug` output or logs, and no
//! error here ever quotes one.
//!
//! Never lets a target's header stand in for one the relay sets itself
//! (`idempotency-key`, `x-relay-attempt`, `content-type`, …): configuration
//! validation refuses them, and so does [`resolve`], for a configuration
//! built in code.

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{HeaderSource, OWN_HEADERS, SIGNING_HEADERS, TargetConfig, target_value};

/// The target's extra headers with their values read.
pub fn resolve(config: &TargetConfig) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, source) in &config.headers {
        let key = format!("headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| anyhow::anyhow!("target {}: {key}: not a header name", config.name))?;
        let reserved = OWN_HEADERS.contains(&header.as_str())
            || (config.signing.is_some() && SIGNING_HEADERS.contains(&header.as_str()));
        if reserved {
            anyhow::bail!(
                "target {}: {key}: {header} is set by the relay itself and cannot be replaced",
                config.name
            );
        }
        let value = match source {
            HeaderSource::Literal(value) => value.as_bytes().to_vec(),
            HeaderSource::Env { env, prefix } => {
                prefixed(prefix, target_value(&config.name, &key, None, Some(env))?)
            }
            HeaderSource::File { file, prefix } => {
                prefixed(prefix, target_value(&config.name, &key, Some(file), None)?)
            }
        };
        let mut value = HeaderValue::from_bytes(&value).map_err(|_| {
            anyhow::anyhow!(
                "target {}: {key}: the value is not a valid header value (control characters?)",
                config.name
            )
        })?;
        value.set_sensitive(true);
        if headers.insert(header, value).is_some() {
            anyhow::bail!(
                "target {}: {key}: given twice (header names ignore case)",
                config.name
            );
        }
    }
    Ok(headers)
}

fn prefixed(prefix: &str, secret: Option<crate::config::Secret>) -> Vec<u8> {
    let mut value = prefix.as_bytes().to_vec();
    if let Some(secret) = secret {
        value.extend_from_slice(secret.expose());
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_from_literals_files_and_variables_with_their_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut config = TargetConfig::new("crm", "https://crm.example/hook");
        config
            .headers
            .insert("x-api-key".into(), HeaderSource::Literal("literal".into()));
        config.headers.insert(
            "authorization".into(),
            HeaderSource::File {
                file,
                prefix: "Bearer ".into(),
            },
        );
        let headers = resolve(&config).unwrap();
        assert_eq!(headers["x-api-key"], "literal");
        assert_eq!(headers["authorization"], "Bearer from-file");
        assert!(headers["authorization"].is_sensitive());
        assert!(!format!("{headers:?}").contains("from-file"));
    }

    #[test]
    fn the_relays_own_headers_are_refused_even_without_validation() {
        for name in ["Idempotency-Key", "x-relay-attempt", "content-type"] {
            let mut config = TargetConfig::new("crm", "https://crm.example/hook");
            config
                .headers
                .insert(name.into(), HeaderSource::Literal("mine".into()));
            let err = resolve(&config).unwrap_err().to_string();
            assert!(
                err.contains(&format!("headers.{name}")) && err.contains("cannot be replaced"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_missing_variable_names_the_target_key_and_variable() {
        let mut config = TargetConfig::new("crm", "https://crm.example/hook");
        config.headers.insert(
            "authorization".into(),
            HeaderSource::Env {
                env: "LEADFLO_TEST_UNSET_HEADER_VARIABLE".into(),
                prefix: "Bearer ".into(),
            },
        );
        let err = resolve(&config).unwrap_err().to_string();
        assert!(
            err.contains("target crm")
                && err.contains("headers.authorization")
                && err.contains("LEADFLO_TEST_UNSET_HEADER_VARIABLE"),
            "{err}"
        );
    }
}
