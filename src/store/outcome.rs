//! What an attempt's outcome writes: delivered, rescheduled after a failure,
//! or buried as a dead letter.

use super::*;

impl Store {
    /// The target took the event: the delivery leaves the queue.
    ///
    /// Two single-key removes, not a batch: a sled batch takes a process-wide
    /// write lock that stalls every other reader and writer (the committer
    /// included), and deliveries are frequent. A delivery at its first place
    /// has no `p` entry, and removing a missing key only reads in sled. The
    /// order makes a crash in between harmless: the queue entry goes last,
    /// so at worst the delivery is made once more.
    pub fn delivered(&self, target: &str, delivery: &Delivery) -> Result<(), StoreError> {
        if delivery.source == Source::Implicit {
            // Settled in memory; written with the next watermark.
            self.tallies.change(target, -1, 0);
            crashpoint::reached(crashpoint::DELIVERY_HALF_RECORDED);
            self.settle(target, delivery.id);
            return Ok(());
        }
        self.db.remove(moved_key(target, delivery.id))?;
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
    ) -> Result<(), StoreError> {
        // The entry leaves its first place, so it gets its `a` and `p`
        // entries first (setting them again when it already has them
        // writes nothing new). Then the new entry, then the old one goes
        // (single-key writes, see `delivered`): a crash in between leaves
        // two entries, so at worst one extra attempt, never none.
        self.db
            .insert(age_key(target, state.enqueued_ms, delivery.id), &[])?;
        self.db.insert(
            moved_key(target, delivery.id),
            &state.enqueued_ms.to_be_bytes(),
        )?;
        self.db.insert(
            queue_key(target, due_ms, delivery.id),
            record::encode_state(state),
        )?;
        self.explicit_added(target, due_ms);
        crashpoint::reached(crashpoint::RESCHEDULE_HALF_RECORDED);
        if delivery.source == Source::Implicit {
            // It has its queue entry now; the watermark may pass it.
            self.settle(target, delivery.id);
            return Ok(());
        }
        self.db
            .remove(queue_key(target, delivery.due_ms, delivery.id))?;
        Ok(())
    }

    /// Moves a delivery out of the queue into the dead-letter store.
    pub fn bury(&self, delivery: &Delivery, dead: &DeadLetter) -> Result<(), StoreError> {
        let target = dead.target.as_str();
        let mut batch = sled::Batch::default();
        if delivery.source == Source::Explicit {
            batch.remove(&queue_key(target, delivery.due_ms, delivery.id)[..]);
            batch.remove(moved_key(target, delivery.id));
            batch.remove(age_key(target, delivery.state.enqueued_ms, delivery.id));
        }
        batch.insert(dead_key(target, delivery.id), record::encode_dead(dead));
        self.db.apply_batch(batch)?;
        if delivery.source == Source::Implicit {
            self.settle(target, delivery.id);
        }
        self.tallies.change(target, -1, 1);
        Ok(())
    }
}
