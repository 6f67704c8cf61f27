//! Alerts to a team's channel (`[alerts]`), posted to real receivers on
//! loopback: a dead letter (target, reason, event id, and no lead data),
//! folding within `min_interval`, a circuit that opens and closes, disk
//! space crossing the floor, a receiver that is down or hangs (ingest,
//! delivery and shutdown go on), and the URL read again on reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::mount::SmallFs;
use crate::common::receiver::{Receiver, Reply, wait_for_requests};
use crate::common::*;
use leadflo_relay::config::{AlertFormat, Config, TargetConfig};
use leadflo_relay::store::EventId;

/// The webhook URL in a file of its own (no environment variable: tests
/// run in parallel in one process).
struct UrlFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl UrlFile {
    fn new(url: &str) -> UrlFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts-url");
        std::fs::write(&path, format!("{url}\n")).unwrap();
        UrlFile { path, _dir: dir }
    }

    fn set(&self, url: &str) {
        std::fs::write(&self.path, format!("{url}\n")).unwrap();
    }
}

/// Alerts to `url`, in `format`, at most one per `min_interval`.
fn alerts_to(config: &mut Config, url: &UrlFile, format: AlertFormat, min_interval: &str) {
    config.alerts.url_file = Some(url.path.clone());
    config.alerts.format = format;
    config.alerts.min_interval = min_interval.parse().unwrap();
}

/// A target with quick retries.
fn target(name: &str, url: &str) -> TargetConfig {
    let mut target = TargetConfig::new(name, url);
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "200ms".parse().unwrap();
    target.timeout = "5s".parse().unwrap();
    target
}

/// A lead with personal data an alert must never carry.
fn lead(n: usize) -> Vec<u8> {
    format!(
        r#"{{"event":"visitor_created","data":{{"visitor":{{"id":"vis_{n}","name":"Zoë Lead","email":"zoe.lead{n}@example.com"}}}}}}"#
    )
    .into_bytes()
}

/// A CRM that refuses every lead with 422 and echoes it back, as some do.
async fn echoing_crm() -> Receiver {
    Receiver::start(|_, r| {
        let echo = String::from_utf8_lossy(&r.body).into_owned();
        Reply::status(422).body(&format!(r#"{{"error":"invalid","lead":{echo}}}"#))
    })
    .await
}

/// Every JSON message `receiver` got so far.
fn messages(receiver: &Receiver) -> Vec<serde_json::Value> {
    receiver
        .requests()
        .iter()
        .map(|r| {
            serde_json::from_slice(&r.body).unwrap_or_else(|e| {
                panic!(
                    "alert is not JSON ({e}): {}",
                    String::from_utf8_lossy(&r.body)
                )
            })
        })
        .collect()
}

/// The alerts a message stands for: itself and those folded into it.
fn covered(messages: &[serde_json::Value]) -> u64 {
    messages
        .iter()
        .map(|m| m["folded"].as_u64().unwrap() + 1)
        .sum()
}

/// A channel that answers 429 with `Retry-After` (Slack past about one
/// message a second) gets the message again once that time has passed,
/// and it counts as sent, not failed.
#[tokio::test]
async fn a_rate_limited_alert_is_posted_again_after_retry_after() {
    let crm = echoing_crm().await;
    let channel = Receiver::start(|n, _| {
        if n == 0 {
            Reply::status(429).header("retry-after", "1")
        } else {
            Reply::ok()
        }
    })
    .await;
    let url = UrlFile::new(&channel.url());
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("crm", &crm.url())];
        alerts_to(c, &url, AlertFormat::Json, "1m");
    })
    .await;
    send(&relay, lead(1)).await;
    wait_for_requests(&channel, 2, "the alert, posted again").await;
    let requests = channel.requests();
    assert_eq!(requests[0].body, requests[1].body);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "posted again after {waited:?}"
    );
    eventually("the alert counted sent", WAIT, async || {
        (relay.metrics.alerts("dead_letter", "sent") == 1).then_some(())
    })
    .await;
    assert_eq!(relay.metrics.alerts("dead_letter", "failed"), 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_dead_letter_is_alerted_with_target_reason_and_id_but_no_lead_data() {
    let crm = echoing_crm().await;
    let channel = Receiver::start(|_, _| Reply::ok()).await;
    let url = UrlFile::new(&channel.url());
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("crm", &crm.url())];
        alerts_to(c, &url, AlertFormat::Json, "1m");
    })
    .await;
    let id = send(&relay, lead(1)).await;
    wait_for_requests(&channel, 1, "the dead-letter alert").await;

    let request = &channel.requests()[0];
    assert_eq!(request.header("content-type"), "application/json");
    let alert = &messages(&channel)[0];
    assert_eq!(alert["kind"], "dead_letter", "{alert}");
    assert_eq!(alert["target"], "crm", "{alert}");
    assert_eq!(alert["event_id"], id.to_string(), "{alert}");
    assert_eq!(alert["reason"], "HTTP 422 (not retryable)", "{alert}");
    assert_eq!(alert["folded"], 0, "{alert}");
    // Several relays may post to one channel: each names its node.
    let (node, _) = leadflo_relay::node::NodeId::peek(None, relay.dir.path()).unwrap();
    assert_eq!(alert["node"], node.unwrap().0, "{alert}");
    let at = alert["at"].as_str().unwrap();
    leadflo_relay::ops::parse_rfc3339(at).unwrap_or_else(|e| panic!("at: {e}"));
    // The dead letter keeps the CRM's answer, echo and all; the alert not.
    let dead = wait_for_dead_letters(&relay.store, "crm", 1).await;
    assert!(
        dead[0].reason.contains("zoe.lead1@example.com"),
        "{}",
        dead[0].reason
    );
    let text = String::from_utf8_lossy(&request.body);
    for personal in ["Zoë", "zoe.lead", "example.com", "vis_1"] {
        assert!(
            !text.contains(personal),
            "the alert carries lead data ({personal}): {text}"
        );
    }
    eventually("the alert counted sent", WAIT, async || {
        (relay.metrics.alerts("dead_letter", "sent") == 1).then_some(())
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn dead_letters_within_the_interval_are_folded_into_the_next_message() {
    let crm = echoing_crm().await;
    let channel = Receiver::start(|_, _| Reply::ok()).await;
    let url = UrlFile::new(&channel.url());
    let interval = Duration::from_secs(1);
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("crm", &crm.url())];
        alerts_to(c, &url, AlertFormat::Json, "1s");
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(send(&relay, lead(n)).await);
    }
    wait_for_dead_letters(&relay.store, "crm", 10).await;
    // No new dead letter comes: the held ones are told when the interval
    // has passed all the same.
    let told = eventually("every dead letter told", WAIT, async || {
        let got = messages(&channel);
        (covered(&got) >= 10).then_some(got)
    })
    .await;
    assert_eq!(covered(&told), 10, "{told:?}");
    assert!(
        told.len() >= 2 && told.len() < 10,
        "expected a message, then the rest folded: {told:?}"
    );
    assert_eq!(told[0]["folded"], 0, "the first is told at once: {told:?}");
    let folded = told.iter().skip(1).find(|m| m["folded"].as_u64() > Some(0));
    let folded = folded.unwrap_or_else(|| panic!("no message counts folded alerts: {told:?}"));
    assert!(folded["since"].is_string(), "{folded}");
    let last = told.last().unwrap();
    assert_eq!(
        last["event_id"],
        ids[9].to_string(),
        "the latest is told: {told:?}"
    );
    let at: Vec<_> = channel.requests().iter().map(|r| r.at).collect();
    for pair in at.windows(2) {
        assert!(
            pair[1] - pair[0] >= interval / 2,
            "two messages within the interval: {told:?}"
        );
    }
    // Each alert is counted once: in a message of its own, or folded.
    eventually("every alert counted", WAIT, async || {
        let sent = relay.metrics.alerts("dead_letter", "sent");
        let folded = relay.metrics.alerts("dead_letter", "folded");
        (sent + folded == 10).then_some(())
    })
    .await;
    assert_eq!(
        relay.metrics.alerts("dead_letter", "sent"),
        told.len() as u64
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_circuit_that_opens_and_closes_is_alerted_twice_in_slack_format() {
    let crm = Receiver::start(|_, _| Reply::status(503)).await;
    let channel = Receiver::start(|_, _| Reply::ok()).await;
    let url = UrlFile::new(&channel.url());
    let relay = TestRelay::start_with(|c| {
        let mut t = target("crm", &crm.url());
        t.circuit_failures = 2;
        t.probe_max_interval = "200ms".parse().unwrap();
        c.targets = vec![t];
        alerts_to(c, &url, AlertFormat::Slack, "300ms");
    })
    .await;
    send(&relay, lead(1)).await;
    wait_for_requests(&channel, 1, "the circuit-open alert").await;
    crm.set_behaviour(|_, _| Reply::ok());
    wait_for_empty_queue(&relay.store, "crm", "the lead delivered once crm is back").await;
    wait_for_requests(&channel, 2, "the circuit-closed alert").await;

    let texts: Vec<String> = messages(&channel)
        .iter()
        .map(|m| {
            m["text"]
                .as_str()
                .expect("a Slack message has text")
                .to_owned()
        })
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(
        texts[0].contains("Circuit open for target `crm`"),
        "{texts:?}"
    );
    assert!(
        texts[1].contains("Circuit closed for target `crm`"),
        "{texts:?}"
    );
    assert_eq!(relay.metrics.alerts("circuit_open", "sent"), 1);
    eventually("the closed alert counted sent", WAIT, async || {
        (relay.metrics.alerts("circuit_closed", "sent") == 1).then_some(())
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_down_alert_receiver_holds_up_nothing_and_its_failures_are_counted() {
    let crm = echoing_crm().await;
    let erp = Receiver::start(|_, _| Reply::ok()).await;
    let down = RefusingPort::new();
    let url = UrlFile::new(&down.url());
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("crm", &crm.url()), target("erp", &erp.url())];
        alerts_to(c, &url, AlertFormat::Slack, "300ms");
    })
    .await;
    for n in 0..20 {
        send(&relay, lead(n)).await;
    }
    wait_for_dead_letters(&relay.store, "crm", 20).await;
    wait_for_requests(&erp, 20, "every lead delivered to erp").await;
    eventually("failed posts counted", WAIT, async || {
        (relay.metrics.alerts("dead_letter", "failed") >= 1).then_some(())
    })
    .await;
    let text = metrics_text(relay.admin).await;
    assert!(
        !text.contains(&down.addr.to_string()),
        "the alert URL is a credential: not in /metrics"
    );
    let metrics = relay.metrics.clone();
    relay.stop().await;
    // Every alert is counted once: failed, or never posted by the stop.
    let failed = metrics.alerts("dead_letter", "failed");
    let dropped = metrics.alerts("dead_letter", "dropped");
    assert_eq!(
        (failed + dropped, metrics.alerts("dead_letter", "sent")),
        (20, 0)
    );
}

#[tokio::test]
async fn a_hanging_alert_receiver_holds_up_neither_delivery_nor_shutdown() {
    let crm = echoing_crm().await;
    let channel = Receiver::start(|_, _| Reply::ok().after(Duration::from_secs(600))).await;
    let url = UrlFile::new(&channel.url());
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("crm", &crm.url())];
        alerts_to(c, &url, AlertFormat::Json, "300ms");
        c.alerts.timeout = "120s".parse().unwrap();
    })
    .await;
    send(&relay, lead(0)).await;
    eventually(
        "the first alert hanging at the receiver",
        WAIT,
        async || (channel.in_flight() == 1).then_some(()),
    )
    .await;
    for n in 1..30 {
        send(&relay, lead(n)).await;
    }
    wait_for_dead_letters(&relay.store, "crm", 30).await;
    assert_eq!(channel.count(), 1, "one post at a time");
    let metrics = relay.metrics.clone();
    tokio::time::timeout(Duration::from_secs(10), relay.stop())
        .await
        .expect("a hanging alert post held up the shutdown");
    assert_eq!(
        metrics.alerts("dead_letter", "dropped"),
        30,
        "what could not be posted by the stop is counted dropped"
    );
}

#[tokio::test]
async fn the_alert_url_is_read_again_on_reload() {
    let crm = echoing_crm().await;
    let (first, second) = (
        Receiver::start(|_, _| Reply::ok()).await,
        Receiver::start(|_, _| Reply::ok()).await,
    );
    let url = UrlFile::new(&first.url());
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("relay.toml");
    // The inbound secret from a file too: a reload reads it again.
    let secret = work.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [auth]\nsecret_file = {:?}\n\
         [storage]\ndata_dir = {:?}\n\
         [[targets]]\nname = \"crm\"\nurl = \"{}\"\n",
        secret.to_str().unwrap(),
        work.path().join("data").to_str().unwrap(),
        crm.url()
    );
    std::fs::write(&file, &base).unwrap();
    let relay = InProcess::start(&file).await;

    // No [alerts]: a dead letter is told nowhere.
    relay.send(lead(1)).await;
    wait_for_dead_letters(&relay.store, "crm", 1).await;
    assert_eq!(first.count(), 0);

    let with_alerts = format!(
        "{base}[alerts]\nurl_file = {:?}\nformat = \"json\"\nmin_interval = \"300ms\"\n",
        url.path.to_str().unwrap()
    );
    relay.reload(&file, &with_alerts, 1.0).await;
    let id = relay.send(lead(2)).await;
    wait_for_requests(&first, 1, "the alert once [alerts] was added").await;
    assert_eq!(messages(&first)[0]["event_id"], id.to_string());

    // A new URL in the file (a rotated webhook) is taken by a reload.
    url.set(&second.url());
    relay.reload(&file, &with_alerts, 2.0).await;
    let id = relay.send(lead(3)).await;
    wait_for_requests(&second, 1, "the alert at the rotated URL").await;
    assert_eq!(messages(&second)[0]["event_id"], id.to_string());
    assert_eq!(
        first.count(),
        1,
        "the old URL was posted to after the rotation"
    );
    relay.stop().await;
}

/// A relay in this process that reloads its configuration file.
struct InProcess {
    ingest: std::net::SocketAddr,
    store: leadflo_relay::store::Store,
    metrics: std::sync::Arc<leadflo_relay::metrics::Metrics>,
    reloads: std::sync::Arc<tokio::sync::Notify>,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    async fn start(file: &Path) -> InProcess {
        let source = leadflo_relay::reload::ConfigSource {
            path: Some(file.to_owned()),
            overrides: Default::default(),
        };
        let config = source.load().unwrap();
        let secret = Some(leadflo_relay::config::Secret::new(SECRET));
        let relay = leadflo_relay::Relay::build(config, secret)
            .await
            .unwrap()
            .reload_from(source);
        let shutdown = tokio_util::sync::CancellationToken::new();
        InProcess {
            ingest: relay.ingest_addr(),
            store: relay.store(),
            metrics: relay.metrics(),
            reloads: relay.reload_requests(),
            shutdown: shutdown.clone(),
            task: tokio::spawn(relay.run_until_stopped(shutdown)),
        }
    }

    async fn send(&self, body: Vec<u8>) -> EventId {
        let url = format!("http://{}/leadflo-webhook", self.ingest);
        let (status, json) = post(&client(), &url, Some(SECRET), body).await;
        assert_eq!(status, 200, "{json}");
        json["id"].as_str().unwrap().parse().unwrap()
    }

    /// Writes `text` to `file` and reloads; waits for the `nth` good reload.
    async fn reload(&self, file: &Path, text: &str, nth: f64) {
        std::fs::write(file, text).unwrap();
        self.reloads.notify_one();
        eventually("the reload", WAIT, async || {
            let ok = self.metrics.config_reloads.with_label_values(&["ok"]).get();
            let failed = self
                .metrics
                .config_reloads
                .with_label_values(&["failed"])
                .get();
            assert_eq!(failed, 0, "the reload failed");
            (ok as f64 >= nth).then_some(())
        })
        .await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn disk_space_below_the_floor_and_back_is_alerted() {
    // Skipped where no tmpfs can be mounted; the disk guard's unit test
    // `crossing_the_floor_and_coming_back_are_each_alerted_once` stands.
    let Some(fs) = SmallFs::mount("16m") else {
        return;
    };
    let channel = Receiver::start(|_, _| Reply::ok()).await;
    let url = UrlFile::new(&channel.url());
    let data = fs.path.join("data");
    std::fs::create_dir(&data).unwrap();
    let dir = tempfile::tempdir_in(&data).unwrap();
    let relay = TestRelay::start_in(dir, |c| {
        c.storage.min_free_bytes = Some(4 << 20);
        alerts_to(c, &url, AlertFormat::Json, "300ms");
    })
    .await;
    let filler = fs.path.join("filler");
    let free = leadflo_relay::disk::available_space(&fs.path).unwrap();
    std::fs::write(&filler, vec![0u8; (free - (1 << 20)) as usize]).unwrap();
    wait_for_requests(&channel, 1, "the disk-low alert").await;
    std::fs::remove_file(&filler).unwrap();
    wait_for_requests(&channel, 2, "the disk-ok alert").await;

    let told = messages(&channel);
    assert_eq!(told[0]["kind"], "disk_low", "{told:?}");
    assert!(
        told[0]["reason"]
            .as_str()
            .unwrap()
            .contains("storage.min_free_bytes = 4194304"),
        "{told:?}"
    );
    assert_eq!(told[0]["target"], serde_json::Value::Null);
    assert_eq!(told[1]["kind"], "disk_ok", "{told:?}");
    relay.stop().await;
}
