//! Stopping a relay: the drain (`/readyz` answering 503 before the
//! shutdown token fires), then, after it fires, every task awaited in
//! order and the log's last commit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::Relay;
use super::delivery::DeliveryRuntime;
use super::stuck_log::give_up_on_a_stuck_log;
use crate::alerts::AlertTask;
use crate::reload::{AdminTargets, Reloader, Swap};
use crate::store::{CommitterHandle, Store};

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

impl Relay {
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
}

/// A relay serving: its tasks, and what its shutdown finishes.
pub(super) struct Running {
    pub(super) tasks: Tasks,
    /// Returns `true` when it stopped the relay because the log is stuck.
    pub(super) stuck_watch: tokio::task::JoinHandle<bool>,
    pub(super) reloader: Arc<Reloader>,
    pub(super) admin_targets: Arc<Swap<AdminTargets>>,
    pub(super) committer: CommitterHandle,
    pub(super) store: Store,
    pub(super) delivery: DeliveryRuntime,
}

impl Running {
    /// After shutdown: drains the tasks and closes the log, or, when the
    /// log is stuck, gives up after
    /// [`STUCK_LOG_GRACE`](super::STUCK_LOG_GRACE) and fails so that a
    /// supervisor restarts the relay.
    pub(super) async fn stop(self) -> anyhow::Result<()> {
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

/// The relay's long-running tasks besides the dispatchers.
pub(super) struct Tasks {
    pub(super) ingest: tokio::task::JoinHandle<()>,
    pub(super) admin: tokio::task::JoinHandle<()>,
    pub(super) reloads: tokio::task::JoinHandle<()>,
    pub(super) disk_watch: tokio::task::JoinHandle<()>,
    pub(super) pruner: tokio::task::JoinHandle<()>,
    /// Reads the certificate again when its files change, or orders and
    /// renews it (ACME).
    pub(super) tls_watch: Option<tokio::task::JoinHandle<()>>,
    pub(super) alerts: AlertsRunning,
}

/// The alert task, stopped after everything that tells it (the
/// dispatchers, the disk guard), so that their last alerts are posted.
pub(super) struct AlertsRunning {
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl AlertsRunning {
    pub(super) fn spawn(task: Option<AlertTask>) -> AlertsRunning {
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
            watch.await.context("certificate task")?;
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
