//! The admin listener: `/healthz`, `/readyz` and `/metrics`.
//!
//! Bound to loopback by default. It reads state, never changes it.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::ingest::json_response;
use crate::log::CommitHealth;
use crate::metrics::Metrics;

/// Everything the admin routes read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub commit_health: Arc<CommitHealth>,
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
        if self.commit_health.is_failing() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the log cannot commit to disk; ingest answers 503",
            );
        }
        json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    json_response(status, Bytes::from(body))
}
