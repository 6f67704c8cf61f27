//! Reload under a running relay (the real binary, its configuration file
//! and secret files rewritten): targets added, removed and changed, secret
//! rotation, settings that need a restart, and a bad file that changes
//! nothing, while a sender posts and every POST is answered 200.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::cli::*;
use crate::common::load::*;
use crate::common::receiver::{Receiver, Reply};
use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A relay process with a configuration file the test rewrites.
struct Reloadable {
    relay: RelayProcess,
    config: PathBuf,
    _work: tempfile::TempDir,
}

impl Reloadable {
    fn start(config_text: &str) -> Reloadable {
        Reloadable::start_with_env(config_text, &[])
    }

    /// With the inbound secret and `env` set.
    fn start_with_env(config_text: &str, env: &[(&str, &str)]) -> Reloadable {
        let work = tempfile::tempdir().unwrap();
        let config = work.path().join("relay.toml");
        std::fs::write(&config, config_text).unwrap();
        let relay = Reloadable::serve(work.path(), env);
        Reloadable {
            relay,
            config,
            _work: work,
        }
    }

    fn serve(work: &Path, env: &[(&str, &str)]) -> RelayProcess {
        let config = work.join("relay.toml");
        let mut env = env.to_vec();
        env.push(("LEADFLO_WEBHOOK_SECRET", SECRET));
        RelayProcess::start_with_env(
            &work.join("data"),
            &["--config", config.to_str().unwrap()],
            &env,
        )
    }

    fn dir(&self) -> &Path {
        self.config.parent().unwrap()
    }

    fn admin(&self) -> String {
        format!("http://{}", self.relay.admin)
    }

    /// Rewrites the file and runs `leadflo-relay reload --json`.
    async fn reload(&self, config_text: &str) -> std::process::Output {
        std::fs::write(&self.config, config_text).unwrap();
        cli(args(&["reload", "--json", "--admin", &self.admin()])).await
    }

    /// Rewrites the file and sends SIGHUP.
    fn sighup(&self, config_text: &str) {
        std::fs::write(&self.config, config_text).unwrap();
        let hup = Command::new("kill")
            .args(["-HUP", &self.relay.child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
    }

    async fn reloads(&self, result: &str) -> f64 {
        let sample = format!("leadflo_relay_config_reloads_total{{result=\"{result}\"}}");
        scrape(self.relay.admin, &sample).await
    }

    async fn stats(&self) -> serde_json::Value {
        json(cli(args(&["stats", "--json", "--admin", &self.admin()])).await)
    }
}

fn target(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[targets]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n\
         [targets.retry]\ninitial = \"100ms\"\nmax_interval = \"300ms\"\n\n"
    )
}

fn conversation(n: usize) -> Vec<u8> {
    format!(r#"{{"event":"conversation_ended","data":{{"conversationId":"conv_{n}"}}}}"#)
        .into_bytes()
}

/// The first reload's cut, as the relay logs it: every event above it
/// was committed for the new targets.
fn cut_in(stderr: &str) -> u64 {
    stderr
        .split("cut=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no cut in the log:\n{stderr}"))
}

/// How many of `receiver`'s requests carry `body`.
fn got(receiver: &Receiver, body: &[u8]) -> usize {
    receiver
        .requests()
        .iter()
        .filter(|r| r.body == body)
        .count()
}

async fn delivered(receiver: &Receiver, body: Vec<u8>, what: &str) {
    eventually(what, WAIT, async || {
        (got(receiver, &body) > 0).then_some(())
    })
    .await;
}

async fn send_one(relay: &RelayProcess, body: Vec<u8>) {
    let (status, answer) = post(&client(), &relay.url(), Some(SECRET), body).await;
    assert_eq!(status, 200, "{answer}");
}

/// Targets added, removed, changed in place (url) and given other event
/// types, by SIGHUP and by `leadflo-relay reload`, while a sender posts:
/// every POST is answered 200, each target gets what it should from the
/// next attempts on, and a removed target keeps its backlog as a restart
/// would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_changes_and_removes_targets_without_refusing_a_lead() {
    let (crm, crm2, added, chats) = (
        Receiver::start(|_, _| Reply::ok()).await,
        Receiver::start(|_, _| Reply::ok()).await,
        Receiver::start(|_, _| Reply::ok()).await,
        Receiver::start(|_, _| Reply::ok()).await,
    );
    let down = RefusingPort::new();
    let down_url = format!("http://{}/hook", down.addr);
    let before = [
        target("crm", &crm.url(), ""),
        target("archive", &down_url, ""),
        target("chats", &chats.url(), "events = [\"conversation_ended\"]"),
    ]
    .concat();
    let relay = Reloadable::start(&before);
    let sender = Sender::start(relay.relay.url(), 0, 50_000, 2);
    sender.wait_for(100).await;
    // The archive target is down: a backlog waits for it.
    send_one(&relay.relay, lead(1_000_001)).await;
    delivered(&crm, lead(1_000_001), "the marker lead at crm").await;

    // By SIGHUP: crm moves to a new URL, `added` appears, the archive goes,
    // and `chats` takes leads instead of conversations.
    let after = [
        target("crm", &crm2.url(), ""),
        target("added", &added.url(), ""),
        target("chats", &chats.url(), "events = [\"visitor_created\"]"),
    ]
    .concat();
    let before_removal = sender.sent();
    relay.sighup(&after);
    eventually("the SIGHUP reload", WAIT, async || {
        (relay.reloads("ok").await >= 1.0).then_some(())
    })
    .await;
    let cut = cut_in(&relay.relay.stderr_text());
    sender.wait_for(100).await;
    send_one(&relay.relay, lead(1_000_002)).await;
    send_one(&relay.relay, conversation(7)).await;
    delivered(&crm2, lead(1_000_002), "a lead at crm's new URL").await;
    delivered(&added, lead(1_000_002), "a lead at the added target").await;
    delivered(
        &chats,
        lead(1_000_002),
        "a lead at chats, which now takes leads",
    )
    .await;
    delivered(
        &added,
        conversation(7),
        "a conversation at the added target",
    )
    .await;
    assert_eq!(
        got(&crm, &lead(1_000_002)),
        0,
        "crm's old URL still got leads"
    );
    assert_eq!(
        got(&chats, &conversation(7)),
        0,
        "chats still got conversations"
    );

    // The archive keeps what waited for it, as a restart would show.
    let archive = |stats: &serde_json::Value| {
        stats["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "archive")
            .cloned()
            .unwrap_or_else(|| panic!("archive not in stats: {stats}"))
    };
    let online = archive(&relay.stats().await);
    assert_eq!(online["configured"], false, "{online}");
    let waiting = online["backlog"].as_u64().unwrap();
    assert!(waiting > 100, "the archive's backlog was dropped: {online}");
    let metrics = metrics_text(relay.relay.admin).await;
    assert!(
        !metrics.contains("leadflo_relay_backlog_events{target=\"archive\"}"),
        "a removed target's gauges stay, frozen"
    );

    // Re-added (its URL now answers), the archive gets what waited for it
    // before it was removed, and what comes after, not what came between.
    let between = lead(1_000_003);
    send_one(&relay.relay, between.clone()).await;
    let mut down = down;
    let archive_receiver = Receiver::start_on(down.release(), |_, _| Reply::ok()).await;
    let report = json(
        relay
            .reload(&[after.as_str(), &target("archive", &down_url, "")].concat())
            .await,
    );
    assert_eq!(report["added"], serde_json::json!(["archive"]), "{report}");
    send_one(&relay.relay, lead(1_000_004)).await;
    let answers = sender.finish().await;
    let failed = refused(&answers);
    assert!(
        failed.is_empty(),
        "POSTs failed across the reloads: {failed:?}"
    );
    eprintln!("reloads under load: {} POSTs, none refused", answers.len());
    // Every lead accepted above the SIGHUP reload's cut reached the added
    // target and chats (which took leads from then on), none below it the
    // added target.
    let above: Vec<Answer> = answers
        .iter()
        .filter(|a| matches!(a, Answer::Accepted { id, .. } if id.0 > cut))
        .cloned()
        .collect();
    assert_every_lead_delivered_once_per_key(&above, &added).await;
    assert_every_lead_delivered_once_per_key(&above, &chats).await;
    assert!(
        added.requests().iter().all(|r| {
            r.header("idempotency-key")
                .parse::<u64>()
                .is_ok_and(|id| id > cut)
        }),
        "the added target got events from before it was added"
    );
    delivered(
        &archive_receiver,
        lead(1_000_004),
        "a lead after the archive came back",
    )
    .await;
    for answer in &answers[..before_removal] {
        if let Answer::Accepted { body, id } = answer {
            delivered(
                &archive_receiver,
                body.clone(),
                &format!("event {id}, which waited for the archive"),
            )
            .await;
        }
    }
    assert_eq!(
        got(&archive_receiver, &between),
        0,
        "a lead accepted while the archive was removed was delivered to it"
    );

    let Reloadable {
        mut relay, _work, ..
    } = relay;
    relay.sigterm();
    assert_eq!(relay.wait_for_exit(WAIT).code(), Some(0));
}

/// A file that does not load, or a secret file that cannot be read,
/// changes nothing: `reload` exits 1 saying which file, key and value, the
/// failure is counted, and the relay goes on with its configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_running_configuration_and_says_why() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let good = target("crm", &crm.url(), "");
    let relay = Reloadable::start(&good);

    let bad_value = format!("[server]\nrequest_timeout = \"5 sec\"\n\n{good}");
    let output = relay.reload(&bad_value).await;
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("relay.toml")
            && said.contains("server.request_timeout")
            && said.contains("5 sec"),
        "the error does not name file, key and value: {said}"
    );

    let missing = relay.dir().join("no-such-secret");
    let unreadable = format!(
        "[auth]\nsecret_file = \"{}\"\n\n{}",
        missing.display(),
        target("other", &crm.url(), "")
    );
    let output = relay.reload(&unreadable).await;
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("no-such-secret"), "{said}");

    assert_eq!(relay.reloads("failed").await, 2.0);
    assert_eq!(relay.reloads("ok").await, 0.0);
    // Still the old secret and the old target.
    send_one(&relay.relay, lead(1)).await;
    delivered(&crm, lead(1), "a lead at the target kept").await;
    let names: Vec<String> = relay.stats().await["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["crm"]);
    assert!(
        relay.relay.stderr_text().contains("reload failed"),
        "the failure is not logged"
    );
}

/// The documented rotation (docs/operations.md): new secret in `auth.secret_file`, old one in
/// `auth.previous_secret_file`, reload; both are accepted; drop the
/// previous one, reload; only the new one is. No restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_takes_two_reloads_and_no_restart() {
    let work = tempfile::tempdir().unwrap();
    let (current, previous) = (work.path().join("secret"), work.path().join("previous"));
    std::fs::write(&current, "old-secret\n").unwrap();
    let with = |previous: Option<&Path>| {
        let mut text = format!("[auth]\nsecret_file = \"{}\"\n", current.display());
        if let Some(path) = previous {
            text += &format!("previous_secret_file = \"{}\"\n", path.display());
        }
        text
    };
    let relay = Reloadable::start(&with(None));
    let pid = relay.relay.child.id();
    let status = async |secret: &str| {
        post(&client(), &relay.relay.url(), Some(secret), lead(1))
            .await
            .0
    };
    assert_eq!(status("old-secret").await, 200);

    std::fs::write(&previous, "old-secret\n").unwrap();
    std::fs::write(&current, "new-secret\n").unwrap();
    let report = json(relay.reload(&with(Some(&previous))).await);
    assert_eq!(report["secrets_changed"], true, "{report}");
    assert_eq!(status("new-secret").await, 200, "the new secret is refused");
    assert_eq!(
        status("old-secret").await,
        200,
        "the previous secret is refused mid-rotation"
    );

    let report = json(relay.reload(&with(None)).await);
    assert_eq!(report["secrets_changed"], true, "{report}");
    assert_eq!(status("new-secret").await, 200);
    assert_eq!(
        status("old-secret").await,
        401,
        "the old secret is still accepted"
    );
    assert_eq!(relay.relay.child.id(), pid);
    let logs = relay.relay.stderr_text();
    assert!(
        !logs.contains("old-secret") && !logs.contains("new-secret"),
        "a secret was logged"
    );
}

/// Keys that cannot change in place are reported as needing a restart,
/// and the running relay keeps their old values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_change_in_place_are_reported() {
    let relay = Reloadable::start("[server]\nmax_body_bytes = 1048576\n");
    let report = json(
        relay
            .reload("[server]\nmax_body_bytes = 10\n\n[storage]\ncache_capacity_bytes = 16777216\n")
            .await,
    );
    assert_eq!(
        report["needs_restart"],
        serde_json::json!(["server.max_body_bytes", "storage.cache_capacity_bytes"]),
        "{report}"
    );
    // Still the old limit: a lead of ~60 bytes is taken.
    send_one(&relay.relay, lead(1)).await;
    let text = ok(cli(args(&["reload", "--admin", &relay.admin()])).await);
    assert!(
        text.contains("needs a restart: server.max_body_bytes"),
        "{text}"
    );
}

/// The concurrency and rate limits hold across reloads that change
/// targets in place and give them other event types, with attempts in
/// flight: `crm` at two attempts at a time (each takes 300 ms), `rated` at
/// five starts a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_reloads_with_attempts_in_flight() {
    let slow = Duration::from_millis(300);
    let crm = Receiver::start(move |_, _| Reply::ok().after(slow)).await;
    let rated = Receiver::start(|_, _| Reply::ok()).await;
    let config = |extra: &str| {
        [
            target("crm", &crm.url(), &format!("concurrency = 2\n{extra}")),
            target(
                "rated",
                &rated.url(),
                &format!("rate_per_second = 5.0\n{extra}"),
            ),
        ]
        .concat()
    };
    let relay = Reloadable::start(&config(""));
    for n in 0..30 {
        send_one(&relay.relay, lead(n)).await;
    }
    eventually("attempts in flight", WAIT, async || {
        (crm.count() >= 2).then_some(())
    })
    .await;
    ok(relay.reload(&config("timeout = \"9s\"")).await);
    eventually("more attempts", WAIT, async || {
        (crm.count() >= 8).then_some(())
    })
    .await;
    ok(relay
        .reload(&config("timeout = \"9s\"\nevents = [\"visitor_created\"]"))
        .await);
    for receiver in [&crm, &rated] {
        eventually("every lead delivered", WAIT, async || {
            (0..30).all(|n| got(receiver, &lead(n)) > 0).then_some(())
        })
        .await;
    }
    let most_within = |receiver: &Receiver, window: Duration| {
        let starts: Vec<_> = receiver.requests().iter().map(|r| r.at).collect();
        starts
            .iter()
            .map(|&at| {
                starts
                    .iter()
                    .filter(|&&o| o >= at && o < at + window)
                    .count()
            })
            .max()
            .unwrap()
    };
    let overlapping = most_within(&crm, slow);
    assert!(
        overlapping <= 2,
        "{overlapping} attempts overlapped at concurrency = 2"
    );
    // The limiter spaces starts 200 ms apart, also across the dispatcher
    // the second reload started anew; a limiter that started afresh would
    // let one through at once. 120 ms leaves room for loopback jitter.
    let starts: Vec<_> = rated.requests().iter().map(|r| r.at).collect();
    let closest = starts
        .windows(2)
        .map(|pair| pair[1].saturating_duration_since(pair[0]))
        .min()
        .unwrap();
    assert!(
        closest >= Duration::from_millis(120),
        "two starts {closest:?} apart at 5 per second"
    );
}

/// A target's secret file is read again: the next delivery carries the new
/// secret, and the report names the change (never the value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_secret_file_is_read_again() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("crm-secret");
    std::fs::write(&secret, "first-target-secret\n").unwrap();
    let config = target(
        "crm",
        &crm.url(),
        &format!("secret_file = \"{}\"", secret.display()),
    );
    let relay = Reloadable::start(&config);
    send_one(&relay.relay, lead(1)).await;
    delivered(&crm, lead(1), "the first lead").await;
    std::fs::write(&secret, "second-target-secret\n").unwrap();
    let report = json(relay.reload(&config).await);
    assert_eq!(
        report["changed"],
        serde_json::json!({"crm": ["secret"]}),
        "{report}"
    );
    assert!(
        !report.to_string().contains("target-secret"),
        "the report shows a secret"
    );
    send_one(&relay.relay, lead(2)).await;
    delivered(&crm, lead(2), "the second lead").await;
    let secrets: Vec<String> = crm
        .requests()
        .iter()
        .map(|r| r.header("x-webhook-secret").to_owned())
        .collect();
    assert_eq!(secrets, ["first-target-secret", "second-target-secret"]);
}

/// A target whose URL is kept in a file (a Slack webhook URL is a
/// credential): deliveries go where the file says, a reload reads it again
/// and the next delivery goes to the new URL, and neither the report nor
/// `check-config` shows a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_url_file_is_read_again() {
    let (first, second) = (
        Receiver::start(|_, _| Reply::ok()).await,
        Receiver::start(|_, _| Reply::ok()).await,
    );
    let work = tempfile::tempdir().unwrap();
    let url_file = work.path().join("slack-url");
    std::fs::write(&url_file, format!("{}\n", first.url())).unwrap();
    let config = format!(
        "[[targets]]\nname = \"slack\"\nurl_file = {:?}\n",
        url_file.to_str().unwrap()
    );
    let relay = Reloadable::start(&config);
    send_one(&relay.relay, lead(1)).await;
    delivered(&first, lead(1), "the first lead").await;

    std::fs::write(&url_file, second.url()).unwrap();
    let report = json(relay.reload(&config).await);
    assert_eq!(
        report["changed"],
        serde_json::json!({"slack": ["url"]}),
        "{report}"
    );
    send_one(&relay.relay, lead(2)).await;
    delivered(&second, lead(2), "the second lead, at the new URL").await;
    assert_eq!(first.count(), 1, "the old URL got the second lead");

    let port = |url: String| url.rsplit(':').next().unwrap().to_owned();
    let checked = ok(cli(args(&[
        "check-config",
        "--config",
        relay.config.to_str().unwrap(),
    ]))
    .await);
    assert!(checked.contains("url from file"), "{checked}");
    for text in [report.to_string(), checked] {
        assert!(
            !text.contains(&port(second.url())) && !text.contains(&port(first.url())),
            "a URL is shown: {text}"
        );
    }
}

/// A header value file and a template file are read again: with the
/// configuration unchanged, the next delivery carries the new token in
/// the new shape, and the report names the keys (never a value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_template_files_are_read_again() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let work = tempfile::tempdir().unwrap();
    let (token, template) = (work.path().join("token"), work.path().join("body.j2"));
    std::fs::write(&token, "first-token\n").unwrap();
    std::fs::write(&template, r#"{"first": {{ event|tojson }}}"#).unwrap();
    let config = format!(
        "[[targets]]\nname = \"crm\"\nurl = \"{}\"\nformat = \"template\"\n\
         template_file = {:?}\n\n[targets.headers]\n\
         authorization = {{ file = {:?}, prefix = \"Bearer \" }}\n",
        crm.url(),
        template.to_str().unwrap(),
        token.to_str().unwrap()
    );
    let relay = Reloadable::start(&config);
    send_one(&relay.relay, lead(1)).await;
    delivered(
        &crm,
        br#"{"first": "visitor_created"}"#.to_vec(),
        "the first lead",
    )
    .await;
    std::fs::write(&token, "second-token\n").unwrap();
    std::fs::write(&template, r#"{"second": {{ event|tojson }}}"#).unwrap();
    let report = json(relay.reload(&config).await);
    assert_eq!(
        report["changed"],
        serde_json::json!({"crm": ["template", "headers"]}),
        "{report}"
    );
    assert!(
        !report.to_string().contains("token"),
        "the report shows a value"
    );
    send_one(&relay.relay, lead(2)).await;
    delivered(
        &crm,
        br#"{"second": "visitor_created"}"#.to_vec(),
        "the second lead",
    )
    .await;
    let tokens: Vec<String> = crm
        .requests()
        .iter()
        .map(|r| r.header("authorization").to_owned())
        .collect();
    assert_eq!(tokens, ["Bearer first-token", "Bearer second-token"]);
}

/// A crash just after a reload's cut, once the change of targets is
/// written, while leads are acknowledged and checkpointed above it: after
/// the restart, every lead accepted above the cut reaches the added target
/// and the target given other event types, and the removed target keeps
/// exactly what waited for it up to the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_cut_loses_nothing_for_the_new_targets() {
    crash_during_a_reload("reload.cut:1", true).await;
}

/// A crash after the committer moved to the new targets but before the
/// change was written, with leads acknowledged above the cut (only the
/// write-ahead log has them): the same, except that the removed target's
/// backlog may also hold what came above the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_change_is_written_loses_nothing() {
    crash_during_a_reload("reload.change:1", false).await;
}

async fn crash_during_a_reload(crash_at: &str, removed_exact: bool) {
    let (crm, added, chats) = (
        Receiver::start(|_, _| Reply::ok()).await,
        Receiver::start(|_, _| Reply::ok()).await,
        Receiver::start(|_, _| Reply::ok()).await,
    );
    let down = RefusingPort::new();
    let down_url = format!("http://{}/hook", down.addr);
    let storage = "[storage]\ncheckpoint_interval = \"50ms\"\n\n";
    let before = [
        storage,
        &target("crm", &crm.url(), ""),
        &target("archive", &down_url, ""),
        &target("chats", &chats.url(), "events = [\"conversation_ended\"]"),
    ]
    .concat();
    let mut relay = Reloadable::start_with_env(&before, &[("LEADFLO_RELAY_CRASH_AT", crash_at)]);
    let sender = Sender::start(relay.relay.url(), 0, 50_000, 2);
    sender.wait_for(200).await;

    let after = [
        storage,
        &target("crm", &crm.url(), ""),
        &target("added", &added.url(), ""),
        &target("chats", &chats.url(), "events = [\"visitor_created\"]"),
    ]
    .concat();
    relay.sighup(&after);
    let status = relay.relay.wait_for_exit(WAIT);
    assert!(!status.success(), "the relay did not crash at the cut");
    let answers = sender.finish().await;
    let cut = cut_in(&relay.relay.stderr_text());
    let (below, above): (Vec<Answer>, Vec<Answer>) = answers
        .iter()
        .filter(|a| matches!(a, Answer::Accepted { .. }))
        .cloned()
        .partition(|a| matches!(a, Answer::Accepted { id, .. } if id.0 <= cut));
    eprintln!(
        "crash after the cut: {} leads accepted below it, {} above",
        below.len(),
        above.len()
    );
    assert!(above.len() >= 50, "too few leads above the cut to tell");

    relay.relay = Reloadable::serve(relay.dir(), &[]);
    assert_every_lead_delivered_once_per_key(&answers, &crm).await;
    assert_every_lead_delivered_once_per_key(&above, &added).await;
    assert_every_lead_delivered_once_per_key(&above, &chats).await;
    let stats = relay.stats().await;
    let archive = stats["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "archive")
        .cloned()
        .unwrap_or_else(|| panic!("archive not in stats: {stats}"));
    let kept = archive["backlog"].as_u64().unwrap() + archive["dead_letters"].as_u64().unwrap();
    if removed_exact {
        assert_eq!(
            kept,
            below.len() as u64,
            "the removed target's backlog is not what waited up to the cut: {archive}"
        );
    } else {
        assert!(
            kept >= below.len() as u64,
            "the removed target lost deliveries: {archive}"
        );
    }
    let below_ids: Vec<u64> = below
        .iter()
        .map(|a| match a {
            Answer::Accepted { id, .. } => id.0,
            Answer::Refused(_) => unreachable!(),
        })
        .collect();
    assert!(
        added.requests().iter().all(|r| {
            let key: u64 = r.header("idempotency-key").parse().unwrap();
            !below_ids.contains(&key)
        }),
        "the added target got leads from before the cut"
    );
}

/// An admin client that hangs up right after `POST /api/reload` does not
/// stop the reload half-way: the target whose event types changed, whose
/// dispatcher was still finishing a slow attempt, runs again with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_runs_to_its_end_when_the_client_hangs_up() {
    let chats = Receiver::start(|_, _| Reply::ok().after(Duration::from_secs(2))).await;
    let before = target("chats", &chats.url(), "events = [\"conversation_ended\"]");
    let relay = Reloadable::start(&before);
    send_one(&relay.relay, conversation(1)).await;
    eventually("an attempt in flight at chats", WAIT, async || {
        (!chats.requests().is_empty()).then_some(())
    })
    .await;

    let after = target("chats", &chats.url(), "events = [\"visitor_created\"]");
    std::fs::write(&relay.config, &after).unwrap();
    let mut admin = tokio::net::TcpStream::connect(relay.relay.admin)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut admin,
        b"POST /api/reload HTTP/1.1\r\nhost: relay\r\ncontent-length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    eventually("the reload under way", WAIT, async || {
        relay
            .relay
            .stderr_text()
            .contains("reading the configuration again")
            .then_some(())
    })
    .await;
    drop(admin);
    eventually("the reload the client hung up on", WAIT, async || {
        (relay.reloads("ok").await >= 1.0).then_some(())
    })
    .await;
    send_one(&relay.relay, lead(1)).await;
    delivered(&chats, lead(1), "a lead at chats, which now takes leads").await;
}

/// A reload asked for while the relay shuts down, after its dispatchers
/// stopped, is refused with 503 instead of starting them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_shutdown_is_refused() {
    let crm = Receiver::start(|_, _| Reply::ok().after(Duration::from_secs(3))).await;
    let mut relay = Reloadable::start(&target("crm", &crm.url(), ""));
    send_one(&relay.relay, lead(1)).await;
    eventually("an attempt in flight at crm", WAIT, async || {
        (!crm.requests().is_empty()).then_some(())
    })
    .await;
    // Accepted before the shutdown: its first request is still answered.
    let mut admin = tokio::net::TcpStream::connect(relay.relay.admin)
        .await
        .unwrap();
    relay.relay.sigterm();
    eventually("the dispatchers stopping", WAIT, async || {
        relay
            .relay
            .stderr_text()
            .contains("reloads are refused from now on")
            .then_some(())
    })
    .await;
    tokio::io::AsyncWriteExt::write_all(
        &mut admin,
        b"POST /api/reload HTTP/1.1\r\nhost: relay\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_until_close(&mut admin, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");
    assert_eq!(relay.relay.wait_for_exit(WAIT).code(), Some(0));
    relay.relay = Reloadable::serve(relay.dir(), &[]);
    assert_eq!(
        relay.stats().await["targets"][0]["backlog"],
        0,
        "the lead in flight at shutdown was lost"
    );
}
