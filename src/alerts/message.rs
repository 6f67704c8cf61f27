//! The message a channel is sent: its text (Slack `mrkdwn`, escaped) or
//! its JSON object. Made from an alert and the count of those folded into
//! it; never quotes more than the alert holds.

use super::alert::{Alert, AlertKind, KindCounts};
use crate::config::AlertFormat;
use crate::node::NodeId;

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
    /// The request body in `format`, naming the relay's `node` (several
    /// relays may post to one channel).
    pub fn body(&self, format: AlertFormat, node: Option<NodeId>) -> Vec<u8> {
        let value = match format {
            AlertFormat::Slack => serde_json::json!({ "text": self.slack_text(node) }),
            AlertFormat::Json => self.json(node),
        };
        serde_json::to_vec(&value).expect("a JSON value serializes")
    }

    fn json(&self, node: Option<NodeId>) -> serde_json::Value {
        let alert = &self.alert;
        serde_json::json!({
            "node": node.map(|n| n.0),
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
    fn slack_text(&self, node: Option<NodeId>) -> String {
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
        let relay = match node {
            Some(node) => format!("leadflo-relay (node {node})"),
            None => "leadflo-relay".to_owned(),
        };
        let mut text = format!("{relay}: {what} ({})", crate::ops::rfc3339(alert.at_ms));
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

/// Alerts go to Slack too: the same escaping as a target's messages.
pub use crate::outbound::slack::escape;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::alert::dead;

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
        let node = Some(NodeId(7));
        let slack: serde_json::Value =
            serde_json::from_slice(&message.body(AlertFormat::Slack, node)).unwrap();
        let text = slack["text"].as_str().unwrap();
        assert!(text.starts_with("leadflo-relay (node 7): "), "{text}");
        assert!(text.contains("Event 42"), "{text}");
        assert!(text.contains("`crm`"), "{text}");
        assert!(text.contains("template: &lt;b&gt; &amp; co"), "{text}");
        assert!(
            text.contains("And 14 more dead letters since 2025-03-01T14:21:40Z"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&message.body(AlertFormat::Json, node)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "node": 7,
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
}
