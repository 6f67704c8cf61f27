//! One delivery attempt: POST the event, in the target's format and with
//! its headers and signature ([`crate::outbound`]), with reqwest, and turn
//! whatever happens into an [`Outcome`].
//!
//! Redirects are not followed; the response body is read only up to a small
//! cap (for the dead-letter reason); the whole attempt is bounded by the
//! target's timeout. This module never logs a body or a target URL.

use std::time::{Duration, SystemTime};

use reqwest::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue,
    RETRY_AFTER, USER_AGENT,
};

use crate::config::Secret;
use crate::outbound::{EventView, Outbound, StatusClass};
use crate::retry::parse_retry_after;
use crate::store::EventId;
use bytes::Bytes;

/// How many bytes of a rejecting response are kept as the reason.
pub const REASON_BODY_BYTES: usize = 256;

pub const USER_AGENT_VALUE: &str = concat!("leadflo-relay/", env!("CARGO_PKG_VERSION"));

/// The event's id, the same on every attempt (see docs/delivery.md).
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Which attempt this is, from 1.
const RELAY_ATTEMPT: HeaderName = HeaderName::from_static("x-relay-attempt");
/// The target's own secret, when it has one.
const WEBHOOK_SECRET: HeaderName = HeaderName::from_static("x-webhook-secret");
/// The most of an answer's body that is read (past a rejection's reason), only
/// so that its keep-alive connection can serve the next delivery: hyper
/// closes a connection whose response body was dropped before its end, and
/// CRMs answer with a JSON body. A longer body is dropped with its
/// connection rather than read to no purpose.
const DRAIN_BODY_BYTES: usize = 64 * 1024;
/// How long the rest of such a body may take to arrive; after that the
/// connection is closed. The outcome is already known: this never changes it.
const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// Room for every header a request carries (ours, the signature's, the
/// client's defaults, `host` and `content-length`) but the target's own, so
/// that none is added to a full map.
const REQUEST_HEADERS: usize = 15;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the target has it.
    Delivered { status: u16 },
    /// Worth trying again later.
    Retry {
        failure: Failure,
        retry_after: Option<Duration>,
    },
    /// Will not succeed by retrying: straight to dead letters.
    Reject { status: u16, body: String },
    /// The target's format could not be made for this event (a template
    /// that fails on it): no request was sent.
    Unrenderable { reason: String },
}

/// Why a retryable attempt failed. Variants are decisions, not libraries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Status(u16),
    Timeout,
    Connect,
    /// The connection broke after it was made (reset, truncated answer).
    Transport,
}

impl Failure {
    pub fn status(&self) -> Option<u16> {
        match self {
            Failure::Status(status) => Some(*status),
            _ => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(status) => write!(f, "HTTP {status}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Connect => f.write_str("could not connect"),
            Failure::Transport => f.write_str("connection failed mid-request"),
        }
    }
}

/// Statuses worth retrying: 408, 425, 429 and every 5xx.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500..=599)
}

/// A target's HTTP client and fixed headers.
#[derive(Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The `host` header hyper would otherwise format for every HTTP/1
    /// request; none for `https`, which may negotiate HTTP/2 (`:authority`).
    host: Option<HeaderValue>,
    /// From credentials in the target's URL, if any.
    authorization: Option<HeaderValue>,
    secret: Option<HeaderValue>,
    timeout: Duration,
    outbound: std::sync::Arc<Outbound>,
}

impl Deliverer {
    pub fn new(
        url: reqwest::Url,
        secret: Option<&Secret>,
        timeout: Duration,
        outbound: Outbound,
    ) -> anyhow::Result<Deliverer> {
        install_crypto_provider();
        let mut headers = HeaderMap::new();
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        headers.insert(CONTENT_TYPE, outbound.content_type.clone());
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60));
        if url.scheme() == "http" {
            // reqwest's own retries are only for HTTP/2's refused streams and
            // graceful shutdowns, which plain http (HTTP/1.1 here) never
            // sees; yet its retry layer copies every request, headers and
            // all, in case. No retries: no copy.
            builder = builder.retry(reqwest::retry::never().max_retries_per_request(0));
        }
        let client = builder.build()?;
        // Credentials in the URL (`https://user:pass@host/…`) become an
        // `Authorization: Basic` header, as reqwest's request builder makes
        // them (percent-decoded, marked sensitive); the URL then goes without
        // them. `attempt` builds its request directly, which skips that step.
        let probe = client.post(url).build()?;
        let authorization = probe.headers().get(AUTHORIZATION).cloned();
        let url = probe.url().clone();
        let secret = match secret {
            Some(secret) => {
                let mut value = HeaderValue::from_bytes(secret.expose()).map_err(|_| {
                    anyhow::anyhow!("the target secret is not a valid header value")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let host = match url.scheme() {
            "http" => Some(host_header(&url)?),
            _ => None,
        };
        Ok(Deliverer {
            client,
            url,
            host,
            authorization,
            secret,
            timeout,
            outbound: std::sync::Arc::new(outbound),
        })
    }

    /// Where its POSTs go.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// What the target's configuration shapes of its requests.
    pub fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    /// POSTs `event` as attempt number `attempt` (1-based).
    pub async fn attempt(&self, event: &EventView<'_>, attempt: u32) -> Outcome {
        let body = match self.outbound.render(event) {
            Ok(body) => body,
            Err(reason) => return Outcome::Unrenderable { reason },
        };
        let mut request = reqwest::Request::new(reqwest::Method::POST, self.url.clone());
        *request.headers_mut() = self.headers(event.id, attempt, &body);
        *request.body_mut() = Some(body.into());
        // reqwest's own timeout covers the body too; this guards the rest.
        // It bounds getting the answer's head: once the status is in, the
        // outcome is decided, and a body that is slow to follow (a
        // rejection's reason, or what is drained) never changes it.
        let started = std::time::Instant::now();
        match tokio::time::timeout(self.timeout, self.client.execute(request)).await {
            Err(_) => Outcome::Retry {
                failure: Failure::Timeout,
                retry_after: None,
            },
            Ok(Err(err)) => Outcome::Retry {
                failure: classify(&err),
                retry_after: None,
            },
            Ok(Ok(response)) => self.answer(response, started).await,
        }
    }

    /// The headers of attempt `attempt` of event `id`, sending `body`.
    fn headers(&self, id: EventId, attempt: u32, body: &Bytes) -> HeaderMap {
        // The request's headers in a map with room for all of them, `host`
        // and `content-length` included: reqwest hands hyper a copy of the
        // map sized to what it holds, and every header added to that copy
        // (hyper adds those two when missing) grew it, two allocations and
        // a formatted host per delivery.
        let mut headers = HeaderMap::with_capacity(REQUEST_HEADERS + self.outbound.headers.len());
        // The target's headers first, so that every header the relay sets
        // itself comes after them and wins (validation refuses such names;
        // this holds for a configuration built in code too).
        for (name, value) in &self.outbound.headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from(id.0));
        headers.insert(RELAY_ATTEMPT, HeaderValue::from(attempt));
        if let Some(secret) = &self.secret {
            headers.insert(WEBHOOK_SECRET, secret.clone());
        }
        if let Some(authorization) = &self.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        if let Some(signer) = &self.outbound.signer {
            // Signed over `body`, the exact bytes this request sends, at
            // this attempt's time.
            signer.sign(&mut headers, id, crate::clock::now_ms() / 1000, body);
        }
        headers
    }

    /// What the target's answer means, reading of its body only a
    /// rejection's reason (within the attempt's time) and what lets the
    /// connection serve again.
    async fn answer(
        &self,
        mut response: reqwest::Response,
        started: std::time::Instant,
    ) -> Outcome {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let class = self.outbound.statuses.classify(status);
        let mut reason = Vec::new();
        if class == StatusClass::Reject {
            let left = self.timeout.saturating_sub(started.elapsed());
            let _ = tokio::time::timeout(left, read_prefix(&mut response, &mut reason)).await;
        }
        let wait = DRAIN_WAIT.min(self.timeout);
        let _ = tokio::time::timeout(wait, drain(&mut response)).await;
        match class {
            StatusClass::Delivered => Outcome::Delivered { status },
            StatusClass::Retry => Outcome::Retry {
                failure: Failure::Status(status),
                retry_after,
            },
            StatusClass::Reject => Outcome::Reject {
                status,
                body: String::from_utf8_lossy(&reason).into_owned(),
            },
        }
    }
}

/// The `host` header of requests to `url`: its host, and its port unless
/// that is the scheme's default (what hyper would send).
fn host_header(url: &reqwest::Url) -> anyhow::Result<HeaderValue> {
    let host = url
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("the target URL has no host"))?;
    let value = match url.port() {
        Some(port) => HeaderValue::try_from(format!("{host}:{port}")),
        None => HeaderValue::try_from(host),
    };
    value.map_err(|_| anyhow::anyhow!("the target URL's host is not a valid header value"))
}

fn classify(err: &reqwest::Error) -> Failure {
    if err.is_timeout() {
        Failure::Timeout
    } else if err.is_connect() {
        Failure::Connect
    } else {
        Failure::Transport
    }
}

/// The first bytes of a response body, for a dead letter, into `kept`
/// (which keeps what arrived if this is cut short).
async fn read_prefix(response: &mut reqwest::Response, kept: &mut Vec<u8>) {
    while kept.len() < REASON_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
            _ => break,
        }
    }
    kept.truncate(REASON_BODY_BYTES);
}

/// Reads and discards what is left of a response body, up to
/// [`DRAIN_BODY_BYTES`], so that its connection goes back to the pool.
async fn drain(response: &mut reqwest::Response) {
    let mut read = 0;
    while read <= DRAIN_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            _ => return,
        }
    }
}

/// reqwest is built without a default TLS crypto provider (aws-lc-rs costs
/// minutes of build time); install ring's once per process.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already installed: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_has_the_port_only_when_it_is_not_the_default() {
        let host = |url: &str| host_header(&url.parse().unwrap()).unwrap();
        assert_eq!(host("http://127.0.0.1:8080/hook"), "127.0.0.1:8080");
        assert_eq!(host("http://crm.example.com/hook"), "crm.example.com");
        assert_eq!(host("http://crm.example.com:80/hook"), "crm.example.com");
        assert_eq!(host("https://crm.example.com:443/x"), "crm.example.com");
        assert_eq!(
            host("https://crm.example.com:8443/x"),
            "crm.example.com:8443"
        );
        assert_eq!(host("http://[::1]:9000/"), "[::1]:9000");
        assert_eq!(host("https://bücher.example/"), "xn--bcher-kva.example");
    }

    #[test]
    fn status_rules_add_to_the_defaults_and_leave_2xx_delivered() {
        use crate::outbound::StatusRules;
        let defaults = StatusRules::default();
        let rules = StatusRules {
            retry_on: vec![401, 403, 404],
            delivered_on: vec![409],
        };
        for (status, by_default, with_rules) in [
            (200, StatusClass::Delivered, StatusClass::Delivered),
            (204, StatusClass::Delivered, StatusClass::Delivered),
            (401, StatusClass::Reject, StatusClass::Retry),
            (403, StatusClass::Reject, StatusClass::Retry),
            (404, StatusClass::Reject, StatusClass::Retry),
            (409, StatusClass::Reject, StatusClass::Delivered),
            (422, StatusClass::Reject, StatusClass::Reject),
            (429, StatusClass::Retry, StatusClass::Retry),
            (503, StatusClass::Retry, StatusClass::Retry),
        ] {
            assert_eq!(defaults.classify(status), by_default, "{status} by default");
            assert_eq!(
                rules.classify(status),
                with_rules,
                "{status} with the rules"
            );
        }
    }

    #[test]
    fn retryable_statuses_are_exactly_the_documented_ones() {
        for status in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert!(is_retryable_status(status), "{status}");
        }
        for status in [200, 301, 302, 400, 401, 403, 404, 409, 410, 413, 422] {
            assert!(!is_retryable_status(status), "{status}");
        }
    }
}
