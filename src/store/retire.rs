//! A reload's change of targets, at a cut the committer chooses: every
//! event at or below it was committed for the old targets, every one above
//! it for the new.
//!
//! A target that stops taking events (removed, or given other event types)
//! gives up its implicit queue: what waited above its watermark, up to the
//! cut, gets explicit queue entries. A target that starts (added, or with
//! its new event types) takes what comes above the cut from a watermark
//! there. Both are written by the apply thread before any batch committed
//! after the cut, so that whatever of those batches a crash leaves in sled,
//! or a checkpoint makes durable, comes with them: the retired watermark as
//! an `r` record (its waiting deliveries are queued by the next open if
//! this run does not get to it), the new one as the target's `w` record.

use super::*;

/// A change of one target at a reload's cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetChange {
    /// The target stops taking events above the cut; its deliveries
    /// waiting above `watermark` (of `events`) get explicit entries.
    Retire {
        target: String,
        watermark: u64,
        events: Option<Vec<String>>,
    },
    /// The target takes `events` from above the cut.
    Start {
        target: String,
        events: Option<Vec<String>>,
    },
}

/// A retired implicit queue whose waiting deliveries are not queued yet.
pub(super) struct Retired {
    pub(super) target: String,
    /// `None` until the committer has switched: until then new events can
    /// still be for the target.
    pub(super) cut: Option<u64>,
    pub(super) q: ImplicitQueue,
}

/// A retired watermark as stored (an `r` record).
struct StoredRetired {
    target: String,
    cut: u64,
    record: WatermarkRecord,
}

impl Retired {
    /// Whether event `id`, of type `event`, waits in this retired queue.
    pub(super) fn waits(&self, id: u64, event: &str) -> bool {
        self.cut.is_none_or(|cut| id <= cut) && self.q.waits(id) && self.q.wants(event)
    }
}

impl TargetChange {
    /// The sled writes of this change at `cut`, in the order they must
    /// reach sled (a retirement before a start of the same target).
    pub(super) fn write(changes: &[TargetChange], cut: u64) -> Writes {
        let mut writes = Writes::default();
        let (retires, starts): (Vec<_>, Vec<_>) = changes
            .iter()
            .partition(|c| matches!(c, TargetChange::Retire { .. }));
        for change in retires.into_iter().chain(starts) {
            match change {
                TargetChange::Retire {
                    target,
                    watermark,
                    events,
                } => {
                    let record = record::encode_watermark(*watermark, events.as_deref());
                    writes.insert(retired_key(target, cut), record);
                    writes.remove(target_prefix(WATERMARK_PREFIX, target));
                }
                TargetChange::Start { target, events } => {
                    let record = record::encode_watermark(cut, events.as_deref());
                    writes.insert(target_prefix(WATERMARK_PREFIX, target), record);
                }
            }
        }
        writes
    }
}

impl Store {
    /// Takes the implicit queues of `targets` (whose dispatchers have
    /// stopped) out of use, and returns the changes that retire them at the
    /// cut. No watermark of theirs is written after this: a later write
    /// would undo the retirement.
    pub fn retire_fronts(&self, targets: &[String]) -> Vec<TargetChange> {
        let _writes = self.watermark_saved.lock().expect("watermark lock");
        let mut fronts = self.fronts.lock().expect("implicit lock");
        let mut retired = self.retired.lock().expect("retired lock");
        let mut changes = Vec::new();
        for target in targets {
            let Some(q) = fronts.remove(target) else {
                continue;
            };
            changes.push(TargetChange::Retire {
                target: target.clone(),
                watermark: q.watermark(),
                events: q.events().map(<[String]>::to_vec),
            });
            retired.push(Retired {
                target: target.clone(),
                cut: None,
                q,
            });
        }
        changes
    }

    /// Puts back the queues [`Store::retire_fronts`] took when the committer
    /// did not switch (it was closing).
    pub fn restore_fronts(&self) {
        let mut fronts = self.fronts.lock().expect("implicit lock");
        let mut retired = self.retired.lock().expect("retired lock");
        let (kept, back): (Vec<_>, Vec<_>) = std::mem::take(&mut *retired)
            .into_iter()
            .partition(|r| r.cut.is_some());
        *retired = kept;
        for r in back {
            fronts.insert(r.target, r.q);
        }
    }

    /// The committer switched at `cut` and the apply thread wrote the
    /// changes: the retired queues end at it, and `started` take from
    /// above it.
    pub fn finish_resubscribe(&self, cut: u64, started: &[Subscription]) {
        let mut fronts = self.fronts.lock().expect("implicit lock");
        for r in self.retired.lock().expect("retired lock").iter_mut() {
            r.cut.get_or_insert(cut);
        }
        for s in started {
            let q = ImplicitQueue::new(cut, s.events.clone());
            fronts.insert(s.target.clone(), q);
        }
    }

    /// Gives every delivery still waiting in a retired queue an explicit
    /// queue entry, and deletes its `r` record. Returns how many, by
    /// target; what fails stays for a later call (or the next open).
    pub fn queue_retired(&self) -> Result<Vec<(String, u64)>, StoreError> {
        // Pruning must not take an event between leaving the retired queue
        // and getting its queue entry (see `prune_step`).
        let _step = self.prune_step.lock().expect("prune lock");
        let mut done = Vec::new();
        loop {
            let next = {
                let mut retired = self.retired.lock().expect("retired lock");
                let at = retired.iter().position(|r| r.cut.is_some());
                at.map(|at| retired.remove(at))
            };
            let Some(r) = next else {
                return Ok(done);
            };
            let cut = r.cut.expect("chosen for it");
            let queued = self
                .queue_waiting(&r.target, r.q.watermark(), cut, |id, event| {
                    r.q.waits(id) && r.q.wants(event)
                })
                .and_then(|queued| {
                    self.db.remove(retired_key(&r.target, cut))?;
                    Ok(queued)
                });
            match queued {
                Ok(queued) => done.push((r.target, queued)),
                Err(err) => {
                    self.retired.lock().expect("retired lock").push(r);
                    return Err(err);
                }
            }
        }
    }

    /// Queues what waits in the retired watermarks stored by a run that
    /// ended before it queued them (at open, before the targets start).
    /// Returns whether there were any.
    pub(super) fn queue_stored_retired(&self) -> Result<bool, StoreError> {
        let mut any = false;
        for r in self.stored_retired()? {
            let queued = self.queue_waiting(&r.target, r.record.watermark, r.cut, |_, event| {
                takes(r.record.events.as_deref(), event)
            })?;
            tracing::info!(target = %r.target, queued, "deliveries waiting for a target a reload removed or changed now have queue entries");
            self.db.remove(retired_key(&r.target, r.cut))?;
            any = true;
        }
        Ok(any)
    }

    /// The stored retired watermarks as queues, for commands run offline
    /// (which see what waits in them, changing nothing).
    pub(super) fn load_retired(&self) -> Result<(), StoreError> {
        let mut loaded = Vec::new();
        for r in self.stored_retired()? {
            let q = self.implicit_queue(&r.target, r.record.watermark, r.record.events)?;
            loaded.push(Retired {
                target: r.target,
                cut: Some(r.cut),
                q,
            });
        }
        *self.retired.lock().expect("retired lock") = loaded;
        Ok(())
    }

    /// Every `r` record.
    fn stored_retired(&self) -> Result<Vec<StoredRetired>, StoreError> {
        let mut stored = Vec::new();
        for item in self.db.scan_prefix([RETIRED_PREFIX]) {
            let (key, value) = item?;
            let corrupt = |reason| StoreError::Corrupt {
                key: key.to_vec(),
                reason,
            };
            let (target, cut) =
                parse_target_key(&key).ok_or_else(|| corrupt(record::DecodeError::Truncated))?;
            let record = record::decode_watermark(&value).map_err(corrupt)?;
            stored.push(StoredRetired {
                target: target.to_owned(),
                cut: cut.0,
                record,
            });
        }
        Ok(stored)
    }
}
