//! Whether commits reach the disk, for `/readyz` and the stuck-log watch.

use super::*;

/// Whether the last commit reached disk, and whether one is taking too long;
/// read by `/readyz` and by the relay's stuck-log watch.
#[derive(Debug)]
pub struct CommitHealth {
    pub(super) failing: AtomicBool,
    /// The last checkpoint failed: sled cannot make itself durable (the
    /// write-ahead log still holds everything, and grows).
    pub(super) checkpoint_failing: AtomicBool,
    /// When the commit in progress started, in ms after `epoch` plus one
    /// (0: no commit in progress).
    pub(super) busy_since: AtomicU64,
    /// The same for the apply thread's sled write or checkpoint.
    pub(super) applying_since: AtomicU64,
    pub(super) epoch: Instant,
}

impl Default for CommitHealth {
    fn default() -> Self {
        CommitHealth {
            failing: AtomicBool::new(false),
            checkpoint_failing: AtomicBool::new(false),
            busy_since: AtomicU64::new(0),
            applying_since: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// A commit running longer than this makes the log count as failing: the
/// sender's deadline is 5 s, so such a commit cannot answer anyone in time.
pub const COMMIT_STALL: Duration = Duration::from_secs(5);

impl CommitHealth {
    /// The last commit or checkpoint failed, or the commit in progress has
    /// run for longer than [`COMMIT_STALL`].
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
            || self.checkpoint_failing.load(Ordering::Relaxed)
            || self.busy_for() >= COMMIT_STALL
    }

    /// Whether ingest cannot get a commit to disk now: the last commit
    /// failed, or one has run past [`COMMIT_STALL`]. A failed checkpoint
    /// alone does not count: commits still reach the write-ahead log (and
    /// are acknowledged) until the relay restarts itself.
    pub fn commits_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed) || self.busy_for() >= COMMIT_STALL
    }

    /// How long the commit in progress has been running (zero when idle).
    /// A write that never returns (seen in sled after ENOSPC) shows here.
    pub fn busy_for(&self) -> Duration {
        let running = |since: &AtomicU64| match since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(since - 1)),
        };
        running(&self.busy_since).max(running(&self.applying_since))
    }

    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub(super) fn begin(&self) {
        self.busy_since.store(self.now(), Ordering::Relaxed);
    }

    pub(super) fn end(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    pub(super) fn begin_apply(&self) {
        self.applying_since.store(self.now(), Ordering::Relaxed);
    }

    pub(super) fn end_apply(&self) {
        self.applying_since.store(0, Ordering::Relaxed);
    }
}
