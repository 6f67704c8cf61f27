//! Posting one message: a single HTTP request, retried at most once (at
//! once, or after the receiver's `Retry-After` when it answers 429, as
//! Slack does past about a message a second), its failure a [`PostError`]
//! that never holds the URL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::message::Message;
use super::settings::AlertSettings;
use crate::node::NodeId;

/// The longest `Retry-After` a 429 is waited out for: the task posts one
/// message at a time, and the others wait behind it.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Why a post failed. Never holds the URL (reqwest's errors do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("the receiver answered HTTP {0}")]
    Status(u16),
    #[error("the receiver answered HTTP 429 (rate limited)")]
    RateLimited(Option<Duration>),
    #[error("timed out")]
    Timeout,
    #[error("could not connect")]
    Connect,
    #[error("the connection failed mid-request")]
    Transport,
}

impl PostError {
    /// Worth one immediate retry: a connection that broke (a keep-alive
    /// connection the receiver had closed) or a gateway error. A timeout is
    /// not: a slow receiver would only hold the next message up longer.
    fn worth_one_retry(self) -> bool {
        matches!(
            self,
            PostError::Connect | PostError::Transport | PostError::Status(502..=504)
        )
    }

    fn from_reqwest(err: &reqwest::Error) -> PostError {
        if err.is_timeout() {
            PostError::Timeout
        } else if err.is_connect() {
            PostError::Connect
        } else {
            PostError::Transport
        }
    }
}

async fn post_once(settings: &AlertSettings, body: Vec<u8>) -> Result<(), PostError> {
    let request = settings
        .client
        .post(settings.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send();
    let response = match tokio::time::timeout(settings.timeout, request).await {
        Err(_) => return Err(PostError::Timeout),
        Ok(Err(err)) => return Err(PostError::from_reqwest(&err)),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::retry::parse_retry_after(v, SystemTime::now()));
        Err(PostError::RateLimited(retry_after))
    } else {
        Err(PostError::Status(status.as_u16()))
    }
}

/// Posts `message` from `node`, again at once if the first try is worth
/// repeating.
pub(super) async fn post(
    settings: Arc<AlertSettings>,
    message: Message,
    node: Option<NodeId>,
) -> Result<(), PostError> {
    let body = message.body(settings.format, node);
    match post_once(&settings, body.clone()).await {
        Err(err) if err.worth_one_retry() => post_once(&settings, body).await,
        Err(PostError::RateLimited(Some(wait))) if wait <= LONGEST_RETRY_AFTER => {
            tokio::time::sleep(wait).await;
            post_once(&settings, body).await
        }
        result => result,
    }
}
