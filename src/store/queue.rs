//! Reading a target's queue: the due deliveries, from the explicit entries
//! and from above the watermark, and whether one waits.

use super::*;

/// What [`Store::due_deliveries`] found.
#[derive(Debug, Default)]
pub struct Due {
    pub deliveries: Vec<Delivery>,
    /// When the first explicit entry left out for not being due yet falls
    /// due, so the caller knows when to look again.
    pub next_due_ms: Option<u64>,
}

/// How one read of the explicit queue ended.
enum Pass {
    /// It took `limit` deliveries.
    Full,
    /// The queue ended, or its next entry falls due then.
    Ended(Option<u64>),
}

impl Store {
    /// Up to `limit` deliveries of `target` in queue order that are due at
    /// `query.now_ms` (all of them, due or not, with `ignore_due`), starting
    /// after `query.after` (from the front when `None`) and skipping those
    /// `skip` names: explicit entries first, then implicit deliveries.
    pub fn due_deliveries(&self, target: &str, query: &DueQuery<'_>) -> Result<Due, StoreError> {
        let mut due = Due::default();
        if query.limit == 0 {
            return Ok(due);
        }
        // Nothing explicit due before `quiet_until`: the explicit queue is
        // not read again until then (see `ImplicitQueue::explicit_quiet_until`).
        // `writes` tells whether an entry was written or released while
        // this read ran, which a "quiet" it concludes must not hide.
        let (quiet_until, writes) = self
            .fronts
            .lock()
            .expect("implicit lock")
            .get(target)
            .map(|q| (q.explicit_quiet_until, q.explicit_writes))
            .unzip();
        due.next_due_ms =
            if query.ignore_due || quiet_until.is_none_or(|until| query.now_ms >= until) {
                self.take_explicit(target, query, writes, &mut due.deliveries)?
            } else {
                quiet_until.filter(|&until| until < u64::MAX)
            };
        self.take_implicit(target, query.limit, &mut due.deliveries)?;
        Ok(due)
    }

    /// Takes the due explicit entries into `due`; returns when the first
    /// one left out falls due.
    fn take_explicit(
        &self,
        target: &str,
        query: &DueQuery<'_>,
        writes: Option<u64>,
        due: &mut Vec<Delivery>,
    ) -> Result<Option<u64>, StoreError> {
        let mut after = query.after;
        loop {
            let next_due = match self.read_explicit(target, query, after, due)? {
                Pass::Full => return Ok(None),
                Pass::Ended(next_due) => next_due,
            };
            if !due.is_empty() {
                return Ok(next_due);
            }
            // Nothing after the cursor: entries written (rescheduled,
            // released) before it since are found from the front, at once
            // rather than at the next pass.
            if after.take().is_some() {
                continue;
            }
            // Read from the front and found nothing due: quiet until the
            // first entry that is not due yet.
            if !query.ignore_due {
                self.explicit_quiet(target, next_due.unwrap_or(u64::MAX), writes);
            }
            return Ok(next_due);
        }
    }

    /// One read of `target`'s explicit entries after `after` (from the
    /// front when `None`), up to the first not due yet.
    fn read_explicit(
        &self,
        target: &str,
        query: &DueQuery<'_>,
        after: Option<(u64, EventId)>,
        due: &mut Vec<Delivery>,
    ) -> Result<Pass, StoreError> {
        let prefix = queue_prefix(target);
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends in a separator") = 1;
        let start = match after {
            Some((due_ms, id)) => Bound::Excluded(queue_key(target, due_ms, id)),
            None => Bound::Included(prefix),
        };
        for item in self.db.range::<Vec<u8>, _>((start, Bound::Excluded(end))) {
            let (key, value) = item?;
            let corrupt = |reason| StoreError::Corrupt {
                key: key.to_vec(),
                reason,
            };
            let (due_ms, id) =
                parse_queue_key(&key).ok_or(corrupt(record::DecodeError::Truncated))?;
            let state = record::decode_state(&value).map_err(corrupt)?;
            // `ignore_due` overrides backoff times, not a delivery never
            // attempted yet that is due later on purpose (a replay spaced
            // by `--rate`): it waits for its time.
            if due_ms > query.now_ms && (!query.ignore_due || state.attempts == 0) {
                return Ok(Pass::Ended(Some(due_ms)));
            }
            if (query.skip)(id) {
                continue;
            }
            due.push(Delivery {
                id,
                due_ms,
                state,
                source: Source::Explicit,
                body: None,
            });
            if due.len() >= query.limit {
                return Ok(Pass::Full);
            }
        }
        Ok(Pass::Ended(None))
    }

    /// No explicit entry of `target` is due before `until` (a read from
    /// the front found none, or the next one due then), unless an entry was
    /// written or released since the read began (`writes` was read then).
    pub(super) fn explicit_quiet(&self, target: &str, until: u64, writes: Option<u64>) {
        if let Some(q) = self.fronts.lock().expect("implicit lock").get_mut(target) {
            if Some(q.explicit_writes) == writes {
                q.explicit_quiet_until = until;
            }
        }
    }

    /// An explicit entry of `target` was written (or released) due at
    /// `due_ms`: the explicit queue is read again from then.
    pub(super) fn explicit_added(&self, target: &str, due_ms: u64) {
        if let Some(q) = self.fronts.lock().expect("implicit lock").get_mut(target) {
            q.explicit_quiet_until = q.explicit_quiet_until.min(due_ms);
            q.explicit_writes += 1;
        }
    }

    /// Takes up to `limit` (counting those in `due`) implicit deliveries of
    /// `target`, in id order, from where reading stopped (see [`implicit`]).
    pub(super) fn take_implicit(
        &self,
        target: &str,
        limit: usize,
        due: &mut Vec<Delivery>,
    ) -> Result<(), StoreError> {
        let mut fronts = self.fronts.lock().expect("implicit lock");
        let Some(q) = fronts.get_mut(target) else {
            return Ok(());
        };
        let delivery = |read: implicit::ReadAhead| Delivery {
            id: EventId(read.id),
            due_ms: read.received_at_ms,
            state: DeliveryState {
                enqueued_ms: read.received_at_ms,
                ..Default::default()
            },
            source: Source::Implicit,
            body: Some(read.body),
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
            // value (one per value, not the node's); it ends the record.
            let body = value.len() - event.body.len()..value.len();
            let read = implicit::ReadAhead {
                id,
                received_at_ms: event.received_at_ms,
                body: Bytes::from_owner(value).slice(body),
            };
            if due.len() < limit {
                due.push(delivery(read));
            } else {
                q.ahead.push_back(read);
            }
            if q.ahead.len() >= implicit::READ_AHEAD || q.is_full() {
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
        let implicit = self.implicit_backlog(target, true).map_or(0, |(n, _)| n);
        self.db.scan_prefix(queue_prefix(target)).count() + implicit as usize
    }

    /// Whether `target` has a delivery of `id` waiting: moved (a `p`
    /// entry) or at its first place (see the module docs).
    pub fn is_queued(&self, target: &str, id: EventId) -> Result<bool, StoreError> {
        if self.db.contains_key(moved_key(target, id))? {
            return Ok(true);
        }
        let key = id_key(EVENT_PREFIX, id.0);
        match self.db.get(key)? {
            Some(value) => Ok(self.waits_implicit(target, id, &key, &value)?
                || self.waits_at_first_place(target, received_at(&key, &value)?, id)?),
            None => Ok(false),
        }
    }

    /// Whether the delivery to `target` of event `id`, received at
    /// `received_at_ms`, is still at its first place in the queue.
    pub(super) fn waits_at_first_place(
        &self,
        target: &str,
        received_at_ms: u64,
        id: EventId,
    ) -> Result<bool, StoreError> {
        Ok(self
            .db
            .contains_key(queue_key(target, received_at_ms, id))?)
    }
}
