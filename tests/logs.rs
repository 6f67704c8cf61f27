//! The relay's own log output, from the real binary: JSON on request, one
//! line per state change at info, and never a secret or personal data, even
//! with every crate logging at trace level.

mod common;

use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::*;

const TARGET_SECRET: &str = "target-secret-value-42";

/// Runs a full cycle (start, ingest, deliver, a dead letter, a bad body,
/// a wrong secret, shutdown) with `log_args` and returns every log line.
async fn full_run(rust_log: &str, log_args: &[&str]) -> Vec<String> {
    let ok = Receiver::start(|_, _| Reply::ok()).await;
    let rejecting =
        Receiver::start(|_, _| Reply::status(400).body(r#"{"error":"sarah@example.com exists"}"#))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let secret_file = dir.path().join("target-secret");
    std::fs::write(&secret_file, TARGET_SECRET).unwrap();
    std::fs::write(
        &config,
        format!(
            "[[targets]]\nname = \"crm\"\nurl = \"{}\"\nsecret_file = {:?}\n\n\
             [[targets]]\nname = \"strict\"\nurl = \"{}\"\n",
            ok.url().replace("http://", "http://user:hunter2@"),
            secret_file.to_str().unwrap(),
            rejecting.url()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(log_args);
    let mut relay = RelayProcess::start_with_env(
        &data,
        &args,
        &[("LEADFLO_WEBHOOK_SECRET", SECRET), ("RUST_LOG", rust_log)],
    );
    let client = client();
    for fixture_name in [
        "visitor_created.json",
        "conversation_ended.json",
        "visitor_created_non_ascii.json",
    ] {
        let (status, _) = post(&client, &relay.url(), Some(SECRET), fixture(fixture_name)).await;
        assert_eq!(status, 200);
    }
    post(
        &client,
        &relay.url(),
        Some(SECRET),
        br#"{"name":"Sarah Johnson"}"#.to_vec(),
    )
    .await;
    post(
        &client,
        &relay.url(),
        Some("not-the-secret"),
        fixture("visitor_created.json"),
    )
    .await;
    eventually(
        "deliveries and dead letters",
        Duration::from_secs(30),
        async || (ok.count() >= 3 && rejecting.count() >= 3).then_some(()),
    )
    .await;
    relay.sigterm();
    let exit = relay.child.wait().unwrap();
    assert!(exit.success());
    // The reader thread has seen EOF once the process is gone.
    eventually("the log to be read", Duration::from_secs(10), async || {
        relay.stderr_text().contains("stopped").then_some(())
    })
    .await;
    relay.stderr.lock().unwrap().clone()
}

const FORBIDDEN: [&str; 10] = [
    SECRET,
    TARGET_SECRET,
    "hunter2",
    "not-the-secret",
    "Sarah",
    "sarah@example.com",
    "Johnson",
    "555 123",
    "Zoë",
    "zoe@exämple.com",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_level_logs_hold_no_secret_and_no_personal_data() {
    let lines = full_run("trace", &[]).await;
    assert!(!lines.is_empty());
    for line in &lines {
        for needle in FORBIDDEN {
            assert!(!line.contains(needle), "log line leaks {needle:?}: {line}");
            // Also as a byte list, the way sled's trace output prints values.
            let bytes = format!("{:?}", needle.as_bytes());
            let bytes = bytes.trim_start_matches('[').trim_end_matches(']');
            assert!(
                !line.contains(bytes),
                "log line leaks {needle:?} as bytes: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_state_changes_only() {
    let lines = full_run("info", &["--log-format", "json"]).await;
    let mut messages = Vec::new();
    for line in &lines {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            json["level"].is_string() && json["timestamp"].is_string(),
            "{line}"
        );
        messages.push(json["message"].as_str().unwrap_or_default().to_owned());
    }
    for wanted in [
        "ingest listening",
        "delivering",
        "delivery dead-lettered",
        "shutting down",
        "stopped; the log is flushed",
    ] {
        assert!(
            messages.iter().any(|m| m.starts_with(wanted)),
            "no {wanted:?} line in {messages:#?}"
        );
    }
    // Not a line per request: 5 requests and 6 deliveries made far fewer lines.
    assert!(
        lines.len() < 15,
        "{} lines at info for a handful of requests: {messages:#?}",
        lines.len()
    );
    for line in &lines {
        for needle in FORBIDDEN {
            assert!(!line.contains(needle), "log line leaks {needle:?}: {line}");
        }
    }
}
