//! The `leadflo-relay` command: parses flags, loads the configuration, and
//! calls into the library. Nothing else lives here.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use leadflo_relay::app::Credentials;
use leadflo_relay::config::{
    Config, LogFormat, Overrides, Secret, TargetConfig, parse_target_flag,
};
use leadflo_relay::node::{NodeId, NodeSource};
use leadflo_relay::reload::ConfigSource;
use leadflo_relay::store::EventId;
use leadflo_relay::systemd::PassedListeners;
use leadflo_relay::{Relay, cli, ops};
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
    /// Send stored events to a target again (same idempotency-key, attempt
    /// count restarts).
    Replay(ReplayArgs),
    /// List or show stored events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Dead letters: list, retry, purge.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Per-target backlog, oldest waiting delivery, dead letters, circuit
    /// state and last success; store size and disk free.
    Stats(AccessArgs),
    /// Drop every delivery waiting for a target removed from the
    /// configuration, and its dead letters: they keep their events from
    /// being pruned. Refused for a configured target; asks first unless
    /// --yes.
    ForgetTarget(ForgetTargetArgs),
    /// Send LeadFloAgent's example payload to the relay, as LeadFloAgent's
    /// "submit a test lead" step would, and report where it went. With no
    /// relay running, send it straight to each configured target, in its
    /// format, with its headers and signature, and report each answer.
    SendTest(SendTestArgs),
    /// Make the running relay read its configuration file and secret files
    /// again, as SIGHUP does, and report what changed. Exits 1, saying why,
    /// when the file or a secret is wrong (the relay keeps running as it
    /// was).
    Reload(AccessArgs),
}

/// How an operator command reaches the log: through a running relay's admin
/// API, or by opening the data directory when no relay runs.
#[derive(Args)]
struct AccessArgs {
    /// TOML configuration file (for the data directory, the admin address
    /// and the targets).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Open this data directory directly (no relay may be running on it).
    #[arg(long, value_name = "DIR", conflicts_with = "admin")]
    data_dir: Option<PathBuf>,
    /// Admin API of a running relay, `http://host:port` or `host:port`
    /// [default: http://<server.admin_listen>];
    /// the token comes from LEADFLO_RELAY_ADMIN_TOKEN.
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// Print JSON for scripts instead of tables.
    #[arg(long)]
    json: bool,
}

impl AccessArgs {
    fn access(&self) -> anyhow::Result<cli::Access> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.storage.data_dir = dir.clone();
        }
        Ok(cli::Access {
            config,
            config_given: self.config.is_some(),
            data_dir_given: self.data_dir.is_some(),
            admin: self.admin.clone(),
            json: self.json,
        })
    }
}

fn parse_time(text: &str) -> Result<u64, String> {
    ops::parse_rfc3339(text)
}

#[derive(Args)]
struct ReplayArgs {
    /// The target to send the events to.
    #[arg(long, value_name = "NAME")]
    target: String,
    /// Events received at or after this RFC 3339 time (required unless
    /// --ids or --dead-letters is given).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    from: Option<u64>,
    /// Events received at or before this RFC 3339 time [default: now].
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    to: Option<u64>,
    /// Only events of this type.
    #[arg(long, value_name = "TYPE")]
    event: Option<String>,
    /// Only these event ids (comma-separated).
    #[arg(long, value_name = "ID,...", value_delimiter = ',')]
    ids: Option<Vec<EventId>>,
    /// Replay the target's dead letters (they leave the dead-letter store).
    #[arg(long)]
    dead_letters: bool,
    /// Say what would be replayed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Deliver the replayed events at most this many per second.
    #[arg(long, value_name = "N")]
    rate: Option<f64>,
    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// The newest stored events (or quarantined bodies), newest first.
    List {
        /// Received at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        from: Option<u64>,
        /// Received at or before this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        to: Option<u64>,
        /// Only events of this type.
        #[arg(long, value_name = "TYPE")]
        event: Option<String>,
        /// At most this many [default: 50].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// List the quarantine (malformed bodies) instead.
        #[arg(long)]
        quarantined: bool,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// One event: its metadata, where it stands at each target, and its body.
    Show {
        id: EventId,
        /// Print exactly the stored bytes, nothing else.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        access: AccessArgs,
    },
}

#[derive(Args)]
struct DlqSelectArgs {
    /// Only this target's dead letters.
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
    /// These event ids (comma-separated).
    #[arg(
        long,
        value_name = "ID,...",
        value_delimiter = ',',
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    ids: Option<Vec<EventId>>,
    /// Every dead letter (of --target, if given).
    #[arg(long)]
    all: bool,
}

impl DlqSelectArgs {
    fn selection(&self) -> ops::DlqSelection {
        ops::DlqSelection {
            target: self.target.clone(),
            ids: self.ids.clone(),
            all: self.all,
        }
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters with their reason, attempts and last status.
    List {
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Queue dead letters for delivery again (after fixing the target).
    Retry {
        #[command(flatten)]
        select: DlqSelectArgs,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Delete dead letters for good; asks first unless --yes.
    Purge {
        #[command(flatten)]
        select: DlqSelectArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        access: AccessArgs,
    },
}

#[derive(Args)]
struct ForgetTargetArgs {
    /// The target's name, as `stats` lists it.
    #[arg(value_name = "NAME")]
    target: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Args)]
struct SendTestArgs {
    /// Which example payload to send.
    #[arg(long, value_name = "EVENT", default_value = "visitor_created", value_parser = ["visitor_created", "conversation_ended"])]
    event: String,
    /// The relay's ingest URL [default: http://<server.listen><server.path>].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    #[command(flatten)]
    access: AccessArgs,
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
        Ok(self.source().load()?)
    }

    /// The file and the flags, as a reload applies them again.
    fn source(&self) -> ConfigSource {
        ConfigSource {
            path: self.config.clone(),
            overrides: Overrides {
                listen: self.listen,
                admin_listen: self.admin_listen,
                data_dir: self.data_dir.clone(),
                allow_unauthenticated: self.allow_unauthenticated,
                log_format: self.log_format,
                targets: self.targets.clone(),
            },
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::CheckConfig(args) => check_config(&args),
        command => run_operation(command),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The operator commands: a small runtime, then the library's `cli` module.
fn run_operation(command: Command) -> anyhow::Result<()> {
    leadflo_relay::crashpoint::arm_from_env().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match command {
            Command::Replay(args) => {
                let request = ops::ReplayRequest {
                    target: args.target,
                    from_ms: args.from,
                    to_ms: args.to,
                    event: args.event,
                    ids: args.ids,
                    dead_letters: args.dead_letters,
                    dry_run: args.dry_run,
                    rate: args.rate,
                };
                cli::replay(&args.access.access()?, request).await
            }
            Command::Events(EventsCommand::List {
                from,
                to,
                event,
                limit,
                quarantined,
                access,
            }) => {
                let query = ops::EventsQuery {
                    from_ms: from,
                    to_ms: to,
                    event,
                    limit,
                    quarantined,
                };
                cli::events_list(&access.access()?, query).await
            }
            Command::Events(EventsCommand::Show { id, raw, access }) => {
                cli::events_show(&access.access()?, id, raw).await
            }
            Command::Dlq(DlqCommand::List { target, access }) => {
                cli::dlq_list(&access.access()?, target).await
            }
            Command::Dlq(DlqCommand::Retry { select, access }) => {
                cli::dlq_retry(&access.access()?, select.selection()).await
            }
            Command::Dlq(DlqCommand::Purge {
                select,
                yes,
                access,
            }) => cli::dlq_purge(&access.access()?, select.selection(), yes).await,
            Command::Stats(access) => cli::stats(&access.access()?).await,
            Command::ForgetTarget(args) => {
                cli::forget_target(&args.access.access()?, args.target, args.yes).await
            }
            Command::SendTest(args) => {
                cli::send_test(&args.access.access()?, &args.event, args.url).await
            }
            Command::Reload(access) => cli::reload(&access.access()?).await,
            Command::Serve(_) | Command::CheckConfig(_) => unreachable!("handled in main"),
        }
    })
}

fn serve(args: &ConfigArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    let credentials = Credentials {
        inbound: config.inbound_secret()?,
        previous_inbound: config.previous_secret()?,
        admin_token: config.admin_token(),
    };
    leadflo_relay::telemetry::init(&config.logging)?;
    leadflo_relay::crashpoint::arm_from_env().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        // Handlers first: a SIGTERM that arrives while the relay starts must
        // still mean a clean shutdown, not the default sudden death.
        let mut signals = Signals::install()?;
        let hangups = hangups()?;
        let passed = PassedListeners::from_env()?;
        let drain_delay = config.server.drain_delay.get();
        let relay = Relay::build_from(config, credentials, passed)
            .await?
            .reload_from(args.source());
        tokio::spawn(reload_on_hangup(hangups, relay.reload_requests()));
        let shutdown = CancellationToken::new();
        let draining = relay.draining();
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                signals.next_stop().await;
                Relay::stop(draining, drain_delay, shutdown, signals.next_stop()).await;
            }
        });
        relay.run_until_stopped(shutdown).await
    });
    // A clean stop leaves nothing running; after a hung log, a blocking
    // task may still wait on it, and dropping the runtime would wait forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// SIGHUP, registered now: its default action would end the process.
#[cfg(unix)]
fn hangups() -> anyhow::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup()).context("installing a SIGHUP handler")
}

/// Asks for a reload at each SIGHUP.
#[cfg(unix)]
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    requests: std::sync::Arc<tokio::sync::Notify>,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        requests.notify_one();
    }
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

    /// Returns at the next SIGTERM or SIGINT.
    async fn next_stop(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check_config(args: &ConfigArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    let secrets = check_secrets(&config)?;
    check_targets(&config)?;
    let certificate = check_certificate(&config)?;
    let acme = check_acme(&config)?;
    print_secrets(args, &config, &secrets);
    print_node_id(&config)?;
    for target in &config.targets {
        println!("# target {}: {}", target.name, target.shape_summary());
    }
    if let Some(certificate) = &certificate {
        print_certificate(&config, certificate);
    }
    for line in acme {
        println!("# tls: {line}");
    }
    print!("{}", config.to_toml());
    Ok(())
}

/// The secrets `check_config` found; only whether each is set is printed.
struct CheckedSecrets {
    inbound: Option<Secret>,
    previous: Option<Secret>,
    admin_token: Option<Secret>,
}

/// Reads the inbound, previous and admin secrets, and refuses an admin API
/// off loopback without a token, as `serve` does.
fn check_secrets(config: &Config) -> anyhow::Result<CheckedSecrets> {
    let inbound = config.inbound_secret()?;
    let admin_token = config.admin_token();
    // As `serve` decides it when it binds `server.admin_listen` itself (a
    // socket passed by systemd is checked when `serve` takes it).
    leadflo_relay::app::require_admin_token(
        config.server.admin_listen,
        leadflo_relay::app::SocketOrigin::Configured,
        admin_token.as_ref(),
    )?;
    let previous = config.previous_secret()?;
    Ok(CheckedSecrets {
        inbound,
        previous,
        admin_token,
    })
}

/// Each target's own secret, header values, signing secret and template
/// too: `serve` refuses to start without them.
fn check_targets(config: &Config) -> anyhow::Result<()> {
    for target in &config.targets {
        target.secret()?;
        leadflo_relay::outbound::Outbound::build(target)?;
    }
    Ok(())
}

/// The certificate files, checked as `serve` checks them; `None` for plain
/// HTTP.
fn check_certificate(config: &Config) -> anyhow::Result<Option<leadflo_relay::tls::Certificate>> {
    let certificate = match config
        .server
        .tls
        .as_ref()
        .and_then(leadflo_relay::tls::TlsFiles::from_config)
    {
        Some(files) => Some(leadflo_relay::tls::read(&files).context("server.tls")?),
        None => None,
    };
    Ok(certificate)
}

/// `[server.tls.acme]` checked as `serve` checks it (the CA file read;
/// nothing is ordered), and what its cache holds: the lines to print.
fn check_acme(config: &Config) -> anyhow::Result<Vec<String>> {
    use leadflo_relay::tls::{Acme, AcmeSettings};
    let Some(acme) = config.server.tls.as_ref().and_then(|t| t.acme.as_ref()) else {
        return Ok(Vec::new());
    };
    let settings = AcmeSettings::from_config(acme, &config.storage.data_dir);
    let client = Acme::new(
        settings.clone(),
        std::sync::Arc::new(leadflo_relay::metrics::Metrics::new()),
    )?;
    let cached = match settings.cached() {
        Ok(Some(certificate)) => format!("cached {}", certificate.summary()),
        Ok(None) => "no certificate cached yet: the first start orders one".to_owned(),
        Err(err) => format!(
            "WARNING: the cached certificate cannot be used ({err}); the next start orders a new one"
        ),
    };
    Ok(vec![
        client.summary(),
        format!("ACME cache {}: {cached}", settings.cache_dir.display()),
    ])
}

/// The header's first lines: where the configuration came from, and which
/// secrets are set (never their values).
fn print_secrets(args: &ConfigArgs, config: &Config, secrets: &CheckedSecrets) {
    let origin = match &args.config {
        Some(path) => format!("{} with flag overrides", path.display()),
        None => "built-in defaults with flag overrides".to_owned(),
    };
    println!("# effective configuration ({origin}); secrets are redacted");
    match secrets.inbound {
        Some(_) => println!("# inbound secret: set (from {})", config.secret_source()),
        None => println!("# inbound secret: NONE (unauthenticated mode)"),
    }
    if secrets.previous.is_some() {
        println!("# previous inbound secret: set (accepted during the rotation)");
    }
    if secrets.admin_token.is_some() {
        println!("# admin API token: set (from environment variable LEADFLO_RELAY_ADMIN_TOKEN)");
    }
}

/// The header's node id line: configured, kept in the data directory, or
/// still to be made by the first `serve`.
fn print_node_id(config: &Config) -> anyhow::Result<()> {
    match NodeId::peek(config.server.node_id, &config.storage.data_dir)? {
        (Some(node), NodeSource::Configured) => println!("# node id: {node} (server.node_id)"),
        (Some(node), NodeSource::DataDir(path)) => {
            println!("# node id: {node} (from {})", path.display())
        }
        _ => println!(
            "# node id: made at random by the first `serve` and kept in {}",
            config
                .storage
                .data_dir
                .join(leadflo_relay::node::NODE_ID_FILE)
                .display()
        ),
    }
    Ok(())
}

/// The header's certificate line, and a warning (on stdout and stderr) when
/// it has expired.
fn print_certificate(config: &Config, certificate: &leadflo_relay::tls::Certificate) {
    println!("# tls: {}", certificate.summary());
    if certificate.expired() {
        println!(
            "# tls: WARNING: the certificate EXPIRED on {}; clients refuse it until it is renewed",
            certificate.expiry()
        );
        eprintln!(
            "warning: the certificate in {} expired on {}",
            config
                .server
                .tls
                .as_ref()
                .and_then(|t| t.cert_file.as_ref())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            certificate.expiry()
        );
    }
}
