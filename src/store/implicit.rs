//! The implicit front of a target's queue: new events' deliveries, kept as
//! no key at all. Every event above the target's **watermark** that the
//! target subscribes to waits for it, due at its receive time; every one at
//! or below it has been settled (delivered, moved to an explicit queue
//! entry by a failed attempt, or dead-lettered). This is the in-memory
//! side: what the dispatcher has read past, taken and settled above the
//! watermark. Settled ids are kept as ranges, joined whenever nothing
//! between them waits, so memory follows the deliveries in flight, not the
//! backlog, nor how long the oldest attempt takes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

/// Most deliveries taken and not settled at once; reading stops while this
/// many are (a safety bound: the dispatcher takes no more than it has
/// free attempts for, plus [`READ_AHEAD`]). An attempt hanging until its
/// timeout does not hold reading back: what settles after it joins one
/// range however many there are.
pub const WINDOW: usize = 16_384;

/// Fresh deliveries read ahead of the dispatcher's free slots: one range
/// read of the log serves this many starts instead of one.
pub const READ_AHEAD: usize = 32;

/// An implicit delivery read ahead of being handed out.
#[derive(Debug)]
pub struct ReadAhead {
    pub id: u64,
    pub received_at_ms: u64,
    pub body: Bytes,
}

#[derive(Debug)]
pub struct ImplicitQueue {
    /// Event types the target takes; `None`: all.
    events: Option<Vec<String>>,
    /// Every implicit delivery at or below this id is settled.
    watermark: u64,
    /// The watermark as last written to the log.
    pub saved: u64,
    /// The id reading has passed: everything above the watermark and at or
    /// below it is taken, settled, or not for this target.
    read_to: u64,
    /// Handed out and not settled yet.
    taken: BTreeSet<u64>,
    /// Settled above the watermark (an older one is still taken), as
    /// ranges first id → last id: every id in a range that is for this
    /// target is settled. Two ranges join when every id between them has
    /// been read and none is taken (see [`ImplicitQueue::joins`]).
    settled: BTreeMap<u64, u64>,
    /// Taken, read and not handed out yet (see [`READ_AHEAD`]).
    pub ahead: VecDeque<ReadAhead>,
    /// No explicit queue entry is due before this (ms since the epoch), so
    /// looking at the explicit queue can wait; lowered by every write of an
    /// entry and by a release.
    pub explicit_quiet_until: u64,
    /// Counts the writes and releases of explicit entries, so that a read
    /// that ran meanwhile does not set `explicit_quiet_until` past them.
    pub explicit_writes: u64,
}

impl ImplicitQueue {
    pub fn new(watermark: u64, events: Option<Vec<String>>) -> ImplicitQueue {
        ImplicitQueue {
            events,
            watermark,
            saved: watermark,
            read_to: watermark,
            taken: BTreeSet::new(),
            settled: BTreeMap::new(),
            ahead: VecDeque::new(),
            explicit_quiet_until: 0,
            explicit_writes: 0,
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
        self.taken.len() >= WINDOW
    }

    /// Taken or settled already: reading passes over it.
    pub fn is_busy(&self, id: u64) -> bool {
        self.taken.contains(&id) || self.is_settled(id)
    }

    fn is_settled(&self, id: u64) -> bool {
        self.settled
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &last)| last >= id)
    }

    /// Reading went past `id` (taken, or not for this target).
    pub fn pass(&mut self, id: u64) {
        if id <= self.read_to {
            return;
        }
        let from = self.read_to.saturating_add(2);
        self.read_to = id;
        // Ranges settled above where reading was (after a restart or a
        // release) may join what is below them now that it has been read.
        let end = id.saturating_add(1);
        let mut cursor = from;
        while cursor <= end
            && let Some((&first, &last)) = self.settled.range(cursor..=end).next()
        {
            cursor = last.saturating_add(1);
            if let Some((&below, &below_last)) = self.settled.range(..first).next_back()
                && self.joins(below_last, first)
            {
                self.settled.remove(&first);
                self.settled.insert(below, last);
            }
        }
    }

    pub fn take(&mut self, id: u64) {
        self.taken.insert(id);
        self.pass(id);
    }

    /// Whether the delivery of `id` waits (taken ones included); the
    /// caller checks that the event exists and is for this target.
    pub fn waits(&self, id: u64) -> bool {
        id > self.watermark && !self.is_settled(id)
    }

    /// `id` is settled; returns whether the watermark moved.
    pub fn settle(&mut self, id: u64) -> bool {
        if !self.taken.remove(&id) || id <= self.watermark {
            return false;
        }
        self.insert_settled(id);
        self.advance()
    }

    /// `id` was settled by an earlier run after the stored watermark was
    /// written (it has a queue entry or a dead letter now).
    pub fn settled_before(&mut self, id: u64) {
        if id > self.watermark {
            self.insert_settled(id);
        }
    }

    fn insert_settled(&mut self, id: u64) {
        let (mut first, mut last) = (id, id);
        if let Some((&below, &below_last)) = self.settled.range(..=id).next_back() {
            if below_last >= id {
                return;
            }
            if self.joins(below_last, id) {
                first = below;
            }
        }
        if let Some((&above, &above_last)) = self.settled.range(id + 1..).next()
            && self.joins(id, above)
        {
            self.settled.remove(&above);
            last = above_last;
        }
        self.settled.insert(first, last);
    }

    /// Whether a range ending at `last` and one starting at `first` join:
    /// every id between them has been read (a released one never has: it
    /// lies above where reading is) and none is taken.
    fn joins(&self, last: u64, first: u64) -> bool {
        first <= self.read_to.saturating_add(1)
            && self.taken.range(last + 1..first).next().is_none()
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
        let mut above = self.settled.split_off(&(limit + 1));
        if let Some((_, &last)) = self.settled.last_key_value()
            && last > limit
        {
            above.insert(limit + 1, last);
        }
        self.settled = above;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_the_oldest_taken_delivery() {
        let mut q = ImplicitQueue::new(10, None);
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
        let mut q = ImplicitQueue::new(0, Some(vec!["visitor_created".into()]));
        q.take(5);
        q.pass(9);
        assert!(q.settle(5));
        assert_eq!(q.watermark(), 9);
    }

    #[test]
    fn a_released_delivery_is_read_again_and_holds_the_watermark() {
        let mut q = ImplicitQueue::new(0, None);
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
    fn a_hanging_oldest_delivery_does_not_hold_reading_back() {
        let mut q = ImplicitQueue::new(0, None);
        q.take(1);
        // Many times the window settles after it, with ids not for this
        // target between them and a few in flight at any time.
        let mut next = 2;
        for _ in 0..4 * WINDOW {
            assert!(!q.is_full());
            q.take(next);
            q.pass(next + 1);
            q.take(next + 2);
            assert!(!q.settle(next));
            assert!(!q.settle(next + 2));
            next += 3;
        }
        // One range: memory does not grow with what settled.
        assert_eq!(q.settled.len(), 1);
        assert_eq!(q.watermark(), 0);
        assert!(q.waits(1) && !q.waits(2) && !q.waits(next - 1));
        assert!(q.settle(1));
        assert_eq!(q.watermark(), next - 1);
        assert!(q.settled.is_empty());
    }

    #[test]
    fn settled_ranges_join_only_over_what_was_read() {
        // After a restart: 5 and 7 were settled by the last run; reading
        // has not reached them, so 6 (and 1..4) may still wait.
        let mut q = ImplicitQueue::new(0, None);
        q.settled_before(5);
        q.settled_before(7);
        assert_eq!(q.settled.len(), 2);
        assert!(q.waits(6) && !q.waits(5) && !q.waits(7));
        q.take(2);
        q.pass(4);
        // Reading passes 5 and 6 is taken: 7 still may not join.
        q.take(6);
        assert!(q.is_busy(5) && q.is_busy(7));
        assert!(q.settle(2));
        assert_eq!(q.watermark(), 5);
        assert!(q.waits(6) && !q.waits(7));
        // Reading has not passed 7: the watermark stops below it.
        assert!(q.settle(6));
        assert_eq!(q.watermark(), 6);
        q.take(9);
        assert!(q.settle(9));
        assert_eq!(q.watermark(), 9);
        assert!(q.settled.is_empty());
    }

    #[test]
    fn reading_past_ranges_settled_by_the_last_run_joins_them() {
        let mut q = ImplicitQueue::new(0, None);
        for id in [5, 7, 9] {
            q.settled_before(id);
        }
        q.take(2);
        // 6 and 8 are not for this target.
        q.pass(10);
        assert_eq!(q.settled.len(), 1);
        assert!(q.is_busy(5) && q.is_busy(9) && !q.waits(6));
        assert!(q.settle(2));
        assert_eq!(q.watermark(), 10);
        assert!(q.settled.is_empty());
    }

    #[test]
    fn the_window_bounds_what_is_taken() {
        let mut q = ImplicitQueue::new(0, None);
        for id in 1..=WINDOW as u64 {
            assert!(!q.is_full());
            q.take(id);
        }
        assert!(q.is_full());
        assert!(q.settle(1));
        assert!(!q.is_full());
    }

    /// The ranges against the plainest model: a set of every settled id
    /// (what this module kept before ranges), under random reading,
    /// settling, releasing and ids settled by an earlier run.
    mod against_a_set {
        use super::*;
        use proptest::prelude::*;

        const IDS: u64 = 48;

        #[derive(Default)]
        struct Model {
            watermark: u64,
            read_to: u64,
            taken: BTreeSet<u64>,
            settled: BTreeSet<u64>,
        }

        impl Model {
            fn busy(&self, id: u64) -> bool {
                self.taken.contains(&id) || self.settled.contains(&id)
            }
            fn settle(&mut self, id: u64) {
                self.taken.remove(&id);
                self.settled.insert(id);
                let limit = match self.taken.first() {
                    Some(&oldest) => (oldest - 1).min(self.read_to),
                    None => self.read_to,
                };
                if limit > self.watermark {
                    self.watermark = limit;
                    self.settled = self.settled.split_off(&(limit + 1));
                }
            }
        }

        #[derive(Debug, Clone)]
        enum Op {
            /// Read on up to this many ids.
            Read(u64),
            /// Settle the n-th taken one (modulo how many there are).
            Settle(usize),
            Release(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (1..8u64).prop_map(Op::Read),
                any::<usize>().prop_map(Op::Settle),
                any::<usize>().prop_map(Op::Release),
            ]
        }

        proptest! {
            #[test]
            fn ranges_answer_as_the_set_does(
                for_target in proptest::collection::vec(any::<bool>(), IDS as usize),
                before in proptest::collection::btree_set(1..=IDS, 0..6),
                ops in proptest::collection::vec(op(), 1..60),
            ) {
                let mine = |id: u64| for_target[(id - 1) as usize];
                let mut q = ImplicitQueue::new(0, None);
                let mut m = Model::default();
                for &id in before.iter().filter(|&&id| mine(id)) {
                    q.settled_before(id);
                    m.settled.insert(id);
                }
                for op in ops {
                    match op {
                        Op::Read(n) => {
                            // As `take_implicit` reads: skip what is busy,
                            // take what is for the target, pass the rest.
                            let end = (m.read_to + n).min(IDS);
                            for id in m.read_to + 1..=end {
                                // (A range also covers ids not for the
                                // target: busy or not, they are passed.)
                                if mine(id) {
                                    prop_assert_eq!(q.is_busy(id), m.busy(id), "id {}", id);
                                    if m.busy(id) {
                                        continue;
                                    }
                                }
                                if mine(id) {
                                    q.take(id);
                                    m.taken.insert(id);
                                } else {
                                    q.pass(id);
                                }
                                m.read_to = m.read_to.max(id);
                            }
                        }
                        Op::Settle(n) if !m.taken.is_empty() => {
                            let id = *m.taken.iter().nth(n % m.taken.len()).unwrap();
                            q.settle(id);
                            m.settle(id);
                        }
                        Op::Release(n) if !m.taken.is_empty() => {
                            let id = *m.taken.iter().nth(n % m.taken.len()).unwrap();
                            q.release(id);
                            m.taken.remove(&id);
                            m.read_to = m.read_to.min(id - 1);
                        }
                        _ => {}
                    }
                    prop_assert_eq!(q.watermark(), m.watermark);
                    prop_assert_eq!(q.read_to(), m.read_to);
                    for id in (1..=IDS).filter(|&id| mine(id)) {
                        prop_assert_eq!(q.waits(id), id > m.watermark && !m.settled.contains(&id), "id {}", id);
                    }
                    // Memory follows what is in flight, not what settled:
                    // up to where reading is, ranges are apart only where
                    // something is taken (above it lie only ids settled
                    // after a release, or by the last run).
                    let reached = q.settled.range(..=q.read_to() + 1).count();
                    prop_assert!(reached <= q.taken.len() + 1, "{} ranges", reached);
                }
            }
        }
    }
}
