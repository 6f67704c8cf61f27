//! The crash matrix at exact points: the real binary kills itself with
//! SIGKILL at a named crash point (`src/crashpoint.rs`, armed through
//! `LEADFLO_RELAY_CRASH_AT`) round after round on one data directory. After
//! every kill the log must hold every acknowledged event byte for byte and
//! every record must decode; at the end every target must have received
//! every acknowledged event. Duplicates are counted and printed.
//!
//! A few rounds per point in `cargo test`; `.ci/run` sets
//! `LEADFLO_CRASH_ROUNDS=100`.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::receiver::{Receiver, Reply};
use crate::common::*;
use leadflo_relay::crashpoint;
use leadflo_relay::store::EventId;

fn rounds() -> usize {
    std::env::var("LEADFLO_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// What drives the relay to its crash point in a round.
#[derive(Clone, Copy, PartialEq)]
enum Traffic {
    /// Senders post leads until the relay dies.
    Stream,
    /// Ingest a few hundred leads, then run `replay` over the whole history.
    Replay,
}

struct Matrix {
    point: &'static str,
    traffic: Traffic,
    crm: Receiver,
    /// Conversations also go here; it is down, so they are never delivered
    /// and must survive every pruning pass.
    archive: RefusingPort,
    config: std::path::PathBuf,
    _work: tempfile::TempDir,
    dir: tempfile::TempDir,
    acked: HashMap<EventId, Vec<u8>>,
    /// When each round began (RFC 3339), for replay windows.
    round_starts: Vec<String>,
    /// Retention is short enough for delivered events to be pruned.
    pruning: bool,
}

impl Matrix {
    /// `first_attempt_fails`: the target answers 503 to every first attempt
    /// (so each delivery is rescheduled once), 200 after.
    async fn new(
        point: &'static str,
        traffic: Traffic,
        retention: &str,
        first_attempt_fails: bool,
    ) -> Matrix {
        let crm = Receiver::start(move |_, received| {
            if first_attempt_fails && received.header("x-relay-attempt") == "1" {
                Reply::status(503)
            } else {
                Reply::ok()
            }
        })
        .await;
        let archive = RefusingPort::new();
        // Kills around a commit come before any checkpoint, so what was
        // acknowledged is only in the write-ahead log (and sled's memory):
        // the restart must replay it. Kills in a checkpoint need many.
        let checkpoints = match point {
            crashpoint::COMMIT_TORN
            | crashpoint::COMMIT_LOGGED
            | crashpoint::COMMIT_ACKNOWLEDGED => "1h",
            crashpoint::CHECKPOINT_FLUSHED => "20ms",
            _ => "1s",
        };
        let work = tempfile::tempdir().unwrap();
        let config = work.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[storage]\nretention = \"{retention}\"\ncheckpoint_interval = \"{checkpoints}\"\n\n\
                 [[targets]]\nname = \"crm\"\nurl = \"{}\"\ncircuit_failures = 1000000\n\n\
                 [targets.retry]\ninitial = \"20ms\"\nmax_interval = \"200ms\"\n\n\
                 [[targets]]\nname = \"archive\"\nurl = \"http://{}/hook\"\n\
                 events = [\"conversation_ended\"]\n",
                crm.url(),
                archive.addr
            ),
        )
        .unwrap();
        Matrix {
            point,
            traffic,
            crm,
            archive,
            config,
            _work: work,
            dir: tempfile::tempdir().unwrap(),
            acked: HashMap::new(),
            round_starts: Vec::new(),
            pruning: retention != "7d",
        }
    }

    fn start(&self, crash_at: Option<String>) -> RelayProcess {
        let mut env = vec![("LEADFLO_WEBHOOK_SECRET", SECRET.to_owned())];
        if let Some(crash_at) = crash_at {
            env.push((crashpoint::ENV, crash_at));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        RelayProcess::start_with_env(
            self.dir.path(),
            &["--config", self.config.to_str().unwrap()],
            &env,
        )
    }

    /// One round: start armed, drive traffic until the relay kills itself,
    /// then check the log.
    async fn round(&mut self, round: usize) {
        // The hit moves from round to round: the first, second, … time the
        // point is reached. A replay covers the last five rounds' leads,
        // 300 each: up to two chunks of 1,000 to crash between.
        let hit = match self.traffic {
            // Pruning passes come every 100 ms: a few, not a hundred.
            Traffic::Stream if self.pruning => 1 + round % 3,
            // Checkpoints come every 20 ms here.
            Traffic::Stream if self.point == crashpoint::CHECKPOINT_FLUSHED => 1 + (round * 7) % 20,
            Traffic::Stream => 1 + (round * 37) % 100,
            Traffic::Replay => 1 + round % ((round.min(4) + 1) * 300).div_ceil(1000),
        };
        let mut relay = self.start(Some(format!("{}:{hit}", self.point)));
        match self.traffic {
            Traffic::Stream => {
                let acked = stream_until_dead(&relay.url(), round).await;
                self.acked.extend(acked);
            }
            Traffic::Replay => {
                self.round_starts.push(rfc3339_now());
                self.acked.extend(ingest(&relay.url(), round, 300).await);
                let from = &self.round_starts[round.saturating_sub(4)];
                let replay = std::process::Command::new(binary())
                    .args(["replay", "--target", "crm", "--from", from])
                    .args(["--admin", &format!("http://{}", relay.admin)])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap();
                // The relay dies under the replay's request: no success.
                assert!(!replay.success(), "round {round}: the replay finished");
            }
        }
        let started = Instant::now();
        let status = loop {
            if let Some(status) = relay.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {round}: the relay never reached {} (hit {hit})",
                self.point
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Wait for the stderr reader to see the last lines.
        let said = eventually("the crash message", Duration::from_secs(10), async || {
            relay
                .stderr_text()
                .contains(&format!("crash point {} reached", self.point))
                .then_some(())
        });
        said.await;
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: the relay did not die by SIGKILL: {status}"
        );
        self.check_log(round);
    }

    /// Every acknowledged event with identical bytes; every record decodes;
    /// conversations still owed to the archive target are all there.
    fn check_log(&self, round: usize) {
        let store = open_store(self.dir.path());
        // With a short retention, an event every target has taken may be
        // pruned: it is the only kind allowed to be gone.
        let delivered: HashSet<String> = if self.pruning {
            self.crm
                .requests()
                .iter()
                .map(|r| r.header("idempotency-key").to_owned())
                .collect()
        } else {
            HashSet::new()
        };
        for (id, body) in &self.acked {
            let stored = store.event(*id).unwrap();
            if stored.is_none() && !is_conversation(body) && delivered.contains(&id.to_string()) {
                continue;
            }
            assert_eq!(
                stored.as_ref().map(|e| &e.body),
                Some(body),
                "{} round {round}: acknowledged event {id} lost or changed",
                self.point
            );
        }
        assert!(
            store.events().all(|e| e.is_ok()),
            "{} round {round}: a record no longer decodes",
            self.point
        );
        for (id, _) in self.acked.iter().filter(|(_, b)| is_conversation(b)) {
            assert!(
                store.is_queued("archive", *id).unwrap(),
                "{} round {round}: event {id} is no longer queued for the archive target",
                self.point
            );
        }
    }

    /// Restart unarmed; the CRM must get every acknowledged event. Prints
    /// the figures for docs/guarantees.md.
    async fn finish(self, rounds: usize) {
        let _relay = self.start(None);
        eventually(
            "every acknowledged event at the target",
            Duration::from_secs(120),
            async || {
                let got: HashSet<String> = self
                    .crm
                    .requests()
                    .iter()
                    .map(|r| r.header("idempotency-key").to_owned())
                    .collect();
                self.acked
                    .keys()
                    .all(|id| got.contains(&id.to_string()))
                    .then_some(())
            },
        )
        .await;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for request in self.crm.requests() {
            if request.header("x-relay-attempt") != "1" || !matches!(self.traffic, Traffic::Stream)
            {
                // Retries after a 503 and replays are sends on purpose.
                continue;
            }
            *seen
                .entry(request.header("idempotency-key").to_owned())
                .or_default() += 1;
        }
        let duplicates: usize = seen.values().map(|n| n - 1).sum();
        assert!(
            !self
                .crm
                .requests()
                .iter()
                .any(|r| r.body == FORGED.as_bytes()),
            "{}: an unauthenticated lead was delivered",
            self.point
        );
        eprintln!(
            "crash point {}: {rounds} rounds, {rounds} kills, {} acknowledged events, 0 lost, \
             all delivered; {duplicates} duplicate first attempts{}",
            self.point,
            self.acked.len(),
            if self.traffic == Traffic::Replay {
                " (replays resend on purpose)"
            } else {
                ""
            }
        );
        drop(self.archive);
    }
}

/// Sent with a wrong secret during every streaming round.
const FORGED: &str = r#"{"event":"visitor_created","visitor":{"id":"forged"}}"#;

fn is_conversation(body: &[u8]) -> bool {
    std::str::from_utf8(body)
        .unwrap()
        .contains("conversation_ended")
}

fn lead(round: usize, sender: usize, n: usize) -> Vec<u8> {
    let event = if n % 4 == 0 {
        "conversation_ended"
    } else {
        "visitor_created"
    };
    format!(r#"{{"event":"{event}","visitor":{{"id":"r{round}s{sender}n{n}","name":"Zoë {n}"}}}}"#)
        .into_bytes()
}

/// Four senders post leads until the relay stops answering.
async fn stream_until_dead(url: &str, round: usize) -> Vec<(EventId, Vec<u8>)> {
    leadflo_relay::deliver::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let dead = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for sender in 0..4 {
        let (client, url, dead) = (client.clone(), url.to_owned(), dead.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                if dead.load(Ordering::Relaxed) {
                    break;
                }
                if n % 10 == 0 {
                    // A forged lead (wrong secret) among the real ones: it
                    // must never be stored, so never delivered.
                    let _ = client
                        .post(&url)
                        .header("x-webhook-secret", "not-the-secret")
                        .body(FORGED)
                        .send()
                        .await;
                }
                let body = lead(round, sender, n);
                let answer = client
                    .post(&url)
                    .header("x-webhook-secret", SECRET)
                    .body(body.clone())
                    .send()
                    .await;
                let Ok(response) = answer else { break };
                if response.status() != 200 {
                    break;
                }
                let Ok(json) = response.json::<serde_json::Value>().await else {
                    break;
                };
                acked.push((json["id"].as_str().unwrap().parse().unwrap(), body));
                // A trickle, not a flood: deliveries and pruning get turns.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            dead.store(true, Ordering::Relaxed);
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked
}

/// Posts `count` leads; every one must be acknowledged.
async fn ingest(url: &str, round: usize, count: usize) -> Vec<(EventId, Vec<u8>)> {
    let client = client();
    let mut acked = Vec::new();
    for n in 0..count {
        let body = lead(round, 0, n);
        let (status, json) = post(&client, url, Some(SECRET), body.clone()).await;
        assert_eq!(status, 200, "{json}");
        acked.push((json["id"].as_str().unwrap().parse().unwrap(), body));
    }
    acked
}

async fn run(point: &'static str, traffic: Traffic, retention: &str, first_attempt_fails: bool) {
    let mut matrix = Matrix::new(point, traffic, retention, first_attempt_fails).await;
    let rounds = rounds();
    for round in 0..rounds {
        matrix.round(round).await;
    }
    matrix.finish(rounds).await;
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_half_a_commit_in_the_write_ahead_log() {
    run(crashpoint::COMMIT_TORN, Traffic::Stream, "7d", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_write_ahead_log_is_synced_before_any_200() {
    run(crashpoint::COMMIT_LOGGED, Traffic::Stream, "7d", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_200s_before_sled_has_the_commit() {
    run(
        crashpoint::COMMIT_ACKNOWLEDGED,
        Traffic::Stream,
        "7d",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_part_of_a_commit_applied_to_sled() {
    run(crashpoint::APPLY_PARTIAL, Traffic::Stream, "7d", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_a_checkpoint_after_the_flush_before_the_fdatasync() {
    run(crashpoint::CHECKPOINT_FLUSHED, Traffic::Stream, "7d", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_target_answered_before_the_log_knows() {
    run(crashpoint::DELIVERY_ANSWERED, Traffic::Stream, "7d", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_halfway_through_recording_a_delivery() {
    run(
        crashpoint::DELIVERY_HALF_RECORDED,
        Traffic::Stream,
        "7d",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_halfway_through_rescheduling_a_failed_attempt() {
    run(
        crashpoint::RESCHEDULE_HALF_RECORDED,
        Traffic::Stream,
        "7d",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_two_chunks_of_a_replay() {
    run(crashpoint::REPLAY_CHUNK, Traffic::Replay, "7d", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_two_batches_of_pruning() {
    run(crashpoint::PRUNE_BATCH, Traffic::Stream, "50ms", false).await;
}
