//! The ingest endpoint over real HTTP: every status with its JSON body and
//! metric, byte-exact storage, group commit under concurrency, slow clients.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use leadflo_relay::http::{self, ConnectionLimits};
use leadflo_relay::ingest::{Ingest, IngestSettings, SecretCheck};
use leadflo_relay::metrics::{IngestResult, Metrics};
use leadflo_relay::store::{EventId, Source, Store, StoreOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const VISITOR: &str = r#"{"event":"visitor_created","data":{"visitor":{"id":"vis_1"}}}"#;

fn stored_count(store: &Store) -> usize {
    store.events().count()
}

/// A log of its own in `dir`, for tests that drive the log directly.
fn small_log(dir: &std::path::Path) -> StoreOptions {
    StoreOptions {
        data_dir: dir.to_owned(),
        checkpoint_interval: Duration::from_secs(1),
        cache_capacity_bytes: 8 << 20,
        quarantine_max_events: 10,
        quarantine_max_bytes: 1 << 20,
        node: leadflo_relay::node::NodeId(0),
    }
}

#[tokio::test]
async fn accepted_event_gets_200_with_its_id_and_is_stored() {
    let relay = TestRelay::start().await;
    let (status, json) = post(&client(), &relay.url(), Some(SECRET), VISITOR.into()).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["status"], "accepted");
    let id: EventId = json["id"]
        .as_str()
        .expect("id is a string")
        .parse()
        .unwrap();
    let stored = stored_event(&relay.store, id).await;
    assert_eq!(stored.body, VISITOR.as_bytes());
    assert_eq!(stored.event, "visitor_created");
    assert!(
        stored.received_at_ms > 1_600_000_000_000,
        "receive time is set"
    );
    assert_eq!(relay.metrics.requests(IngestResult::Accepted), 1);
    assert_eq!(
        scrape(
            relay.admin,
            r#"leadflo_relay_ingest_events_total{event="visitor_created"}"#
        )
        .await,
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn seed_payloads_round_trip_byte_for_byte() {
    let relay = TestRelay::start().await;
    let client = client();
    for name in [
        "visitor_created.json",
        "conversation_ended.json",
        "visitor_created_non_ascii.json",
    ] {
        let body = fixture(name);
        let (status, json) = post(&client, &relay.url(), Some(SECRET), body.clone()).await;
        assert_eq!(status, 200, "{name}: {json}");
        let id: EventId = json["id"].as_str().unwrap().parse().unwrap();
        let stored = stored_event(&relay.store, id).await;
        assert_eq!(
            stored.body, body,
            "{name}: stored bytes differ from the bytes sent"
        );
    }
    // And after a restart on the same data directory.
    let dir = relay.stop().await;
    let store = open_store(dir.path());
    let bodies: Vec<Vec<u8>> = store.events().map(|e| e.unwrap().body).collect();
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[2], fixture("visitor_created_non_ascii.json"));
}

#[tokio::test]
async fn wrong_or_missing_secrets_get_401_and_store_nothing() {
    let relay = TestRelay::start().await;
    let client = client();
    let same_length_wrong = format!("{}X", &SECRET[..SECRET.len() - 1]);
    let longer = format!("{SECRET}0");
    let cases = [
        Some(same_length_wrong.as_str()),
        Some(&SECRET[..5]),
        Some(longer.as_str()),
        Some(""),
        None,
    ];
    for secret in cases {
        let (status, json) = post(&client, &relay.url(), secret, VISITOR.into()).await;
        assert_eq!(status, 401, "secret {secret:?}: {json}");
        let error = json["error"].as_str().expect("JSON error body");
        assert!(error.contains("x-webhook-secret"), "{error}");
    }
    assert_eq!(
        stored_count(&relay.store),
        0,
        "unauthenticated requests were stored"
    );
    assert_eq!(
        relay.store.quarantined().count(),
        0,
        "unauthenticated bodies were quarantined"
    );
    assert_eq!(
        relay.metrics.requests(IngestResult::Unauthorized),
        cases.len() as u64
    );
    assert_eq!(
        scrape(
            relay.admin,
            r#"leadflo_relay_ingest_requests_total{result="unauthorized"}"#
        )
        .await,
        cases.len() as f64
    );
    relay.stop().await;
}

#[tokio::test]
async fn other_paths_get_404_and_other_methods_405_with_allow() {
    let relay = TestRelay::start().await;
    let client = client();
    let response = client
        .post(format!("http://{}/other", relay.ingest))
        .header("x-webhook-secret", SECRET)
        .body(VISITOR)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let json: serde_json::Value = response.json().await.unwrap();
    assert!(json["error"].is_string());

    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let response = client
            .request(method.clone(), relay.url())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method}");
        assert_eq!(response.headers()["allow"], "POST");
        let json: serde_json::Value = response.json().await.unwrap();
        assert!(json["error"].as_str().unwrap().contains("POST"));
    }
    assert_eq!(relay.metrics.requests(IngestResult::NotFound), 1);
    assert_eq!(relay.metrics.requests(IngestResult::MethodNotAllowed), 3);
    assert_eq!(stored_count(&relay.store), 0);
    relay.stop().await;
}

#[tokio::test]
async fn malformed_bodies_get_400_and_are_quarantined() {
    let relay = TestRelay::start().await;
    let client = client();
    let cases: [(&[u8], &str); 6] = [
        (b"not json", "not valid JSON"),
        (b"[1,2,3]", "must be a JSON object"),
        (br#"{"data":{}}"#, "no \"event\" field"),
        (br#"{"event":7}"#, "must be a string"),
        (b"", "empty"),
        (
            b"{\"event\":\"visitor_created\",\"x\":\"\xff\"}",
            "not valid JSON",
        ),
    ];
    for (body, want) in cases {
        let (status, json) = post(&client, &relay.url(), Some(SECRET), body.to_vec()).await;
        assert_eq!(status, 400, "{:?}: {json}", String::from_utf8_lossy(body));
        let error = json["error"].as_str().unwrap();
        assert!(error.contains(want), "{error} should mention {want}");
    }
    assert_eq!(
        stored_count(&relay.store),
        0,
        "malformed bodies must not become events"
    );
    let quarantined: Vec<_> = relay.store.quarantined().map(|q| q.unwrap()).collect();
    assert_eq!(
        quarantined.len(),
        cases.len(),
        "every malformed body is kept"
    );
    for ((body, want), kept) in cases.iter().zip(&quarantined) {
        assert_eq!(kept.body, *body, "quarantine keeps the exact bytes");
        assert!(kept.reason.contains(want), "{}", kept.reason);
    }
    assert_eq!(
        relay.metrics.requests(IngestResult::BadRequest),
        cases.len() as u64
    );
    assert_eq!(
        scrape(relay.admin, "leadflo_relay_quarantined_total").await,
        cases.len() as f64
    );
    relay.stop().await;
}

#[tokio::test]
async fn quarantine_is_bounded_and_keeps_the_newest() {
    let relay = TestRelay::start_with(|c| c.storage.quarantine_max_events = 3).await;
    let client = client();
    for i in 0..5 {
        let body = format!("bad body {i}");
        let (status, _) = post(&client, &relay.url(), Some(SECRET), body.into()).await;
        assert_eq!(status, 400);
    }
    // The 400 comes once the write-ahead log has the body; sled gets the
    // insert and the eviction it caused just after.
    let kept = || -> Vec<String> {
        relay
            .store
            .quarantined()
            .map(|q| String::from_utf8(q.unwrap().body).unwrap())
            .collect()
    };
    let want = ["bad body 2", "bad body 3", "bad body 4"];
    eventually(
        "the three newest kept",
        Duration::from_secs(10),
        async || (kept() == want).then_some(()),
    )
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn declared_oversize_gets_413_before_the_body_is_sent() {
    let relay = TestRelay::start_with(|c| c.server.max_body_bytes = 1024).await;
    // Headers only: the body never comes, so an answer proves none was read.
    let request = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: 1025\r\n\r\n"
    );
    let answer = raw_exchange(relay.ingest, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains(r#"{"error":"body is larger than the limit of 1024 bytes"}"#),
        "{answer}"
    );
    assert_eq!(relay.metrics.requests(IngestResult::TooLarge), 1);

    // Exactly at the limit is fine.
    let mut body = br#"{"event":"visitor_created","pad":""#.to_vec();
    body.resize(1022, b'a');
    body.extend_from_slice(b"\"}");
    let (status, json) = post(&client(), &relay.url(), Some(SECRET), body).await;
    assert_eq!(status, 200, "{json}");
    relay.stop().await;
}

#[tokio::test]
async fn chunked_body_gets_413_as_soon_as_it_crosses_the_limit() {
    let relay = TestRelay::start_with(|c| c.server.max_body_bytes = 1024).await;
    let mut stream = TcpStream::connect(relay.ingest).await.unwrap();
    let head = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 800];
    for _ in 0..2 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    // The body is never terminated: the answer must not wait for its end.
    let answer = read_response(&mut stream, Duration::from_secs(10))
        .await
        .expect("a response");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than the limit"), "{answer}");
    assert_eq!(stored_count(&relay.store), 0);
    relay.stop().await;
}

#[tokio::test]
async fn slow_body_gets_408_and_slow_headers_get_the_connection_closed() {
    let relay = TestRelay::start_with(|c| {
        c.server.request_timeout = "300ms".parse().unwrap();
        c.server.header_read_timeout = "300ms".parse().unwrap();
    })
    .await;
    let mut stream = TcpStream::connect(relay.ingest).await.unwrap();
    let head = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\n\
         content-length: 100\r\n\r\n{{\"event\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_response(&mut stream, Duration::from_secs(10))
        .await
        .expect("a response");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#""error":"request body not received within 300 ms""#),
        "{answer}"
    );
    assert_eq!(relay.metrics.requests(IngestResult::Timeout), 1);

    // Half a header, then silence: the server hangs up on its own.
    let closed = raw_exchange(
        relay.ingest,
        b"POST /leadflo-webhook HTTP/1.1\r\nhost",
        Duration::from_secs(10),
    )
    .await;
    assert!(!closed.starts_with("HTTP/1.1 200"), "{closed}");
    // raw_exchange returned before its 10 s deadline only if the server closed.
    relay.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_and_the_connection_cap_holds() {
    let relay = TestRelay::start_with(|c| {
        c.server.max_connections = 2;
        c.server.header_read_timeout = "1s".parse().unwrap();
    })
    .await;
    let started = std::time::Instant::now();
    let mut idle_a = TcpStream::connect(relay.ingest).await.unwrap();
    let mut idle_b = TcpStream::connect(relay.ingest).await.unwrap();
    // Both slots are taken: a third sender is not served while they are open.
    let third = tokio::spawn({
        let url = relay.url();
        async move { post(&client(), &url, Some(SECRET), VISITOR.into()).await }
    });
    // The idle connections are closed by the server (header read timeout)...
    let a = read_until_close(&mut idle_a, Duration::from_secs(20)).await;
    let b = read_until_close(&mut idle_b, Duration::from_secs(20)).await;
    assert!(
        a.is_empty() && b.is_empty(),
        "idle connections got data: {a:?} {b:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "idle connections were not closed by the server"
    );
    // ...which frees the slots, and the third sender is then served.
    let (status, _) = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("third sender served once slots freed")
        .unwrap();
    assert_eq!(status, 200);
    relay.stop().await;
}

#[tokio::test]
async fn concurrent_senders_get_unique_ids_and_share_commits() {
    let relay = TestRelay::start().await;
    const SENDERS: usize = 64;
    const EACH: usize = 20;
    let client = client();
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let (client, url) = (client.clone(), relay.url());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..EACH {
                let body = format!(
                    r#"{{"event":"visitor_created","data":{{"visitor":{{"id":"vis_{sender}_{n}"}}}}}}"#
                );
                let (status, json) = post(&client, &url, Some(SECRET), body.clone().into()).await;
                assert_eq!(status, 200, "{json}");
                acked.push((json["id"].as_str().unwrap().parse::<EventId>().unwrap(), body));
            }
            acked
        }));
    }
    let mut ids = HashSet::new();
    let mut acked = Vec::new();
    for task in tasks {
        for (id, body) in task.await.unwrap() {
            assert!(ids.insert(id), "id {id} was given twice");
            acked.push((id, body));
        }
    }
    assert_eq!(acked.len(), SENDERS * EACH);
    for (id, body) in &acked {
        let stored = stored_event(&relay.store, *id).await;
        assert_eq!(stored.body, body.clone().into_bytes(), "event {id}");
    }
    let commits = scrape(relay.admin, "leadflo_relay_commits_total").await;
    let fsyncs = scrape(relay.admin, "leadflo_relay_fsyncs_total").await;
    let records = (SENDERS * EACH) as f64;
    assert!(
        commits >= 1.0 && commits < records,
        "{commits} commits for {records} records: no grouping"
    );
    assert_eq!(
        fsyncs, commits,
        "every commit must include exactly one fsync"
    );
    assert_eq!(
        scrape(relay.admin, "leadflo_relay_commit_batch_size_sum").await,
        records
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_log_that_cannot_commit_answers_503_and_never_200() {
    // An ingest endpoint whose committer has already stopped: the append
    // cannot be confirmed, so the sender must not hear "accepted".
    let dir = tempfile::tempdir().unwrap();
    let options = small_log(dir.path());
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(&options).unwrap();
    let (committer, handle) = store
        .start_committer(&options, Vec::new(), metrics.clone())
        .unwrap();
    handle.close().await;
    let ingest = ingest_with(dir.path(), committer, &metrics, Duration::from_secs(3));
    let (url, stop) = serve_ingest(ingest).await;
    let (status, json) = post(&client(), &url, Some(SECRET), VISITOR.into()).await;
    assert_eq!(status, 503, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("not stored"),
        "{json}"
    );
    assert_eq!(metrics.requests(IngestResult::Unavailable), 1);
    assert_eq!(metrics.requests(IngestResult::Accepted), 0);
    stop.await;
}

/// A disk slower than the commit timeout: the event was queued for writing
/// in time, so its 503 must not say it was not stored (the sender's people
/// would enter the lead again), and when it lands it is counted like any
/// stored event. Both used to be wrong: "not acknowledged", and uncounted.
#[tokio::test]
async fn an_event_answered_503_for_a_slow_disk_that_lands_later_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_log(dir.path());
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(&options).unwrap();
    let (committer, _handle) = store
        .start_committer(&options, Vec::new(), metrics.clone())
        .unwrap();
    // The slow disk: 32 MiB taken for writing just before the request.
    let big = leadflo_relay::store::Entry::Event {
        event: "bulk".into(),
        body: bytes::Bytes::from(vec![b' '; 32 << 20]),
    };
    let ahead = committer.submit(big).await.unwrap();
    let ingest = ingest_with(dir.path(), committer, &metrics, Duration::from_millis(1));
    let (url, stop) = serve_ingest(ingest).await;
    let (status, json) = post(&client(), &url, Some(SECRET), VISITOR.into()).await;
    assert_eq!(status, 503, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("may still be stored"),
        "{json}"
    );
    assert_eq!(metrics.requests(IngestResult::Unavailable), 1);
    ahead.await.unwrap();
    let visitors = || {
        metrics
            .ingest_events
            .with_label_values(&["visitor_created"])
            .get()
    };
    eventually(
        "the late event counted",
        Duration::from_secs(30),
        async || (visitors() == 1).then_some(()),
    )
    .await;
    let in_log = || {
        let stored = store.events().filter_map(Result::ok);
        stored.filter(|e| e.body == VISITOR.as_bytes()).count()
    };
    eventually(
        "the late event in the log",
        Duration::from_secs(30),
        async || (in_log() == 1).then_some(()),
    )
    .await;
    stop.await;
}

fn ingest_with(
    dir: &std::path::Path,
    committer: leadflo_relay::store::Committer,
    metrics: &Arc<Metrics>,
    commit_timeout: Duration,
) -> Ingest {
    Ingest::new(
        IngestSettings {
            path: "/leadflo-webhook".into(),
            secret: std::sync::Arc::new(leadflo_relay::reload::Swap::new(Some(SecretCheck::new(
                &leadflo_relay::config::Secret::new(SECRET),
            )))),
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(5),
            commit_timeout,
        },
        committer,
        Arc::new(leadflo_relay::disk::DiskGuard::new(
            dir.to_owned(),
            Some(0),
            None,
        )),
        metrics.clone(),
    )
}

/// Serves `ingest` on a port of its own; returns its URL and what stops it.
async fn serve_ingest(ingest: Ingest) -> (String, impl std::future::Future<Output = ()>) {
    let ingest = Arc::new(ingest);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = ConnectionLimits {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(1),
    };
    let server = tokio::spawn(http::serve(
        listener,
        limits,
        move |r| ingest.clone().handle(r),
        shutdown.clone(),
    ));
    let stop = async move {
        shutdown.cancel();
        server.await.unwrap();
    };
    (format!("http://{addr}/leadflo-webhook"), stop)
}

#[tokio::test]
async fn health_and_readiness_answer_json() {
    let relay = TestRelay::start().await;
    let client = client();
    for (path, want) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let response = client
            .get(format!("http://{}{path}", relay.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let json: serde_json::Value = response.json().await.unwrap();
        assert_eq!(json["status"], want);
    }
    relay.stop().await;
}

#[tokio::test]
async fn ids_keep_increasing_across_a_restart() {
    let relay = TestRelay::start().await;
    let (_, first) = post(&client(), &relay.url(), Some(SECRET), VISITOR.into()).await;
    let first: EventId = first["id"].as_str().unwrap().parse().unwrap();
    let dir = relay.stop().await;

    let mut config = test_config(dir.path());
    config.storage.data_dir = dir.path().to_owned();
    let relay =
        leadflo_relay::Relay::build(config, Some(leadflo_relay::config::Secret::new(SECRET)))
            .await
            .unwrap();
    let url = format!("http://{}/leadflo-webhook", relay.ingest_addr());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(relay.run_until_stopped(shutdown.clone()));
    let (_, second) = post(&client(), &url, Some(SECRET), VISITOR.into()).await;
    let second: EventId = second["id"].as_str().unwrap().parse().unwrap();
    assert!(
        second > first,
        "id {second} after restart is not above {first}"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// A power cut can cost sled what it had not synced, while the write-ahead
/// log, fdatasync'ed before every 200, keeps it. Simulated here by writing
/// the write-ahead log of two acknowledged events that sled never got (and a
/// torn frame after them): opening the log must bring both back, queued for
/// the targets they were queued for, and ignore the torn frame.
#[tokio::test]
async fn events_only_in_the_write_ahead_log_come_back_with_their_deliveries() {
    use leadflo_relay::store::{record, wal};
    let relay = TestRelay::start().await;
    let (status, json) = post(&client(), &relay.url(), Some(SECRET), VISITOR.into()).await;
    assert_eq!(status, 200, "{json}");
    let known: EventId = json["id"].as_str().unwrap().parse().unwrap();
    let dir = relay.stop().await;

    let lost = [
        (
            known.0 + 10,
            &b"{\"event\":\"visitor_created\",\"n\":1}"[..],
        ),
        (
            known.0 + 11,
            &br#"{"event":"conversation_ended","n":2}"#[..],
        ),
    ];
    let mut frame = wal::Frame::new();
    for (id, body) in lost {
        let event = if id == known.0 + 10 {
            "visitor_created"
        } else {
            "conversation_ended"
        };
        frame.push(
            wal::KIND_EVENT,
            id,
            &record::encode_event(1_700_000_000_000, event, body),
            ["crm", "archive"],
        );
    }
    let mut bytes = frame.to_bytes();
    let mut torn = wal::Frame::new();
    torn.push(
        wal::KIND_EVENT,
        known.0 + 12,
        &record::encode_event(1, "visitor_created", b"{}"),
        ["crm"],
    );
    let torn = torn.to_bytes();
    bytes.extend_from_slice(&torn[..torn.len() - 3]);
    // The newest segment, as a crash left it.
    let newest = wal::segments(dir.path())
        .unwrap()
        .last()
        .copied()
        .unwrap_or(0);
    std::fs::write(wal::segment_path(dir.path(), newest + 1), bytes).unwrap();

    let store = open_store(dir.path());
    for (id, body) in lost {
        let event = store
            .event(EventId(id))
            .unwrap()
            .expect("replayed from the write-ahead log");
        assert_eq!(event.body, body);
        assert!(store.is_queued("crm", EventId(id)).unwrap());
        assert!(store.is_queued("archive", EventId(id)).unwrap());
    }
    assert!(
        store.event(EventId(known.0 + 12)).unwrap().is_none(),
        "a torn frame was never acknowledged"
    );
    assert!(store.event(known).unwrap().is_some());
    drop(store);
    // Replayed into sled, the old segments are retired; one new segment,
    // holding at most old frames that sled already has (it may be made from
    // a recycled one).
    let left = wal::segments(dir.path()).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    let bytes = std::fs::read(wal::segment_path(dir.path(), left[0])).unwrap();
    assert!(
        wal::read_frames(&bytes)
            .0
            .iter()
            .all(|e| e.id <= known.0 + 11)
    );

    // Ids go on above the replayed ones.
    let relay = TestRelay::start_in(dir, |_| {}).await;
    let (_, json) = post(&client(), &relay.url(), Some(SECRET), VISITOR.into()).await;
    let next: EventId = json["id"].as_str().unwrap().parse().unwrap();
    assert!(next.0 > known.0 + 11, "{next} after {}", known.0 + 11);
    relay.stop().await;
}

/// A delivery waits either at its first place in the queue (due at its
/// event's receive time, with no other key) or, once moved by a failed
/// attempt or a replay, with an entry by id. In both it must be found by id,
/// count towards the oldest pending age, and keep its event from pruning;
/// once delivered, none of that.
#[tokio::test]
async fn deliveries_are_found_at_their_first_place_and_after_a_move() {
    use leadflo_relay::store::{DeliveryState, DueQuery, Entry, Subscription};
    let dir = tempfile::tempdir().unwrap();
    let options = small_log(dir.path());
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

/// After an upgrade every id of the earlier layout (the receive time in
/// microseconds) sorts below the cutoff's first id, however recent its
/// event. A prune step still stops after its limit, counting the events it
/// keeps for being newer than the cutoff, instead of scanning them all.
#[tokio::test]
async fn a_prune_step_examines_at_most_its_limit_when_every_event_is_newer_than_the_cutoff() {
    use leadflo_relay::store::record;
    let dir = tempfile::tempdir().unwrap();
    let now = leadflo_relay::clock::now_ms();
    let old_ids: Vec<u64> = (0..10).map(|n| (now + n) * 1_000).collect();
    {
        // A data directory of a build before node identities.
        let db = sled::open(dir.path()).unwrap();
        for &id in &old_ids {
            let mut key = vec![b'e'];
            key.extend_from_slice(&id.to_be_bytes());
            let value = record::encode_event(id / 1_000, "visitor_created", VISITOR.as_bytes());
            db.insert(key, value).unwrap();
        }
        db.flush().unwrap();
    }
    let store = open_store(dir.path());
    let targets = vec!["crm".to_string()];
    let (cutoff, limit) = (now - 60_000, 3);
    let mut after = None;
    let mut examined = Vec::new();
    loop {
        let step = store.prune_before(cutoff, after, limit, &targets).unwrap();
        assert!(
            step.examined <= limit,
            "one step examined {} events with a limit of {limit}",
            step.examined
        );
        assert_eq!(step.deleted, 0, "an event newer than the cutoff was pruned");
        examined.push(step.examined);
        if step.examined < limit {
            break;
        }
        after = step.last;
    }
    assert_eq!(
        examined,
        [3, 3, 3, 1],
        "steps did not resume where they stopped"
    );
    for id in old_ids {
        assert!(
            store.event(EventId(id)).unwrap().is_some(),
            "event {id} is gone"
        );
    }
}

/// What the implicit-queue tests below need: a subscription, and a query that
/// takes everything waiting.
mod front {
    use super::*;
    use leadflo_relay::store::{Delivery, DueQuery, Entry, Subscription};

    pub fn subscription(target: &str, events: Option<&[&str]>) -> Subscription {
        Subscription {
            target: target.into(),
            events: events.map(|e| e.iter().map(|s| s.to_string()).collect()),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn due(store: &Store, target: &str) -> Vec<Delivery> {
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
    pub async fn open_and_append(
        dir: &std::path::Path,
        subscriptions: Vec<Subscription>,
        events: &[&str],
    ) -> (Store, Vec<EventId>) {
        append(dir, subscriptions, events, true).await
    }

    /// The same, adopting the targets only with `adopt` (without, the
    /// committer queues entries, as builds before watermarks did).
    pub async fn append(
        dir: &std::path::Path,
        subscriptions: Vec<Subscription>,
        events: &[&str],
        adopt: bool,
    ) -> (Store, Vec<EventId>) {
        let options = small_log(dir);
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
}

/// An attempt that hangs (until its timeout, say) holds the watermark
/// below it, but not the deliveries after it: many more than the implicit
/// window settle meanwhile, and once it settles nothing waits, in memory
/// or after a restart.
#[tokio::test]
async fn a_hanging_attempt_does_not_hold_back_the_deliveries_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_log(dir.path());
    let events = leadflo_relay::store::IMPLICIT_WINDOW as u64 + 1_000;
    {
        let store = Store::open(&options).unwrap();
        let subscriptions = vec![front::subscription("crm", None)];
        store.adopt_targets(&subscriptions).unwrap();
        let (committer, handle) = store
            .start_committer(&options, subscriptions, Arc::new(Metrics::new()))
            .unwrap();
        let mut appends = tokio::task::JoinSet::new();
        for n in 0..events {
            let committer = committer.clone();
            appends.spawn(async move {
                let body = format!(r#"{{"event":"visitor_created","n":{n}}}"#);
                let entry = leadflo_relay::store::Entry::Event {
                    event: "visitor_created".into(),
                    body: body.into(),
                };
                committer.append(entry).await.unwrap()
            });
        }
        appends.join_all().await;
        handle.close().await;

        let mut batch = front::due(&store, "crm");
        let hanging = batch.remove(0);
        let mut settled = 0;
        while !batch.is_empty() {
            for delivery in &batch {
                store.delivered("crm", delivery).unwrap();
            }
            settled += batch.len() as u64;
            batch = front::due(&store, "crm");
        }
        assert_eq!(settled, events - 1, "deliveries after the hanging one");
        assert_eq!(store.queued_count("crm"), 1);
        store.delivered("crm", &hanging).unwrap();
        assert_eq!(store.queued_count("crm"), 0);
        store.save_backlog_counts(&["crm".to_string()]).unwrap();
    }
    let store = Store::open(&options).unwrap();
    store
        .adopt_targets(&[front::subscription("crm", None)])
        .unwrap();
    assert_eq!(store.queued_count("crm"), 0);
    assert!(front::due(&store, "crm").is_empty());
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
        front::subscription("crm", None),
        front::subscription("archive", Some(&["conversation_ended"])),
    ];
    let types = [
        "visitor_created",
        "visitor_created",
        "conversation_ended",
        "visitor_created",
    ];
    let (store, ids) = front::open_and_append(dir.path(), subscriptions.clone(), &types).await;
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
    let crm = front::due(&store, "crm");
    assert_eq!(crm.iter().map(|d| d.id).collect::<Vec<_>>(), ids);
    for delivery in &crm {
        assert!((delivery.source == Source::Implicit));
        let stored = store.event(delivery.id).unwrap().unwrap().body;
        assert_eq!(delivery.body.as_deref(), Some(&stored[..]));
        assert_eq!(delivery.state.enqueued_ms, delivery.due_ms);
    }
    assert!(
        front::due(&store, "crm").is_empty(),
        "taken ones are not read again"
    );

    // The first fails and moves a day ahead; the rest are delivered.
    let moved = leadflo_relay::store::DeliveryState {
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
    let store = Store::open(&small_log(dir.path())).unwrap();
    store.adopt_targets(&subscriptions).unwrap();
    let crm = front::due(&store, "crm");
    assert_eq!(crm.len(), 1);
    assert_eq!(
        (crm[0].id, (crm[0].source == Source::Implicit)),
        (ids[0], false)
    );
    let archive = front::due(&store, "archive");
    assert_eq!(archive.len(), 1);
    assert_eq!(
        (archive[0].id, (archive[0].source == Source::Implicit)),
        (ids[2], true)
    );
}

/// A target added to the configuration takes only events that arrive
/// after it; one whose event types change keeps, as queue entries, what
/// waited for it under the old types, and one that is removed keeps its
/// waiting deliveries the same way (as before there were watermarks).
#[tokio::test]
async fn targets_added_changed_and_removed_keep_what_was_queued_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let crm = front::subscription("crm", None);
    let (store, before) = front::open_and_append(
        dir.path(),
        vec![crm.clone()],
        &["visitor_created", "visitor_created"],
    )
    .await;
    drop(store);

    let slack = front::subscription("slack", None);
    let (store, added) = front::open_and_append(
        dir.path(),
        vec![crm.clone(), slack.clone()],
        &["visitor_created"],
    )
    .await;
    assert_eq!(store.queued_count("crm"), 3);
    assert_eq!(store.queued_count("slack"), 1, "only what came after it");
    assert_eq!(front::due(&store, "slack")[0].id, added[0]);
    drop(store);

    // crm now takes conversations only; slack is gone.
    let crm_conversations = front::subscription("crm", Some(&["conversation_ended"]));
    let (store, after) = front::open_and_append(
        dir.path(),
        vec![crm_conversations],
        &["visitor_created", "conversation_ended"],
    )
    .await;
    let crm = front::due(&store, "crm");
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
    let slack = front::due(&store, "slack");
    assert_eq!(slack.len(), 1);
    assert_eq!(
        (slack[0].id, (slack[0].source == Source::Implicit)),
        (added[0], false)
    );
}

/// A log written before watermarks (every new event's delivery a queue
/// entry) keeps those entries when a target is adopted: they are delivered
/// as they are, and only events after that wait above the watermark.
#[tokio::test]
async fn queue_entries_of_a_log_from_before_watermarks_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    // Not adopted: the committer queues entries, as builds before did.
    let (store, old) = front::append(
        dir.path(),
        vec![front::subscription("crm", None)],
        &["visitor_created", "visitor_created"],
        false,
    )
    .await;
    drop(store);

    let (store, new) = front::open_and_append(
        dir.path(),
        vec![front::subscription("crm", None)],
        &["visitor_created"],
    )
    .await;
    assert_eq!(store.queued_count("crm"), 3);
    let due = front::due(&store, "crm");
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

/// One read of the explicit (retry) queue, as the dispatcher makes it.
fn explicit_read(
    store: &Store,
    now_ms: u64,
    limit: usize,
    ignore_due: bool,
    after: Option<(u64, EventId)>,
    skip: &dyn Fn(EventId) -> bool,
) -> Vec<EventId> {
    let query = leadflo_relay::store::DueQuery {
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
async fn two_retries(dir: &std::path::Path, due_ms: impl Fn(u64) -> u64) -> (Store, Vec<EventId>) {
    let (store, ids) = front::open_and_append(
        dir,
        vec![front::subscription("crm", None)],
        &["visitor_created", "visitor_created"],
    )
    .await;
    for (n, delivery) in front::due(&store, "crm").into_iter().enumerate() {
        let state = leadflo_relay::store::DeliveryState {
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
    let now = leadflo_relay::clock::now_ms();
    let (store, ids) = two_retries(dir.path(), |_| now - 1_000).await;
    let (a, b) = (ids[0], ids[1]);
    assert_eq!(
        explicit_read(&store, now, 2, false, None, &|_| false),
        [a, b]
    );
    let cursor = front::due(&store, "crm")
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
    let now = leadflo_relay::clock::now_ms();
    let hour = 3_600_000;
    let (store, ids) = two_retries(dir.path(), |n| now + hour * (n + 1)).await;
    let (a, b) = (ids[0], ids[1]);
    // The circuit closed: catching up takes A (delivered), then B.
    assert_eq!(explicit_read(&store, now, 1, true, None, &|_| false), [a]);
    let queue = front::due(&store, "crm");
    store.delivered("crm", &queue[0]).unwrap();
    let cursor = Some((queue[1].due_ms, b));
    assert_eq!(
        explicit_read(&store, now, 1, true, Some((now + hour, a)), &|_| false),
        [b]
    );
    // B fails: catching up ends, B is due again in 50 ms.
    let state = leadflo_relay::store::DeliveryState {
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
