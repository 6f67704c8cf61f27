//! Opening after a power cut: what the write-ahead log holds and sled
//! lost comes back.

use super::*;

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
