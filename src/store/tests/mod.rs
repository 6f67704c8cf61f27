//! The store's unit tests, one file per concern, and the helpers they
//! share. They drive a [`Store`] in a temporary directory directly, with
//! access to its internals; they never start the relay (tests of the
//! relay over HTTP, or of the binary, live in `tests/it/`).
//!
//! | file | what it proves |
//! |---|---|
//! | [`queue`] | reading due deliveries: by id, after a move, the retry queue's cursor and quiet mark |
//! | [`watermarks`] | new events waiting above a target's watermark without queue entries |
//! | [`targets`] | targets added, changed, removed and forgotten keep or drop what waited for them |
//! | [`backlog`] | the per-target tallies and the oldest waiting delivery |
//! | [`pruning`] | pruning keeps what is owed, steps stay bounded, deleted space is reusable |
//! | [`recovery`] | opening after a power cut brings back what the write-ahead log holds |

use super::*;

mod backlog;
mod pruning;
mod queue;
mod recovery;
mod targets;
mod watermarks;

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

/// A subscription of `target` to `events` (every type with `None`).
fn subscription(target: &str, events: Option<&[&str]>) -> Subscription {
    Subscription {
        target: target.into(),
        events: events.map(|e| e.iter().map(|s| s.to_string()).collect()),
        wake: Arc::new(tokio::sync::Notify::new()),
    }
}

/// Everything waiting for `target`, due or not.
fn due(store: &Store, target: &str) -> Vec<Delivery> {
    let query = DueQuery {
        now_ms: u64::MAX,
        limit: 100,
        ignore_due: true,
        after: None,
        skip: &|_| false,
    };
    store.due_deliveries(target, &query).unwrap().deliveries
}

/// Opens the log in `dir`, adopts `subscriptions`, appends `events`
/// (their types) and closes the committer; returns the log and the ids.
async fn open_and_append(
    dir: &Path,
    subscriptions: Vec<Subscription>,
    events: &[&str],
) -> (Store, Vec<EventId>) {
    append(dir, subscriptions, events, true).await
}

/// The same, adopting the targets only with `adopt` (without, the
/// committer queues entries, as builds before watermarks did).
async fn append(
    dir: &Path,
    subscriptions: Vec<Subscription>,
    events: &[&str],
    adopt: bool,
) -> (Store, Vec<EventId>) {
    let options = small(dir, Duration::from_secs(1));
    let store = Store::open(&options).unwrap();
    if adopt {
        store.adopt_targets(&subscriptions).unwrap();
    }
    let (committer, handle) = store
        .start_committer(&options, subscriptions, Arc::new(Metrics::new()))
        .unwrap();
    let mut ids = Vec::new();
    for (n, event) in events.iter().enumerate() {
        let body = format!(r#"{{"event":"{event}","n":{n}}}"#);
        let entry = Entry::Event {
            event: (*event).into(),
            body: body.into(),
        };
        ids.push(committer.append(entry).await.unwrap());
    }
    handle.close().await;
    (store, ids)
}
