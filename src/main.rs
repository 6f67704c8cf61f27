//! The `leadflo-relay` command: parses flags, loads the configuration, and
//! calls into the library. Nothing else lives here.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use leadflo_relay::Relay;
use leadflo_relay::config::{Config, LogFormat, Overrides, TargetConfig, parse_target_flag};
use tokio_util::sync::CancellationToken;

/// A durable queueing relay for LeadFloAgent webhooks: every event is on
/// disk before it is acknowledged, then delivered to each target at least once.
#[derive(Parser)]
#[command(name = "leadflo-relay", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: ingest on `server.listen`, admin on `server.admin_listen`.
    Serve(ConfigArgs),
    /// Validate the configuration and print the effective settings (secrets
    /// redacted). Exits 0 when valid, 1 otherwise.
    CheckConfig(ConfigArgs),
}

/// Where the settings come from. Secrets are never flags: they come from
/// the environment variable `auth.secret_env` or the file `auth.secret_file`.
#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file; without it, the built-in defaults apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Ingest address [default: 127.0.0.1:8080]; overrides `server.listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Admin address [default: 127.0.0.1:9090]; overrides `server.admin_listen`.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Data directory [default: ./data]; overrides `storage.data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Accept webhooks without any secret check (not for production).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Log line format; overrides `logging.format`.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Deliver every event to URL as target NAME ([a-z0-9_-]+), with the
    /// default retry policy; repeatable, added to the file's `[[targets]]`.
    #[arg(long = "target", value_name = "NAME=URL", value_parser = parse_target)]
    targets: Vec<TargetConfig>,
}

fn parse_target(value: &str) -> Result<TargetConfig, String> {
    parse_target_flag(value).map_err(|err| err.to_string())
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        config.apply(&Overrides {
            listen: self.listen,
            admin_listen: self.admin_listen,
            data_dir: self.data_dir.clone(),
            allow_unauthenticated: self.allow_unauthenticated,
            log_format: self.log_format,
            targets: self.targets.clone(),
        })?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::CheckConfig(args) => check_config(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ConfigArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    let secret = config.inbound_secret()?;
    leadflo_relay::telemetry::init(&config.logging)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Handlers first: a SIGTERM that arrives while the relay starts must
        // still mean a clean shutdown, not the default sudden death.
        let signals = Signals::install()?;
        let relay = Relay::build(config, secret).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals.cancel_on_signal(shutdown.clone()));
        relay.run_until_stopped(shutdown).await
    })
}

/// SIGTERM and SIGINT, registered as soon as this is created.
struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                terminate: signal(SignalKind::terminate())
                    .context("installing a SIGTERM handler")?,
                interrupt: signal(SignalKind::interrupt())
                    .context("installing a SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn cancel_on_signal(mut self, shutdown: CancellationToken) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    }
}

fn check_config(args: &ConfigArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    let secret = config.inbound_secret()?;
    let origin = match &args.config {
        Some(path) => format!("{} with flag overrides", path.display()),
        None => "built-in defaults with flag overrides".to_owned(),
    };
    println!("# effective configuration ({origin}); secrets are redacted");
    match secret {
        Some(_) => println!("# inbound secret: set (from {})", config.secret_source()),
        None => println!("# inbound secret: NONE (unauthenticated mode)"),
    }
    print!("{}", config.to_toml());
    Ok(())
}
