//! Operator actions on the log: replay, event listing, dead letters, stats.
//!
//! Each action is a function of an open [`Store`] and a request type, and
//! returns a report type; both are serde types. The admin API calls these
//! functions inside a running relay and sends the report as JSON; the CLI
//! calls the same functions on a data directory opened offline, or decodes
//! the same report from the admin API. So online and offline behave alike.
//!
//! Reports never carry secrets; event bodies only where asked for
//! (`events show`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::store::{DeadLetter, EventId, Store, StoreError};

/// Events re-queued per log batch.
const REPLAY_CHUNK: usize = 1000;

/// Why an operator action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    Invalid(String),
    #[error("no event with id {0}")]
    NoSuchEvent(EventId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What operator actions need to know of the configuration.
#[derive(Debug, Clone, Default)]
pub struct TargetsView {
    /// Configured targets and their event filters (`None`: every event).
    /// Offline, also the targets found only in the log.
    pub targets: Vec<(String, Option<Vec<String>>)>,
    /// Of `targets`, those the configuration is known not to list (offline
    /// with `--config`: found in the log only). Offline without a
    /// configuration every target in the log counts as configured.
    pub removed: std::collections::BTreeSet<String>,
}

impl TargetsView {
    pub fn from_config(config: &crate::config::Config) -> TargetsView {
        TargetsView {
            targets: config
                .targets
                .iter()
                .map(|t| (t.name.clone(), t.events.clone()))
                .collect(),
            removed: Default::default(),
        }
    }

    /// Whether `target` is a configured target (see [`TargetsView::removed`]).
    pub fn is_configured(&self, target: &str) -> bool {
        !self.removed.contains(target) && self.targets.iter().any(|(name, _)| name == target)
    }

    pub fn names(&self) -> Vec<String> {
        self.targets.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Refuses a target that is not configured: nothing would deliver what
    /// an operator queues for it.
    fn check(&self, target: &str) -> Result<(), OpsError> {
        if self.is_configured(target) {
            return Ok(());
        }
        let known: Vec<String> = self
            .names()
            .into_iter()
            .filter(|name| !self.removed.contains(name))
            .collect();
        let known = if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        };
        if self.removed.contains(target) {
            return Err(OpsError::Invalid(format!(
                "target {target:?} is no longer configured (configured targets: {known}); \
                 `leadflo-relay forget-target {target}` drops what waits for it"
            )));
        }
        Err(OpsError::Invalid(format!(
            "unknown target {target:?}; configured targets: {known}"
        )))
    }

    fn subscribes(&self, target: &str, event: &str) -> bool {
        self.targets
            .iter()
            .find(|(name, _)| name == target)
            .is_some_and(|(_, events)| events.as_ref().is_none_or(|e| e.iter().any(|x| x == event)))
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(ms: u64) -> String {
    let time = time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(ms);
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| ms.to_string())
}

/// Parses an RFC 3339 time (any offset) to milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|err| {
            format!("{text:?} is not an RFC 3339 time such as 2025-03-01T14:22:00Z ({err})")
        })?;
    let ms = time.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).map_err(|_| format!("{text:?} is before 1970"))
}

// ---- replay ----------------------------------------------------------------

/// `replay`: which events to send to a target again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReplayRequest {
    pub target: String,
    /// Received at or after (ms since the epoch).
    #[serde(default)]
    pub from_ms: Option<u64>,
    /// Received at or before; defaults to now.
    #[serde(default)]
    pub to_ms: Option<u64>,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub ids: Option<Vec<EventId>>,
    /// Replay the target's dead letters (they leave the dead-letter store).
    #[serde(default)]
    pub dead_letters: bool,
    #[serde(default)]
    pub dry_run: bool,
    /// Deliveries per second for the replayed events (spaced due times).
    #[serde(default)]
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayReport {
    pub target: String,
    /// Events that match the filters.
    pub matched: usize,
    /// Of those, already waiting at the target (left as they are).
    pub already_queued: usize,
    /// Queued now (0 on a dry run).
    pub enqueued: usize,
    pub dry_run: bool,
}

impl ReplayRequest {
    fn validate(&self) -> Result<(), OpsError> {
        if self.from_ms.is_none() && self.ids.is_none() && !self.dead_letters {
            return Err(OpsError::Invalid(
                "replay needs --from (or --ids, or --dead-letters): a full-history resend must be \
                 asked for explicitly, e.g. --from 1970-01-01T00:00:00Z"
                    .into(),
            ));
        }
        if let (Some(from), Some(to)) = (self.from_ms, self.to_ms) {
            if from > to {
                return Err(OpsError::Invalid("--from is after --to".into()));
            }
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(OpsError::Invalid(format!(
                    "--rate must be above 0, got {rate}"
                )));
            }
        }
        Ok(())
    }

    fn in_window(&self, received_at_ms: u64, to_ms: u64) -> bool {
        self.from_ms.is_none_or(|from| received_at_ms >= from) && received_at_ms <= to_ms
    }
}

/// Queues the matching events for `request.target` again, with their
/// original ids (so the same `idempotency-key`) and fresh attempt counts.
/// `progress` is called with the number of events looked at so far.
pub fn replay(
    store: &Store,
    targets: &TargetsView,
    request: &ReplayRequest,
    progress: &mut dyn FnMut(usize),
) -> Result<ReplayReport, OpsError> {
    request.validate()?;
    targets.check(&request.target)?;
    let to_ms = request.to_ms.unwrap_or_else(now_ms);
    let mut candidates = Vec::new();
    // Only the types the target takes: an event it never subscribed to was
    // never sent to it, so it is not "sent again".
    let wanted = |event: &str| {
        request.event.as_deref().is_none_or(|e| e == event)
            && targets.subscribes(&request.target, event)
    };
    if let Some(ids) = &request.ids {
        // An id named twice is one event: matched, and counted, once.
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                continue;
            }
            let event = store.event(id)?.ok_or(OpsError::NoSuchEvent(id))?;
            if wanted(&event.event) && request.in_window(event.received_at_ms, to_ms) {
                candidates.push(id);
            }
        }
    } else if request.dead_letters {
        for dead in store.dead_letters(&request.target)? {
            let Some(event) = store.event(dead.id)? else {
                continue;
            };
            if wanted(&event.event) && request.in_window(event.received_at_ms, to_ms) {
                candidates.push(dead.id);
            }
        }
    } else {
        let from_ms = request.from_ms.unwrap_or(0);
        for event in store.events_between(from_ms, to_ms) {
            let event = event?;
            if wanted(&event.event) {
                candidates.push(event.id);
            }
            if candidates.len() % REPLAY_CHUNK == 0 {
                progress(candidates.len());
            }
        }
    }
    let mut report = ReplayReport {
        target: request.target.clone(),
        matched: candidates.len(),
        dry_run: request.dry_run,
        ..ReplayReport::default()
    };
    if request.dry_run {
        for &id in &candidates {
            report.already_queued += usize::from(store.is_queued(&request.target, id)?);
        }
        return Ok(report);
    }
    let spacing_ms = request.rate.map_or(0, |rate| (1000.0 / rate).ceil() as u64);
    let start_ms = now_ms();
    for (n, chunk) in candidates.chunks(REPLAY_CHUNK).enumerate() {
        let first_due = start_ms + spacing_ms.saturating_mul(report.enqueued as u64);
        let queued = store.enqueue(&request.target, chunk, first_due, spacing_ms)?;
        report.enqueued += queued;
        report.already_queued += chunk.len() - queued;
        crate::crashpoint::reached(crate::crashpoint::REPLAY_CHUNK);
        progress((n + 1) * REPLAY_CHUNK);
    }
    Ok(report)
}

// ---- events ----------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EventsQuery {
    #[serde(default)]
    pub from_ms: Option<u64>,
    #[serde(default)]
    pub to_ms: Option<u64>,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub quarantined: bool,
}

/// One line of `events list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventSummary {
    pub id: EventId,
    pub received_at: String,
    /// The event type, or for a quarantined body why it was refused.
    pub event: String,
    pub bytes: usize,
}

pub const DEFAULT_LIMIT: usize = 50;

/// The newest matching events (or quarantined bodies), newest first.
pub fn list_events(store: &Store, query: &EventsQuery) -> Result<Vec<EventSummary>, OpsError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    let (from_ms, to_ms) = (
        query.from_ms.unwrap_or(0),
        query.to_ms.unwrap_or(u64::MAX / 2000),
    );
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    if query.quarantined {
        let all: Vec<_> = store.quarantined().collect::<Result<_, _>>()?;
        for q in all.into_iter().rev() {
            if q.received_at_ms >= from_ms && q.received_at_ms <= to_ms {
                out.push(EventSummary {
                    id: q.id,
                    received_at: rfc3339(q.received_at_ms),
                    event: q.reason,
                    bytes: q.body.len(),
                });
            }
            if out.len() >= limit {
                break;
            }
        }
        return Ok(out);
    }
    for event in store.events_between(from_ms, to_ms).rev() {
        let event = event?;
        if query.event.as_deref().is_some_and(|e| e != event.event) {
            continue;
        }
        out.push(EventSummary {
            id: event.id,
            received_at: rfc3339(event.received_at_ms),
            event: event.event,
            bytes: event.body.len(),
        });
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// Where one event stands at one target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Subscribed, not waiting, not dead: the target answered 2xx (or the
    /// target was added after the event, which does not resend history).
    Delivered,
    Queued,
    Dead {
        reason: String,
        attempts: u32,
        last_status: u16,
    },
    NotSubscribed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventDetail {
    pub id: EventId,
    pub received_at: String,
    pub event: String,
    pub bytes: usize,
    /// The stored body as text (lossy only if it is not UTF-8, which ingest
    /// refuses); `events show --raw` prints the exact bytes instead.
    pub body: String,
    pub deliveries: BTreeMap<String, DeliveryStatus>,
}

pub fn show_event(
    store: &Store,
    targets: &TargetsView,
    id: EventId,
) -> Result<EventDetail, OpsError> {
    let event = store.event(id)?.ok_or(OpsError::NoSuchEvent(id))?;
    let mut deliveries = BTreeMap::new();
    for name in targets.names() {
        let status = if store.is_queued(&name, id)? {
            DeliveryStatus::Queued
        } else if let Some(dead) = store.dead_letter(&name, id)? {
            DeliveryStatus::Dead {
                reason: dead.reason,
                attempts: dead.attempts,
                last_status: dead.last_status,
            }
        } else if targets.subscribes(&name, &event.event) {
            DeliveryStatus::Delivered
        } else {
            DeliveryStatus::NotSubscribed
        };
        deliveries.insert(name, status);
    }
    Ok(EventDetail {
        id,
        received_at: rfc3339(event.received_at_ms),
        event: event.event,
        bytes: event.body.len(),
        body: String::from_utf8_lossy(&event.body).into_owned(),
        deliveries,
    })
}

/// The exact stored bytes of an event.
pub fn raw_event(store: &Store, id: EventId) -> Result<Vec<u8>, OpsError> {
    Ok(store.event(id)?.ok_or(OpsError::NoSuchEvent(id))?.body)
}

// ---- dead letters ----------------------------------------------------------

/// Which dead letters an action applies to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DlqSelection {
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub ids: Option<Vec<EventId>>,
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetterView {
    pub target: String,
    pub id: EventId,
    pub attempts: u32,
    pub last_status: u16,
    pub first_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub reason: String,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(dead: DeadLetter) -> Self {
        let at = |ms: u64| (ms > 0).then(|| rfc3339(ms));
        DeadLetterView {
            target: dead.target,
            id: dead.id,
            attempts: dead.attempts,
            last_status: dead.last_status,
            first_attempt_at: at(dead.first_attempt_ms),
            last_attempt_at: at(dead.last_attempt_ms),
            reason: dead.reason,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DlqReport {
    /// Dead letters selected.
    pub matched: usize,
    /// Queued again (retry) or removed (purge).
    pub changed: usize,
}

fn select_dead(store: &Store, selection: &DlqSelection) -> Result<Vec<DeadLetter>, OpsError> {
    let all = store.all_dead_letters()?;
    Ok(all
        .into_iter()
        .filter(|d| selection.target.as_deref().is_none_or(|t| t == d.target))
        .filter(|d| selection.ids.as_ref().is_none_or(|ids| ids.contains(&d.id)))
        .collect())
}

pub fn list_dead_letters(
    store: &Store,
    target: Option<&str>,
) -> Result<Vec<DeadLetterView>, OpsError> {
    let selection = DlqSelection {
        target: target.map(str::to_owned),
        ids: None,
        all: true,
    };
    Ok(select_dead(store, &selection)?
        .into_iter()
        .map(DeadLetterView::from)
        .collect())
}

fn check_selection(selection: &DlqSelection) -> Result<(), OpsError> {
    match (&selection.ids, selection.all) {
        (None, false) => Err(OpsError::Invalid(
            "name the dead letters with --ids, or pass --all".into(),
        )),
        (Some(_), true) => Err(OpsError::Invalid(
            "--ids and --all exclude each other".into(),
        )),
        _ => Ok(()),
    }
}

/// Queues the selected dead letters again (attempts start afresh).
/// Dead letters of a target that is not configured stay where they are:
/// no dispatcher would ever read them from the queue.
pub fn retry_dead_letters(
    store: &Store,
    targets: &TargetsView,
    selection: &DlqSelection,
) -> Result<DlqReport, OpsError> {
    check_selection(selection)?;
    if let Some(target) = &selection.target {
        targets.check(target)?;
    }
    let selected = select_dead(store, selection)?;
    let mut by_target: BTreeMap<String, Vec<EventId>> = BTreeMap::new();
    for dead in &selected {
        if targets.check(&dead.target).is_err() {
            continue;
        }
        by_target
            .entry(dead.target.clone())
            .or_default()
            .push(dead.id);
    }
    let mut changed = 0;
    for (target, ids) in by_target {
        changed += store.enqueue(&target, &ids, now_ms(), 0)?;
    }
    Ok(DlqReport {
        matched: selected.len(),
        changed,
    })
}

/// Removes the selected dead letters for good.
pub fn purge_dead_letters(store: &Store, selection: &DlqSelection) -> Result<DlqReport, OpsError> {
    check_selection(selection)?;
    let selected: Vec<(String, EventId)> = select_dead(store, selection)?
        .into_iter()
        .map(|d| (d.target, d.id))
        .collect();
    let changed = store.purge_dead_letters(&selected)?;
    Ok(DlqReport {
        matched: selected.len(),
        changed,
    })
}

// ---- forgetting a removed target --------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForgetRequest {
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForgetReport {
    pub target: String,
    /// Deliveries that were waiting for the target, dropped.
    pub waiting: u64,
    /// Its dead letters, dropped.
    pub dead_letters: u64,
}

/// Drops what the log holds for a target the configuration no longer
/// lists: its waiting deliveries and dead letters, which would otherwise
/// keep their events from ever being pruned. A configured target is
/// refused: its dispatcher still works on them.
pub fn forget_target(
    store: &Store,
    targets: &TargetsView,
    target: &str,
) -> Result<ForgetReport, OpsError> {
    if targets.is_configured(target) {
        return Err(OpsError::Invalid(format!(
            "target {target:?} is configured: remove it from the configuration and restart \
             the relay first (offline, pass the relay's configuration with --config: without \
             one, every target in the log counts as configured)"
        )));
    }
    // The log's own record of the last start: a configuration file given
    // offline may be stale, and forgetting a target that the relay still
    // serves would lose what waits for it.
    if store.has_watermark(target)? {
        return Err(OpsError::Invalid(format!(
            "target {target:?} was configured when the relay last started (it still has a \
             watermark): start the relay without it first, then forget it"
        )));
    }
    if !store.targets_in_log()?.contains(target) {
        return Err(OpsError::Invalid(format!(
            "the log holds no deliveries or dead letters for a target {target:?}"
        )));
    }
    let (waiting, dead_letters) = store.forget_target(target)?;
    Ok(ForgetReport {
        target: target.to_owned(),
        waiting,
        dead_letters,
    })
}

// ---- stats -----------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetReport {
    pub name: String,
    /// False for a target removed from the configuration that still holds
    /// waiting deliveries or dead letters (see [`forget_target`]).
    #[serde(default = "configured_default")]
    pub configured: bool,
    pub backlog: u64,
    pub oldest_age_seconds: Option<f64>,
    pub dead_letters: u64,
    /// `open`, `closed`, or `unknown` when the relay is not running;
    /// `none` for a target not configured.
    pub circuit: String,
    pub last_success_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    /// Whether the figures come from a running relay.
    pub online: bool,
    pub targets: Vec<TargetReport>,
    pub store_size_bytes: u64,
    pub disk_free_bytes: u64,
    /// The node identity mixed into the relay's event ids (see
    /// [`crate::node`]); `None` before the first `serve` made one.
    #[serde(default)]
    pub node_id: Option<u16>,
}

/// Runtime state only a running relay knows, per target.
pub trait LiveState {
    fn circuit_open(&self, target: &str) -> Option<bool>;
    fn last_success_ms(&self, target: &str) -> Option<u64>;
}

fn configured_default() -> bool {
    true
}

pub fn stats(
    store: &Store,
    targets: &TargetsView,
    live: Option<&dyn LiveState>,
    node: Option<crate::node::NodeId>,
) -> Result<StatsReport, OpsError> {
    let now = now_ms();
    let mut reports = Vec::new();
    // Online, a target removed from the configuration is not in `targets`,
    // but what waits for it still holds its events in the log.
    let mut names = targets.names();
    for name in store.targets_in_log()? {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    for name in names {
        let stats = store.target_stats(&name)?;
        let configured = targets.is_configured(&name);
        // A target not configured has no dispatcher, so no circuit (and
        // asking the metrics would make a series for it).
        let live = live.filter(|_| configured);
        let circuit = match live.and_then(|l| l.circuit_open(&name)) {
            Some(true) => "open",
            Some(false) => "closed",
            None if configured => "unknown",
            None => "none",
        };
        reports.push(TargetReport {
            backlog: stats.queued,
            oldest_age_seconds: stats
                .oldest_enqueued_ms
                .map(|t| now.saturating_sub(t) as f64 / 1000.0),
            dead_letters: stats.dead,
            circuit: circuit.to_owned(),
            last_success_at: live.and_then(|l| l.last_success_ms(&name)).map(rfc3339),
            configured,
            name,
        });
    }
    let dir = store.data_dir();
    Ok(StatsReport {
        online: live.is_some(),
        targets: reports,
        store_size_bytes: crate::disk::store_size(dir).unwrap_or(0),
        disk_free_bytes: crate::disk::available_space(dir).unwrap_or(0),
        node_id: node.map(|n| n.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_accepts_offsets() {
        let ms = parse_rfc3339("2025-03-01T14:22:00.000Z").unwrap();
        assert_eq!(rfc3339(ms), "2025-03-01T14:22:00Z");
        assert_eq!(parse_rfc3339("2025-03-01T15:22:00+01:00").unwrap(), ms);
        assert!(parse_rfc3339("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn replay_refuses_an_unbounded_resend() {
        let request = ReplayRequest {
            target: "crm".into(),
            ..ReplayRequest::default()
        };
        assert!(
            request
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--from")
        );
        let with_ids = ReplayRequest {
            ids: Some(vec![EventId(1)]),
            ..request.clone()
        };
        assert!(with_ids.validate().is_ok());
        let backwards = ReplayRequest {
            from_ms: Some(10),
            to_ms: Some(5),
            ..request
        };
        assert!(backwards.validate().is_err());
    }
}
