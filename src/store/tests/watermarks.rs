//! A target's implicit queue: new events wait above its watermark
//! without a queue entry, a hanging attempt holds back nothing after it,
//! and queue entries of a log from before watermarks are kept.

use super::*;

/// An attempt that hangs (until its timeout, say) holds the watermark
/// below it, but not the deliveries after it: many more than the implicit
/// window settle meanwhile, and once it settles nothing waits, in memory
/// or after a restart.
#[tokio::test]
async fn a_hanging_attempt_does_not_hold_back_the_deliveries_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = small(dir.path(), Duration::from_secs(1));
    let events = IMPLICIT_WINDOW as u64 + 1_000;
    {
        let store = Store::open(&options).unwrap();
        let subscriptions = vec![subscription("crm", None)];
        store.adopt_targets(&subscriptions).unwrap();
        let (committer, handle) = store
            .start_committer(&options, subscriptions, Arc::new(Metrics::new()))
            .unwrap();
        let mut appends = tokio::task::JoinSet::new();
        for n in 0..events {
            let committer = committer.clone();
            appends.spawn(async move {
                let body = format!(r#"{{"event":"visitor_created","n":{n}}}"#);
                let entry = Entry::Event {
                    event: "visitor_created".into(),
                    body: body.into(),
                };
                committer.append(entry).await.unwrap()
            });
        }
        appends.join_all().await;
        handle.close().await;

        let mut batch = due(&store, "crm");
        let hanging = batch.remove(0);
        let mut settled = 0;
        while !batch.is_empty() {
            for delivery in &batch {
                store.delivered("crm", delivery).unwrap();
            }
            settled += batch.len() as u64;
            batch = due(&store, "crm");
        }
        assert_eq!(settled, events - 1, "deliveries after the hanging one");
        assert_eq!(store.queued_count("crm"), 1);
        store.delivered("crm", &hanging).unwrap();
        assert_eq!(store.queued_count("crm"), 0);
        store.save_backlog_counts(&["crm".to_string()]).unwrap();
    }
    let store = Store::open(&options).unwrap();
    store.adopt_targets(&[subscription("crm", None)]).unwrap();
    assert_eq!(store.queued_count("crm"), 0);
    assert!(due(&store, "crm").is_empty());
}

/// A new event's delivery to a target has no queue entry: it waits above
/// the target's watermark and is read from the event itself, body
/// included, once. It is found by id, counted, keeps its event from
/// pruning, and counts towards the oldest age like a queued one; a failed
/// attempt moves it to an explicit entry; what was settled stays settled
/// after a clean stop.
#[tokio::test]
async fn new_events_wait_above_the_watermark_without_a_queue_entry() {
    let dir = tempfile::tempdir().unwrap();
    let subscriptions = vec![
        subscription("crm", None),
        subscription("archive", Some(&["conversation_ended"])),
    ];
    let types = [
        "visitor_created",
        "visitor_created",
        "conversation_ended",
        "visitor_created",
    ];
    let (store, ids) = open_and_append(dir.path(), subscriptions.clone(), &types).await;
    let received: Vec<u64> = ids
        .iter()
        .map(|&id| store.event(id).unwrap().unwrap().received_at_ms)
        .collect();
    let targets = vec!["crm".to_string(), "archive".to_string()];

    assert_eq!(store.queued_count("crm"), 4);
    assert_eq!(store.queued_count("archive"), 1);
    assert!(ids.iter().all(|&id| store.is_queued("crm", id).unwrap()));
    assert!(store.is_queued("archive", ids[2]).unwrap());
    assert!(!store.is_queued("archive", ids[0]).unwrap());
    assert_eq!(
        store.target_stats("crm").unwrap().oldest_enqueued_ms,
        Some(received[0])
    );
    let step = store
        .prune_before(received[3] + 1, None, 100, &targets)
        .unwrap();
    assert_eq!((step.examined, step.deleted), (4, 0));

    // Read once, in id order, with the stored bodies.
    let crm = due(&store, "crm");
    assert_eq!(crm.iter().map(|d| d.id).collect::<Vec<_>>(), ids);
    for delivery in &crm {
        assert!((delivery.source == Source::Implicit));
        let stored = store.event(delivery.id).unwrap().unwrap().body;
        assert_eq!(delivery.body.as_deref(), Some(&stored[..]));
        assert_eq!(delivery.state.enqueued_ms, delivery.due_ms);
    }
    assert!(
        due(&store, "crm").is_empty(),
        "taken ones are not read again"
    );

    // The first fails and moves a day ahead; the rest are delivered.
    let moved = DeliveryState {
        attempts: 1,
        ..crm[0].state.clone()
    };
    store
        .reschedule("crm", &crm[0], received[0] + 86_400_000, &moved)
        .unwrap();
    for delivery in &crm[1..] {
        store.delivered("crm", delivery).unwrap();
    }
    assert!(store.is_queued("crm", ids[0]).unwrap());
    assert!(!store.is_queued("crm", ids[1]).unwrap());
    assert_eq!(store.queued_count("crm"), 1);
    assert_eq!(
        store.target_stats("crm").unwrap().oldest_enqueued_ms,
        Some(received[0])
    );
    // Kept: the moved one (crm) and the one archive still waits for.
    let step = store
        .prune_before(received[3] + 1, None, 100, &targets)
        .unwrap();
    assert_eq!((step.examined, step.deleted), (4, 2));
    assert!(store.event(ids[0]).unwrap().is_some());
    assert!(store.event(ids[2]).unwrap().is_some());

    // A clean stop writes the watermarks; the next start reads the moved
    // delivery from its queue entry and nothing else for crm.
    store.save_backlog_counts(&targets).unwrap();
    drop(store);
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    store.adopt_targets(&subscriptions).unwrap();
    let crm = due(&store, "crm");
    assert_eq!(crm.len(), 1);
    assert_eq!(
        (crm[0].id, (crm[0].source == Source::Implicit)),
        (ids[0], false)
    );
    let archive = due(&store, "archive");
    assert_eq!(archive.len(), 1);
    assert_eq!(
        (archive[0].id, (archive[0].source == Source::Implicit)),
        (ids[2], true)
    );
}

/// A log written before watermarks (every new event's delivery a queue
/// entry) keeps those entries when a target is adopted: they are delivered
/// as they are, and only events after that wait above the watermark.
#[tokio::test]
async fn queue_entries_of_a_log_from_before_watermarks_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    // Not adopted: the committer queues entries, as builds before did.
    let (store, old) = append(
        dir.path(),
        vec![subscription("crm", None)],
        &["visitor_created", "visitor_created"],
        false,
    )
    .await;
    drop(store);

    let (store, new) = open_and_append(
        dir.path(),
        vec![subscription("crm", None)],
        &["visitor_created"],
    )
    .await;
    assert_eq!(store.queued_count("crm"), 3);
    let due = due(&store, "crm");
    let by_kind: Vec<(EventId, bool)> = due
        .iter()
        .map(|d| (d.id, (d.source == Source::Implicit)))
        .collect();
    assert_eq!(by_kind, [(old[0], false), (old[1], false), (new[0], true)]);
    for delivery in &due {
        store.delivered("crm", delivery).unwrap();
    }
    assert_eq!(store.queued_count("crm"), 0);
}
