//! Retention: delivered events stay replayable for `storage.retention`,
//! then a background task deletes them, a small batch at a time with pauses
//! in between, so pruning never holds up ingest or delivery. Events that a
//! target still waits for, or holds as a dead letter, are never pruned.
//! sled reuses the space of deleted records as it rewrites its segments, so
//! the store shrinks (or stops growing) over time rather than at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// Events looked at per batch.
const BATCH: usize = 256;
/// Pause between two batches of one pass.
const PAUSE: Duration = Duration::from_millis(5);

/// Time between two pruning passes: a quarter of the retention, between
/// 100 ms and a minute.
pub fn pass_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Prunes every [`pass_interval`] until `shutdown`.
pub async fn run(
    store: Store,
    retention: Duration,
    targets: Vec<String>,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let interval = pass_interval(retention);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let cutoff_ms = crate::clock::now_ms().saturating_sub(retention.as_millis() as u64);
        match prune_pass(&store, cutoff_ms, &targets, &metrics, &shutdown).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "pruned delivered events past retention"),
            Err(err) => tracing::warn!(error = %err, "pruning failed; will try again"),
        }
    }
}

/// One pass over the events older than `cutoff_ms`; returns how many were
/// deleted.
pub async fn prune_pass(
    store: &Store,
    cutoff_ms: u64,
    configured: &[String],
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<usize> {
    // Targets no longer configured may still hold deliveries or dead letters.
    let mut targets: Vec<String> = store.targets_in_log()?.into_iter().collect();
    for name in configured {
        if !targets.contains(name) {
            targets.push(name.clone());
        }
    }
    let mut after = None;
    let mut deleted = 0;
    loop {
        let (store, targets_now) = (store.clone(), targets.clone());
        let step = tokio::task::spawn_blocking(move || {
            store.prune_before(cutoff_ms, after, BATCH, &targets_now)
        })
        .await??;
        deleted += step.deleted;
        metrics.pruned_events.inc_by(step.deleted as u64);
        if step.deleted > 0 {
            crate::crashpoint::reached(crate::crashpoint::PRUNE_BATCH);
        }
        if step.examined < BATCH || shutdown.is_cancelled() {
            return Ok(deleted);
        }
        after = step.last;
        tokio::time::sleep(PAUSE).await;
    }
}
