//! The checks each value must pass; every error names the key and what
//! was expected (the caller adds the file).

use std::time::Duration;

use super::{AcmeConfig, Config, ConfigError, TargetConfig, TlsConfig};

impl Config {
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
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
        if let Some(tls) = &server.tls {
            validate_tls(tls).map_err(|(key, message)| invalid(key, message))?;
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
        check_level(&self.logging.level).map_err(|message| {
            invalid(
                "logging.level",
                format!("{message}, got {:?}", self.logging.level),
            )
        })?;
        super::outbound::validate_alerts(&self.alerts)
            .map_err(|(key, message)| invalid(&key, message))?;
        let mut names = std::collections::HashSet::new();
        for (n, target) in self.targets.iter().enumerate() {
            let key = |field: &str| format!("targets[{n}].{field}");
            validate_target(target).map_err(|(field, message)| invalid(&key(field), message))?;
            super::outbound::validate_outbound(target)
                .map_err(|(field, message)| invalid(&key(&field), message))?;
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
}

/// Checks `[server.tls]`: both files or neither (no section); on error
/// returns the key and what was expected. The files themselves are read
/// and checked by [`crate::tls`].
fn validate_tls(tls: &TlsConfig) -> Result<(), (&'static str, String)> {
    let empty =
        |path: &Option<std::path::PathBuf>| path.as_ref().is_some_and(|p| p.as_os_str().is_empty());
    if let Some(acme) = &tls.acme {
        if tls.cert_file.is_some() || tls.key_file.is_some() {
            return Err((
                "server.tls.acme",
                "expected either [server.tls.acme] or cert_file and key_file, not both: the \
                 certificate comes from the ACME authority or from the files"
                    .to_owned(),
            ));
        }
        return validate_acme(acme);
    }
    if tls.cert_file.is_none() || empty(&tls.cert_file) {
        return Err((
            "server.tls.cert_file",
            "expected the PEM file with the certificate and its chain (e.g. certbot's \
             fullchain.pem), alongside server.tls.key_file; or no [server.tls] section for \
             plain HTTP"
                .to_owned(),
        ));
    }
    if tls.key_file.is_none() || empty(&tls.key_file) {
        return Err((
            "server.tls.key_file",
            "expected the PEM file with the certificate's private key (e.g. certbot's \
             privkey.pem), alongside server.tls.cert_file"
                .to_owned(),
        ));
    }
    if tls.watch_interval.0.is_zero() {
        return Err((
            "server.tls.watch_interval",
            "expected a duration above zero, got 0".to_owned(),
        ));
    }
    Ok(())
}

/// Checks `[server.tls.acme]`; on error returns the key and what was
/// expected. The CA file is read by [`crate::tls`].
fn validate_acme(acme: &AcmeConfig) -> Result<(), (&'static str, String)> {
    if acme.domains.is_empty() {
        return Err((
            "server.tls.acme.domains",
            "expected at least one domain name, e.g. [\"leads.example.com\"]".to_owned(),
        ));
    }
    for domain in &acme.domains {
        check_acme_domain(domain).map_err(|why| ("server.tls.acme.domains", why))?;
    }
    if let Some(contact) = &acme.contact {
        let address = contact.strip_prefix("mailto:").unwrap_or(contact);
        let well_formed = address.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty() && host.contains('.') && !address.contains(char::is_whitespace)
        });
        if !well_formed {
            return Err((
                "server.tls.acme.contact",
                format!("expected an email address, got {contact:?}"),
            ));
        }
    }
    crate::tls::acme_directory_url(&acme.directory)
        .map_err(|why| ("server.tls.acme.directory", why))?;
    Ok(())
}

/// A name the TLS-ALPN-01 challenge can prove: a DNS name, not an address
/// and not a wildcard.
fn check_acme_domain(domain: &str) -> Result<(), String> {
    if domain.starts_with("*.") {
        return Err(format!(
            "{domain:?} is a wildcard, which the TLS-ALPN-01 challenge cannot prove: list each \
             name"
        ));
    }
    if domain.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{domain:?} is an IP address; expected a domain name that resolves to this relay"
        ));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err(format!(
            "expected a lowercase domain name such as \"leads.example.com\", got {domain:?}"
        ));
    }
    Ok(())
}

/// Checks that a target names exactly one of `url`, `url_env` and
/// `url_file`, and a literal URL's form (those from the environment or a
/// file are checked when read). Never shows the value: it may hold
/// credentials.
fn validate_url_source(t: &TargetConfig) -> Result<(), (&'static str, String)> {
    let given = [!t.url.is_empty(), t.url_env.is_some(), t.url_file.is_some()];
    match given.iter().filter(|g| **g).count() {
        0 => {
            return Err((
                "url",
                "expected the target's http:// or https:// URL, or url_env / url_file naming \
                 where it is kept"
                    .to_owned(),
            ));
        }
        1 => {}
        _ => {
            return Err((
                "url",
                "expected exactly one of url, url_env and url_file".to_owned(),
            ));
        }
    }
    if t.url_env.as_deref() == Some("") {
        return Err((
            "url_env",
            "expected an environment variable name".to_owned(),
        ));
    }
    if t.url_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(("url_file", "expected a file path".to_owned()));
    }
    if !t.url.is_empty() && !super::secrets::is_target_url(&t.url) {
        return Err((
            "url",
            "expected an absolute http:// or https:// URL".to_owned(),
        ));
    }
    Ok(())
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
    validate_url_source(t)?;
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

/// Checks a `logging.level` value: `tracing` filter directives, each a
/// level (`info`) or `target=level` (or a span filter). A bare word that is
/// not a level would be read as a module name with every level enabled for
/// it and none for the relay, so a typo such as `debugg` silenced every log
/// line; it is refused instead.
pub fn check_level(level: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected a level (off, error, warn, info, debug, trace) or \
                            comma-separated target=level directives";
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        directive
            .parse::<tracing_subscriber::filter::Directive>()
            .map_err(|err| format!("{EXPECTED}; {directive:?} is not one ({err})"))?;
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!("{EXPECTED}; {directive:?} is not a level"));
        }
    }
    Ok(())
}
