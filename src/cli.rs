//! The operator commands (`replay`, `events`, `dlq`, `stats`,
//! `forget-target`, `send-test`)
//! as run from the command line: each reaches the log either through a
//! running relay's admin API (online) or by opening the data directory
//! itself (offline, nothing running), then prints a table or JSON.
//!
//! Which way: `--admin URL` means online; `--data-dir` means offline;
//! with neither, the configured admin address is tried first and the
//! configured data directory second. sled allows one process per database,
//! so a data directory locked by a relay whose admin API does not answer is
//! an error that says exactly that.
//!
//! `send-test` goes through the relay's ingest endpoint; with no relay
//! running it sends straight to each configured target, built exactly as
//! the relay builds its deliveries (format, headers, signing, status rules).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admin::ADMIN_TOKEN_ENV;
use crate::config::Config;
use crate::ops::{self, TargetsView};
use crate::store::{EventId, Store, StoreError};

/// How a command reaches the log.
pub enum Backend {
    Online(Online),
    Offline { store: Store, targets: TargetsView },
}

/// Where the CLI looks, from its flags.
pub struct Access {
    pub config: Config,
    /// A configuration file was given (`--config`): offline, a target in
    /// the log that it does not list counts as removed.
    pub config_given: bool,
    /// `--data-dir` was given: go offline, do not look for a relay.
    pub data_dir_given: bool,
    /// `--admin URL`: go online only.
    pub admin: Option<String>,
    pub json: bool,
}

/// A running relay's admin API.
pub struct Online {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Online {
    fn new(base: &str, timeout: Duration) -> anyhow::Result<Online> {
        crate::deliver::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        let token = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty());
        // `host:port` as the admin listener prints it means plain HTTP.
        let base = if base.contains("://") {
            base.to_owned()
        } else {
            format!("http://{base}")
        };
        Ok(Online {
            base: base.trim_end_matches('/').to_owned(),
            client,
            token,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn alive(&self) -> Result<(), reqwest::Error> {
        self.request(reqwest::Method::GET, "/healthz")
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("admin API at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"].as_str().unwrap_or("no reason given");
        bail!("the relay's admin API answered {status}: {message}");
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .send(self.request(reqwest::Method::GET, path))
            .await?
            .json()
            .await?)
    }

    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self
            .send(self.request(reqwest::Method::GET, path))
            .await?
            .bytes()
            .await?
            .to_vec())
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        Ok(self
            .send(self.request(reqwest::Method::POST, path).json(body))
            .await?
            .json()
            .await?)
    }
}

/// The admin URL the configuration points at (a wildcard bind address is
/// reached on loopback).
pub fn configured_admin_url(config: &Config) -> String {
    let mut addr = config.server.admin_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

/// Connects to a running relay or opens the data directory, as [`Access`]
/// says.
pub async fn connect(access: &Access) -> anyhow::Result<Backend> {
    if let Some(url) = &access.admin {
        let online = Online::new(url, Duration::from_secs(600))?;
        online
            .alive()
            .await
            .with_context(|| format!("cannot reach the relay's admin API at {url}"))?;
        return Ok(Backend::Online(online));
    }
    let data_dir = access.config.storage.data_dir.clone();
    if access.data_dir_given {
        return open_offline(access, &data_dir, None);
    }
    let url = configured_admin_url(&access.config);
    let online = Online::new(&url, Duration::from_secs(600))?;
    match online.alive().await {
        Ok(()) => Ok(Backend::Online(online)),
        Err(err) => open_offline(access, &data_dir, Some((url, err))),
    }
}

fn open_offline(
    access: &Access,
    data_dir: &Path,
    unreachable: Option<(String, reqwest::Error)>,
) -> anyhow::Result<Backend> {
    if !data_dir.join("db").exists() {
        let hint = match &unreachable {
            Some((url, _)) => format!(" (and no relay answers at {url})"),
            None => String::new(),
        };
        bail!(
            "no relay data in {}{hint}: pass --data-dir or --config, or --admin URL of a running relay",
            data_dir.display()
        );
    }
    let config = &access.config;
    // Offline commands issue no ids: the node identity does not matter.
    let options = crate::app::store_options(config, crate::node::NodeId(0));
    match Store::open(&options) {
        Ok(store) => {
            store.load_watermarks()?;
            let mut targets = TargetsView::from_config(config);
            // Targets no longer configured but still holding deliveries.
            // Their event types are the ones stored with their watermark
            // (every type when they have none), as the relay knows them.
            for name in store.targets_in_log()? {
                if !targets.targets.iter().any(|(n, _)| *n == name) {
                    let events = store.stored_event_types(&name)?;
                    if access.config_given {
                        targets.removed.insert(name.clone());
                    }
                    targets.targets.push((name, events));
                }
            }
            store.count_backlogs(&targets.names())?;
            Ok(Backend::Offline { store, targets })
        }
        Err(StoreError::Locked { dir }) => match unreachable {
            Some((url, err)) => bail!(
                "the data directory {} is locked by a running leadflo-relay, but its admin API \
                 at {url} did not answer ({err}); pass --admin URL of that relay",
                dir.display()
            ),
            None => bail!(
                "the data directory {} is locked by a running leadflo-relay: use its admin API \
                 with --admin URL (sled allows one process per data directory)",
                dir.display()
            ),
        },
        Err(err) => Err(err.into()),
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialize")
    );
}

/// Prints rows as a table with aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (n, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if n + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Cuts `text` to `max` characters for a table cell.
pub fn cell(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

// ---- commands --------------------------------------------------------------

pub async fn replay(access: &Access, request: ops::ReplayRequest) -> anyhow::Result<()> {
    let report = match connect(access).await? {
        Backend::Online(online) => online.post("/api/replay", &request).await?,
        Backend::Offline { store, targets } => {
            let show_progress = !access.json && std::io::stderr().is_terminal();
            let bar = indicatif::ProgressBar::new_spinner();
            if !show_progress {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.set_message("events looked at");
            tokio::task::spawn_blocking(move || {
                ops::replay(&store, &targets, &request, &mut |n| {
                    bar.set_position(n as u64)
                })
            })
            .await??
        }
    };
    print_replay(access.json, &report);
    Ok(())
}

fn print_replay(json: bool, report: &ops::ReplayReport) {
    if json {
        return print_json(report);
    }
    if report.dry_run {
        println!(
            "dry run: {} events match for {}; {} already queued, {} would be queued (nothing changed)",
            report.matched,
            report.target,
            report.already_queued,
            report.matched - report.already_queued
        );
    } else {
        println!(
            "replay to {}: {} events matched, {} queued, {} already queued",
            report.target, report.matched, report.enqueued, report.already_queued
        );
    }
}

pub async fn events_list(access: &Access, query: ops::EventsQuery) -> anyhow::Result<()> {
    let events: Vec<ops::EventSummary> = match connect(access).await? {
        Backend::Online(online) => {
            let query = serde_urlencoded::to_string(&query)?;
            online.get(&format!("/api/events?{query}")).await?
        }
        Backend::Offline { store, .. } => ops::list_events(&store, &query)?,
    };
    if access.json {
        print_json(&events);
    } else {
        let header = if query.quarantined {
            ["ID", "RECEIVED", "REASON", "BYTES"]
        } else {
            ["ID", "RECEIVED", "EVENT", "BYTES"]
        };
        let rows: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                vec![
                    e.id.to_string(),
                    e.received_at.clone(),
                    cell(&e.event, 60),
                    e.bytes.to_string(),
                ]
            })
            .collect();
        print_table(&header, &rows);
    }
    Ok(())
}

pub async fn events_show(access: &Access, id: EventId, raw: bool) -> anyhow::Result<()> {
    let backend = connect(access).await?;
    if raw {
        let bytes = match backend {
            Backend::Online(online) => online.get_bytes(&format!("/api/events/{id}/raw")).await?,
            Backend::Offline { store, .. } => ops::raw_event(&store, id)?,
        };
        std::io::stdout().write_all(&bytes)?;
        return Ok(());
    }
    let detail: ops::EventDetail = match backend {
        Backend::Online(online) => online.get(&format!("/api/events/{id}")).await?,
        Backend::Offline { store, targets } => ops::show_event(&store, &targets, id)?,
    };
    if access.json {
        print_json(&detail);
        return Ok(());
    }
    println!("id:        {}", detail.id);
    println!("received:  {}", detail.received_at);
    println!("event:     {}", detail.event);
    println!("bytes:     {}", detail.bytes);
    for (target, status) in &detail.deliveries {
        println!("target {target}: {}", describe(status));
    }
    println!();
    match serde_json::from_str::<serde_json::Value>(&detail.body) {
        Ok(body) => println!("{}", serde_json::to_string_pretty(&body)?),
        Err(_) => println!("{}", detail.body),
    }
    Ok(())
}

pub fn describe(status: &ops::DeliveryStatus) -> String {
    match status {
        ops::DeliveryStatus::Delivered => "delivered".into(),
        ops::DeliveryStatus::Queued => "queued (waiting for delivery)".into(),
        ops::DeliveryStatus::NotSubscribed => "not subscribed to this event type".into(),
        ops::DeliveryStatus::Dead {
            reason, attempts, ..
        } => {
            format!("dead letter after {attempts} attempt(s): {reason}")
        }
    }
}

pub async fn dlq_list(access: &Access, target: Option<String>) -> anyhow::Result<()> {
    let letters = fetch_dead_letters(access, target).await?;
    if access.json {
        print_json(&letters);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|d| {
            vec![
                d.target.clone(),
                d.id.to_string(),
                d.attempts.to_string(),
                if d.last_status == 0 {
                    "-".into()
                } else {
                    d.last_status.to_string()
                },
                d.last_attempt_at.clone().unwrap_or_else(|| "-".into()),
                cell(&d.reason, 70),
            ]
        })
        .collect();
    print_table(
        &[
            "TARGET",
            "ID",
            "ATTEMPTS",
            "STATUS",
            "LAST ATTEMPT",
            "REASON",
        ],
        &rows,
    );
    Ok(())
}

async fn fetch_dead_letters(
    access: &Access,
    target: Option<String>,
) -> anyhow::Result<Vec<ops::DeadLetterView>> {
    Ok(match connect(access).await? {
        Backend::Online(online) => {
            let query = serde_urlencoded::to_string([("target", target)])?;
            online.get(&format!("/api/dlq?{query}")).await?
        }
        Backend::Offline { store, .. } => ops::list_dead_letters(&store, target.as_deref())?,
    })
}

pub async fn dlq_retry(access: &Access, selection: ops::DlqSelection) -> anyhow::Result<()> {
    let report: ops::DlqReport = match connect(access).await? {
        Backend::Online(online) => online.post("/api/dlq/retry", &selection).await?,
        Backend::Offline { store, targets } => {
            ops::retry_dead_letters(&store, &targets, &selection)?
        }
    };
    if access.json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "{} of {} selected dead letters queued for delivery again",
        report.changed, report.matched
    );
    Ok(())
}

/// Asks `question` on the terminal; an answer other than yes is the error
/// `declined`. Without a terminal (a script) it refuses to `action`
/// unless the command was given `--yes`, which skips this.
fn confirm(action: &str, question: &str, declined: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to {action} without confirmation: pass --yes");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("{declined}");
    }
    Ok(())
}

pub async fn dlq_purge(
    access: &Access,
    selection: ops::DlqSelection,
    yes: bool,
) -> anyhow::Result<()> {
    if !yes {
        let selected = fetch_dead_letters(access, selection.target.clone()).await?;
        let count = selected
            .iter()
            .filter(|d| selection.ids.as_ref().is_none_or(|ids| ids.contains(&d.id)))
            .count();
        confirm(
            &format!("purge {count} dead letter(s)"),
            &format!("Delete {count} dead letter(s) for good? They cannot be retried afterwards."),
            "nothing purged",
        )?;
    }
    let report: ops::DlqReport = match connect(access).await? {
        Backend::Online(online) => online.post("/api/dlq/purge", &selection).await?,
        Backend::Offline { store, .. } => ops::purge_dead_letters(&store, &selection)?,
    };
    if access.json {
        print_json(&report);
        return Ok(());
    }
    println!("{} dead letter(s) purged", report.changed);
    Ok(())
}

pub async fn forget_target(access: &Access, target: String, yes: bool) -> anyhow::Result<()> {
    if !yes {
        confirm(
            &format!("forget target {target:?}"),
            &format!(
                "Drop every delivery waiting for target {target:?}, and its dead letters, for \
                 good? Its events can still be replayed to other targets until retention \
                 prunes them."
            ),
            "nothing dropped",
        )?;
    }
    let report: ops::ForgetReport = match connect(access).await? {
        Backend::Online(online) => {
            online
                .post("/api/targets/forget", &ops::ForgetRequest { target })
                .await?
        }
        Backend::Offline { store, targets } => ops::forget_target(&store, &targets, &target)?,
    };
    if access.json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "target {:?} forgotten: {} waiting deliveries and {} dead letter(s) dropped",
        report.target, report.waiting, report.dead_letters
    );
    Ok(())
}

/// Asks the running relay to reload. There is nothing to reload offline:
/// a relay that is not running reads its configuration when it starts.
pub async fn reload(access: &Access) -> anyhow::Result<()> {
    let report: crate::reload::ReloadReport = match connect(access).await? {
        Backend::Online(online) => online.post("/api/reload", &serde_json::json!({})).await?,
        Backend::Offline { .. } => bail!(
            "no relay is running (its admin API did not answer): a relay reads its configuration \
             when it starts, so there is nothing to reload"
        ),
    };
    if access.json {
        print_json(&report);
        return Ok(());
    }
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    println!("reloaded");
    println!("targets added:   {}", list(&report.added));
    println!("targets removed: {}", list(&report.removed));
    for (target, keys) in &report.changed {
        println!("target changed:  {target} ({})", keys.join(", "));
    }
    if report.secrets_changed {
        println!("inbound secrets: changed");
    }
    if let Some(certificate) = &report.certificate {
        println!("tls: read again, serving the {certificate}");
    }
    if !report.needs_restart.is_empty() {
        println!(
            "needs a restart: {} (changed in the file; the running relay keeps the old values)",
            report.needs_restart.join(", ")
        );
    }
    Ok(())
}

pub async fn stats(access: &Access) -> anyhow::Result<()> {
    let report: ops::StatsReport = match connect(access).await? {
        Backend::Online(online) => online.get("/api/stats").await?,
        Backend::Offline { store, targets } => {
            let node = crate::node::NodeId::peek(access.config.server.node_id, store.data_dir())?.0;
            ops::stats(&store, &targets, None, node)?
        }
    };
    if access.json {
        print_json(&report);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = report
        .targets
        .iter()
        .map(|t| {
            vec![
                if t.configured {
                    t.name.clone()
                } else {
                    format!("{} (not configured)", t.name)
                },
                t.backlog.to_string(),
                t.oldest_age_seconds
                    .map_or("-".into(), |s| format!("{s:.0}s")),
                t.dead_letters.to_string(),
                t.circuit.clone(),
                t.last_success_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        &[
            "TARGET",
            "BACKLOG",
            "OLDEST",
            "DEAD",
            "CIRCUIT",
            "LAST SUCCESS",
        ],
        &rows,
    );
    println!();
    println!("store size: {} bytes", report.store_size_bytes);
    println!("disk free:  {} bytes", report.disk_free_bytes);
    match report.node_id {
        Some(node) => println!("node id:    {node} (mixed into every event id)"),
        None => println!("node id:    none yet (the first `serve` makes one)"),
    }
    if !report.online {
        println!("(relay not running: circuit state and last success are unknown)");
    }
    if let Some(removed) = report.targets.iter().find(|t| !t.configured) {
        println!(
            "(a target not configured keeps its events from being pruned: add it back to \
             deliver them, or drop what waits for it with `leadflo-relay forget-target {}`)",
            removed.name
        );
    }
    Ok(())
}

/// The seed's example payloads, as LeadFloAgent documents them.
pub fn example_payload(event: &str) -> &'static str {
    match event {
        "conversation_ended" => include_str!("../tests/fixtures/conversation_ended.json"),
        _ => include_str!("../tests/fixtures/visitor_created.json"),
    }
}

#[derive(Serialize)]
struct SendTestReport {
    status: u16,
    id: Option<String>,
    error: Option<String>,
    deliveries: Option<std::collections::BTreeMap<String, ops::DeliveryStatus>>,
}

/// Sends LeadFloAgent's example `event` to the relay at `url` (the
/// configured ingest address by default) and reports what each target made
/// of it: the relay delivers it as it delivers every event, in each
/// target's format, with its headers and signature. When no `url` was
/// given and no relay listens there, the example goes straight to each
/// configured target instead, built the same way ([`send_test_direct`]).
pub async fn send_test(access: &Access, event: &str, url: Option<String>) -> anyhow::Result<()> {
    let config = &access.config;
    let may_go_direct = url.is_none() && !config.targets.is_empty();
    let url = url.unwrap_or_else(|| {
        let mut addr = config.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}{}", config.server.path)
    });
    let secret = config.inbound_secret()?;
    crate::deliver::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut request = client
        .post(&url)
        .header("content-type", "application/json")
        .body(example_payload(event));
    if let Some(secret) = &secret {
        request = request.header(crate::ingest::SECRET_HEADER, secret.expose());
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) if err.is_connect() && may_go_direct => {
            return send_test_direct(access, event, &url).await;
        }
        Err(err) => return Err(err).with_context(|| format!("cannot reach the relay at {url}")),
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let mut report = SendTestReport {
        status,
        id: body["id"].as_str().map(str::to_owned),
        error: body["error"].as_str().map(str::to_owned),
        deliveries: None,
    };
    if let Some(id) = &report.id {
        let admin_url = access
            .admin
            .clone()
            .unwrap_or_else(|| configured_admin_url(config));
        if let Ok(online) = Online::new(&admin_url, Duration::from_secs(5)) {
            if online.alive().await.is_ok() {
                report.deliveries = Some(wait_for_deliveries(&online, id).await?);
            }
        }
    }
    if access.json {
        print_json(&report);
    } else {
        match (&report.id, &report.error) {
            (Some(id), _) => println!("{url} answered {status}: accepted as event {id}"),
            (None, Some(error)) => println!("{url} answered {status}: {error}"),
            (None, None) => println!("{url} answered {status}"),
        }
        match &report.deliveries {
            Some(deliveries) if deliveries.is_empty() => println!("no targets are configured"),
            Some(deliveries) => {
                for (target, status) in deliveries {
                    println!("target {target}: {}", describe(status));
                }
            }
            None if report.id.is_some() => {
                println!("(admin API not reachable: delivery status unknown)")
            }
            None => {}
        }
    }
    if status != 200 {
        bail!("the relay did not accept the test event");
    }
    Ok(())
}

/// Polls the event until no target is still waiting for it, for up to 15 s.
async fn wait_for_deliveries(
    online: &Online,
    id: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, ops::DeliveryStatus>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let detail: ops::EventDetail = online.get(&format!("/api/events/{id}")).await?;
        let waiting = detail
            .deliveries
            .values()
            .any(|s| *s == ops::DeliveryStatus::Queued);
        if !waiting || tokio::time::Instant::now() >= deadline {
            return Ok(detail.deliveries);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What one target made of a test event sent straight to it.
#[derive(Serialize)]
struct DirectResult {
    /// `delivered`, `retry` (the relay would try again), `dead` (the relay
    /// would dead-letter it), or `not_subscribed`.
    result: &'static str,
    /// The target's answer, when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    /// Why it was not delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize)]
struct DirectReport {
    /// Always `direct`: no relay took part.
    mode: &'static str,
    /// The id the example was sent as (`idempotency-key`, `webhook-id`).
    id: String,
    targets: std::collections::BTreeMap<String, DirectResult>,
}

/// Sends the example `event` to every configured target that subscribes
/// to it, one attempt each, exactly as the relay's deliveries are made
/// (the target's [`crate::outbound::Outbound`] through a
/// [`crate::deliver::Deliverer`]: format, headers, secret, signature and
/// status rules), and reports each answer. Nothing is stored.
async fn send_test_direct(access: &Access, event: &str, relay_url: &str) -> anyhow::Result<()> {
    let body = bytes::Bytes::from_static(example_payload(event).as_bytes());
    let view = crate::outbound::EventView {
        id: test_event_id(),
        received_at_ms: crate::clock::now_ms(),
        body: &body,
    };
    if !access.json {
        println!(
            "no relay answers at {relay_url}: sending the example {event} straight to each \
             target, as the relay would (one attempt each, nothing stored) as event {}",
            view.id
        );
    }
    let mut report = DirectReport {
        mode: "direct",
        id: view.id.to_string(),
        targets: std::collections::BTreeMap::new(),
    };
    for target in &access.config.targets {
        let subscribed = target
            .events
            .as_ref()
            .is_none_or(|events| events.iter().any(|e| e == event));
        let result = if subscribed {
            let deliverer = target_deliverer(target)?;
            direct_result(deliverer.attempt(&view, 1).await)
        } else {
            DirectResult {
                result: "not_subscribed",
                status: None,
                reason: None,
            }
        };
        if !access.json {
            println!("target {}: {}", target.name, describe_direct(&result));
        }
        report.targets.insert(target.name.clone(), result);
    }
    if access.json {
        print_json(&report);
    }
    let failed = report
        .targets
        .values()
        .filter(|r| matches!(r.result, "retry" | "dead"))
        .count();
    if failed > 0 {
        bail!("{failed} target(s) did not accept the test event");
    }
    Ok(())
}

/// The id a test event sent straight to targets goes as: the time in
/// microseconds, an id of the layout no relay issues any more (below
/// [`crate::node::FIRST_NODE_ID`]), so it is never a real event's
/// idempotency key at a target that deduplicates.
fn test_event_id() -> EventId {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    EventId(micros.min(crate::node::FIRST_NODE_ID - 1))
}

/// `target`'s deliverer, built as `serve` builds it.
fn target_deliverer(
    target: &crate::config::TargetConfig,
) -> anyhow::Result<crate::deliver::Deliverer> {
    let url = target.endpoint()?;
    let secret = target.secret()?;
    let outbound = crate::outbound::Outbound::build(target)?;
    crate::deliver::Deliverer::new(url, secret.as_ref(), target.timeout.get(), outbound)
        .with_context(|| format!("target {}", target.name))
}

fn direct_result(outcome: crate::deliver::Outcome) -> DirectResult {
    use crate::deliver::Outcome;
    match outcome {
        Outcome::Delivered { status } => DirectResult {
            result: "delivered",
            status: Some(status),
            reason: None,
        },
        Outcome::Retry { failure, .. } => DirectResult {
            result: "retry",
            status: failure.status(),
            reason: Some(failure.to_string()),
        },
        Outcome::Reject { status, body } => DirectResult {
            result: "dead",
            status: Some(status),
            reason: Some(if body.is_empty() {
                format!("HTTP {status} (not retryable)")
            } else {
                format!("HTTP {status} (not retryable): {body}")
            }),
        },
        Outcome::Unrenderable { reason } => DirectResult {
            result: "dead",
            status: None,
            reason: Some(format!("template: {reason}")),
        },
    }
}

fn describe_direct(result: &DirectResult) -> String {
    let reason = result.reason.as_deref().unwrap_or("");
    match result.result {
        "delivered" => match result.status {
            Some(status) => format!("delivered (HTTP {status})"),
            None => "delivered".to_owned(),
        },
        "retry" => format!("not delivered: {reason} (the relay would retry it)"),
        "dead" => format!(
            "not delivered: {} (the relay would dead-letter it)",
            cell(reason, 200)
        ),
        _ => "not subscribed to this event type".to_owned(),
    }
}
