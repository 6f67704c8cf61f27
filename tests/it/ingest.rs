//! The ingest endpoint over real HTTP: every status with its JSON body and
//! metric, byte-exact storage, group commit under concurrency, slow clients.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use leadflo_relay::http::{self, ConnectionLimits};
use leadflo_relay::ingest::{Ingest, IngestSettings, SecretCheck};
use leadflo_relay::metrics::{IngestResult, Metrics};
use leadflo_relay::store::{EventId, Store, StoreOptions};
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
    // Answered once in the write-ahead log; the store shows the last one
    // once the apply thread has caught up.
    let store = relay.store.clone();
    let quarantined = eventually("every malformed body kept", WAIT, async || {
        let kept: Vec<_> = store.quarantined().map(|q| q.unwrap()).collect();
        (kept.len() == cases.len()).then_some(kept)
    })
    .await;
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
