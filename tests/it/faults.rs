//! Downstream faults: targets that misbehave at the TCP and HTTP level. Each
//! must be classified right (retry or dead letter), never hold an attempt
//! past the target's timeout, and never slow another target.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::receiver::{Receiver, Reply, first_then};
use crate::common::*;
use leadflo_relay::config::TargetConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a misbehaving raw-TCP target does with each connection.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Reads the request, then resets the connection (RST, no answer).
    ResetMidResponse,
    /// Accepts and never answers.
    NeverAnswers,
    /// Sends a 2xx status line and headers, then stalls before the body.
    HeadersThenStall(u16),
    /// Answers 400 with an endless body.
    HugeBody,
    /// Reads the request and closes without a word (as a TLS server would
    /// to a plain-text client, or a plain server to a TLS one).
    CloseImmediately,
}

async fn read_request(stream: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// A raw TCP target that misbehaves; counts connections.
async fn bad_target(
    how: Misbehaviour,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                match how {
                    Misbehaviour::ResetMidResponse => {
                        read_request(&mut stream).await;
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
                        // A zero linger sends RST on drop and never blocks.
                        #[allow(deprecated)]
                        let _ = stream.set_linger(Some(Duration::ZERO));
                        drop(stream);
                    }
                    Misbehaviour::NeverAnswers => {
                        read_request(&mut stream).await;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Misbehaviour::HeadersThenStall(status) => {
                        read_request(&mut stream).await;
                        let head = format!("HTTP/1.1 {status} X\r\ncontent-length: 100\r\n\r\n");
                        let _ = stream.write_all(head.as_bytes()).await;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Misbehaviour::HugeBody => {
                        read_request(&mut stream).await;
                        let _ = stream
                            .write_all(
                                b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n",
                            )
                            .await;
                        let chunk = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
                        for _ in 0..16_384 {
                            if stream.write_all(chunk.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                    Misbehaviour::CloseImmediately => {
                        let mut byte = [0u8; 1];
                        let _ = stream.read(&mut byte).await;
                    }
                }
            });
        }
    });
    (addr, connections)
}

fn fault_target(name: &str, url: &str, timeout: &str) -> TargetConfig {
    let mut target = TargetConfig::new(name, url);
    target.timeout = timeout.parse().unwrap();
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "200ms".parse().unwrap();
    target.concurrency = 1;
    target.circuit_failures = 1000;
    target
}

/// Starts a relay with the faulty target `bad` at `url` and a healthy one,
/// sends three events, and checks the healthy target gets all three while
/// `bad` is being tried.
async fn with_faulty_url(url: &str, timeout: &str, check: impl AsyncFnOnce(&TestRelay)) {
    let healthy = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![
            fault_target("bad", url, timeout),
            fault_target("healthy", &healthy.url(), "5s"),
        ];
    })
    .await;
    for _ in 0..3 {
        send(&relay, fixture("visitor_created.json")).await;
    }
    eventually("the healthy target to get everything", WAIT, async || {
        (healthy.count() == 3).then_some(())
    })
    .await;
    check(&relay).await;
    relay.stop().await;
}

/// [`with_faulty_url`] with a raw-TCP target that misbehaves as `how` says.
async fn with_fault(how: Misbehaviour, timeout: &str, check: impl AsyncFnOnce(&TestRelay)) {
    let (addr, _) = bad_target(how).await;
    with_faulty_url(&format!("http://{addr}/hook"), timeout, check).await;
}

async fn retries_at_least(relay: &TestRelay, attempts: u64) {
    eventually("retries at the faulty target", WAIT, async || {
        (relay.metrics.attempts("bad", "retry") >= attempts).then_some(())
    })
    .await;
    assert_eq!(
        relay.metrics.attempts("bad", "dead"),
        0,
        "a transient fault was dead-lettered"
    );
    assert_eq!(relay.metrics.attempts("bad", "success"), 0);
}

#[tokio::test]
async fn a_reset_mid_response_is_retried() {
    with_fault(Misbehaviour::ResetMidResponse, "5s", async |relay| {
        retries_at_least(relay, 3).await
    })
    .await;
}

#[tokio::test]
async fn a_target_that_never_answers_times_out_and_is_retried() {
    with_fault(Misbehaviour::NeverAnswers, "300ms", async |relay| {
        let started = Instant::now();
        retries_at_least(relay, 3).await;
        // Three attempts of 300 ms each, one at a time, plus short backoffs:
        // an attempt held past its timeout would take the full hour.
        assert!(started.elapsed() < WAIT);
    })
    .await;
}

#[tokio::test]
async fn a_2xx_status_with_a_stalled_body_counts_as_delivered() {
    // The target said 2xx: the event is theirs. The relay does not wait for
    // a body it never reads.
    with_fault(
        Misbehaviour::HeadersThenStall(200),
        "300ms",
        async |relay| {
            eventually("deliveries to the stalling target", WAIT, async || {
                (relay.metrics.attempts("bad", "success") == 3).then_some(())
            })
            .await;
            assert_eq!(relay.store.queued_count("bad"), 0);
        },
    )
    .await;
}

#[tokio::test]
async fn a_rejection_with_a_stalled_body_is_dead_lettered_within_the_timeout() {
    with_fault(
        Misbehaviour::HeadersThenStall(422),
        "300ms",
        async |relay| {
            let dead = wait_for_dead_letters(&relay.store, "bad", 3).await;
            assert!(dead.iter().all(|d| d.last_status == 422), "{dead:?}");
        },
    )
    .await;
}

#[tokio::test]
async fn a_huge_rejection_body_is_cut_not_buffered() {
    with_fault(Misbehaviour::HugeBody, "5s", async |relay| {
        let dead = wait_for_dead_letters(&relay.store, "bad", 3).await;
        for letter in dead {
            assert_eq!(letter.last_status, 400);
            assert!(
                letter.reason.len() < 400,
                "kept {} bytes of the answer",
                letter.reason.len()
            );
            assert!(letter.reason.contains("xxxx"));
        }
    })
    .await;
}

#[tokio::test]
async fn a_tls_mismatch_is_retried() {
    // An https URL to a server that does not speak TLS.
    let (addr, connections) = bad_target(Misbehaviour::CloseImmediately).await;
    with_faulty_url(&format!("https://{addr}/hook"), "2s", async |relay| {
        retries_at_least(relay, 2).await;
        assert!(connections.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    })
    .await;
}

#[tokio::test]
async fn a_name_that_resolves_nowhere_is_retried() {
    // RFC 2606: .invalid never resolves.
    with_faulty_url(
        "http://leadflo-relay-test.invalid/hook",
        "2s",
        async |relay| retries_at_least(relay, 2).await,
    )
    .await;
}

#[tokio::test]
async fn a_2xx_after_the_timeout_is_a_timeout_and_retried() {
    let slow = Receiver::start(first_then(
        1,
        Reply::ok().after(Duration::from_millis(1500)),
        Reply::ok(),
    ))
    .await;
    let relay =
        TestRelay::start_with(|c| c.targets = vec![fault_target("bad", &slow.url(), "300ms")])
            .await;
    send(&relay, fixture("visitor_created.json")).await;
    eventually("the retry to succeed", WAIT, async || {
        (relay.metrics.attempts("bad", "success") == 1).then_some(())
    })
    .await;
    assert_eq!(
        relay.metrics.attempts("bad", "retry"),
        1,
        "the late 2xx must count as a timeout"
    );
    let attempts: Vec<String> = slow
        .requests()
        .iter()
        .map(|r| r.header("x-relay-attempt").to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2"]);
    relay.stop().await;
}

/// A rejection is decided by its status line: a body that stalls after it
/// must not turn the 4xx into a timeout (and a retry). Many events, since
/// the relay's own timeout and reqwest's (the one that ends the body read)
/// are armed microseconds apart and usually fire in the same millisecond.
#[tokio::test]
async fn a_rejection_with_a_stalled_body_is_never_retried() {
    const EVENTS: usize = 40;
    let (addr, _) = bad_target(Misbehaviour::HeadersThenStall(422)).await;
    let relay = TestRelay::start_with(|c| {
        let mut t = fault_target("bad", &format!("http://{addr}/hook"), "200ms");
        t.concurrency = 8;
        c.targets = vec![t];
    })
    .await;
    for _ in 0..EVENTS {
        send(&relay, fixture("visitor_created.json")).await;
    }
    let dead = wait_for_dead_letters(&relay.store, "bad", EVENTS).await;
    let retried: Vec<_> = dead.iter().filter(|d| d.attempts != 1).collect();
    assert!(
        retried.is_empty() && relay.metrics.attempts("bad", "retry") == 0,
        "{} of {EVENTS} 422s counted as timeouts and retried: {retried:?}",
        retried.len()
    );
    relay.stop().await;
}
