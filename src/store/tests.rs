use super::*;

/// A dead letter of `id` for the target "crm": one attempt, HTTP 400.
fn dead_letter(id: EventId) -> DeadLetter {
    DeadLetter {
        id,
        target: "crm".into(),
        attempts: 1,
        last_status: 400,
        first_attempt_ms: 1,
        last_attempt_ms: 1,
        reason: "HTTP 400".into(),
    }
}

/// A log in `dir` with small caches and `checkpoint_interval`.
fn small(dir: &Path, checkpoint_interval: Duration) -> StoreOptions {
    StoreOptions {
        data_dir: dir.to_owned(),
        checkpoint_interval,
        cache_capacity_bytes: 8 << 20,
        quarantine_max_events: 10,
        quarantine_max_bytes: 1 << 20,
        node: crate::node::NodeId(0),
    }
}

/// A read of the explicit queue that found nothing due must not mark
/// it quiet past an entry written while it ran (that entry's write
/// lowered the mark before the read's conclusion would raise it).
#[test]
fn a_write_during_a_queue_read_outlives_the_reads_quiet_mark() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let subscription = Subscription {
        target: "crm".into(),
        events: None,
        wake: Arc::new(tokio::sync::Notify::new()),
    };
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

/// The oldest-wait figure reads the `a` entries: a replay (waiting
/// since 900, under the old id 100) does not hide a delivery moved
/// earlier (waiting since 500, id 2000); an `a` entry a crash left
/// without its `p` entry is skipped, and the recount after a crash
/// removes it.
#[test]
fn the_oldest_wait_is_read_by_age_past_replays_and_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let subscription = Subscription {
        target: "crm".into(),
        events: None,
        wake: Arc::new(tokio::sync::Notify::new()),
    };
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

/// Pruning decides by the event's receive time; an event record that
/// cannot be read is kept, and the pass goes on past it.
#[test]
fn pruning_keeps_an_unreadable_event_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let event = |received_at_ms| record::encode_event(received_at_ms, "visitor_created", b"{}");
    // Event 1000 unreadable, 2000 waiting at its first place, 3000 done.
    store
        .db
        .insert(id_key(EVENT_PREFIX, 1_000), &b"\x63garbage"[..])
        .unwrap();
    store
        .db
        .insert(id_key(EVENT_PREFIX, 2_000), event(2))
        .unwrap();
    store
        .db
        .insert(id_key(EVENT_PREFIX, 3_000), event(3))
        .unwrap();
    store
        .db
        .insert(queue_key("crm", 2, EventId(2_000)), new_delivery_state(2))
        .unwrap();
    let targets = ["crm".to_string()];
    assert!(store.is_queued("crm", EventId(2_000)).unwrap());
    assert!(!store.is_queued("crm", EventId(3_000)).unwrap());
    let step = store.prune_before(10, None, 100, &targets).unwrap();
    assert_eq!((step.examined, step.deleted), (3, 1));
    assert!(store.db.contains_key(id_key(EVENT_PREFIX, 1_000)).unwrap());
    assert!(store.event(EventId(2_000)).unwrap().is_some());
    assert!(store.event(EventId(3_000)).unwrap().is_none());
}

/// Copies the data directory `from` to `to`, sled's blob files only
/// with `blobs`: what a power cut leaves of files never synced.
fn copy_data(from: &Path, to: &Path, blobs: bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() == "blobs" && !blobs {
                std::fs::create_dir_all(&target).unwrap();
            } else {
                copy_data(&entry.path(), &target, blobs);
            }
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A large event (sled keeps it in a blob file of its own, unsynced)
/// applied, and sled's data file written with the group's `m/last_id`
/// (its flusher syncs that file every few ms), before any checkpoint:
/// a power cut then takes the blob and leaves the mark. Opening the log
/// must write the event again from the write-ahead log; it used to
/// replay only frames above `m/last_id`, and the event was gone.
#[tokio::test]
async fn a_large_event_survives_a_power_cut_before_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let options = |data: &Path| small(data, Duration::from_secs(3600));
    let data = dir.path().join("data");
    let store = Store::open(&options(&data)).unwrap();
    let (committer, _apply) = store
        .start_committer(&options(&data), vec![], Arc::new(Metrics::new()))
        .unwrap();
    let body = Bytes::from(vec![b'x'; 300 * 1024]);
    let event = Entry::Event {
        event: "visitor_created".into(),
        body: body.clone(),
    };
    let id = committer.append(event).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.event_body(id).unwrap().is_none() {
        assert!(Instant::now() < deadline, "the event was never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // What sled's flusher does on its own.
    store.db.flush().unwrap();
    assert!(
        std::fs::read_dir(data.join("blobs")).unwrap().count() > 0,
        "the event is not in a blob file: the test tests nothing"
    );
    let cut = dir.path().join("cut");
    copy_data(&data, &cut, false);
    let reopened = Store::open(&options(&cut)).unwrap();
    assert_eq!(reopened.event_body(id).unwrap(), Some(body));
}

/// Pruning runs while an operator retries dead letters (`dlq retry`
/// moves each back into the queue, and failing again moves it back):
/// an event old enough to prune but owed to a target is never deleted.
/// A retry landing between two of a step's checks (queued? no. dead
/// letter? no) used to get its event deleted under it.
#[test]
fn pruning_racing_a_dead_letter_retry_keeps_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let ids: Vec<EventId> = (1..=500u64).map(|n| EventId(n * 1_000)).collect();
    for &id in &ids {
        let event = record::encode_event(id.0 / 1000, "visitor_created", b"{}");
        store.db.insert(id_key(EVENT_PREFIX, id.0), event).unwrap();
        store
            .db
            .insert(dead_key("crm", id), record::encode_dead(&dead_letter(id)))
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pruner = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let targets = ["crm".to_string()];
            while !stop.load(Ordering::Relaxed) {
                let mut after = None;
                loop {
                    let step = store
                        .prune_before(10_000_000, after, 256, &targets)
                        .unwrap();
                    if step.examined == 0 {
                        break;
                    }
                    after = step.last;
                    // As the retention task does between steps.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let mut lost = 0;
    for _ in 0..30 {
        // `dlq retry --all`, then every retry fails again.
        store.enqueue("crm", &ids, 0, 0).unwrap();
        lost = ids
            .iter()
            .filter(|&&id| store.event(id).unwrap().is_none())
            .count();
        if lost > 0 {
            break;
        }
        for &id in &ids {
            let delivery = Delivery {
                id,
                due_ms: 0,
                state: DeliveryState::default(),
                source: Source::Explicit,
                body: None,
            };
            store.bury(&delivery, &dead_letter(id)).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    pruner.join().unwrap();
    assert_eq!(lost, 0, "pruning deleted events still owed to a target");
}

/// Once everything is deleted, nearly the whole data file counts as
/// reusable without any later write: also the segments whose data sled
/// rewrote into the segment it is still filling, which it frees only
/// once that one is sealed by more writes (which a relay refusing
/// ingest at `storage.max_bytes` would never make).
#[test]
fn deleted_data_counts_as_reusable_without_further_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&small(dir.path(), Duration::from_secs(1))).unwrap();
    let ids = 1..=30_000u64;
    for id in ids.clone() {
        store
            .db
            .insert(id_key(EVENT_PREFIX, id), vec![7u8; 600])
            .unwrap();
    }
    store.db.flush().unwrap();
    for id in ids {
        store.db.remove(id_key(EVENT_PREFIX, id)).unwrap();
    }
    store.db.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let size = store.db.size_on_disk().unwrap();
        let in_use = size.saturating_sub(store.reusable_bytes());
        if in_use <= 4 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{in_use} of {size} bytes still in use with nothing stored"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

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
