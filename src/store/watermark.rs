//! The watermark path: each target's implicit queue front (deliveries above
//! its watermark, no key), which targets take which events, and the explicit
//! entries a target gets when its event types change or it goes.

use super::*;

/// Whether a new event of type `event` gets an explicit queue entry for a
/// subscribed target whose implicit queue takes `front` (`None`: it has
/// none; `Some(None)`: every type). The one place that decides it, for a
/// commit and for a replay of the write-ahead log: an event the target's
/// watermark takes is read above it, any other needs an entry.
pub(super) fn needs_queue_entry(front: Option<Option<&[String]>>, event: &str) -> bool {
    !front.is_some_and(|types| takes(types, event))
}

impl Store {
    /// Makes `subscriptions`' targets take new events from above a watermark
    /// instead of from queue entries (see [`implicit`]). Call after opening,
    /// before [`Store::count_backlogs`], the committer and the dispatchers.
    ///
    /// A target seen for the first time gets its watermark at the last id,
    /// made durable before anything can be acknowledged for it (else a
    /// crash could lose the events queued for it). A target whose event
    /// types changed, and one with a watermark that is no longer
    /// configured, first gets an explicit queue entry for each event still
    /// waiting for it under the types it had, so that what was queued stays
    /// queued, as with queue entries; the changed one then starts afresh.
    pub fn adopt_targets(&self, subscriptions: &[Subscription]) -> Result<(), StoreError> {
        let last = self.recover_last_id()?;
        let mut changed = self.queue_stored_retired()?;
        let mut configured = std::collections::HashSet::new();
        let mut fronts = std::collections::HashMap::new();
        for subscription in subscriptions {
            let target = &subscription.target;
            configured.insert(target.clone());
            let key = target_prefix(WATERMARK_PREFIX, target);
            let events = subscription.events.as_deref();
            let watermark = match self.stored_watermark(target)? {
                Some(stored) if stored.events.as_deref() == events => stored.watermark,
                stored => {
                    if let Some(stored) = stored {
                        self.materialize(target, stored)?;
                    }
                    self.db
                        .insert(key, record::encode_watermark(last, events))?;
                    changed = true;
                    last
                }
            };
            let q = self.implicit_queue(target, watermark, subscription.events.clone())?;
            fronts.insert(target.clone(), q);
        }
        for item in self.db.scan_prefix([WATERMARK_PREFIX]) {
            let (key, _) = item?;
            let target = String::from_utf8_lossy(&key[1..key.len() - 1]).into_owned();
            if configured.contains(&target) {
                continue;
            }
            if let Some(stored) = self.stored_watermark(&target)? {
                self.materialize(&target, stored)?;
            }
            self.db.remove(key)?;
            changed = true;
        }
        if changed {
            self.make_sled_durable()?;
        }
        *self.fronts.lock().expect("implicit lock") = fronts;
        Ok(())
    }

    /// Takes every stored watermark as it is, with the event types stored
    /// with it, changing nothing: for commands run offline, which must see
    /// what waits above the watermarks without acting as the server.
    pub fn load_watermarks(&self) -> Result<(), StoreError> {
        let mut fronts = std::collections::HashMap::new();
        for item in self.db.scan_prefix([WATERMARK_PREFIX]) {
            let (key, value) = item?;
            let target = String::from_utf8_lossy(&key[1..key.len() - 1]).into_owned();
            let stored =
                record::decode_watermark(&value).map_err(|reason| StoreError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
            let q = self.implicit_queue(&target, stored.watermark, stored.events)?;
            fronts.insert(target, q);
        }
        *self.fronts.lock().expect("implicit lock") = fronts;
        self.load_retired()
    }

    /// A target's implicit queue from its stored watermark. Deliveries above
    /// it that have a `p` entry (moved after a failure) or a dead letter
    /// were settled after the watermark was last written: they are not
    /// waiting at the front any more.
    pub(super) fn implicit_queue(
        &self,
        target: &str,
        watermark: u64,
        events: Option<Vec<String>>,
    ) -> Result<ImplicitQueue, StoreError> {
        let mut q = ImplicitQueue::new(watermark, events);
        let first = EventId(watermark.saturating_add(1));
        for (start, prefix) in [
            (moved_key(target, first), moved_prefix(target)),
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
        self.fronts
            .lock()
            .expect("implicit lock")
            .get(target)
            .is_some_and(ImplicitQueue::unsaved)
    }

    /// The event types stored with `target`'s watermark (`None`: every
    /// type, or no watermark stored).
    pub fn stored_event_types(&self, target: &str) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self
            .stored_watermark(target)?
            .and_then(|stored| stored.events))
    }

    pub(super) fn stored_watermark(
        &self,
        target: &str,
    ) -> Result<Option<WatermarkRecord>, StoreError> {
        let key = target_prefix(WATERMARK_PREFIX, target);
        match self.db.get(&key)? {
            Some(value) => record::decode_watermark(&value)
                .map(Some)
                .map_err(|reason| StoreError::Corrupt { key, reason }),
            None => Ok(None),
        }
    }

    /// Gives each event above the `stored` watermark that its event types
    /// select an explicit queue entry for `target`, at its first place.
    pub(super) fn materialize(
        &self,
        target: &str,
        stored: WatermarkRecord,
    ) -> Result<(), StoreError> {
        let queued = self.queue_waiting(target, stored.watermark, u64::MAX, |_, event| {
            takes(stored.events.as_deref(), event)
        })?;
        tracing::info!(target = %target, queued, "new events waiting for a target whose settings changed now have queue entries");
        Ok(())
    }

    /// Gives each event in `(watermark, through]` for which `waits(id,
    /// event type)` holds an explicit queue entry for `target`, at its
    /// first place, unless it was settled after the watermark was written
    /// (moved by a failed attempt, so it has its queue entry, or
    /// dead-lettered). Returns how many.
    pub(super) fn queue_waiting(
        &self,
        target: &str,
        watermark: u64,
        through: u64,
        waits: impl Fn(u64, &str) -> bool,
    ) -> Result<u64, StoreError> {
        let start = id_key(EVENT_PREFIX, watermark.saturating_add(1)).to_vec();
        let end = id_key(EVENT_PREFIX, through).to_vec();
        let mut queued = 0u64;
        for item in self.db.range(start..=end) {
            let (key, value) = item?;
            let event = decode_event_record(&key, &value)?;
            let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
            if !waits(id.0, event.event)
                || self.db.contains_key(moved_key(target, id))?
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
    pub(super) fn make_sled_durable(&self) -> Result<(), StoreError> {
        let io = |source: std::io::Error| StoreError::DataFile {
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
    pub fn save_watermarks(&self, now: bool) -> Result<(), StoreError> {
        // Held through the writes (see `Store::retire_fronts`).
        let mut saved = self.watermark_saved.lock().expect("watermark lock");
        if !now && saved.elapsed() < WATERMARK_SAVE_EVERY {
            return Ok(());
        }
        *saved = Instant::now();
        let moved: Vec<(String, u64, Option<Vec<String>>)> = {
            let fronts = self.fronts.lock().expect("implicit lock");
            fronts
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
            if let Some(q) = self.fronts.lock().expect("implicit lock").get_mut(&target) {
                q.saved = q.saved.max(watermark);
            }
        }
        Ok(())
    }

    /// Settles the implicit delivery of `id` at `target` (see [`implicit`]).
    /// A watermark that cannot be written now is written by a later
    /// settlement or the shutdown; meanwhile a crash would only make
    /// deliveries again.
    pub(super) fn settle(&self, target: &str, id: EventId) {
        let moved = match self.fronts.lock().expect("implicit lock").get_mut(target) {
            Some(q) => q.settle(id.0),
            None => false,
        };
        if moved && let Err(err) = self.save_watermarks(false) {
            tracing::warn!(error = %err, "cannot write a delivery watermark; will try again");
        }
    }

    /// An implicit delivery that was taken but whose attempt was abandoned or
    /// could not be recorded: it is read again.
    /// An explicit one stays where it is, due: the explicit queue is read
    /// again.
    pub fn release(&self, target: &str, id: EventId, source: Source) {
        if let Some(q) = self.fronts.lock().expect("implicit lock").get_mut(target) {
            match source {
                Source::Implicit => q.release(id.0),
                Source::Explicit => {
                    q.explicit_quiet_until = 0;
                    q.explicit_writes += 1;
                }
            }
        }
    }

    /// Whether `target`'s delivery of event `id` (its record `value`) waits
    /// above the target's watermark.
    pub(super) fn waits_implicit(
        &self,
        target: &str,
        id: EventId,
        key: &[u8],
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let fronts = self.fronts.lock().expect("implicit lock");
        let front = fronts.get(target).filter(|q| q.waits(id.0));
        let retired = self.retired.lock().expect("retired lock");
        let mut retired = retired.iter().filter(|r| r.target == target);
        if front.is_none() && retired.clone().next().is_none() {
            return Ok(false);
        }
        let event = decode_event_record(key, value)?.event;
        Ok(front.is_some_and(|q| q.wants(event)) || retired.any(|r| r.waits(id.0, event)))
    }

    /// Fresh deliveries waiting at `target`, and when the oldest was
    /// received (a scan above the watermark: for counts at start-up and
    /// tools; the oldest looks at most [`OLDEST_IMPLICIT_SCAN`] events).
    pub(super) fn implicit_backlog(
        &self,
        target: &str,
        count: bool,
    ) -> Result<(u64, Option<u64>), StoreError> {
        let Some(watermark) = self
            .fronts
            .lock()
            .expect("implicit lock")
            .get(target)
            .map(ImplicitQueue::watermark)
        else {
            return Ok((0, None));
        };
        let start = id_key(EVENT_PREFIX, watermark.saturating_add(1)).to_vec();
        let (mut waiting, mut oldest) = (0, None);
        for (n, item) in self.db.range(start..vec![EVENT_PREFIX + 1]).enumerate() {
            if !count && (oldest.is_some() || n >= OLDEST_IMPLICIT_SCAN) {
                break;
            }
            let (key, value) = item?;
            let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
            if self.waits_implicit(target, id, &key, &value)? {
                waiting += 1;
                oldest = oldest.or(Some(received_at(&key, &value)?));
            }
        }
        Ok((waiting, oldest))
    }
}
