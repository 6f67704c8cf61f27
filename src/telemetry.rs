//! The relay's own log lines, via `tracing`, to stderr: human-readable text
//! by default, one JSON object per line with `logging.format = "json"`.
//!
//! Callers must never put a body, a header value, a secret or any personal
//! data in a log field.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber. `RUST_LOG` wins over `logging.level`.
pub fn init(config: &LoggingConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(&value)
            .map_err(|err| anyhow::anyhow!("RUST_LOG={value:?} is not a valid filter: {err}"))?,
        _ => EnvFilter::try_new(&config.level).map_err(|err| {
            anyhow::anyhow!(
                "logging.level = {:?} is not a valid filter: {err}",
                config.level
            )
        })?,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("cannot install the log subscriber: {err}"))
}
