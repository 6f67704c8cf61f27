//! The implicit front of a target's queue: new events' deliveries, kept as
//! no key at all. Every event above the target's **watermark** that the
//! target subscribes to waits for it, due at its receive time; every one at
//! or below it has been settled (delivered, moved to an explicit queue
//! entry by a failed attempt, or dead-lettered). This is the in-memory
//! side: what the dispatcher has read past, taken and settled above the
//! watermark, in a bounded window so that memory does not grow with the
//! backlog.

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;

/// Most deliveries taken or settled above the watermark at once; reading
/// stops while the window is full (the oldest taken one holds it back, e.g.
/// an attempt hanging until its timeout). At most a few hundred KiB per
/// target, and seconds of deliveries at the highest rates measured.
pub const WINDOW: usize = 16_384;

/// Fresh deliveries read ahead of the dispatcher's free slots: one range
/// read of the log serves this many starts instead of one.
pub const READ_AHEAD: usize = 32;

/// A fresh delivery read ahead: id, receive time, body.
pub type ReadAhead = (u64, u64, Bytes);

#[derive(Debug)]
pub struct FreshQueue {
    /// Event types the target takes; `None`: all.
    events: Option<Vec<String>>,
    /// Every fresh delivery at or below this id is settled.
    watermark: u64,
    /// The watermark as last written to the log.
    pub saved: u64,
    /// The id reading has passed: everything above the watermark and at or
    /// below it is taken, settled, or not for this target.
    read_to: u64,
    /// Handed out and not settled yet.
    taken: BTreeSet<u64>,
    /// Settled above the watermark (an older one is still taken).
    settled: BTreeSet<u64>,
    /// Taken, read and not handed out yet (see [`READ_AHEAD`]).
    pub ahead: VecDeque<ReadAhead>,
    /// No explicit queue entry is due before this (ms since the epoch), so
    /// looking at the explicit queue can wait; lowered by every write of an
    /// entry and by a release.
    pub explicit_quiet_until: u64,
}

impl FreshQueue {
    pub fn new(watermark: u64, events: Option<Vec<String>>) -> FreshQueue {
        FreshQueue {
            events,
            watermark,
            saved: watermark,
            read_to: watermark,
            taken: BTreeSet::new(),
            settled: BTreeSet::new(),
            ahead: VecDeque::new(),
            explicit_quiet_until: 0,
        }
    }

    pub fn wants(&self, event: &str) -> bool {
        super::takes(self.events.as_deref(), event)
    }

    pub fn events(&self) -> Option<&[String]> {
        self.events.as_deref()
    }

    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    pub fn read_to(&self) -> u64 {
        self.read_to
    }

    pub fn is_full(&self) -> bool {
        self.taken.len() + self.settled.len() >= WINDOW
    }

    /// Taken or settled already: reading passes over it.
    pub fn is_busy(&self, id: u64) -> bool {
        self.taken.contains(&id) || self.settled.contains(&id)
    }

    /// Reading went past `id` (taken, or not for this target).
    pub fn pass(&mut self, id: u64) {
        self.read_to = self.read_to.max(id);
    }

    pub fn take(&mut self, id: u64) {
        self.taken.insert(id);
        self.pass(id);
    }

    /// Whether the delivery of `id` waits (taken ones included); the
    /// caller checks that the event exists and is for this target.
    pub fn waits(&self, id: u64) -> bool {
        id > self.watermark && !self.settled.contains(&id)
    }

    /// `id` is settled; returns whether the watermark moved.
    pub fn settle(&mut self, id: u64) -> bool {
        if !self.taken.remove(&id) || id <= self.watermark {
            return false;
        }
        self.settled.insert(id);
        self.advance()
    }

    /// `id` was settled by an earlier run after the stored watermark was
    /// written (it has a queue entry or a dead letter now).
    pub fn settled_before(&mut self, id: u64) {
        if id > self.watermark {
            self.settled.insert(id);
        }
    }

    /// Whether the watermark moved since it was last written.
    pub fn unsaved(&self) -> bool {
        self.watermark != self.saved
    }

    /// `id` was taken but not settled (its attempt was abandoned): it is
    /// read again.
    pub fn release(&mut self, id: u64) {
        if self.taken.remove(&id) {
            self.read_to = self.read_to.min(id - 1);
        }
    }

    fn advance(&mut self) -> bool {
        let limit = match self.taken.first() {
            Some(&oldest) => (oldest - 1).min(self.read_to),
            None => self.read_to,
        };
        if limit <= self.watermark {
            return false;
        }
        self.watermark = limit;
        self.settled = self.settled.split_off(&(limit + 1));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_the_oldest_taken_delivery() {
        let mut q = FreshQueue::new(10, None);
        for id in [11, 12, 13] {
            q.take(id);
        }
        assert!(!q.settle(12));
        assert!(!q.settle(13));
        assert_eq!(q.watermark(), 10);
        assert!(q.waits(11) && !q.waits(12) && !q.waits(13));
        assert!(q.settle(11));
        assert_eq!(q.watermark(), 13);
        assert!(q.settled.is_empty());
    }

    #[test]
    fn ids_passed_over_are_settled_with_the_rest() {
        let mut q = FreshQueue::new(0, Some(vec!["visitor_created".into()]));
        q.take(5);
        q.pass(9);
        assert!(q.settle(5));
        assert_eq!(q.watermark(), 9);
    }

    #[test]
    fn a_released_delivery_is_read_again_and_holds_the_watermark() {
        let mut q = FreshQueue::new(0, None);
        for id in [1, 2, 3] {
            q.take(id);
        }
        q.release(2);
        assert_eq!(q.read_to(), 1);
        assert!(q.settle(1));
        assert!(!q.settle(3));
        // 2 is not settled: the watermark stays below it although 3 is done.
        assert_eq!(q.watermark(), 1);
        assert!(q.waits(2) && !q.waits(3));
        assert!(!q.is_busy(2) && q.is_busy(3));
        q.take(2);
        q.pass(3);
        assert!(q.settle(2));
        assert_eq!(q.watermark(), 3);
    }

    #[test]
    fn the_window_is_bounded() {
        let mut q = FreshQueue::new(0, None);
        q.take(1);
        for id in 2..=WINDOW as u64 {
            q.take(id);
            q.settle(id);
        }
        assert!(q.is_full());
        assert!(q.settle(1));
        assert!(!q.is_full());
        assert_eq!(q.watermark(), WINDOW as u64);
    }
}
