//! Targets added, changed, removed and forgotten: what waited for them is
//! kept (not queued twice) or, once forgotten, dropped.

use super::*;

/// Stores `visitor_created` events with `ids` (each received at its id
/// in ms / 1000), then settles two of them at `target` after its
/// watermark was written: 2000 dead-lettered, 3000 moved to a retry
/// (its age, moved and queue entries).
fn store_and_settle_some(store: &Store, target: &str, ids: &[u64]) {
    for &id in ids {
        let event = record::encode_event(id / 1000, "visitor_created", b"{}");
        store.db.insert(id_key(EVENT_PREFIX, id), event).unwrap();
    }
    store
        .db
        .insert(
            dead_key(target, EventId(2_000)),
            record::encode_dead(&dead_letter(EventId(2_000))),
        )
        .unwrap();
    let moved = DeliveryState {
        attempts: 1,
        enqueued_ms: 3,
        ..Default::default()
    };
    store
        .db
        .insert(age_key(target, 3, EventId(3_000)), &[])
        .unwrap();
    store
        .db
        .insert(moved_key(target, EventId(3_000)), &3u64.to_be_bytes())
        .unwrap();
    store
        .db
        .insert(
            queue_key(target, 60_000, EventId(3_000)),
            record::encode_state(&moved),
        )
        .unwrap();
}

/// A target whose event types change (or that is removed) gets queue
/// entries for what still waited above its stored watermark. A delivery
/// there that was already dead-lettered, or moved by a failed attempt
/// (it has its own queue entry), did not wait at its first place: it
/// must not be queued (again) there.
#[test]
fn a_changed_target_does_not_queue_again_what_was_dead_lettered_or_moved() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let subscription = |events: Option<Vec<String>>| Subscription {
        target: "crm".into(),
        events,
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    store.adopt_targets(&[subscription(None)]).unwrap();
    // Three new events above the watermark: 1000 still in flight when
    // the relay stopped, 2000 dead-lettered, 3000 moved to a retry.
    store_and_settle_some(&store, "crm", &[1_000, 2_000, 3_000]);
    // The next start: the target now takes one event type only.
    store
        .adopt_targets(&[subscription(Some(vec!["visitor_created".into()]))])
        .unwrap();
    let entries: Vec<EventId> = store
        .db
        .scan_prefix(queue_prefix("crm"))
        .map(|item| parse_queue_key(&item.unwrap().0).unwrap().1)
        .collect();
    assert_eq!(
        entries,
        [EventId(1_000), EventId(3_000)],
        "the dead letter was queued again, or the moved delivery twice"
    );
}

#[test]
fn forgetting_a_removed_target_drops_what_waits_for_it_and_lets_its_events_be_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let subscription = |target: &str, events: Option<Vec<String>>| Subscription {
        target: target.into(),
        events,
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    let slack = || subscription("slack", Some(vec!["conversation_ended".into()]));
    store
        .adopt_targets(&[subscription("crm", None), slack()])
        .unwrap();
    // At crm: 2000 dead-lettered, 3000 moved to a retry, 1000 and 4000
    // waiting at their first place.
    store_and_settle_some(&store, "crm", &[1_000, 2_000, 3_000, 4_000]);
    // The next start: crm is no longer configured.
    store.adopt_targets(&[slack()]).unwrap();
    let prune = |store: &Store| {
        let mut targets: Vec<String> = store.targets_in_log().unwrap().into_iter().collect();
        targets.push("slack".into());
        store
            .prune_before(1_000, None, 100, &targets)
            .unwrap()
            .deleted
    };
    assert_eq!(prune(&store), 0, "crm's deliveries hold every event");

    assert_eq!(store.forget_target("crm").unwrap(), (3, 1));
    for prefix in [QUEUE_PREFIX, MOVED_PREFIX, AGE_PREFIX, DEAD_PREFIX] {
        assert_eq!(
            store.db.scan_prefix(target_prefix(prefix, "crm")).count(),
            0,
            "crm's {} entries",
            prefix as char
        );
    }
    assert!(!store.targets_in_log().unwrap().contains("crm"));
    assert!(
        store.stored_watermark("slack").unwrap().is_some(),
        "slack untouched"
    );
    assert_eq!(prune(&store), 4, "nothing holds the events any more");
}

/// A target added to the configuration takes only events that arrive
/// after it; one whose event types change keeps, as queue entries, what
/// waited for it under the old types, and one that is removed keeps its
/// waiting deliveries the same way (as before there were watermarks).
#[tokio::test]
async fn targets_added_changed_and_removed_keep_what_was_queued_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let crm = subscription("crm", None);
    let (store, before) = open_and_append(
        dir.path(),
        vec![crm.clone()],
        &["visitor_created", "visitor_created"],
    )
    .await;
    drop(store);

    let slack = subscription("slack", None);
    let (store, added) = open_and_append(
        dir.path(),
        vec![crm.clone(), slack.clone()],
        &["visitor_created"],
    )
    .await;
    assert_eq!(store.queued_count("crm"), 3);
    assert_eq!(store.queued_count("slack"), 1, "only what came after it");
    assert_eq!(due(&store, "slack")[0].id, added[0]);
    drop(store);

    // crm now takes conversations only; slack is gone.
    let crm_conversations = subscription("crm", Some(&["conversation_ended"]));
    let (store, after) = open_and_append(
        dir.path(),
        vec![crm_conversations],
        &["visitor_created", "conversation_ended"],
    )
    .await;
    let crm = due(&store, "crm");
    let explicit: Vec<EventId> = crm
        .iter()
        .filter(|d| !(d.source == Source::Implicit))
        .map(|d| d.id)
        .collect();
    let implicit: Vec<EventId> = crm
        .iter()
        .filter(|d| d.source == Source::Implicit)
        .map(|d| d.id)
        .collect();
    assert_eq!(explicit, [before[0], before[1], added[0]]);
    assert_eq!(implicit, [after[1]], "the new types from now on");
    assert!(store.targets_in_log().unwrap().contains("slack"));
    let slack = due(&store, "slack");
    assert_eq!(slack.len(), 1);
    assert_eq!(
        (slack[0].id, (slack[0].source == Source::Implicit)),
        (added[0], false)
    );
}
