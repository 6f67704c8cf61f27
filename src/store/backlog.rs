//! Backlog figures: per-target tallies kept in step with every write, counted
//! at start or taken from a clean shutdown, and the oldest waiting delivery.

use super::*;

/// Per-target queued and dead counts, kept in step with every write so that
/// reading them never scans the log.
#[derive(Debug, Default)]
pub(super) struct Tallies {
    pub(super) by_target: std::sync::Mutex<std::collections::HashMap<String, Tally>>,
}

/// One target's tally; a change may land before the count it corrects, so
/// it can dip below zero for a moment.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    queued: i64,
    dead: i64,
}

impl Tallies {
    pub(super) fn change(&self, target: &str, queued: i64, dead: i64) {
        let mut map = self.by_target.lock().expect("tallies lock");
        let tally = map.entry(target.to_owned()).or_default();
        tally.queued += queued;
        tally.dead += dead;
    }

    pub(super) fn set(&self, target: &str, backlog: Backlog) {
        let tally = Tally {
            queued: backlog.queued as i64,
            dead: backlog.dead as i64,
        };
        self.by_target
            .lock()
            .expect("tallies lock")
            .insert(target.to_owned(), tally);
    }

    pub(super) fn get(&self, target: &str) -> Backlog {
        let map = self.by_target.lock().expect("tallies lock");
        let tally = map.get(target).copied().unwrap_or_default();
        Backlog {
            queued: tally.queued.max(0) as u64,
            dead: tally.dead.max(0) as u64,
        }
    }
}

impl Store {
    /// Counts `targets`' queues and dead letters once, so that the figures
    /// [`Store::target_stats`] returns are kept up to date from here on. Call
    /// before the committer and dispatchers start.
    ///
    /// After a clean shutdown the counts it saved are used as they are; else
    /// (a crash, a first start, a target added since) the queue is scanned,
    /// about a second per million waiting deliveries.
    pub fn count_backlogs(&self, targets: &[String]) -> Result<(), StoreError> {
        let saved = self.saved_counts.lock().expect("saved counts lock").take();
        for target in targets {
            let started = Instant::now();
            let (backlog, source) = match saved.as_ref().and_then(|saved| saved.get(target)) {
                Some(&backlog) => (backlog, "saved at the last clean shutdown"),
                None => {
                    self.remove_age_leftovers(target)?;
                    let backlog = Backlog {
                        queued: self.db.scan_prefix(queue_prefix(target)).count() as u64
                            + self.implicit_backlog(target, true)?.0,
                        dead: self.db.scan_prefix(dead_prefix(target)).count() as u64,
                    };
                    (backlog, "counted in the log")
                }
            };
            let took_ms = started.elapsed().as_millis() as u64;
            let Backlog { queued, dead } = backlog;
            tracing::info!(target = %target, queued, dead, source, took_ms, "backlog");
            self.tallies.set(target, backlog);
        }
        Ok(())
    }

    /// Saves `targets`' backlog counts for the next start (see
    /// [`Store::count_backlogs`]) and makes them durable. Call only once
    /// nothing writes to the log any more (clean shutdown, after the
    /// committer and the dispatchers have stopped): any later change would
    /// make them wrong, which is why every open deletes them first.
    pub fn save_backlog_counts(&self, targets: &[String]) -> Result<(), StoreError> {
        let counts: Vec<(&str, Backlog)> = targets
            .iter()
            .map(|target| (target.as_str(), self.tallies.get(target)))
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
    pub(super) fn take_saved_counts(&self) -> Result<(), StoreError> {
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
    pub fn target_stats(&self, target: &str) -> Result<TargetStats, StoreError> {
        let Backlog { queued, dead } = self.tallies.get(target);
        // The first `p` entry is the oldest moved delivery, unless a replay
        // (which waits from its replay, under an old id) is in front of it:
        // the `a` entries have them in the order of their wait. Both count
        // (a log from before `a` entries has only `p` entries).
        let first_moved = match self.db.scan_prefix(moved_prefix(target)).next() {
            Some(item) => decode_u64(&item?.1),
            None => None,
        };
        let oldest_moved = self.oldest_by_age(target)?;
        let first_queued = match self.db.scan_prefix(queue_prefix(target)).next() {
            Some(item) => {
                let (key, value) = item?;
                let state = record::decode_state(&value).map_err(|reason| StoreError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
                Some(state.enqueued_ms)
            }
            None => None,
        };
        let first_implicit = self.implicit_backlog(target, false)?.1;
        let oldest_enqueued_ms = first_moved
            .into_iter()
            .chain(oldest_moved)
            .chain(first_queued)
            .chain(first_implicit)
            .min();
        Ok(TargetStats {
            queued,
            dead,
            oldest_enqueued_ms,
        })
    }

    /// The enqueue time of `target`'s first `a` entry whose delivery still
    /// waits (has its `p` entry). One without is skipped, not removed: a
    /// dispatcher may be between writing the two.
    pub(super) fn oldest_by_age(&self, target: &str) -> Result<Option<u64>, StoreError> {
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
    pub(super) fn age_entries<'a>(
        &'a self,
        target: &'a str,
    ) -> impl Iterator<Item = Result<(sled::IVec, u64, bool), StoreError>> + 'a {
        let pending = move |id| self.db.contains_key(moved_key(target, id));
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
    pub(super) fn remove_age_leftovers(&self, target: &str) -> Result<usize, StoreError> {
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
}
