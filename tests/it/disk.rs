//! Disk exhaustion on a really small filesystem: a tmpfs mounted by the test
//! (root only; elsewhere the suite says it is skipped, and the `max_bytes`
//! path is covered in tests/observability.rs). `.ci/run` runs as root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::mount::SmallFs;
use crate::common::*;
use leadflo_relay::store::EventId;

fn config_file(dir: &Path, data: &Path, min_free_bytes: u64) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\ndata_dir = {:?}\nmin_free_bytes = {min_free_bytes}\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    path
}

/// The relay on a data directory in `work`, checkpointing every
/// `checkpoint_interval`, with fault point `fault` armed (see
/// `leadflo_relay::crashpoint::FAIL_ENV`); also returns the data directory
/// and the config file, for a restart without the fault.
fn start_failing(
    work: &Path,
    checkpoint_interval: &str,
    fault: &str,
) -> (RelayProcess, PathBuf, PathBuf) {
    let data = work.join("data");
    let config = work.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ncheckpoint_interval = \"{checkpoint_interval}\"\n\
             min_free_bytes = 0\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let relay = RelayProcess::start_with_env(
        &data,
        &["--config", config.to_str().unwrap()],
        &[
            ("LEADFLO_WEBHOOK_SECRET", SECRET),
            (leadflo_relay::crashpoint::FAIL_ENV, fault),
        ],
    );
    (relay, data, config)
}

fn padded_lead(pad: usize) -> Vec<u8> {
    format!(
        r#"{{"event":"visitor_created","pad":"{}"}}"#,
        "x".repeat(pad)
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_floor_ingest_refuses_and_resumes_when_space_returns() {
    let Some(fs) = SmallFs::mount("16m") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let data = fs.path.join("data");
    let config = config_file(work.path(), &data, 4 << 20);
    let relay = RelayProcess::start(&data, &["--config", config.to_str().unwrap()]);
    let client = client();
    let (status, json) = post(&client, &relay.url(), Some(SECRET), padded_lead(100)).await;
    assert_eq!(status, 200, "{json}");
    let first: EventId = json["id"].as_str().unwrap().parse().unwrap();

    // Something else fills the filesystem to below the 4 MiB floor.
    let filler = fs.path.join("filler");
    let free = leadflo_relay::disk::available_space(&fs.path).unwrap();
    std::fs::write(&filler, vec![0u8; (free - (1 << 20)) as usize]).unwrap();
    let admin = relay.admin;
    eventually("/readyz to fail", Duration::from_secs(10), async || {
        let ready = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .ok()?;
        (ready.status() == 503).then_some(())
    })
    .await;
    let (status, json) = post(&client, &relay.url(), Some(SECRET), padded_lead(100)).await;
    assert_eq!(status, 503, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("low on disk space"),
        "{json}"
    );
    assert!(
        relay.stderr_text().contains("disk space below the floor"),
        "{}",
        relay.stderr_text()
    );

    // Space returns: ingest resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let url = relay.url();
    eventually("ingest to resume", Duration::from_secs(10), async || {
        let (status, _) = post(&client, &url, Some(SECRET), padded_lead(100)).await;
        (status == 200).then_some(())
    })
    .await;
    drop(relay);
    let store = open_store(&data);
    assert_eq!(
        store.event(first).unwrap().map(|e| e.body),
        Some(padded_lead(100))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failing_with_enospc_gets_503_and_loses_nothing_acknowledged() {
    let Some(fs) = SmallFs::mount("6m") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let data = fs.path.join("data");
    // No floor: the filesystem really runs out in the middle of commits.
    let config = config_file(work.path(), &data, 0);
    let mut relay = RelayProcess::start(&data, &["--config", config.to_str().unwrap()]);
    let client = client();
    let mut acked = Vec::new();
    let mut refused = 0;
    for n in 0..400 {
        let body = padded_lead(40_000 + n);
        let (status, json) = post(&client, &relay.url(), Some(SECRET), body.clone()).await;
        match status {
            200 => acked.push((
                json["id"].as_str().unwrap().parse::<EventId>().unwrap(),
                body,
            )),
            503 => {
                let error = json["error"].as_str().unwrap();
                assert!(
                    error.contains("not stored") || error.contains("may still be stored"),
                    "{json}"
                );
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {json}"),
        }
    }
    assert!(
        !acked.is_empty() && refused >= 5,
        "{} accepted, {refused} refused",
        acked.len()
    );

    // Space returns. Where only the write-ahead log hit ENOSPC, the relay
    // recovers in place. Where sled did, sled stays failed (later writes
    // fail or never return): the relay notices and exits non-zero for its
    // supervisor to restart it. Either way it must not stay stuck.
    fs.resize("64m");
    let url = relay.url();
    let start = std::time::Instant::now();
    let recovered_in_place = loop {
        let body = padded_lead(10);
        let answer = client
            .post(&url)
            .header("x-webhook-secret", SECRET)
            .body(body.clone())
            .send()
            .await;
        if let Ok(response) = answer {
            if response.status() == 200 {
                let json: serde_json::Value = response.json().await.unwrap();
                acked.push((json["id"].as_str().unwrap().parse().unwrap(), body));
                break true;
            }
        }
        if let Some(exit) = relay.child.try_wait().unwrap() {
            assert!(!exit.success(), "a stuck log must not exit 0");
            assert!(
                relay.stderr_text().contains("keeps failing to write"),
                "{}",
                relay.stderr_text()
            );
            break false;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let metrics = metrics_text(relay.admin).await;
            let commits: Vec<&str> = metrics
                .lines()
                .filter(|line| line.starts_with("leadflo_relay_c"))
                .collect();
            panic!(
                "the relay neither recovered nor stopped itself within 60s\n\
                 stderr:\n{}\ncommit metrics:\n{}",
                relay.stderr_text(),
                commits.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "after ENOSPC: {}",
        if recovered_in_place {
            "recovered in place"
        } else {
            "stopped itself; restarted"
        }
    );
    if !recovered_in_place {
        relay = RelayProcess::start(&data, &["--config", config.to_str().unwrap()]);
    }
    let (status, json) = post(&client, &relay.url(), Some(SECRET), padded_lead(11)).await;
    assert_eq!(status, 200, "{json}");
    // Killed: what it acknowledged must come back from its logs.
    relay.kill9();
    drop(relay);
    let store = open_store(&data);
    for (id, body) in &acked {
        assert_eq!(
            store.event(*id).unwrap().as_ref().map(|e| &e.body),
            Some(body),
            "event {id}"
        );
    }
}

/// A checkpoint's `fdatasync` fails once, as a failing disk's would. Linux
/// reports such an error once: a later `fsync` of the file succeeds though
/// the data it covered may never reach the disk. So no later checkpoint may
/// retire the write-ahead log: the relay keeps it, stops itself, and the
/// restart writes the events again. It used to take the next checkpoint's
/// success at its word and delete the only durable copy.
#[tokio::test]
async fn a_failed_fsync_keeps_the_write_ahead_log_until_a_restart_replays_it() {
    let work = tempfile::tempdir().unwrap();
    let (mut relay, data, config) = start_failing(work.path(), "100ms", "checkpoint.sync:1");
    let config = config.to_str().unwrap();
    // Events keep coming (checkpoints follow commits); every checkpoint
    // fails from the first on, and after 10 s of that the relay stops
    // itself (a supervisor would start it again).
    let client = client();
    let mut acked = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay kept running on checkpoints that cannot be trusted"
        );
        let sent = client
            .post(relay.url())
            .header("x-webhook-secret", SECRET)
            .body(padded_lead(acked.len()))
            .send()
            .await;
        if let Ok(answer) = sent {
            if answer.status() == 200 {
                let json: serde_json::Value = answer.json().await.unwrap();
                acked.push(json["id"].as_str().unwrap().parse::<EventId>().unwrap());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status}");
    let said = relay.stderr_text();
    assert!(
        said.contains("injected by LEADFLO_RELAY_FAIL_AT")
            && said.contains("stopping so the relay can be restarted"),
        "{said}"
    );
    // The restart writes every event since the last good checkpoint again.
    let relay = RelayProcess::start(&data, &["--config", config]);
    let said = relay.stderr_text();
    let replayed = said
        .lines()
        .find(|line| line.contains("recovered acknowledged events from the write-ahead log"))
        .unwrap_or_else(|| panic!("nothing replayed: {said}"));
    assert!(
        replayed.contains(&format!("replayed={}", acked.len())),
        "{} acknowledged: {replayed}",
        acked.len()
    );
    relay.sigterm();
    let mut relay = relay;
    relay.wait_for_exit(Duration::from_secs(30));
    let store = open_store(&data);
    for id in acked {
        assert!(store.event(id).unwrap().is_some(), "event {id} lost");
    }
}

/// A commit's write fails halfway and so does cutting the half frame off
/// (a failing disk). The next commit must not land behind that half frame:
/// replay stops at the first broken frame, so an acknowledged event there
/// would be read back by nobody. It used to be appended there all the same.
#[tokio::test]
async fn a_half_written_frame_is_cut_off_before_the_next_commit() {
    use leadflo_relay::store::wal;
    let work = tempfile::tempdir().unwrap();
    let (mut relay, data, _) = start_failing(work.path(), "1h", "commit.write:2");
    let client = client();
    let mut answers = Vec::new();
    for n in 0..3 {
        answers.push(post(&client, &relay.url(), Some(SECRET), padded_lead(n)).await);
    }
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [200, 503, 200], "{answers:?}");
    let id = |n: usize| answers[n].1["id"].as_str().unwrap().parse::<u64>().unwrap();
    relay.kill9();
    let mut logged = Vec::new();
    for seq in wal::segments(&data).unwrap() {
        let bytes = std::fs::read(wal::segment_path(&data, seq)).unwrap();
        logged.extend(wal::read_frames(&bytes).0.into_iter().map(|e| e.id));
    }
    assert_eq!(
        logged,
        [id(0), id(2)],
        "the acknowledged events in the write-ahead log"
    );
}

/// After a failed checkpoint fsync, commits still reach disk (each one is
/// appended to the write-ahead log and fdatasynced) and ingest answers 200
/// until the relay restarts itself. `/readyz` must say the same: it used to
/// answer 503 "the log cannot commit to disk; ingest answers 503", which
/// takes the only relay out of a load balancer while it accepts leads.
#[tokio::test]
async fn readyz_agrees_with_ingest_after_a_failed_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let (relay, _, _) = start_failing(work.path(), "100ms", "checkpoint.sync:1");
    let client = client();
    eventually("a failed checkpoint", Duration::from_secs(10), async || {
        post(&client, &relay.url(), Some(SECRET), padded_lead(1)).await;
        relay
            .stderr_text()
            .contains("log checkpoint failed")
            .then_some(())
    })
    .await;
    let (status, json) = post(&client, &relay.url(), Some(SECRET), padded_lead(2)).await;
    let ready = client
        .get(format!("http://{}/readyz", relay.admin))
        .send()
        .await
        .unwrap();
    let ready_status = ready.status().as_u16();
    let ready_body = ready.text().await.unwrap();
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        ready_status, 200,
        "ingest answers 200 but /readyz says: {ready_body}"
    );
}
