//! What became of each alert ([`AlertResult`]), counted once in
//! `leadflo_relay_alerts_total` when its fate is known.

use super::alert::{AlertKind, KindCounts};
use super::message::Message;
use crate::metrics::Metrics;

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

/// Counts one alert in `leadflo_relay_alerts_total`.
pub(super) fn count(metrics: &Metrics, kind: AlertKind, result: AlertResult) {
    metrics
        .alerts
        .with_label_values(&[kind.label(), result.label()])
        .inc();
}

/// Counts the alerts of a message whose post ended: its own as `result`,
/// those folded into it as `folded_result`.
pub(super) fn count_message(
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
pub(super) fn count_dropped(metrics: &Metrics, message: &Message) {
    let dropped = AlertResult::Dropped;
    count_message(
        metrics,
        (message.alert.kind, &message.folded),
        dropped,
        dropped,
    );
}
