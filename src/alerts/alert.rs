//! What an alert is: its kind, the family whose rate limit it shares, the
//! alert itself with its constructors, and the reason a dead letter is
//! told with. Never holds a body or a target's answer: an alert holds no
//! personal data.

use crate::deliver::Outcome;
use crate::store::EventId;

/// The most of a template error an alert quotes.
pub(super) const REASON_CHARS: usize = 200;

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
    pub(super) fn family(self) -> Family {
        match self {
            AlertKind::DeadLetter => Family::DeadLetters,
            AlertKind::CircuitOpen | AlertKind::CircuitClosed => Family::Circuit,
            AlertKind::DiskLow | AlertKind::DiskOk => Family::Disk,
        }
    }
}

/// Alerts that share a rate limit (per target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Family {
    DeadLetters,
    Circuit,
    Disk,
}

impl Family {
    pub(super) fn noun(self) -> &'static str {
        match self {
            Family::DeadLetters => "dead letters",
            Family::Circuit => "circuit changes",
            Family::Disk => "disk space changes",
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
pub struct KindCounts(pub(super) [u64; 5]);

impl KindCounts {
    pub(super) fn add(&mut self, kind: AlertKind) {
        self.0[kind as usize] += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub(super) fn each(&self) -> impl Iterator<Item = (AlertKind, u64)> + '_ {
        AlertKind::ALL.into_iter().zip(self.0.iter().copied())
    }
}

/// A dead-letter alert for `target`'s event `id` at `at_ms`, for tests.
#[cfg(test)]
pub(super) fn dead(target: &str, id: u64, at_ms: u64) -> Alert {
    Alert {
        at_ms,
        ..Alert::dead_letter(target, EventId(id), "HTTP 422 (not retryable)".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
