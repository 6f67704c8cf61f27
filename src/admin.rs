//! The admin listener: `/healthz`, `/readyz` and `/metrics`.
//!
//! Bound to loopback by default. It reads state, never changes it.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::disk::DiskGuard;
use crate::ingest::json_response;
use crate::log::Log;
use crate::metrics::Metrics;

/// Everything the admin routes read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub log: Log,
    pub disk: Arc<DiskGuard>,
    /// Configured target names, for the per-target gauges.
    pub targets: Vec<String>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is allowed on the admin listener",
            );
            response
                .headers_mut()
                .insert("allow", HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match request.uri().path() {
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

    fn readiness(&self) -> Response<Full<Bytes>> {
        if self.log.health().is_failing() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the log cannot commit to disk; ingest answers 503",
            );
        }
        if let Some(why) = self.disk.refusal() {
            return error(StatusCode::SERVICE_UNAVAILABLE, &why);
        }
        json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
    }

    /// Backlog gauges from the counts the log keeps as it changes, and one
    /// key read per target for the oldest delivery: no scan per scrape.
    fn refresh_backlog_gauges(&self) {
        let now_ms = crate::dispatch::now_ms();
        for target in &self.targets {
            let Ok(stats) = self.log.target_stats(target) else {
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

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    json_response(status, Bytes::from(body))
}
