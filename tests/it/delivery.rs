//! Delivery to real HTTP targets on loopback: fan-out, retries with the same
//! idempotency key, Retry-After, dead letters, concurrency and rate limits,
//! isolation between targets, and the target's own secret.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::receiver::{Received, Receiver, Reply, first_then, wait_for_requests};
use crate::common::*;
use leadflo_relay::config::TargetConfig;
use leadflo_relay::store::EventId;

/// A target with quick retries, so tests see several attempts in seconds.
fn target(name: &str, url: &str) -> TargetConfig {
    let mut target = TargetConfig::new(name, url);
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "500ms".parse().unwrap();
    target.timeout = "5s".parse().unwrap();
    target
}

fn visitor(n: usize) -> Vec<u8> {
    format!(
        r#"{{"event":"visitor_created","data":{{"visitor":{{"id":"vis_{n}","name":"Zoë {n}"}}}}}}"#
    )
    .into_bytes()
}

/// 1 while crm's circuit is open, else 0.
const CRM_CIRCUIT_OPEN: &str = r#"leadflo_relay_circuit_open{target="crm"}"#;

/// A target that answers its first request 429 with `Retry-After: 2`, and
/// 200 to every later one.
async fn crm_asking_once_for_two_seconds() -> Receiver {
    Receiver::start(first_then(
        1,
        Reply::status(429).header("retry-after", "2"),
        Reply::ok(),
    ))
    .await
}

/// Brings crm back on the port `down` held, waits (`what`) for its queue
/// to drain, and checks that each of `ids` reached it.
async fn crm_back_gets_every_event(
    relay: &TestRelay,
    down: &mut RefusingPort,
    ids: &[EventId],
    what: &str,
) {
    let crm = Receiver::start_on(down.release(), |_, _| Reply::ok()).await;
    wait_for_empty_queue(&relay.store, "crm", what).await;
    let got = crm.idempotency_keys();
    for id in ids {
        assert!(
            got.contains(&id.to_string()),
            "event {id} never reached the target once it was back"
        );
    }
}

/// A target that answers 401, as the handler in LeadFloAgent's docs does,
/// unless the request's `header` is `value`.
fn unauthorized_unless(
    header: &'static str,
    value: &'static str,
) -> impl Fn(usize, &Received) -> Reply + Send + Sync + 'static {
    move |_, r| {
        if r.header(header) == value {
            Reply::ok()
        } else {
            Reply::status(401).body(r#"{"error":"Unauthorized"}"#)
        }
    }
}

/// Waits for the one event sent to be delivered to crm; a dead letter
/// instead means the target refused it, as `refused` says.
async fn delivered_to_crm(relay: &TestRelay, refused: &str) {
    eventually("the delivery to succeed", WAIT, async || {
        (relay.metrics.attempts("crm", "success") == 1).then_some(())
    })
    .await;
    assert!(
        relay.store.dead_letters("crm").unwrap().is_empty(),
        "{refused}"
    );
}

#[tokio::test]
async fn fans_out_by_event_filter_with_exact_bodies_and_headers() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let slack = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        let mut leads_only = target("crm", &crm.url());
        leads_only.events = Some(vec!["visitor_created".into()]);
        c.targets = vec![leads_only, target("slack", &slack.url())];
    })
    .await;
    let lead = fixture("visitor_created.json");
    let chat = fixture("conversation_ended.json");
    let lead_id = send(&relay, lead.clone()).await;
    let chat_id = send(&relay, chat.clone()).await;

    wait_for_requests(&slack, 2, "both events at slack").await;
    wait_for_requests(&crm, 1, "the lead at the crm").await;
    let at_crm = crm.requests();
    assert_eq!(
        at_crm[0].body, lead,
        "crm got different bytes than were ingested"
    );
    assert_eq!(at_crm[0].header("idempotency-key"), lead_id.to_string());
    assert_eq!(at_crm[0].header("x-relay-attempt"), "1");
    assert_eq!(at_crm[0].header("content-type"), "application/json");
    assert!(at_crm[0].header("user-agent").starts_with("leadflo-relay/"));
    // The relay sets these itself (hyper would otherwise add them): each
    // exactly once, with what hyper would have sent.
    let crm_url: reqwest::Url = crm.url().parse().unwrap();
    let authority = format!(
        "{}:{}",
        crm_url.host_str().unwrap(),
        crm_url.port().unwrap()
    );
    for (name, value) in [
        ("host", authority),
        ("content-length", lead.len().to_string()),
    ] {
        let values: Vec<_> = at_crm[0].headers.get_all(name).iter().collect();
        assert_eq!(values, [value.as_str()], "{name}");
    }
    assert!(at_crm[0].headers.get("transfer-encoding").is_none());
    assert_eq!(
        at_crm[0].header("x-webhook-secret"),
        "",
        "no secret configured, none sent"
    );

    let mut at_slack: HashMap<String, Vec<u8>> = slack
        .requests()
        .into_iter()
        .map(|r| (r.header("idempotency-key").to_owned(), r.body))
        .collect();
    assert_eq!(at_slack.remove(&lead_id.to_string()), Some(lead));
    assert_eq!(at_slack.remove(&chat_id.to_string()), Some(chat));

    // The crm never gets the conversation_ended event: its queue is empty.
    eventually("queues to drain", WAIT, async || {
        (relay.store.queued_count("crm") == 0 && relay.store.queued_count("slack") == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        crm.count(),
        1,
        "crm received an event it does not subscribe to"
    );
    relay.stop().await;
}

#[tokio::test]
async fn retries_until_success_with_the_same_idempotency_key() {
    let crm = Receiver::start(first_then(2, Reply::status(503), Reply::ok())).await;
    let relay = TestRelay::start_with(|c| c.targets = vec![target("crm", &crm.url())]).await;
    let id = send(&relay, visitor(1)).await;
    wait_for_requests(&crm, 3, "three attempts").await;
    wait_for_empty_queue(&relay.store, "crm", "the delivery to leave the queue").await;
    let requests = crm.requests();
    assert_eq!(requests.len(), 3, "a delivered event was sent again");
    for (n, request) in requests.iter().enumerate() {
        assert_eq!(
            request.header("idempotency-key"),
            id.to_string(),
            "attempt {n}"
        );
        assert_eq!(request.header("x-relay-attempt"), (n + 1).to_string());
        assert_eq!(request.body, visitor(1));
    }
    assert_eq!(relay.metrics.attempts("crm", "retry"), 2);
    assert_eq!(relay.metrics.attempts("crm", "success"), 1);
    assert!(relay.store.dead_letters("crm").unwrap().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let crm = crm_asking_once_for_two_seconds().await;
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &crm.url());
        t.retry.max_interval = "1m".parse().unwrap();
        c.targets = vec![t];
    })
    .await;
    send(&relay, visitor(1)).await;
    wait_for_requests(&crm, 2, "the retry after 429").await;
    let requests = crm.requests();
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(2),
        "retried after {gap:?}, before Retry-After: 2"
    );
    relay.stop().await;
}

#[tokio::test]
async fn client_errors_and_redirects_are_dead_lettered_at_once() {
    let crm = Receiver::start(|_, r| {
        if r.body.windows(5).any(|w| w == b"vis_1") {
            Reply::status(400).body(r#"{"error":"phone is invalid"}"#)
        } else {
            Reply::status(301).header("location", "http://127.0.0.1:1/elsewhere")
        }
    })
    .await;
    let relay = TestRelay::start_with(|c| c.targets = vec![target("crm", &crm.url())]).await;
    let rejected = send(&relay, visitor(1)).await;
    let redirected = send(&relay, visitor(2)).await;
    let dead = wait_for_dead_letters(&relay.store, "crm", 2).await;
    let by_id: HashMap<EventId, _> = dead.into_iter().map(|d| (d.id, d)).collect();
    let d400 = &by_id[&rejected];
    assert_eq!((d400.last_status, d400.attempts), (400, 1));
    assert!(
        d400.reason.contains("HTTP 400") && d400.reason.contains("phone is invalid"),
        "{}",
        d400.reason
    );
    assert!(d400.first_attempt_ms > 0 && d400.last_attempt_ms >= d400.first_attempt_ms);
    let d301 = &by_id[&redirected];
    assert_eq!((d301.last_status, d301.attempts), (301, 1));
    assert_eq!(
        relay.store.queued_count("crm"),
        0,
        "dead letters must leave the queue"
    );
    assert_eq!(
        crm.count(),
        2,
        "a 4xx or 3xx was retried (or the redirect followed)"
    );
    assert_eq!(relay.metrics.attempts("crm", "dead"), 2);
    relay.stop().await;
}

#[tokio::test]
async fn a_target_that_is_down_gets_everything_when_it_comes_back() {
    // Connections are refused until the target comes back on this port.
    let mut down = RefusingPort::new();
    let relay = TestRelay::start_with(|c| c.targets = vec![target("crm", &down.url())]).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(send(&relay, visitor(n)).await);
    }
    eventually(
        "failed attempts while the target is down",
        WAIT,
        async || (relay.metrics.attempts("crm", "retry") >= 5).then_some(()),
    )
    .await;
    crm_back_gets_every_event(&relay, &mut down, &ids, "every event at the target").await;
    assert!(relay.store.dead_letters("crm").unwrap().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn concurrency_and_rate_limits_are_never_exceeded() {
    // Slow answers: without a concurrency limit all 15 would be in flight.
    let slow = Receiver::start(|_, _| Reply::ok().after(Duration::from_millis(400))).await;
    // Instant answers: without a rate limit all 15 would start at once.
    let quick = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        let mut parallel = target("slow", &slow.url());
        parallel.concurrency = 3;
        let mut limited = target("quick", &quick.url());
        limited.concurrency = 10;
        limited.rate_per_second = Some(5.0);
        c.targets = vec![parallel, limited];
    })
    .await;
    for n in 0..15 {
        send(&relay, visitor(n)).await;
    }
    wait_for_requests(&slow, 15, "all events at the slow target").await;
    wait_for_requests(&quick, 15, "all events at the rate-limited target").await;
    assert_eq!(
        slow.max_in_flight(),
        3,
        "concurrency 3: never more, and all of it used"
    );
    // At most 5 starts in any window of 0.8 s (the limiter spaces them 200 ms
    // apart; 0.2 s of slack absorbs scheduling jitter on a loaded machine).
    let starts: Vec<_> = quick.requests().iter().map(|r| r.at).collect();
    for (i, first) in starts.iter().enumerate() {
        let within = starts[i..]
            .iter()
            .filter(|t| **t - *first < Duration::from_millis(800))
            .count();
        assert!(
            within <= 5,
            "{within} attempt starts within 0.8 s, limit 5/s"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_hanging_target_does_not_slow_a_healthy_one() {
    let stuck = Receiver::start(|_, _| Reply::ok().after(Duration::from_secs(60))).await;
    let healthy = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        let mut hanging = target("stuck", &stuck.url());
        hanging.concurrency = 1;
        hanging.timeout = "20s".parse().unwrap();
        c.targets = vec![hanging, target("healthy", &healthy.url())];
    })
    .await;
    for n in 0..30 {
        send(&relay, visitor(n)).await;
    }
    wait_for_requests(&healthy, 30, "all events at the healthy target").await;
    // All of that happened while the stuck target still held its first
    // attempt (its timeout is 20 s and it answers after 60 s).
    assert_eq!(
        stuck.count(),
        1,
        "the stuck target got more than its concurrency"
    );
    assert_eq!(
        stuck.in_flight(),
        1,
        "the stuck attempt should still be hanging"
    );
    assert_eq!(relay.store.queued_count("stuck"), 30);
    relay.stop().await;
}

#[tokio::test]
async fn the_targets_own_secret_is_sent_like_leadfloagent_sends_it() {
    const CRM_SECRET: &str = "crm-side-secret";
    let crm = Receiver::start(unauthorized_unless("x-webhook-secret", CRM_SECRET)).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("crm-secret");
    std::fs::write(&secret_file, format!("{CRM_SECRET}\n")).unwrap();
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &crm.url());
        t.secret_file = Some(secret_file.clone());
        c.targets = vec![t];
    })
    .await;
    send(&relay, fixture("visitor_created.json")).await;
    delivered_to_crm(&relay, "the handler refused the secret").await;
    assert_eq!(crm.requests()[0].header("x-webhook-secret"), CRM_SECRET);
    relay.stop().await;
}

/// Zapier, Make and self-hosted CRMs are often given as
/// `https://user:password@host/path`: the credentials go as HTTP Basic
/// authentication, percent-decoded, like a browser or curl sends them.
#[tokio::test]
async fn credentials_in_a_target_url_are_sent_as_basic_auth() {
    // "zap@user" : "p:ss w", percent-encoded in the URL.
    const EXPECTED: &str = "Basic emFwQHVzZXI6cDpzcyB3";
    let crm = Receiver::start(unauthorized_unless("authorization", EXPECTED)).await;
    let url = crm
        .url()
        .replacen("http://", "http://zap%40user:p%3Ass%20w@", 1);
    let relay = TestRelay::start_with(|c| c.targets = vec![target("crm", &url)]).await;
    send(&relay, visitor(1)).await;
    delivered_to_crm(&relay, "the target refused the credentials").await;
    let request = &crm.requests()[0];
    assert_eq!(request.header("authorization"), EXPECTED);
    // The host header names the host alone, never the credentials.
    assert!(
        !request.header("host").contains('@'),
        "{}",
        request.header("host")
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_closes_on_success() {
    let crm = Receiver::start(|n, _| {
        // The first attempts hang long enough for all four slots to fill.
        let delay = if n < 4 { 800 } else { 100 };
        Reply::status(500).after(Duration::from_millis(delay))
    })
    .await;
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &crm.url());
        t.concurrency = 4;
        t.circuit_failures = 3;
        t.retry.initial = "200ms".parse().unwrap();
        t.retry.max_interval = "400ms".parse().unwrap();
        c.targets = vec![t];
    })
    .await;
    for n in 0..20 {
        send(&relay, visitor(n)).await;
    }
    wait_for_metric(relay.admin, CRM_CIRCUIT_OPEN, 1.0, "the circuit to open").await;
    assert_eq!(
        crm.max_in_flight(),
        4,
        "before opening, attempts run in parallel"
    );
    // While open: one probe at a time, not `concurrency` parallel failures.
    eventually(
        "attempts from before the opening to finish",
        WAIT,
        async || (crm.in_flight() <= 1).then_some(()),
    )
    .await;
    crm.reset_max_in_flight();
    let before = crm.count();
    eventually("a few probes", WAIT, async || {
        (crm.count() >= before + 3).then_some(())
    })
    .await;
    assert_eq!(
        crm.max_in_flight(),
        1,
        "an open circuit sent parallel attempts"
    );
    crm.set_behaviour(|_, _| Reply::ok());
    wait_for_empty_queue(
        &relay.store,
        "crm",
        "the backlog to drain after the first success",
    )
    .await;
    assert_eq!(scrape(relay.admin, CRM_CIRCUIT_OPEN).await, 0.0);
    relay.stop().await;
}

#[tokio::test]
async fn a_target_added_later_does_not_get_history() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start().await;
    send(&relay, visitor(1)).await;
    let dir = relay.stop().await;
    let relay = TestRelay::start_in(dir, |c| c.targets = vec![target("crm", &crm.url())]).await;
    let id = send(&relay, visitor(2)).await;
    wait_for_requests(&crm, 1, "the new event").await;
    wait_for_empty_queue(&relay.store, "crm", "the queue to drain").await;
    let requests = crm.requests();
    assert_eq!(requests.len(), 1, "history was resent to a new target");
    assert_eq!(requests[0].header("idempotency-key"), id.to_string());
    relay.stop().await;
}

#[tokio::test]
async fn deliveries_older_than_max_age_become_dead_letters() {
    let crm = Receiver::start(|_, _| Reply::status(502)).await;
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &crm.url());
        t.retry.max_age = "1s".parse().unwrap();
        t.circuit_failures = 1000;
        c.targets = vec![t];
    })
    .await;
    let id = send(&relay, visitor(1)).await;
    let dead = eventually("the delivery to give up", WAIT, async || {
        relay.store.dead_letters("crm").unwrap().into_iter().next()
    })
    .await;
    assert_eq!(dead.id, id);
    assert_eq!(dead.last_status, 502);
    assert!(
        dead.attempts >= 2,
        "only {} attempts before giving up",
        dead.attempts
    );
    assert!(
        dead.reason.contains("gave up after") && dead.reason.contains("HTTP 502"),
        "{}",
        dead.reason
    );
    assert_eq!(relay.store.queued_count("crm"), 0);
    let attempts = crm.count();
    assert_eq!(
        attempts as u32, dead.attempts,
        "attempts after the dead letter"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_the_retry_schedule() {
    let crm = Receiver::start(|_, _| Reply::status(503).header("retry-after", "600")).await;
    let with_target = |c: &mut leadflo_relay::config::Config| {
        let mut t = target("crm", &crm.url());
        t.retry.max_interval = "1h".parse().unwrap();
        c.targets = vec![t];
    };
    let relay = TestRelay::start_with(with_target).await;
    let first = send(&relay, visitor(1)).await;
    wait_for_requests(&crm, 1, "the first attempt").await;
    let first_attempt_ms = leadflo_relay::clock::now_ms();
    eventually("the retry to be scheduled", WAIT, async || {
        (relay.metrics.attempts("crm", "retry") == 1).then_some(())
    })
    .await;
    let dir = relay.stop().await;

    crm.set_behaviour(|_, _| Reply::ok());
    let relay = TestRelay::start_in(dir, with_target).await;
    let queued = relay
        .store
        .due_deliveries(
            "crm",
            &leadflo_relay::store::DueQuery {
                now_ms: 0,
                limit: 10,
                ignore_due: true,
                after: None,
                skip: &|_| false,
            },
        )
        .unwrap()
        .deliveries;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, first);
    assert!(
        queued[0].due_ms >= first_attempt_ms + 590_000,
        "the Retry-After schedule was lost in the restart"
    );
    assert_eq!(queued[0].state.attempts, 1);
    // The restarted dispatcher works (it delivers a new event) yet leaves
    // the scheduled one alone.
    let second = send(&relay, visitor(2)).await;
    wait_for_requests(&crm, 2, "the new event").await;
    let requests = crm.requests();
    assert_eq!(requests[1].header("idempotency-key"), second.to_string());
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.header("idempotency-key") == first.to_string())
            .count(),
        1,
        "the restart retried before the stored schedule"
    );
    relay.stop().await;
}

#[tokio::test]
async fn shutdown_leaves_unfinished_attempts_queued_for_the_next_start() {
    let crm = Receiver::start(|_, _| Reply::ok().after(Duration::from_secs(60))).await;
    let with_target = |c: &mut leadflo_relay::config::Config| {
        c.server.shutdown_grace = "1s".parse().unwrap();
        c.targets = vec![target("crm", &crm.url())];
    };
    let relay = TestRelay::start_with(with_target).await;
    let id = send(&relay, visitor(1)).await;
    wait_for_requests(&crm, 1, "the attempt to start").await;
    let dir = relay.stop().await;
    assert_eq!(
        open_store(dir.path()).queued_count("crm"),
        1,
        "an unfinished attempt left the queue"
    );

    crm.set_behaviour(|_, _| Reply::ok());
    let relay = TestRelay::start_in(dir, with_target).await;
    wait_for_empty_queue(&relay.store, "crm", "the delivery after restart").await;
    assert_eq!(
        crm.requests().last().unwrap().header("idempotency-key"),
        id.to_string()
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_target_back_from_a_long_outage_is_probed_within_probe_max_interval() {
    // Backoff so long that, uncapped, the next probe would be ten minutes away.
    let mut down = RefusingPort::new();
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &down.url());
        t.circuit_failures = 1;
        t.retry.initial = "10m".parse().unwrap();
        t.retry.max_interval = "1h".parse().unwrap();
        t.probe_max_interval = "200ms".parse().unwrap();
        c.targets = vec![t];
    })
    .await;
    let ids = [
        send(&relay, visitor(1)).await,
        send(&relay, visitor(2)).await,
    ];
    wait_for_metric(relay.admin, CRM_CIRCUIT_OPEN, 1.0, "the circuit to open").await;
    crm_back_gets_every_event(
        &relay,
        &mut down,
        &ids,
        "the backlog after the target's return",
    )
    .await;
    relay.stop().await;
}

/// A target that writes each answer's head and its body apart, as servers
/// that flush the head first do: a 200 head, then, a moment later, a JSON
/// body. It counts the connections it accepted and the answers it began.
struct SplitAnswers {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl SplitAnswers {
    const BODY: &'static str = r#"{"status":"ok","id":"contact_1"}"#;

    async fn start() -> SplitAnswers {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (counted, done) = (connections.clone(), answered.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(SplitAnswers::serve(stream, done.clone()));
            }
        });
        SplitAnswers {
            addr,
            connections,
            answered,
            accept,
        }
    }

    /// Answers every request on one keep-alive connection until it closes.
    async fn serve(mut stream: tokio::net::TcpStream, answered: Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Appends what arrives to `buf`; false once the connection is over.
        let mut read_more =
            async |stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>| match stream
                .read(&mut chunk)
                .await
            {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    true
                }
            };
        loop {
            let head_end = loop {
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < head_end + length {
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            }
            buf.drain(..head_end + length);
            let answer_head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                Self::BODY.len()
            );
            if stream.write_all(answer_head.as_bytes()).await.is_err() {
                return;
            }
            answered.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if stream.write_all(Self::BODY.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

impl Drop for SplitAnswers {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test]
async fn a_target_answering_with_a_body_keeps_one_connection() {
    let crm = SplitAnswers::start().await;
    let relay = TestRelay::start_with(|c| {
        let mut crm_target = target("crm", &crm.url());
        crm_target.concurrency = 1;
        c.targets = vec![crm_target];
    })
    .await;
    const EVENTS: usize = 10;
    // One event at a time, the next sent once the last is recorded: the
    // connection has long been back in the pool when the next attempt
    // starts. Each 200 counts though its body came late.
    let success = r#"leadflo_relay_delivery_attempts_total{outcome="success",target="crm"}"#;
    for n in 0..EVENTS {
        send(&relay, visitor(n)).await;
        eventually("the delivery recorded", WAIT, async || {
            let delivered = metric_value(&metrics_text(relay.admin).await, success);
            (delivered == Some((n + 1) as f64)).then_some(())
        })
        .await;
    }
    // Unread, the body a 200 brought would have closed each connection: one
    // new connection per delivery. Read, it leaves the connection in the
    // pool (a second one is allowed for the pool's own races).
    let connections = crm.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "{connections} connections for {EVENTS} deliveries"
    );
    let metrics = metrics_text(relay.admin).await;
    let retried = r#"leadflo_relay_delivery_attempts_total{outcome="retry",target="crm"}"#;
    assert_eq!(metric_value(&metrics, retried).unwrap_or(0.0), 0.0);
    assert_eq!(crm.answered.load(Ordering::SeqCst), EVENTS);
    relay.stop().await;
}

/// CPU time (user + system, in clock ticks) the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name: state is the first, utime the 12th.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// While the one probe of an open circuit is in flight, the dispatcher
/// waits for it. It used to wake at once, again and again, for the probe
/// time that had passed: a core spent for as long as a hanging target took
/// to time out, every probe. The real binary, so its CPU time is its own
/// (a busy loop costs about 100 ticks a second; waiting costs next to none).
#[tokio::test]
async fn an_open_circuit_waits_for_its_probe_without_spinning() {
    // The first attempt fails at once (opening the circuit); the probe
    // hangs for longer than the measurement.
    let crm = Receiver::start(|n, _| match n {
        0 => Reply::status(500),
        _ => Reply::status(500).after(Duration::from_secs(8)),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[[targets]]\nname = \"crm\"\nurl = \"{}\"\nconcurrency = 1\ntimeout = \"20s\"\n\
             circuit_failures = 1\nprobe_max_interval = \"100ms\"\n",
            crm.url()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut relay = RelayProcess::start(&data, &["--config", config.to_str().unwrap()]);
    let (status, _) = post(&client(), &relay.url(), Some(SECRET), visitor(1)).await;
    assert_eq!(status, 200);
    eventually("the probe in flight", WAIT, async || {
        (crm.count() == 2 && crm.in_flight() == 1).then_some(())
    })
    .await;
    let pid = relay.child.id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert_eq!(
        crm.in_flight(),
        1,
        "the probe was still in flight throughout"
    );
    assert!(
        used < 50,
        "the relay used {used} ticks of CPU in 2 s of waiting for one probe"
    );
    relay.kill9();
}

/// A `Retry-After` speaks for the target: after a 429 asking for 2 s, no
/// attempt starts before they have passed, of the event that got it or of
/// any other (the next event went out at once). One attempt at a time, so
/// the second event cannot start before the first one's answer is counted.
#[tokio::test]
async fn retry_after_holds_every_delivery_of_the_target() {
    let crm = crm_asking_once_for_two_seconds().await;
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &crm.url());
        t.concurrency = 1;
        t.retry.max_interval = "1m".parse().unwrap();
        c.targets = vec![t];
    })
    .await;
    for n in 0..2 {
        send(&relay, visitor(n)).await;
    }
    wait_for_requests(&crm, 3, "both events delivered").await;
    let requests = crm.requests();
    let refused = requests[0].at;
    for request in &requests[1..] {
        let gap = request.at - refused;
        assert!(
            gap >= Duration::from_secs(2),
            "an attempt started {gap:?} after a 429 with Retry-After: 2"
        );
    }
    relay.stop().await;
}

/// A target that answers 429 with `Retry-After` asks the relay to stay away
/// for that long. When the 429s open the circuit, the probe must not come
/// back before the target asked (it used to come after `initial`, taking
/// the very delivery whose `Retry-After` had not passed, due or not).
#[tokio::test]
async fn an_open_circuit_still_honours_retry_after() {
    let crm = Receiver::start(|_, _| Reply::status(429).header("retry-after", "3")).await;
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &crm.url());
        t.concurrency = 1;
        t.circuit_failures = 2;
        t.retry.max_interval = "1m".parse().unwrap();
        c.targets = vec![t];
    })
    .await;
    for n in 0..2 {
        send(&relay, visitor(n)).await;
    }
    wait_for_metric(relay.admin, CRM_CIRCUIT_OPEN, 1.0, "the circuit to open").await;
    // The probe (the third request) takes the first event again: not
    // before the 3 s it was asked to wait (it came after `initial`,
    // 100 ms).
    wait_for_requests(&crm, 3, "the probe after Retry-After").await;
    let mut last: HashMap<String, std::time::Instant> = HashMap::new();
    for request in crm.requests() {
        let key = request.header("idempotency-key").to_owned();
        if let Some(before) = last.insert(key.clone(), request.at) {
            let gap = request.at - before;
            assert!(
                gap >= Duration::from_secs(3),
                "event {key} tried again {gap:?} after a 429 with Retry-After: 3"
            );
        }
    }
    relay.stop().await;
}

/// `rate_per_second` is any number above 0 to the config check; a tiny one
/// (1e-300: an interval of 1e300 s) must be refused there, or work: the
/// dispatcher's `Duration::from_secs_f64(1 / rate)` panicked instead, and
/// the target silently got nothing until the next start.
#[tokio::test]
async fn a_tiny_rate_limit_is_refused_or_works() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    for rate in ["1e-300", "1e-19"] {
        let text = format!(
            "[[targets]]\nname = \"crm\"\nurl = \"{}\"\nrate_per_second = {rate}\n",
            crm.url()
        );
        let parsed = match leadflo_relay::config::Config::parse(&text, "relay.toml") {
            Err(err) => {
                assert!(err.to_string().contains("rate_per_second"), "{err}");
                continue;
            }
            Ok(parsed) => parsed,
        };
        let relay = TestRelay::start_with(|c| c.targets = parsed.targets).await;
        send(&relay, visitor(1)).await;
        // The limiter starts with one start allowed.
        wait_for_requests(&crm, 1, "the first delivery").await;
        relay.stop().await;
    }
}

/// The nice value and name of each thread of process `pid`.
#[cfg(target_os = "linux")]
fn threads_nice(pid: u32) -> Vec<(String, i32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Fields after the name (which may hold spaces): state is field 3,
        // nice field 19.
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        let nice = after_name
            .split_whitespace()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap();
        threads.push((name.trim().to_owned(), nice));
    }
    threads
}

/// Under CPU contention ingest comes first: the delivery pool's threads run
/// at a lower priority than the threads that answer the sender (which never
/// retries), and delivery catches up from the log.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn delivery_threads_yield_the_cpu_to_ingest() {
    use leadflo_relay::app::{DELIVERY_NICE_INCREMENT, DELIVERY_THREAD_NAME};
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(|_, _| Reply::ok()).await;
    // A host name, not an address: reqwest looks it up on a thread that a
    // delivery thread starts (tokio's blocking pool), which inherits the
    // lowered priority and must not be lowered twice.
    let url = receiver.url().replace("127.0.0.1", "localhost");
    let target = format!("crm={url}");
    let relay = RelayProcess::start(dir.path(), &["--target", &target]);
    let pid = relay.child.id();
    // Make both pools work before looking: an event in, and delivered.
    let (status, json) = post(&client(), &relay.url(), Some(SECRET), visitor(1)).await;
    assert_eq!(status, 200, "{json}");
    eventually("the delivery", WAIT, async || {
        (receiver.count() == 1).then_some(())
    })
    .await;

    let threads = threads_nice(pid);
    let base = threads
        .iter()
        .find(|(name, _)| name == "leadflo-relay")
        .map(|(_, nice)| *nice)
        .expect("the main thread");
    let delivery: Vec<i32> = threads
        .iter()
        .filter(|(name, _)| name == DELIVERY_THREAD_NAME)
        .map(|(_, nice)| *nice)
        .collect();
    assert!(delivery.len() >= 2, "delivery threads: {threads:?}");
    let lowered = (base + DELIVERY_NICE_INCREMENT).min(19);
    assert!(
        delivery.iter().all(|nice| *nice == lowered),
        "every delivery thread at nice {lowered}: {threads:?}"
    );
    // The relay's own threads; sled's I/O threads take the priority of
    // whichever thread made sled start them.
    let ours = ["tokio-rt-worker", "leadflo-commit", "leadflo-apply"];
    let others: Vec<&(String, i32)> = threads
        .iter()
        .filter(|(name, _)| ours.contains(&name.as_str()))
        .collect();
    assert!(others.len() >= 4, "the relay's own threads: {threads:?}");
    assert!(
        others.iter().all(|(_, nice)| *nice == base),
        "ingest, commit and apply threads stay at nice {base}: {threads:?}"
    );
}
