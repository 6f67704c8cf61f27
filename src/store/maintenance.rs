//! Operator actions and housekeeping: dead letters, replay into the queue,
//! forgetting a removed target, and pruning past retention.

use super::*;

impl Store {
    /// Dead letters of `target`, oldest event first.
    pub fn dead_letters(&self, target: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(dead_prefix(target)) {
            let (key, value) = item?;
            let id = EventId(decode_u64(&key[key.len() - 8..]).unwrap_or(0));
            let dead =
                record::decode_dead(&value, id, target).map_err(|reason| StoreError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
            out.push(dead);
        }
        Ok(out)
    }

    /// The dead letter of `id` at `target`, if there is one.
    pub fn dead_letter(&self, target: &str, id: EventId) -> Result<Option<DeadLetter>, StoreError> {
        let key = dead_key(target, id);
        match self.db.get(&key)? {
            Some(value) => record::decode_dead(&value, id, target)
                .map(Some)
                .map_err(|reason| StoreError::Corrupt { key, reason }),
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
    ) -> Result<usize, StoreError> {
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
            batch.insert(moved_key(target, id), &now_ms.to_be_bytes());
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
    pub fn all_dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([DEAD_PREFIX]) {
            let (key, value) = item?;
            let corrupt = |reason| StoreError::Corrupt {
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
    pub fn purge_dead_letters(&self, letters: &[(String, EventId)]) -> Result<usize, StoreError> {
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
    /// entries, by which [`Store::targets_in_log`] finds the target, go last
    /// but the watermark (sled recovers a prefix of its writes).
    pub fn forget_target(&self, target: &str) -> Result<(u64, u64), StoreError> {
        // Not in the middle of a pruning step or a replay (see `prune_step`).
        let _step = self.prune_step.lock().expect("prune lock");
        let (mut waiting, _) = self.implicit_backlog(target, true)?;
        let mut dead = 0;
        for prefix in [AGE_PREFIX, MOVED_PREFIX, DEAD_PREFIX, QUEUE_PREFIX] {
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
        self.fronts.lock().expect("implicit lock").remove(target);
        self.tallies.set(target, Backlog::default());
        tracing::info!(target = %target, waiting, dead_letters = dead, "forgot a target no longer configured");
        Ok((waiting, dead))
    }

    /// Whether `target` has a stored watermark: it was configured when the
    /// relay last started (a start removes the watermark of a target it
    /// does not configure).
    pub fn has_watermark(&self, target: &str) -> Result<bool, StoreError> {
        Ok(self
            .db
            .contains_key(target_prefix(WATERMARK_PREFIX, target))?)
    }

    /// Names of every target that has a waiting delivery or a dead letter
    /// in the log, configured or not (one seek per name, not a scan).
    pub fn targets_in_log(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
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
    ) -> Result<PruneStep, StoreError> {
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
            // One received at or after the cutoff is kept, and still counts
            // against the limit: after an upgrade every id of the earlier
            // layout sorts below the cutoff, however recent.
            let mut kept = received_at_ms.as_ref().is_ok_and(|&ms| ms >= cutoff_ms);
            for target in targets {
                if kept {
                    break;
                }
                kept = match received_at_ms {
                    Ok(received_at_ms) => {
                        self.waits_implicit(target, id, &key, &value)?
                            || self.waits_at_first_place(target, received_at_ms, id)?
                            || self.db.contains_key(moved_key(target, id))?
                            || self.db.contains_key(dead_key(target, id))?
                    }
                    Err(_) => true,
                };
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
}
