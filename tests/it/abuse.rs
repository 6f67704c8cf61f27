//! Protocol abuse at the ingest port: old and odd HTTP, oversized and
//! malformed headers, `Expect: 100-continue` with an oversized body, and
//! many slow or idle connections, while an honest sender keeps posting.

use std::time::{Duration, Instant};

use crate::common::*;
use leadflo_relay::metrics::IngestResult;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LEAD: &str = r#"{"event":"visitor_created","data":{}}"#;

fn request(version: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "POST /leadflo-webhook {version}\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn http_1_0_is_served_and_closed() {
    let relay = TestRelay::start().await;
    let answer = raw_exchange(
        relay.ingest,
        request("HTTP/1.0", "", LEAD).as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert!(answer.contains(r#""status":"accepted""#), "{answer}");
    eventually("the event in sled", Duration::from_secs(10), async || {
        (relay.store.events().count() == 1).then_some(())
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let relay = TestRelay::start().await;
    let both = format!(
        "{}{}",
        request("HTTP/1.1", "", LEAD),
        request("HTTP/1.1", "connection: close\r\n", LEAD)
    );
    let answer = raw_exchange(relay.ingest, both.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let ids: Vec<u64> = answer
        .split("\"id\":\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1], "answers out of order: {ids:?}");
    relay.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_headers_is_refused_cleanly() {
    let relay = TestRelay::start().await;
    let mut bytes = b"POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: \xff\xfe\r\ncontent-length: 2\r\n\r\n{}".to_vec();
    let answer = raw_exchange(relay.ingest, &bytes, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // In an unrelated header it changes nothing.
    bytes = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\nx-note: "
    )
    .into_bytes();
    bytes.extend_from_slice(b"caf\xe9\r\n");
    bytes.extend_from_slice(format!("content-length: {}\r\n\r\n{LEAD}", LEAD.len()).as_bytes());
    let answer = raw_exchange(relay.ingest, &bytes, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    relay.stop().await;
}

#[tokio::test]
async fn huge_or_many_headers_are_refused_and_the_relay_keeps_serving() {
    let relay = TestRelay::start().await;
    let huge = format!("x-padding: {}\r\n", "a".repeat(200 * 1024));
    let answer = raw_exchange(
        relay.ingest,
        request("HTTP/1.1", &huge, LEAD).as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.is_empty(),
        "{answer}"
    );
    let many: String = (0..500).map(|n| format!("x-h{n}: v\r\n")).collect();
    let answer = raw_exchange(
        relay.ingest,
        request("HTTP/1.1", &many, LEAD).as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.is_empty(),
        "{answer}"
    );
    // A request line that is not HTTP: hyper answers 400 itself.
    let answer = raw_exchange(
        relay.ingest,
        b"HELLO THERE\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400") || answer.is_empty(),
        "{answer}"
    );
    assert_eq!(relay.store.events().count(), 0);
    // Refused before the handler, and counted all the same.
    eventually(
        "the refusals counted",
        Duration::from_secs(10),
        async || (relay.metrics.requests(IngestResult::BadRequest) == 3).then_some(()),
    )
    .await;
    let (status, _) = post(&client(), &relay.url(), Some(SECRET), LEAD.into()).await;
    assert_eq!(status, 200);
    relay.stop().await;
}

#[tokio::test]
async fn expect_continue_with_an_oversized_length_gets_413_without_100() {
    let relay = TestRelay::start_with(|c| c.server.max_body_bytes = 1024).await;
    let head = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\n\
         expect: 100-continue\r\ncontent-length: 5000000\r\n\r\n"
    );
    let answer = raw_exchange(relay.ingest, head.as_bytes(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        !answer.contains("100 Continue"),
        "the relay invited an oversized body: {answer}"
    );
    relay.stop().await;
}

/// Honest requests while `attackers` connections dribble header bytes
/// (slowloris) or sit idle: every honest request is answered 200; their
/// latency is printed for the record.
async fn honest_sender_during(attackers: usize, dribble: bool) {
    let relay =
        TestRelay::start_with(|c| c.server.header_read_timeout = "2s".parse().unwrap()).await;
    let mut held = Vec::new();
    for _ in 0..attackers {
        let mut stream = TcpStream::connect(relay.ingest).await.unwrap();
        if dribble {
            let _ = stream
                .write_all(b"POST /leadflo-webhook HTTP/1.1\r\nx-a: ")
                .await;
        }
        held.push(stream);
    }
    let dribbler = tokio::spawn(async move {
        for _ in 0..20 {
            if dribble {
                for stream in held.iter_mut() {
                    let _ = stream.write_all(b"a").await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        held
    });
    let client = client();
    let mut latencies = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let (status, json) = post(&client, &relay.url(), Some(SECRET), LEAD.into()).await;
        assert_eq!(
            status, 200,
            "an honest sender was refused during the abuse: {json}"
        );
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    eprintln!(
        "{attackers} {} connections: honest p50 {:?}, max {:?}",
        if dribble { "slowloris" } else { "idle" },
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    drop(dribbler.await);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_do_not_stop_honest_senders() {
    honest_sender_during(300, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_idle_connections_do_not_stop_honest_senders() {
    honest_sender_during(800, false).await;
}

/// Far more idle connections than `server.max_connections`, with a header
/// timeout longer than the honest client's patience: only closing idle
/// connections to make room lets honest senders in (without it they would
/// wait in the accept queue for the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_make_room_for_honest_senders() {
    let relay = TestRelay::start_with(|c| {
        c.server.max_connections = 32;
        c.server.header_read_timeout = "60s".parse().unwrap();
    })
    .await;
    let connect = async || connect_within_deadline(relay.ingest).await;
    let mut held = Vec::new();
    for _ in 0..2000 {
        held.push(connect().await);
    }
    // Each honest request on a fresh connection, as LeadFloAgent sends.
    leadflo_relay::deliver::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut latencies = Vec::new();
    for n in 0..50 {
        // Keep new idle connections coming between honest requests.
        for _ in 0..20 {
            held.push(connect().await);
        }
        let started = Instant::now();
        let answer = client
            .post(relay.url())
            .header("x-webhook-secret", SECRET)
            .body(LEAD)
            .send()
            .await;
        let status = answer.map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(200)),
            "honest request {n} during the idle flood: {status:?}"
        );
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let evicted = scrape(relay.admin, "leadflo_relay_connections_evicted_total").await;
    assert!(evicted >= 1000.0, "only {evicted} idle connections closed");
    eprintln!(
        "{} idle connections at max_connections = 32: honest p50 {:?}, max {:?}, {evicted} evicted",
        held.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    drop(held);
    relay.stop().await;
}
