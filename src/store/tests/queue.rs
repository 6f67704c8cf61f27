//! Reading a target's due deliveries: found by id at their first place
//! and after a move, and the explicit (retry) queue's cursor and quiet
//! mark, which must never hide an entry that is due.

use super::*;

/// A read of the explicit queue that found nothing due must not mark
/// it quiet past an entry written while it ran (that entry's write
/// lowered the mark before the read's conclusion would raise it).
#[test]
fn a_write_during_a_queue_read_outlives_the_reads_quiet_mark() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let subscription = subscription("crm", None);
    store.adopt_targets(&[subscription]).unwrap();
    let state = |store: &Store| {
        let fronts = store.fronts.lock().unwrap();
        let q = &fronts["crm"];
        (q.explicit_quiet_until, q.explicit_writes)
    };
    // The queue is empty: a read says so.
    let (_, writes) = state(&store);
    store.explicit_quiet("crm", u64::MAX, Some(writes));
    assert_eq!(state(&store).0, u64::MAX);
    // The next read begins (and will find nothing) ...
    let (_, writes) = state(&store);
    // ... an entry due at 5 is written meanwhile ...
    store.explicit_added("crm", 5);
    // ... and the read concludes: nothing until forever.
    store.explicit_quiet("crm", u64::MAX, Some(writes));
    assert_eq!(state(&store).0, 5, "the entry written meanwhile is hidden");
    // A read that began after the write may conclude.
    let (_, writes) = state(&store);
    store.explicit_quiet("crm", 7, Some(writes));
    assert_eq!(state(&store).0, 7);
}

/// A delivery waits either at its first place in the queue (due at its
/// event's receive time, with no other key) or, once moved by a failed
/// attempt or a replay, with an entry by id. In both it must be found by id,
/// count towards the oldest pending age, and keep its event from pruning;
/// once delivered, none of that.
#[tokio::test]
async fn deliveries_are_found_at_their_first_place_and_after_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let options = small(dir.path(), Duration::from_secs(1));
    let store = Store::open(&options).unwrap();
    let subscription = |target: &str| Subscription {
        target: target.into(),
        events: None,
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    let (committer, handle) = store
        .start_committer(
            &options,
            vec![subscription("crm"), subscription("archive")],
            Arc::new(Metrics::new()),
        )
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        let body = format!(r#"{{"event":"visitor_created","n":{n}}}"#);
        let entry = Entry::Event {
            event: "visitor_created".into(),
            body: body.into(),
        };
        ids.push(committer.append(entry).await.unwrap());
    }
    handle.close().await;
    let received: Vec<u64> = ids
        .iter()
        .map(|&id| store.event(id).unwrap().unwrap().received_at_ms)
        .collect();
    let due = |store: &Store, target: &str| {
        let query = DueQuery {
            now_ms: u64::MAX,
            limit: 10,
            ignore_due: true,
            after: None,
            skip: &|_| false,
        };
        store.due_deliveries(target, &query).unwrap().deliveries
    };
    let everything_received = received[2] + 1;
    let targets = vec!["crm".to_string(), "archive".to_string()];

    // At their first place: found, kept, and the oldest is the first event.
    for &id in &ids {
        assert!(store.is_queued("crm", id).unwrap());
    }
    assert_eq!(
        store.target_stats("crm").unwrap().oldest_enqueued_ms,
        Some(received[0])
    );
    let step = store
        .prune_before(everything_received, None, 100, &targets)
        .unwrap();
    assert_eq!((step.examined, step.deleted), (3, 0));

    // The first event's delivery fails and moves a day ahead: still found,
    // still the oldest (the queue's front now holds a younger one).
    let first = due(&store, "crm")[0].clone();
    assert_eq!(first.id, ids[0]);
    let moved = DeliveryState {
        attempts: 1,
        ..first.state.clone()
    };
    store
        .reschedule("crm", &first, received[0] + 86_400_000, &moved)
        .unwrap();
    assert_eq!(due(&store, "crm")[0].id, ids[1]);
    assert!(store.is_queued("crm", ids[0]).unwrap());
    assert_eq!(
        store.target_stats("crm").unwrap().oldest_enqueued_ms,
        Some(received[0])
    );

    // Every delivery to "archive" and the unmoved ones to "crm" succeed:
    // only the moved one keeps its event from pruning.
    for delivery in due(&store, "archive") {
        store.delivered("archive", &delivery).unwrap();
    }
    for delivery in due(&store, "crm") {
        if delivery.id != ids[0] {
            store.delivered("crm", &delivery).unwrap();
        }
    }
    assert!(!store.is_queued("crm", ids[1]).unwrap());
    assert!(!store.is_queued("archive", ids[0]).unwrap());
    let step = store
        .prune_before(everything_received, None, 100, &targets)
        .unwrap();
    assert_eq!((step.examined, step.deleted), (3, 2));
    assert!(store.event(ids[0]).unwrap().is_some(), "still waited for");

    // Once the moved delivery succeeds, nothing waits any more.
    let moved = due(&store, "crm");
    assert_eq!(moved.len(), 1);
    store.delivered("crm", &moved[0]).unwrap();
    assert!(!store.is_queued("crm", ids[0]).unwrap());
    assert_eq!(store.target_stats("crm").unwrap().oldest_enqueued_ms, None);
    let step = store
        .prune_before(everything_received, None, 100, &targets)
        .unwrap();
    assert_eq!(step.deleted, 1);
}

/// One read of the explicit (retry) queue, as the dispatcher makes it.
fn explicit_read(
    store: &Store,
    now_ms: u64,
    limit: usize,
    ignore_due: bool,
    after: Option<(u64, EventId)>,
    skip: &dyn Fn(EventId) -> bool,
) -> Vec<EventId> {
    let query = DueQuery {
        now_ms,
        limit,
        ignore_due,
        after,
        skip,
    };
    let due = store.due_deliveries("crm", &query).unwrap().deliveries;
    due.iter().map(|d| d.id).collect()
}

/// Two events whose first attempts failed: explicit entries A and B, due at
/// `due_ms(0)` and `due_ms(1)`.
async fn two_retries(dir: &Path, due_ms: impl Fn(u64) -> u64) -> (Store, Vec<EventId>) {
    let (store, ids) = open_and_append(
        dir,
        vec![subscription("crm", None)],
        &["visitor_created", "visitor_created"],
    )
    .await;
    for (n, delivery) in due(&store, "crm").into_iter().enumerate() {
        let state = DeliveryState {
            attempts: 1,
            ..delivery.state.clone()
        };
        store
            .reschedule("crm", &delivery, due_ms(n as u64), &state)
            .unwrap();
    }
    (store, ids)
}

/// An attempt that panicked (or could not be recorded) releases its entry,
/// which lies before the dispatcher's cursor: the next read, which resumes
/// after the cursor, finds it from the front. It used to conclude the queue
/// was quiet for good, and the entry waited for a restart.
#[tokio::test]
async fn a_released_retry_behind_the_cursor_is_taken_again() {
    let dir = tempfile::tempdir().unwrap();
    let now = crate::clock::now_ms();
    let (store, ids) = two_retries(dir.path(), |_| now - 1_000).await;
    let (a, b) = (ids[0], ids[1]);
    assert_eq!(
        explicit_read(&store, now, 2, false, None, &|_| false),
        [a, b]
    );
    let cursor = due(&store, "crm")
        .iter()
        .find(|d| d.id == b)
        .map(|d| (d.due_ms, d.id));
    store.release("crm", a, Source::Explicit);
    let b_in_flight = |id| id == b;
    assert_eq!(
        explicit_read(&store, now, 2, false, cursor, &b_in_flight),
        [a]
    );
    assert_eq!(
        explicit_read(&store, now, 2, false, None, &b_in_flight),
        [a]
    );
}

/// After an outage, catching up takes entries due far ahead, so the cursor
/// runs ahead of time; one fails and is rescheduled before the cursor. The
/// read after the cursor finds nothing: that must not hide the entry past
/// its due time (it used to, until a restart).
#[tokio::test]
async fn a_retry_rescheduled_behind_a_catching_up_cursor_is_taken_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let now = crate::clock::now_ms();
    let hour = 3_600_000;
    let (store, ids) = two_retries(dir.path(), |n| now + hour * (n + 1)).await;
    let (a, b) = (ids[0], ids[1]);
    // The circuit closed: catching up takes A (delivered), then B.
    assert_eq!(explicit_read(&store, now, 1, true, None, &|_| false), [a]);
    let queue = due(&store, "crm");
    store.delivered("crm", &queue[0]).unwrap();
    let cursor = Some((queue[1].due_ms, b));
    assert_eq!(
        explicit_read(&store, now, 1, true, Some((now + hour, a)), &|_| false),
        [b]
    );
    // B fails: catching up ends, B is due again in 50 ms.
    let state = DeliveryState {
        attempts: 2,
        ..queue[1].state.clone()
    };
    store
        .reschedule("crm", &queue[1], now + 50, &state)
        .unwrap();
    assert!(explicit_read(&store, now, 1, false, cursor, &|_| false).is_empty());
    assert_eq!(
        explicit_read(&store, now + 60, 1, false, None, &|_| false),
        [b]
    );
}
