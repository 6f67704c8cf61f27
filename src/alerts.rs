//! Alerts: short messages to a small team's channel (a Slack incoming
//! webhook, or any URL that takes a JSON object) when a lead is
//! dead-lettered, when a target's circuit opens or closes, and when disk
//! space falls below the floor and returns.
//!
//! Dispatchers and the disk guard hand an [`Alert`] to an [`Alerter`],
//! which never waits: it puts the alert on a bounded queue, or counts it
//! dropped. One task ([`AlertTask`]) takes alerts off the queue, folds those
//! that come within `alerts.min_interval` of a message of the same family
//! and target into a count ([`Folder`]), and posts one message at a time,
//! so a slow or dead receiver never holds up ingest or delivery. A failed
//! post is logged and counted, retried at most once at once, never queued
//! again.
//!
//! An alert holds no personal data: a target's name, an event id, and a
//! reason made from a status or a kind of failure; never the event, nor a
//! target's answer (a CRM may echo the lead in it). The URL is a credential
//! (whoever has a Slack webhook URL can post to the channel): it is never
//! logged, shown or put in an error.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AlertFormat, AlertsConfig};
use crate::deliver::Outcome;
use crate::metrics::Metrics;
use crate::store::EventId;

/// Alerts waiting for the task; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 1024;
/// Messages waiting to be posted; the oldest goes when more come.
const OUTBOX_CAPACITY: usize = 64;
/// How long a stopping relay gives the messages still unsent.
const FINAL_WAIT: Duration = Duration::from_secs(2);
/// The most of a template error an alert quotes.
const REASON_CHARS: usize = 200;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertKind {
    DeadLetter,
    CircuitOpen,
    CircuitClosed,
    DiskLow,
    DiskOk,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::DeadLetter,
        AlertKind::CircuitOpen,
        AlertKind::CircuitClosed,
        AlertKind::DiskLow,
        AlertKind::DiskOk,
    ];

    /// The `kind` of a JSON message and of `leadflo_relay_alerts_total`.
    pub fn label(self) -> &'static str {
        match self {
            AlertKind::DeadLetter => "dead_letter",
            AlertKind::CircuitOpen => "circuit_open",
            AlertKind::CircuitClosed => "circuit_closed",
            AlertKind::DiskLow => "disk_low",
            AlertKind::DiskOk => "disk_ok",
        }
    }

    /// Kinds that tell a state and its end (open and closed, low and ok)
    /// share one rate limit: were they limited apart, a circuit that
    /// flapped could leave its older state as the channel's last word.
    fn family(self) -> Family {
        match self {
            AlertKind::DeadLetter => Family::DeadLetters,
            AlertKind::CircuitOpen | AlertKind::CircuitClosed => Family::Circuit,
            AlertKind::DiskLow | AlertKind::DiskOk => Family::Disk,
        }
    }
}

/// Alerts that share a rate limit (per target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    DeadLetters,
    Circuit,
    Disk,
}

impl Family {
    fn noun(self) -> &'static str {
        match self {
            Family::DeadLetters => "dead letters",
            Family::Circuit => "circuit changes",
            Family::Disk => "disk space changes",
        }
    }
}

/// What became of an alert: the `result` of `leadflo_relay_alerts_total`.
/// Each alert is counted once, when its fate is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertResult {
    /// Told in a message of its own that the receiver took (2xx).
    Sent,
    /// Held back, and told as a count in a message the receiver took.
    Folded,
    /// In a message the receiver did not take (or never answered).
    Failed,
    /// Never posted: the queue was full, or the relay stopped first.
    Dropped,
}

impl AlertResult {
    pub const ALL: [AlertResult; 4] = [
        AlertResult::Sent,
        AlertResult::Folded,
        AlertResult::Failed,
        AlertResult::Dropped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AlertResult::Sent => "sent",
            AlertResult::Folded => "folded",
            AlertResult::Failed => "failed",
            AlertResult::Dropped => "dropped",
        }
    }
}

/// One thing worth telling the team.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub target: Option<String>,
    pub event_id: Option<EventId>,
    /// Why, in the relay's words; never a body.
    pub reason: String,
    /// When it happened (ms since the epoch).
    pub at_ms: u64,
}

impl Alert {
    fn new(kind: AlertKind, target: Option<&str>, reason: String) -> Alert {
        Alert {
            kind,
            target: target.map(str::to_owned),
            event_id: None,
            reason,
            at_ms: crate::clock::now_ms(),
        }
    }

    /// `id` went to `target`'s dead letters; `reason` from
    /// [`dead_letter_reason`].
    pub fn dead_letter(target: &str, id: EventId, reason: String) -> Alert {
        Alert {
            event_id: Some(id),
            ..Alert::new(AlertKind::DeadLetter, Some(target), reason)
        }
    }

    pub fn circuit_open(target: &str, reason: String) -> Alert {
        Alert::new(AlertKind::CircuitOpen, Some(target), reason)
    }

    pub fn circuit_closed(target: &str) -> Alert {
        Alert::new(
            AlertKind::CircuitClosed,
            Some(target),
            "the target answers again; its backlog drains".to_owned(),
        )
    }

    pub fn disk_low(reason: String) -> Alert {
        Alert::new(AlertKind::DiskLow, None, reason)
    }

    pub fn disk_ok(reason: String) -> Alert {
        Alert::new(AlertKind::DiskOk, None, reason)
    }
}

/// Why a delivery was dead-lettered, for an alert: the status or the kind
/// of failure, never the target's answer. (The dead letter itself keeps
/// the first bytes of the answer, which may echo the lead: an operator
/// reads it with `leadflo-relay dlq list`, a channel never does.)
pub fn dead_letter_reason(outcome: &Outcome, attempts: u32) -> String {
    match outcome {
        Outcome::Reject { status, .. } => format!("HTTP {status} (not retryable)"),
        // A render error names the template's problem, never a value
        // (see `crate::outbound`); cut short all the same.
        Outcome::Unrenderable { reason } => {
            format!(
                "template: {}",
                reason.chars().take(REASON_CHARS).collect::<String>()
            )
        }
        Outcome::Retry { failure, .. } => {
            format!("gave up after {attempts} attempts (the retry window closed); last: {failure}")
        }
        Outcome::Delivered { status } => format!("HTTP {status}"),
    }
}

/// How many alerts of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts([u64; 5]);

impl KindCounts {
    fn add(&mut self, kind: AlertKind) {
        self.0[kind as usize] += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    fn each(&self) -> impl Iterator<Item = (AlertKind, u64)> + '_ {
        AlertKind::ALL.into_iter().zip(self.0.iter().copied())
    }
}

/// One message: the latest alert of its family and target, and how many
/// more were held back since the previous message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub alert: Alert,
    /// Alerts held back besides `alert`, by kind.
    pub folded: KindCounts,
    /// When the first of those happened.
    pub since_ms: Option<u64>,
}

impl Message {
    /// The request body in `format`.
    pub fn body(&self, format: AlertFormat) -> Vec<u8> {
        let value = match format {
            AlertFormat::Slack => serde_json::json!({ "text": self.slack_text() }),
            AlertFormat::Json => self.json(),
        };
        serde_json::to_vec(&value).expect("a JSON value serializes")
    }

    fn json(&self) -> serde_json::Value {
        let alert = &self.alert;
        serde_json::json!({
            "kind": alert.kind.label(),
            "target": alert.target,
            "event_id": alert.event_id.map(|id| id.to_string()),
            "reason": alert.reason,
            "folded": self.folded.total(),
            "since": self.since_ms.map(crate::ops::rfc3339),
            "at": crate::ops::rfc3339(alert.at_ms),
        })
    }

    /// Slack `mrkdwn`: `&`, `<` and `>` escaped in everything not ours.
    fn slack_text(&self) -> String {
        let alert = &self.alert;
        let target = escape(alert.target.as_deref().unwrap_or(""));
        let reason = escape(&alert.reason);
        let what = match alert.kind {
            AlertKind::DeadLetter => format!(
                ":x: Event {} was dead-lettered for target `{target}`: {reason}. \
                 `leadflo-relay dlq list --target {target}` shows it.",
                alert.event_id.map(|id| id.to_string()).unwrap_or_default()
            ),
            AlertKind::CircuitOpen => {
                format!(":rotating_light: Circuit open for target `{target}`: {reason}.")
            }
            AlertKind::CircuitClosed => {
                format!(":white_check_mark: Circuit closed for target `{target}`: {reason}.")
            }
            AlertKind::DiskLow => format!(":rotating_light: Disk space low: {reason}."),
            AlertKind::DiskOk => format!(":white_check_mark: Disk space is back: {reason}."),
        };
        let mut text = format!(
            "leadflo-relay: {what} ({})",
            crate::ops::rfc3339(alert.at_ms)
        );
        let folded = self.folded.total();
        if folded > 0 {
            let since = self.since_ms.map(crate::ops::rfc3339).unwrap_or_default();
            text.push_str(&format!(
                " And {folded} more {} since {since}.",
                alert.kind.family().noun()
            ));
        }
        text
    }
}

/// Escapes the three characters Slack's `mrkdwn` gives a meaning.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The rate limit: at most one message per family and target per
/// interval; what comes meanwhile is held, and goes out (as a count, with
/// the latest alert) when the interval has passed.
#[derive(Debug, Default)]
pub struct Folder {
    slots: HashMap<(Family, Option<String>), Slot>,
}

#[derive(Debug)]
struct Slot {
    last_sent: Instant,
    held: Option<Held>,
}

/// Alerts held back: the latest, and the kinds of those before it.
#[derive(Debug)]
struct Held {
    latest: Alert,
    earlier: KindCounts,
    since_ms: u64,
}

impl Held {
    fn new(alert: Alert) -> Held {
        Held {
            since_ms: alert.at_ms,
            latest: alert,
            earlier: KindCounts::default(),
        }
    }

    fn hold(&mut self, alert: Alert) {
        self.earlier.add(self.latest.kind);
        self.latest = alert;
    }

    fn into_message(self) -> Message {
        Message {
            since_ms: (self.earlier.total() > 0).then_some(self.since_ms),
            alert: self.latest,
            folded: self.earlier,
        }
    }

    /// Every alert held, as counts (folded into a newer alert's message).
    fn counts(&self) -> KindCounts {
        let mut all = self.earlier;
        all.add(self.latest.kind);
        all
    }
}

impl Folder {
    /// `alert`, arriving at `now`: the message to post now, or `None` when
    /// it is held for a later one.
    pub fn offer(&mut self, alert: Alert, now: Instant, interval: Duration) -> Option<Message> {
        let key = (alert.kind.family(), alert.target.clone());
        if let Some(slot) = self.slots.get_mut(&key) {
            if now < slot.last_sent + interval {
                match &mut slot.held {
                    Some(held) => held.hold(alert),
                    None => slot.held = Some(Held::new(alert)),
                }
                return None;
            }
        }
        // Held alerts not flushed yet (their time came a moment ago) go
        // into this message's count.
        let held = self.slots.remove(&key).and_then(|slot| slot.held);
        self.slots.insert(
            key,
            Slot {
                last_sent: now,
                held: None,
            },
        );
        Some(Message {
            alert,
            folded: held.as_ref().map(Held::counts).unwrap_or_default(),
            since_ms: held.map(|h| h.since_ms),
        })
    }

    /// The messages of held alerts whose interval has passed by `now`,
    /// oldest first; forgets slots quiet for an interval (a target removed
    /// by a reload leaves nothing behind).
    pub fn due(&mut self, now: Instant, interval: Duration) -> Vec<Message> {
        let mut due = Vec::new();
        self.slots.retain(|_, slot| {
            if now < slot.last_sent + interval {
                return true;
            }
            match slot.held.take() {
                Some(held) => {
                    due.push(held.into_message());
                    slot.last_sent = now;
                    true
                }
                None => false,
            }
        });
        due.sort_by_key(|m| m.alert.at_ms);
        due
    }

    /// When the next held alert's interval passes.
    pub fn next_due(&self, interval: Duration) -> Option<Instant> {
        self.slots
            .values()
            .filter(|slot| slot.held.is_some())
            .map(|slot| slot.last_sent + interval)
            .min()
    }

    /// Every held alert as a message, oldest first (the relay stops).
    pub fn drain(&mut self) -> Vec<Message> {
        let mut held: Vec<Message> = self
            .slots
            .drain()
            .filter_map(|(_, slot)| slot.held.map(Held::into_message))
            .collect();
        held.sort_by_key(|m| m.alert.at_ms);
        held
    }
}

/// Where and how alerts are posted, read from `[alerts]` at start and at
/// each reload.
pub struct AlertSettings {
    client: reqwest::Client,
    /// A credential: never logged or shown.
    url: reqwest::Url,
    format: AlertFormat,
    min_interval: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for AlertSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSettings")
            .field("url", &"[redacted]")
            .field("format", &self.format)
            .field("min_interval", &self.min_interval)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl AlertSettings {
    /// Reads the URL `config` names; `None` when alerts are not configured.
    /// Errors name the key, never the URL.
    pub fn resolve(config: &AlertsConfig) -> anyhow::Result<Option<AlertSettings>> {
        let Some(url) = read_url(config)? else {
            return Ok(None);
        };
        crate::deliver::install_crypto_provider();
        let timeout = config.timeout.get();
        let client = reqwest::Client::builder()
            .user_agent(crate::deliver::USER_AGENT_VALUE)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .context("alerts: cannot build the HTTP client")?;
        Ok(Some(AlertSettings {
            client,
            url,
            format: config.format,
            min_interval: config.min_interval.get(),
            timeout,
        }))
    }
}

/// The webhook URL from `alerts.url_file` (which wins) or `alerts.url_env`.
fn read_url(config: &AlertsConfig) -> anyhow::Result<Option<reqwest::Url>> {
    let (key, text) = if let Some(path) = &config.url_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("alerts.url_file: cannot read {}", path.display()))?;
        ("alerts.url_file", text)
    } else if let Some(env) = &config.url_env {
        match std::env::var(env) {
            Ok(value) if !value.trim().is_empty() => ("alerts.url_env", value),
            _ => anyhow::bail!("alerts.url_env: environment variable {env} is not set or empty"),
        }
    } else {
        return Ok(None);
    };
    reqwest::Url::parse(text.trim())
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
        .map(Some)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{key}: expected an absolute http:// or https:// URL (the value is not shown: \
                 it is a credential)"
            )
        })
}

/// Why a post failed. Never holds the URL (reqwest's errors do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("the receiver answered HTTP {0}")]
    Status(u16),
    #[error("timed out")]
    Timeout,
    #[error("could not connect")]
    Connect,
    #[error("the connection failed mid-request")]
    Transport,
}

impl PostError {
    /// Worth one immediate retry: a connection that broke (a keep-alive
    /// connection the receiver had closed) or a gateway error. A timeout is
    /// not: a slow receiver would only hold the next message up longer.
    fn worth_one_retry(self) -> bool {
        matches!(
            self,
            PostError::Connect | PostError::Transport | PostError::Status(502..=504)
        )
    }

    fn from_reqwest(err: &reqwest::Error) -> PostError {
        if err.is_timeout() {
            PostError::Timeout
        } else if err.is_connect() {
            PostError::Connect
        } else {
            PostError::Transport
        }
    }
}

async fn post_once(settings: &AlertSettings, body: Vec<u8>) -> Result<(), PostError> {
    let request = settings
        .client
        .post(settings.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send();
    let response = match tokio::time::timeout(settings.timeout, request).await {
        Err(_) => return Err(PostError::Timeout),
        Ok(Err(err)) => return Err(PostError::from_reqwest(&err)),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(PostError::Status(status.as_u16()))
    }
}

/// Posts `message`, again at once if the first try is worth repeating.
async fn post(settings: Arc<AlertSettings>, message: Message) -> Result<(), PostError> {
    let body = message.body(settings.format);
    match post_once(&settings, body.clone()).await {
        Err(err) if err.worth_one_retry() => post_once(&settings, body).await,
        result => result,
    }
}

/// Counts one alert in `leadflo_relay_alerts_total`.
fn count(metrics: &Metrics, kind: AlertKind, result: AlertResult) {
    metrics
        .alerts
        .with_label_values(&[kind.label(), result.label()])
        .inc();
}

/// Counts the alerts of a message whose post ended: its own as `result`,
/// those folded into it as `folded_result`.
fn count_message(
    metrics: &Metrics,
    message: (AlertKind, &KindCounts),
    result: AlertResult,
    folded_result: AlertResult,
) {
    let (kind, folded) = message;
    count(metrics, kind, result);
    for (kind, n) in folded.each().filter(|&(_, n)| n > 0) {
        metrics
            .alerts
            .with_label_values(&[kind.label(), folded_result.label()])
            .inc_by(n);
    }
}

/// Counts the alerts of a message that was never posted.
fn count_dropped(metrics: &Metrics, message: &Message) {
    let dropped = AlertResult::Dropped;
    count_message(
        metrics,
        (message.alert.kind, &message.folded),
        dropped,
        dropped,
    );
}

/// Hands alerts to the alert task without ever waiting. Cheap to clone;
/// [`Alerter::disabled`] (the default) drops everything silently.
#[derive(Clone, Default)]
pub struct Alerter(Option<Arc<Shared>>);

struct Shared {
    queue: mpsc::Sender<Alert>,
    /// `None`: alerts are off (no `[alerts]` URL); a reload may turn them on.
    settings: watch::Sender<Option<Arc<AlertSettings>>>,
    metrics: Arc<Metrics>,
    /// Whether a full queue was logged (once: every drop is counted).
    warned_full: AtomicBool,
}

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_enabled() {
            "Alerter(on)"
        } else {
            "Alerter(off)"
        })
    }
}

impl Alerter {
    pub fn disabled() -> Alerter {
        Alerter(None)
    }

    pub fn is_enabled(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|shared| shared.settings.borrow().is_some())
    }

    /// Queues `alert` for the alert task, or counts it dropped when the
    /// queue is full: never waits.
    pub fn send(&self, alert: Alert) {
        let Some(shared) = &self.0 else {
            return;
        };
        if shared.settings.borrow().is_none() {
            return;
        }
        let kind = alert.kind;
        match shared.queue.try_send(alert) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                count(&shared.metrics, kind, AlertResult::Dropped);
                if !shared.warned_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        capacity = QUEUE_CAPACITY,
                        "the alert queue is full: alerts are dropped (counted in \
                         leadflo_relay_alerts_total{{result=\"dropped\"}})"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                count(&shared.metrics, kind, AlertResult::Dropped);
            }
        }
    }

    /// Posts with `settings` from now on (a reload); `None` turns alerts off.
    pub fn configure(&self, settings: Option<AlertSettings>) {
        let Some(shared) = &self.0 else {
            return;
        };
        let on = settings.is_some();
        let was_on = shared
            .settings
            .send_replace(settings.map(Arc::new))
            .is_some();
        match (was_on, on) {
            (false, true) => tracing::info!("alerts on"),
            (true, false) => tracing::info!("alerts off: no [alerts] URL configured any more"),
            _ => {}
        }
    }
}

/// Reads `[alerts]` and makes the alerter and its task (to be spawned:
/// [`AlertTask::run`]). The task is made even when alerts are off, so that
/// a reload can turn them on.
pub fn start(config: &AlertsConfig, metrics: Arc<Metrics>) -> anyhow::Result<(Alerter, AlertTask)> {
    let settings = AlertSettings::resolve(config)?;
    if let Some(settings) = &settings {
        tracing::info!(format = ?settings.format, min_interval = ?settings.min_interval, "alerts on");
    }
    Ok(channel(QUEUE_CAPACITY, settings, metrics))
}

/// An alerter and its task, with a queue of `capacity`.
pub fn channel(
    capacity: usize,
    settings: Option<AlertSettings>,
    metrics: Arc<Metrics>,
) -> (Alerter, AlertTask) {
    let (queue, alerts) = mpsc::channel(capacity);
    let (settings, watched) = watch::channel(settings.map(Arc::new));
    let alerter = Alerter(Some(Arc::new(Shared {
        queue,
        settings,
        metrics: metrics.clone(),
        warned_full: AtomicBool::new(false),
    })));
    let task = AlertTask {
        alerts,
        settings: watched,
        metrics,
        folder: Folder::default(),
        outbox: VecDeque::new(),
    };
    (alerter, task)
}

/// The one task that folds and posts alerts.
pub struct AlertTask {
    alerts: mpsc::Receiver<Alert>,
    settings: watch::Receiver<Option<Arc<AlertSettings>>>,
    metrics: Arc<Metrics>,
    folder: Folder,
    outbox: VecDeque<Message>,
}

/// The post in flight.
struct Posting {
    kind: AlertKind,
    folded: KindCounts,
    task: tokio::task::JoinHandle<Result<(), PostError>>,
}

/// How a post ended.
type Posted = Result<Result<(), PostError>, tokio::task::JoinError>;

impl AlertTask {
    /// Folds and posts until `stop`; then posts what was queued and held
    /// back within [`FINAL_WAIT`] (cancel `stop` after the dispatchers and
    /// the disk guard have stopped, so their last alerts are told).
    pub async fn run(mut self, stop: CancellationToken) {
        let mut posting: Option<Posting> = None;
        loop {
            if posting.is_none() {
                posting = self.post_next();
            }
            let flush_at = self.folder.next_due(self.interval());
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(alert) = self.alerts.recv() => self.take(alert),
                done = finished(&mut posting) => {
                    let ended = posting.take().expect("a post was in flight");
                    self.count_post(&ended, done);
                }
                _ = sleep_until(flush_at) => {
                    let due = self.folder.due(Instant::now(), self.interval());
                    for message in due {
                        self.queue_message(message);
                    }
                }
            }
        }
        self.finish(posting).await;
    }

    fn interval(&self) -> Duration {
        self.settings
            .borrow()
            .as_ref()
            .map_or(Duration::from_secs(60), |s| s.min_interval)
    }

    /// Holds `alert`, or queues its message; either way it is counted
    /// when the post that tells it has ended.
    fn take(&mut self, alert: Alert) {
        if let Some(message) = self.folder.offer(alert, Instant::now(), self.interval()) {
            self.queue_message(message);
        }
    }

    fn queue_message(&mut self, message: Message) {
        if self.outbox.len() >= OUTBOX_CAPACITY {
            if let Some(oldest) = self.outbox.pop_front() {
                count_dropped(&self.metrics, &oldest);
            }
        }
        self.outbox.push_back(message);
    }

    /// Starts posting the next message, if any (and if alerts are on).
    fn post_next(&mut self) -> Option<Posting> {
        let Some(settings) = self.settings.borrow().clone() else {
            // Turned off by a reload: what waited is not told.
            for message in self.outbox.drain(..) {
                count_dropped(&self.metrics, &message);
            }
            return None;
        };
        let message = self.outbox.pop_front()?;
        Some(Posting {
            kind: message.alert.kind,
            folded: message.folded,
            task: tokio::spawn(post(settings, message)),
        })
    }

    fn count_post(&self, posting: &Posting, done: Posted) {
        let message = (posting.kind, &posting.folded);
        let (sent, folded, failed) = (AlertResult::Sent, AlertResult::Folded, AlertResult::Failed);
        let kind = posting.kind.label();
        match done {
            Ok(Ok(())) => count_message(&self.metrics, message, sent, folded),
            Ok(Err(err)) => {
                count_message(&self.metrics, message, failed, failed);
                tracing::warn!(kind, error = %err, "cannot post an alert; it is not tried again");
            }
            Err(err) => {
                count_message(&self.metrics, message, failed, failed);
                tracing::error!(kind, error = %err, "an alert post failed");
            }
        }
    }

    /// The relay stops: what is queued and held back is posted within
    /// [`FINAL_WAIT`], and the rest is counted dropped.
    async fn finish(mut self, mut posting: Option<Posting>) {
        self.alerts.close();
        while let Ok(alert) = self.alerts.try_recv() {
            self.take(alert);
        }
        for message in self.folder.drain() {
            self.queue_message(message);
        }
        let deadline = tokio::time::Instant::now() + FINAL_WAIT;
        loop {
            if posting.is_none() {
                posting = self.post_next();
            }
            let Some(current) = posting.as_mut() else {
                return;
            };
            match tokio::time::timeout_at(deadline, &mut current.task).await {
                Ok(done) => {
                    self.count_post(current, done);
                    posting = None;
                }
                Err(_) => {
                    current.task.abort();
                    let unsent = (current.kind, &current.folded);
                    let dropped = AlertResult::Dropped;
                    count_message(&self.metrics, unsent, dropped, dropped);
                    for message in self.outbox.drain(..) {
                        count_dropped(&self.metrics, &message);
                    }
                    tracing::warn!("alerts still unsent when the relay stopped were dropped");
                    return;
                }
            }
        }
    }
}

/// The end of the post in flight; never, if none is.
async fn finished(posting: &mut Option<Posting>) -> Posted {
    match posting {
        Some(posting) => (&mut posting.task).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// An alerter that is on, with a task nobody runs: tests of the parts that
/// send alerts read them with [`AlertTask::queued`].
#[cfg(test)]
pub(crate) fn test_alerter() -> (Alerter, AlertTask) {
    let settings = AlertSettings {
        client: reqwest::Client::new(),
        url: "http://127.0.0.1:9/alerts".parse().expect("a URL"),
        format: AlertFormat::Json,
        min_interval: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    };
    channel(QUEUE_CAPACITY, Some(settings), Arc::new(Metrics::new()))
}

#[cfg(test)]
impl AlertTask {
    /// The alerts queued so far.
    pub(crate) fn queued(&mut self) -> Vec<Alert> {
        std::iter::from_fn(|| self.alerts.try_recv().ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn dead(target: &str, id: u64, at_ms: u64) -> Alert {
        Alert {
            at_ms,
            ..Alert::dead_letter(target, EventId(id), "HTTP 422 (not retryable)".to_owned())
        }
    }

    #[test]
    fn alerts_within_the_interval_are_folded_and_the_last_burst_is_flushed() {
        let mut folder = Folder::default();
        let t0 = Instant::now();
        let first = folder.offer(dead("crm", 1, 1000), t0, MINUTE).unwrap();
        assert_eq!((first.folded.total(), first.since_ms), (0, None));
        for n in 2..=15 {
            let later = t0 + Duration::from_secs(n);
            assert_eq!(folder.offer(dead("crm", n, n * 1000), later, MINUTE), None);
        }
        // Another target has its own limit.
        assert!(folder.offer(dead("erp", 99, 3000), t0, MINUTE).is_some());
        assert_eq!(folder.next_due(MINUTE), Some(t0 + MINUTE));
        assert!(folder.due(t0 + Duration::from_secs(59), MINUTE).is_empty());
        let flushed = folder.due(t0 + MINUTE, MINUTE);
        assert_eq!(flushed.len(), 1, "{flushed:?}");
        let last = &flushed[0];
        assert_eq!(
            last.alert.event_id,
            Some(EventId(15)),
            "the latest alert is told"
        );
        assert_eq!((last.folded.total(), last.since_ms), (13, Some(2000)));
        // The flush was a message: the next alert waits for its interval.
        assert_eq!(
            folder.offer(dead("crm", 16, 61_000), t0 + MINUTE, MINUTE),
            None
        );
        assert_eq!(folder.drain().len(), 1);
    }

    #[test]
    fn a_held_alert_whose_time_has_come_is_counted_in_the_next_message() {
        let mut folder = Folder::default();
        let t0 = Instant::now();
        folder.offer(dead("crm", 1, 0), t0, MINUTE).unwrap();
        assert_eq!(folder.offer(dead("crm", 2, 10), t0, MINUTE), None);
        let next = folder
            .offer(dead("crm", 3, 20), t0 + MINUTE, MINUTE)
            .unwrap();
        assert_eq!((next.folded.total(), next.since_ms), (1, Some(10)));
        assert!(folder.due(t0 + MINUTE * 2, MINUTE).is_empty());
        assert!(folder.slots.is_empty(), "a quiet slot is forgotten");
    }

    #[test]
    fn a_circuit_that_flaps_ends_on_its_current_state() {
        let mut folder = Folder::default();
        let t0 = Instant::now();
        let open = folder
            .offer(Alert::circuit_open("crm", "3 failures".into()), t0, MINUTE)
            .unwrap();
        assert_eq!(open.alert.kind, AlertKind::CircuitOpen);
        let step = Duration::from_secs(1);
        assert_eq!(
            folder.offer(Alert::circuit_closed("crm"), t0 + step, MINUTE),
            None
        );
        assert_eq!(
            folder.offer(
                Alert::circuit_open("crm", "3 failures".into()),
                t0 + step * 2,
                MINUTE
            ),
            None
        );
        let flushed = folder.due(t0 + MINUTE, MINUTE);
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].alert.kind, AlertKind::CircuitOpen);
        assert_eq!(flushed[0].folded.total(), 1);
    }

    #[test]
    fn messages_name_target_reason_and_id_and_escape_slack_markup() {
        let message = Message {
            alert: Alert {
                reason: "template: <b> & co".to_owned(),
                ..dead("crm", 42, 1_740_838_920_000)
            },
            folded: KindCounts([14, 0, 0, 0, 0]),
            since_ms: Some(1_740_838_900_000),
        };
        let slack: serde_json::Value =
            serde_json::from_slice(&message.body(AlertFormat::Slack)).unwrap();
        let text = slack["text"].as_str().unwrap();
        assert!(text.contains("Event 42"), "{text}");
        assert!(text.contains("`crm`"), "{text}");
        assert!(text.contains("template: &lt;b&gt; &amp; co"), "{text}");
        assert!(
            text.contains("And 14 more dead letters since 2025-03-01T14:21:40Z"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&message.body(AlertFormat::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "kind": "dead_letter",
                "target": "crm",
                "event_id": "42",
                "reason": "template: <b> & co",
                "folded": 14,
                "since": "2025-03-01T14:21:40Z",
                "at": "2025-03-01T14:22:00Z",
            })
        );
    }

    #[test]
    fn a_dead_letter_reason_never_quotes_the_targets_answer() {
        let echo = Outcome::Reject {
            status: 422,
            body: r#"{"error":"duplicate","email":"zoe@example.com"}"#.to_owned(),
        };
        assert_eq!(dead_letter_reason(&echo, 1), "HTTP 422 (not retryable)");
        let gave_up = Outcome::Retry {
            failure: crate::deliver::Failure::Status(503),
            retry_after: None,
        };
        assert_eq!(
            dead_letter_reason(&gave_up, 9),
            "gave up after 9 attempts (the retry window closed); last: HTTP 503"
        );
        let long = Outcome::Unrenderable {
            reason: "x".repeat(1000),
        };
        assert!(dead_letter_reason(&long, 1).len() <= REASON_CHARS + 10);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let metrics = Arc::new(Metrics::new());
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, "http://127.0.0.1:9/alerts\n").unwrap();
        let config = AlertsConfig {
            url_file: Some(url_file),
            ..AlertsConfig::default()
        };
        let settings = AlertSettings::resolve(&config).unwrap();
        let (alerter, _task) = channel(2, settings, metrics.clone());
        for id in 0..5 {
            alerter.send(dead("crm", id, 0));
        }
        let dropped = metrics
            .alerts
            .with_label_values(&["dead_letter", "dropped"])
            .get();
        assert_eq!(dropped, 3);
        // Off: nothing is queued or counted.
        alerter.configure(None);
        alerter.send(dead("crm", 9, 0));
        assert!(!alerter.is_enabled());
        let dropped_after = metrics
            .alerts
            .with_label_values(&["dead_letter", "dropped"])
            .get();
        assert_eq!(dropped_after, 3);
    }

    #[test]
    fn the_url_must_be_http_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, "ftp://hooks.example/T000/s3cr3t").unwrap();
        let config = AlertsConfig {
            url_file: Some(url_file),
            ..AlertsConfig::default()
        };
        let err = format!("{:#}", AlertSettings::resolve(&config).unwrap_err());
        assert!(err.contains("alerts.url_file"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        let unset = AlertsConfig {
            url_env: Some("LEADFLO_TEST_ALERTS_UNSET".to_owned()),
            ..AlertsConfig::default()
        };
        let err = AlertSettings::resolve(&unset).unwrap_err().to_string();
        assert!(err.contains("alerts.url_env") && err.contains("LEADFLO_TEST_ALERTS_UNSET"));
        assert!(
            AlertSettings::resolve(&AlertsConfig::default())
                .unwrap()
                .is_none()
        );
    }
}
