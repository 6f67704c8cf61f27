//! The operator commands, run as the real binary, against a running relay
//! (online, through the admin API) and against its data directory when it
//! is stopped (offline): replay, events, dead letters, stats, send-test,
//! the admin token, and retention.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::cli::*;
use crate::common::load::lead;
use crate::common::receiver::{Receiver, Reply, wait_for_requests};
use crate::common::*;
use leadflo_relay::config::TargetConfig;
use leadflo_relay::ops;
use leadflo_relay::store::EventId;

fn target(name: &str, url: &str, events: Option<&[&str]>) -> TargetConfig {
    let mut target = TargetConfig::new(name, url);
    target.events = events.map(|e| e.iter().map(|s| s.to_string()).collect());
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "300ms".parse().unwrap();
    target
}

/// Writes a config file naming `data_dir` and the targets, for offline use.
fn write_config(
    dir: &Path,
    data_dir: &Path,
    admin: &str,
    targets: &[TargetConfig],
) -> std::path::PathBuf {
    let mut config = leadflo_relay::config::Config::default();
    config.storage.data_dir = data_dir.to_owned();
    config.server.admin_listen = admin.parse().unwrap();
    config.targets = targets.to_vec();
    let path = dir.join("relay.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    path
}

/// Runs the CLI, which must exit 1 with `needle` in its error.
async fn fails_saying(parts: &[&str], needle: &str) {
    let output = cli(args(parts)).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "stdout: {}", stdout(&output));
    assert!(stderr.contains(needle), "{stderr}");
}

/// `replay --target crm --from FROM --to TO --dry-run --json`, online.
async fn dry_run_window(admin: &str, from: &str, to: &str) -> serde_json::Value {
    json(
        cli(args(&[
            "replay",
            "--target",
            "crm",
            "--from",
            from,
            "--to",
            to,
            "--dry-run",
            "--json",
            "--admin",
            admin,
        ]))
        .await,
    )
}

/// The entry for target `name` in the JSON of `stats --json`.
fn target_stats<'a>(stats: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    stats["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
}

/// A target crm that accepts everything, and a relay delivering every
/// event to it, with `adjust` applied to crm's settings.
async fn relay_with_healthy_crm(adjust: impl FnOnce(&mut TargetConfig)) -> (Receiver, TestRelay) {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let mut settings = target("crm", &crm.url(), None);
    adjust(&mut settings);
    let relay = TestRelay::start_with(|c| c.targets = vec![settings]).await;
    (crm, relay)
}

/// `forget-target crm --yes --json`, reaching the relay or its data as
/// `access` says (`--admin URL`, `--config FILE`).
async fn forget_crm(access: &[&str]) -> serde_json::Value {
    let mut all = args(&["forget-target", "crm", "--yes", "--json"]);
    all.extend(args(access));
    json(cli(all).await)
}

/// The ids of `target`'s dead letters.
fn dead_letter_ids(relay: &TestRelay, target: &str) -> Vec<EventId> {
    let dead = relay.store.dead_letters(target).unwrap();
    dead.into_iter().map(|d| d.id).collect()
}

/// A relay whose one target, slack, takes only `visitor_created`, after a
/// lead and a `conversation_ended` were sent to it and the lead delivered.
/// Returns slack, the relay, and the two events' ids.
async fn slack_after_a_lead_and_a_chat() -> (Receiver, TestRelay, EventId, EventId) {
    let slack = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("slack", &slack.url(), Some(&["visitor_created"]))]
    })
    .await;
    let lead_id = send(&relay, fixture("visitor_created.json")).await;
    let ended_id = send(&relay, fixture("conversation_ended.json")).await;
    wait_for_requests(&slack, 1, "deliveries").await;
    (slack, relay, lead_id, ended_id)
}

/// A relay with a target crm that answers every delivery with `reply` (a
/// rejection), after three leads became dead letters there. Returns crm,
/// the relay and the leads' ids.
async fn three_dead_letters_at_crm(reply: Reply) -> (Receiver, TestRelay, Vec<EventId>) {
    let crm = Receiver::start(move |_, _| reply.clone()).await;
    let relay = TestRelay::start_with(|c| c.targets = vec![target("crm", &crm.url(), None)]).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(send(&relay, lead(n)).await);
    }
    wait_for_dead_letters(&relay.store, "crm", 3).await;
    (crm, relay, ids)
}

/// Every command, online then offline, as text and as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_online_and_offline_as_text_and_json() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let strict = Receiver::start(|_, _| Reply::status(400).body("no")).await;
    let targets = vec![
        target("crm", &crm.url(), None),
        target("strict", &strict.url(), Some(&["visitor_created"])),
    ];
    let relay = TestRelay::start_with(|c| c.targets = targets.clone()).await;
    let lead_id = send(&relay, fixture("visitor_created.json")).await;
    send(&relay, fixture("conversation_ended.json")).await;
    post(&client(), &relay.url(), Some(SECRET), b"not json".to_vec()).await;
    eventually("deliveries and a dead letter", WAIT, async || {
        (crm.count() == 2 && relay.store.dead_letters("strict").unwrap().len() == 1).then_some(())
    })
    .await;

    let work = tempfile::tempdir().unwrap();
    let admin = format!("http://{}", relay.admin);
    let online = ["--admin", admin.as_str()];
    let lead = lead_id.to_string();

    check_commands("online", &online, &lead, &fixture("visitor_created.json")).await;

    // Offline: the relay is stopped; the CLI opens the data directory.
    let dir = relay.stop().await;
    let config = write_config(work.path(), dir.path(), "127.0.0.1:1", &targets);
    let offline = ["--config", config.to_str().unwrap()];
    check_commands("offline", &offline, &lead, &fixture("visitor_created.json")).await;
    // --data-dir alone also works (targets then come from the log itself).
    let stats = json(
        cli(args(&[
            "stats",
            "--json",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ]))
        .await,
    );
    assert_eq!(stats["online"], false);

    // Offline changes take effect at the next start: a replay to crm and a
    // retry of strict's dead letter.
    let with_config = |parts: &[&str]| {
        let mut all = args(parts);
        all.extend(["--config".to_owned(), config.to_str().unwrap().to_owned()]);
        all
    };
    let report = json(
        cli(with_config(&[
            "replay", "--target", "crm", "--ids", &lead, "--json",
        ]))
        .await,
    );
    assert_eq!(report["enqueued"], 1, "{report}");
    let text = ok(cli(with_config(&[
        "dlq", "retry", "--target", "strict", "--all",
    ]))
    .await);
    assert!(text.contains("1 of 1"), "{text}");
    let stats = json(cli(with_config(&["stats", "--json"])).await);
    let strict_stats = target_stats(&stats, "strict").unwrap();
    assert_eq!(
        (
            strict_stats["backlog"].as_u64(),
            strict_stats["dead_letters"].as_u64()
        ),
        (Some(1), Some(0)),
        "{stats}"
    );
    let relay = TestRelay::start_in(dir, |c| c.targets = targets.clone()).await;
    eventually("the offline replay to be delivered", WAIT, async || {
        (crm.count() == 3).then_some(())
    })
    .await;
    assert_eq!(crm.requests()[2].header("idempotency-key"), lead);
    eventually("the offline retry to be attempted", WAIT, async || {
        (strict.count() == 2).then_some(())
    })
    .await;
    relay.stop().await;
}

async fn check_commands(mode: &str, access: &[&str], lead: &str, lead_body: &[u8]) {
    let with = |parts: &[&str]| -> Vec<String> {
        let mut all = args(parts);
        all.extend(access.iter().map(|s| s.to_string()));
        all
    };
    // stats
    let text = ok(cli(with(&["stats"])).await);
    assert!(
        text.contains("TARGET") && text.contains("strict"),
        "{mode} stats:\n{text}"
    );
    let stats = json(cli(with(&["stats", "--json"])).await);
    assert_eq!(stats["online"], mode == "online", "{mode}: {stats}");
    let strict = target_stats(&stats, "strict").unwrap();
    assert_eq!(strict["dead_letters"], 1, "{mode}: {stats}");
    assert_eq!(strict["backlog"], 0, "{mode}: {stats}");
    if mode == "online" {
        assert_eq!(strict["circuit"], "closed");
        let crm = target_stats(&stats, "crm").unwrap();
        assert!(crm["last_success_at"].is_string(), "{stats}");
    }

    // events list
    let text = ok(cli(with(&["events", "list"])).await);
    assert!(
        text.contains(lead) && text.contains("conversation_ended"),
        "{mode} events list:\n{text}"
    );
    let listed = json(
        cli(with(&[
            "events",
            "list",
            "--json",
            "--event",
            "visitor_created",
        ]))
        .await,
    );
    assert_eq!(listed.as_array().unwrap().len(), 1, "{mode}: {listed}");
    assert_eq!(listed[0]["id"], lead);
    let quarantined = json(cli(with(&["events", "list", "--quarantined", "--json"])).await);
    assert!(
        quarantined[0]["event"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{quarantined}"
    );

    // events show
    let text = ok(cli(with(&["events", "show", lead])).await);
    assert!(
        text.contains("target crm: delivered"),
        "{mode} events show:\n{text}"
    );
    assert!(
        text.contains("target strict: dead letter"),
        "{mode} events show:\n{text}"
    );
    let detail = json(cli(with(&["events", "show", lead, "--json"])).await);
    assert_eq!(detail["deliveries"]["crm"]["status"], "delivered");
    let raw = cli(with(&["events", "show", lead, "--raw"])).await;
    assert!(raw.status.success());
    assert_eq!(
        raw.stdout, lead_body,
        "{mode}: --raw must print the exact stored bytes"
    );

    // dlq list
    let text = ok(cli(with(&["dlq", "list"])).await);
    assert!(
        text.contains("strict") && text.contains("HTTP 400"),
        "{mode} dlq list:\n{text}"
    );
    let dead = json(cli(with(&["dlq", "list", "--json", "--target", "strict"])).await);
    assert_eq!(dead[0]["id"], lead);
    assert_eq!(dead[0]["last_status"], 400);

    // replay --dry-run changes nothing
    let dry_run = ["replay", "--target", "crm", "--ids", lead, "--dry-run"];
    let text = ok(cli(with(&dry_run)).await);
    assert!(
        text.contains("dry run: 1 events match"),
        "{mode} replay:\n{text}"
    );
    let report = json(cli(with(&[&dry_run[..], &["--json"]].concat())).await);
    assert_eq!(
        (report["matched"].as_u64(), report["enqueued"].as_u64()),
        (Some(1), Some(0))
    );
}

#[tokio::test]
async fn wrong_flags_exit_2_with_a_clear_message() {
    let cases: [(&[&str], &str); 5] = [
        (&["replay", "--from", "2025-01-01T00:00:00Z"], "--target"),
        (
            &["replay", "--target", "crm", "--from", "yesterday"],
            "RFC 3339",
        ),
        (&["dlq", "retry", "--target", "crm"], "--ids"),
        (
            &["dlq", "purge", "--ids", "1", "--all"],
            "cannot be used with",
        ),
        (&["events", "show", "not-an-id"], "not-an-id"),
    ];
    for (parts, want) in cases {
        let output = cli(args(parts)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{parts:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{parts:?} should mention {want}: {stderr}"
        );
    }
    // A replay with no bound at all is refused by the relay's own rule.
    let dir = tempfile::tempdir().unwrap();
    let output = cli(args(&[
        "replay",
        "--target",
        "crm",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]))
    .await;
    assert_eq!(output.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_time_range_resends_exactly_those_events_with_their_keys() {
    let (crm, relay) = relay_with_healthy_crm(|_| {}).await;
    for n in 0..5 {
        send(&relay, lead(n)).await;
    }
    wait_for_requests(&crm, 5, "deliveries").await;
    // The clock moves between the batches (ids are microsecond times).
    let from = ops::rfc3339(leadflo_relay::clock::now_ms() + 5);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut second = Vec::new();
    for n in 5..10 {
        second.push(send(&relay, lead(n)).await);
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let to = ops::rfc3339(leadflo_relay::clock::now_ms());
    // Later events must fall in a later millisecond than `to`.
    tokio::time::sleep(Duration::from_millis(5)).await;
    for n in 10..13 {
        send(&relay, lead(n)).await;
    }
    wait_for_requests(&crm, 13, "deliveries").await;

    let admin = format!("http://{}", relay.admin);
    let dry = dry_run_window(&admin, &from, &to).await;
    assert_eq!(dry["matched"], 5, "{dry}");
    assert_eq!(
        relay.store.queued_count("crm"),
        0,
        "--dry-run queued something"
    );

    let report = json(
        cli(args(&[
            "replay", "--target", "crm", "--from", &from, "--to", &to, "--json", "--admin", &admin,
        ]))
        .await,
    );
    assert_eq!(
        (report["matched"].as_u64(), report["enqueued"].as_u64()),
        (Some(5), Some(5)),
        "{report}"
    );
    wait_for_requests(&crm, 18, "deliveries").await;
    let resent: Vec<_> = crm.requests()[13..].to_vec();
    let keys: HashSet<String> = resent
        .iter()
        .map(|r| r.header("idempotency-key").to_owned())
        .collect();
    let want: HashSet<String> = second.iter().map(|id| id.to_string()).collect();
    assert_eq!(keys, want, "replay resent other events than the range's");
    for request in &resent {
        assert_eq!(
            request.header("x-relay-attempt"),
            "1",
            "attempt count restarts"
        );
        let n: usize = (5..10)
            .find(|n| request.body == lead(*n))
            .expect("body is one of the range's events");
        let _ = n;
    }
    wait_for_empty_queue(&relay.store, "crm", "the queue to drain").await;
    assert_eq!(crm.count(), 18, "replay sent more than the range");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_while_ingest_runs_under_load_loses_nothing() {
    let (crm, relay) = relay_with_healthy_crm(|t| t.concurrency = 8).await;
    let mut earlier = Vec::new();
    for n in 0..50 {
        earlier.push(send(&relay, lead(n)).await);
    }
    wait_for_requests(&crm, 50, "deliveries").await;

    let url = relay.url();
    let load = tokio::spawn(async move {
        let mut acked = Vec::new();
        let client = client();
        for n in 1000..1400 {
            let (status, answer) = post(&client, &url, Some(SECRET), lead(n)).await;
            assert_eq!(status, 200);
            acked.push(answer["id"].as_str().unwrap().to_owned());
        }
        acked
    });
    let admin = format!("http://{}", relay.admin);
    let report = json(
        cli(args(&[
            "replay",
            "--target",
            "crm",
            "--from",
            "1970-01-01T00:00:00Z",
            "--json",
            "--admin",
            &admin,
        ]))
        .await,
    );
    assert!(report["enqueued"].as_u64().unwrap() >= 50, "{report}");
    let acked = load.await.unwrap();
    eventually("every event delivered", WAIT, async || {
        let got: HashSet<String> = crm
            .requests()
            .iter()
            .map(|r| r.header("idempotency-key").to_owned())
            .collect();
        (acked.iter().all(|id| got.contains(id))
            && earlier.iter().all(|id| got.contains(&id.to_string())))
        .then_some(())
    })
    .await;
    // Every earlier event was delivered twice: once, then by the replay.
    let requests = crm.requests();
    for id in &earlier {
        let times = requests
            .iter()
            .filter(|r| r.header("idempotency-key") == id.to_string())
            .count();
        assert!(times >= 2, "event {id} was not replayed");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_retry_after_fixing_the_target_delivers_and_empties_the_store() {
    let (crm, relay, ids) =
        three_dead_letters_at_crm(Reply::status(422).body("missing field")).await;
    crm.set_behaviour(|_, _| Reply::ok());
    let admin = format!("http://{}", relay.admin);
    let text = ok(cli(args(&[
        "dlq", "retry", "--target", "crm", "--all", "--admin", &admin,
    ]))
    .await);
    assert!(text.contains("3 of 3"), "{text}");
    eventually("the retried deliveries", WAIT, async || {
        (relay.store.queued_count("crm") == 0 && crm.count() == 6).then_some(())
    })
    .await;
    assert!(
        relay.store.dead_letters("crm").unwrap().is_empty(),
        "the dead-letter store is not empty"
    );
    let delivered = &crm.idempotency_keys()[3..];
    for id in &ids {
        assert!(
            delivered.contains(&id.to_string()),
            "dead letter {id} was not delivered"
        );
    }
    assert_eq!(
        scrape(relay.admin, r#"leadflo_relay_dead_letters{target="crm"}"#).await,
        0.0
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_only_what_was_asked_and_asks_first() {
    let (_crm, relay, ids) = three_dead_letters_at_crm(Reply::status(400)).await;
    let admin = format!("http://{}", relay.admin);
    // Without --yes and without a terminal: refused, nothing removed.
    let refused = cli(args(&["dlq", "purge", "--all", "--admin", &admin])).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(relay.store.dead_letters("crm").unwrap().len(), 3);

    let report = json(
        cli(args(&[
            "dlq",
            "purge",
            "--ids",
            &ids[1].to_string(),
            "--yes",
            "--json",
            "--admin",
            &admin,
        ]))
        .await,
    );
    assert_eq!(report["changed"], 1, "{report}");
    let left = dead_letter_ids(&relay, "crm");
    assert_eq!(
        left,
        vec![ids[0], ids[2]],
        "purge removed the wrong dead letters"
    );
    // The events themselves stay (replayable until retention).
    assert!(relay.store.event(ids[1]).unwrap().is_some());

    // Offline too.
    let dir = relay.stop().await;
    let data = dir.path().to_str().unwrap();
    let text = ok(cli(args(&[
        "dlq",
        "purge",
        "--target",
        "crm",
        "--ids",
        &ids[2].to_string(),
        "--yes",
        "--data-dir",
        data,
    ]))
    .await);
    assert!(text.contains("1 dead letter(s) purged"), "{text}");
    let left = json(cli(args(&["dlq", "list", "--json", "--data-dir", data])).await);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["id"], ids[0].to_string());
}

#[tokio::test]
async fn a_non_loopback_admin_api_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    // No token: serve refuses to start, and says why.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "0.0.0.0:0",
                "--data-dir",
                &data,
            ])
            .env("LEADFLO_WEBHOOK_SECRET", SECRET)
            .env_remove("LEADFLO_RELAY_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LEADFLO_RELAY_ADMIN_TOKEN") && stderr.contains("loopback"),
        "{stderr}"
    );

    // With a token: the API answers 401 without it, 200 with it.
    let relay = RelayProcess::start_with_env(
        dir.path(),
        &["--admin-listen", "0.0.0.0:0"],
        &[
            ("LEADFLO_WEBHOOK_SECRET", SECRET),
            ("LEADFLO_RELAY_ADMIN_TOKEN", "admin-token-1"),
        ],
    );
    let admin = format!("http://127.0.0.1:{}", relay.admin.port());
    let client = client();
    let stats_with = async |token: Option<&str>| {
        let mut request = client.get(format!("{admin}/api/stats"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().status()
    };
    assert_eq!(stats_with(None).await, 401);
    assert_eq!(stats_with(Some("admin-token-2")).await, 401);
    assert_eq!(stats_with(Some("admin-token-1")).await, 200);
    // Probes stay open for load balancers and Prometheus.
    assert_eq!(
        client
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The CLI sends the token from the environment.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(["stats", "--json", "--admin", &admin])
            .env("LEADFLO_RELAY_ADMIN_TOKEN", "admin-token-1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(json(output)["online"], true);
}

#[tokio::test]
async fn a_locked_data_dir_with_no_reachable_admin_api_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let _relay = RelayProcess::start(dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    // The config points at the relay's data but at an admin port nobody serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = write_config(work.path(), dir.path(), &port.to_string(), &[]);
    let output = cli(args(&["stats", "--config", config.to_str().unwrap()])).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("locked by a running leadflo-relay") && stderr.contains("did not answer"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_sends_the_example_lead_and_reports_each_target() {
    let (crm, relay) = relay_with_healthy_crm(|_| {}).await;
    let work = tempfile::tempdir().unwrap();
    let mut config = leadflo_relay::config::Config::default();
    config.server.listen = relay.ingest;
    config.server.admin_listen = relay.admin;
    let path = work.path().join("relay.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let text = ok(cli(args(&["send-test", "--config", path.to_str().unwrap()])).await);
    assert!(text.contains("answered 200: accepted as event"), "{text}");
    assert!(text.contains("target crm: delivered"), "{text}");
    assert_eq!(crm.requests()[0].body, fixture("visitor_created.json"));

    let report = json(
        cli(args(&[
            "send-test",
            "--event",
            "conversation_ended",
            "--json",
            "--config",
            path.to_str().unwrap(),
        ]))
        .await,
    );
    assert_eq!(report["status"], 200);
    assert_eq!(report["deliveries"]["crm"]["status"], "delivered");
    assert_eq!(crm.requests()[1].body, fixture("conversation_ended.json"));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_delivered_events_and_keeps_dead_letters_and_pending_ones() {
    let ok_target = Receiver::start(|_, _| Reply::ok()).await;
    let rejecting = Receiver::start(|_, _| Reply::status(400)).await;
    let down = RefusingPort::new();
    let relay = TestRelay::start_with(|c| {
        c.storage.retention = "1s".parse().unwrap();
        c.targets = vec![
            target("chats", &ok_target.url(), Some(&["conversation_ended"])),
            target("strict", &rejecting.url(), Some(&["visitor_created"])),
            target("down", &down.url(), Some(&["other_event"])),
        ];
    })
    .await;
    let delivered = send(&relay, fixture("conversation_ended.json")).await;
    let dead = send(&relay, fixture("visitor_created.json")).await;
    let pending = send(&relay, br#"{"event":"other_event"}"#.to_vec()).await;
    eventually("the delivered event to be pruned", WAIT, async || {
        relay
            .store
            .event(delivered)
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        relay.store.event(dead).unwrap().is_some(),
        "an event with a dead letter was pruned"
    );
    assert!(
        relay.store.event(pending).unwrap().is_some(),
        "an undelivered event was pruned"
    );
    assert!(scrape(relay.admin, "leadflo_relay_pruned_events_total").await >= 1.0);
    relay.stop().await;
}

/// A replay sends a target again only what it takes: an event type it does
/// not subscribe to was never sent to it, and must not be "sent again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_only_the_event_types_the_target_takes() {
    let (slack, relay, lead_id, ended_id) = slack_after_a_lead_and_a_chat().await;
    let admin = format!("http://{}", relay.admin);
    let replay = |extra: &[&str]| {
        let mut all = args(&[
            "replay",
            "--target",
            "slack",
            "--from",
            "1970-01-01T00:00:00Z",
            "--json",
        ]);
        all.extend(args(extra));
        all
    };
    let dry = json(cli(replay(&["--dry-run", "--admin", &admin])).await);
    assert_eq!(dry["matched"], 1, "dry run: {dry}");
    let report = json(cli(replay(&["--admin", &admin])).await);
    assert_eq!(report["matched"], 1, "{report}");
    eventually("the replay to drain", WAIT, async || {
        (relay.store.queued_count("slack") == 0 && slack.count() >= 2).then_some(())
    })
    .await;
    let keys = slack.idempotency_keys();
    assert!(
        !keys.contains(&ended_id.to_string()),
        "slack takes only visitor_created but was sent conversation_ended {ended_id}: {keys:?}"
    );
    assert_eq!(keys, vec![lead_id.to_string(); 2]);
    relay.stop().await;
}

/// Offline with only `--data-dir`, the targets come from the log; their
/// event types are stored there too. Same answers as online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_with_only_the_data_dir_answers_as_online() {
    let (_slack, relay, _, ended) = slack_after_a_lead_and_a_chat().await;
    let ended = ended.to_string();
    let admin = format!("http://{}", relay.admin);
    let online = json(
        cli(args(&[
            "events", "show", &ended, "--json", "--admin", &admin,
        ]))
        .await,
    );
    let dir = relay.stop().await;
    let data = dir.path().to_str().unwrap();
    let offline = json(
        cli(args(&[
            "events",
            "show",
            &ended,
            "--json",
            "--data-dir",
            data,
        ]))
        .await,
    );
    assert_eq!(
        online["deliveries"]["slack"]["status"], "not_subscribed",
        "{online}"
    );
    assert_eq!(
        offline["deliveries"], online["deliveries"],
        "offline (--data-dir) and online disagree"
    );
}

/// An id named twice in `--ids` is one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_counts_an_id_named_twice_once() {
    let (crm, relay) = relay_with_healthy_crm(|_| {}).await;
    let id = send(&relay, lead(0)).await;
    wait_for_requests(&crm, 1, "deliveries").await;
    eventually("the delivery to settle", WAIT, async || {
        (!relay.store.is_queued("crm", id).unwrap()).then_some(())
    })
    .await;
    let admin = format!("http://{}", relay.admin);
    let ids = format!("{id},{id}");
    let dry = json(
        cli(args(&[
            "replay",
            "--target",
            "crm",
            "--ids",
            &ids,
            "--dry-run",
            "--json",
            "--admin",
            &admin,
        ]))
        .await,
    );
    assert_eq!(
        (dry["matched"].as_u64(), dry["already_queued"].as_u64()),
        (Some(1), Some(0)),
        "dry run: {dry}"
    );
    let report = json(
        cli(args(&[
            "replay", "--target", "crm", "--ids", &ids, "--json", "--admin", &admin,
        ]))
        .await,
    );
    assert_eq!(
        (
            report["matched"].as_u64(),
            report["enqueued"].as_u64(),
            report["already_queued"].as_u64()
        ),
        (Some(1), Some(1), Some(0)),
        "{report}"
    );
    relay.stop().await;
}

/// `dlq retry` of a target that is not configured (a typo, or a target
/// removed since) must not move its dead letters into a queue no
/// dispatcher reads: they would leave `dlq list` and never be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_retry_leaves_dead_letters_of_unconfigured_targets_alone() {
    let crm = Receiver::start(|_, _| Reply::status(400).body("no")).await;
    let other = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![
            target("crm", &crm.url(), None),
            target("other", &other.url(), None),
        ]
    })
    .await;
    let id = send(&relay, lead(0)).await;
    wait_for_dead_letters(&relay.store, "crm", 1).await;
    let dir = relay.stop().await;
    // crm is removed from the configuration.
    let relay = TestRelay::start_in(dir, |c| {
        c.targets = vec![target("other", &other.url(), None)]
    })
    .await;
    let admin = format!("http://{}", relay.admin);
    let named = [
        "dlq", "retry", "--target", "crm", "--all", "--admin", &admin,
    ];
    fails_saying(&named, "crm").await;
    let report = json(
        cli(args(&[
            "dlq", "retry", "--all", "--json", "--admin", &admin,
        ]))
        .await,
    );
    assert_eq!(report["changed"], 0, "{report}");
    let left = dead_letter_ids(&relay, "crm");
    assert_eq!(left, vec![id], "the dead letter left the store");
    relay.stop().await;
}

/// `replay --rate N` spaces the replayed deliveries N per second: on a
/// healthy target, and also after the target came back from an outage
/// (the circuit closed and the backlog was caught up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rate_spaces_deliveries_also_after_an_outage() {
    let (crm, relay) = relay_with_healthy_crm(|t| t.circuit_failures = 1).await;
    let admin = format!("http://{}", relay.admin);
    let circuit = r#"leadflo_relay_circuit_open{target="crm"}"#;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(send(&relay, lead(n)).await.to_string());
    }
    wait_for_requests(&crm, 4, "deliveries").await;
    let ids = ids.join(",");
    let spaced = async |phase: &str| {
        wait_for_empty_queue(&relay.store, "crm", "an empty queue").await;
        let before = crm.count();
        let report = json(
            cli(args(&[
                "replay", "--target", "crm", "--ids", &ids, "--rate", "2", "--json", "--admin",
                &admin,
            ]))
            .await,
        );
        assert_eq!(report["enqueued"], 4, "{phase}: {report}");
        wait_for_requests(&crm, before + 4, "deliveries").await;
        let times: Vec<_> = crm.requests()[before..].iter().map(|r| r.at).collect();
        let span = times[3] - times[0];
        assert!(
            span >= Duration::from_millis(1400),
            "{phase}: --rate 2 sent 4 deliveries within {span:?}"
        );
    };
    spaced("healthy target").await;

    // An outage: the circuit opens, then the target answers again.
    crm.set_behaviour(|_, _| Reply::status(503));
    send(&relay, lead(9)).await;
    wait_for_metric(relay.admin, circuit, 1.0, "the circuit to open").await;
    crm.set_behaviour(|_, _| Reply::ok());
    wait_for_metric(relay.admin, circuit, 0.0, "the circuit to close").await;
    spaced("after the circuit closed").await;
    relay.stop().await;
}

/// Ids are microsecond receive times that never go back. After the clock
/// ran ahead (here ten minutes, then NTP set it right), new events carry
/// ids above their receive time until the clock catches up with the last
/// id. A time-range replay or listing must still find them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_ranges_find_events_received_after_the_clock_was_set_back() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let targets = vec![target("crm", &crm.url(), None)];
    let relay = TestRelay::start_with(|c| c.targets = targets.clone()).await;
    send(&relay, lead(0)).await;
    wait_for_requests(&crm, 1, "deliveries").await;
    let dir = relay.stop().await;
    // The highest id as a relay whose clock ran ten minutes ahead left it.
    let mut tries = 0;
    let db = loop {
        match sled::open(dir.path()) {
            Ok(db) => break db,
            Err(err) if tries < 100 => {
                let _ = err;
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("sled does not open: {err}"),
        }
    };
    let ahead = leadflo_relay::node::first_id_at(leadflo_relay::clock::now_ms() + 10 * 60 * 1000);
    db.insert(b"m/last_id", &ahead.to_be_bytes()).unwrap();
    db.flush().unwrap();
    drop(db);
    let relay = TestRelay::start_in(dir, |c| c.targets = targets.clone()).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let from = ops::rfc3339(leadflo_relay::clock::now_ms());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let id = send(&relay, lead(1)).await;
    wait_for_requests(&crm, 2, "deliveries").await;
    let to = ops::rfc3339(leadflo_relay::clock::now_ms());
    let admin = format!("http://{}", relay.admin);
    let listed = json(
        cli(args(&[
            "events", "list", "--from", &from, "--to", &to, "--json", "--admin", &admin,
        ]))
        .await,
    );
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == id.to_string()),
        "event {id} received after --from {from} is not listed: {listed}"
    );
    let report = dry_run_window(&admin, &from, &to).await;
    assert_eq!(report["matched"], 1, "{report}");
    relay.stop().await;
}

/// `events list --limit N` lists at most N events, also for N = 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_list_limit_is_an_upper_bound() {
    let relay = TestRelay::start().await;
    for n in 0..3 {
        send(&relay, lead(n)).await;
    }
    let admin = format!("http://{}", relay.admin);
    for limit in [0usize, 2] {
        let listed = json(
            cli(args(&[
                "events",
                "list",
                "--limit",
                &limit.to_string(),
                "--json",
                "--admin",
                &admin,
            ]))
            .await,
        );
        assert_eq!(
            listed.as_array().unwrap().len(),
            limit,
            "--limit {limit}: {listed}"
        );
    }
    relay.stop().await;
}

/// A store that reached `storage.max_bytes` (a target's outage, a burst)
/// is pruned once its events are past `storage.retention`; ingest must
/// take events again then, as it does when free space returns. Pruning
/// frees space inside sled's file, not the file, and the file's size is
/// what is compared with `max_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_resumes_once_pruning_has_emptied_a_store_at_max_bytes() {
    // The store's size with little in it, after a few checkpoints (the
    // write-ahead log's segment and its spare included).
    let relay = TestRelay::start().await;
    // (A checkpoint comes with a commit once its interval has passed.)
    let checkpoints = async || scrape(relay.admin, "leadflo_relay_checkpoints_total").await;
    for _ in 0..3 {
        let before = checkpoints().await;
        eventually("a checkpoint", WAIT, async || {
            send(&relay, lead(0)).await;
            (checkpoints().await > before).then_some(())
        })
        .await;
    }
    let dir = relay.stop().await;
    let baseline = leadflo_relay::disk::store_size(dir.path()).unwrap();
    let max = baseline + (4 << 20);

    // Nothing is pruned yet (7 days): fill the store to max_bytes.
    let relay = TestRelay::start_in(dir, |c| c.storage.max_bytes = Some(max)).await;
    let client = client();
    let body = format!(
        r#"{{"event":"visitor_created","pad":"{}"}}"#,
        "x".repeat(1000)
    );
    let mut accepted = relay.store.events_between(0, u64::MAX).count();
    loop {
        let (status, json) = post(&client, &relay.url(), Some(SECRET), body.clone().into()).await;
        if status == 503 {
            assert!(json.to_string().contains("storage.max_bytes"), "{json}");
            break;
        }
        assert_eq!(status, 200, "{json}");
        accepted += 1;
        assert!(accepted < 200_000, "the store never reached max_bytes");
    }
    let dir = relay.stop().await;
    let full = leadflo_relay::disk::store_size(dir.path()).unwrap();

    // Every event is past a 1 s retention, and no target waits for any.
    let relay = TestRelay::start_in(dir, |c| {
        c.storage.max_bytes = Some(max);
        c.storage.retention = "1s".parse().unwrap();
    })
    .await;
    eventually("every event to be pruned", WAIT, async || {
        let pruned = scrape(relay.admin, "leadflo_relay_pruned_events_total").await;
        (pruned >= accepted as f64).then_some(())
    })
    .await;
    let url = relay.url();
    let resumed = tokio::time::timeout(WAIT, async {
        loop {
            let (status, _) = post(&client, &url, Some(SECRET), lead(0)).await;
            if status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let now = leadflo_relay::disk::store_size(relay.store.data_dir()).unwrap();
    assert!(
        resumed.is_ok(),
        "ingest still refuses {WAIT:?} after all {accepted} events were pruned: store {now} \
         bytes (full: {full}, max_bytes {max}, baseline {baseline})"
    );
    relay.stop().await;
}

/// A target removed from the configuration keeps what waited for it, and
/// so its events, until `forget-target` drops them: `stats` lists it as not
/// configured, a configured target is refused, and once it is forgotten
/// retention prunes its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_target_is_listed_and_once_forgotten_its_events_are_pruned() {
    let down = RefusingPort::new();
    let other = Receiver::start(|_, _| Reply::ok()).await;
    let crm = || target("crm", &down.url(), None);
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![crm(), target("other", &other.url(), None)];
    })
    .await;
    let held = [send(&relay, lead(0)).await, send(&relay, lead(1)).await];
    wait_for_requests(&other, 2, "deliveries").await;
    let dir = relay.stop().await;

    // crm is removed from the configuration; retention is short.
    let relay = TestRelay::start_in(dir, |c| {
        c.storage.retention = "1s".parse().unwrap();
        c.targets = vec![target("other", &other.url(), None)];
    })
    .await;
    let admin = format!("http://{}", relay.admin);
    let stats = json(cli(args(&["stats", "--json", "--admin", &admin])).await);
    let removed = target_stats(&stats, "crm").expect("crm listed");
    assert_eq!(removed["configured"], false, "{stats}");
    assert_eq!(removed["circuit"], "none", "{stats}");
    let metrics = metrics_text(relay.admin).await;
    assert!(
        !metrics.contains(r#"target="crm""#),
        "a series for the removed target: {metrics}"
    );
    assert_eq!(removed["backlog"], 2, "{stats}");
    assert_eq!(target_stats(&stats, "other").unwrap()["configured"], true);
    let text = ok(cli(args(&["stats", "--admin", &admin])).await);
    assert!(text.contains("crm (not configured)"), "{text}");
    assert!(text.contains("forget-target crm"), "{text}");

    // An event after the restart goes to `other` only and is pruned; the
    // pass that prunes it looked at crm's (older) events first and kept them.
    let after = send(&relay, lead(2)).await;
    eventually("the later event to be pruned", WAIT, async || {
        relay.store.event(after).unwrap().is_none().then_some(())
    })
    .await;
    for id in held {
        assert!(
            relay.store.event(id).unwrap().is_some(),
            "{id} pruned while crm waits for it"
        );
    }

    // Nothing can be queued for it, and the error says why.
    let first = held[0].to_string();
    let replay = [
        "replay", "--target", "crm", "--ids", &first, "--admin", &admin,
    ];
    fails_saying(&replay, "no longer configured").await;

    let configured = ["forget-target", "other", "--yes", "--admin", &admin];
    fails_saying(&configured, "is configured").await;
    fails_saying(&["forget-target", "crm", "--admin", &admin], "--yes").await;
    let stats = json(cli(args(&["stats", "--json", "--admin", &admin])).await);
    assert_eq!(
        target_stats(&stats, "crm").unwrap()["backlog"],
        2,
        "unconfirmed, nothing was dropped"
    );

    let report = forget_crm(&["--admin", &admin]).await;
    assert_eq!(report["waiting"], 2, "{report}");
    assert_eq!(report["dead_letters"], 0, "{report}");
    eventually("crm's events to be pruned", WAIT, async || {
        held.iter()
            .all(|id| relay.store.event(*id).unwrap().is_none())
            .then_some(())
    })
    .await;
    let stats = json(cli(args(&["stats", "--json", "--admin", &admin])).await);
    assert!(target_stats(&stats, "crm").is_none(), "{stats}");
    let again = cli(args(&["forget-target", "crm", "--yes", "--admin", &admin])).await;
    assert_eq!(again.status.code(), Some(1), "nothing left to forget");
    relay.stop().await;
}

/// Offline, only a configuration tells a removed target from a configured
/// one: without `--config` every target in the log counts as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_target_offline_goes_by_the_configuration() {
    let down = RefusingPort::new();
    let other = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![
            target("crm", &down.url(), None),
            target("other", &other.url(), None),
        ];
    })
    .await;
    send(&relay, lead(0)).await;
    wait_for_requests(&other, 1, "deliveries").await;
    let dir = relay.stop().await;
    let data = dir.path().to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let config = write_config(
        work.path(),
        dir.path(),
        "127.0.0.1:1",
        &[target("other", &other.url(), None)],
    );
    let config = config.to_str().unwrap();

    fails_saying(
        &["forget-target", "crm", "--yes", "--data-dir", data],
        "--config",
    )
    .await;
    let configured = cli(args(&[
        "forget-target",
        "other",
        "--yes",
        "--config",
        config,
    ]))
    .await;
    assert_eq!(configured.status.code(), Some(1));
    let unknown = ["forget-target", "nosuch", "--yes", "--config", config];
    fails_saying(&unknown, "no deliveries or dead letters").await;

    let stats = ok(cli(args(&["stats", "--config", config])).await);
    assert!(stats.contains("crm (not configured)"), "{stats}");
    // As online: nothing is queued for a target no dispatcher serves.
    let replay = [
        "replay", "--target", "crm", "--ids", "1", "--config", config,
    ];
    fails_saying(&replay, "no longer configured").await;
    // The relay last started with crm configured (a configuration file can
    // be stale): it must start without it once before crm is forgotten.
    let last_start = ["forget-target", "crm", "--yes", "--config", config];
    fails_saying(&last_start, "start the relay without it").await;
    let relay = TestRelay::start_in(dir, |c| {
        c.targets = vec![target("other", &other.url(), None)];
    })
    .await;
    let dir = relay.stop().await;
    let report = forget_crm(&["--config", config]).await;
    assert_eq!(report["waiting"], 1, "{report}");
    let stats = ok(cli(args(&["stats", "--config", config])).await);
    assert!(!stats.contains("crm"), "{stats}");
    drop(dir);
}
