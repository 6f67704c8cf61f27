//! The durable event log: the only module that touches sled.
//!
//! How it works (keys, the two parts of a target's queue, group commit,
//! checkpoints, recovery) is in `docs/design/storage.md`. One file per
//! concern:
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the public types, the [`Store`] handle and opening it |
//! | [`keys`] | every key's prefix and layout, builders and parsers |
//! | [`record`] | the encoding of each stored value |
//! | [`wal`] | the write-ahead log's files |
//! | [`commit`] | the committer thread: ids, group commit, fsync, answers |
//! | [`apply`] | the apply thread: commits into sled, checkpoints |
//! | [`recover`] | opening after a crash: the write-ahead log replayed |
//! | [`watermark`], [`implicit`] | each target's implicit queue front above its watermark |
//! | [`retire`] | a reload's change of targets at the committer's cut |
//! | [`queue`] | reading a target's due deliveries |
//! | [`outcome`] | what an attempt's outcome writes |
//! | [`backlog`] | per-target tallies and the oldest waiting delivery |
//! | [`events`] | reading stored events |
//! | [`maintenance`] | dead letters, replay, forget, pruning |
//! | [`health`] | whether commits reach the disk |
//!
//! This module must never log or expose a body's content.

use crate::crashpoint;
use bytes::Bytes;
use std::collections::VecDeque;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use wal::{Frame, Wal};
mod implicit;
/// Most implicit deliveries a target has taken and not settled (see [`implicit`]).
pub use implicit::WINDOW as IMPLICIT_WINDOW;
pub mod wal;
use crate::metrics::Metrics;
use implicit::ImplicitQueue;

mod apply;
mod backlog;
mod commit;
mod events;
mod health;
mod keys;
mod maintenance;
mod outcome;
mod queue;
mod recover;
mod retire;
mod watermark;

pub mod record;

use apply::*;
use backlog::*;
pub use commit::*;
pub use health::*;
use keys::*;
pub use queue::Due;
use record::WatermarkRecord;
use retire::Retired;
pub use retire::TargetChange;
use watermark::needs_queue_entry;

/// How far ids may run ahead of the receive clock (bursts above 32 events
/// per millisecond); time-range scans over ids widen by this much.
const ID_CLOCK_MARGIN_MS: u64 = 60_000;

/// Most `a` entries without a `p` entry (see the module docs) one
/// [`Store::target_stats`] skips before it gives up on them.
const AGE_SKIPS_PER_READ: usize = 256;

/// How often, at most, a moving watermark is written (a crash makes again
/// the deliveries settled since the last write): as often as sled writes
/// out its buffer, so that a write costs nothing extra.
const WATERMARK_SAVE_EVERY: Duration = Duration::from_millis(SLED_FLUSH_EVERY_MS);

/// How many events past the watermark the oldest-age figure looks at for
/// the first one still waiting (a target that takes few event types).
const OLDEST_IMPLICIT_SCAN: usize = 10_000;

/// Most requests one group commit takes; bounds a commit's latency and memory.
const MAX_BATCH: usize = 1024;

/// Requests that may wait for the committer before senders feel backpressure.
const QUEUE_DEPTH: usize = 8192;

/// A write-ahead log this large gets a checkpoint before the interval is up.
const CHECKPOINT_WAL_BYTES: u64 = wal::SEGMENT_BYTES;

/// How long opening waits for a data directory another holder is releasing.
const LOCK_GRACE: Duration = Duration::from_secs(2);

/// How often sled writes out its log buffer (in the background; this
/// makes nothing durable). It bounds how far sled lags behind after a
/// crash, and so the deliveries whose done-marks a `kill -9` loses and that
/// are then made again: sled's own default (500 ms) resent hundreds per kill.
const SLED_FLUSH_EVERY_MS: u64 = 10;

/// Keys [`Store::forget_target`] deletes per sled batch (each batch holds
/// sled's process-wide write lock while it applies).
const FORGET_BATCH: usize = 1000;

/// Group commits that may wait for the apply thread.
const APPLY_QUEUE_DEPTH: usize = 4096;

/// An event's id: unique, increasing, never reused, and never issued by
/// another relay ([`crate::node`]). Ids stand for the receive time, so even
/// a wiped data directory does not reuse the ids (and so the downstream
/// idempotency keys) of earlier runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(pub u64);

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl serde::Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        text.parse()
            .map_err(|_| serde::de::Error::custom(format!("invalid event id {text:?}")))
    }
}

impl std::str::FromStr for EventId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(EventId)
    }
}

/// Settings of the log (from `[storage]`).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    /// Time between two checkpoints while commits arrive.
    pub checkpoint_interval: Duration,
    pub cache_capacity_bytes: u64,
    pub quarantine_max_events: usize,
    pub quarantine_max_bytes: u64,
    /// Mixed into every id issued (see [`crate::node`]).
    pub node: crate::node::NodeId,
}

/// A target as the committer sees it: which events it gets, and how to wake
/// its dispatcher when new ones are queued.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub target: String,
    /// `None`: every event type.
    pub events: Option<Vec<String>>,
    pub wake: Arc<tokio::sync::Notify>,
}

impl Subscription {
    fn wants(&self, event: &str) -> bool {
        takes(self.events.as_deref(), event)
    }
}

/// Whether a target that takes `events` (`None`: all) takes `event`.
fn takes(events: Option<&[String]>, event: &str) -> bool {
    events.is_none_or(|events| events.iter().any(|e| e == event))
}

/// A delivery's progress, stored as the value of its queue entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryState {
    /// Attempts made so far.
    pub attempts: u32,
    /// When this delivery was queued (ms since the epoch); `max_age` counts
    /// from here.
    pub enqueued_ms: u64,
    pub first_attempt_ms: u64,
    pub last_attempt_ms: u64,
    /// HTTP status of the last attempt; 0 when there was none.
    pub last_status: u16,
    /// Why the last attempt failed, if it did (never a body).
    pub last_error: String,
}

/// Where a delivery waits. Every target's queue has these two parts (see
/// docs/design/storage.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A new event's delivery above the target's watermark: no key of its
    /// own, it waits because the event does.
    Implicit,
    /// A queue entry (`q` key): moved there by a failed attempt, a replay,
    /// or a change of the target's event types.
    Explicit,
}

/// One pending delivery, as read from a target's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: EventId,
    pub due_ms: u64,
    pub state: DeliveryState,
    /// Where it waits.
    pub source: Source,
    /// The event's body when it was read with the delivery.
    pub body: Option<Bytes>,
}

/// What one [`Store::prune_before`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStep {
    pub examined: usize,
    pub deleted: usize,
    pub last: Option<EventId>,
}

/// Which deliveries [`Store::due_deliveries`] returns.
pub struct DueQuery<'a> {
    pub now_ms: u64,
    pub limit: usize,
    /// Take entries whether or not they are due (probes, catching up).
    pub ignore_due: bool,
    /// Resume after this (due, id) queue position instead of the front.
    pub after: Option<(u64, EventId)>,
    pub skip: &'a dyn Fn(EventId) -> bool,
}

/// A delivery the retry policy gave up on, kept until an operator acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: EventId,
    pub target: String,
    pub attempts: u32,
    pub last_status: u16,
    pub first_attempt_ms: u64,
    pub last_attempt_ms: u64,
    pub reason: String,
}

/// Why the log could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "data directory {dir} is locked by another process (is a leadflo-relay already running \
         on it?)"
    )]
    Locked { dir: PathBuf },
    #[error("cannot open the log in {dir}: {source}")]
    Open { dir: PathBuf, source: sled::Error },
    #[error("cannot open sled's data file {path} for fsync: {source}")]
    DataFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("corrupt record under key {key:?}: {reason}")]
    Corrupt {
        key: Vec<u8>,
        reason: record::DecodeError,
    },
    #[error("the log's apply thread did not catch up in time (a slow or failing disk)")]
    Busy,
}

/// Why a commit did not happen. Whoever asked must not claim success.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("the log is shutting down")]
    Closed,
    #[error("the log could not write to disk")]
    Failed,
}

/// What a request asks the committer to store.
#[derive(Debug, Clone)]
pub enum Entry {
    /// An accepted event: its type and its raw body, stored unchanged.
    Event { event: String, body: Bytes },
    /// An authenticated body that failed validation, and why.
    Quarantine { reason: String, body: Bytes },
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: EventId,
    pub received_at_ms: u64,
    pub event: String,
    pub body: Vec<u8>,
}

/// A quarantined body as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedBody {
    pub id: EventId,
    pub received_at_ms: u64,
    pub reason: String,
    pub body: Vec<u8>,
}

/// Backlog figures of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetStats {
    /// Deliveries waiting (due or scheduled for later).
    pub queued: u64,
    /// Dead letters kept.
    pub dead: u64,
    /// When the oldest waiting delivery was queued (ms since the epoch).
    pub oldest_enqueued_ms: Option<u64>,
}

/// A target's waiting deliveries and dead letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub queued: u64,
    pub dead: u64,
}

/// Backlogs by target.
pub type BacklogCounts = std::collections::HashMap<String, Backlog>;

/// A handle on the open store. Cheap to clone; all clones share one
/// [`Shared`].
#[derive(Clone)]
pub struct Store(Arc<Shared>);

/// What every handle on one open store shares.
pub struct Shared {
    db: sled::Db,
    dir: PathBuf,
    health: Arc<CommitHealth>,
    tallies: Arc<Tallies>,
    /// The write-ahead log, until the committer takes it.
    wal: std::sync::Mutex<Option<Wal>>,
    /// Backlog counts a clean shutdown saved, until counted backlogs take them.
    saved_counts: std::sync::Mutex<Option<BacklogCounts>>,
    /// The implicit queue fronts of the targets adopted ([`Store::adopt_targets`]).
    fronts: std::sync::Mutex<std::collections::HashMap<String, ImplicitQueue>>,
    /// Implicit queues a reload took out of use whose waiting deliveries
    /// are not queued yet ([`Store::retire_fronts`]).
    retired: std::sync::Mutex<Vec<Retired>>,
    /// The highest id whose group commit is all in sled: reading new events
    /// never goes past it, so it never skips one still being applied.
    applied: Arc<AtomicU64>,
    /// When a watermark was last written; held while watermarks are
    /// written, so that no write undoes a reload's retirement.
    watermark_saved: std::sync::Mutex<Instant>,
    /// Held by a pruning step (its checks and its deletes) and by
    /// [`Store::enqueue`]: moving a dead letter back into the queue between
    /// two of a step's checks (or between its checks and its deletes) made
    /// the event look owed to no one, and it was deleted under its delivery.
    prune_step: std::sync::Mutex<()>,
}

impl std::ops::Deref for Store {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Store {
    /// Opens (or creates) the log in `options.data_dir`.
    pub fn open(options: &StoreOptions) -> Result<Store, StoreError> {
        let dir = options.data_dir.clone();
        let open = || {
            sled::Config::new()
                .path(&dir)
                .cache_capacity(options.cache_capacity_bytes)
                .flush_every_ms(Some(SLED_FLUSH_EVERY_MS))
                .open()
                .map_err(|source| match &source {
                    sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                        StoreError::Locked { dir: dir.clone() }
                    }
                    _ => StoreError::Open {
                        dir: dir.clone(),
                        source,
                    },
                })
        };
        // The previous holder may be letting go this moment: a process still
        // exiting, or (in one process) sled's I/O threads finishing the last
        // buffer write after the last handle was dropped. Another relay that
        // really holds the directory is reported after this grace.
        let started = Instant::now();
        let db = loop {
            match open() {
                Err(StoreError::Locked { .. }) if started.elapsed() < LOCK_GRACE => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let (wal, entries, last_old) = Wal::open(&dir).map_err(|source| StoreError::DataFile {
            path: dir.join(wal::FILE_PREFIX),
            source,
        })?;
        let store = Store(Arc::new(Shared {
            db,
            dir,
            health: Arc::default(),
            tallies: Arc::default(),
            wal: std::sync::Mutex::new(None),
            saved_counts: std::sync::Mutex::default(),
            fronts: std::sync::Mutex::default(),
            retired: std::sync::Mutex::default(),
            applied: Arc::default(),
            // The first settlement writes at once.
            watermark_saved: std::sync::Mutex::new(
                Instant::now()
                    .checked_sub(WATERMARK_SAVE_EVERY)
                    .unwrap_or_else(Instant::now),
            ),
            prune_step: std::sync::Mutex::default(),
        }));
        store.recover(entries, last_old)?;
        store
            .applied
            .store(store.recover_last_id()?, Ordering::Release);
        store.take_saved_counts()?;
        *store.wal.lock().expect("wal lock") = Some(wal);
        Ok(store)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    pub fn health(&self) -> Arc<CommitHealth> {
        self.health.clone()
    }

    /// Bytes of the store's data file that sled has freed (pruning) and
    /// reuses before it grows the file.
    pub fn reusable_bytes(&self) -> u64 {
        self.db.reusable_bytes()
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

#[cfg(test)]
mod tests;
