//! What a target is sent beyond the event, as receivers that check it see
//! it: extra headers (a CRM that wants a bearer token), status rules
//! (`retry_on`, `delivered_on`), Standard Webhooks signatures verified by
//! the specification's own reference library (PyPI `standardwebhooks`, run
//! by `tests/fixtures/standardwebhooks_verify.py`), and `send-test` through
//! all of it. Secrets never show in logs, metrics, `check-config` output or
//! dead-letter reasons.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::common::cli::{args, stdout};
use crate::common::receiver::{Received, Receiver, Reply, first_then, wait_for_requests};
use crate::common::*;
use leadflo_relay::config::{Format, HeaderSource, Signing, TargetConfig};

/// A CRM's API token (HubSpot style), sent as `Authorization: Bearer …`.
const TOKEN: &str = "pat-na1-7f3e9c2a-d41b-4e8f-crm-token";
/// The signing secret every signed target here uses.
const SIGNING_SECRET: &str = "whsec_q3dyvLY9M3CmkxXRYIapZlqPvbZaV1Rf5aL0tDAdHZY=";
/// Its key, as it would leak if it did.
const SIGNING_KEY_BASE64: &str = "q3dyvLY9M3CmkxXRYIapZlqPvbZaV1Rf5aL0tDAdHZY";

/// A target with quick retries, so tests see several attempts in seconds.
fn target(name: &str, url: &str) -> TargetConfig {
    let mut target = TargetConfig::new(name, url);
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "2s".parse().unwrap();
    target.timeout = "5s".parse().unwrap();
    target
}

/// Adds `authorization = { file = …, prefix = "Bearer " }` to `target`,
/// with [`TOKEN`] in a file under `dir`.
fn with_bearer_file(mut target: TargetConfig, dir: &Path) -> TargetConfig {
    let file = dir.join(format!("{}-token", target.name));
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    target.headers.insert(
        "authorization".into(),
        HeaderSource::File {
            file,
            prefix: "Bearer ".into(),
        },
    );
    target
}

/// Signs `target`'s deliveries with [`SIGNING_SECRET`], kept in a file
/// under `dir`.
fn signed(mut target: TargetConfig, dir: &Path) -> TargetConfig {
    let file = dir.join(format!("{}-signing", target.name));
    std::fs::write(&file, SIGNING_SECRET).unwrap();
    target.signing = Some(Signing::StandardWebhooks);
    target.signing_secret_file = Some(file);
    target
}

/// A CRM that answers 401, as HubSpot does, unless the request carries
/// `Authorization: Bearer` [`TOKEN`].
fn bearer_required(_: usize, request: &Received) -> Reply {
    if request.header("authorization") == format!("Bearer {TOKEN}") {
        Reply::ok()
    } else {
        Reply::status(401).body(r#"{"status":"error","category":"INVALID_AUTHENTICATION"}"#)
    }
}

/// A receiver that wants the bearer token and a signature the reference
/// library accepts: 401 without the token, 400 (with the library's
/// reason) for a bad signature.
fn bearer_and_signature_required(n: usize, request: &Received) -> Reply {
    let reply = bearer_required(n, request);
    if reply.status != 200 {
        return reply;
    }
    match verify(SIGNING_SECRET, request) {
        Ok(()) => Reply::ok(),
        Err(why) => Reply::status(400).body(&why),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---- the reference verifier ---------------------------------------------------

fn verifier_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/standardwebhooks_verify.py")
}

/// Whether the reference library can be run; if not, says (uncaptured)
/// that the test is skipped. `LEADFLO_REQUIRE_STANDARDWEBHOOKS=1` (set by
/// .ci/run, which installs it) turns a missing library into a failure.
fn reference_library() -> bool {
    let checked = Command::new("python3")
        .arg(verifier_script())
        .arg("--check")
        .output();
    let why = match checked {
        Ok(output) if output.status.success() => return true,
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Err(err) => format!("python3 does not run: {err}"),
    };
    assert!(
        std::env::var_os("LEADFLO_REQUIRE_STANDARDWEBHOOKS").is_none(),
        "the Standard Webhooks reference library is required (LEADFLO_REQUIRE_STANDARDWEBHOOKS \
         is set) but cannot be used: {why}"
    );
    // Written to the real stderr, past the test harness's capture.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: the signature checks need the Standard Webhooks reference library ({why}); \
         `python3 -m pip install standardwebhooks` (.ci/run installs it)"
    );
    false
}

/// Verifies `request` (its headers and exact body bytes) with the
/// reference library; `Err` holds the library's reason.
fn verify(secret: &str, request: &Received) -> Result<(), String> {
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value.into())
        })
        .collect();
    let input = serde_json::json!({
        "secret": secret,
        "headers": headers,
        "body": STANDARD.encode(&request.body),
    });
    let mut child = Command::new("python3")
        .arg(verifier_script())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("python3 does not run: {err}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

// ---- headers ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crm_that_wants_a_bearer_token_gets_it_and_refuses_a_target_without_it() {
    let crm = Receiver::start(bearer_required).await;
    let patient = Receiver::start(bearer_required).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start_with(|c| {
        let mut with_token = with_bearer_file(target("crm", &crm.url()), dir.path());
        with_token.headers.insert(
            "X-Portal-Id".into(),
            HeaderSource::Literal("portal-4711".into()),
        );
        // Without the token: dead-lettered by default, retried with
        // `retry_on = [401]` (until someone fixes the token).
        let mut retried = target("patient", &patient.url());
        retried.retry_on = vec![401];
        c.targets = vec![with_token, target("bare", &crm.url()), retried];
    })
    .await;
    let lead = fixture("visitor_created.json");
    let id = send(&relay, lead.clone()).await;

    let dead = wait_for_dead_letters(&relay.store, "bare", 1).await;
    assert_eq!(
        (dead[0].attempts, dead[0].last_status),
        (1, 401),
        "a 401 is not retried by default"
    );
    assert!(
        dead[0].reason.starts_with("HTTP 401 (not retryable)"),
        "{}",
        dead[0].reason
    );
    eventually("the delivery with the token", WAIT, async || {
        (relay.metrics.attempts("crm", "success") == 1).then_some(())
    })
    .await;
    assert!(relay.store.dead_letters("crm").unwrap().is_empty());

    let requests = crm.requests();
    let with_token = requests
        .iter()
        .find(|r| !r.header("authorization").is_empty())
        .expect("the crm target's request");
    assert_eq!(
        with_token.header("authorization"),
        format!("Bearer {TOKEN}")
    );
    assert_eq!(with_token.header("x-portal-id"), "portal-4711");
    // The relay's own headers are still the relay's.
    assert_eq!(with_token.header("idempotency-key"), id.to_string());
    assert_eq!(with_token.header("x-relay-attempt"), "1");
    assert_eq!(with_token.header("content-type"), "application/json");
    assert_eq!(with_token.body, lead);

    wait_for_requests(&patient, 3, "the 401 to be retried").await;
    assert!(relay.store.dead_letters("patient").unwrap().is_empty());
    assert!(relay.metrics.attempts("patient", "retry") >= 2);
    assert_eq!(relay.store.queued_count("patient"), 1, "the delivery waits");
    let metrics = metrics_text(relay.admin).await;
    assert!(!metrics.contains(TOKEN) && !metrics.contains("portal-4711"));
    relay.stop().await;
}

// ---- status rules -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_retries_401_403_and_404_until_the_target_takes_it() {
    let statuses = [401, 403, 404];
    let crm = Receiver::start(move |n, _| match statuses.get(n) {
        Some(&status) => Reply::status(status),
        None => Reply::ok(),
    })
    .await;
    let relay = TestRelay::start_with(|c| {
        let mut crm_target = target("crm", &crm.url());
        crm_target.retry_on = statuses.to_vec();
        c.targets = vec![crm_target];
    })
    .await;
    let id = send(&relay, fixture("visitor_created.json")).await;
    eventually("the fourth attempt to succeed", WAIT, async || {
        (relay.metrics.attempts("crm", "success") == 1).then_some(())
    })
    .await;
    assert_eq!(relay.metrics.attempts("crm", "retry"), 3);
    assert_eq!(relay.metrics.attempts("crm", "dead"), 0);
    assert!(relay.store.dead_letters("crm").unwrap().is_empty());
    assert_eq!(crm.idempotency_keys(), vec![id.to_string(); 4]);
    wait_for_empty_queue(&relay.store, "crm", "the delivery to be done").await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_on_counts_a_409_as_delivered_and_the_defaults_stay() {
    let exists = || Reply::status(409).body(r#"{"message":"Contact already exists"}"#);
    let crm = Receiver::start(move |_, _| exists()).await;
    let strict = Receiver::start(move |_, _| exists()).await;
    let relay = TestRelay::start_with(|c| {
        let mut crm_target = target("crm", &crm.url());
        crm_target.delivered_on = vec![409];
        c.targets = vec![crm_target, target("strict", &strict.url())];
    })
    .await;
    send(&relay, fixture("visitor_created.json")).await;

    // Without the rule, a 409 is a refusal: one attempt, a dead letter.
    let dead = wait_for_dead_letters(&relay.store, "strict", 1).await;
    assert!(
        dead[0].reason.starts_with("HTTP 409 (not retryable)"),
        "{}",
        dead[0].reason
    );
    // With it, the delivery is done: counted a success, nothing waits,
    // nothing is dead, and it is not tried again.
    wait_for_empty_queue(&relay.store, "crm", "the 409 to finish the delivery").await;
    assert_eq!(relay.metrics.attempts("crm", "success"), 1);
    assert_eq!(relay.metrics.attempts("crm", "dead"), 0);
    assert!(relay.store.dead_letters("crm").unwrap().is_empty());
    wait_for_metric(
        relay.admin,
        r#"leadflo_relay_dead_letters{target="strict"}"#,
        1.0,
        "strict's dead letter in the gauge",
    )
    .await;
    assert_eq!(
        scrape(relay.admin, r#"leadflo_relay_dead_letters{target="crm"}"#).await,
        0.0
    );
    assert_eq!(crm.count(), 1, "a delivered 409 was tried again");
    assert_eq!(strict.count(), 1, "a 409 was retried by default");
    relay.stop().await;
}

// ---- signing ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_and_replay_verifies_with_the_reference_library_under_the_event_id() {
    if !reference_library() {
        return;
    }
    // The first attempt is asked to wait a second: the retry is signed at
    // its own time, a later second than the first attempt's.
    let crm = Receiver::start(first_then(
        1,
        Reply::status(503).header("retry-after", "1"),
        Reply::ok(),
    ))
    .await;
    let slack = Receiver::start(|_, _| Reply::ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start_with(|c| {
        let mut message = signed(target("slack", &slack.url()), dir.path());
        message.format = Format::Slack;
        c.targets = vec![signed(target("crm", &crm.url()), dir.path()), message];
    })
    .await;
    let started = unix_now();
    let lead = fixture("visitor_created.json");
    let id = send(&relay, lead.clone()).await;
    wait_for_requests(&crm, 2, "the first attempt and its retry").await;
    wait_for_requests(&slack, 1, "the Slack message").await;
    let finished = unix_now();

    let attempts = crm.requests();
    for (n, attempt) in attempts.iter().enumerate() {
        let number = n + 1;
        assert_eq!(attempt.body, lead, "attempt {number} sent other bytes");
        verify(SIGNING_SECRET, attempt).unwrap_or_else(|why| {
            panic!("attempt {number} does not verify with the reference library: {why}")
        });
        assert_eq!(
            attempt.header("webhook-id"),
            id.to_string(),
            "attempt {number}"
        );
        assert_eq!(attempt.header("idempotency-key"), id.to_string());
        assert_eq!(attempt.header("x-relay-attempt"), number.to_string());
    }
    let times: Vec<u64> = attempts
        .iter()
        .map(|a| a.header("webhook-timestamp").parse().unwrap())
        .collect();
    assert!(
        times.iter().all(|t| (started..=finished).contains(t)),
        "timestamps {times:?} are not the attempts' times ({started}..={finished})"
    );
    assert!(
        times[1] > times[0],
        "the retry, a second later, carries the first attempt's time: {times:?}"
    );

    // Signed over the bytes sent: the Slack message, not the event.
    let message = &slack.requests()[0];
    assert_ne!(message.body, lead);
    verify(SIGNING_SECRET, message)
        .unwrap_or_else(|why| panic!("the Slack message does not verify: {why}"));
    assert_eq!(message.header("webhook-id"), id.to_string());

    // The verifier is not a rubber stamp: one byte more, or another
    // secret, and it refuses.
    let mut tampered = attempts[1].clone();
    tampered.body.push(b' ');
    assert!(verify(SIGNING_SECRET, &tampered).is_err());
    assert!(verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &attempts[1]).is_err());

    // A replay goes under the same id, signed afresh.
    wait_for_empty_queue(&relay.store, "crm", "the retried delivery to finish").await;
    let response = client()
        .post(format!("http://{}/api/replay", relay.admin))
        .json(&serde_json::json!({ "target": "crm", "ids": [id.to_string()] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    wait_for_requests(&crm, 3, "the replayed delivery").await;
    let replayed = &crm.requests()[2];
    verify(SIGNING_SECRET, replayed)
        .unwrap_or_else(|why| panic!("the replay does not verify: {why}"));
    assert_eq!(replayed.header("webhook-id"), id.to_string());
    relay.stop().await;
}

// ---- configuration errors -----------------------------------------------------

/// Runs the real binary with only the variables in `env` (and the inbound
/// secret), off the async workers.
async fn run(parts: &[&str], env: &[(&str, &str)]) -> Output {
    let parts = args(parts);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(&parts)
            .env("LEADFLO_WEBHOOK_SECRET", SECRET)
            .env_remove("LEADFLO_RELAY_ADMIN_TOKEN")
            .env_remove("RUST_LOG")
            .envs(env)
            .output()
            .expect("the binary runs")
    })
    .await
    .unwrap()
}

fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn header_and_status_mistakes_are_config_errors_naming_the_key() {
    let url = "http://127.0.0.1:9/hook";
    // (url, target keys, [targets.headers] lines, the key, what it says)
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (
            url,
            "",
            "Idempotency-Key = \"mine\"",
            "targets[0].headers.Idempotency-Key",
            "set by the relay itself",
        ),
        (
            url,
            "",
            "x-relay-attempt = \"9\"",
            "targets[0].headers.x-relay-attempt",
            "set by the relay itself",
        ),
        (
            url,
            "",
            "Content-Type = \"text/plain\"",
            "targets[0].headers.Content-Type",
            "set by the relay itself",
        ),
        (
            url,
            "retry_on = [409]\ndelivered_on = [409]",
            "",
            "targets[0].delivered_on",
            "409 is also in retry_on",
        ),
        (url, "retry_on = [200]", "", "targets[0].retry_on", "2xx"),
        (
            url,
            "delivered_on = [204]",
            "",
            "targets[0].delivered_on",
            "2xx",
        ),
        (
            url,
            "retry_on = [100]",
            "",
            "targets[0].retry_on",
            "from 300 to 599",
        ),
        (
            url,
            "",
            "authorization = { env = \"HUBSPOT_TOKEN\", prefx = \"Bearer \" }",
            "targets[0].headers.authorization",
            "prefx",
        ),
        (
            url,
            "",
            "authorization = { env = \"HUBSPOT_TOKEN\", file = \"token\" }",
            "targets[0].headers.authorization",
            "not both",
        ),
        (
            url,
            "",
            "authorization = 42",
            "targets[0].headers.authorization",
            "{ env = \"NAME\" }",
        ),
        (
            url,
            "",
            "Authorization = \"a\"\nauthorization = \"b\"",
            "targets[0].headers.authorization",
            "given twice",
        ),
        (
            url,
            "signing = \"standard-webhooks\"\nsigning_secret_env = \"S\"",
            "webhook-id = \"mine\"",
            "targets[0].headers.webhook-id",
            "set by signing",
        ),
        (
            "http://user:pw@127.0.0.1:9/hook",
            "",
            "authorization = \"Bearer x\"",
            "targets[0].headers.authorization",
            "credentials in url",
        ),
        (
            url,
            "",
            "x-api-key = \"line\\nbreak\"",
            "targets[0].headers.x-api-key",
            "valid header value",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (n, (url, keys, headers, key, says)) in cases.iter().enumerate() {
        let mut toml = format!("[[targets]]\nname = \"crm\"\nurl = \"{url}\"\n{keys}\n");
        if !headers.is_empty() {
            toml.push_str(&format!("[targets.headers]\n{headers}\n"));
        }
        let path = dir.path().join(format!("case-{n}.toml"));
        std::fs::write(&path, &toml).unwrap();
        let output = run(
            &["check-config", "--config", path.to_str().unwrap()],
            &[("HUBSPOT_TOKEN", TOKEN), ("S", SIGNING_SECRET)],
        )
        .await;
        let text = all_output(&output);
        assert_eq!(output.status.code(), Some(1), "accepted:\n{toml}\n{text}");
        assert!(
            text.contains(&format!("`{key}`")) && text.contains(says),
            "for\n{toml}\nexpected key `{key}` and {says:?}, got: {text}"
        );
        assert!(!text.contains("pw@"), "{text}");
    }
}

// ---- secrets stay secret ------------------------------------------------------

/// A configuration with a secret in every place a header or signing secret
/// can come from: a literal, an environment variable, a file.
struct SecretsEverywhere {
    _dir: tempfile::TempDir,
    config: PathBuf,
    env: Vec<(&'static str, &'static str)>,
}

const LITERAL_KEY: &str = "literal-api-key-5c1e";
const FILE_KEY: &str = "file-api-key-9d20";

impl SecretsEverywhere {
    fn new(crm_url: &str, bare_url: &str) -> SecretsEverywhere {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("api-key");
        std::fs::write(&key_file, FILE_KEY).unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[[targets]]\nname = \"crm\"\nurl = \"{crm_url}\"\n\
                 signing = \"standard-webhooks\"\nsigning_secret_env = \"CRM_SIGNING_SECRET\"\n\n\
                 [targets.headers]\n\
                 authorization = {{ env = \"HUBSPOT_TOKEN\", prefix = \"Bearer \" }}\n\
                 x-api-key = {{ file = {key_file:?} }}\n\
                 x-literal-key = \"{LITERAL_KEY}\"\n\n\
                 [[targets]]\nname = \"bare\"\nurl = \"{bare_url}\"\n\n\
                 [targets.headers]\nx-literal-key = \"{LITERAL_KEY}\"\n"
            ),
        )
        .unwrap();
        SecretsEverywhere {
            _dir: dir,
            config,
            env: vec![
                ("HUBSPOT_TOKEN", TOKEN),
                ("CRM_SIGNING_SECRET", SIGNING_SECRET),
            ],
        }
    }
}

const SECRETS: [&str; 5] = [
    TOKEN,
    SIGNING_SECRET,
    SIGNING_KEY_BASE64,
    LITERAL_KEY,
    FILE_KEY,
];

fn assert_no_secret(text: &str, place: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{place} leaks {secret:?}:\n{text}");
    }
}

#[tokio::test]
async fn check_config_names_headers_and_signing_but_shows_no_value() {
    let setup = SecretsEverywhere::new("http://127.0.0.1:9/hook", "http://127.0.0.1:9/bare");
    let output = run(
        &["check-config", "--config", setup.config.to_str().unwrap()],
        &setup.env,
    )
    .await;
    let text = all_output(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(
            "# target crm: url http://127.0.0.1:9/…; format raw; headers authorization, x-api-key, x-literal-key \
             (values redacted); signed (standard-webhooks)"
        ),
        "{text}"
    );
    assert_no_secret(&text, "check-config");

    // Without the variable it names, the header cannot be made: an error
    // that names target, key and variable.
    let output = run(
        &["check-config", "--config", setup.config.to_str().unwrap()],
        &[("CRM_SIGNING_SECRET", SIGNING_SECRET)],
    )
    .await;
    let text = all_output(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("target crm: headers.authorization: environment variable HUBSPOT_TOKEN"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_metrics_and_dead_letters_show_no_header_or_signing_secret() {
    let crm = Receiver::start(bearer_required).await;
    let bare = Receiver::start(bearer_required).await;
    let setup = SecretsEverywhere::new(&crm.url(), &bare.url());
    let dir = tempfile::tempdir().unwrap();
    let mut env = setup.env.clone();
    env.extend([("LEADFLO_WEBHOOK_SECRET", SECRET), ("RUST_LOG", "trace")]);
    let mut relay = RelayProcess::start_with_env(
        &dir.path().join("data"),
        &["--config", setup.config.to_str().unwrap()],
        &env,
    );
    let (status, _) = post(
        &client(),
        &relay.url(),
        Some(SECRET),
        fixture("visitor_created.json"),
    )
    .await;
    assert_eq!(status, 200);
    wait_for_requests(&crm, 1, "the delivery to crm").await;
    assert_eq!(crm.requests()[0].header("x-api-key"), FILE_KEY);
    assert_eq!(crm.requests()[0].header("x-literal-key"), LITERAL_KEY);
    let admin = relay.admin;
    wait_for_metric(
        admin,
        r#"leadflo_relay_dead_letters{target="bare"}"#,
        1.0,
        "the dead letter at bare",
    )
    .await;
    wait_for_metric(
        admin,
        r#"leadflo_relay_delivery_attempts_total{outcome="success",target="crm"}"#,
        1.0,
        "the delivery to crm to count",
    )
    .await;
    assert_no_secret(&metrics_text(admin).await, "/metrics");
    let dead_letters = client()
        .get(format!("http://{admin}/api/dlq"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(dead_letters.contains("HTTP 401"), "{dead_letters}");
    assert_no_secret(&dead_letters, "the dead letters");

    relay.sigterm();
    assert!(relay.child.wait().unwrap().success());
    eventually("the log to be read", Duration::from_secs(10), async || {
        relay.stderr_text().contains("stopped").then_some(())
    })
    .await;
    let log = relay.stderr_text();
    assert!(log.contains("delivery dead-lettered"), "{log}");
    assert_no_secret(&log, "the trace log");
}

// ---- send-test ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_through_the_relay_carries_the_targets_token_and_signature() {
    if !reference_library() {
        return;
    }
    let crm = Receiver::start(bearer_and_signature_required).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![signed(
            with_bearer_file(target("crm", &crm.url()), dir.path()),
            dir.path(),
        )];
    })
    .await;
    let mut config = leadflo_relay::config::Config::default();
    config.server.listen = relay.ingest;
    config.server.admin_listen = relay.admin;
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let output = run(&["send-test", "--config", path.to_str().unwrap()], &[]).await;
    let text = all_output(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("target crm: delivered"), "{text}");
    assert_eq!(crm.count(), 1);
    assert_no_secret(&text, "send-test");
    relay.stop().await;
}

/// A configuration for `send-test` with no relay running: its ingest and
/// admin addresses refuse connections.
fn direct_config(
    dir: &Path,
    ingest: &RefusingPort,
    admin: &RefusingPort,
    targets: &str,
) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\n\n{targets}",
            ingest.addr, admin.addr
        ),
    )
    .unwrap();
    path
}

fn signed_crm_toml(url: &str) -> String {
    format!(
        "[[targets]]\nname = \"crm\"\nurl = \"{url}\"\n\
         signing = \"standard-webhooks\"\nsigning_secret_env = \"CRM_SIGNING_SECRET\"\n\n\
         [targets.headers]\nauthorization = {{ env = \"HUBSPOT_TOKEN\", prefix = \"Bearer \" }}\n\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_without_a_relay_sends_to_each_target_as_the_relay_would() {
    if !reference_library() {
        return;
    }
    let crm = Receiver::start(bearer_and_signature_required).await;
    let bare = Receiver::start(bearer_required).await;
    let chats = Receiver::start(|_, _| Reply::ok()).await;
    let (ingest, admin) = (RefusingPort::new(), RefusingPort::new());
    let dir = tempfile::tempdir().unwrap();
    let targets = format!(
        "{}[[targets]]\nname = \"bare\"\nurl = \"{}\"\nretry_on = [401]\n\n\
         [[targets]]\nname = \"chats\"\nurl = \"{}\"\nevents = [\"conversation_ended\"]\n",
        signed_crm_toml(&crm.url()),
        bare.url(),
        chats.url()
    );
    let path = direct_config(dir.path(), &ingest, &admin, &targets);
    let env = [
        ("HUBSPOT_TOKEN", TOKEN),
        ("CRM_SIGNING_SECRET", SIGNING_SECRET),
    ];
    let output = run(&["send-test", "--config", path.to_str().unwrap()], &env).await;
    let text = all_output(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a target that refused the test should fail the command: {text}"
    );
    assert!(text.contains("no relay answers at"), "{text}");
    assert!(text.contains("target crm: delivered (HTTP 200)"), "{text}");
    assert!(
        text.contains("target bare: not delivered: HTTP 401 (the relay would retry it)"),
        "{text}"
    );
    assert!(
        text.contains("target chats: not subscribed to this event type"),
        "{text}"
    );
    assert!(
        text.contains("1 target(s) did not accept the test event"),
        "{text}"
    );
    assert_no_secret(&text, "send-test");
    assert_eq!(chats.count(), 0);
    let at_crm = &crm.requests()[0];
    assert_eq!(at_crm.body, fixture("visitor_created.json"));
    let id = at_crm.header("webhook-id");
    assert_eq!(id, at_crm.header("idempotency-key"));
    let id: u64 = id.parse().expect("the test event's id is a decimal number");
    assert!(
        id < leadflo_relay::node::FIRST_NODE_ID,
        "test id {id} could be a real event's"
    );

    // Every target takes it: success, and JSON on request.
    let path = direct_config(dir.path(), &ingest, &admin, &signed_crm_toml(&crm.url()));
    let output = run(
        &["send-test", "--json", "--config", path.to_str().unwrap()],
        &env,
    )
    .await;
    let text = all_output(&output);
    assert!(output.status.success(), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("--json printed non-JSON ({e}): {text}"));
    assert_eq!(report["mode"], "direct");
    assert_eq!(report["targets"]["crm"]["result"], "delivered");
    assert_eq!(report["targets"]["crm"]["status"], 200);
    assert_eq!(crm.requests()[1].header("webhook-id"), report["id"]);
}
