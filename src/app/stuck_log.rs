//! A log stuck after a write error: noticed while the relay runs, and the
//! bounded shutdown that follows, so that a supervisor restarts the relay.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::disk::DiskGuard;
use crate::metrics::Metrics;

/// How long commits may keep failing while the disk has room again before
/// the relay stops itself for a restart.
pub const STUCK_LOG_GRACE: Duration = Duration::from_secs(10);

/// sled stays failed after a write error (measured: after ENOSPC, every
/// later flush fails even once space is back, or the next write never
/// returns), and only reopening the database heals it. So when commits keep
/// failing, or one hangs, for [`STUCK_LOG_GRACE`] while the disk has room,
/// this cancels `shutdown` and returns `true`: the relay exits non-zero and
/// its supervisor starts it again, which recovers.
pub(super) async fn watch_for_a_stuck_log(
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

/// A log that hangs may hang the drain too (a commit that never returns, a
/// delivery stuck on the same lock): it is bounded, and then the process
/// exits anyway, which ends the stuck thread.
pub(super) async fn give_up_on_a_stuck_log(
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
