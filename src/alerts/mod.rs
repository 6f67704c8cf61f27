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
//!
//! One file per concern:
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the [`Alerter`] handle, [`start`] and [`channel`] |
//! | [`alert`] | alert kinds, their families, the [`Alert`], a dead letter's reason |
//! | [`message`] | a message's Slack text (`mrkdwn` escaped) or JSON object |
//! | [`fold`] | the rate limit: alerts held and told as a count ([`Folder`]) |
//! | [`settings`] | `[alerts]` read: the URL, the format, the HTTP client |
//! | [`post`] | one message posted, retried at most once ([`PostError`]) |
//! | [`task`] | the task that folds, posts and flushes at stop ([`AlertTask`]) |
//! | [`count`] | what became of each alert, in `leadflo_relay_alerts_total` |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, watch};

use crate::config::AlertsConfig;
use crate::metrics::Metrics;

mod alert;
mod count;
mod fold;
mod message;
mod post;
mod settings;
mod task;

pub use alert::{Alert, AlertKind, KindCounts, dead_letter_reason};
pub use count::AlertResult;
pub use fold::Folder;
pub use message::{Message, escape};
pub use post::PostError;
pub use settings::AlertSettings;
pub use task::AlertTask;

use count::count;

/// Alerts waiting for the task; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 1024;

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
    (alerter, AlertTask::new(alerts, watched, metrics))
}

/// An alerter that is on, with a task nobody runs: tests of the parts that
/// send alerts read them with [`AlertTask::queued`].
#[cfg(test)]
pub(crate) fn test_alerter() -> (Alerter, AlertTask) {
    use std::time::Duration;

    crate::deliver::install_crypto_provider();
    let settings = AlertSettings {
        client: reqwest::Client::new(),
        url: "http://127.0.0.1:9/alerts".parse().expect("a URL"),
        format: crate::config::AlertFormat::Json,
        min_interval: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    };
    channel(QUEUE_CAPACITY, Some(settings), Arc::new(Metrics::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::alert::dead;

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
}
