//! The durable event log: the only module that touches sled.
//!
//! Everything lives in one sled tree, under one-byte key prefixes:
//!
//! | key                         | value                                   |
//! |-----------------------------|-----------------------------------------|
//! | `e` + id (u64, big endian)  | an event record ([`record`])            |
//! | `x` + id                    | a quarantined body ([`record`])         |
//! | `m/last_id`                 | highest id ever assigned (u64 BE)       |
//! | `q` + target + 0 + due + id | a pending delivery ([`DeliveryState`])  |
//! | `p` + target + 0 + id       | a delivery moved from its first place: enqueued_ms (u64 BE) |
//! | `a` + target + 0 + enqueued_ms + id | the same delivery, by age (empty) |
//! | `d` + target + 0 + id       | a dead letter ([`DeadLetter`])          |
//! | `w` + target + 0            | the target's watermark and event types ([`record::encode_watermark`]) |
//!
//! A target's queue has two parts, both on disk, so memory does not grow
//! with the backlog:
//!
//! - **New events** (the front, most deliveries): no key at all. Every
//!   event above the target's **watermark** that the target subscribes to
//!   waits for it, due at its receive time; every one at or below it is
//!   settled. The dispatcher reads them from the event range in id order,
//!   body included ([`fresh`] keeps what it has taken, and as ranges what
//!   it has settled, above the watermark); settling moves the watermark to
//!   below the oldest delivery still in flight, and it is written every few
//!   tens of ms and at shutdown. So a new event costs
//!   one sled insert (its record), and a delivery that succeeds costs no
//!   write. A crash makes again what was settled since the watermark was
//!   last written (at least once). The event types stored with the
//!   watermark decide what waits; a target whose types change, or that is
//!   no longer configured, first gets explicit entries for what waited.
//! - **Explicit entries**: the `q` range, ordered by due time (ms since the
//!   epoch) then id, for deliveries moved by a failed attempt, queued again
//!   by `replay`, or written by a build before watermarks (which queued
//!   every new event here, at its **first place**, due at its receive time,
//!   with no other key). A moved or replayed delivery also has a `p` entry,
//!   written before it, so that it can be found by id; one written before
//!   the watermark, and above it after a crash, counts as settled. And an
//!   `a` entry, written before the `p` entry and removed after it, orders
//!   them by the time they have waited since: a replay waits from its
//!   replay, under an old id, so the first `p` entry is not the oldest. An
//!   `a` entry without its `p` entry (a crash in between) is skipped, and
//!   removed by the recount after a crash ([`Log::count_backlogs`]).
//!
//! A target first seen gets its watermark at the last id, made durable
//! before anything is acknowledged for it: it takes no history.
//!
//! Writes go through one committer thread ([`Committer`]): it gathers every
//! request waiting, appends them as one frame to the relay's write-ahead log
//! ([`wal`]) and `fdatasync`s it (one trip to the disk), answers them, and
//! hands the writes to an apply thread that puts them into sled key by key,
//! each group's `m/last_id` last (sled recovers a prefix of its writes; a
//! group commit above that mark is replayed whole on open). Every
//! `storage.checkpoint_interval` (and at shutdown) a checkpoint makes sled
//! itself durable, with sled's `flush` **and** an `fdatasync` of its data
//! file (sled 0.34's flush ends in `sync_file_range`, which does not survive
//! a power cut; see DESIGN.md), and empties the write-ahead log. Opening the
//! log replays what the write-ahead log holds beyond sled's highest id. One
//! thread, one flush at a time: concurrent sled flushes deadlock (sled
//! #1308), and a single committer turns concurrency into bigger batches
//! instead of queued fsyncs.
//!
//! This module must never log or expose a body's content.

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::crashpoint;
use wal::{Frame, Wal};

mod fresh;

/// Most fresh deliveries a target has taken and not settled (see [`fresh`]).
pub use fresh::WINDOW as FRESH_WINDOW;
pub mod wal;
use crate::metrics::Metrics;
use fresh::FreshQueue;

const EVENT_PREFIX: u8 = b'e';
const QUARANTINE_PREFIX: u8 = b'x';
const META_LAST_ID: &[u8] = b"m/last_id";
/// The highest id a checkpoint has made durable against a power cut, sled
/// blob files included: opening the log writes every write-ahead log frame
/// above it again. Not `m/last_id`: sled's own flusher syncs its data file
/// every few milliseconds, so that mark can outlive a power cut while a
/// large event's blob file (sled writes values over a quarter of its
/// segment size to files of their own, without syncing them) does not.
const META_DURABLE_ID: &[u8] = b"m/durable_id";
/// Per-target backlog counts saved by a clean shutdown (see
/// [`Log::save_backlog_counts`]); taken, and deleted, by the next open.
const META_SAVED_COUNTS: &[u8] = b"m/backlog_counts";
/// How far ids may run ahead of the receive clock (bursts above 32 events
/// per millisecond); time-range scans over ids widen by this much.
const ID_CLOCK_MARGIN_MS: u64 = 60_000;
/// The most an id ever ran ahead of its event's receive time, in ms, once
/// that was more than [`ID_CLOCK_MARGIN_MS`]: after the clock was set back
/// (ids never go back), until it caught up with the last id.
const META_ID_LEAD: &[u8] = b"m/id_lead_ms";
const QUEUE_PREFIX: u8 = b'q';
const PENDING_PREFIX: u8 = b'p';
const AGE_PREFIX: u8 = b'a';
/// Most `a` entries without a `p` entry (see the module docs) one
/// [`Log::target_stats`] skips before it gives up on them.
const AGE_SKIPS_PER_READ: usize = 256;
const DEAD_PREFIX: u8 = b'd';
const WATERMARK_PREFIX: u8 = b'w';
/// How often, at most, a moving watermark is written (a crash makes again
/// the deliveries settled since the last write): as often as sled writes
/// out its buffer, so that a write costs nothing extra.
const WATERMARK_SAVE_EVERY: Duration = Duration::from_millis(SLED_FLUSH_EVERY_MS);
/// How many events past the watermark the oldest-age figure looks at for
/// the first one still waiting (a target that takes few event types).
const OLDEST_FRESH_SCAN: usize = 10_000;

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
/// Keys [`Log::forget_target`] deletes per sled batch (each batch holds
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
pub struct LogOptions {
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

/// One pending delivery, as read from a target's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: EventId,
    pub due_ms: u64,
    pub state: DeliveryState,
    /// A new event's delivery read above the target's watermark (it has no
    /// queue entry), not an explicit queue entry.
    pub fresh: bool,
    /// The event's body when it was read with the delivery.
    pub body: Option<Bytes>,
}

/// What one [`Log::prune_before`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStep {
    pub examined: usize,
    pub deleted: usize,
    pub last: Option<EventId>,
}

/// Which deliveries [`Log::due_deliveries`] returns.
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
pub enum LogError {
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

/// Whether the last commit reached disk, and whether one is taking too long;
/// read by `/readyz` and by the relay's stuck-log watch.
#[derive(Debug)]
pub struct CommitHealth {
    failing: AtomicBool,
    /// The last checkpoint failed: sled cannot make itself durable (the
    /// write-ahead log still holds everything, and grows).
    checkpoint_failing: AtomicBool,
    /// When the commit in progress started, in ms after `epoch` plus one
    /// (0: no commit in progress).
    busy_since: AtomicU64,
    /// The same for the apply thread's sled write or checkpoint.
    applying_since: AtomicU64,
    epoch: Instant,
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

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn begin(&self) {
        self.busy_since.store(self.now(), Ordering::Relaxed);
    }

    fn end(&self) {
        self.busy_since.store(0, Ordering::Relaxed);
    }

    fn begin_apply(&self) {
        self.applying_since.store(self.now(), Ordering::Relaxed);
    }

    fn end_apply(&self) {
        self.applying_since.store(0, Ordering::Relaxed);
    }
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

/// Per-target queued and dead counts, kept in step with every write so that
/// reading them never scans the log.
#[derive(Debug, Default)]
struct Tallies {
    by_target: std::sync::Mutex<std::collections::HashMap<String, (i64, i64)>>,
}

impl Tallies {
    fn change(&self, target: &str, queued: i64, dead: i64) {
        let mut map = self.by_target.lock().expect("tallies lock");
        let entry = map.entry(target.to_owned()).or_default();
        entry.0 += queued;
        entry.1 += dead;
    }

    fn set(&self, target: &str, queued: i64, dead: i64) {
        self.by_target
            .lock()
            .expect("tallies lock")
            .insert(target.to_owned(), (queued, dead));
    }

    fn get(&self, target: &str) -> (u64, u64) {
        let map = self.by_target.lock().expect("tallies lock");
        let (queued, dead) = map.get(target).copied().unwrap_or_default();
        (queued.max(0) as u64, dead.max(0) as u64)
    }
}

/// A target's watermark and the event types it took then (`None`: all).
type StoredWatermark = (u64, Option<Vec<String>>);

/// Queued and dead-lettered deliveries by target.
pub type BacklogCounts = std::collections::HashMap<String, (i64, i64)>;

/// A handle on the open log. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Log {
    db: sled::Db,
    dir: PathBuf,
    health: Arc<CommitHealth>,
    tallies: Arc<Tallies>,
    /// The write-ahead log, until the committer takes it.
    wal: Arc<std::sync::Mutex<Option<Wal>>>,
    /// Backlog counts a clean shutdown saved, until counted backlogs take them.
    saved_counts: Arc<std::sync::Mutex<Option<BacklogCounts>>>,
    /// The implicit queue fronts of the targets adopted ([`Log::adopt_targets`]).
    fresh: Arc<std::sync::Mutex<std::collections::HashMap<String, FreshQueue>>>,
    /// The highest id whose group commit is all in sled: reading new events
    /// never goes past it, so it never skips one still being applied.
    applied: Arc<AtomicU64>,
    /// When a watermark was last written.
    watermark_saved: Arc<std::sync::Mutex<Instant>>,
    /// Held by a pruning step (its checks and its deletes) and by
    /// [`Log::enqueue`]: moving a dead letter back into the queue between
    /// two of a step's checks (or between its checks and its deletes) made
    /// the event look owed to no one, and it was deleted under its delivery.
    prune_step: Arc<std::sync::Mutex<()>>,
}

impl Log {
    /// Opens (or creates) the log in `options.data_dir`.
    pub fn open(options: &LogOptions) -> Result<Log, LogError> {
        let dir = options.data_dir.clone();
        let open = || {
            sled::Config::new()
                .path(&dir)
                .cache_capacity(options.cache_capacity_bytes)
                .flush_every_ms(Some(SLED_FLUSH_EVERY_MS))
                .open()
                .map_err(|source| match &source {
                    sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                        LogError::Locked { dir: dir.clone() }
                    }
                    _ => LogError::Open {
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
                Err(LogError::Locked { .. }) if started.elapsed() < LOCK_GRACE => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let (wal, entries, last_old) = Wal::open(&dir).map_err(|source| LogError::DataFile {
            path: dir.join(wal::FILE_PREFIX),
            source,
        })?;
        let log = Log {
            db,
            dir,
            health: Arc::default(),
            tallies: Arc::default(),
            wal: Arc::new(std::sync::Mutex::new(None)),
            saved_counts: Arc::default(),
            fresh: Arc::default(),
            applied: Arc::default(),
            // The first settlement writes at once.
            watermark_saved: Arc::new(std::sync::Mutex::new(
                Instant::now()
                    .checked_sub(WATERMARK_SAVE_EVERY)
                    .unwrap_or_else(Instant::now),
            )),
            prune_step: Arc::default(),
        };
        log.recover(entries, last_old)?;
        log.applied.store(log.recover_last_id()?, Ordering::Release);
        log.take_saved_counts()?;
        *log.wal.lock().expect("wal lock") = Some(wal);
        Ok(log)
    }

    /// Puts what the write-ahead log holds beyond sled's highest id into
    /// sled (a crash came before the checkpoint), makes sled durable, and
    /// empties the write-ahead log.
    fn recover(&self, entries: Vec<wal::Entry>, last_old: u64) -> Result<(), LogError> {
        if last_old == 0 {
            return Ok(());
        }
        // sled applies a group commit key by key, its `m/last_id` last: a
        // group above that mark may be in sled in part (keys of later
        // events included), so it is written again whole.
        // Frames up to the last checkpoint's mark are durable in sled; those
        // above it are written again whole, also those sled already had
        // (identical keys and values): a power cut may have taken a large
        // event's blob from under them. A log from before the mark existed
        // replays every frame.
        let durable = self.durable_through()?;
        let mut batch = Writes::default();
        let mut last = self.recover_last_id()?;
        let mut replayed = 0;
        let mut adopted = std::collections::HashMap::new();
        let mut lead_ms = self.id_lead_ms()?;
        for entry in entries.iter().filter(|e| e.id > durable) {
            let id = entry.id;
            match entry.kind {
                wal::KIND_EVENT => {
                    let received_at_ms = received_at(&id_key(EVENT_PREFIX, id), &entry.value)?;
                    lead_ms = lead_ms.max(crate::node::id_ms(id).saturating_sub(received_at_ms));
                    batch.insert(&id_key(EVENT_PREFIX, id), entry.value.as_slice());
                    let state = new_delivery_state(received_at_ms);
                    for target in &entry.targets {
                        // A target with a watermark takes new events from
                        // above it: no queue entry.
                        let implicit = match adopted.get(target) {
                            Some(&implicit) => implicit,
                            None => {
                                let implicit = self
                                    .db
                                    .contains_key(target_prefix(WATERMARK_PREFIX, target))?;
                                adopted.insert(target.clone(), implicit);
                                implicit
                            }
                        };
                        if !implicit {
                            batch.queue_new(target, received_at_ms, EventId(id), &state);
                        }
                    }
                }
                _ => batch.insert(&id_key(QUARANTINE_PREFIX, id), entry.value.as_slice()),
            }
            last = last.max(id);
            replayed += 1;
        }
        batch.insert(META_LAST_ID, &last.to_be_bytes());
        if lead_ms > ID_CLOCK_MARGIN_MS {
            batch.insert(META_ID_LEAD, &lead_ms.to_be_bytes());
        }
        let io = |source: std::io::Error| LogError::DataFile {
            path: self.dir.clone(),
            source,
        };
        self.db.apply_batch(batch.into_batch())?;
        self.db.flush()?;
        File::open(self.dir.join("db"))
            .and_then(|f| f.sync_data())
            .map_err(io)?;
        // Every blob file, not only this run's: the process that crashed may
        // have left some unsynced, vouched for by no checkpoint.
        sync_recent_blobs(&self.dir, UNIX_EPOCH).map_err(io)?;
        // Everything through `last` is synced: the mark (see `make_durable`).
        self.db.insert(META_DURABLE_ID, &last.to_be_bytes())?;
        wal::remove_through(&self.dir, last_old).map_err(io)?;
        if replayed > 0 {
            tracing::info!(
                replayed,
                "recovered acknowledged events from the write-ahead log"
            );
        }
        Ok(())
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    pub fn health(&self) -> Arc<CommitHealth> {
        self.health.clone()
    }

    /// Makes `subscriptions`' targets take new events from above a watermark
    /// instead of from queue entries (see [`fresh`]). Call after opening,
    /// before [`Log::count_backlogs`], the committer and the dispatchers.
    ///
    /// A target seen for the first time gets its watermark at the last id,
    /// made durable before anything can be acknowledged for it (else a
    /// crash could lose the events queued for it). A target whose event
    /// types changed, and one with a watermark that is no longer
    /// configured, first gets an explicit queue entry for each event still
    /// waiting for it under the types it had, so that what was queued stays
    /// queued, as with queue entries; the changed one then starts afresh.
    pub fn adopt_targets(&self, subscriptions: &[Subscription]) -> Result<(), LogError> {
        let last = self.recover_last_id()?;
        let mut changed = false;
        let mut configured = std::collections::HashSet::new();
        let mut fresh = std::collections::HashMap::new();
        for subscription in subscriptions {
            let target = &subscription.target;
            configured.insert(target.clone());
            let key = target_prefix(WATERMARK_PREFIX, target);
            let events = subscription.events.as_deref();
            let watermark = match self.stored_watermark(target)? {
                Some((watermark, stored)) if stored.as_deref() == events => watermark,
                stored => {
                    if let Some((watermark, stored)) = stored {
                        self.materialize(target, watermark, stored)?;
                    }
                    self.db
                        .insert(key, record::encode_watermark(last, events))?;
                    changed = true;
                    last
                }
            };
            let q = self.fresh_queue(target, watermark, subscription.events.clone())?;
            fresh.insert(target.clone(), q);
        }
        for item in self.db.scan_prefix([WATERMARK_PREFIX]) {
            let (key, _) = item?;
            let target = String::from_utf8_lossy(&key[1..key.len() - 1]).into_owned();
            if configured.contains(&target) {
                continue;
            }
            if let Some((watermark, stored)) = self.stored_watermark(&target)? {
                self.materialize(&target, watermark, stored)?;
            }
            self.db.remove(key)?;
            changed = true;
        }
        if changed {
            self.make_sled_durable()?;
        }
        *self.fresh.lock().expect("fresh lock") = fresh;
        Ok(())
    }

    /// A target a reload added (or whose event types it changed, after
    /// [`Log::retire_target`]): it takes, under `subscription`'s event
    /// types, every event above `cut` (the last id the committer counted
    /// for the old targets, [`Committer::resubscribe`]). Its watermark is
    /// durable when this returns.
    pub fn add_target(&self, subscription: &Subscription, cut: u64) -> Result<(), LogError> {
        let target = &subscription.target;
        let events = subscription.events.clone();
        self.db.insert(
            target_prefix(WATERMARK_PREFIX, target),
            record::encode_watermark(cut, events.as_deref()),
        )?;
        self.make_sled_durable()?;
        let q = self.fresh_queue(target, cut, events)?;
        self.fresh
            .lock()
            .expect("fresh lock")
            .insert(target.clone(), q);
        Ok(())
    }

    /// A target a reload removed (or whose event types it changed), whose
    /// dispatcher has stopped: what waited for it above its watermark, up
    /// to `cut`, gets explicit queue entries, as [`Log::adopt_targets`]
    /// gives them at a start, and its watermark goes. Returns how many.
    pub fn retire_target(&self, target: &str, cut: u64) -> Result<u64, LogError> {
        // Pruning must not take an event between leaving the fresh queue
        // and getting its queue entry (see `prune_step`).
        let _step = self.prune_step.lock().expect("prune lock");
        let Some(q) = self.fresh.lock().expect("fresh lock").remove(target) else {
            return Ok(0);
        };
        let queued = self.queue_waiting(target, q.watermark(), cut, |id, event| {
            q.waits(id) && q.wants(event)
        })?;
        self.db.remove(target_prefix(WATERMARK_PREFIX, target))?;
        self.make_sled_durable()?;
        Ok(queued)
    }

    /// Waits (with a deadline) until every group commit through `id` is in
    /// sled, so that a scan sees each of their events.
    pub fn wait_applied(&self, id: u64, deadline: Duration) -> Result<(), LogError> {
        let started = Instant::now();
        while self.applied.load(Ordering::Acquire) < id {
            if started.elapsed() >= deadline {
                return Err(LogError::Busy);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Takes every stored watermark as it is, with the event types stored
    /// with it, changing nothing: for commands run offline, which must see
    /// what waits above the watermarks without acting as the server.
    pub fn load_watermarks(&self) -> Result<(), LogError> {
        let mut fresh = std::collections::HashMap::new();
        for item in self.db.scan_prefix([WATERMARK_PREFIX]) {
            let (key, value) = item?;
            let target = String::from_utf8_lossy(&key[1..key.len() - 1]).into_owned();
            let (watermark, events) =
                record::decode_watermark(&value).map_err(|reason| LogError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
            let q = self.fresh_queue(&target, watermark, events)?;
            fresh.insert(target, q);
        }
        *self.fresh.lock().expect("fresh lock") = fresh;
        Ok(())
    }

    /// A target's fresh queue from its stored watermark. Deliveries above
    /// it that have a `p` entry (moved after a failure) or a dead letter
    /// were settled after the watermark was last written: they are not
    /// waiting at the front any more.
    fn fresh_queue(
        &self,
        target: &str,
        watermark: u64,
        events: Option<Vec<String>>,
    ) -> Result<FreshQueue, LogError> {
        let mut q = FreshQueue::new(watermark, events);
        let first = EventId(watermark.saturating_add(1));
        for (start, prefix) in [
            (pending_key(target, first), pending_prefix(target)),
            (dead_key(target, first), dead_prefix(target)),
        ] {
            let mut end = prefix;
            *end.last_mut().expect("separator") = 1;
            for item in self.db.range(start..end) {
                let (key, _) = item?;
                if let Some((_, id)) = parse_target_key(&key) {
                    q.settled_before(id.0);
                }
            }
        }
        Ok(q)
    }

    /// Whether `target`'s watermark moved since it was last written.
    pub fn watermark_unsaved(&self, target: &str) -> bool {
        self.fresh
            .lock()
            .expect("fresh lock")
            .get(target)
            .is_some_and(FreshQueue::unsaved)
    }

    /// The event types stored with `target`'s watermark (`None`: every
    /// type, or no watermark stored).
    pub fn stored_event_types(&self, target: &str) -> Result<Option<Vec<String>>, LogError> {
        Ok(self
            .stored_watermark(target)?
            .and_then(|(_, events)| events))
    }

    fn stored_watermark(&self, target: &str) -> Result<Option<StoredWatermark>, LogError> {
        let key = target_prefix(WATERMARK_PREFIX, target);
        match self.db.get(&key)? {
            Some(value) => record::decode_watermark(&value)
                .map(Some)
                .map_err(|reason| LogError::Corrupt { key, reason }),
            None => Ok(None),
        }
    }

    /// Gives each event above `watermark` that `events` selects an explicit
    /// queue entry for `target`, at its first place.
    fn materialize(
        &self,
        target: &str,
        watermark: u64,
        events: Option<Vec<String>>,
    ) -> Result<(), LogError> {
        let queued = self.queue_waiting(target, watermark, u64::MAX, |_, event| {
            takes(events.as_deref(), event)
        })?;
        tracing::info!(target = %target, queued, "new events waiting for a target whose settings changed now have queue entries");
        Ok(())
    }

    /// Gives each event in `(watermark, through]` for which `waits(id,
    /// event type)` holds an explicit queue entry for `target`, at its
    /// first place, unless it was settled after the watermark was written
    /// (moved by a failed attempt, so it has its queue entry, or
    /// dead-lettered). Returns how many.
    fn queue_waiting(
        &self,
        target: &str,
        watermark: u64,
        through: u64,
        waits: impl Fn(u64, &str) -> bool,
    ) -> Result<u64, LogError> {
        let start = id_key(EVENT_PREFIX, watermark.saturating_add(1)).to_vec();
        let end = id_key(EVENT_PREFIX, through).to_vec();
        let mut queued = 0u64;
        for item in self.db.range(start..=end) {
            let (key, value) = item?;
            let event = decode_event_record(&key, &value)?;
            let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
            if !waits(id.0, event.event)
                || self.db.contains_key(pending_key(target, id))?
                || self.db.contains_key(dead_key(target, id))?
            {
                continue;
            }
            self.db.insert(
                queue_key(target, event.received_at_ms, id),
                new_delivery_state(event.received_at_ms),
            )?;
            queued += 1;
        }
        Ok(queued)
    }

    /// sled's flush, then an `fdatasync` of its file and its new blobs.
    fn make_sled_durable(&self) -> Result<(), LogError> {
        let io = |source: std::io::Error| LogError::DataFile {
            path: self.dir.clone(),
            source,
        };
        let started = SystemTime::now();
        self.db.flush()?;
        File::open(self.dir.join("db"))
            .and_then(|f| f.sync_data())
            .map_err(io)?;
        sync_recent_blobs(&self.dir, started).map_err(io)?;
        Ok(())
    }

    /// Writes the watermarks that moved since they were last written (at
    /// most every [`WATERMARK_SAVE_EVERY`] unless `now`).
    pub fn save_watermarks(&self, now: bool) -> Result<(), LogError> {
        {
            let mut saved = self.watermark_saved.lock().expect("watermark lock");
            if !now && saved.elapsed() < WATERMARK_SAVE_EVERY {
                return Ok(());
            }
            *saved = Instant::now();
        }
        let moved: Vec<(String, u64, Option<Vec<String>>)> = {
            let fresh = self.fresh.lock().expect("fresh lock");
            fresh
                .iter()
                .filter(|(_, q)| q.watermark() != q.saved)
                .map(|(target, q)| {
                    (
                        target.clone(),
                        q.watermark(),
                        q.events().map(<[String]>::to_vec),
                    )
                })
                .collect()
        };
        for (target, watermark, events) in moved {
            self.db.insert(
                target_prefix(WATERMARK_PREFIX, &target),
                record::encode_watermark(watermark, events.as_deref()),
            )?;
            if let Some(q) = self.fresh.lock().expect("fresh lock").get_mut(&target) {
                q.saved = q.saved.max(watermark);
            }
        }
        Ok(())
    }

    /// Settles the fresh delivery of `id` at `target` (see [`fresh`]).
    /// A watermark that cannot be written now is written by a later
    /// settlement or the shutdown; meanwhile a crash would only make
    /// deliveries again.
    fn settle(&self, target: &str, id: EventId) {
        let moved = match self.fresh.lock().expect("fresh lock").get_mut(target) {
            Some(q) => q.settle(id.0),
            None => false,
        };
        if moved && let Err(err) = self.save_watermarks(false) {
            tracing::warn!(error = %err, "cannot write a delivery watermark; will try again");
        }
    }

    /// A fresh delivery that was taken but whose attempt was abandoned or
    /// could not be recorded: it is read again.
    /// An explicit one stays where it is, due: the explicit queue is read
    /// again.
    pub fn release(&self, target: &str, id: EventId, fresh: bool) {
        if let Some(q) = self.fresh.lock().expect("fresh lock").get_mut(target) {
            if fresh {
                q.release(id.0);
            } else {
                q.explicit_quiet_until = 0;
                q.explicit_writes += 1;
            }
        }
    }

    /// Whether `target`'s delivery of event `id` (its record `value`) waits
    /// above the target's watermark.
    fn waits_fresh(
        &self,
        target: &str,
        id: EventId,
        key: &[u8],
        value: &[u8],
    ) -> Result<bool, LogError> {
        let fresh = self.fresh.lock().expect("fresh lock");
        let Some(q) = fresh.get(target) else {
            return Ok(false);
        };
        if !q.waits(id.0) {
            return Ok(false);
        }
        Ok(q.wants(decode_event_record(key, value)?.event))
    }

    /// Fresh deliveries waiting at `target`, and when the oldest was
    /// received (a scan above the watermark: for counts at start-up and
    /// tools; the oldest looks at most [`OLDEST_FRESH_SCAN`] events).
    fn fresh_backlog(&self, target: &str, count: bool) -> Result<(u64, Option<u64>), LogError> {
        let Some(watermark) = self
            .fresh
            .lock()
            .expect("fresh lock")
            .get(target)
            .map(FreshQueue::watermark)
        else {
            return Ok((0, None));
        };
        let start = id_key(EVENT_PREFIX, watermark.saturating_add(1)).to_vec();
        let (mut waiting, mut oldest) = (0, None);
        for (n, item) in self.db.range(start..vec![EVENT_PREFIX + 1]).enumerate() {
            if !count && (oldest.is_some() || n >= OLDEST_FRESH_SCAN) {
                break;
            }
            let (key, value) = item?;
            let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
            if self.waits_fresh(target, id, &key, &value)? {
                waiting += 1;
                oldest = oldest.or(Some(received_at(&key, &value)?));
            }
        }
        Ok((waiting, oldest))
    }

    /// Starts the committer thread. Call once per open log.
    pub fn start_committer(
        &self,
        options: &LogOptions,
        subscriptions: Vec<Subscription>,
        metrics: Arc<Metrics>,
    ) -> Result<(Committer, CommitterHandle), LogError> {
        let data_path = self.dir.join("db");
        let data_file = File::options()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|source| LogError::DataFile {
                path: data_path,
                source,
            })?;
        let quarantine = self.quarantine_index()?;
        let wal = self
            .wal
            .lock()
            .expect("wal lock")
            .take()
            .expect("the committer starts once per open log");
        let (apply_tx, apply_rx) = std::sync::mpsc::sync_channel(APPLY_QUEUE_DEPTH);
        let mut applier = ApplyState {
            db: self.db.clone(),
            dir: self.dir.clone(),
            data_file,
            sled_missing_commits: false,
            sync_failed: false,
            last_checkpoint_wall: SystemTime::now(),
            subscriptions: subscriptions.clone(),
            metrics: metrics.clone(),
            health: self.health.clone(),
            tallies: self.tallies.clone(),
            applied: self.applied.clone(),
        };
        let applier = std::thread::Builder::new()
            .name("leadflo-apply".to_owned())
            .spawn(move || applier.run(apply_rx))
            .expect("spawning the apply thread");
        let mut state = CommitState {
            wal,
            apply_tx,
            applier: Some(applier),
            checkpoint_interval: options.checkpoint_interval,
            last_checkpoint: Instant::now(),
            last_id: self.recover_last_id()?,
            node: options.node,
            id_lead_ms: self.id_lead_ms()?,
            quarantine,
            quarantine_max_events: options.quarantine_max_events.max(1),
            quarantine_max_bytes: options.quarantine_max_bytes,
            implicit: {
                let fresh = self.fresh.lock().expect("fresh lock");
                subscriptions
                    .iter()
                    .map(|s| fresh.contains_key(&s.target))
                    .collect()
            },
            subscriptions,
            metrics,
            health: self.health.clone(),
        };
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("leadflo-commit".to_owned())
            .spawn(move || state.run(rx))
            .expect("spawning the committer thread");
        let handle = CommitterHandle {
            tx: tx.clone(),
            thread: Some(thread),
        };
        Ok((Committer { tx }, handle))
    }

    /// The id of the last group commit sled has every write of.
    /// See [`META_DURABLE_ID`]; 0 when no checkpoint has set it yet.
    fn durable_through(&self) -> Result<u64, LogError> {
        Ok(match self.db.get(META_DURABLE_ID)? {
            Some(v) => decode_u64(&v).unwrap_or(0),
            None => 0,
        })
    }

    /// See [`META_ID_LEAD`]; 0 when ids never ran that far ahead.
    fn id_lead_ms(&self) -> Result<u64, LogError> {
        Ok(match self.db.get(META_ID_LEAD)? {
            Some(v) => decode_u64(&v).unwrap_or(0),
            None => 0,
        })
    }

    fn applied_through(&self) -> Result<u64, LogError> {
        Ok(match self.db.get(META_LAST_ID)? {
            Some(v) => decode_u64(&v).unwrap_or(0),
            None => 0,
        })
    }

    /// The highest id ever assigned: the stored high-water mark, or any
    /// higher key (belt and braces for a log written by an older version).
    fn recover_last_id(&self) -> Result<u64, LogError> {
        let mut last = self.applied_through()?;
        for prefix in [EVENT_PREFIX, QUARANTINE_PREFIX] {
            if let Some((key, _)) = self.db.scan_prefix([prefix]).next_back().transpose()? {
                last = last.max(decode_u64(&key[1..]).unwrap_or(0));
            }
        }
        Ok(last)
    }

    fn quarantine_index(&self) -> Result<VecDeque<(sled::IVec, u64)>, LogError> {
        let mut index = VecDeque::new();
        for item in self.db.scan_prefix([QUARANTINE_PREFIX]) {
            let (key, value) = item?;
            index.push_back((key, value.len() as u64));
        }
        Ok(index)
    }

    /// The stored event with this id.
    pub fn event(&self, id: EventId) -> Result<Option<StoredEvent>, LogError> {
        let key = id_key(EVENT_PREFIX, id.0);
        match self.db.get(key)? {
            Some(value) => decode_event(&key, &value).map(Some),
            None => Ok(None),
        }
    }

    /// Every stored event, oldest first.
    pub fn events(&self) -> impl Iterator<Item = Result<StoredEvent, LogError>> + '_ {
        self.db.scan_prefix([EVENT_PREFIX]).map(|item| {
            let (key, value) = item?;
            decode_event(&key, &value)
        })
    }

    /// Every quarantined body, oldest first.
    pub fn quarantined(&self) -> impl Iterator<Item = Result<QuarantinedBody, LogError>> + '_ {
        self.db.scan_prefix([QUARANTINE_PREFIX]).map(|item| {
            let (key, value) = item?;
            let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
            let q = record::decode_quarantine(&value).map_err(|reason| LogError::Corrupt {
                key: key.to_vec(),
                reason,
            })?;
            Ok(QuarantinedBody {
                id,
                received_at_ms: q.received_at_ms,
                reason: q.reason.to_owned(),
                body: q.body.to_vec(),
            })
        })
    }

    /// The raw body of a stored event.
    pub fn event_body(&self, id: EventId) -> Result<Option<Bytes>, LogError> {
        let key = id_key(EVENT_PREFIX, id.0);
        match self.db.get(key)? {
            Some(value) => {
                let r = record::decode_event(&value).map_err(|reason| LogError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
                Ok(Some(Bytes::copy_from_slice(r.body)))
            }
            None => Ok(None),
        }
    }

    /// Up to `limit` deliveries of `target` in queue order that are due at
    /// `query.now_ms` (all of them, due or not, with `ignore_due`), starting
    /// after `query.after` (from the front when `None`) and skipping those
    /// `skip` names. Also returns the due time of the first entry left out
    /// for not being due yet, so the caller knows when to look again.
    pub fn due_deliveries(
        &self,
        target: &str,
        query: &DueQuery<'_>,
    ) -> Result<(Vec<Delivery>, Option<u64>), LogError> {
        let mut due = Vec::new();
        if query.limit == 0 {
            return Ok((due, None));
        }
        let prefix = queue_prefix(target);
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends in a separator") = 1;
        // Nothing explicit due before `quiet_until`: the explicit queue is
        // not read again until then (see `FreshQueue::explicit_quiet_until`).
        // `writes` tells whether an entry was written or released while
        // this read ran, which a "quiet" it concludes must not hide.
        let (quiet_until, writes) = self
            .fresh
            .lock()
            .expect("fresh lock")
            .get(target)
            .map(|q| (q.explicit_quiet_until, q.explicit_writes))
            .unzip();
        let mut next_due;
        if query.ignore_due || quiet_until.is_none_or(|until| query.now_ms >= until) {
            let mut after = query.after;
            loop {
                let start = match after {
                    Some((due_ms, id)) => Bound::Excluded(queue_key(target, due_ms, id)),
                    None => Bound::Included(prefix.clone()),
                };
                next_due = None;
                for item in self
                    .db
                    .range::<Vec<u8>, _>((start, Bound::Excluded(end.clone())))
                {
                    let (key, value) = item?;
                    let corrupt = |reason| LogError::Corrupt {
                        key: key.to_vec(),
                        reason,
                    };
                    let (due_ms, id) =
                        parse_queue_key(&key).ok_or(corrupt(record::DecodeError::Truncated))?;
                    let state = record::decode_state(&value).map_err(corrupt)?;
                    // `ignore_due` overrides backoff times, not a delivery
                    // never attempted yet that is due later on purpose (a
                    // replay spaced by `--rate`): it waits for its time.
                    if due_ms > query.now_ms && (!query.ignore_due || state.attempts == 0) {
                        next_due = Some(due_ms);
                        break;
                    }
                    if (query.skip)(id) {
                        continue;
                    }
                    due.push(Delivery {
                        id,
                        due_ms,
                        state,
                        fresh: false,
                        body: None,
                    });
                    if due.len() >= query.limit {
                        return Ok((due, None));
                    }
                }
                if !due.is_empty() {
                    break;
                }
                // Nothing after the cursor: entries written (rescheduled,
                // released) before it since are found from the front, at
                // once rather than at the next pass.
                if after.take().is_some() {
                    continue;
                }
                // Read from the front and found nothing due: quiet until the
                // first entry that is not due yet.
                if !query.ignore_due {
                    self.explicit_quiet(target, next_due.unwrap_or(u64::MAX), writes);
                }
                break;
            }
        } else {
            next_due = quiet_until.filter(|&until| until < u64::MAX);
        }
        self.take_fresh(target, query.limit, &mut due)?;
        Ok((due, next_due))
    }

    /// No explicit entry of `target` is due before `until` (a read from
    /// the front found none, or the next one due then), unless an entry was
    /// written or released since the read began (`writes` was read then).
    fn explicit_quiet(&self, target: &str, until: u64, writes: Option<u64>) {
        if let Some(q) = self.fresh.lock().expect("fresh lock").get_mut(target) {
            if Some(q.explicit_writes) == writes {
                q.explicit_quiet_until = until;
            }
        }
    }

    /// An explicit entry of `target` was written (or released) due at
    /// `due_ms`: the explicit queue is read again from then.
    fn explicit_added(&self, target: &str, due_ms: u64) {
        if let Some(q) = self.fresh.lock().expect("fresh lock").get_mut(target) {
            q.explicit_quiet_until = q.explicit_quiet_until.min(due_ms);
            q.explicit_writes += 1;
        }
    }

    /// Takes up to `limit` (counting those in `due`) fresh deliveries of
    /// `target`, in id order, from where reading stopped (see [`fresh`]).
    fn take_fresh(
        &self,
        target: &str,
        limit: usize,
        due: &mut Vec<Delivery>,
    ) -> Result<(), LogError> {
        let mut fresh = self.fresh.lock().expect("fresh lock");
        let Some(q) = fresh.get_mut(target) else {
            return Ok(());
        };
        let delivery = |(id, received_at_ms, body): fresh::ReadAhead| Delivery {
            id: EventId(id),
            due_ms: received_at_ms,
            state: DeliveryState {
                enqueued_ms: received_at_ms,
                ..Default::default()
            },
            fresh: true,
            body: Some(body),
        };
        while due.len() < limit
            && let Some(ahead) = q.ahead.pop_front()
        {
            due.push(delivery(ahead));
        }
        let applied = self.applied.load(Ordering::Acquire);
        if due.len() >= limit || q.is_full() || q.read_to() >= applied {
            return Ok(());
        }
        let start = id_key(EVENT_PREFIX, q.read_to() + 1).to_vec();
        let end = id_key(EVENT_PREFIX, applied).to_vec();
        for item in self.db.range(start..=end) {
            let (key, value) = item?;
            let id = decode_u64(&key[1..]).unwrap_or(0);
            if q.is_busy(id) {
                continue;
            }
            let event = decode_event_record(&key, &value)?;
            if !q.wants(event.event) {
                q.pass(id);
                continue;
            }
            q.take(id);
            // The body without a copy: it stays in sled's buffer for the
            // value (one per value, not the node's).
            let offset = event.body.as_ptr() as usize - value.as_ptr() as usize;
            let range = offset..offset + event.body.len();
            let read = (
                id,
                event.received_at_ms,
                Bytes::from_owner(value).slice(range),
            );
            if due.len() < limit {
                due.push(delivery(read));
            } else {
                q.ahead.push_back(read);
            }
            if q.ahead.len() >= fresh::READ_AHEAD || q.is_full() {
                return Ok(());
            }
        }
        // Everything up to the applied id has been read.
        q.pass(applied);
        Ok(())
    }

    /// How many deliveries `target` has queued (a full scan: for tests and
    /// tools, not for hot paths).
    pub fn queued_count(&self, target: &str) -> usize {
        let fresh = self.fresh_backlog(target, true).map_or(0, |(n, _)| n);
        self.db.scan_prefix(queue_prefix(target)).count() + fresh as usize
    }

    /// The target took the event: the delivery leaves the queue.
    ///
    /// Two single-key removes, not a batch: a sled batch takes a process-wide
    /// write lock that stalls every other reader and writer (the committer
    /// included), and deliveries are frequent. A delivery at its first place
    /// has no `p` entry, and removing a missing key only reads in sled. The
    /// order makes a crash in between harmless: the queue entry goes last,
    /// so at worst the delivery is made once more.
    pub fn delivered(&self, target: &str, delivery: &Delivery) -> Result<(), LogError> {
        if delivery.fresh {
            // Settled in memory; written with the next watermark.
            self.tallies.change(target, -1, 0);
            crashpoint::reached(crashpoint::DELIVERY_HALF_RECORDED);
            self.settle(target, delivery.id);
            return Ok(());
        }
        self.db.remove(pending_key(target, delivery.id))?;
        crashpoint::reached(crashpoint::DELIVERY_HALF_RECORDED);
        self.db
            .remove(queue_key(target, delivery.due_ms, delivery.id))?;
        self.db
            .remove(age_key(target, delivery.state.enqueued_ms, delivery.id))?;
        self.tallies.change(target, -1, 0);
        Ok(())
    }

    /// Moves a delivery to `due_ms` with its new state.
    pub fn reschedule(
        &self,
        target: &str,
        delivery: &Delivery,
        due_ms: u64,
        state: &DeliveryState,
    ) -> Result<(), LogError> {
        // The entry leaves its first place, so it gets its `a` and `p`
        // entries first (setting them again when it already has them
        // writes nothing new). Then the new entry, then the old one goes
        // (single-key writes, see `delivered`): a crash in between leaves
        // two entries, so at worst one extra attempt, never none.
        self.db
            .insert(age_key(target, state.enqueued_ms, delivery.id), &[])?;
        self.db.insert(
            pending_key(target, delivery.id),
            &state.enqueued_ms.to_be_bytes(),
        )?;
        self.db.insert(
            queue_key(target, due_ms, delivery.id),
            record::encode_state(state),
        )?;
        self.explicit_added(target, due_ms);
        crashpoint::reached(crashpoint::RESCHEDULE_HALF_RECORDED);
        if delivery.fresh {
            // It has its queue entry now; the watermark may pass it.
            self.settle(target, delivery.id);
            return Ok(());
        }
        self.db
            .remove(queue_key(target, delivery.due_ms, delivery.id))?;
        Ok(())
    }

    /// Moves a delivery out of the queue into the dead-letter store.
    pub fn bury(&self, delivery: &Delivery, dead: &DeadLetter) -> Result<(), LogError> {
        let target = dead.target.as_str();
        let mut batch = sled::Batch::default();
        if !delivery.fresh {
            batch.remove(&queue_key(target, delivery.due_ms, delivery.id)[..]);
            batch.remove(pending_key(target, delivery.id));
            batch.remove(age_key(target, delivery.state.enqueued_ms, delivery.id));
        }
        batch.insert(dead_key(target, delivery.id), record::encode_dead(dead));
        self.db.apply_batch(batch)?;
        if delivery.fresh {
            self.settle(target, delivery.id);
        }
        self.tallies.change(target, -1, 1);
        Ok(())
    }

    /// Counts `targets`' queues and dead letters once, so that the figures
    /// [`Log::target_stats`] returns are kept up to date from here on. Call
    /// before the committer and dispatchers start.
    ///
    /// After a clean shutdown the counts it saved are used as they are; else
    /// (a crash, a first start, a target added since) the queue is scanned,
    /// about a second per million waiting deliveries.
    pub fn count_backlogs(&self, targets: &[String]) -> Result<(), LogError> {
        let saved = self.saved_counts.lock().expect("saved counts lock").take();
        for target in targets {
            let started = Instant::now();
            let (queued, dead, source) = match saved.as_ref().and_then(|saved| saved.get(target)) {
                Some(&(queued, dead)) => (queued, dead, "saved at the last clean shutdown"),
                None => {
                    self.remove_age_leftovers(target)?;
                    (
                        self.db.scan_prefix(queue_prefix(target)).count() as i64
                            + self.fresh_backlog(target, true)?.0 as i64,
                        self.db.scan_prefix(dead_prefix(target)).count() as i64,
                        "counted in the log",
                    )
                }
            };
            let took_ms = started.elapsed().as_millis() as u64;
            tracing::info!(target = %target, queued, dead, source, took_ms, "backlog");
            self.tallies.set(target, queued, dead);
        }
        Ok(())
    }

    /// Saves `targets`' backlog counts for the next start (see
    /// [`Log::count_backlogs`]) and makes them durable. Call only once
    /// nothing writes to the log any more (clean shutdown, after the
    /// committer and the dispatchers have stopped): any later change would
    /// make them wrong, which is why every open deletes them first.
    pub fn save_backlog_counts(&self, targets: &[String]) -> Result<(), LogError> {
        let counts: Vec<(&str, u64, u64)> = targets
            .iter()
            .map(|target| {
                let (queued, dead) = self.tallies.get(target);
                (target.as_str(), queued, dead)
            })
            .collect();
        self.save_watermarks(true)?;
        self.db
            .insert(META_SAVED_COUNTS, record::encode_counts(&counts))?;
        self.db.flush()?;
        Ok(())
    }

    /// Takes the counts a clean shutdown saved, if any, and deletes them
    /// durably before anything else can change the log (a command run
    /// offline, or this process crashing later, must lead to a recount).
    fn take_saved_counts(&self) -> Result<(), LogError> {
        let Some(value) = self.db.get(META_SAVED_COUNTS)? else {
            return Ok(());
        };
        self.db.remove(META_SAVED_COUNTS)?;
        self.db.flush()?;
        // Unreadable counts are only a lost shortcut: the start counts.
        *self.saved_counts.lock().expect("saved counts lock") = record::decode_counts(&value).ok();
        Ok(())
    }

    /// Backlog figures of `target`: counts kept as the log changes, and the
    /// oldest pending delivery (two key reads): the older of the queue's
    /// first entry and the lowest id among moved deliveries. That is exact
    /// because no entry is due before it was queued: a delivery at its first
    /// place is due when it was queued, so the queue's first entry was
    /// queued no later than any of them.
    pub fn target_stats(&self, target: &str) -> Result<TargetStats, LogError> {
        let (queued, dead) = self.tallies.get(target);
        // The first `p` entry is the oldest moved delivery, unless a replay
        // (which waits from its replay, under an old id) is in front of it:
        // the `a` entries have them in the order of their wait. Both count
        // (a log from before `a` entries has only `p` entries).
        let first_moved = match self.db.scan_prefix(pending_prefix(target)).next() {
            Some(item) => decode_u64(&item?.1),
            None => None,
        };
        let oldest_moved = self.oldest_by_age(target)?;
        let first_queued = match self.db.scan_prefix(queue_prefix(target)).next() {
            Some(item) => {
                let (key, value) = item?;
                let state = record::decode_state(&value).map_err(|reason| LogError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
                Some(state.enqueued_ms)
            }
            None => None,
        };
        let first_fresh = self.fresh_backlog(target, false)?.1;
        let oldest_enqueued_ms = first_moved
            .into_iter()
            .chain(oldest_moved)
            .chain(first_queued)
            .chain(first_fresh)
            .min();
        Ok(TargetStats {
            queued,
            dead,
            oldest_enqueued_ms,
        })
    }

    /// Bytes of the store's data file that sled has freed (pruning) and
    /// reuses before it grows the file.
    pub fn reusable_bytes(&self) -> u64 {
        self.db.reusable_bytes()
    }

    /// The enqueue time of `target`'s first `a` entry whose delivery still
    /// waits (has its `p` entry). One without is skipped, not removed: a
    /// dispatcher may be between writing the two.
    fn oldest_by_age(&self, target: &str) -> Result<Option<u64>, LogError> {
        for entry in self.age_entries(target).take(AGE_SKIPS_PER_READ) {
            let (_, enqueued_ms, waits) = entry?;
            if waits {
                return Ok(Some(enqueued_ms));
            }
        }
        Ok(None)
    }

    /// `target`'s `a` entries in age order: key, enqueue time, and whether
    /// the delivery still waits (has its `p` entry).
    fn age_entries<'a>(
        &'a self,
        target: &'a str,
    ) -> impl Iterator<Item = Result<(sled::IVec, u64, bool), LogError>> + 'a {
        let pending = move |id| self.db.contains_key(pending_key(target, id));
        self.db.scan_prefix(age_prefix(target)).map(move |item| {
            let (key, _) = item?;
            Ok(match parse_queue_key(&key) {
                Some((enqueued_ms, id)) => {
                    let waits = pending(id)?;
                    (key, enqueued_ms, waits)
                }
                None => (key, 0, false),
            })
        })
    }

    /// Removes `target`'s `a` entries that have no `p` entry: what a crash
    /// between the two writes left. Only while nothing else writes.
    fn remove_age_leftovers(&self, target: &str) -> Result<usize, LogError> {
        let mut removed = 0;
        for entry in self.age_entries(target) {
            let (key, _, waits) = entry?;
            if !waits {
                self.db.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Dead letters of `target`, oldest event first.
    pub fn dead_letters(&self, target: &str) -> Result<Vec<DeadLetter>, LogError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(dead_prefix(target)) {
            let (key, value) = item?;
            let id = EventId(decode_u64(&key[key.len() - 8..]).unwrap_or(0));
            let dead =
                record::decode_dead(&value, id, target).map_err(|reason| LogError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
            out.push(dead);
        }
        Ok(out)
    }

    /// Stored events received in `[from_ms, to_ms]`, oldest first. Ids
    /// stand for the receive time (and run ahead of it only under bursts),
    /// so the scan covers just the ids of that time, in either id layout
    /// ([`crate::node::id_ranges`]), plus a margin.
    pub fn events_between(
        &self,
        from_ms: u64,
        to_ms: u64,
    ) -> impl DoubleEndedIterator<Item = Result<StoredEvent, LogError>> + '_ {
        // Ids ran further ahead of the clock once (it was set back): the
        // scan widens by that much too.
        let margin = ID_CLOCK_MARGIN_MS.max(self.id_lead_ms().unwrap_or(0).saturating_add(1));
        crate::node::id_ranges(from_ms, to_ms.saturating_add(margin))
            .into_iter()
            .filter(|(start, end)| start <= end)
            .flat_map(|(start, end)| {
                self.db
                    .range(id_key(EVENT_PREFIX, start)..=id_key(EVENT_PREFIX, end))
            })
            .map(|item| {
                let (key, value) = item?;
                decode_event(&key, &value)
            })
            .filter(move |event| match event {
                Ok(e) => e.received_at_ms >= from_ms && e.received_at_ms <= to_ms,
                Err(_) => true,
            })
    }

    /// Whether `target` has a delivery of `id` waiting: moved (a `p`
    /// entry) or at its first place (see the module docs).
    pub fn is_queued(&self, target: &str, id: EventId) -> Result<bool, LogError> {
        if self.db.contains_key(pending_key(target, id))? {
            return Ok(true);
        }
        let key = id_key(EVENT_PREFIX, id.0);
        match self.db.get(key)? {
            Some(value) => Ok(self.waits_fresh(target, id, &key, &value)?
                || self.waits_at_first_place(target, received_at(&key, &value)?, id)?),
            None => Ok(false),
        }
    }

    /// Whether the delivery to `target` of event `id`, received at
    /// `received_at_ms`, is still at its first place in the queue.
    fn waits_at_first_place(
        &self,
        target: &str,
        received_at_ms: u64,
        id: EventId,
    ) -> Result<bool, LogError> {
        Ok(self
            .db
            .contains_key(queue_key(target, received_at_ms, id))?)
    }

    /// The dead letter of `id` at `target`, if there is one.
    pub fn dead_letter(&self, target: &str, id: EventId) -> Result<Option<DeadLetter>, LogError> {
        let key = dead_key(target, id);
        match self.db.get(&key)? {
            Some(value) => record::decode_dead(&value, id, target)
                .map(Some)
                .map_err(|reason| LogError::Corrupt { key, reason }),
            None => Ok(None),
        }
    }

    /// Queues `ids` for `target` again, the first due at `first_due_ms` and
    /// each next one `spacing_ms` later. Attempt counts start afresh; a dead
    /// letter of the same event at the target is replaced by the new
    /// delivery. Events already waiting at the target, and ids with no
    /// stored event, are skipped. Returns how many were queued.
    pub fn enqueue(
        &self,
        target: &str,
        ids: &[EventId],
        first_due_ms: u64,
        spacing_ms: u64,
    ) -> Result<usize, LogError> {
        // Not in the middle of a pruning step (see `prune_step`).
        let _step = self.prune_step.lock().expect("prune lock");
        let now_ms = crate::clock::now_ms();
        let mut batch = sled::Batch::default();
        let (mut queued, mut revived) = (0i64, 0i64);
        // An id named twice is queued once: the batch is not applied yet, so
        // `is_queued` cannot see the first copy, and counting both drifted
        // the backlog and dead-letter tallies (and, spaced, sent it twice).
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                continue;
            }
            if self.is_queued(target, id)? || !self.db.contains_key(id_key(EVENT_PREFIX, id.0))? {
                continue;
            }
            let due_ms = first_due_ms.saturating_add(spacing_ms.saturating_mul(queued as u64));
            let state = DeliveryState {
                enqueued_ms: now_ms,
                ..Default::default()
            };
            batch.insert(queue_key(target, due_ms, id), record::encode_state(&state));
            batch.insert(pending_key(target, id), &now_ms.to_be_bytes());
            batch.insert(age_key(target, now_ms, id), &[]);
            if self.db.contains_key(dead_key(target, id))? {
                batch.remove(dead_key(target, id));
                revived += 1;
            }
            queued += 1;
        }
        self.db.apply_batch(batch)?;
        if queued > 0 {
            self.explicit_added(target, first_due_ms);
        }
        self.tallies.change(target, queued, -revived);
        Ok(queued as usize)
    }

    /// Every dead letter, of every target that has any, by target then id.
    pub fn all_dead_letters(&self) -> Result<Vec<DeadLetter>, LogError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([DEAD_PREFIX]) {
            let (key, value) = item?;
            let corrupt = |reason| LogError::Corrupt {
                key: key.to_vec(),
                reason,
            };
            let (target, id) =
                parse_target_key(&key).ok_or(corrupt(record::DecodeError::Truncated))?;
            out.push(record::decode_dead(&value, id, target).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Removes dead letters for good. Returns how many were removed.
    pub fn purge_dead_letters(&self, letters: &[(String, EventId)]) -> Result<usize, LogError> {
        let mut batch = sled::Batch::default();
        let mut removed = Vec::new();
        // A letter named twice is removed, and counted, once.
        let letters: std::collections::BTreeSet<_> = letters.iter().collect();
        for (target, id) in letters {
            if self.db.contains_key(dead_key(target, *id))? {
                batch.remove(dead_key(target, *id));
                removed.push(target);
            }
        }
        self.db.apply_batch(batch)?;
        // Counted once they are gone: a batch that fails changes nothing.
        for target in &removed {
            self.tallies.change(target, 0, -1);
        }
        Ok(removed.len())
    }

    /// Drops everything the log holds for `target`, a target no dispatcher
    /// serves (one removed from the configuration): its waiting deliveries
    /// (queue, moved and age entries, and its watermark with the events
    /// waiting above it) and its dead letters. Its events stay until
    /// retention prunes them, which nothing holds back any more. Returns how
    /// many waiting deliveries and dead letters were dropped. Interrupted,
    /// it leaves a part of them, which running it again drops: the queue
    /// entries, by which [`Log::targets_in_log`] finds the target, go last
    /// but the watermark (sled recovers a prefix of its writes).
    pub fn forget_target(&self, target: &str) -> Result<(u64, u64), LogError> {
        // Not in the middle of a pruning step or a replay (see `prune_step`).
        let _step = self.prune_step.lock().expect("prune lock");
        let (mut waiting, _) = self.fresh_backlog(target, true)?;
        let mut dead = 0;
        for prefix in [AGE_PREFIX, PENDING_PREFIX, DEAD_PREFIX, QUEUE_PREFIX] {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for item in self.db.scan_prefix(target_prefix(prefix, target)) {
                let (key, _) = item?;
                batch.remove(key);
                match prefix {
                    QUEUE_PREFIX => waiting += 1,
                    DEAD_PREFIX => dead += 1,
                    _ => {}
                }
                in_batch += 1;
                if in_batch == FORGET_BATCH {
                    self.db.apply_batch(std::mem::take(&mut batch))?;
                    in_batch = 0;
                }
            }
            self.db.apply_batch(batch)?;
        }
        self.db.remove(target_prefix(WATERMARK_PREFIX, target))?;
        self.fresh.lock().expect("fresh lock").remove(target);
        self.tallies.set(target, 0, 0);
        tracing::info!(target = %target, waiting, dead_letters = dead, "forgot a target no longer configured");
        Ok((waiting, dead))
    }

    /// Whether `target` has a stored watermark: it was configured when the
    /// relay last started (a start removes the watermark of a target it
    /// does not configure).
    pub fn has_watermark(&self, target: &str) -> Result<bool, LogError> {
        Ok(self
            .db
            .contains_key(target_prefix(WATERMARK_PREFIX, target))?)
    }

    /// Names of every target that has a waiting delivery or a dead letter
    /// in the log, configured or not (one seek per name, not a scan).
    pub fn targets_in_log(&self) -> Result<std::collections::BTreeSet<String>, LogError> {
        let mut names = std::collections::BTreeSet::new();
        for prefix in [QUEUE_PREFIX, DEAD_PREFIX, WATERMARK_PREFIX] {
            let mut from = vec![prefix];
            while let Some(item) = self.db.range(from.clone()..vec![prefix + 1]).next() {
                let (key, _) = item?;
                let Some(end) = key[1..].iter().position(|&b| b == 0) else {
                    break;
                };
                let name = &key[1..1 + end];
                names.insert(String::from_utf8_lossy(name).into_owned());
                from = target_prefix(prefix, &String::from_utf8_lossy(name));
                *from.last_mut().expect("separator") = 1;
            }
        }
        Ok(names)
    }

    /// Looks at up to `limit` events received before `cutoff_ms`, starting
    /// after `after`, and deletes, in one batch, those that none of
    /// `targets` still waits for or holds as a dead letter. Returns how many
    /// were looked at and deleted, and the last id looked at (to resume
    /// from); fewer than `limit` looked at means the pass is complete.
    pub fn prune_before(
        &self,
        cutoff_ms: u64,
        after: Option<EventId>,
        limit: usize,
        targets: &[String],
    ) -> Result<PruneStep, LogError> {
        // Ids never stand for a time before their receive time, so every id
        // below the cutoff's first was received before the cutoff; ids of
        // the earlier layout are all below it, and their record says when
        // they were received ([`crate::node`]).
        let end = id_key(EVENT_PREFIX, crate::node::first_id_at(cutoff_ms)).to_vec();
        let start = match after {
            Some(id) => Bound::Excluded(id_key(EVENT_PREFIX, id.0).to_vec()),
            None => Bound::Included(vec![EVENT_PREFIX]),
        };
        // No event leaves the dead letters for the queue (nor is replayed)
        // between this step's checks and its deletes (see `prune_step`).
        let _step = self.prune_step.lock().expect("prune lock");
        let mut batch = sled::Batch::default();
        let mut step = PruneStep::default();
        for item in self.db.range::<Vec<u8>, _>((start, Bound::Excluded(end))) {
            let (key, value) = item?;
            let Some(id) = decode_u64(&key[1..]).map(EventId) else {
                continue;
            };
            step.examined += 1;
            step.last = Some(id);
            // A record that cannot be read is kept (it may still be waited
            // for), and does not stop the pass.
            let received_at_ms = received_at(&key, &value);
            if received_at_ms.as_ref().is_ok_and(|&ms| ms >= cutoff_ms) {
                continue;
            }
            let mut kept = false;
            for target in targets {
                let waits = match received_at_ms {
                    Ok(received_at_ms) => {
                        self.waits_fresh(target, id, &key, &value)?
                            || self.waits_at_first_place(target, received_at_ms, id)?
                            || self.db.contains_key(pending_key(target, id))?
                            || self.db.contains_key(dead_key(target, id))?
                    }
                    Err(_) => true,
                };
                if waits {
                    kept = true;
                    break;
                }
            }
            if !kept {
                batch.remove(key);
                step.deleted += 1;
            }
            if step.examined >= limit {
                break;
            }
        }
        self.db.apply_batch(batch)?;
        Ok(step)
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.db.size_on_disk()?)
    }
}

/// The receive time in the event record `value` stored at `key`.
fn received_at(key: &[u8], value: &[u8]) -> Result<u64, LogError> {
    decode_event_record(key, value).map(|r| r.received_at_ms)
}

fn decode_event_record<'a>(
    key: &[u8],
    value: &'a [u8],
) -> Result<record::EventRecord<'a>, LogError> {
    record::decode_event(value).map_err(|reason| LogError::Corrupt {
        key: key.to_vec(),
        reason,
    })
}

fn decode_event(key: &[u8], value: &[u8]) -> Result<StoredEvent, LogError> {
    let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
    let r = record::decode_event(value).map_err(|reason| LogError::Corrupt {
        key: key.to_vec(),
        reason,
    })?;
    Ok(StoredEvent {
        id,
        received_at_ms: r.received_at_ms,
        event: r.event.to_owned(),
        body: r.body.to_vec(),
    })
}

fn id_key(prefix: u8, id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

fn queue_prefix(target: &str) -> Vec<u8> {
    target_prefix(QUEUE_PREFIX, target)
}

fn queue_key(target: &str, due_ms: u64, id: EventId) -> Vec<u8> {
    timed_key(QUEUE_PREFIX, target, due_ms, id)
}

/// `prefix` + target + 0 + a time in ms + id: a key family in time order.
fn timed_key(prefix: u8, target: &str, ms: u64, id: EventId) -> Vec<u8> {
    let mut key = target_prefix(prefix, target);
    key.extend_from_slice(&ms.to_be_bytes());
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

fn parse_queue_key(key: &[u8]) -> Option<(u64, EventId)> {
    let tail = key.get(key.len().checked_sub(16)?..)?;
    Some((decode_u64(&tail[..8])?, EventId(decode_u64(&tail[8..])?)))
}

/// `prefix` + target + 0: the start of one target's range of a key family.
fn target_prefix(prefix: u8, target: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(target.len() + 18);
    key.push(prefix);
    key.extend_from_slice(target.as_bytes());
    key.push(0);
    key
}

fn age_prefix(target: &str) -> Vec<u8> {
    target_prefix(AGE_PREFIX, target)
}

/// Laid out as a queue key, so [`parse_queue_key`] reads it.
fn age_key(target: &str, enqueued_ms: u64, id: EventId) -> Vec<u8> {
    timed_key(AGE_PREFIX, target, enqueued_ms, id)
}

fn pending_prefix(target: &str) -> Vec<u8> {
    target_prefix(PENDING_PREFIX, target)
}

fn pending_key(target: &str, id: EventId) -> Vec<u8> {
    let mut key = pending_prefix(target);
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

fn dead_prefix(target: &str) -> Vec<u8> {
    target_prefix(DEAD_PREFIX, target)
}

fn dead_key(target: &str, id: EventId) -> Vec<u8> {
    let mut key = dead_prefix(target);
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// Splits a `prefix + target + 0 + id` key.
fn parse_target_key(key: &[u8]) -> Option<(&str, EventId)> {
    let rest = key.get(1..)?;
    let split = rest.len().checked_sub(9)?;
    if rest[split] != 0 {
        return None;
    }
    let target = std::str::from_utf8(&rest[..split]).ok()?;
    Some((target, EventId(decode_u64(&rest[split + 1..])?)))
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Sends entries to the committer and waits for them to be durable.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Message>,
}

impl Committer {
    /// Stores `entry` and returns its id once it is on disk (flushed and
    /// fsynced). A caller that stops waiting must not assume either outcome:
    /// the entry may still become durable.
    pub async fn append(&self, entry: Entry) -> Result<EventId, CommitError> {
        self.submit(entry).await?.await
    }

    /// Queues `entry` for the committer (waiting while its queue is full)
    /// and returns what [`Committer::append`] would then wait for. Dropped
    /// before it returns, the entry is not queued and never stored.
    pub async fn submit(&self, entry: Entry) -> Result<Pending, CommitError> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            entry,
            received: SystemTime::now(),
            reply,
        };
        self.tx
            .send(Message::Append(request))
            .await
            .map_err(|_| CommitError::Closed)?;
        Ok(Pending(answer))
    }
}

/// A queued entry's outcome: its id once it is durable. Dropping it does
/// not withdraw the entry.
pub struct Pending(oneshot::Receiver<Result<EventId, CommitError>>);

impl std::future::Future for Pending {
    type Output = Result<EventId, CommitError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(CommitError::Closed)))
    }
}

/// Owns the committer thread; [`CommitterHandle::close`] ends it.
pub struct CommitterHandle {
    tx: mpsc::Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Makes the committer count and wake for `subscriptions` from its
    /// next commit on (a reload changed the targets). Returns the last id
    /// committed before the change: every event above it is for the new
    /// targets.
    pub async fn resubscribe(&self, subscriptions: Vec<Subscription>) -> Result<u64, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Resubscribe(subscriptions, reply))
            .await
            .map_err(|_| CommitError::Closed)?;
        answer.await.map_err(|_| CommitError::Closed)
    }
}

impl CommitterHandle {
    /// Commits everything already queued, makes it durable, and stops the
    /// thread. Appends after this fail with [`CommitError::Closed`].
    pub async fn close(mut self) {
        let _ = self.tx.send(Message::Close).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

enum Message {
    Append(Request),
    /// From the next commit on, count and wake for these targets (a
    /// reload); answers the last id committed under the old ones.
    Resubscribe(Vec<Subscription>, oneshot::Sender<u64>),
    Close,
}

struct Request {
    entry: Entry,
    received: SystemTime,
    reply: oneshot::Sender<Result<EventId, CommitError>>,
}

/// Everything the committer thread owns: it assigns ids, appends each
/// group commit to the write-ahead log, answers, and hands the sled writes
/// to the apply thread.
struct CommitState {
    wal: Wal,
    apply_tx: std::sync::mpsc::SyncSender<ApplyJob>,
    applier: Option<JoinHandle<()>>,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    last_id: u64,
    /// Mixed into every id, so that no other relay issues the same.
    node: crate::node::NodeId,
    /// See [`META_ID_LEAD`].
    id_lead_ms: u64,
    /// Key and size of each quarantined body, oldest first (bounded by the
    /// quarantine limits, so it never grows with traffic).
    quarantine: VecDeque<(sled::IVec, u64)>,
    quarantine_max_events: usize,
    quarantine_max_bytes: u64,
    subscriptions: Vec<Subscription>,
    /// Per subscription: the target takes new events from above its
    /// watermark, so a new event gets no queue entry for it.
    implicit: Vec<bool>,
    metrics: Arc<Metrics>,
    health: Arc<CommitHealth>,
}

/// What the apply thread does, in the order the committer asks.
enum ApplyJob {
    /// Put a group commit (already in the write-ahead log) into sled.
    Batch {
        batch: Writes,
        enqueued: Vec<i64>,
        /// The group's highest id.
        through: u64,
    },
    /// Make sled durable, then delete the write-ahead log's segments up to
    /// `through_seq`: every batch they hold was sent before this job.
    Checkpoint { through_seq: u64 },
    /// The batches after this one were counted for these targets.
    Resubscribe(Vec<Subscription>),
}

/// The sled writes of a group commit, in order (a `sled::Batch` cannot be
/// merged with another; this can).
#[derive(Default)]
struct Writes(Vec<(sled::IVec, Option<sled::IVec>)>);

impl Writes {
    fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.0.push((key.into(), Some(value.into())));
    }

    fn remove(&mut self, key: impl Into<sled::IVec>) {
        self.0.push((key.into(), None));
    }

    /// A new event's delivery to `target`: its queue entry at its first
    /// place (see the module docs), the write a commit and a replay of the
    /// write-ahead log share.
    fn queue_new(&mut self, target: &str, received_at_ms: u64, id: EventId, state: &sled::IVec) {
        self.insert(queue_key(target, received_at_ms, id), state.clone());
    }

    /// Writes them one key at a time, in order (see [`ApplyState::apply`]).
    fn apply_to(self, db: &sled::Db) -> sled::Result<()> {
        for (key, value) in self.0 {
            let event = key.first() == Some(&EVENT_PREFIX);
            match value {
                Some(value) => db.insert(key, value).map(drop)?,
                None => db.remove(key).map(drop)?,
            }
            if event && crashpoint::hits(crashpoint::APPLY_PARTIAL) {
                db.flush()?;
                crashpoint::crash(crashpoint::APPLY_PARTIAL);
            }
        }
        Ok(())
    }

    fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in self.0 {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch
    }
}

/// The state a new delivery starts with, encoded once per event.
fn new_delivery_state(received_at_ms: u64) -> sled::IVec {
    record::encode_state(&DeliveryState {
        enqueued_ms: received_at_ms,
        ..Default::default()
    })
    .into()
}

/// Everything the apply thread owns.
struct ApplyState {
    db: sled::Db,
    dir: PathBuf,
    data_file: File,
    /// sled failed to apply a commit that was acknowledged: the
    /// write-ahead log must be kept until a restart replays it.
    sled_missing_commits: bool,
    /// An fsync failed: what it covered may never reach the disk, although
    /// a later fsync of the same file reports success (Linux drops the
    /// failed pages' dirty state). The write-ahead log is kept until a
    /// restart replays it, as after `sled_missing_commits`.
    sync_failed: bool,
    /// When the last checkpoint began: sled blob files written since then
    /// are fsynced by the next one.
    last_checkpoint_wall: SystemTime,
    subscriptions: Vec<Subscription>,
    metrics: Arc<Metrics>,
    health: Arc<CommitHealth>,
    tallies: Arc<Tallies>,
    /// See [`Log::applied`].
    applied: Arc<AtomicU64>,
}

impl CommitState {
    fn run(&mut self, mut rx: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closing = false;
        while !closing {
            let mut resubscribe = None;
            match rx.blocking_recv() {
                Some(Message::Append(request)) => batch.push(request),
                Some(Message::Resubscribe(to, reply)) => resubscribe = Some((to, reply)),
                Some(Message::Close) | None => closing = true,
            }
            // Everything that queued up while the last commit ran joins this
            // one, up to a change of targets: what came before it is
            // committed for the old ones.
            while batch.len() < MAX_BATCH && resubscribe.is_none() {
                match rx.try_recv() {
                    Ok(Message::Append(request)) => batch.push(request),
                    Ok(Message::Resubscribe(to, reply)) => resubscribe = Some((to, reply)),
                    Ok(Message::Close) => closing = true,
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if let Some((subscriptions, reply)) = resubscribe {
                self.resubscribe(subscriptions);
                let _ = reply.send(self.last_id);
            }
        }
        // Requests still queued behind Close were sent after shutdown began.
        rx.close();
        while let Ok(message) = rx.try_recv() {
            if let Message::Append(request) = message {
                let _ = request.reply.send(Err(CommitError::Closed));
            }
        }
        self.request_checkpoint();
        // The apply thread finishes its queue, checkpoints, and stops.
        let (tx, _) = std::sync::mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.apply_tx, tx));
        if let Some(applier) = self.applier.take() {
            let _ = applier.join();
        }
    }

    fn commit(&mut self, requests: &mut Vec<Request>) {
        let started = Instant::now();
        let mut batch = Writes::default();
        let mut frame = Frame::new();
        let mut ids = Vec::with_capacity(requests.len());
        let mut enqueued = vec![0i64; self.subscriptions.len()];
        for request in requests.iter() {
            let received_at_ms = crate::clock::ms_since_epoch(request.received);
            self.last_id = crate::node::next_id(self.last_id, received_at_ms, self.node);
            let id = self.last_id;
            let lead_ms = crate::node::id_ms(id).saturating_sub(received_at_ms);
            if lead_ms > self.id_lead_ms.max(ID_CLOCK_MARGIN_MS) {
                self.id_lead_ms = lead_ms;
                batch.insert(META_ID_LEAD, &lead_ms.to_be_bytes());
            }
            match &request.entry {
                Entry::Event { event, body } => {
                    let value = sled::IVec::from(record::encode_event(received_at_ms, event, body));
                    let subscribed = self.subscriptions.iter().filter(|s| s.wants(event));
                    frame.push(
                        wal::KIND_EVENT,
                        id,
                        &value,
                        subscribed.map(|s| s.target.as_str()),
                    );
                    batch.insert(&id_key(EVENT_PREFIX, id), value);
                    let state = new_delivery_state(received_at_ms);
                    for (n, subscription) in self.subscriptions.iter().enumerate() {
                        if !subscription.wants(event) {
                            continue;
                        }
                        // An adopted target reads it above its watermark.
                        if !self.implicit[n] {
                            batch.queue_new(
                                &subscription.target,
                                received_at_ms,
                                EventId(id),
                                &state,
                            );
                        }
                        enqueued[n] += 1;
                    }
                }
                Entry::Quarantine { reason, body } => {
                    let value = record::encode_quarantine(received_at_ms, reason, body);
                    frame.push(wal::KIND_QUARANTINE, id, &value, []);
                    let key = sled::IVec::from(&id_key(QUARANTINE_PREFIX, id));
                    self.quarantine.push_back((key.clone(), value.len() as u64));
                    batch.insert(key, value);
                    self.evict_quarantine(&mut batch);
                }
            }
            ids.push(EventId(id));
        }
        batch.insert(META_LAST_ID, &self.last_id.to_be_bytes());

        self.health.begin();
        let logged = self.wal.append(&mut frame);
        self.health.end();
        let metrics = &self.metrics;
        metrics.commit_batch_size.observe(requests.len() as f64);
        if let Err(err) = logged {
            metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.commit_failures.inc();
            if !self.health.failing.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %err, "log commit failed (write-ahead log); answering 503 until it recovers");
            }
            for request in requests.drain(..) {
                let _ = request.reply.send(Err(CommitError::Failed));
            }
            return;
        }
        // Durable: the write-ahead log has it. The senders hear so now; sled
        // gets it right after (its apply costs tens of µs that no ack waits
        // for), and until a checkpoint the write-ahead log stands for it.
        metrics.fsyncs.inc();
        metrics.commits.inc();
        crashpoint::reached(crashpoint::COMMIT_LOGGED);
        if self.health.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("log commits succeed again");
        }
        for (request, id) in requests.drain(..).zip(ids) {
            if matches!(request.entry, Entry::Quarantine { .. }) {
                metrics.quarantined.inc();
            }
            let _ = request.reply.send(Ok(id));
        }
        metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        if crashpoint::hits(crashpoint::COMMIT_ACKNOWLEDGED) {
            // Let the 200s reach the senders before dying.
            std::thread::sleep(Duration::from_millis(50));
            crashpoint::crash(crashpoint::COMMIT_ACKNOWLEDGED);
        }
        // A full queue (sled far behind) holds the committer back here:
        // senders then feel it as commit time, never as a lost event.
        let _ = self.apply_tx.send(ApplyJob::Batch {
            batch,
            enqueued,
            through: self.last_id,
        });
        if self.last_checkpoint.elapsed() >= self.checkpoint_interval
            || self.wal.len() >= CHECKPOINT_WAL_BYTES
        {
            self.request_checkpoint();
        }
    }

    /// Every target a running relay delivers to takes new events from
    /// above its watermark (see [`Log::add_target`]): none gets queue
    /// entries from a commit.
    fn resubscribe(&mut self, subscriptions: Vec<Subscription>) {
        self.implicit = vec![true; subscriptions.len()];
        self.subscriptions = subscriptions.clone();
        let _ = self.apply_tx.send(ApplyJob::Resubscribe(subscriptions));
    }

    /// Starts a new write-ahead log segment and asks the apply thread for a
    /// checkpoint covering the older ones.
    fn request_checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        if self.wal.is_empty() {
            return;
        }
        match self.wal.rotate() {
            Ok(through_seq) => {
                let _ = self.apply_tx.send(ApplyJob::Checkpoint { through_seq });
            }
            Err(err) => {
                self.metrics.commit_failures.inc();
                self.health
                    .checkpoint_failing
                    .store(true, Ordering::Relaxed);
                tracing::error!(error = %err, "cannot start a new write-ahead log segment; will try again");
            }
        }
    }

    /// Drops the oldest quarantined bodies beyond the limits.
    fn evict_quarantine(&mut self, batch: &mut Writes) {
        let mut total: u64 = self.quarantine.iter().map(|(_, size)| size).sum();
        while self.quarantine.len() > self.quarantine_max_events
            || (total > self.quarantine_max_bytes && self.quarantine.len() > 1)
        {
            let Some((key, size)) = self.quarantine.pop_front() else {
                break;
            };
            total -= size;
            batch.remove(key);
        }
    }
}

impl ApplyState {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<ApplyJob>) {
        let mut next = None;
        loop {
            let job = match next.take() {
                Some(job) => job,
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
            };
            self.health.begin_apply();
            match job {
                ApplyJob::Batch {
                    mut batch,
                    mut enqueued,
                    mut through,
                } => {
                    // Every group commit waiting is applied in one go.
                    while let Ok(job) = rx.try_recv() {
                        match job {
                            ApplyJob::Batch {
                                batch: more,
                                enqueued: added,
                                through: more_through,
                            } => {
                                batch.0.extend(more.0);
                                through = through.max(more_through);
                                for (total, n) in enqueued.iter_mut().zip(added) {
                                    *total += n;
                                }
                            }
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    self.apply(batch, enqueued, through);
                }
                ApplyJob::Checkpoint { through_seq } => self.checkpoint(through_seq),
                ApplyJob::Resubscribe(subscriptions) => self.subscriptions = subscriptions,
            }
            self.health.end_apply();
        }
    }

    /// Puts acknowledged commits into sled, key by key and in commit order.
    ///
    /// Not as a sled batch: sled 0.34 seals and writes its log buffer
    /// before and after every batch (`pin_log`), each write ending in a
    /// `sync_file_range(WAIT)`, so one batch per group commit doubled the
    /// relay's trips to the disk and woke sled's writer threads every
    /// commit. Single-key writes fill sled's buffer instead, written when
    /// full or by its flusher. Atomicity is not needed: sled recovers a
    /// prefix of its writes, each group commit's `m/last_id` comes after
    /// the group's own writes, and opening the log replays every
    /// write-ahead log frame above that id, so a group cut short by a crash
    /// is written again whole (the same keys, the same values).
    fn apply(&mut self, writes: Writes, enqueued: Vec<i64>, through: u64) {
        match writes.apply_to(&self.db) {
            Ok(()) => {
                self.applied.fetch_max(through, Ordering::Release);
                for (subscription, added) in self.subscriptions.iter().zip(enqueued) {
                    if added > 0 {
                        self.tallies.change(&subscription.target, added, 0);
                        subscription.wake.notify_one();
                    }
                }
            }
            Err(err) => {
                // Acknowledged and in the write-ahead log, but not in sled:
                // no checkpoint may delete that log now. The relay restarts
                // itself (checkpoints keep failing) and replays it.
                self.sled_missing_commits = true;
                self.metrics.commit_failures.inc();
                self.health
                    .checkpoint_failing
                    .store(true, Ordering::Relaxed);
                tracing::error!(error = %err, "sled rejected an acknowledged commit; it is kept in the write-ahead log until a restart replays it");
            }
        }
    }

    fn checkpoint(&mut self, through_seq: u64) {
        match self.make_durable(through_seq) {
            Ok(()) => {
                self.metrics.checkpoints.inc();
                if self
                    .health
                    .checkpoint_failing
                    .swap(false, Ordering::Relaxed)
                {
                    tracing::info!("log checkpoints succeed again");
                }
            }
            Err(err) => {
                // The write-ahead log keeps everything meanwhile and commits
                // go on; the next checkpoint tries again, and the relay
                // restarts itself if they keep failing.
                self.metrics.commit_failures.inc();
                if !self.health.checkpoint_failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %err, "log checkpoint failed; will try again");
                }
            }
        }
    }

    /// Makes sled itself durable (its flush, out of its buffers, survives
    /// `kill -9`; the fdatasync of its data file and of the blob files
    /// written since the last checkpoint survives a power cut), then deletes
    /// the write-ahead log segments it made redundant.
    fn make_durable(&mut self, through_seq: u64) -> Result<(), String> {
        if self.sled_missing_commits {
            return Err(
                "sled is missing acknowledged commits that only the write-ahead log holds; \
                 a restart replays them"
                    .to_owned(),
            );
        }
        if self.sync_failed {
            return Err(
                "an fsync failed earlier, so sled may lack what it covered even if a later one \
                 succeeds; the write-ahead log is kept until a restart replays it"
                    .to_owned(),
            );
        }
        let started = SystemTime::now();
        // Everything through `through` is in sled (the apply thread runs
        // this between commits), large events' blob files written already.
        let through = self.applied.load(Ordering::Acquire);
        self.db.flush().map_err(|e| format!("sled flush: {e}"))?;
        crashpoint::reached(crashpoint::CHECKPOINT_FLUSHED);
        let synced = if crashpoint::fails(crashpoint::CHECKPOINT_SYNC) {
            Err(std::io::Error::other("injected by LEADFLO_RELAY_FAIL_AT"))
        } else {
            self.data_file.sync_data()
        };
        synced.map_err(|e| {
            self.sync_failed = true;
            format!("fdatasync of the log: {e}")
        })?;
        sync_recent_blobs(&self.dir, self.last_checkpoint_wall).map_err(|e| {
            self.sync_failed = true;
            format!("fsync of sled blobs: {e}")
        })?;
        // Only now, with everything through it synced, the mark: sled makes
        // it durable with its next write-out (it need not be yet: frames
        // above an older mark are only written again), and it never claims
        // what a failed sync may have lost.
        self.db
            .insert(META_DURABLE_ID, &through.to_be_bytes())
            .map_err(|e| format!("sled write of the checkpoint mark: {e}"))?;
        self.last_checkpoint_wall = started;
        wal::remove_through(&self.dir, through_seq)
            .map_err(|e| format!("deleting old write-ahead log segments: {e}"))?;
        if let Err(err) = wal::prepare_spare(&self.dir) {
            // Only a speed-up: segments then grow as they are written.
            tracing::debug!(error = %err, "no spare write-ahead log segment");
            let _ = std::fs::remove_file(self.dir.join(wal::SPARE_PREP_NAME));
        }
        Ok(())
    }
}

/// Fsyncs sled's blob files written since `since` (minus a margin for clock
/// granularity) and the blob directory itself, so their names survive too.
fn sync_recent_blobs(dir: &Path, since: SystemTime) -> std::io::Result<()> {
    let blobs = dir.join("blobs");
    let cutoff = since
        .checked_sub(Duration::from_secs(2))
        .unwrap_or(UNIX_EPOCH);
    let entries = match std::fs::read_dir(&blobs) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let modified = entry.metadata()?.modified()?;
        if modified >= cutoff {
            match File::open(entry.path()) {
                Ok(file) => file.sync_data()?,
                // sled may have garbage-collected it meanwhile.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
    }
    File::open(&blobs)?.sync_all()
}

/// The byte encoding of stored records. Pure functions, no I/O.
///
/// Event (version 1):
/// `[1u8][received_at_ms: u64 BE][event_len: u8][event: utf-8][body...]`
///
/// Quarantine (version 1):
/// `[1u8][received_at_ms: u64 BE][reason_len: u16 BE][reason: utf-8][body...]`
pub mod record {
    const VERSION: u8 = 1;

    /// The longest event type a record can hold.
    pub const MAX_EVENT_LEN: usize = u8::MAX as usize;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
    pub enum DecodeError {
        #[error("record is truncated")]
        Truncated,
        #[error("unknown record version {0}")]
        Version(u8),
        #[error("text field is not UTF-8")]
        NotUtf8,
    }

    #[derive(Debug, PartialEq, Eq)]
    pub struct EventRecord<'a> {
        pub received_at_ms: u64,
        pub event: &'a str,
        pub body: &'a [u8],
    }

    #[derive(Debug, PartialEq, Eq)]
    pub struct QuarantineRecord<'a> {
        pub received_at_ms: u64,
        pub reason: &'a str,
        pub body: &'a [u8],
    }

    /// Encodes an event. `event` longer than [`MAX_EVENT_LEN`] bytes is cut
    /// at a character boundary (ingest refuses such events before this).
    pub fn encode_event(received_at_ms: u64, event: &str, body: &[u8]) -> Vec<u8> {
        let event = truncate_utf8(event, MAX_EVENT_LEN);
        let mut out = Vec::with_capacity(10 + event.len() + body.len());
        out.push(VERSION);
        out.extend_from_slice(&received_at_ms.to_be_bytes());
        out.push(event.len() as u8);
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(body);
        out
    }

    pub fn decode_event(bytes: &[u8]) -> Result<EventRecord<'_>, DecodeError> {
        let (received_at_ms, rest) = header(bytes)?;
        let (&len, rest) = rest.split_first().ok_or(DecodeError::Truncated)?;
        let (event, body) = split_text(rest, len as usize)?;
        Ok(EventRecord {
            received_at_ms,
            event,
            body,
        })
    }

    pub fn encode_quarantine(received_at_ms: u64, reason: &str, body: &[u8]) -> Vec<u8> {
        let reason = truncate_utf8(reason, u16::MAX as usize);
        let mut out = Vec::with_capacity(11 + reason.len() + body.len());
        out.push(VERSION);
        out.extend_from_slice(&received_at_ms.to_be_bytes());
        out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(body);
        out
    }

    pub fn decode_quarantine(bytes: &[u8]) -> Result<QuarantineRecord<'_>, DecodeError> {
        let (received_at_ms, rest) = header(bytes)?;
        if rest.len() < 2 {
            return Err(DecodeError::Truncated);
        }
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let (reason, body) = split_text(&rest[2..], len)?;
        Ok(QuarantineRecord {
            received_at_ms,
            reason,
            body,
        })
    }

    /// Delivery state (version 1): `[1u8][attempts u32][enqueued_ms u64]
    /// [first_attempt_ms u64][last_attempt_ms u64][last_status u16][last_error...]`
    pub fn encode_state(state: &super::DeliveryState) -> Vec<u8> {
        let error = truncate_utf8(&state.last_error, 1024);
        let mut out = Vec::with_capacity(31 + error.len());
        out.push(VERSION);
        out.extend_from_slice(&state.attempts.to_be_bytes());
        out.extend_from_slice(&state.enqueued_ms.to_be_bytes());
        out.extend_from_slice(&state.first_attempt_ms.to_be_bytes());
        out.extend_from_slice(&state.last_attempt_ms.to_be_bytes());
        out.extend_from_slice(&state.last_status.to_be_bytes());
        out.extend_from_slice(error.as_bytes());
        out
    }

    pub fn decode_state(bytes: &[u8]) -> Result<super::DeliveryState, DecodeError> {
        let mut r = Reader::versioned(bytes)?;
        Ok(super::DeliveryState {
            attempts: r.u32()?,
            enqueued_ms: r.u64()?,
            first_attempt_ms: r.u64()?,
            last_attempt_ms: r.u64()?,
            last_status: r.u16()?,
            last_error: r.rest_text()?.to_owned(),
        })
    }

    /// Dead letter (version 1): `[1u8][attempts u32][last_status u16]
    /// [first_attempt_ms u64][last_attempt_ms u64][reason...]`
    pub fn encode_dead(dead: &super::DeadLetter) -> Vec<u8> {
        let reason = truncate_utf8(&dead.reason, 4096);
        let mut out = Vec::with_capacity(23 + reason.len());
        out.push(VERSION);
        out.extend_from_slice(&dead.attempts.to_be_bytes());
        out.extend_from_slice(&dead.last_status.to_be_bytes());
        out.extend_from_slice(&dead.first_attempt_ms.to_be_bytes());
        out.extend_from_slice(&dead.last_attempt_ms.to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        out
    }

    pub fn decode_dead(
        bytes: &[u8],
        id: super::EventId,
        target: &str,
    ) -> Result<super::DeadLetter, DecodeError> {
        let mut r = Reader::versioned(bytes)?;
        Ok(super::DeadLetter {
            id,
            target: target.to_owned(),
            attempts: r.u32()?,
            last_status: r.u16()?,
            first_attempt_ms: r.u64()?,
            last_attempt_ms: r.u64()?,
            reason: r.rest_text()?.to_owned(),
        })
    }

    /// Encodes backlog counts: (target, queued, dead) for each target.
    pub fn encode_counts(counts: &[(&str, u64, u64)]) -> Vec<u8> {
        let mut out = vec![VERSION];
        for (target, queued, dead) in counts {
            let target = truncate_utf8(target, u16::MAX as usize);
            out.extend_from_slice(&(target.len() as u16).to_be_bytes());
            out.extend_from_slice(target.as_bytes());
            out.extend_from_slice(&queued.to_be_bytes());
            out.extend_from_slice(&dead.to_be_bytes());
        }
        out
    }

    pub fn decode_counts(bytes: &[u8]) -> Result<super::BacklogCounts, DecodeError> {
        let mut r = Reader::versioned(bytes)?;
        let mut counts = super::BacklogCounts::new();
        while !r.0.is_empty() {
            let len = r.u16()? as usize;
            let target = r.text(len)?;
            let (queued, dead) = (r.u64()?, r.u64()?);
            counts.insert(target.to_owned(), (queued as i64, dead as i64));
        }
        Ok(counts)
    }

    /// A target's watermark and the event types it took when it was set
    /// (`None`: all): `[1u8][watermark u64]` then, for a filter, each type
    /// as `[len u16][type]`, after a `1u8` (none for all).
    pub fn encode_watermark(watermark: u64, events: Option<&[String]>) -> Vec<u8> {
        let mut out = vec![VERSION];
        out.extend_from_slice(&watermark.to_be_bytes());
        if let Some(events) = events {
            out.push(1);
            for event in events {
                let event = truncate_utf8(event, u16::MAX as usize);
                out.extend_from_slice(&(event.len() as u16).to_be_bytes());
                out.extend_from_slice(event.as_bytes());
            }
        }
        out
    }

    pub fn decode_watermark(bytes: &[u8]) -> Result<super::StoredWatermark, DecodeError> {
        let mut r = Reader::versioned(bytes)?;
        let watermark = r.u64()?;
        if r.0.is_empty() {
            return Ok((watermark, None));
        }
        let [_] = r.take::<1>()?;
        let mut events = Vec::new();
        while !r.0.is_empty() {
            let len = r.u16()? as usize;
            events.push(r.text(len)?.to_owned());
        }
        Ok((watermark, Some(events)))
    }

    /// Reads fixed-width big-endian fields off the front of a record.
    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn versioned(bytes: &'a [u8]) -> Result<Reader<'a>, DecodeError> {
            let (&version, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
            if version != VERSION {
                return Err(DecodeError::Version(version));
            }
            Ok(Reader(rest))
        }

        fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
            if self.0.len() < N {
                return Err(DecodeError::Truncated);
            }
            let (head, rest) = self.0.split_at(N);
            self.0 = rest;
            Ok(head.try_into().expect("N bytes"))
        }

        fn u16(&mut self) -> Result<u16, DecodeError> {
            self.take().map(u16::from_be_bytes)
        }

        fn u32(&mut self) -> Result<u32, DecodeError> {
            self.take().map(u32::from_be_bytes)
        }

        fn u64(&mut self) -> Result<u64, DecodeError> {
            self.take().map(u64::from_be_bytes)
        }

        fn text(&mut self, len: usize) -> Result<&'a str, DecodeError> {
            let (text, rest) = split_text(self.0, len)?;
            self.0 = rest;
            Ok(text)
        }

        fn rest_text(&mut self) -> Result<&'a str, DecodeError> {
            let text = std::str::from_utf8(self.0).map_err(|_| DecodeError::NotUtf8)?;
            self.0 = &[];
            Ok(text)
        }
    }

    fn header(bytes: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
        let (&version, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        if rest.len() < 8 {
            return Err(DecodeError::Truncated);
        }
        let (time, rest) = rest.split_at(8);
        Ok((u64::from_be_bytes(time.try_into().expect("8 bytes")), rest))
    }

    fn split_text(bytes: &[u8], len: usize) -> Result<(&str, &[u8]), DecodeError> {
        if bytes.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (text, rest) = bytes.split_at(len);
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::NotUtf8)?;
        Ok((text, rest))
    }

    fn truncate_utf8(text: &str, max: usize) -> &str {
        if text.len() <= max {
            return text;
        }
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn event_round_trips() {
            let body = "{\"event\":\"visitor_created\",\"name\":\"Zoë\"}".as_bytes();
            let bytes = encode_event(1_700_000_000_123, "visitor_created", body);
            let record = decode_event(&bytes).unwrap();
            assert_eq!(
                record,
                EventRecord {
                    received_at_ms: 1_700_000_000_123,
                    event: "visitor_created",
                    body
                }
            );
        }

        #[test]
        fn quarantine_round_trips_with_binary_body() {
            let body = [0u8, 255, 1, 2];
            let bytes = encode_quarantine(7, "body is not valid JSON", &body);
            let record = decode_quarantine(&bytes).unwrap();
            assert_eq!(record.reason, "body is not valid JSON");
            assert_eq!(record.body, &body);
            assert_eq!(record.received_at_ms, 7);
        }

        #[test]
        fn long_event_types_are_cut_at_a_char_boundary() {
            let event = "é".repeat(200); // 400 bytes
            let bytes = encode_event(0, &event, b"{}");
            let record = decode_event(&bytes).unwrap();
            assert!(record.event.len() <= MAX_EVENT_LEN);
            assert!(event.starts_with(record.event));
            assert_eq!(record.body, b"{}");
        }

        #[test]
        fn backlog_counts_round_trip_and_reject_damage() {
            let bytes = encode_counts(&[("crm", 1_000_000, 3), ("zoë-archive", 0, 0)]);
            let counts = decode_counts(&bytes).unwrap();
            assert_eq!(counts.len(), 2);
            assert_eq!(counts["crm"], (1_000_000, 3));
            assert_eq!(counts["zoë-archive"], (0, 0));
            assert_eq!(decode_counts(&encode_counts(&[])).unwrap().len(), 0);
            assert!(decode_counts(&bytes[..bytes.len() - 1]).is_err());
            assert!(decode_counts(&[]).is_err());
        }

        #[test]
        fn delivery_state_and_dead_letters_round_trip() {
            let state = crate::log::DeliveryState {
                attempts: 3,
                enqueued_ms: 10,
                first_attempt_ms: 11,
                last_attempt_ms: 12,
                last_status: 503,
                last_error: "HTTP 503".into(),
            };
            assert_eq!(decode_state(&encode_state(&state)).unwrap(), state);
            let dead = crate::log::DeadLetter {
                id: crate::log::EventId(42),
                target: "crm".into(),
                attempts: 1,
                last_status: 400,
                first_attempt_ms: 5,
                last_attempt_ms: 5,
                reason: "HTTP 400: {\"error\":\"bad\"}".into(),
            };
            assert_eq!(
                decode_dead(&encode_dead(&dead), dead.id, "crm").unwrap(),
                dead
            );
            let bytes = encode_state(&state);
            for cut in 0..31 {
                assert_eq!(
                    decode_state(&bytes[..cut]),
                    Err(DecodeError::Truncated),
                    "cut {cut}"
                );
            }
        }

        #[test]
        fn truncated_and_foreign_records_are_errors_not_panics() {
            let bytes = encode_event(5, "visitor_created", b"{}");
            for cut in 0..11 {
                assert_eq!(
                    decode_event(&bytes[..cut]),
                    Err(DecodeError::Truncated),
                    "cut {cut}"
                );
            }
            let mut foreign = bytes.clone();
            foreign[0] = 9;
            assert_eq!(decode_event(&foreign), Err(DecodeError::Version(9)));
            let mut bad_utf8 = bytes;
            bad_utf8[10] = 0xff;
            assert_eq!(decode_event(&bad_utf8), Err(DecodeError::NotUtf8));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead letter of `id` for the target "crm": one attempt, HTTP 400.
    fn dead_letter(id: EventId) -> DeadLetter {
        DeadLetter {
            id,
            target: "crm".into(),
            attempts: 1,
            last_status: 400,
            first_attempt_ms: 1,
            last_attempt_ms: 1,
            reason: "HTTP 400".into(),
        }
    }

    /// A log in `dir` with small caches and `checkpoint_interval`.
    fn small(dir: &Path, checkpoint_interval: Duration) -> LogOptions {
        LogOptions {
            data_dir: dir.to_owned(),
            checkpoint_interval,
            cache_capacity_bytes: 8 << 20,
            quarantine_max_events: 10,
            quarantine_max_bytes: 1 << 20,
            node: crate::node::NodeId(0),
        }
    }

    /// A read of the explicit queue that found nothing due must not mark
    /// it quiet past an entry written while it ran (that entry's write
    /// lowered the mark before the read's conclusion would raise it).
    #[test]
    fn a_write_during_a_queue_read_outlives_the_reads_quiet_mark() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        let subscription = Subscription {
            target: "crm".into(),
            events: None,
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        log.adopt_targets(&[subscription]).unwrap();
        let state = |log: &Log| {
            let fresh = log.fresh.lock().unwrap();
            let q = &fresh["crm"];
            (q.explicit_quiet_until, q.explicit_writes)
        };
        // The queue is empty: a read says so.
        let (_, writes) = state(&log);
        log.explicit_quiet("crm", u64::MAX, Some(writes));
        assert_eq!(state(&log).0, u64::MAX);
        // The next read begins (and will find nothing) ...
        let (_, writes) = state(&log);
        // ... an entry due at 5 is written meanwhile ...
        log.explicit_added("crm", 5);
        // ... and the read concludes: nothing until forever.
        log.explicit_quiet("crm", u64::MAX, Some(writes));
        assert_eq!(state(&log).0, 5, "the entry written meanwhile is hidden");
        // A read that began after the write may conclude.
        let (_, writes) = state(&log);
        log.explicit_quiet("crm", 7, Some(writes));
        assert_eq!(state(&log).0, 7);
    }

    /// The oldest-wait figure reads the `a` entries: a replay (waiting
    /// since 900, under the old id 100) does not hide a delivery moved
    /// earlier (waiting since 500, id 2000); an `a` entry a crash left
    /// without its `p` entry is skipped, and the recount after a crash
    /// removes it.
    #[test]
    fn the_oldest_wait_is_read_by_age_past_replays_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        let subscription = Subscription {
            target: "crm".into(),
            events: None,
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        log.adopt_targets(&[subscription]).unwrap();
        for (id, enqueued_ms) in [(100, 900u64), (2000, 500)] {
            let id = EventId(id);
            log.db.insert(age_key("crm", enqueued_ms, id), &[]).unwrap();
            log.db
                .insert(pending_key("crm", id), &enqueued_ms.to_be_bytes())
                .unwrap();
        }
        let leftover = age_key("crm", 1, EventId(7));
        log.db.insert(&leftover, &[]).unwrap();
        let oldest = |log: &Log| log.target_stats("crm").unwrap().oldest_enqueued_ms;
        assert_eq!(oldest(&log), Some(500));
        assert!(log.db.contains_key(&leftover).unwrap(), "only skipped");
        log.count_backlogs(&["crm".to_owned()]).unwrap();
        assert!(!log.db.contains_key(&leftover).unwrap());
        assert!(
            log.db
                .contains_key(age_key("crm", 500, EventId(2000)))
                .unwrap()
        );
        assert_eq!(oldest(&log), Some(500));
        // Settling a delivery, either way, takes its `a` entry too.
        let moved = |id, enqueued_ms| Delivery {
            id: EventId(id),
            due_ms: 0,
            state: DeliveryState {
                enqueued_ms,
                ..Default::default()
            },
            fresh: false,
            body: None,
        };
        log.delivered("crm", &moved(2000, 500)).unwrap();
        assert!(
            !log.db
                .contains_key(age_key("crm", 500, EventId(2000)))
                .unwrap()
        );
        log.bury(&moved(100, 900), &dead_letter(EventId(100)))
            .unwrap();
        assert!(
            !log.db
                .contains_key(age_key("crm", 900, EventId(100)))
                .unwrap()
        );
        assert_eq!(oldest(&log), None);
    }

    /// A dead letter named twice in one purge is removed, and counted, once.
    #[test]
    fn purging_a_letter_named_twice_counts_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        for id in [EventId(1), EventId(2)] {
            log.db
                .insert(dead_key("crm", id), record::encode_dead(&dead_letter(id)))
                .unwrap();
        }
        log.count_backlogs(&["crm".to_owned()]).unwrap();
        assert_eq!(log.tallies.get("crm"), (0, 2));
        let twice = [
            ("crm".to_owned(), EventId(1)),
            ("crm".to_owned(), EventId(1)),
        ];
        assert_eq!(log.purge_dead_letters(&twice).unwrap(), 1);
        assert_eq!(log.tallies.get("crm"), (0, 1));
        assert_eq!(log.dead_letters("crm").unwrap().len(), 1);
    }

    /// Pruning decides by the event's receive time; an event record that
    /// cannot be read is kept, and the pass goes on past it.
    #[test]
    fn pruning_keeps_an_unreadable_event_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        let event = |received_at_ms| record::encode_event(received_at_ms, "visitor_created", b"{}");
        // Event 1000 unreadable, 2000 waiting at its first place, 3000 done.
        log.db
            .insert(id_key(EVENT_PREFIX, 1_000), &b"\x63garbage"[..])
            .unwrap();
        log.db
            .insert(id_key(EVENT_PREFIX, 2_000), event(2))
            .unwrap();
        log.db
            .insert(id_key(EVENT_PREFIX, 3_000), event(3))
            .unwrap();
        log.db
            .insert(queue_key("crm", 2, EventId(2_000)), new_delivery_state(2))
            .unwrap();
        let targets = ["crm".to_string()];
        assert!(log.is_queued("crm", EventId(2_000)).unwrap());
        assert!(!log.is_queued("crm", EventId(3_000)).unwrap());
        let step = log.prune_before(10, None, 100, &targets).unwrap();
        assert_eq!((step.examined, step.deleted), (3, 1));
        assert!(log.db.contains_key(id_key(EVENT_PREFIX, 1_000)).unwrap());
        assert!(log.event(EventId(2_000)).unwrap().is_some());
        assert!(log.event(EventId(3_000)).unwrap().is_none());
    }

    /// Copies the data directory `from` to `to`, sled's blob files only
    /// with `blobs`: what a power cut leaves of files never synced.
    fn copy_data(from: &Path, to: &Path, blobs: bool) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                if entry.file_name() == "blobs" && !blobs {
                    std::fs::create_dir_all(&target).unwrap();
                } else {
                    copy_data(&entry.path(), &target, blobs);
                }
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    /// A large event (sled keeps it in a blob file of its own, unsynced)
    /// applied, and sled's data file written with the group's `m/last_id`
    /// (its flusher syncs that file every few ms), before any checkpoint:
    /// a power cut then takes the blob and leaves the mark. Opening the log
    /// must write the event again from the write-ahead log; it used to
    /// replay only frames above `m/last_id`, and the event was gone.
    #[tokio::test]
    async fn a_large_event_survives_a_power_cut_before_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let options = |data: &Path| small(data, Duration::from_secs(3600));
        let data = dir.path().join("data");
        let log = Log::open(&options(&data)).unwrap();
        let (committer, _apply) = log
            .start_committer(&options(&data), vec![], Arc::new(Metrics::new()))
            .unwrap();
        let body = Bytes::from(vec![b'x'; 300 * 1024]);
        let event = Entry::Event {
            event: "visitor_created".into(),
            body: body.clone(),
        };
        let id = committer.append(event).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while log.event_body(id).unwrap().is_none() {
            assert!(Instant::now() < deadline, "the event was never applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // What sled's flusher does on its own.
        log.db.flush().unwrap();
        assert!(
            std::fs::read_dir(data.join("blobs")).unwrap().count() > 0,
            "the event is not in a blob file: the test tests nothing"
        );
        let cut = dir.path().join("cut");
        copy_data(&data, &cut, false);
        let reopened = Log::open(&options(&cut)).unwrap();
        assert_eq!(reopened.event_body(id).unwrap(), Some(body));
    }

    /// Pruning runs while an operator retries dead letters (`dlq retry`
    /// moves each back into the queue, and failing again moves it back):
    /// an event old enough to prune but owed to a target is never deleted.
    /// A retry landing between two of a step's checks (queued? no. dead
    /// letter? no) used to get its event deleted under it.
    #[test]
    fn pruning_racing_a_dead_letter_retry_keeps_the_event() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        let ids: Vec<EventId> = (1..=500u64).map(|n| EventId(n * 1_000)).collect();
        for &id in &ids {
            let event = record::encode_event(id.0 / 1000, "visitor_created", b"{}");
            log.db.insert(id_key(EVENT_PREFIX, id.0), event).unwrap();
            log.db
                .insert(dead_key("crm", id), record::encode_dead(&dead_letter(id)))
                .unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pruner = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let targets = ["crm".to_string()];
                while !stop.load(Ordering::Relaxed) {
                    let mut after = None;
                    loop {
                        let step = log.prune_before(10_000_000, after, 256, &targets).unwrap();
                        if step.examined == 0 {
                            break;
                        }
                        after = step.last;
                        // As the retention task does between steps.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        };
        let mut lost = 0;
        for _ in 0..30 {
            // `dlq retry --all`, then every retry fails again.
            log.enqueue("crm", &ids, 0, 0).unwrap();
            lost = ids
                .iter()
                .filter(|&&id| log.event(id).unwrap().is_none())
                .count();
            if lost > 0 {
                break;
            }
            for &id in &ids {
                let delivery = Delivery {
                    id,
                    due_ms: 0,
                    state: DeliveryState::default(),
                    fresh: false,
                    body: None,
                };
                log.bury(&delivery, &dead_letter(id)).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        pruner.join().unwrap();
        assert_eq!(lost, 0, "pruning deleted events still owed to a target");
    }

    /// Once everything is deleted, nearly the whole data file counts as
    /// reusable without any later write: also the segments whose data sled
    /// rewrote into the segment it is still filling, which it frees only
    /// once that one is sealed by more writes (which a relay refusing
    /// ingest at `storage.max_bytes` would never make).
    #[test]
    fn deleted_data_counts_as_reusable_without_further_writes() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        let ids = 1..=30_000u64;
        for id in ids.clone() {
            log.db
                .insert(id_key(EVENT_PREFIX, id), vec![7u8; 600])
                .unwrap();
        }
        log.db.flush().unwrap();
        for id in ids {
            log.db.remove(id_key(EVENT_PREFIX, id)).unwrap();
        }
        log.db.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let size = log.db.size_on_disk().unwrap();
            let in_use = size.saturating_sub(log.reusable_bytes());
            if in_use <= 4 << 20 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{in_use} of {size} bytes still in use with nothing stored"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stores `visitor_created` events with `ids` (each received at its id
    /// in ms / 1000), then settles two of them at `target` after its
    /// watermark was written: 2000 dead-lettered, 3000 moved to a retry
    /// (its age, moved and queue entries).
    fn store_and_settle_some(log: &Log, target: &str, ids: &[u64]) {
        for &id in ids {
            let event = record::encode_event(id / 1000, "visitor_created", b"{}");
            log.db.insert(id_key(EVENT_PREFIX, id), event).unwrap();
        }
        log.db
            .insert(
                dead_key(target, EventId(2_000)),
                record::encode_dead(&dead_letter(EventId(2_000))),
            )
            .unwrap();
        let moved = DeliveryState {
            attempts: 1,
            enqueued_ms: 3,
            ..Default::default()
        };
        log.db
            .insert(age_key(target, 3, EventId(3_000)), &[])
            .unwrap();
        log.db
            .insert(pending_key(target, EventId(3_000)), &3u64.to_be_bytes())
            .unwrap();
        log.db
            .insert(
                queue_key(target, 60_000, EventId(3_000)),
                record::encode_state(&moved),
            )
            .unwrap();
    }

    /// A target whose event types change (or that is removed) gets queue
    /// entries for what still waited above its stored watermark. A delivery
    /// there that was already dead-lettered, or moved by a failed attempt
    /// (it has its own queue entry), did not wait at its first place: it
    /// must not be queued (again) there.
    #[test]
    fn a_changed_target_does_not_queue_again_what_was_dead_lettered_or_moved() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        let subscription = |events: Option<Vec<String>>| Subscription {
            target: "crm".into(),
            events,
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        log.adopt_targets(&[subscription(None)]).unwrap();
        // Three new events above the watermark: 1000 still in flight when
        // the relay stopped, 2000 dead-lettered, 3000 moved to a retry.
        store_and_settle_some(&log, "crm", &[1_000, 2_000, 3_000]);
        // The next start: the target now takes one event type only.
        log.adopt_targets(&[subscription(Some(vec!["visitor_created".into()]))])
            .unwrap();
        let entries: Vec<EventId> = log
            .db
            .scan_prefix(queue_prefix("crm"))
            .map(|item| parse_queue_key(&item.unwrap().0).unwrap().1)
            .collect();
        assert_eq!(
            entries,
            [EventId(1_000), EventId(3_000)],
            "the dead letter was queued again, or the moved delivery twice"
        );
    }

    #[test]
    fn forgetting_a_removed_target_drops_what_waits_for_it_and_lets_its_events_be_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
        let subscription = |target: &str, events: Option<Vec<String>>| Subscription {
            target: target.into(),
            events,
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        let slack = || subscription("slack", Some(vec!["conversation_ended".into()]));
        log.adopt_targets(&[subscription("crm", None), slack()])
            .unwrap();
        // At crm: 2000 dead-lettered, 3000 moved to a retry, 1000 and 4000
        // waiting at their first place.
        store_and_settle_some(&log, "crm", &[1_000, 2_000, 3_000, 4_000]);
        // The next start: crm is no longer configured.
        log.adopt_targets(&[slack()]).unwrap();
        let prune = |log: &Log| {
            let mut targets: Vec<String> = log.targets_in_log().unwrap().into_iter().collect();
            targets.push("slack".into());
            log.prune_before(1_000, None, 100, &targets)
                .unwrap()
                .deleted
        };
        assert_eq!(prune(&log), 0, "crm's deliveries hold every event");

        assert_eq!(log.forget_target("crm").unwrap(), (3, 1));
        for prefix in [QUEUE_PREFIX, PENDING_PREFIX, AGE_PREFIX, DEAD_PREFIX] {
            assert_eq!(
                log.db.scan_prefix(target_prefix(prefix, "crm")).count(),
                0,
                "crm's {} entries",
                prefix as char
            );
        }
        assert!(!log.targets_in_log().unwrap().contains("crm"));
        assert!(
            log.stored_watermark("slack").unwrap().is_some(),
            "slack untouched"
        );
        assert_eq!(prune(&log), 4, "nothing holds the events any more");
    }
}
