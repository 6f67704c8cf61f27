//! The TLS handshake of one ingest connection, inside the connection's slot
//! and under the header read timeout: a client that opens TCP and never
//! finishes its handshake holds a slot no longer than one that never sends
//! its headers, and is evicted the same way. Plain HTTP sent to the HTTPS
//! port is answered 400 with a JSON hint and closed, as Caddy does.
//!
//! It never logs what a client sent: the caller counts the outcome.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::Readiness;

/// The ALPN protocol of ACME's TLS-ALPN-01 challenge (RFC 8737).
const ACME_TLS_ALPN_NAME: &[u8] = rustls_acme::acme::ACME_TLS_ALPN_NAME;

/// The first byte of a TLS record that carries a handshake message (every
/// ClientHello starts with it); plain HTTP starts with a method's letter.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The answer to plain HTTP on the HTTPS port.
pub const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: application/json\r\n\
content-length: 77\r\n\
connection: close\r\n\
\r\n\
{\"error\":\"this port speaks HTTPS only: send the request to its https:// URL\"}";

/// How long a refused plain-HTTP client gets to read the answer while what
/// it sent is read and dropped: closing a socket with unread data resets
/// the connection, and the client may then never see the answer.
const PLAIN_HTTP_LINGER: Duration = Duration::from_secs(1);

/// At most this much of a refused plain-HTTP request is read and dropped.
const PLAIN_HTTP_DRAIN_BYTES: usize = 64 * 1024;

/// Why a connection never got past its handshake; the `reason` label of
/// `leadflo_relay_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Plain HTTP to the HTTPS port: answered 400 and closed.
    PlainHttp,
    /// No finished handshake within `server.header_read_timeout`.
    Timeout,
    /// The client broke off (an unknown certificate authority, no common
    /// protocol version or cipher, a malformed message, a reset).
    Error,
    /// No certificate to serve yet: the first ACME order is under way.
    NoCertificate,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 4] = [
        HandshakeFailure::PlainHttp,
        HandshakeFailure::Timeout,
        HandshakeFailure::Error,
        HandshakeFailure::NoCertificate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::PlainHttp => "plain_http",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Error => "error",
            HandshakeFailure::NoCertificate => "no_certificate",
        }
    }
}

/// How one handshake ended.
pub enum Handshake {
    /// Encrypted from here on: serve HTTP on it.
    Done(Box<TlsStream<TcpStream>>),
    /// Counted, closed.
    Failed(HandshakeFailure),
    /// Closed without a failure to count: the client went away before it
    /// sent a byte (a port probe, a load balancer's TCP check), or the
    /// connection was evicted to make room for another.
    Closed,
    /// An ACME authority's TLS-ALPN-01 validation: the handshake was the
    /// answer, and the connection is closed.
    Challenge,
}

/// Accepts TLS connections with the relay's [`rustls::ServerConfig`].
#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
    /// Set when the certificate comes from ACME: before the first one,
    /// failed handshakes are `no_certificate`.
    readiness: Option<Readiness>,
}

impl Acceptor {
    pub fn new(config: std::sync::Arc<rustls::ServerConfig>) -> Acceptor {
        Acceptor {
            inner: tokio_rustls::TlsAcceptor::from(config),
            readiness: None,
        }
    }

    /// Handshakes that fail while `readiness` has no certificate are
    /// counted as [`HandshakeFailure::NoCertificate`] (and logged).
    pub fn waiting_for(mut self, readiness: Readiness) -> Acceptor {
        self.readiness = Some(readiness);
        self
    }

    /// Why a handshake that rustls refused failed.
    fn failure(&self) -> HandshakeFailure {
        match &self.readiness {
            Some(readiness) if !readiness.is_ready() => {
                readiness.refused();
                HandshakeFailure::NoCertificate
            }
            _ => HandshakeFailure::Error,
        }
    }

    /// Runs the handshake of `stream`, all of it within `timeout`, unless
    /// `close` (eviction) comes first.
    pub async fn handshake(
        &self,
        mut stream: TcpStream,
        timeout: Duration,
        close: &CancellationToken,
    ) -> Handshake {
        let deadline = Instant::now() + timeout;
        let first = tokio::select! {
            first = tokio::time::timeout_at(deadline, first_byte(&stream)) => first,
            _ = close.cancelled() => return Handshake::Closed,
        };
        match first {
            Err(_elapsed) => return Handshake::Failed(HandshakeFailure::Timeout),
            Ok(None) => return Handshake::Closed,
            Ok(Some(TLS_HANDSHAKE_RECORD)) => {}
            Ok(Some(_)) => {
                tokio::select! {
                    _ = refuse_plain_http(&mut stream, deadline) => {}
                    _ = close.cancelled() => {}
                }
                return Handshake::Failed(HandshakeFailure::PlainHttp);
            }
        }
        tokio::select! {
            accepted = tokio::time::timeout_at(deadline, self.inner.accept(stream)) => match accepted {
                Ok(Ok(stream)) if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN_NAME) => {
                    Handshake::Challenge
                }
                Ok(Ok(stream)) => Handshake::Done(Box::new(stream)),
                Ok(Err(_)) => Handshake::Failed(self.failure()),
                Err(_elapsed) => Handshake::Failed(HandshakeFailure::Timeout),
            },
            _ = close.cancelled() => Handshake::Closed,
        }
    }
}

/// The first byte the client sent, left in the socket for the handshake;
/// `None` when it closed (or reset) first.
async fn first_byte(stream: &TcpStream) -> Option<u8> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => Some(first[0]),
        _ => None,
    }
}

/// Answers [`PLAIN_HTTP_ANSWER`], ends the sending side, and reads what the
/// client sent until it closes, for a moment at most (not past `deadline`).
async fn refuse_plain_http(stream: &mut TcpStream, deadline: Instant) {
    if stream.write_all(PLAIN_HTTP_ANSWER).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let linger = deadline.min(Instant::now() + PLAIN_HTTP_LINGER);
    let _ = tokio::time::timeout_at(linger, async {
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < PLAIN_HTTP_DRAIN_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_is_a_whole_json_response() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len(), "content-length is wrong");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["error"].as_str().unwrap().contains("https://"));
    }
}
