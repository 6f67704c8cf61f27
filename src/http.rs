//! The accept loop shared by the ingest and admin listeners: a cap on open
//! connections that closes the longest-idle connection to make room for a
//! new one, hyper's header read timeout (which also closes idle keep-alive
//! connections), graceful shutdown, and, when the listener serves HTTPS,
//! the TLS handshake inside the connection's slot and under the same
//! timeout ([`crate::tls`]).
//!
//! It knows nothing of webhooks: it calls a handler per request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::tls::{Acceptor, Handshake, HandshakeFailure};

/// Connection limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Time open requests get to finish once shutdown starts.
    pub shutdown_grace: Duration,
}

/// Called once per occurrence of a connection event.
pub type Hook = Arc<dyn Fn() + Send + Sync>;

/// Called once per connection that never got past its TLS handshake.
pub type HandshakeHook = Arc<dyn Fn(HandshakeFailure) + Send + Sync>;

/// What a listener reports besides the requests its handler answers.
#[derive(Clone)]
pub struct ConnectionEvents {
    /// An idle connection was closed to make room for a new one.
    pub evicted: Hook,
    /// hyper refused a request before the handler saw it (a malformed
    /// request line or headers, headers over the size limit: it answers
    /// 400 or 431 itself and closes the connection).
    pub malformed: Hook,
    /// A connection to an HTTPS listener never finished its handshake.
    pub handshake_failed: HandshakeHook,
}

impl ConnectionEvents {
    fn none() -> ConnectionEvents {
        ConnectionEvents {
            evicted: Arc::new(|| {}),
            malformed: Arc::new(|| {}),
            handshake_failed: Arc::new(|_| {}),
        }
    }
}

/// Serves `handler` on `listener` until `shutdown` is cancelled, then stops
/// accepting and lets open requests finish within the grace period.
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: ConnectionLimits,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_counting(
        listener,
        limits,
        handler,
        ConnectionEvents::none(),
        None,
        shutdown,
    )
    .await
}

/// [`serve`], reporting [`ConnectionEvents`], and over TLS when `tls` is
/// given.
///
/// At `max_connections`, a new connection closes the one that has been idle
/// longest (no request in progress; hyper lets a request that has begun
/// finish first), so thousands of idle or slow connections cannot lock
/// honest senders out until their timeouts expire. Only when every
/// connection is busy does the new one wait for a free slot. A connection
/// still in its TLS handshake holds its slot and counts as idle.
pub async fn serve_counting<H, F>(
    listener: TcpListener,
    limits: ConnectionLimits,
    handler: H,
    events: ConnectionEvents,
    tls: Option<Acceptor>,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Slots::new(limits.max_connections);
    let server = Arc::new(ConnectionServer {
        builder: connection_builder(limits.header_read_timeout),
        handler,
        open: slots.open.clone(),
        malformed: events.malformed.clone(),
        handshake_failed: events.handshake_failed.clone(),
        tls,
        handshake_timeout: limits.header_read_timeout,
        first_request_grace: limits.header_read_timeout,
        shutdown: shutdown.clone(),
    });
    while let Some(accepted) = slots.accept(&listener, &events.evicted, &shutdown).await {
        tokio::spawn(server.clone().serve(accepted));
    }
    drop(listener);
    slots.drain(limits.shutdown_grace).await;
}

/// hyper's HTTP/1 settings for every connection of one listener.
fn connection_builder(header_read_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
}

/// Waits for the next connection; `None` once shutdown starts.
async fn next_stream(listener: &TcpListener, shutdown: &CancellationToken) -> Option<TcpStream> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => return Some(stream),
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A connection let in under the limits.
struct Accepted {
    stream: TcpStream,
    /// Its entry in [`OpenConnections`].
    id: u64,
    /// Cancelled when it is evicted to make room for another.
    close: CancellationToken,
    /// Its slot, held until it has closed.
    permit: OwnedSemaphorePermit,
}

/// The connection slots of one listener: one permit per open connection.
struct Slots {
    max: usize,
    permits: Arc<Semaphore>,
    open: Arc<OpenConnections>,
}

impl Slots {
    fn new(max_connections: usize) -> Slots {
        let max = max_connections.max(1);
        Slots {
            max,
            permits: Arc::new(Semaphore::new(max)),
            open: Arc::new(OpenConnections::default()),
        }
    }

    /// The next connection, once it has a slot; `None` once shutdown starts.
    async fn accept(
        &self,
        listener: &TcpListener,
        evicted: &Hook,
        shutdown: &CancellationToken,
    ) -> Option<Accepted> {
        let stream = next_stream(listener, shutdown).await?;
        let permit = self.free_slot(evicted, shutdown).await?;
        let _ = stream.set_nodelay(true);
        let (id, close) = self.open.register();
        Some(Accepted {
            stream,
            id,
            close,
            permit,
        })
    }

    /// A slot, closing the longest-idle connection when none is free;
    /// `None` when shutdown starts while every connection is busy.
    async fn free_slot(
        &self,
        evicted: &Hook,
        shutdown: &CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.open.evict_longest_idle() {
            evicted();
        }
        // The evicted connection closes at once when idle; if every
        // connection is busy, this waits for the first to finish.
        tokio::select! {
            _ = shutdown.cancelled() => None,
            permit = self.permits.clone().acquire_owned() => {
                Some(permit.expect("semaphore never closes"))
            }
        }
    }

    /// After the listener has closed: waits for the open connections to
    /// finish, at most `grace`.
    async fn drain(&self, grace: Duration) {
        // Every connection holds a permit until it ends: all of them back
        // means every connection has closed.
        tokio::select! {
            _ = self.permits.acquire_many(self.max as u32) => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!("connections still open after the shutdown grace period; closing them");
            }
        }
    }
}

/// What every connection of one listener is served with.
struct ConnectionServer<H> {
    builder: http1::Builder,
    handler: H,
    open: Arc<OpenConnections>,
    malformed: Hook,
    handshake_failed: HandshakeHook,
    /// Set when the listener serves HTTPS.
    tls: Option<Acceptor>,
    /// Time a client has to finish its TLS handshake.
    handshake_timeout: Duration,
    /// Time a connection accepted just before shutdown gets to send its
    /// first request.
    first_request_grace: Duration,
    shutdown: CancellationToken,
}

/// Why a connection stopped being served as usual.
enum ConnectionEnd {
    /// It ended by itself: the client closed it, or hyper did.
    Ended(hyper::Result<()>),
    /// It was evicted, or shutdown started: it closes once its request in
    /// progress, if any, is answered.
    Close,
}

impl<H, F> ConnectionServer<H>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    /// Serves one connection until it ends (after its TLS handshake, on an
    /// HTTPS listener), then frees its slot.
    async fn serve(self: Arc<Self>, accepted: Accepted) {
        let Accepted {
            stream,
            id,
            close,
            permit,
        } = accepted;
        match &self.tls {
            None => self.serve_http(stream, id, &close).await,
            Some(tls) => match tls.handshake(stream, self.handshake_timeout, &close).await {
                Handshake::Done(stream) => self.serve_http(stream, id, &close).await,
                Handshake::Failed(failure) => (self.handshake_failed)(failure),
                Handshake::Closed => {}
                Handshake::Challenge => tracing::debug!("answered an ACME TLS-ALPN-01 challenge"),
            },
        }
        self.open.remove(id);
        drop(permit);
    }

    /// Serves HTTP/1 on `stream` until the connection ends.
    async fn serve_http<S>(self: &Arc<Self>, stream: S, id: u64, close: &CancellationToken)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let started = CancellationToken::new();
        let first_request = started.clone();
        let server = self.clone();
        let service = service_fn(move |request| {
            if !first_request.is_cancelled() {
                first_request.cancel();
            }
            let response = (server.handler)(request);
            let guard = server.open.busy(id);
            async move {
                let response = response.await;
                drop(guard);
                Ok::<_, Infallible>(response)
            }
        });
        let connection = self.builder.serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        // Errors here are clients going away or timing out (an idle
        // keep-alive connection too): not ours to log. A request hyper
        // could not parse is counted.
        let ended = match self.until_end(connection.as_mut(), close, &started).await {
            ConnectionEnd::Ended(ended) => ended,
            ConnectionEnd::Close => {
                connection.as_mut().graceful_shutdown();
                connection.as_mut().await
            }
        };
        if ended.is_err_and(|err| err.is_parse()) {
            (self.malformed)();
        }
    }

    /// Runs `connection` until it ends, is evicted (`close`), or shutdown
    /// starts.
    async fn until_end<C>(
        &self,
        mut connection: Pin<&mut C>,
        close: &CancellationToken,
        started: &CancellationToken,
    ) -> ConnectionEnd
    where
        C: Future<Output = hyper::Result<()>>,
    {
        tokio::select! {
            ended = connection.as_mut() => ConnectionEnd::Ended(ended),
            _ = close.cancelled() => ConnectionEnd::Close,
            _ = self.shutdown.cancelled() => {
                // hyper closes a connection whose first request it has
                // not read yet as idle, unanswered: one accepted just
                // before the stop (with its request already sent, from
                // the kernel's queue) gets its first request answered.
                tokio::select! {
                    ended = connection.as_mut() => ConnectionEnd::Ended(ended),
                    _ = started.cancelled() => ConnectionEnd::Close,
                    _ = tokio::time::sleep(self.first_request_grace) => ConnectionEnd::Close,
                }
            }
        }
    }
}

/// The open connections of one listener: whether each has a request in
/// progress and since when it has been idle.
#[derive(Default)]
struct OpenConnections {
    next_id: std::sync::atomic::AtomicU64,
    by_id: Mutex<HashMap<u64, Connection>>,
}

struct Connection {
    /// Requests in progress (more than one only with pipelining).
    busy: usize,
    /// Since when no request has been in progress (or since it opened).
    idle_since: Instant,
    close: CancellationToken,
}

impl OpenConnections {
    fn register(&self) -> (u64, CancellationToken) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let close = CancellationToken::new();
        self.lock().insert(
            id,
            Connection {
                busy: 0,
                idle_since: Instant::now(),
                close: close.clone(),
            },
        );
        (id, close)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Marks a request in progress on `id` until the guard drops.
    fn busy(self: &Arc<Self>, id: u64) -> BusyGuard {
        if let Some(connection) = self.lock().get_mut(&id) {
            connection.busy += 1;
        }
        BusyGuard {
            open: self.clone(),
            id,
        }
    }

    /// Asks the connection idle for longest to close; false when every
    /// connection has a request in progress (or was already asked).
    fn evict_longest_idle(&self) -> bool {
        let map = self.lock();
        let longest = map
            .values()
            .filter(|c| c.busy == 0 && !c.close.is_cancelled())
            .min_by_key(|c| c.idle_since);
        match longest {
            Some(connection) => {
                connection.close.cancel();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Connection>> {
        self.by_id.lock().expect("connection table lock")
    }
}

struct BusyGuard {
    open: Arc<OpenConnections>,
    id: u64,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Some(connection) = self.open.lock().get_mut(&self.id) {
            connection.busy = connection.busy.saturating_sub(1);
            connection.idle_since = Instant::now();
        }
    }
}
