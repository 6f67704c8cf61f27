//! `format = "slack"`: the Slack incoming-webhook message for a LeadFloAgent
//! event, `{"text": …, "blocks": […]}`, that a person reads at a glance.
//!
//! A new lead shows its name, email, phone, intent, time frame, scores,
//! location and referrer; an ended conversation whether a lead was
//! captured, its message count, duration and visitor; any other event a
//! short line with its type. A field the event lacks is left out (never
//! printed as `null`), and a body of an unexpected shape still gives a
//! message: [`message`] cannot fail.
//!
//! Every value comes from a website visitor, so each is escaped for Slack's
//! mrkdwn (`&`, `<`, `>`): a visitor cannot mention `@channel` or hide a
//! link. Values are cut to [`MAX_VALUE_CHARS`], which keeps every block
//! within Slack's limits (3000 characters a text, 2000 a field, 10 fields).
//! `text` is never empty: Slack answers `400 no_text` to a message without
//! one.

use bytes::Bytes;
use serde_json::{Value, json};

use super::EventView;

/// The longest value shown, in characters, before it is cut with `…`.
/// Escaped (each character at most 5), a value stays under Slack's 2000
/// characters a field.
pub const MAX_VALUE_CHARS: usize = 300;

/// Slack's limit of fields in one section block.
pub const MAX_FIELDS: usize = 10;

/// The message for `event`.
pub fn message(event: &EventView<'_>) -> Bytes {
    let body: Option<Value> = serde_json::from_slice(event.body).ok();
    let body = body.as_ref();
    let data = body.and_then(|b| b.get("data"));
    let mut message = match body.and_then(|b| b.get("event")).and_then(Value::as_str) {
        Some("visitor_created") => visitor_created(data.and_then(|d| d.get("visitor"))),
        Some("conversation_ended") => conversation_ended(data),
        kind => other_event(kind, body.is_some()),
    };
    message.context.extend(common_context(body, event));
    Bytes::from(message.to_json())
}

/// A message before it is JSON: every string is already mrkdwn, escaped.
#[derive(Debug, Default)]
struct Message {
    /// The notification text (also what clients without blocks show).
    text: String,
    /// The first block's line.
    headline: String,
    /// Label and value, two columns.
    fields: Vec<(String, String)>,
    /// Small print under the fields.
    context: Vec<String>,
}

impl Message {
    fn field(&mut self, label: &str, value: Option<String>) {
        if let Some(value) = value {
            self.fields.push((label.to_owned(), value));
        }
    }

    fn to_json(&self) -> Vec<u8> {
        let mut blocks = vec![section(&self.headline)];
        if !self.fields.is_empty() {
            let fields: Vec<Value> = self
                .fields
                .iter()
                .take(MAX_FIELDS)
                .map(|(label, value)| mrkdwn(&format!("*{label}*\n{value}")))
                .collect();
            blocks.push(json!({ "type": "section", "fields": fields }));
        }
        if !self.context.is_empty() {
            // Slack takes at most 10 elements in a context block.
            let elements: Vec<Value> = self.context.iter().take(10).map(|c| mrkdwn(c)).collect();
            blocks.push(json!({ "type": "context", "elements": elements }));
        }
        let message = json!({ "text": self.text, "blocks": blocks });
        serde_json::to_vec(&message).expect("a JSON value serializes")
    }
}

fn mrkdwn(text: &str) -> Value {
    json!({ "type": "mrkdwn", "text": text })
}

fn section(text: &str) -> Value {
    json!({ "type": "section", "text": mrkdwn(text) })
}

fn visitor_created(visitor: Option<&Value>) -> Message {
    let get = |key: &str| visitor.and_then(|v| v.get(key));
    let custom = get("customFields");
    let custom_field = |key: &str| custom.and_then(|c| c.get(key));
    let name = get("name").and_then(shown);
    let mut message = Message {
        text: match &name {
            Some(name) => format!("New lead: {name}"),
            None => "New lead from LeadFloAgent".to_owned(),
        },
        headline: match &name {
            Some(name) => format!("*New lead:* {name}"),
            None => "*New lead*".to_owned(),
        },
        ..Message::default()
    };
    message.field("Email", get("email").and_then(shown));
    message.field("Phone", get("phone").and_then(shown));
    message.field("Intent", custom_field("intent").and_then(shown));
    message.field("Time frame", custom_field("timeFrame").and_then(shown));
    message.field("Urgency", get("urgencyScore").and_then(score));
    message.field("Quality", get("qualityScore").and_then(score));
    let place: Vec<String> = ["city", "country"]
        .iter()
        .filter_map(|key| get(key).and_then(plain))
        .collect();
    message.field("Location", shown(&Value::String(place.join(", "))));
    message.field("Referrer", get("referrer").and_then(shown));
    // A website's own custom fields, as far as Slack's limit allows.
    if let Some(Value::Object(custom)) = custom {
        for (key, value) in custom {
            if key != "intent" && key != "timeFrame" {
                message.field(&escape(&cut(key, 50)), shown(value));
            }
        }
    }
    if let Some(id) = get("id").and_then(shown) {
        message.context.push(format!("visitor {id}"));
    }
    message
}

fn conversation_ended(data: Option<&Value>) -> Message {
    let get = |key: &str| data.and_then(|d| d.get(key));
    let captured = get("leadCaptured").and_then(Value::as_bool);
    let outcome = match captured {
        Some(true) => ": lead captured",
        Some(false) => ": no lead captured",
        None => "",
    };
    let mut message = Message {
        text: format!("Conversation ended{outcome}"),
        headline: format!("*Conversation ended*{outcome}"),
        ..Message::default()
    };
    message.field("Lead captured", get("leadCaptured").and_then(shown));
    message.field("Messages", get("messageCount").and_then(shown));
    message.field("Duration", get("durationSeconds").and_then(duration));
    message.field("Visitor", get("visitorId").and_then(shown));
    if let Some(id) = get("conversationId").and_then(shown) {
        message.context.push(format!("conversation {id}"));
    }
    message
}

fn other_event(kind: Option<&str>, is_json: bool) -> Message {
    let kind = kind.map(|k| escape(&cut(k, MAX_VALUE_CHARS)));
    let (text, headline) = match (&kind, is_json) {
        (Some(kind), _) => (
            format!("LeadFloAgent event: {kind}"),
            format!("*LeadFloAgent event:* {kind}"),
        ),
        (None, true) => (
            "LeadFloAgent event (no type)".to_owned(),
            "*LeadFloAgent event* (no type)".to_owned(),
        ),
        (None, false) => (
            "LeadFloAgent event (body is not JSON)".to_owned(),
            "*LeadFloAgent event* (body is not JSON)".to_owned(),
        ),
    };
    Message {
        text,
        headline,
        ..Message::default()
    }
}

/// When, on which website, and the relay's id of the event (to find it
/// with `leadflo-relay events`).
fn common_context(body: Option<&Value>, event: &EventView<'_>) -> Vec<String> {
    let get = |key: &str| body.and_then(|b| b.get(key));
    let mut context = Vec::new();
    if let Some(at) = get("timestamp").and_then(Value::as_str) {
        context.push(slack_date(at));
    }
    if let Some(website) = get("websiteId").and_then(shown) {
        context.push(format!("website {website}"));
    }
    context.push(format!("relay event {}", event.id));
    context
}

/// An RFC 3339 time as Slack's date token, shown in the reader's time zone;
/// anything else as escaped text.
fn slack_date(text: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    match time::OffsetDateTime::parse(text, &Rfc3339) {
        Ok(at) => {
            // The fallback is formatted anew: it holds no `|` or `>`.
            let fallback = at
                .to_offset(time::UtcOffset::UTC)
                .format(&Rfc3339)
                .unwrap_or_default();
            format!(
                "<!date^{}^{{date_short_pretty}} at {{time}}|{fallback}>",
                at.unix_timestamp()
            )
        }
        Err(_) => escape(&cut(text, MAX_VALUE_CHARS)),
    }
}

/// A scalar as escaped mrkdwn text, cut to [`MAX_VALUE_CHARS`]; `None` for
/// what is better left out: null, an empty string, an object or an array.
fn shown(value: &Value) -> Option<String> {
    plain(value).map(|text| escape(&cut(&text, MAX_VALUE_CHARS)))
}

/// A scalar as text, before it is cut and escaped.
fn plain(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(true) => Some("Yes".to_owned()),
        Value::Bool(false) => Some("No".to_owned()),
        _ => None,
    }
}

/// A 0–100 score as `72/100`.
fn score(value: &Value) -> Option<String> {
    match value {
        Value::Number(number) => Some(format!("{number}/100")),
        other => shown(other),
    }
}

/// Seconds as `8 min 7 s`.
fn duration(value: &Value) -> Option<String> {
    let Some(seconds) = value.as_f64().filter(|s| s.is_finite() && *s >= 0.0) else {
        return shown(value);
    };
    let seconds = seconds.round() as u64;
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    Some(match (hours, minutes) {
        (0, 0) => format!("{seconds} s"),
        (0, _) => format!("{minutes} min {seconds} s"),
        _ => format!("{hours} h {minutes} min"),
    })
}

/// `text` cut to `max` characters, control characters (a newline could
/// fake a field's label) as spaces.
fn cut(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Escapes Slack's mrkdwn control characters: without `<` and `>`, a value
/// cannot form a mention (`<!channel>`, `<@U123>`) or a link
/// (`<https://…|text>`).
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::template::EXAMPLES;
    use crate::store::EventId;

    fn render(body: &[u8]) -> Value {
        let body = Bytes::copy_from_slice(body);
        let event = EventView {
            id: EventId(42),
            received_at_ms: 0,
            body: &body,
        };
        serde_json::from_slice(&message(&event)).expect("the message is JSON")
    }

    fn example(event: &str) -> &'static str {
        EXAMPLES.iter().find(|e| e.event == event).unwrap().body
    }

    /// Every mrkdwn text of the message, `text` first.
    fn texts(message: &Value) -> Vec<String> {
        let mut out = vec![message["text"].as_str().unwrap().to_owned()];
        for block in message["blocks"].as_array().unwrap() {
            if let Some(text) = block["text"]["text"].as_str() {
                out.push(text.to_owned());
            }
            for item in block["fields"]
                .as_array()
                .into_iter()
                .chain(block["elements"].as_array())
                .flatten()
            {
                out.push(item["text"].as_str().unwrap().to_owned());
            }
        }
        out
    }

    fn field<'a>(message: &'a Value, label: &str) -> Option<&'a str> {
        let prefix = format!("*{label}*\n");
        message["blocks"][1]["fields"]
            .as_array()?
            .iter()
            .find_map(|f| f["text"].as_str()?.strip_prefix(prefix.as_str()))
    }

    #[test]
    fn a_new_lead_shows_every_documented_field() {
        let message = render(example("visitor_created").as_bytes());
        assert_eq!(message["text"], "New lead: Sarah Johnson");
        assert_eq!(
            message["blocks"][0]["text"]["text"],
            "*New lead:* Sarah Johnson"
        );
        for (label, want) in [
            ("Email", "sarah@example.com"),
            ("Phone", "+1 555 123 4567"),
            ("Intent", "Buy"),
            ("Time frame", "1-3 mo"),
            ("Urgency", "72/100"),
            ("Quality", "88/100"),
            ("Location", "Austin, US"),
            ("Referrer", "https://zillow.com"),
        ] {
            assert_eq!(field(&message, label), Some(want), "{label}");
        }
        let small_print = texts(&message).join(" | ");
        assert!(small_print.contains("visitor vis_xyz"), "{small_print}");
        assert!(small_print.contains("website web_abc123"), "{small_print}");
        assert!(small_print.contains("relay event 42"), "{small_print}");
        assert!(
            small_print
                .contains("<!date^1740838920^{date_short_pretty} at {time}|2025-03-01T14:22:00Z>"),
            "{small_print}"
        );
    }

    #[test]
    fn an_ended_conversation_shows_capture_count_duration_and_visitor() {
        let message = render(example("conversation_ended").as_bytes());
        assert_eq!(message["text"], "Conversation ended: lead captured");
        assert_eq!(field(&message, "Lead captured"), Some("Yes"));
        assert_eq!(field(&message, "Messages"), Some("12"));
        assert_eq!(field(&message, "Duration"), Some("8 min 7 s"));
        assert_eq!(field(&message, "Visitor"), Some("vis_xyz"));
        assert!(texts(&message).iter().any(|t| t == "conversation conv_789"));
    }

    #[test]
    fn missing_and_null_fields_are_left_out_never_printed_as_null() {
        let message = render(
            br#"{"event":"visitor_created","data":{"visitor":{"name":"Ann","email":"a@b.c",
                "phone":null,"city":"","country":"DE","customFields":{"intent":null}}}}"#,
        );
        let shown = texts(&message).join("\n");
        assert!(!shown.contains("null"), "{shown}");
        assert_eq!(field(&message, "Email"), Some("a@b.c"));
        assert_eq!(field(&message, "Location"), Some("DE"));
        for label in [
            "Phone",
            "Intent",
            "Time frame",
            "Urgency",
            "Quality",
            "Referrer",
        ] {
            assert_eq!(field(&message, label), None, "{label} was shown");
        }
        let message = render(br#"{"event":"conversation_ended","data":{"visitorId":"v1"}}"#);
        assert_eq!(message["text"], "Conversation ended");
        assert_eq!(field(&message, "Visitor"), Some("v1"));
        assert_eq!(field(&message, "Lead captured"), None);
    }

    #[test]
    fn values_are_escaped_so_visitors_cannot_mention_or_link() {
        assert_eq!(
            escape("a & <b> <!channel>"),
            "a &amp; &lt;b&gt; &lt;!channel&gt;"
        );
        let message = render(
            br#"{"event":"visitor_created","websiteId":"<!here>","data":{"visitor":{
                "name":"<!channel> & <@U123>","email":"<https://evil|click>",
                "customFields":{"<b>":"<!everyone>"}}}}"#,
        );
        let all = serde_json::to_string(&message).unwrap();
        for attack in [
            "<!channel>",
            "<@U123>",
            "<https://evil",
            "<!here>",
            "<!everyone>",
            "<b>",
        ] {
            assert!(
                !all.contains(attack),
                "{attack} reached Slack unescaped: {all}"
            );
        }
        assert_eq!(
            message["text"],
            "New lead: &lt;!channel&gt; &amp; &lt;@U123&gt;"
        );
        assert_eq!(field(&message, "Email"), Some("&lt;https://evil|click&gt;"));
        assert_eq!(field(&message, "&lt;b&gt;"), Some("&lt;!everyone&gt;"));
        let message = render(br#"{"event":"<!channel>"}"#);
        assert_eq!(message["text"], "LeadFloAgent event: &lt;!channel&gt;");
    }

    #[test]
    fn unexpected_bodies_still_give_a_message_with_text() {
        for body in [
            &b"not json at all"[..],
            b"",
            b"[1,2]",
            b"{}",
            br#"{"event":"visitor_created"}"#,
            br#"{"event":"visitor_created","data":{"visitor":"Sarah"}}"#,
            br#"{"event":"conversation_ended","data":[]}"#,
            br#"{"event":42,"timestamp":"yesterday"}"#,
            br#"{"event":"lead_scored","data":{"score":9}}"#,
        ] {
            let message = render(body);
            let text = message["text"].as_str().unwrap_or("");
            assert!(
                !text.is_empty(),
                "no text for {:?}",
                String::from_utf8_lossy(body)
            );
            assert!(!message["blocks"].as_array().unwrap().is_empty());
        }
        assert_eq!(
            render(b"not json")["text"],
            "LeadFloAgent event (body is not JSON)"
        );
        assert_eq!(render(b"{}")["text"], "LeadFloAgent event (no type)");
        assert_eq!(
            render(br#"{"event":"lead_scored"}"#)["text"],
            "LeadFloAgent event: lead_scored"
        );
        assert_eq!(
            render(br#"{"event":"visitor_created","data":{"visitor":"Sarah"}}"#)["text"],
            "New lead from LeadFloAgent"
        );
    }

    #[test]
    fn long_values_are_cut_to_stay_within_slack_limits() {
        let long = "<&>".repeat(5000);
        let mut custom = serde_json::Map::new();
        for n in 0..20 {
            custom.insert(format!("{long}{n}"), Value::String(long.clone()));
        }
        let body = json!({
            "event": "visitor_created",
            "timestamp": long,
            "websiteId": long,
            "data": {"visitor": {"id": long, "name": long, "email": long, "phone": long,
                "city": long, "country": long, "referrer": long, "customFields": custom}},
        });
        let message = render(&serde_json::to_vec(&body).unwrap());
        for text in texts(&message) {
            assert!(
                text.chars().count() <= 3000,
                "{} characters",
                text.chars().count()
            );
        }
        let blocks = message["blocks"].as_array().unwrap();
        assert!(blocks[1]["fields"].as_array().unwrap().len() <= MAX_FIELDS);
        for field in blocks[1]["fields"].as_array().unwrap() {
            assert!(field["text"].as_str().unwrap().chars().count() <= 2000);
        }
        assert!(message["text"].as_str().unwrap().ends_with('…'));
    }

    #[test]
    fn durations_read_as_minutes_and_hours() {
        assert_eq!(duration(&json!(45)).unwrap(), "45 s");
        assert_eq!(duration(&json!(487)).unwrap(), "8 min 7 s");
        assert_eq!(duration(&json!(3725.4)).unwrap(), "1 h 2 min");
        assert_eq!(duration(&json!("a while")).unwrap(), "a while");
        assert_eq!(duration(&json!(null)), None);
    }
}
