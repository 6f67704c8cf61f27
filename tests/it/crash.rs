//! The real binary, killed with SIGKILL mid-stream and restarted on the same
//! data directory: every acknowledged event must survive with identical
//! bytes, and ids after a restart must be above every id before it. Also
//! the graceful path: SIGTERM lets an in-flight request finish, exits 0.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use leadflo_relay::store::EventId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Kill rounds per kill point: a few in `cargo test`; `.ci/run` sets
/// `LEADFLO_CRASH_ROUNDS` higher for a soak.
fn rounds(quick: usize) -> usize {
    std::env::var("LEADFLO_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(quick)
}
const SENDERS: usize = 16;

/// Sends distinct events from `SENDERS` tasks until `stop`, or until the
/// relay stops answering; returns every (id, body) that got a 200.
async fn load(url: String, round: usize, stop: Arc<AtomicBool>) -> Vec<(EventId, Vec<u8>)> {
    leadflo_relay::deliver::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = format!(
                    r#"{{"event":"visitor_created","data":{{"visitor":{{"id":"r{round}s{sender}n{n}","name":"Zoë {n}"}}}}}}"#
                )
                .into_bytes();
                let sent = client
                    .post(&url)
                    .header("x-webhook-secret", SECRET)
                    .body(body.clone())
                    .send()
                    .await;
                let Ok(response) = sent else { break };
                if response.status() != 200 {
                    break;
                }
                let Ok(json) = response.json::<serde_json::Value>().await else { break };
                let id = json["id"].as_str().expect("200 carries an id").parse().unwrap();
                acked.push((id, body));
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked_ever: HashMap<EventId, Vec<u8>> = HashMap::new();
    let mut highest_before: Option<EventId> = None;
    let rounds = rounds(4);
    for round in 0..rounds {
        let mut relay = RelayProcess::start(dir.path(), &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let sending = tokio::spawn(load(relay.url(), round, stop.clone()));
        // Let load build up (as many acks as a deadline allows, at least some),
        // then kill at a point that differs from round to round.
        let url = relay.admin;
        eventually(
            "the relay to acknowledge events",
            Duration::from_secs(30),
            async || {
                let accepted = scrape(
                    url,
                    r#"leadflo_relay_ingest_requests_total{result="accepted"}"#,
                )
                .await;
                (accepted >= 200.0 + 150.0 * (round % 5) as f64).then_some(())
            },
        )
        .await;
        relay.kill9();
        stop.store(true, Ordering::Relaxed);
        let acked = sending.await.unwrap();
        assert!(!acked.is_empty(), "round {round}: nothing was acknowledged");

        let store = open_store(dir.path());
        for (id, body) in &acked {
            if let Some(before) = highest_before {
                assert!(
                    *id > before,
                    "round {round}: id {id} not above {before} from before the crash"
                );
            }
            let stored = store.event(*id).unwrap();
            assert_eq!(
                stored.map(|e| e.body).as_ref(),
                Some(body),
                "round {round}: event {id} was acknowledged but is missing or changed after kill -9"
            );
        }
        highest_before = store
            .events()
            .last()
            .map(|e| e.unwrap().id)
            .max(highest_before);
        acked_ever.extend(acked);
        drop(store);
    }
    // Nothing acknowledged in any round went missing later either.
    let store = open_store(dir.path());
    for (id, body) in &acked_ever {
        assert_eq!(
            store.event(*id).unwrap().map(|e| e.body).as_ref(),
            Some(body),
            "event {id}"
        );
    }
    eprintln!(
        "{rounds} kill -9 rounds while requests arrive: {} acknowledged events, 0 lost",
        acked_ever.len()
    );
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(dir.path(), &[]);
    let body = fixture("visitor_created.json");
    let mut stream = TcpStream::connect(relay.ingest).await.unwrap();
    let head = format!(
        "POST /leadflo-webhook HTTP/1.1\r\nhost: x\r\nx-webhook-secret: {SECRET}\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..10]).await.unwrap();
    // The request is in flight (headers read, part of its body sent) when
    // SIGTERM arrives: a connection whose headers are not read yet is idle,
    // and closes at once.
    eventually(
        "the relay to begin the request",
        Duration::from_secs(10),
        async || {
            (scrape(relay.admin, "leadflo_relay_ingest_requests_in_flight").await == 1.0)
                .then_some(())
        },
    )
    .await;
    let stderr = relay.stderr.clone();
    relay.sigterm();
    eventually(
        "the relay to begin shutting down",
        Duration::from_secs(10),
        async || {
            stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("shutting down"))
                .then_some(())
        },
    )
    .await;
    stream.write_all(&body[10..]).await.unwrap();
    let answer = read_response(&mut stream, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "in-flight request was not finished: {answer}"
    );
    let id: EventId = answer
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .parse()
        .unwrap();
    drop(stream);

    let exit = tokio::task::spawn_blocking(move || {
        let status = relay.wait_for_exit(Duration::from_secs(20));
        (status, relay.stderr_text())
    })
    .await
    .unwrap();
    assert!(
        exit.0.success(),
        "exit status {:?}; stderr:\n{}",
        exit.0,
        exit.1
    );
    assert!(exit.1.contains("the log is flushed"), "{}", exit.1);
    let store = open_store(dir.path());
    assert_eq!(store.event(id).unwrap().map(|e| e.body), Some(body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_deliveries_in_flight_still_delivers_every_acknowledged_event() {
    use crate::common::receiver::{Receiver, Reply};
    // Slow answers keep attempts in flight when the kill lands.
    let crm = Receiver::start(|_, _| Reply::ok().after(Duration::from_millis(5))).await;
    // A formatted target too: at least once holds for rendered bodies.
    let slack = Receiver::start(|_, _| Reply::ok().after(Duration::from_millis(5))).await;
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[[targets]]\nname = \"crm\"\nurl = \"{}\"\n\n\
             [[targets]]\nname = \"slack\"\nurl = \"{}\"\nformat = \"slack\"\n",
            crm.url(),
            slack.url()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut acked_ever: HashMap<EventId, Vec<u8>> = HashMap::new();
    let rounds = rounds(3);
    for round in 0..rounds {
        let mut relay = RelayProcess::start(dir.path(), &["--config", config]);
        let stop = Arc::new(AtomicBool::new(false));
        let sending = tokio::spawn(load(relay.url(), round, stop.clone()));
        let admin = relay.admin;
        eventually(
            "deliveries to be under way",
            Duration::from_secs(30),
            async || {
                let delivered = scrape(
                    admin,
                    r#"leadflo_relay_delivery_attempts_total{outcome="success",target="crm"}"#,
                )
                .await;
                (delivered >= 50.0 && crm.in_flight() > 0).then_some(())
            },
        )
        .await;
        relay.kill9();
        stop.store(true, Ordering::Relaxed);
        acked_ever.extend(sending.await.unwrap());
    }
    // A last start with no load: it only drains what is queued. The
    // deadline grows with the backlog; a miss reports what is missing.
    let relay = RelayProcess::start(dir.path(), &["--config", config]);
    let deadline = std::time::Instant::now()
        + Duration::from_secs(60)
        + Duration::from_millis(10) * acked_ever.len() as u32;
    loop {
        let keys = |receiver: &Receiver| -> std::collections::HashSet<String> {
            receiver
                .requests()
                .iter()
                .map(|r| r.header("idempotency-key").to_owned())
                .collect()
        };
        let (at_crm, at_slack) = (keys(&crm), keys(&slack));
        let missing: Vec<&EventId> = acked_ever
            .keys()
            .filter(|id| !at_crm.contains(&id.to_string()) || !at_slack.contains(&id.to_string()))
            .collect();
        if missing.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let backlog =
                scrape(relay.admin, r#"leadflo_relay_backlog_events{target="crm"}"#).await;
            panic!(
                "{} of {} acknowledged events never reached the target (relay backlog {backlog}); first missing: {:?}",
                missing.len(),
                acked_ever.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = crm.requests();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for request in &requests {
        let id: EventId = request.header("idempotency-key").parse().unwrap();
        if let Some(body) = acked_ever.get(&id) {
            assert_eq!(
                &request.body, body,
                "event {id} was delivered with different bytes"
            );
        }
        *seen
            .entry(request.header("idempotency-key").to_owned())
            .or_default() += 1;
    }
    for request in slack.requests() {
        let message: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert!(
            message["text"].as_str().is_some_and(|t| !t.is_empty()),
            "a Slack delivery without text: {message}"
        );
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "{rounds} kill -9 rounds with deliveries in flight: {} acknowledged, all delivered, {} duplicate deliveries",
        acked_ever.len(),
        duplicates
    );
    drop(relay);
}

/// SIGTERM, and the exit (0) within a deadline.
fn stop_cleanly(relay: &mut RelayProcess) {
    relay.sigterm();
    let exit = relay.wait_for_exit(Duration::from_secs(20));
    assert!(exit.success(), "{exit}\n{}", relay.stderr_text());
}

/// A clean stop saves the backlog counts and the next start takes them
/// (a million-event backlog then starts in a fraction of the time a scan
/// takes); a `kill -9`, or any command that opens the stopped relay's data
/// directory, leads to a recount. The figures are right every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_counts_stay_exact_across_clean_stops_kills_and_offline_commands() {
    let down = RefusingPort::new();
    let dir = tempfile::tempdir().unwrap();
    let target = format!("crm=http://{}/hook", down.addr);
    let args = ["--target", target.as_str()];
    let gauge = r#"leadflo_relay_backlog_events{target="crm"}"#;
    let queued = |admin, want: f64| async move {
        eventually(
            &format!("{want} queued"),
            Duration::from_secs(30),
            async || (scrape(admin, gauge).await == want).then_some(()),
        )
        .await
    };
    let source = |relay: &RelayProcess| {
        let text = relay.stderr_text();
        if text.contains("saved at the last clean shutdown") {
            "saved"
        } else if text.contains("counted in the log") {
            "counted"
        } else {
            panic!("no backlog line at start:\n{text}")
        }
    };

    let mut relay = RelayProcess::start(dir.path(), &args);
    assert_eq!(source(&relay), "counted", "a first start has nothing saved");
    ingest_some(&relay.url(), 40).await;
    queued(relay.admin, 40.0).await;
    stop_cleanly(&mut relay);

    let mut relay = RelayProcess::start(dir.path(), &args);
    assert_eq!(source(&relay), "saved");
    assert_eq!(scrape(relay.admin, gauge).await, 40.0);
    ingest_some(&relay.url(), 10).await;
    queued(relay.admin, 50.0).await;
    relay.kill9();

    let mut relay = RelayProcess::start(dir.path(), &args);
    assert_eq!(
        source(&relay),
        "counted",
        "after a kill -9 nothing saved may be trusted"
    );
    assert_eq!(scrape(relay.admin, gauge).await, 50.0);
    stop_cleanly(&mut relay);

    // A command on the stopped relay's data directory opens the log, which
    // deletes the saved counts: the next start counts again.
    let stats = std::process::Command::new(binary())
        .args(["stats", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let relay = RelayProcess::start(dir.path(), &args);
    assert_eq!(source(&relay), "counted");
    assert_eq!(scrape(relay.admin, gauge).await, 50.0);
}

/// Posts `count` leads from 16 senders; returns what was acknowledged.
async fn ingest_some(url: &str, count: usize) -> HashMap<EventId, Vec<u8>> {
    let client = client();
    let mut acked = HashMap::new();
    let mut tasks = Vec::new();
    for sender in 0..16 {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in (sender..count).step_by(16) {
                let event = if n % 4 == 0 {
                    "conversation_ended"
                } else {
                    "visitor_created"
                };
                let body =
                    format!(r#"{{"event":"{event}","n":{n},"name":"Zoë {n}"}}"#).into_bytes();
                let (status, json) = post(&client, &url, Some(SECRET), body.clone()).await;
                assert_eq!(status, 200);
                mine.push((
                    json["id"].as_str().unwrap().parse::<EventId>().unwrap(),
                    body,
                ));
            }
            mine
        }));
    }
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_replay_keeps_the_log_whole_and_delivers_everything() {
    use crate::common::receiver::{Receiver, Reply};
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let target = format!("crm={}", crm.url());
    let dir = tempfile::tempdir().unwrap();
    let mut acked = HashMap::new();
    // Each round ingests and replays hundreds of events: a quarter of the soak.
    let rounds = rounds(12) / 4;
    for round in 0..rounds {
        let mut relay = RelayProcess::start(dir.path(), &["--target", &target]);
        acked.extend(ingest_some(&relay.url(), 800).await);
        let admin = format!("http://{}", relay.admin);
        let mut replay = std::process::Command::new(binary())
            .args([
                "replay",
                "--target",
                "crm",
                "--from",
                "1970-01-01T00:00:00Z",
                "--admin",
                &admin,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill at a point that moves from round to round: before, during or
        // after the replay's writes.
        tokio::time::sleep(Duration::from_millis(5 + 40 * (round as u64 % 4))).await;
        relay.kill9();
        let _ = replay.wait();
        let store = open_store(dir.path());
        for (id, body) in &acked {
            assert_eq!(
                store.event(*id).unwrap().as_ref().map(|e| &e.body),
                Some(body),
                "round {round}: event {id}"
            );
        }
        assert!(
            store.events().all(|e| e.is_ok()),
            "round {round}: a record no longer decodes"
        );
    }
    let _relay = RelayProcess::start(dir.path(), &["--target", &target]);
    eventually(
        "every acknowledged event at the target",
        Duration::from_secs(120),
        async || {
            let got: std::collections::HashSet<String> = crm
                .requests()
                .iter()
                .map(|r| r.header("idempotency-key").to_owned())
                .collect();
            acked
                .keys()
                .all(|id| got.contains(&id.to_string()))
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "{rounds} kill -9 rounds during replays: {} acknowledged events, 0 lost, all delivered",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_pruning_never_loses_an_undelivered_event() {
    use crate::common::receiver::{Receiver, Reply};
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    // Conversations also go to a target that is down: those must survive
    // every pruning pass, killed or not.
    let down = RefusingPort::new();
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nretention = \"1s\"\n\n[[targets]]\nname = \"crm\"\nurl = \"{}\"\n\n\
             [[targets]]\nname = \"archive\"\nurl = \"http://{}/hook\"\nevents = [\"conversation_ended\"]\n",
            crm.url(),
            down.addr
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut kept_for_archive: HashMap<EventId, Vec<u8>> = HashMap::new();
    // Each round ingests and waits for pruning: a quarter of the soak.
    let rounds = rounds(12) / 4;
    for round in 0..rounds {
        let mut relay = RelayProcess::start(dir.path(), &["--config", &config]);
        let acked = ingest_some(&relay.url(), 1200).await;
        for (id, body) in &acked {
            if std::str::from_utf8(body)
                .unwrap()
                .contains("conversation_ended")
            {
                kept_for_archive.insert(*id, body.clone());
            }
        }
        let admin = relay.admin;
        // Kill once pruning has started deleting.
        eventually("pruning to start", Duration::from_secs(30), async || {
            (scrape(admin, "leadflo_relay_pruned_events_total").await > (round as f64 * 10.0))
                .then_some(())
        })
        .await;
        relay.kill9();
        let store = open_store(dir.path());
        assert!(
            store.events().all(|e| e.is_ok()),
            "round {round}: a record no longer decodes"
        );
        for (id, body) in &kept_for_archive {
            assert_eq!(
                store.event(*id).unwrap().as_ref().map(|e| &e.body),
                Some(body),
                "round {round}: event {id}, still owed to the archive target, was pruned"
            );
        }
    }
    eprintln!(
        "{rounds} kill -9 rounds during pruning: {} undelivered events kept, 0 lost",
        kept_for_archive.len()
    );
}
