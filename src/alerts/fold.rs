//! The rate limit ([`Folder`]): alerts of one family and target within
//! `alerts.min_interval` of the last message are held and told as a count.
//! Pure: takes the time it is given, never reads a clock or posts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::alert::{Alert, Family, KindCounts};
use super::message::Message;

/// The rate limit: at most one message per family and target per
/// interval; what comes meanwhile is held, and goes out (as a count, with
/// the latest alert) when the interval has passed.
#[derive(Debug, Default)]
pub struct Folder {
    slots: HashMap<(Family, Option<String>), Slot>,
}

#[derive(Debug)]
struct Slot {
    last_sent: Instant,
    held: Option<Held>,
}

/// Alerts held back: the latest, and the kinds of those before it.
#[derive(Debug)]
struct Held {
    latest: Alert,
    earlier: KindCounts,
    since_ms: u64,
}

impl Held {
    fn new(alert: Alert) -> Held {
        Held {
            since_ms: alert.at_ms,
            latest: alert,
            earlier: KindCounts::default(),
        }
    }

    fn hold(&mut self, alert: Alert) {
        self.earlier.add(self.latest.kind);
        self.latest = alert;
    }

    fn into_message(self) -> Message {
        Message {
            since_ms: (self.earlier.total() > 0).then_some(self.since_ms),
            alert: self.latest,
            folded: self.earlier,
        }
    }

    /// Every alert held, as counts (folded into a newer alert's message).
    fn counts(&self) -> KindCounts {
        let mut all = self.earlier;
        all.add(self.latest.kind);
        all
    }
}

impl Folder {
    /// `alert`, arriving at `now`: the message to post now, or `None` when
    /// it is held for a later one.
    pub fn offer(&mut self, alert: Alert, now: Instant, interval: Duration) -> Option<Message> {
        let key = (alert.kind.family(), alert.target.clone());
        if let Some(slot) = self.slots.get_mut(&key) {
            if now < slot.last_sent + interval {
                match &mut slot.held {
                    Some(held) => held.hold(alert),
                    None => slot.held = Some(Held::new(alert)),
                }
                return None;
            }
        }
        // Held alerts not flushed yet (their time came a moment ago) go
        // into this message's count.
        let held = self.slots.remove(&key).and_then(|slot| slot.held);
        self.slots.insert(
            key,
            Slot {
                last_sent: now,
                held: None,
            },
        );
        Some(Message {
            alert,
            folded: held.as_ref().map(Held::counts).unwrap_or_default(),
            since_ms: held.map(|h| h.since_ms),
        })
    }

    /// The messages of held alerts whose interval has passed by `now`,
    /// oldest first; forgets slots quiet for an interval (a target removed
    /// by a reload leaves nothing behind).
    pub fn due(&mut self, now: Instant, interval: Duration) -> Vec<Message> {
        let mut due = Vec::new();
        self.slots.retain(|_, slot| {
            if now < slot.last_sent + interval {
                return true;
            }
            match slot.held.take() {
                Some(held) => {
                    due.push(held.into_message());
                    slot.last_sent = now;
                    true
                }
                None => false,
            }
        });
        due.sort_by_key(|m| m.alert.at_ms);
        due
    }

    /// When the next held alert's interval passes.
    pub fn next_due(&self, interval: Duration) -> Option<Instant> {
        self.slots
            .values()
            .filter(|slot| slot.held.is_some())
            .map(|slot| slot.last_sent + interval)
            .min()
    }

    /// Every held alert as a message, oldest first (the relay stops).
    pub fn drain(&mut self) -> Vec<Message> {
        let mut held: Vec<Message> = self
            .slots
            .drain()
            .filter_map(|(_, slot)| slot.held.map(Held::into_message))
            .collect();
        held.sort_by_key(|m| m.alert.at_ms);
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertKind;
    use crate::alerts::alert::dead;
    use crate::store::EventId;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn alerts_within_the_interval_are_folded_and_the_last_burst_is_flushed() {
        let mut folder = Folder::default();
        let t0 = Instant::now();
        let first = folder.offer(dead("crm", 1, 1000), t0, MINUTE).unwrap();
        assert_eq!((first.folded.total(), first.since_ms), (0, None));
        for n in 2..=15 {
            let later = t0 + Duration::from_secs(n);
            assert_eq!(folder.offer(dead("crm", n, n * 1000), later, MINUTE), None);
        }
        // Another target has its own limit.
        assert!(folder.offer(dead("erp", 99, 3000), t0, MINUTE).is_some());
        assert_eq!(folder.next_due(MINUTE), Some(t0 + MINUTE));
        assert!(folder.due(t0 + Duration::from_secs(59), MINUTE).is_empty());
        let flushed = folder.due(t0 + MINUTE, MINUTE);
        assert_eq!(flushed.len(), 1, "{flushed:?}");
        let last = &flushed[0];
        assert_eq!(
            last.alert.event_id,
            Some(EventId(15)),
            "the latest alert is told"
        );
        assert_eq!((last.folded.total(), last.since_ms), (13, Some(2000)));
        // The flush was a message: the next alert waits for its interval.
        assert_eq!(
            folder.offer(dead("crm", 16, 61_000), t0 + MINUTE, MINUTE),
            None
        );
        assert_eq!(folder.drain().len(), 1);
    }

    #[test]
    fn a_held_alert_whose_time_has_come_is_counted_in_the_next_message() {
        let mut folder = Folder::default();
        let t0 = Instant::now();
        folder.offer(dead("crm", 1, 0), t0, MINUTE).unwrap();
        assert_eq!(folder.offer(dead("crm", 2, 10), t0, MINUTE), None);
        let next = folder
            .offer(dead("crm", 3, 20), t0 + MINUTE, MINUTE)
            .unwrap();
        assert_eq!((next.folded.total(), next.since_ms), (1, Some(10)));
        assert!(folder.due(t0 + MINUTE * 2, MINUTE).is_empty());
        assert!(folder.slots.is_empty(), "a quiet slot is forgotten");
    }

    #[test]
    fn a_circuit_that_flaps_ends_on_its_current_state() {
        let mut folder = Folder::default();
        let t0 = Instant::now();
        let open = folder
            .offer(Alert::circuit_open("crm", "3 failures".into()), t0, MINUTE)
            .unwrap();
        assert_eq!(open.alert.kind, AlertKind::CircuitOpen);
        let step = Duration::from_secs(1);
        assert_eq!(
            folder.offer(Alert::circuit_closed("crm"), t0 + step, MINUTE),
            None
        );
        assert_eq!(
            folder.offer(
                Alert::circuit_open("crm", "3 failures".into()),
                t0 + step * 2,
                MINUTE
            ),
            None
        );
        let flushed = folder.due(t0 + MINUTE, MINUTE);
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].alert.kind, AlertKind::CircuitOpen);
        assert_eq!(flushed[0].folded.total(), 1);
    }
}
