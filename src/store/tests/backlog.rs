//! The per-target tallies (queued, dead) and the oldest waiting
//! delivery, read from the `a` entries.

use super::*;

/// The oldest-wait figure reads the `a` entries: a replay (waiting
/// since 900, under the old id 100) does not hide a delivery moved
/// earlier (waiting since 500, id 2000); an `a` entry a crash left
/// without its `p` entry is skipped, and the recount after a crash
/// removes it.
#[test]
fn the_oldest_wait_is_read_by_age_past_replays_and_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let subscription = subscription("crm", None);
    store.adopt_targets(&[subscription]).unwrap();
    for (id, enqueued_ms) in [(100, 900u64), (2000, 500)] {
        let id = EventId(id);
        store
            .db
            .insert(age_key("crm", enqueued_ms, id), &[])
            .unwrap();
        store
            .db
            .insert(moved_key("crm", id), &enqueued_ms.to_be_bytes())
            .unwrap();
    }
    let leftover = age_key("crm", 1, EventId(7));
    store.db.insert(&leftover, &[]).unwrap();
    let oldest = |store: &Store| store.target_stats("crm").unwrap().oldest_enqueued_ms;
    assert_eq!(oldest(&store), Some(500));
    assert!(store.db.contains_key(&leftover).unwrap(), "only skipped");
    store.count_backlogs(&["crm".to_owned()]).unwrap();
    assert!(!store.db.contains_key(&leftover).unwrap());
    assert!(
        store
            .db
            .contains_key(age_key("crm", 500, EventId(2000)))
            .unwrap()
    );
    assert_eq!(oldest(&store), Some(500));
    // Settling a delivery, either way, takes its `a` entry too.
    let moved = |id, enqueued_ms| Delivery {
        id: EventId(id),
        due_ms: 0,
        state: DeliveryState {
            enqueued_ms,
            ..Default::default()
        },
        source: Source::Explicit,
        body: None,
    };
    store.delivered("crm", &moved(2000, 500)).unwrap();
    assert!(
        !store
            .db
            .contains_key(age_key("crm", 500, EventId(2000)))
            .unwrap()
    );
    store
        .bury(&moved(100, 900), &dead_letter(EventId(100)))
        .unwrap();
    assert!(
        !store
            .db
            .contains_key(age_key("crm", 900, EventId(100)))
            .unwrap()
    );
    assert_eq!(oldest(&store), None);
}

/// A dead letter named twice in one purge is removed, and counted, once.
#[test]
fn purging_a_letter_named_twice_counts_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    for id in [EventId(1), EventId(2)] {
        store
            .db
            .insert(dead_key("crm", id), record::encode_dead(&dead_letter(id)))
            .unwrap();
    }
    store.count_backlogs(&["crm".to_owned()]).unwrap();
    assert_eq!(store.tallies.get("crm"), Backlog { queued: 0, dead: 2 });
    let twice = [
        ("crm".to_owned(), EventId(1)),
        ("crm".to_owned(), EventId(1)),
    ];
    assert_eq!(store.purge_dead_letters(&twice).unwrap(), 1);
    assert_eq!(store.tallies.get("crm"), Backlog { queued: 0, dead: 1 });
    assert_eq!(store.dead_letters("crm").unwrap().len(), 1);
}
