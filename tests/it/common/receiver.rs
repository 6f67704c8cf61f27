//! A downstream target for tests: a real hyper server on a loopback port
//! that records every request and answers as the test says, changeable
//! mid-run (fail twice, then 200).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{WAIT, eventually};

/// One request as the target saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub headers: HeaderMap,
    /// When its headers arrived.
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// What to answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn body(mut self, body: &str) -> Reply {
        self.body = body.to_owned();
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// Decides the reply to the `n`th request (0-based).
pub type Behaviour = Arc<dyn Fn(usize, &Received) -> Reply + Send + Sync>;

/// A behaviour: `first` to the first `n` requests, `rest` to every later
/// one (`first_then(2, Reply::status(503), Reply::ok())`: fail twice, then
/// 200).
pub fn first_then(
    n: usize,
    first: Reply,
    rest: Reply,
) -> impl Fn(usize, &Received) -> Reply + Send + Sync + 'static {
    move |i, _| if i < n { first.clone() } else { rest.clone() }
}

#[derive(Default)]
struct State {
    requests: Vec<Received>,
    in_flight: usize,
    max_in_flight: usize,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    behaviour: Arc<Mutex<Behaviour>>,
    shutdown: CancellationToken,
}

impl Receiver {
    /// Listens on a free loopback port.
    pub async fn start(
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().unwrap(), behaviour).await
    }

    /// Listens on `addr` (to bring a "down" target back on its old port).
    pub async fn start_on(
        addr: SocketAddr,
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        let listener = TcpListener::bind(addr).await.expect("receiver binds");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let behaviour: Arc<Mutex<Behaviour>> = Arc::new(Mutex::new(Arc::new(behaviour)));
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            state.clone(),
            behaviour.clone(),
            shutdown.clone(),
        ));
        Receiver {
            addr,
            state,
            behaviour,
            shutdown,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_behaviour(
        &self,
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) {
        *self.behaviour.lock().unwrap() = Arc::new(behaviour);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// The `idempotency-key` of every request so far, in order.
    pub fn idempotency_keys(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r.header("idempotency-key").to_owned())
            .collect()
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.lock().unwrap().max_in_flight
    }

    /// Starts measuring `max_in_flight` afresh from now.
    pub fn reset_max_in_flight(&self) {
        let mut state = self.state.lock().unwrap();
        state.max_in_flight = state.in_flight;
    }

    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits (up to [`WAIT`]) until `receiver` got at least `count` requests;
/// `what` names the wait in the failure.
pub async fn wait_for_requests(receiver: &Receiver, count: usize, what: &str) {
    eventually(what, WAIT, async || {
        (receiver.count() >= count).then_some(())
    })
    .await;
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    behaviour: Arc<Mutex<Behaviour>>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (state, behaviour, shutdown) = (state.clone(), behaviour.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let (state, behaviour) = (state.clone(), behaviour.clone());
                async move { Ok::<_, Infallible>(answer(request, &state, &behaviour).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    behaviour: &Mutex<Behaviour>,
) -> Response<Full<Bytes>> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let received = Received {
        body,
        headers: parts.headers,
        at,
    };
    let n = {
        let mut state = state.lock().unwrap();
        state.requests.push(received.clone());
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        state.requests.len() - 1
    };
    // Counts the request out even when the client hangs up mid-delay.
    struct InFlight<'a>(&'a Mutex<State>);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.lock().unwrap().in_flight -= 1;
        }
    }
    let guard = InFlight(state);
    let decide = behaviour.lock().unwrap().clone();
    let reply = decide(n, &received);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    drop(guard);
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status).unwrap();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}
