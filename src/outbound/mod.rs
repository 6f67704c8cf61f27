//! What a target is sent, beyond the event's bytes: the body in the
//! target's format (raw, a Slack message, a template), extra headers, the
//! statuses that count as delivered or worth retrying, and signing.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Outbound`]: built from a target's configuration, renders a body |
//! | [`slack`] | the Slack message for a LeadFloAgent event |
//! | [`template`] | minijinja templates, checked against LeadFloAgent's examples |
//! | [`headers`] | `[targets.headers]`, read from literals, variables and files |
//! | [`signing`] | Standard Webhooks signatures |
//!
//! Rendered bodies hold personal data: nothing here logs them, and a render
//! error names the template's problem, never a value.

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue};

use crate::config::{Format, TargetConfig};
use crate::store::EventId;

pub mod headers;
pub mod signing;
pub mod slack;
pub mod template;

/// An event as a format sees it.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub id: EventId,
    pub received_at_ms: u64,
    /// The exact bytes LeadFloAgent sent.
    pub body: &'a Bytes,
}

/// How a target's body is made.
#[derive(Debug)]
pub enum Shape {
    Raw,
    Slack,
    Template(template::Template),
}

/// Which answers count as delivered and which are retried, beyond the
/// defaults (2xx delivered; 408, 425, 429 and 5xx retried).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusRules {
    pub retry_on: Vec<u16>,
    pub delivered_on: Vec<u16>,
}

/// What a status means for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Delivered,
    Retry,
    Reject,
}

impl StatusRules {
    pub fn classify(&self, status: u16) -> StatusClass {
        if (200..300).contains(&status) || self.delivered_on.contains(&status) {
            StatusClass::Delivered
        } else if crate::deliver::is_retryable_status(status) || self.retry_on.contains(&status) {
            StatusClass::Retry
        } else {
            StatusClass::Reject
        }
    }
}

/// Everything about a target's requests that its configuration decides.
#[derive(Debug)]
pub struct Outbound {
    pub shape: Shape,
    pub content_type: HeaderValue,
    /// `[targets.headers]`, resolved (values marked sensitive).
    pub headers: HeaderMap,
    pub signer: Option<signing::Signer>,
    pub statuses: StatusRules,
}

impl Outbound {
    /// Reads what `config` names (template file, header values, signing
    /// secret) and checks a template against LeadFloAgent's examples.
    pub fn build(config: &TargetConfig) -> anyhow::Result<Outbound> {
        let (shape, content_type) = match config.format {
            Format::Raw => (Shape::Raw, "application/json"),
            Format::Slack => (Shape::Slack, "application/json"),
            Format::Template => (
                Shape::Template(template::Template::from_config(config)?),
                config.content_type.as_deref().unwrap_or("application/json"),
            ),
        };
        let content_type = HeaderValue::from_str(content_type).map_err(|_| {
            anyhow::anyhow!(
                "target {}: content_type: not a valid header value",
                config.name
            )
        })?;
        Ok(Outbound {
            shape,
            content_type,
            headers: headers::resolve(config)?,
            signer: signing::Signer::from_config(config)?,
            statuses: StatusRules {
                retry_on: config.retry_on.clone(),
                delivered_on: config.delivered_on.clone(),
            },
        })
    }

    /// What differs from `other` in values the configuration's keys do not
    /// show (a template file's text, header values and the signing secret
    /// read from files or variables), for a reload to apply and report.
    pub fn changed_values(&self, other: &Outbound) -> Vec<String> {
        let template = |o: &Outbound| match &o.shape {
            Shape::Template(template) => Some(template.source().to_owned()),
            _ => None,
        };
        let mut keys = Vec::new();
        if template(self) != template(other) {
            keys.push("template".to_owned());
        }
        if self.headers != other.headers {
            keys.push("headers".to_owned());
        }
        if self.signer != other.signer {
            keys.push("signing".to_owned());
        }
        keys
    }

    /// The request body for `event`; an error says why it cannot be made
    /// (a template that fails on this event), never what the event holds.
    pub fn render(&self, event: &EventView<'_>) -> Result<Bytes, String> {
        match &self.shape {
            Shape::Raw => Ok(event.body.clone()),
            Shape::Slack => Ok(slack::message(event)),
            Shape::Template(template) => template.render(event),
        }
    }
}
