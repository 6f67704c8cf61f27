//! The relay's own log lines, via `tracing`, to stderr: human-readable text
//! by default, one JSON object per line with `logging.format = "json"`.
//!
//! Callers must never put a body, a header value, a secret or any personal
//! data in a log field. Dependencies are held at `info` whatever the filter
//! says: at debug and trace, sled prints stored values and reqwest prints
//! target URLs (which may carry credentials), and neither may reach a log.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Crates held at `info`, whatever the filter says: each gets a
/// `crate=info` directive appended to every filter (a crate-specific
/// directive wins over a global one).
const CAPPED: [&str; 7] = [
    "sled",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
    "rustls_platform_verifier",
];

/// The filter: `RUST_LOG` if set, else `logging.level`, plus the caps.
pub fn filter(config: &LoggingConfig) -> anyhow::Result<EnvFilter> {
    let (origin, wanted) = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => ("RUST_LOG", value),
        _ => ("logging.level", config.level.clone()),
    };
    // A directive for a capped crate or one of its modules
    // (`sled::tree=trace`) is at least as specific as the cap and would
    // win over it: such directives are dropped.
    let caps = CAPPED.iter().map(|capped| format!("{capped}=info"));
    let directives: Vec<String> = wanted
        .split(',')
        .filter(|directive| {
            let target = directive.split(['[', '=']).next().unwrap_or("").trim();
            !CAPPED.iter().any(|capped| {
                target
                    .strip_prefix(capped)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
        })
        .map(str::to_owned)
        .chain(caps)
        .collect();
    EnvFilter::try_new(directives.join(","))
        .map_err(|err| anyhow::anyhow!("{origin} = {wanted:?} is not a valid filter: {err}"))
}

/// Installs the global subscriber.
pub fn init(config: &LoggingConfig) -> anyhow::Result<()> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(config)?)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match config.format {
        LogFormat::Text => builder.try_init(),
        // The event's own `target` field (a relay target's name) would clash
        // with tracing's module target in JSON.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(false)
            .try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("cannot install the log subscriber: {err}"))
}
