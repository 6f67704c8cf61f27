//! The relay's own log output, from the real binary: JSON on request, one
//! line per state change at info, and never a secret or personal data, even
//! with every crate logging at trace level.

use std::time::Duration;

use crate::common::receiver::{Receiver, Reply};
use crate::common::*;

const TARGET_SECRET: &str = "target-secret-value-42";

/// Runs a full cycle (start, ingest, deliver, a dead letter, a bad body,
/// a wrong secret, shutdown) with `log_args` and returns every log line;
/// two targets get rendered bodies (a Slack message, a template).
async fn full_run(rust_log: &str, log_args: &[&str]) -> Vec<String> {
    let ok = Receiver::start(|_, _| Reply::ok()).await;
    let rejecting =
        Receiver::start(|_, _| Reply::status(400).body(r#"{"error":"sarah@example.com exists"}"#))
            .await;
    // Formatted targets: the rendered bodies hold the same personal data.
    let slack = Receiver::start(|_, _| Reply::ok()).await;
    let templated =
        Receiver::start(|_, _| Reply::status(422).body(r#"{"error":"Sarah Johnson exists"}"#))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let secret_file = dir.path().join("target-secret");
    std::fs::write(&secret_file, TARGET_SECRET).unwrap();
    std::fs::write(
        &config,
        format!(
            "[[targets]]\nname = \"crm\"\nurl = \"{}\"\nsecret_file = {:?}\n\n\
             [[targets]]\nname = \"strict\"\nurl = \"{}\"\n\n\
             [[targets]]\nname = \"slack\"\nurl = \"{}\"\nformat = \"slack\"\n\n\
             [[targets]]\nname = \"templated\"\nurl = \"{}\"\nformat = \"template\"\n\
             template = '{{\"event\": {{{{ event|tojson }}}}, \"lead\": {{{{ payload|tojson }}}}}}'\n",
            ok.url().replace("http://", "http://user:hunter2@"),
            secret_file.to_str().unwrap(),
            rejecting.url(),
            slack.url(),
            templated.url()
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
        async || {
            let all = [&ok, &rejecting, &slack, &templated];
            all.iter().all(|r| r.count() >= 3).then_some(())
        },
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
    // Not a line per request or per delivery: only state changes (a
    // target's start, a dead letter, the relay's own start and stop).
    let state_changes = [
        "backlog",
        "delivering",
        "ingest listening",
        "admin listening",
        "delivery dead-lettered",
        "shutting down",
        "stopping the dispatchers",
        "stopped",
    ];
    let others: Vec<&String> = messages
        .iter()
        .filter(|m| !state_changes.iter().any(|s| m.starts_with(s)))
        .collect();
    assert!(
        others.is_empty(),
        "lines that are not state changes at info: {others:#?}"
    );
    for line in &lines {
        for needle in FORBIDDEN {
            assert!(!line.contains(needle), "log line leaks {needle:?}: {line}");
        }
    }
}

/// `logging.level` errors: `check-config` and `serve` both refuse a level
/// they cannot use, naming the file, the key and the value, and a typo
/// (`debugg`) does not leave a relay running that prints no log line at all.
#[test]
fn a_bad_logging_level_is_refused_naming_file_key_and_value() {
    use std::process::{Command, Stdio};
    for level in ["info,leadflo_relay=loud", "debugg"] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, format!("[logging]\nlevel = {level:?}\n")).unwrap();
        let config = config.to_str().unwrap();
        let data = dir.path().join("data");
        for args in [
            vec!["check-config", "--config", config],
            vec![
                "serve",
                "--config",
                config,
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
            ],
        ] {
            let mut child = Command::new(binary())
                .args(&args)
                .env("LEADFLO_WEBHOOK_SECRET", SECRET)
                .env_remove("RUST_LOG")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let still_running = child.try_wait().unwrap().is_none();
            if still_running {
                child.kill().unwrap();
            }
            let output = child.wait_with_output().unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                !still_running && !output.status.success(),
                "{} accepted logging.level = {level:?} (running: {still_running}):\n{said}",
                args[0]
            );
            assert!(
                said.contains(config) && said.contains("logging.level") && said.contains(level),
                "{} does not name file, key and value:\n{said}",
                args[0]
            );
        }
    }
}

/// The dependency caps hold against a directive for one of a dependency's
/// modules too (`sled::tree=trace` is more specific than the cap
/// `sled=info`, and used to win): sled's trace of a batch prints its values,
/// such as a dead letter's reason quoting the target's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_directives_do_not_lift_the_dependency_caps() {
    let lines = full_run("trace,sled::tree=trace,reqwest::connect=trace", &[]).await;
    for line in &lines {
        for needle in FORBIDDEN {
            let bytes = format!("{:?}", needle.as_bytes());
            let bytes = bytes.trim_start_matches('[').trim_end_matches(']');
            assert!(
                !line.contains(needle) && !line.contains(bytes),
                "log line leaks {needle:?}: {}",
                &line[..line.len().min(300)]
            );
        }
    }
    for line in &lines {
        assert!(
            !line.contains(" sled::") && !line.contains(" reqwest::"),
            "a capped dependency logs below info: {line}"
        );
    }
}
