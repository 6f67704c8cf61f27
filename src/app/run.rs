//! Running a built relay: the services (ingest, dispatchers, reloader,
//! admin) built, and every task spawned, each on the shutdown token.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Relay;
use super::delivery::DeliveryRuntime;
use super::settings::{connection_events, connection_limits, dispatcher_grace, ingest_settings};
use super::stop::{AlertsRunning, Running, Tasks};
use super::stuck_log::watch_for_a_stuck_log;
use crate::admin::Admin;
use crate::config::TargetConfig;
use crate::dispatch::Target;
use crate::http::{self, ConnectionLimits};
use crate::ingest::{Ingest, SecretCheck};
use crate::reload::{AdminTargets, Reloadable, Reloader, Swap, Targets};
use crate::tls::Https;

impl Relay {
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
                tls: self.tls.as_ref().and_then(Https::files),
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
            certificate: self.tls.as_ref().and_then(Https::readiness),
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
            tls_watch: self.tls.as_ref().map(|tls| {
                let interval = self
                    .config
                    .server
                    .tls
                    .as_ref()
                    .map_or(Duration::from_secs(5), |t| t.watch_interval.get());
                tls.spawn(interval, shutdown.clone())
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

/// Starts a dispatcher for each of `configured` on `targets`.
fn start_dispatchers(mut targets: Targets, configured: Vec<(TargetConfig, Target)>) -> Targets {
    for (config, target) in configured {
        targets.start(config, target, std::time::Instant::now());
    }
    targets
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
