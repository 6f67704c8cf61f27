//! The real binary's operator commands, run from tests: output, exit
//! status, and JSON.

use std::process::{Command, Output};

use super::{SECRET, binary};

/// Runs the CLI off the async workers.
pub async fn cli(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(&args)
            .env("LEADFLO_WEBHOOK_SECRET", SECRET)
            .env_remove("LEADFLO_RELAY_ADMIN_TOKEN")
            .output()
            .expect("the binary runs")
    })
    .await
    .unwrap()
}

pub fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

pub fn json(output: Output) -> serde_json::Value {
    let text = ok(output);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("--json printed non-JSON ({e}): {text}"))
}
