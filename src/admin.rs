//! The admin listener: health, readiness, metrics, and the admin API the
//! CLI uses while `serve` runs (sled allows one process per database, so
//! the CLI must not open a running relay's data directory).
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | open, for probes and Prometheus |
//! | `GET /api/stats` | per-target backlog, dead letters, circuit, last success; disk |
//! | `GET /api/events?from_ms&to_ms&event&limit&quarantined` | newest events first |
//! | `GET /api/events/{id}`, `GET /api/events/{id}/raw` | one event, as JSON or its exact bytes |
//! | `POST /api/replay` | queue events for a target again |
//! | `GET /api/dlq?target=` | dead letters |
//! | `POST /api/dlq/retry`, `POST /api/dlq/purge` | act on dead letters |
//! | `POST /api/targets/forget` | drop what waits for a target no longer configured |
//! | `POST /api/reload` | read the configuration and secret files again ([`crate::reload`]) |
//!
//! `/api/*` requires `Authorization: Bearer <token>` whenever an admin token
//! is configured, which `serve` insists on when the listener is not on
//! loopback. The token is compared in constant time.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::disk::DiskGuard;
use crate::ingest::{SecretCheck, json_response};
use crate::metrics::Metrics;
use crate::ops::{self, LiveState, OpsError};
use crate::reload::{AdminTargets, Reloader, ShuttingDown, Swap};
use crate::store::{EventId, Store};

pub use crate::config::ADMIN_TOKEN_ENV;

/// Largest admin request body (replay id lists).
const MAX_ADMIN_BODY: usize = 4 * 1024 * 1024;

/// Everything the admin routes read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub disk: Arc<DiskGuard>,
    /// The configured targets and their wakes, as the last reload left them.
    pub targets: Arc<Swap<AdminTargets>>,
    /// Runs `POST /api/reload`.
    pub reloader: Arc<Reloader>,
    /// When set, `/api/*` requires it as a bearer token.
    pub token: Option<SecretCheck>,
    /// The node identity in this relay's ids, for `stats`.
    pub node: crate::node::NodeId,
    /// Set when a stop began: `/readyz` answers 503 (see [`crate::app::Relay::stop`]).
    pub draining: crate::app::Draining,
    /// Set when the certificate comes from ACME: not ready before the
    /// first one.
    pub certificate: Option<crate::tls::Readiness>,
}

type AdminResponse = Response<Full<Bytes>>;

impl Admin {
    /// Routes one admin request: probes are open, `/api/*` needs the token.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> AdminResponse {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        if !path.starts_with("/api/") {
            return self.probe(&method, &path);
        }
        if !self.authorized(&request) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token (Authorization: Bearer …)",
            );
        }
        let query = request.uri().query().unwrap_or("").to_owned();
        match (method, path.as_str()) {
            (Method::GET, "/api/stats") => self.stats(),
            (Method::GET, "/api/events") => self.list_events(&query).await,
            (Method::GET, "/api/dlq") => self.list_dead_letters(&query).await,
            (Method::POST, "/api/replay") => self.replay(request).await,
            (Method::POST, "/api/dlq/retry") => self.retry_dead_letters(request).await,
            (Method::POST, "/api/dlq/purge") => self.purge_dead_letters(request).await,
            (Method::POST, "/api/targets/forget") => self.forget_target(request).await,
            (Method::POST, "/api/reload") => self.reload().await,
            (Method::GET, p) if p.starts_with("/api/events/") => {
                self.event(&p["/api/events/".len()..]).await
            }
            _ => error(StatusCode::NOT_FOUND, "no such admin route"),
        }
    }

    /// Whether `request` carries the admin token, when one is configured.
    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(check) = &self.token else {
            return true;
        };
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        presented.is_some_and(|token| check.matches(token))
    }

    fn stats(&self) -> AdminResponse {
        let live = MetricsLive(&self.metrics);
        reply(ops::stats(
            &self.store,
            &self.targets.load().view,
            Some(&live),
            Some(self.node),
        ))
    }

    async fn list_events(self: &Arc<Self>, query: &str) -> AdminResponse {
        let query = match parse_query::<ops::EventsQuery>(query) {
            Ok(query) => query,
            Err(bad) => return bad.response(),
        };
        let this = self.clone();
        blocking(move || ops::list_events(&this.store, &query)).await
    }

    async fn list_dead_letters(self: &Arc<Self>, query: &str) -> AdminResponse {
        let target = match parse_query::<TargetQuery>(query) {
            Ok(query) => query.target,
            Err(bad) => return bad.response(),
        };
        let this = self.clone();
        blocking(move || ops::list_dead_letters(&this.store, target.as_deref())).await
    }

    /// Queues events for a target again, and wakes its dispatcher.
    async fn replay(self: &Arc<Self>, request: Request<Incoming>) -> AdminResponse {
        let replay = match read_json::<ops::ReplayRequest>(request).await {
            Ok(replay) => replay,
            Err(bad) => return bad.response(),
        };
        let target = replay.target.clone();
        let this = self.clone();
        let response = blocking(move || {
            ops::replay(&this.store, &this.targets.load().view, &replay, &mut |_| {})
        })
        .await;
        self.wake(Some(&target));
        response
    }

    /// Queues dead letters again, and wakes their dispatchers.
    async fn retry_dead_letters(self: &Arc<Self>, request: Request<Incoming>) -> AdminResponse {
        let selection = match read_json::<ops::DlqSelection>(request).await {
            Ok(selection) => selection,
            Err(bad) => return bad.response(),
        };
        let target = selection.target.clone();
        let this = self.clone();
        let response = blocking(move || {
            ops::retry_dead_letters(&this.store, &this.targets.load().view, &selection)
        })
        .await;
        self.wake(target.as_deref());
        response
    }

    async fn purge_dead_letters(self: &Arc<Self>, request: Request<Incoming>) -> AdminResponse {
        let selection = match read_json::<ops::DlqSelection>(request).await {
            Ok(selection) => selection,
            Err(bad) => return bad.response(),
        };
        let this = self.clone();
        blocking(move || ops::purge_dead_letters(&this.store, &selection)).await
    }

    async fn forget_target(self: &Arc<Self>, request: Request<Incoming>) -> AdminResponse {
        let forget = match read_json::<ops::ForgetRequest>(request).await {
            Ok(forget) => forget,
            Err(bad) => return bad.response(),
        };
        let this = self.clone();
        blocking(move || ops::forget_target(&this.store, &this.targets.load().view, &forget.target))
            .await
    }

    async fn reload(&self) -> AdminResponse {
        match self.reloader.reload().await {
            Ok(report) => json_response(
                StatusCode::OK,
                Bytes::from(serde_json::to_vec(&report).expect("a report serializes")),
            ),
            // The file or a secret is wrong; the running configuration is
            // kept. The message names file, key and value, never a secret.
            Err(err) if err.is::<ShuttingDown>() => {
                error(StatusCode::SERVICE_UNAVAILABLE, &format!("{err:#}"))
            }
            Err(err) => error(StatusCode::UNPROCESSABLE_ENTITY, &format!("{err:#}")),
        }
    }

    fn probe(&self, method: &Method, path: &str) -> AdminResponse {
        if method != Method::GET && method != Method::HEAD {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed here");
            response
                .headers_mut()
                .insert("allow", HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match path {
            "/healthz" => json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
            "/readyz" => self.readiness(),
            "/metrics" => {
                self.refresh_backlog_gauges();
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    async fn event(self: &Arc<Self>, rest: &str) -> AdminResponse {
        let (id, raw) = match rest.strip_suffix("/raw") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        let Ok(id) = id.parse::<EventId>() else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("{id:?} is not an event id"),
            );
        };
        if raw {
            return match ops::raw_event(&self.store, id) {
                Ok(bytes) => {
                    let mut response = Response::new(Full::new(Bytes::from(bytes)));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    response
                }
                Err(err) => ops_error(err),
            };
        }
        reply(ops::show_event(&self.store, &self.targets.load().view, id))
    }

    fn wake(&self, target: Option<&str>) {
        for (name, wake) in &self.targets.load().wakes {
            if target.is_none_or(|t| t == name) {
                wake.notify_one();
            }
        }
    }

    fn readiness(&self) -> AdminResponse {
        if self.draining.is_draining() {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(br#"{"status":"draining"}"#),
            );
        }
        if self.store.health().commits_failing() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the log cannot commit to disk; ingest answers 503",
            );
        }
        if let Some(why) = self.disk.refusal() {
            return error(StatusCode::SERVICE_UNAVAILABLE, &why);
        }
        if let Some(why) = self.certificate.as_ref().and_then(|c| c.why_not()) {
            return error(StatusCode::SERVICE_UNAVAILABLE, &why);
        }
        json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
    }

    /// Backlog gauges from the counts the log keeps as it changes, and one
    /// key read per target for the oldest delivery: no scan per scrape.
    fn refresh_backlog_gauges(&self) {
        // The targets are read under the lock a reload's removal takes.
        let _gauges = self.metrics.gauge_lock();
        let now_ms = crate::clock::now_ms();
        for target in self.targets.load().view.names() {
            let Ok(stats) = self.store.target_stats(&target) else {
                continue;
            };
            let labels = [target.as_str()];
            self.metrics
                .backlog_events
                .with_label_values(&labels)
                .set(stats.queued as i64);
            self.metrics
                .dead_letters
                .with_label_values(&labels)
                .set(stats.dead as i64);
            let age_ms = stats
                .oldest_enqueued_ms
                .map_or(0, |t| now_ms.saturating_sub(t));
            self.metrics
                .backlog_oldest_age
                .with_label_values(&labels)
                .set(age_ms as f64 / 1000.0);
        }
    }
}

/// The running relay's circuit state and last successes, from its metrics.
struct MetricsLive<'a>(&'a Metrics);

impl LiveState for MetricsLive<'_> {
    fn circuit_open(&self, target: &str) -> Option<bool> {
        Some(self.0.circuit_open.with_label_values(&[target]).get() == 1)
    }

    fn last_success_ms(&self, target: &str) -> Option<u64> {
        let seconds = self.0.last_success.with_label_values(&[target]).get();
        (seconds > 0.0).then_some((seconds * 1000.0) as u64)
    }
}

#[derive(serde::Deserialize)]
struct TargetQuery {
    target: Option<String>,
}

/// A request the admin API cannot read: status and reason.
struct BadRequest(StatusCode, String);

impl BadRequest {
    fn response(self) -> AdminResponse {
        error(self.0, &self.1)
    }
}

fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, BadRequest> {
    serde_urlencoded::from_str(query)
        .map_err(|err| BadRequest(StatusCode::BAD_REQUEST, format!("bad query string: {err}")))
}

async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, BadRequest> {
    let body = Limited::new(request.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| {
            BadRequest(
                StatusCode::PAYLOAD_TOO_LARGE,
                "admin request body too large or unreadable".into(),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|err| BadRequest(StatusCode::BAD_REQUEST, format!("bad request body: {err}")))
}

/// Runs a log operation off the async workers (it may scan a lot).
async fn blocking<T, F>(operation: F) -> AdminResponse
where
    T: Serialize + Send + 'static,
    F: FnOnce() -> Result<T, OpsError> + Send + 'static,
{
    match tokio::task::spawn_blocking(operation).await {
        Ok(result) => reply(result),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the operation panicked"),
    }
}

fn reply<T: Serialize>(result: Result<T, OpsError>) -> AdminResponse {
    match result {
        Ok(value) => json_response(
            StatusCode::OK,
            Bytes::from(serde_json::to_vec(&value).expect("reports serialize")),
        ),
        Err(err) => ops_error(err),
    }
}

fn ops_error(err: OpsError) -> AdminResponse {
    let status = match &err {
        OpsError::Invalid(_) => StatusCode::BAD_REQUEST,
        OpsError::NoSuchEvent(_) => StatusCode::NOT_FOUND,
        OpsError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &err.to_string())
}

fn error(status: StatusCode, message: &str) -> AdminResponse {
    let body = serde_json::json!({ "error": message }).to_string();
    json_response(status, Bytes::from(body))
}
