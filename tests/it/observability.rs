//! Metrics move as they should; the dashboard and alert rules use only
//! series the relay exports; a real Prometheus scrapes the relay and
//! evaluates every expression; logs are JSON on request and never carry
//! secrets or personal data.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::receiver::{Receiver, Reply, first_then};
use crate::common::*;
use leadflo_relay::config::TargetConfig;

fn quick_target(name: &str, url: &str) -> TargetConfig {
    let mut target = TargetConfig::new(name, url);
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "300ms".parse().unwrap();
    target
}

async fn metrics_text(admin: std::net::SocketAddr) -> String {
    client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn counters_and_gauges_follow_what_happens() {
    let crm = Receiver::start(|_, _| Reply::status(500)).await;
    let strict = Receiver::start(|_, _| Reply::status(422).body("bad field")).await;
    let relay = TestRelay::start_with(|c| {
        let mut crm_target = quick_target("crm", &crm.url());
        crm_target.circuit_failures = 1000;
        c.targets = vec![crm_target, quick_target("strict", &strict.url())];
    })
    .await;
    let admin = relay.admin;

    let (status, _) = post(
        &client(),
        &relay.url(),
        Some("wrong"),
        fixture("visitor_created.json"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        scrape(
            admin,
            r#"leadflo_relay_ingest_requests_total{result="unauthorized"}"#
        )
        .await,
        1.0
    );

    for _ in 0..3 {
        send(&relay, fixture("visitor_created.json")).await;
    }
    // The failing target's backlog holds all three and retries accumulate.
    eventually("retries at the failing target", WAIT, async || {
        let retries = scrape(
            admin,
            r#"leadflo_relay_delivery_attempts_total{outcome="retry",target="crm"}"#,
        )
        .await;
        (retries >= 3.0).then_some(())
    })
    .await;
    assert_eq!(
        scrape(admin, r#"leadflo_relay_backlog_events{target="crm"}"#).await,
        3.0
    );
    eventually("the oldest delivery to age", WAIT, async || {
        (scrape(
            admin,
            r#"leadflo_relay_backlog_oldest_age_seconds{target="crm"}"#,
        )
        .await
            > 0.0)
            .then_some(())
    })
    .await;
    // The strict target dead-letters all three.
    wait_for_metric(
        admin,
        r#"leadflo_relay_dead_letters{target="strict"}"#,
        3.0,
        "dead letters at the strict target",
    )
    .await;
    assert_eq!(
        scrape(admin, r#"leadflo_relay_backlog_events{target="strict"}"#).await,
        0.0
    );
    assert_eq!(
        scrape(
            admin,
            r#"leadflo_relay_delivery_attempts_total{outcome="dead",target="strict"}"#
        )
        .await,
        3.0
    );
    // The failing target recovers: its backlog drains to 0.
    crm.set_behaviour(|_, _| Reply::ok());
    wait_for_metric(
        admin,
        r#"leadflo_relay_backlog_events{target="crm"}"#,
        0.0,
        "the backlog to drain",
    )
    .await;
    assert_eq!(
        scrape(
            admin,
            r#"leadflo_relay_backlog_oldest_age_seconds{target="crm"}"#
        )
        .await,
        0.0
    );
    assert_eq!(
        scrape(
            admin,
            r#"leadflo_relay_delivery_attempts_total{outcome="success",target="crm"}"#
        )
        .await,
        3.0
    );
    assert!(scrape(admin, "leadflo_relay_disk_free_bytes").await > 0.0);
    assert!(scrape(admin, "leadflo_relay_store_size_bytes").await > 0.0);
    assert_eq!(
        scrape(admin, r#"leadflo_relay_build_info{version="0.1.0"}"#).await,
        1.0
    );
    assert!(scrape(admin, "process_resident_memory_bytes").await > 0.0);

    // Nothing personal or secret in any series.
    let text = metrics_text(admin).await;
    // (The phone as written and as digits: "555" alone also turns up inside
    // numbers, a store size of 1,555,200 bytes say.)
    for needle in [
        "Sarah",
        "sarah",
        "555 123 4567",
        "5551234567",
        "Johnson",
        SECRET,
        "127.0.0.1",
    ] {
        assert!(!text.contains(needle), "/metrics contains {needle:?}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn backlog_figures_are_rebuilt_at_start() {
    let port = RefusingPort::new();
    let down = port.url();
    let relay = TestRelay::start_with(|c| c.targets = vec![quick_target("crm", &down)]).await;
    for _ in 0..4 {
        send(&relay, fixture("conversation_ended.json")).await;
    }
    let dir = relay.stop().await;
    let relay = TestRelay::start_in(dir, |c| c.targets = vec![quick_target("crm", &down)]).await;
    assert_eq!(
        scrape(relay.admin, r#"leadflo_relay_backlog_events{target="crm"}"#).await,
        4.0
    );
    relay.stop().await;
}

/// Posts a lead, which `relay` must refuse with 503 and an error saying
/// `why`.
async fn refused_as_unavailable(relay: &TestRelay, why: &str) {
    let (status, json) = post(
        &client(),
        &relay.url(),
        Some(SECRET),
        fixture("visitor_created.json"),
    )
    .await;
    assert_eq!(status, 503, "{json}");
    assert!(json["error"].as_str().unwrap().contains(why), "{json}");
}

#[tokio::test]
async fn below_the_disk_floor_ingest_answers_503_and_readyz_fails() {
    let relay = TestRelay::start_with(|c| c.storage.min_free_bytes = Some(u64::MAX)).await;
    refused_as_unavailable(&relay, "low on disk space").await;
    assert_eq!(relay.store.events().count(), 0);
    let ready = client()
        .get(format!("http://{}/readyz", relay.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("storage.min_free_bytes"),
        "{body}"
    );
    assert_eq!(
        scrape(
            relay.admin,
            r#"leadflo_relay_ingest_requests_total{result="unavailable"}"#
        )
        .await,
        1.0
    );
    relay.stop().await;

    let relay = TestRelay::start_with(|c| c.storage.max_bytes = Some(1)).await;
    refused_as_unavailable(&relay, "storage.max_bytes").await;
    relay.stop().await;
}

// ---- the dashboard and the alert rules -------------------------------------

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every PromQL expression in the dashboard (panels and template queries).
fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("grafana/leadflo-relay.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("panel targets") {
            let expr = target["expr"].as_str().expect("expr");
            exprs.push((panel["title"].as_str().unwrap().to_owned(), expr.to_owned()));
        }
    }
    exprs
}

fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("grafana/alerts.yml")).unwrap();
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("alerts.yml is YAML");
    let mut exprs = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_owned();
            let expr = rule["expr"].as_str().expect("expr").to_owned();
            let summary = rule["annotations"]["summary"].as_str().unwrap_or("");
            let description = rule["annotations"]["description"].as_str().unwrap_or("");
            assert!(
                !summary.is_empty() && !description.is_empty(),
                "{name} tells the operator nothing"
            );
            exprs.push((name, expr));
        }
    }
    exprs
}

/// Metric names in a PromQL expression (string literals removed first).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut without_strings = String::new();
    let mut in_string = false;
    for c in expr.chars() {
        if c == '"' {
            in_string = !in_string;
        } else if !in_string {
            without_strings.push(c);
        }
    }
    without_strings
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("leadflo_relay_") || token.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// The series names a live relay (with a target, after traffic) exports.
async fn exported_names() -> BTreeSet<String> {
    let target = Receiver::start(|_, _| Reply::ok()).await;
    let relay =
        TestRelay::start_with(|c| c.targets = vec![quick_target("crm", &target.url())]).await;
    send(&relay, fixture("visitor_created.json")).await;
    eventually("a delivery", WAIT, async || {
        (target.count() == 1).then_some(())
    })
    .await;
    let text = metrics_text(relay.admin).await;
    relay.stop().await;
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_series() {
    let exported = exported_names().await;
    let exprs: Vec<_> = dashboard_exprs().into_iter().chain(alert_exprs()).collect();
    assert!(
        exprs.len() >= 20,
        "expected every panel and rule, found {}",
        exprs.len()
    );
    for (name, expr) in &exprs {
        let used = metric_names(expr);
        assert!(
            !used.is_empty() || expr.contains("up{"),
            "{name}: no relay metric in {expr}"
        );
        for metric in used {
            assert!(
                exported.contains(&metric),
                "{name}: {metric} is not exported by the relay ({expr})"
            );
        }
    }
    // And the panels the issue names exist.
    let titles: Vec<String> = dashboard_exprs().into_iter().map(|(t, _)| t).collect();
    for wanted in [
        "Ingest rate by result",
        "Ack latency vs the 5 s budget",
        "Group commit",
        "Backlog per target",
        "Oldest waiting delivery",
        "Delivery outcomes per target",
        "Delivery latency per target",
        "Circuits open",
        "Dead letters",
        "Disk",
    ] {
        assert!(
            titles.iter().any(|t| t == wanted),
            "dashboard lacks the panel {wanted:?}"
        );
    }
    let text = std::fs::read_to_string(repo_file("grafana/leadflo-relay.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard needs a Prometheus datasource variable"
    );
    assert!(!text.contains("\"uid\": \"P"), "hard-coded datasource uid");
}

#[test]
fn metric_name_extraction_ignores_label_values() {
    let names = metric_names(
        r#"sum(rate(leadflo_relay_x_total{result="leadflo_relay_fake"}[5m])) / process_y"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["leadflo_relay_x_total".to_owned(), "process_y".to_owned()])
    );
}

// ---- a real Prometheus --------------------------------------------------------

/// The `prometheus` binary, or `None` after saying (uncaptured) that the
/// suite is skipped. `LEADFLO_REQUIRE_PROMETHEUS=1` (set by .ci/run) turns a
/// missing binary into a failure.
fn find_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    if found.is_none() {
        assert!(
            std::env::var("LEADFLO_REQUIRE_PROMETHEUS").is_err(),
            "{name} is required (LEADFLO_REQUIRE_PROMETHEUS is set) but not on PATH"
        );
        // Written to the real stderr, past the test harness's capture.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the real-Prometheus checks need `{name}` on PATH (Debian package \
             `prometheus`); .ci/run installs it and runs them"
        );
    }
    found
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = find_tool("promtool") else {
        return;
    };
    let output = Command::new(promtool)
        .args(["check", "rules"])
        .arg(repo_file("grafana/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn prom_query(prometheus: &str, expr: &str) -> serde_json::Value {
    client()
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_and_evaluates_every_expression() {
    let Some(binary) = find_tool("prometheus") else {
        return;
    };
    let failing = Receiver::start(|_, _| Reply::status(503)).await;
    let healthy = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![
            quick_target("crm", &failing.url()),
            quick_target("slack", &healthy.url()),
        ];
    })
    .await;

    let work = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = work.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\n\
             scrape_configs:\n  - job_name: leadflo-relay\n    static_configs:\n      - targets: [\"{}\"]\n",
            repo_file("grafana/alerts.yml").to_str().unwrap(),
            relay.admin
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    let prometheus = format!("http://127.0.0.1:{port}");

    // Traffic while Prometheus scrapes: leads, a wrong secret, a failing target.
    let sender = tokio::spawn({
        let url = relay.url();
        async move {
            for n in 0..200 {
                let secret = if n % 10 == 0 { "wrong" } else { SECRET };
                post(
                    &client(),
                    &url,
                    Some(secret),
                    fixture("visitor_created.json"),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    eventually(
        "Prometheus to have rates of the relay's series",
        Duration::from_secs(90),
        async || {
            let Ok(response) = client()
                .get(format!("{prometheus}/api/v1/query"))
                .query(&[(
                    "query",
                    r#"rate(leadflo_relay_ingest_requests_total{result="accepted"}[15s]) > 0"#,
                )])
                .send()
                .await
            else {
                return None;
            };
            let json: serde_json::Value = response.json().await.ok()?;
            (!json["data"]["result"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;

    let must_have_data = [
        "Ingest rate by result",
        "Backlog per target",
        "Ack latency vs the 5 s budget",
    ];
    for (title, expr) in dashboard_exprs() {
        let promql = expr
            .replace("$__rate_interval", "15s")
            .replace("$target", ".*");
        let answer = prom_query(&prometheus, &promql).await;
        assert_eq!(
            answer["status"], "success",
            "panel {title:?}: {promql} -> {answer}"
        );
        if must_have_data.contains(&title.as_str()) {
            let result = answer["data"]["result"].as_array().unwrap();
            assert!(!result.is_empty(), "panel {title:?} has no data: {promql}");
        }
    }
    for (name, expr) in alert_exprs() {
        let answer = prom_query(&prometheus, &expr).await;
        assert_eq!(
            answer["status"], "success",
            "alert {name}: {expr} -> {answer}"
        );
    }
    // Prometheus loaded every rule and evaluates them without error.
    let rules: serde_json::Value = eventually("rules to be evaluated", WAIT, async || {
        let rules: serde_json::Value = client()
            .get(format!("{prometheus}/api/v1/rules"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let all = rules["data"]["groups"][0]["rules"].as_array()?;
        (all.len() == alert_exprs().len() && all.iter().all(|r| r["health"] == "ok"))
            .then_some(rules)
    })
    .await;
    assert_eq!(rules["status"], "success");
    sender.abort();
    relay.stop().await;
}

// ---- review: gauges and buckets under edge paths ----------------------------

async fn admin_post(
    admin: std::net::SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let response = client()
        .post(format!("http://{admin}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// A replay naming the same id twice (`--ids 7,7`, or a list pasted twice)
/// queues one delivery: the backlog and dead-letter gauges must say so.
#[tokio::test]
async fn replaying_a_repeated_id_keeps_backlog_and_dead_letter_gauges_exact() {
    let strict = Receiver::start(|_, _| Reply::status(422).body("bad field")).await;
    let relay =
        TestRelay::start_with(|c| c.targets = vec![quick_target("strict", &strict.url())]).await;
    let admin = relay.admin;
    let id = send(&relay, fixture("visitor_created.json"))
        .await
        .to_string();
    wait_for_metric(
        admin,
        r#"leadflo_relay_dead_letters{target="strict"}"#,
        1.0,
        "the dead letter",
    )
    .await;

    let report = admin_post(
        admin,
        "/api/replay",
        serde_json::json!({ "target": "strict", "ids": [id, id] }),
    )
    .await;
    // The target refuses it again: one more dead letter, the same one.
    eventually(
        "the replayed delivery to be dead-lettered again",
        WAIT,
        async || {
            (strict.count() >= 2
                && scrape(
                    admin,
                    r#"leadflo_relay_delivery_attempts_total{outcome="dead",target="strict"}"#,
                )
                .await
                    == 2.0)
                .then_some(())
        },
    )
    .await;
    // The attempt is counted just before its dead letter is written: the
    // gauges get a deadline to agree with the log.
    let gauges = async || {
        (
            scrape(admin, r#"leadflo_relay_backlog_events{target="strict"}"#).await,
            scrape(admin, r#"leadflo_relay_dead_letters{target="strict"}"#).await,
        )
    };
    let settled = tokio::time::timeout(WAIT, async {
        while gauges().await != (0.0, 1.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "gauges drifted from the log: {:?} (replay report: {report})",
        gauges().await
    );
    assert_eq!(report["enqueued"], 1, "{report}");
    assert_eq!(relay.store.queued_count("strict"), 0);
    assert_eq!(relay.store.dead_letters("strict").unwrap().len(), 1);
    assert_eq!(strict.count(), 2, "one replay, one attempt");
    relay.stop().await;
}

/// A target may take up to its timeout (10 s by default) to answer: the
/// delivery latency histogram must resolve that range, not put everything
/// past LeadFloAgent's 5 s ingest budget into `+Inf` (where
/// histogram_quantile reports it as 5 s).
#[tokio::test]
async fn delivery_latency_buckets_cover_the_target_timeout() {
    let slow = Receiver::start(|_, _| Reply::ok().after(Duration::from_secs(6))).await;
    let relay = TestRelay::start_with(|c| {
        let target = quick_target("slow", &slow.url());
        assert_eq!(target.timeout.get(), Duration::from_secs(10), "the default");
        c.targets = vec![target];
    })
    .await;
    let admin = relay.admin;
    send(&relay, fixture("visitor_created.json")).await;
    wait_for_metric(
        admin,
        r#"leadflo_relay_delivery_attempts_total{outcome="success",target="slow"}"#,
        1.0,
        "the slow delivery",
    )
    .await;
    let text = metrics_text(admin).await;
    let mut finite: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("leadflo_relay_delivery_duration_seconds_bucket{"))
        .filter(|l| l.contains(r#"target="slow""#) && !l.contains(r#"le="+Inf""#))
        .map(|l| {
            let le = l
                .split(r#"le=""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let value = l.rsplit(' ').next().unwrap();
            (le.parse().unwrap(), value.parse().unwrap())
        })
        .collect();
    finite.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let (largest_le, in_it) = *finite.last().unwrap();
    assert!(
        largest_le >= 10.0 && in_it == 1.0,
        "a 6 s attempt (timeout 10 s) falls past every finite bucket; largest is le={largest_le} \
         holding {in_it}"
    );
    relay.stop().await;
}

/// `backlog_oldest_age_seconds` (what the "lead waiting more than 15
/// minutes" alert reads) must not get younger while the oldest waiting
/// delivery still waits: here a replay of an older event used to hide a
/// lead that had been waiting longer.
#[tokio::test]
async fn a_replay_does_not_hide_the_oldest_waiting_delivery() {
    // The first event is delivered; the next lead is refused: come back
    // in a minute.
    let crm = Receiver::start(first_then(
        1,
        Reply::ok(),
        Reply::status(503).header("retry-after", "60"),
    ))
    .await;
    let relay = TestRelay::start_with(|c| {
        let mut target = quick_target("crm", &crm.url());
        target.retry.max_interval = "120s".parse().unwrap();
        target.circuit_failures = 1000;
        c.targets = vec![target];
    })
    .await;
    let admin = relay.admin;
    let older = send(&relay, fixture("visitor_created.json")).await;
    eventually("the first delivery", WAIT, async || {
        (crm.count() == 1).then_some(())
    })
    .await;
    let waiting_since = std::time::Instant::now();
    send(&relay, fixture("conversation_ended.json")).await;
    eventually("the lead to be refused", WAIT, async || {
        (crm.count() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        scrape(
            admin,
            r#"leadflo_relay_backlog_oldest_age_seconds{target="crm"}"#
        )
        .await
            >= 3.0
    );

    admin_post(
        admin,
        "/api/replay",
        serde_json::json!({ "target": "crm", "ids": [older.to_string()] }),
    )
    .await;
    // The replayed event waits from now, under the older id; the lead's
    // `Retry-After` holds the target, so neither is attempted meanwhile.
    let age = scrape(
        admin,
        r#"leadflo_relay_backlog_oldest_age_seconds{target="crm"}"#,
    )
    .await;
    let waited = waiting_since.elapsed().as_secs_f64();
    assert_eq!(
        scrape(admin, r#"leadflo_relay_backlog_events{target="crm"}"#).await,
        2.0
    );
    assert!(
        age >= waited - 1.0,
        "the lead has waited {waited:.1} s but the oldest waiting delivery is {age:.1} s old"
    );
    relay.stop().await;
}
