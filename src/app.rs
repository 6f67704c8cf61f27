//! Startup and shutdown: builds every part from the configuration, binds the
//! listeners (port 0 allowed), and runs until the shutdown token fires.
//!
//! Nothing here reads flags or the environment: `main.rs` resolves those and
//! passes a [`Config`] and the secret in, so tests build a relay the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::alerts::{AlertTask, Alerter};
use crate::config::{Config, Secret, TargetConfig};
use crate::disk::DiskGuard;
use crate::dispatch::Target;
use crate::http::{self, ConnectionLimits};
use crate::ingest::{Ingest, IngestSettings, SecretCheck};
use crate::metrics::{IngestResult, Metrics};
use crate::node::NodeId;
use crate::reload::{AdminTargets, ConfigSource, Reloadable, Reloader, Swap, Targets};
use crate::store::{Committer, CommitterHandle, Store, StoreOptions, Subscription};
use crate::systemd::PassedListeners;
use crate::tls::{Certificates, TlsFiles};

/// The secrets a relay runs with, resolved by the caller (never from flags).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The secret LeadFloAgent sends; `None` only in unauthenticated mode.
    pub inbound: Option<Secret>,
    /// The previous secret, still accepted while a rotation is under way.
    pub previous_inbound: Option<Secret>,
    /// The admin API's bearer token; required when the admin listener
    /// (bound to `admin_listen`, or passed by systemd) is not on a loopback
    /// address.
    pub admin_token: Option<Secret>,
}

/// A relay whose listeners are bound and whose log is open.
pub struct Relay {
    config: Config,
    secret: Option<Secret>,
    previous_secret: Option<Secret>,
    admin_token: Option<Secret>,
    ingest_listener: TcpListener,
    admin_listener: TcpListener,
    store: Store,
    committer: Committer,
    committer_handle: CommitterHandle,
    targets: Vec<(TargetConfig, Target)>,
    /// Where `reload` reads the configuration again (`serve`'s file and
    /// flags); `None`: a relay built from a [`Config`] cannot reload.
    source: Option<ConfigSource>,
    /// Notified to reload (SIGHUP).
    reload_requests: Arc<tokio::sync::Notify>,
    /// Targets the log holds deliveries or dead letters for that the
    /// configuration no longer lists (found at start).
    removed_targets: Vec<String>,
    disk: Arc<DiskGuard>,
    metrics: Arc<Metrics>,
    node: NodeId,
    draining: Draining,
    /// Where dead letters, circuit changes and disk space are told.
    alerts: Alerter,
    /// Posts them; spawned when the relay runs.
    alert_task: Option<AlertTask>,
    /// The certificate the ingest listener serves, when `[server.tls]` is
    /// set.
    tls: Option<Arc<Certificates>>,
}

/// Set once a stop has begun: `/readyz` answers 503 while leads are still
/// taken, for `server.drain_delay`.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<std::sync::atomic::AtomicBool>);

impl Draining {
    pub fn start(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A passed socket as it is, or a new one bound to `addr`.
async fn listen(
    passed: Option<std::net::TcpListener>,
    addr: SocketAddr,
    key: &str,
) -> anyhow::Result<TcpListener> {
    match passed {
        Some(listener) => TcpListener::from_std(listener)
            .with_context(|| format!("cannot listen on the socket passed for {key}")),
        None => TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({key})")),
    }
}

/// Where a listener's socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketOrigin {
    /// Bound by the relay to the configured address.
    Configured,
    /// Passed in by systemd (socket activation): the configured address is
    /// ignored, and the socket's own address counts.
    Passed,
}

/// The admin API may go without a token only when `addr`, where its
/// listener really listens, is a loopback address.
pub fn require_admin_token(
    addr: SocketAddr,
    origin: SocketOrigin,
    token: Option<&Secret>,
) -> anyhow::Result<()> {
    if token.is_some() || addr.ip().is_loopback() {
        return Ok(());
    }
    let (what, instead) = match origin {
        SocketOrigin::Configured => (
            format!("server.admin_listen = {addr}"),
            "listen on 127.0.0.1",
        ),
        SocketOrigin::Passed => (
            format!(
                "the admin socket passed by systemd (socket activation; server.admin_listen \
                 is ignored for it) listens on {addr}, which"
            ),
            "make the admin socket listen on 127.0.0.1 (ListenStream= in its .socket unit)",
        ),
    };
    anyhow::bail!(
        "{what} is not a loopback address, so the admin API needs a token: set {} \
         (clients send it as Authorization: Bearer <token>), or {instead}",
        crate::admin::ADMIN_TOKEN_ENV
    )
}

/// Refuses to start without an inbound secret unless unauthenticated mode
/// was asked for, or with an admin API off loopback and without a token.
fn check_credentials(
    config: &Config,
    credentials: &Credentials,
    passed: &PassedListeners,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        credentials.inbound.is_some() || config.auth.allow_unauthenticated,
        "no inbound secret configured and unauthenticated mode was not asked for"
    );
    // Whether the admin API may go without a token depends on the address
    // it really listens on, which for a socket passed by systemd is not
    // `server.admin_listen`.
    let (admin_addr, admin_origin) = match &passed.admin {
        Some(socket) => (socket.local_addr()?, SocketOrigin::Passed),
        None => (config.server.admin_listen, SocketOrigin::Configured),
    };
    require_admin_token(admin_addr, admin_origin, credentials.admin_token.as_ref())
}

/// The open log, and the configured targets it was opened for.
struct OpenedStore {
    store: Store,
    options: StoreOptions,
    targets: Vec<(TargetConfig, Target)>,
    subscriptions: Vec<Subscription>,
}

/// Opens the log in the data directory (creating both, and the node
/// identity, on the first start) and has it adopt the configured targets.
fn open_store(config: &Config) -> anyhow::Result<OpenedStore> {
    let data_dir = &config.storage.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let node = NodeId::load_or_create(config.server.node_id, data_dir)?;
    let options = store_options(config, node);
    let targets = build_targets(config)?;
    let subscriptions = subscriptions(&targets);
    let store = Store::open(&options)?;
    store.adopt_targets(&subscriptions)?;
    Ok(OpenedStore {
        store,
        options,
        targets,
        subscriptions,
    })
}

/// Counts the backlog of every target the log holds deliveries for, and
/// returns those no longer configured.
fn count_backlogs(
    store: &Store,
    targets: &[(TargetConfig, Target)],
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = targets.iter().map(|(c, _)| c.name.clone()).collect();
    // A target removed from the configuration keeps what waited for it
    // (and so its events) until it is configured again or forgotten:
    // counted too, for `stats`, and said once at each start.
    let removed: Vec<String> = store
        .targets_in_log()?
        .into_iter()
        .filter(|name| !names.contains(name))
        .collect();
    store.count_backlogs(&[names.as_slice(), removed.as_slice()].concat())?;
    for name in &removed {
        let stats = store.target_stats(name)?;
        tracing::warn!(
            target = %name,
            waiting = stats.queued,
            dead_letters = stats.dead,
            "a target no longer configured still holds deliveries, and their events are not \
             pruned: configure it again to deliver them, or drop them with \
             `leadflo-relay forget-target <name>`"
        );
    }
    Ok(removed)
}

/// The disk space guard of the data directory, with a first sample taken
/// so that a full disk refuses ingest (and is alerted) from the start.
fn disk_guard(
    config: &Config,
    options: &StoreOptions,
    store: &Store,
    metrics: &Metrics,
    alerts: &Alerter,
) -> anyhow::Result<Arc<DiskGuard>> {
    let disk = Arc::new(
        DiskGuard::new(
            options.data_dir.clone(),
            config.storage.min_free_bytes,
            config.storage.max_bytes,
        )
        .with_reusable({
            let store = store.clone();
            Box::new(move || store.reusable_bytes())
        })
        .with_alerts(alerts.clone()),
    );
    disk.sample(metrics).with_context(|| {
        format!(
            "cannot read the disk space of {}",
            options.data_dir.display()
        )
    })?;
    Ok(disk)
}

/// The certificate `[server.tls]` names, read and checked; `None` for plain
/// HTTP. An expired one is served, with a warning.
fn load_certificates(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<Certificates>>> {
    let Some(files) = config.server.tls.as_ref().and_then(TlsFiles::from_config) else {
        return Ok(None);
    };
    let (certificates, certificate) =
        Certificates::load(files, metrics.clone()).context("server.tls")?;
    tracing::info!("ingest serves HTTPS with the {}", certificate.summary());
    crate::tls::warn_if_expired(&certificate);
    Ok(Some(certificates))
}

/// The ingest and the admin listener, in that order.
async fn bind_listeners(
    passed: PassedListeners,
    config: &Config,
) -> anyhow::Result<(TcpListener, TcpListener)> {
    let ingest = listen(passed.ingest, config.server.listen, "server.listen").await?;
    let admin = listen(
        passed.admin,
        config.server.admin_listen,
        "server.admin_listen",
    )
    .await?;
    Ok((ingest, admin))
}

impl Relay {
    /// Opens the log and binds both listeners. `secret` is `None` only when
    /// `auth.allow_unauthenticated` is set.
    pub async fn build(config: Config, secret: Option<Secret>) -> anyhow::Result<Relay> {
        let credentials = Credentials {
            inbound: secret,
            ..Credentials::default()
        };
        Relay::build_with(config, credentials).await
    }

    /// Like [`Relay::build`], with every credential.
    pub async fn build_with(config: Config, credentials: Credentials) -> anyhow::Result<Relay> {
        Relay::build_from(config, credentials, PassedListeners::default()).await
    }

    /// Like [`Relay::build_with`], listening on the sockets `passed` holds
    /// (socket activation) instead of binding them.
    pub async fn build_from(
        config: Config,
        credentials: Credentials,
        passed: PassedListeners,
    ) -> anyhow::Result<Relay> {
        check_credentials(&config, &credentials, &passed)?;
        let Credentials {
            inbound: secret,
            previous_inbound,
            admin_token,
        } = credentials;
        let metrics = Arc::new(Metrics::new());
        let tls = load_certificates(&config, &metrics)?;
        let (alerts, alert_task) = crate::alerts::start(&config.alerts, metrics.clone())?;
        let OpenedStore {
            store,
            options,
            targets,
            subscriptions,
        } = open_store(&config)?;
        let removed = count_backlogs(&store, &targets)?;
        let disk = disk_guard(&config, &options, &store, &metrics, &alerts)?;
        let (committer, committer_handle) =
            store.start_committer(&options, subscriptions, metrics.clone())?;
        let (ingest_listener, admin_listener) = bind_listeners(passed, &config).await?;
        Ok(Relay {
            config,
            secret,
            previous_secret: previous_inbound,
            admin_token,
            ingest_listener,
            admin_listener,
            store,
            committer,
            committer_handle,
            targets,
            removed_targets: removed,
            disk,
            metrics,
            node: options.node,
            draining: Draining::default(),
            source: None,
            reload_requests: Arc::default(),
            alerts,
            alert_task: Some(alert_task),
            tls,
        })
    }

    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The open log, for inspection (tests, and the CLI in-process).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Lets `reload` (SIGHUP, `leadflo-relay reload`) read the
    /// configuration again from `source`.
    pub fn reload_from(mut self, source: ConfigSource) -> Relay {
        self.source = Some(source);
        self
    }

    /// Notify it to reload, as SIGHUP does; the outcome is logged and
    /// counted in `leadflo_relay_config_reloads_total`.
    pub fn reload_requests(&self) -> Arc<tokio::sync::Notify> {
        self.reload_requests.clone()
    }

    /// The switch that starts a drain (see [`Relay::stop`]).
    pub fn draining(&self) -> Draining {
        self.draining.clone()
    }

    /// Stops a relay the way SIGTERM does: `/readyz` answers 503 for
    /// `drain_delay` while leads are still taken (or until `cut_short`
    /// completes: a second signal), then `shutdown` is cancelled.
    pub async fn stop(
        draining: Draining,
        drain_delay: Duration,
        shutdown: CancellationToken,
        cut_short: impl std::future::Future<Output = ()>,
    ) {
        draining.start();
        crate::systemd::notify_stopping();
        if !drain_delay.is_zero() {
            tracing::info!(
                drain_delay = ?drain_delay,
                "draining: /readyz answers 503, leads are still taken until the delay is up"
            );
            tokio::select! {
                _ = tokio::time::sleep(drain_delay) => {}
                _ = cut_short => tracing::info!("asked again: stopping without the rest of the drain delay"),
            }
        }
        shutdown.cancel();
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, lets open
    /// requests finish, makes the log durable one last time, and returns.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let services = self.start_services(&shutdown)?;
        self.announce()?;
        let running = self.spawn_tasks(services, &shutdown);
        crate::systemd::notify_ready();
        shutdown.cancelled().await;
        tracing::info!("shutting down: no new connections; finishing open requests and attempts");
        running.stop().await
    }

    /// Builds what the listeners and tasks serve with, and starts a
    /// dispatcher per configured target.
    fn start_services(&mut self, shutdown: &CancellationToken) -> anyhow::Result<Services> {
        let secret =
            Arc::new(Swap::new(self.secret.as_ref().map(|s| {
                SecretCheck::new(s).with_previous(self.previous_secret.as_ref())
            })));
        let ingest = Arc::new(Ingest::new(
            ingest_settings(&self.config, secret.clone()),
            self.committer.clone(),
            self.disk.clone(),
            self.metrics.clone(),
        ));
        // Delivery runs on a worker pool of its own, at a lower CPU
        // priority, so that the operating system, not the order of tasks in
        // one queue, shares the cores between a flood of ingest requests
        // and the dispatchers, and gives ingest the larger share.
        let delivery = DeliveryRuntime::start()?;
        let pruned_for: Vec<String> = self.targets.iter().map(|(c, _)| c.name.clone()).collect();
        let targets = start_dispatchers(
            Targets::new(
                self.store.clone(),
                self.metrics.clone(),
                shutdown.clone(),
                delivery.handle(),
                dispatcher_grace(&self.config),
            )
            .with_alerts(self.alerts.clone()),
            std::mem::take(&mut self.targets),
        );
        let admin_targets = Arc::new(Swap::new(
            targets.admin_view(self.removed_targets.iter().cloned().collect()),
        ));
        let reloader = Arc::new(Reloader::new(
            self.source.take(),
            Reloadable {
                config: self.config.clone(),
                targets,
                secret,
                admin: admin_targets.clone(),
                committer: self.committer.clone(),
                alerts: self.alerts.clone(),
                tls: self.tls.clone(),
            },
            self.metrics.clone(),
        ));
        let admin = Arc::new(self.admin(reloader.clone(), admin_targets.clone()));
        Ok(Services {
            ingest,
            admin,
            reloader,
            admin_targets,
            delivery,
            pruned_for,
        })
    }

    fn admin(&self, reloader: Arc<Reloader>, targets: Arc<Swap<AdminTargets>>) -> Admin {
        Admin {
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            disk: self.disk.clone(),
            targets,
            reloader,
            token: self.admin_token.as_ref().map(SecretCheck::new),
            node: self.node,
            draining: self.draining.clone(),
        }
    }

    /// Logs where the relay listens, and loudly when it takes unsigned
    /// requests.
    fn announce(&self) -> anyhow::Result<()> {
        if self.secret.is_none() {
            tracing::warn!(
                "UNAUTHENTICATED MODE: every request to {} is accepted without checking \
                 x-webhook-secret; anyone who can reach this port can inject events",
                self.config.server.path
            );
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(addr = %self.ingest_listener.local_addr()?, path = %self.config.server.path, scheme, "ingest listening");
        tracing::info!(addr = %self.admin_listener.local_addr()?, "admin listening");
        Ok(())
    }

    /// Starts serving on both listeners and every background task.
    fn spawn_tasks(mut self, services: Services, shutdown: &CancellationToken) -> Running {
        let limits = connection_limits(&self.config);
        let tasks = Tasks {
            alerts: AlertsRunning::spawn(self.alert_task.take()),
            ingest: tokio::spawn(http::serve_counting(
                self.ingest_listener,
                limits,
                move |request| services.ingest.clone().handle(request),
                connection_events(&self.metrics),
                self.tls.as_ref().map(|tls| tls.acceptor()),
                shutdown.clone(),
            )),
            admin: tokio::spawn(http::serve(
                self.admin_listener,
                ConnectionLimits {
                    max_connections: 64,
                    ..limits
                },
                move |request| services.admin.clone().handle(request),
                shutdown.clone(),
            )),
            reloads: tokio::spawn(reload_on_request(
                services.reloader.clone(),
                self.reload_requests.clone(),
                shutdown.clone(),
            )),
            disk_watch: tokio::spawn(
                self.disk
                    .clone()
                    .run(self.metrics.clone(), shutdown.clone()),
            ),
            pruner: tokio::spawn(crate::retention::run(
                self.store.clone(),
                self.config.storage.retention.get(),
                services.pruned_for,
                self.metrics.clone(),
                shutdown.clone(),
            )),
            tls_watch: self.tls.clone().map(|tls| {
                let interval = self
                    .config
                    .server
                    .tls
                    .as_ref()
                    .map_or(Duration::from_secs(5), |t| t.watch_interval.get());
                tokio::spawn(tls.watch(interval, shutdown.clone()))
            }),
        };
        let stuck_watch = tokio::spawn(watch_for_a_stuck_log(
            self.store.health(),
            self.disk.clone(),
            self.metrics.clone(),
            shutdown.clone(),
        ));
        Running {
            tasks,
            stuck_watch,
            reloader: services.reloader,
            admin_targets: services.admin_targets,
            committer: self.committer_handle,
            store: self.store,
            delivery: services.delivery,
        }
    }
}

/// What a running relay's tasks serve with.
struct Services {
    ingest: Arc<Ingest>,
    admin: Arc<Admin>,
    reloader: Arc<Reloader>,
    /// The configured targets and their wakes, as the last reload left them.
    admin_targets: Arc<Swap<AdminTargets>>,
    /// Runs the dispatchers; kept until they have finished.
    delivery: DeliveryRuntime,
    /// The targets the retention task prunes for.
    pruned_for: Vec<String>,
}

/// A relay serving: its tasks, and what its shutdown finishes.
struct Running {
    tasks: Tasks,
    /// Returns `true` when it stopped the relay because the log is stuck.
    stuck_watch: tokio::task::JoinHandle<bool>,
    reloader: Arc<Reloader>,
    admin_targets: Arc<Swap<AdminTargets>>,
    committer: CommitterHandle,
    store: Store,
    delivery: DeliveryRuntime,
}

impl Running {
    /// After shutdown: drains the tasks and closes the log, or, when the
    /// log is stuck, gives up after [`STUCK_LOG_GRACE`] and fails so that
    /// a supervisor restarts the relay.
    async fn stop(self) -> anyhow::Result<()> {
        // The watch returns as soon as shutdown is cancelled.
        let stuck = self.stuck_watch.await.context("log watch task")?;
        let drain = self.tasks.finish(
            self.reloader,
            self.admin_targets,
            self.committer,
            &self.store,
        );
        if stuck {
            return give_up_on_a_stuck_log(drain).await;
        }
        drain.await?;
        tracing::info!("stopped; the log is flushed");
        // The dispatchers have finished: their worker pool can go.
        drop(self.delivery);
        Ok(())
    }
}

/// A log that hangs may hang the drain too (a commit that never returns, a
/// delivery stuck on the same lock): it is bounded, and then the process
/// exits anyway, which ends the stuck thread.
async fn give_up_on_a_stuck_log(
    drain: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    if tokio::time::timeout(STUCK_LOG_GRACE, drain).await.is_err() {
        tracing::error!("shutdown could not finish: the log's writer is hung");
    }
    anyhow::bail!(
        "the log kept failing to write although the disk has room again (sled cannot \
         recover from a write error in place, e.g. after the disk filled up); exiting so \
         that a supervisor restarts the relay. Events acknowledged before are on disk."
    )
}

/// The relay's long-running tasks besides the dispatchers.
struct Tasks {
    ingest: tokio::task::JoinHandle<()>,
    admin: tokio::task::JoinHandle<()>,
    reloads: tokio::task::JoinHandle<()>,
    disk_watch: tokio::task::JoinHandle<()>,
    pruner: tokio::task::JoinHandle<()>,
    /// Reads the certificate again when its files change.
    tls_watch: Option<tokio::task::JoinHandle<()>>,
    alerts: AlertsRunning,
}

/// The alert task, stopped after everything that tells it (the
/// dispatchers, the disk guard), so that their last alerts are posted.
struct AlertsRunning {
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl AlertsRunning {
    fn spawn(task: Option<AlertTask>) -> AlertsRunning {
        let stop = CancellationToken::new();
        AlertsRunning {
            task: task.map(|task| tokio::spawn(task.run(stop.clone()))),
            stop,
        }
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(task) = self.task {
            task.await.context("alert task")?;
        }
        Ok(())
    }
}

impl Tasks {
    /// After shutdown: waits for open requests, the dispatchers' attempts
    /// and every task, closes the committer (the log's last commit), and
    /// saves the backlog counts for the next start.
    async fn finish(
        self,
        reloader: Arc<Reloader>,
        admin_targets: Arc<Swap<AdminTargets>>,
        committer: CommitterHandle,
        store: &Store,
    ) -> anyhow::Result<()> {
        self.ingest.await.context("ingest listener task")?;
        self.reloads.await.context("reload task")?;
        let target_names = reloader.join_targets().await?;
        self.admin.await.context("admin listener task")?;
        self.disk_watch.await.context("disk watch task")?;
        self.pruner.await.context("retention task")?;
        if let Some(watch) = self.tls_watch {
            watch.await.context("certificate watch task")?;
        }
        self.alerts.finish().await?;
        committer.close().await;
        // Nothing writes to the log any more: the next start can take the
        // backlog counts as they are instead of scanning the queue. Removed
        // targets too: the next start counts them as well.
        let removed = admin_targets.load().view.removed.clone();
        let counted: Vec<String> = target_names.into_iter().chain(removed).collect();
        if let Err(err) = store.save_backlog_counts(&counted) {
            tracing::warn!(error = %err, "could not save the backlog counts; the next start counts them");
        }
        Ok(())
    }
}

/// Starts a dispatcher for each of `configured` on `targets`.
fn start_dispatchers(mut targets: Targets, configured: Vec<(TargetConfig, Target)>) -> Targets {
    for (config, target) in configured {
        targets.start(config, target, std::time::Instant::now());
    }
    targets
}

/// The ingest endpoint's settings, checking secrets through `secret`.
fn ingest_settings(config: &Config, secret: Arc<Swap<Option<SecretCheck>>>) -> IngestSettings {
    IngestSettings {
        path: config.server.path.clone(),
        secret,
        max_body_bytes: config.server.max_body_bytes,
        request_timeout: config.server.request_timeout.get(),
        commit_timeout: config.storage.commit_timeout.get(),
    }
}

fn connection_limits(config: &Config) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: config.server.max_connections,
        header_read_timeout: config.server.header_read_timeout.get(),
        shutdown_grace: config.server.shutdown_grace.get(),
    }
}

/// What the ingest listener counts besides requests.
fn connection_events(metrics: &Arc<Metrics>) -> http::ConnectionEvents {
    let evicted = metrics.connections_evicted.clone();
    let handshakes = metrics.clone();
    let metrics = metrics.clone();
    // Handshake failures are counted, never logged: a flood of them (a
    // scanner, plain HTTP probes) would flood the log, and a line per
    // failure could only carry what a stranger sent.
    http::ConnectionEvents {
        evicted: Arc::new(move || evicted.inc()),
        malformed: Arc::new(move || metrics.count_request(IngestResult::BadRequest)),
        handshake_failed: Arc::new(move |failure: crate::tls::HandshakeFailure| {
            handshakes.count_handshake_failure(failure)
        }),
    }
}

/// The name of every thread of the delivery worker pool.
pub const DELIVERY_THREAD_NAME: &str = "leadflo-deliver";

/// How far below the rest of the relay the delivery threads' CPU priority
/// is set, as a nice increment: under CPU contention Linux gives a thread
/// at +5 about a third of the time of one at +0 (weights 335 and 1024).
/// The sender never retries and delivery can always catch up from the log,
/// so when the cores are short, acks come first; an idle core still goes
/// to delivery at once.
pub const DELIVERY_NICE_INCREMENT: i32 = 5;

/// The nice value of the calling thread (the relay's own, when called from
/// a thread that did not change it), or `None` where there is none.
fn own_nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Sets the calling thread's nice value to `base` +
/// [`DELIVERY_NICE_INCREMENT`] (Linux keeps one per thread). Absolute, not
/// relative: a thread started from a delivery thread (tokio's blocking
/// pool, for reqwest's name lookups) inherits the lowered value, and a
/// relative step would lower it twice. Lowering needs no privilege; a
/// failure is logged once and delivery runs at the usual priority.
fn yield_cpu_to_ingest(base: i32) {
    #[cfg(target_os = "linux")]
    {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let lowered = rustix::process::setpriority_process(
            Some(rustix::thread::gettid()),
            base.saturating_add(DELIVERY_NICE_INCREMENT).min(19),
        );
        if let Err(err) = lowered {
            WARNED.call_once(|| {
                tracing::warn!(error = %err, "cannot lower the delivery threads' CPU priority; delivery competes with ingest for the cores");
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = base;
}

/// The delivery worker pool. Shut down without waiting when dropped (a
/// runtime may not block inside another), after its dispatchers have
/// finished.
struct DeliveryRuntime(Option<tokio::runtime::Runtime>);

impl DeliveryRuntime {
    fn start() -> anyhow::Result<DeliveryRuntime> {
        // Read here, on a thread at the relay's own priority.
        let base = own_nice();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(DELIVERY_THREAD_NAME)
            .on_thread_start(move || {
                if let Some(base) = base {
                    yield_cpu_to_ingest(base);
                }
            })
            .enable_all()
            .build()
            .context("cannot start the delivery worker pool")?;
        Ok(DeliveryRuntime(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("running").handle().clone()
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// How long commits may keep failing while the disk has room again before
/// the relay stops itself for a restart.
pub const STUCK_LOG_GRACE: Duration = Duration::from_secs(10);

/// sled stays failed after a write error (measured: after ENOSPC, every
/// later flush fails even once space is back, or the next write never
/// returns), and only reopening the database heals it. So when commits keep
/// failing, or one hangs, for [`STUCK_LOG_GRACE`] while the disk has room,
/// this cancels `shutdown` and returns `true`: the relay exits non-zero and
/// its supervisor starts it again, which recovers.
async fn watch_for_a_stuck_log(
    health: Arc<crate::store::CommitHealth>,
    disk: Arc<DiskGuard>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> bool {
    let mut since: Option<(tokio::time::Instant, u64)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let failures = metrics.commit_failures.get();
        if !health.is_failing() || disk.refusal().is_some() {
            since = None;
            continue;
        }
        match since {
            None => since = Some((tokio::time::Instant::now(), failures)),
            Some((start, before))
                if start.elapsed() >= STUCK_LOG_GRACE
                    && (failures > before || health.busy_for() >= STUCK_LOG_GRACE) =>
            {
                tracing::error!(
                    "the log keeps failing to write although the disk has room; stopping so the \
                     relay can be restarted"
                );
                shutdown.cancel();
                return true;
            }
            Some(_) => {}
        }
    }
}

/// A dispatcher's settings per configured target.
fn build_targets(config: &Config) -> anyhow::Result<Vec<(TargetConfig, Target)>> {
    config
        .targets
        .iter()
        .map(|target| {
            let wake = Arc::new(tokio::sync::Notify::new());
            let built = crate::reload::build_target(target, wake, dispatcher_grace(config))?;
            Ok((target.clone(), built))
        })
        .collect()
}

/// What the committer needs of each target.
fn subscriptions(targets: &[(TargetConfig, Target)]) -> Vec<Subscription> {
    targets
        .iter()
        .map(|(config, target)| Subscription {
            target: config.name.clone(),
            events: config.events.clone(),
            wake: target.wake.clone(),
        })
        .collect()
}

/// Time a dispatcher's attempts in flight get when it stops.
fn dispatcher_grace(config: &Config) -> Duration {
    config
        .server
        .shutdown_grace
        .get()
        .min(Duration::from_secs(5))
}

/// Reloads each time `requests` is notified (SIGHUP), until `shutdown`.
/// The reloader logs and counts each outcome.
async fn reload_on_request(
    reloader: Arc<Reloader>,
    requests: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = requests.notified() => {
                let _ = reloader.reload().await;
            }
        }
    }
}

pub fn store_options(config: &Config, node: NodeId) -> StoreOptions {
    StoreOptions {
        node,
        data_dir: config.storage.data_dir.clone(),
        checkpoint_interval: config.storage.checkpoint_interval.get(),
        cache_capacity_bytes: config.storage.cache_capacity_bytes,
        quarantine_max_events: config.storage.quarantine_max_events,
        quarantine_max_bytes: config.storage.quarantine_max_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_api_needs_a_token_off_loopback_wherever_its_socket_came_from() {
        let token = Secret::new("admin-token");
        let loopback: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        for origin in [SocketOrigin::Configured, SocketOrigin::Passed] {
            assert!(require_admin_token(loopback, origin, None).is_ok());
            assert!(require_admin_token(public, origin, Some(&token)).is_ok());
            let err = require_admin_token(public, origin, None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("0.0.0.0:9090") && err.contains(crate::admin::ADMIN_TOKEN_ENV),
                "{origin:?}: {err}"
            );
        }
        let passed = require_admin_token(public, SocketOrigin::Passed, None)
            .unwrap_err()
            .to_string();
        assert!(passed.contains("passed by systemd"), "{passed}");
        let configured = require_admin_token(public, SocketOrigin::Configured, None)
            .unwrap_err()
            .to_string();
        assert!(
            configured.contains("server.admin_listen = 0.0.0.0:9090"),
            "{configured}"
        );
    }
}
