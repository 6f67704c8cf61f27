//! The apply thread: puts acknowledged group commits into sled, and
//! checkpoints (sled made durable, the write-ahead log emptied).

use super::*;

/// What the apply thread does, in the order the committer asks.
pub(super) enum ApplyJob {
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
    /// The batches after this one were counted for these targets; the
    /// change's writes go first, then the answer with the cut.
    Resubscribe {
        subscriptions: Vec<Subscription>,
        writes: Writes,
        cut: u64,
        reply: oneshot::Sender<Result<u64, CommitError>>,
    },
}

/// The sled writes of a group commit, in order (a `sled::Batch` cannot be
/// merged with another; this can).
#[derive(Default)]
pub(super) struct Writes(Vec<(sled::IVec, Option<sled::IVec>)>);

impl Writes {
    pub(super) fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.0.push((key.into(), Some(value.into())));
    }

    pub(super) fn remove(&mut self, key: impl Into<sled::IVec>) {
        self.0.push((key.into(), None));
    }

    /// A new event's delivery to `target`: its queue entry at its first
    /// place (see the module docs), the write a commit and a replay of the
    /// write-ahead log share.
    pub(super) fn queue_new(
        &mut self,
        target: &str,
        received_at_ms: u64,
        id: EventId,
        state: &sled::IVec,
    ) {
        self.insert(queue_key(target, received_at_ms, id), state.clone());
    }

    /// Writes them one key at a time, in order (see [`ApplyState::apply`]).
    pub(super) fn apply_to(self, db: &sled::Db) -> sled::Result<()> {
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

    pub(super) fn into_batch(self) -> sled::Batch {
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
pub(super) fn new_delivery_state(received_at_ms: u64) -> sled::IVec {
    record::encode_state(&DeliveryState {
        enqueued_ms: received_at_ms,
        ..Default::default()
    })
    .into()
}

/// Everything the apply thread owns.
pub(super) struct ApplyState {
    pub(super) db: sled::Db,
    pub(super) dir: PathBuf,
    pub(super) data_file: File,
    /// sled failed to apply a commit that was acknowledged: the
    /// write-ahead log must be kept until a restart replays it.
    pub(super) sled_missing_commits: bool,
    /// An fsync failed: what it covered may never reach the disk, although
    /// a later fsync of the same file reports success (Linux drops the
    /// failed pages' dirty state). The write-ahead log is kept until a
    /// restart replays it, as after `sled_missing_commits`.
    pub(super) sync_failed: bool,
    /// When the last checkpoint began: sled blob files written since then
    /// are fsynced by the next one.
    pub(super) last_checkpoint_wall: SystemTime,
    pub(super) subscriptions: Vec<Subscription>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<CommitHealth>,
    pub(super) tallies: Arc<Tallies>,
    /// See [`Store::applied`].
    pub(super) applied: Arc<AtomicU64>,
}

impl ApplyState {
    pub(super) fn run(&mut self, rx: std::sync::mpsc::Receiver<ApplyJob>) {
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
                ApplyJob::Resubscribe {
                    subscriptions,
                    writes,
                    cut,
                    reply,
                } => {
                    self.subscriptions = subscriptions;
                    if crashpoint::hits(crashpoint::RELOAD_CHANGE) {
                        // Events acknowledged above the cut first.
                        std::thread::sleep(Duration::from_secs(1));
                        crashpoint::crash(crashpoint::RELOAD_CHANGE);
                    }
                    let written = self.write_change(writes).map(|()| cut);
                    let _ = reply.send(written);
                }
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
    pub(super) fn apply(&mut self, writes: Writes, enqueued: Vec<i64>, through: u64) {
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

    /// A reload's change of targets; if sled rejects it, the write-ahead
    /// log is kept as after a rejected commit, and a restart replays it
    /// (events after the cut then get queue entries for the new targets).
    fn write_change(&mut self, writes: Writes) -> Result<(), CommitError> {
        writes.apply_to(&self.db).map_err(|err| {
            self.sled_missing_commits = true;
            self.metrics.commit_failures.inc();
            self.health
                .checkpoint_failing
                .store(true, Ordering::Relaxed);
            tracing::error!(error = %err, "sled rejected a reload's change of targets; the write-ahead log is kept until a restart replays it");
            CommitError::Failed
        })
    }

    pub(super) fn checkpoint(&mut self, through_seq: u64) {
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
    pub(super) fn make_durable(&mut self, through_seq: u64) -> Result<(), String> {
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
pub(super) fn sync_recent_blobs(dir: &Path, since: SystemTime) -> std::io::Result<()> {
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
