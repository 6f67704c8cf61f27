//! The command line as a user meets it: help, bad flags, config errors that
//! name file and key, the missing-secret refusal, and redaction.

use std::process::{Command, Output};

use crate::common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("LEADFLO_WEBHOOK_SECRET")
        .env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("the binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn help_documents_every_serve_flag() {
    let output = run(&["serve", "--help"], &[]);
    assert!(output.status.success());
    let help = text(&output);
    for flag in [
        "--config",
        "--listen",
        "--admin-listen",
        "--data-dir",
        "--allow-unauthenticated",
        "--log-format",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}:\n{help}");
    }
}

#[test]
fn unknown_flags_exit_2_with_a_clear_message() {
    let output = run(&["serve", "--secret", "x"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).contains("unexpected argument '--secret'"),
        "{}",
        text(&output)
    );
    let output = run(&["serve", "--listen", "not-an-address"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).contains("not-an-address"),
        "{}",
        text(&output)
    );
}

#[test]
fn serve_refuses_to_start_without_a_secret_and_says_how_to_set_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let output = run(
        &["serve", "--data-dir", data, "--listen", "127.0.0.1:0"],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let message = text(&output);
    assert!(message.contains("LEADFLO_WEBHOOK_SECRET"), "{message}");
    assert!(message.contains("--allow-unauthenticated"), "{message}");
}

#[tokio::test]
async fn unauthenticated_mode_warns_loudly_and_accepts_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start_with_env(dir.path(), &["--allow-unauthenticated"], &[]);
    let (status, json) = post(
        &client(),
        &relay.url(),
        None,
        fixture("conversation_ended.json"),
    )
    .await;
    assert_eq!(status, 200, "{json}");
    assert!(
        relay.stderr_text().contains("UNAUTHENTICATED MODE"),
        "{}",
        relay.stderr_text()
    );
}

#[test]
fn check_config_names_file_key_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, "[server]\nmax_body_bytes = \"big\"\n").unwrap();
    let output = run(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("LEADFLO_WEBHOOK_SECRET", "s")],
    );
    assert_eq!(output.status.code(), Some(1));
    let message = text(&output);
    assert!(message.contains("relay.toml"), "{message}");
    assert!(message.contains("server.max_body_bytes"), "{message}");
    assert!(message.contains("expected"), "{message}");

    std::fs::write(
        &path,
        "[storage]\ndata_dir = \"/tmp\"\nretention_days = 3\n",
    )
    .unwrap();
    let output = run(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("LEADFLO_WEBHOOK_SECRET", "s")],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("retention_days"),
        "{}",
        text(&output)
    );

    let output = run(
        &["check-config", "--config", "/nonexistent/relay.toml"],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("/nonexistent/relay.toml"),
        "{}",
        text(&output)
    );
}

/// A target whose secret cannot be read fails `check-config` as it fails
/// `serve` (it used to pass the check, and the relay then did not start).
#[test]
fn check_config_reads_each_targets_secret_like_serve_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "[[targets]]\nname = \"crm\"\nurl = \"http://127.0.0.1:9/hook\"\n\
         secret_env = \"LEADFLO_TEST_CRM_SECRET_UNSET\"\n",
    )
    .unwrap();
    let secret = [("LEADFLO_WEBHOOK_SECRET", "inbound-secret-value")];
    let output = run(
        &["check-config", "--config", path.to_str().unwrap()],
        &secret,
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let said = text(&output);
    assert!(
        said.contains("crm") && said.contains("LEADFLO_TEST_CRM_SECRET_UNSET"),
        "{said}"
    );
    let mut with_it = secret.to_vec();
    with_it.push(("LEADFLO_TEST_CRM_SECRET_UNSET", "crm-secret-value"));
    let output = run(
        &["check-config", "--config", path.to_str().unwrap()],
        &with_it,
    );
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn check_config_prints_the_effective_config_with_overrides_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "super-secret-value\n").unwrap();
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:7000\"\nmax_body_bytes = 4096\n[auth]\nsecret_file = {:?}\n",
            secret_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let output = run(
        &[
            "check-config",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:7001",
        ],
        &[("LEADFLO_WEBHOOK_SECRET", "env-secret-value")],
    );
    assert!(output.status.success(), "{}", text(&output));
    let printed = text(&output);
    assert!(
        printed.contains("listen = \"127.0.0.1:7001\""),
        "flag must win over file:\n{printed}"
    );
    assert!(printed.contains("max_body_bytes = 4096"), "{printed}");
    assert!(
        printed.contains("inbound secret: set (from file"),
        "{printed}"
    );
    assert!(
        !printed.contains("super-secret-value") && !printed.contains("env-secret-value"),
        "{printed}"
    );
    // The printed configuration is itself a valid config file.
    let body: String = printed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    leadflo_relay::config::Config::parse(&body, "printed").expect("check-config output parses");
}

#[test]
fn the_example_config_is_valid_and_matches_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/relay.example.toml");
    let config = leadflo_relay::config::Config::load(std::path::Path::new(path)).unwrap();
    assert_eq!(
        config,
        leadflo_relay::config::Config::default(),
        "relay.example.toml drifted"
    );
    let output = run(
        &["check-config", "--config", path],
        &[("LEADFLO_WEBHOOK_SECRET", "s")],
    );
    assert!(output.status.success(), "{}", text(&output));
}

#[tokio::test]
async fn secret_rotation_accepts_the_previous_secret_until_it_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[auth]\nprevious_secret_env = \"LEADFLO_WEBHOOK_SECRET_PREVIOUS\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    // The previous secret named but not set: refuse to start rather than
    // silently reject the senders still using it.
    let output = run(
        &["check-config", "--config", &config],
        &[("LEADFLO_WEBHOOK_SECRET", "new")],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).contains("LEADFLO_WEBHOOK_SECRET_PREVIOUS"),
        "{}",
        text(&output)
    );

    let relay = RelayProcess::start_with_env(
        &dir.path().join("data"),
        &["--config", &config],
        &[
            ("LEADFLO_WEBHOOK_SECRET", SECRET),
            ("LEADFLO_WEBHOOK_SECRET_PREVIOUS", "old-secret"),
        ],
    );
    let client = client();
    for (secret, want) in [(SECRET, 200), ("old-secret", 200), ("older-secret", 401)] {
        let (status, json) = post(
            &client,
            &relay.url(),
            Some(secret),
            fixture("visitor_created.json"),
        )
        .await;
        assert_eq!(status, want, "{secret}: {json}");
    }
}
