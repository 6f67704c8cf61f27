//! The ingest endpoint: limits, the secret check, validation, append, answer.
//!
//! The order of checks is fixed and cheap-first: path (404), method (405),
//! secret (401), declared length (413, before any body byte is read), body
//! read under a size limit and a deadline (413, 408), validation (400, and the
//! body goes to quarantine), then the group commit (200 with the id only
//! after the record is on disk; 503 when the log cannot say so in time).
//!
//! This module never logs a body, a header value or the secret.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::disk::DiskGuard;
use crate::metrics::{IngestResult, Metrics, event_class};
use crate::store::{CommitError, Committer, Entry, EventId};

/// The header LeadFloAgent sends its shared secret in.
pub const SECRET_HEADER: &str = "x-webhook-secret";

/// The longest `event` value accepted.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// Checks a provided secret against the configured one (and, while a
/// rotation is under way, the previous one) in constant time.
///
/// Every side is hashed with SHA-256 first and the fixed-length digests
/// compared with `subtle`, so neither the content nor the length of a
/// configured secret shows in the comparison's timing. (Hashing the provided
/// value takes time in proportion to *its* length, which its sender knows.)
/// All configured digests are always compared, so timing does not tell
/// which one matched either.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretCheck {
    digests: Vec<[u8; 32]>,
}

impl SecretCheck {
    pub fn new(secret: &Secret) -> SecretCheck {
        SecretCheck {
            digests: vec![Sha256::digest(secret.expose()).into()],
        }
    }

    /// Also accepts `previous` (secret rotation).
    pub fn with_previous(mut self, previous: Option<&Secret>) -> SecretCheck {
        if let Some(previous) = previous {
            self.digests.push(Sha256::digest(previous.expose()).into());
        }
        self
    }

    pub fn matches(&self, provided: &[u8]) -> bool {
        let provided: [u8; 32] = Sha256::digest(provided).into();
        let mut matched = subtle::Choice::from(0);
        for digest in &self.digests {
            matched |= provided.ct_eq(digest);
        }
        matched.into()
    }
}

/// Settings the endpoint needs, resolved from the configuration.
#[derive(Clone)]
pub struct IngestSettings {
    pub path: String,
    /// `None` only in explicitly requested unauthenticated mode; a reload
    /// replaces it.
    pub secret: Arc<crate::reload::Swap<Option<SecretCheck>>>,
    pub max_body_bytes: u64,
    pub request_timeout: Duration,
    pub commit_timeout: Duration,
}

/// The ingest endpoint, shared by every connection.
pub struct Ingest {
    settings: IngestSettings,
    committer: Committer,
    disk: Arc<DiskGuard>,
    metrics: Arc<Metrics>,
}

/// Why a request was not accepted; each maps to one status and one metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    NotFound,
    MethodNotAllowed,
    MissingSecret,
    WrongSecret,
    TooLarge { limit: u64 },
    BadRequest(String),
    BodyTimeout(Duration),
    Unavailable(String),
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::MissingSecret | Rejection::WrongSecret => StatusCode::UNAUTHORIZED,
            Rejection::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Rejection::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn result(&self) -> IngestResult {
        match self {
            Rejection::NotFound => IngestResult::NotFound,
            Rejection::MethodNotAllowed => IngestResult::MethodNotAllowed,
            Rejection::MissingSecret | Rejection::WrongSecret => IngestResult::Unauthorized,
            Rejection::TooLarge { .. } => IngestResult::TooLarge,
            Rejection::BadRequest(_) => IngestResult::BadRequest,
            Rejection::BodyTimeout(_) => IngestResult::Timeout,
            Rejection::Unavailable(_) => IngestResult::Unavailable,
        }
    }

    pub fn message(&self) -> Cow<'_, str> {
        match self {
            Rejection::NotFound => "no such endpoint".into(),
            Rejection::MethodNotAllowed => "only POST is allowed here".into(),
            Rejection::MissingSecret => format!("missing {SECRET_HEADER} header").into(),
            Rejection::WrongSecret => format!("wrong {SECRET_HEADER}").into(),
            Rejection::TooLarge { limit } => {
                format!("body is larger than the limit of {limit} bytes").into()
            }
            Rejection::BadRequest(why) => why.as_str().into(),
            Rejection::BodyTimeout(limit) => {
                format!("request body not received within {} ms", limit.as_millis()).into()
            }
            Rejection::Unavailable(why) => why.as_str().into(),
        }
    }

    /// Whether the body may be left unread, so the connection must close.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            Rejection::MissingSecret
                | Rejection::WrongSecret
                | Rejection::TooLarge { .. }
                | Rejection::BodyTimeout(_)
                | Rejection::MethodNotAllowed
                | Rejection::NotFound
        )
    }
}

impl Ingest {
    pub fn new(
        settings: IngestSettings,
        committer: Committer,
        disk: Arc<DiskGuard>,
        metrics: Arc<Metrics>,
    ) -> Ingest {
        Ingest {
            settings,
            committer,
            disk,
            metrics,
        }
    }

    /// Answers one request; never fails (every outcome is a response).
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let in_flight = InFlight::begin(&self.metrics.ingest_in_flight);
        let outcome = self.accept(request).await;
        drop(in_flight);
        let response = match &outcome {
            Ok(id) => accepted_response(*id),
            Err(rejection) => rejection_response(rejection),
        };
        let result = outcome.err().map_or(IngestResult::Accepted, |r| r.result());
        self.metrics.count_request(result);
        self.metrics
            .ingest_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn accept(&self, request: Request<Incoming>) -> Result<EventId, Rejection> {
        if request.uri().path() != self.settings.path {
            return Err(Rejection::NotFound);
        }
        if request.method() != Method::POST {
            return Err(Rejection::MethodNotAllowed);
        }
        self.check_secret(request.headers())?;
        let limit = self.settings.max_body_bytes;
        if declared_length(request.headers()).is_some_and(|len| len > limit) {
            return Err(Rejection::TooLarge { limit });
        }
        if let Some(why) = self.disk.refusal() {
            return Err(Rejection::Unavailable(why));
        }
        let body = self.read_body(request.into_body()).await?;
        let event = match event_type(&body) {
            Ok(event) => event.into_owned(),
            Err(why) => return Err(self.quarantine(why, body).await),
        };
        let class = event_class(&event);
        let id = self
            .commit(Entry::Event { event, body }, Some(class))
            .await?;
        self.metrics.ingest_events.with_label_values(&[class]).inc();
        Ok(id)
    }

    fn check_secret(&self, headers: &hyper::HeaderMap) -> Result<(), Rejection> {
        let secret = self.settings.secret.load();
        let Some(check) = secret.as_ref() else {
            return Ok(());
        };
        let provided = headers.get(SECRET_HEADER).ok_or(Rejection::MissingSecret)?;
        if check.matches(provided.as_bytes()) {
            Ok(())
        } else {
            Err(Rejection::WrongSecret)
        }
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, Rejection> {
        let limit = self.settings.max_body_bytes;
        let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
        let deadline = self.settings.request_timeout;
        match tokio::time::timeout(deadline, limited.collect()).await {
            Err(_) => Err(Rejection::BodyTimeout(deadline)),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
                Err(Rejection::TooLarge { limit })
            }
            Ok(Err(_)) => Err(Rejection::BadRequest(
                "the request body could not be read".into(),
            )),
        }
    }

    /// Keeps an authenticated but malformed body for inspection, and returns
    /// the 400 for it. A failure to quarantine still answers 400: the body
    /// was the sender's error either way.
    async fn quarantine(&self, why: String, body: Bytes) -> Rejection {
        let entry = Entry::Quarantine {
            reason: why.clone(),
            body,
        };
        if let Err(err) = self.commit(entry, None).await {
            tracing::warn!(reason = %err.message(), "could not quarantine a malformed body");
        }
        Rejection::BadRequest(why)
    }

    /// Commits `entry` within the commit timeout. An event (`class` is its
    /// metric label) that was queued in time but not confirmed in time may
    /// still be stored: its 503 says so, and when it lands it is counted and
    /// logged (by id) like any stored event, and delivered.
    async fn commit(
        &self,
        entry: Entry,
        class: Option<&'static str>,
    ) -> Result<EventId, Rejection> {
        let budget = self.settings.commit_timeout;
        let deadline = tokio::time::Instant::now() + budget;
        let closed = || {
            Rejection::Unavailable("the relay is shutting down; the event was not stored".into())
        };
        let failed = || {
            Rejection::Unavailable(
                "the relay could not write the event to disk; it was not stored".into(),
            )
        };
        let mut pending = match tokio::time::timeout_at(deadline, self.committer.submit(entry))
            .await
        {
            Ok(Ok(pending)) => pending,
            Ok(Err(_)) => return Err(closed()),
            Err(_) => {
                return Err(Rejection::Unavailable(format!(
                    "the relay could not take the event for writing within {} ms; it was not stored",
                    budget.as_millis()
                )));
            }
        };
        match tokio::time::timeout_at(deadline, &mut pending).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(CommitError::Closed)) => Err(closed()),
            Ok(Err(CommitError::Failed)) => Err(failed()),
            Err(_) => {
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    if let Ok(id) = pending.await {
                        if let Some(class) = class {
                            metrics.ingest_events.with_label_values(&[class]).inc();
                        }
                        tracing::warn!(%id, "an event answered 503 for the commit timeout was stored after all; it will be delivered");
                    }
                });
                Err(Rejection::Unavailable(format!(
                    "the relay could not confirm the write to disk within {} ms; the event may \
                     still be stored and delivered (check `leadflo-relay events` before sending \
                     it again)",
                    budget.as_millis()
                )))
            }
        }
    }
}

/// Counts a request in progress until dropped (also when its connection
/// goes away mid-request and the handler's future is dropped).
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn begin(gauge: &'a prometheus::IntGauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn declared_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
}

/// The body's `event` field, or why the body is not acceptable. Only `event`
/// is read: other fields are checked for JSON syntax and otherwise ignored,
/// so new fields and new event types from LeadFloAgent pass through.
pub fn event_type(body: &[u8]) -> Result<Cow<'_, str>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("body is empty; expected a JSON object with an \"event\" field".into());
    }
    // JSON is UTF-8 (RFC 8259); serde_json does not check strings it skips.
    let text = std::str::from_utf8(body).map_err(|err| {
        format!(
            "body is not valid JSON: invalid UTF-8 at byte {}",
            err.valid_up_to()
        )
    })?;
    let event = match serde_json::from_str::<Envelope<'_>>(text) {
        Ok(envelope) => envelope.event,
        Err(err) if err.is_data() => return Err(explain_shape(text)),
        Err(err) => return Err(format!("body is not valid JSON: {err}")),
    };
    if event.is_empty() {
        return Err("\"event\" must not be empty".into());
    }
    if event.len() > MAX_EVENT_TYPE_LEN {
        return Err(format!(
            "\"event\" is longer than {MAX_EVENT_TYPE_LEN} bytes"
        ));
    }
    Ok(event)
}

/// Says what is wrong with well-formed JSON of the wrong shape, without
/// echoing any value from it (bodies hold personal data).
fn explain_shape(body: &str) -> String {
    let value: serde_json::Value = match serde_json::from_str(body) {
        Ok(value) => value,
        // Only duplicate keys make the envelope fail where a Value parses.
        Err(_) => return "body is not valid JSON".into(),
    };
    let kind = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    };
    match &value {
        serde_json::Value::Object(map) => match map.get("event") {
            None => "body has no \"event\" field".into(),
            Some(serde_json::Value::String(_)) => "body has more than one \"event\" field".into(),
            Some(other) => format!("\"event\" must be a string, got {}", kind(other)),
        },
        other => format!("body must be a JSON object, got {}", kind(other)),
    }
}

fn accepted_response(id: EventId) -> Response<Full<Bytes>> {
    let body = format!("{{\"status\":\"accepted\",\"id\":\"{id}\"}}");
    json_response(StatusCode::OK, Bytes::from(body))
}

fn rejection_response(rejection: &Rejection) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": rejection.message() }).to_string();
    let mut response = json_response(rejection.status(), Bytes::from(body));
    let headers = response.headers_mut();
    if *rejection == Rejection::MethodNotAllowed {
        headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    if rejection.closes_connection() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_reads_only_the_event_field() {
        let body =
            br#"{"event":"visitor_created","data":{"visitor":{"name":"Zo\u00eb"}},"x":[1,2]}"#;
        assert_eq!(event_type(body).unwrap(), "visitor_created");
        assert_eq!(
            event_type(br#"{"event":"brand_new_type"}"#).unwrap(),
            "brand_new_type"
        );
        assert_eq!(event_type(br#" {"event":"a\"b"} "#).unwrap(), "a\"b");
    }

    #[test]
    fn bad_bodies_are_explained_without_echoing_values() {
        let cases: [(&[u8], &str); 11] = [
            (b"", "body is empty"),
            (b"  \n", "body is empty"),
            (b"{", "not valid JSON"),
            (b"{\"event\":\"a\"} trailing", "not valid JSON"),
            (
                b"{\"event\":\"a\",\"x\":\"\xff\"}",
                "invalid UTF-8 at byte 18",
            ),
            (b"[1,2]", "must be a JSON object, got an array"),
            (
                b"\"sarah@example.com\"",
                "must be a JSON object, got a string",
            ),
            (br#"{"data":{}}"#, "no \"event\" field"),
            (
                br#"{"event":42}"#,
                "\"event\" must be a string, got a number",
            ),
            (
                br#"{"event":"a","event":"b"}"#,
                "more than one \"event\" field",
            ),
            (br#"{"event":""}"#, "must not be empty"),
        ];
        for (body, want) in cases {
            let err = event_type(body).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
            assert!(!err.contains("sarah"), "error echoes the body: {err}");
        }
        let long = format!("{{\"event\":\"{}\"}}", "a".repeat(MAX_EVENT_TYPE_LEN + 1));
        assert!(
            event_type(long.as_bytes())
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[test]
    fn during_rotation_both_secrets_are_accepted() {
        let check = SecretCheck::new(&Secret::new("new-secret"))
            .with_previous(Some(&Secret::new("old-secret")));
        assert!(check.matches(b"new-secret") && check.matches(b"old-secret"));
        assert!(!check.matches(b"other-secret") && !check.matches(b""));
    }

    #[test]
    fn secret_check_accepts_only_the_exact_secret() {
        let check = SecretCheck::new(&Secret::new("correct horse"));
        assert!(check.matches(b"correct horse"));
        for wrong in [
            &b"correct hors"[..],
            b"correct horsf",
            b"correct horse ",
            b"",
            b"CORRECT HORSE",
        ] {
            assert!(
                !check.matches(wrong),
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
    }
}
