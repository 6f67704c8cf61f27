//! Shared by the benches: the payload, a relay on loopback, a load driver.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use leadflo_relay::config::{Config, Secret, TargetConfig};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub mod transport;

pub const SECRET: &str = "bench-secret";

/// Store settings for a bench's own data directory.
pub fn store_options(dir: &std::path::Path) -> leadflo_relay::store::StoreOptions {
    leadflo_relay::store::StoreOptions {
        data_dir: dir.to_owned(),
        checkpoint_interval: std::time::Duration::from_secs(1),
        cache_capacity_bytes: 16 << 20,
        quarantine_max_events: 10,
        quarantine_max_bytes: 1 << 20,
        node: leadflo_relay::node::NodeId(0),
    }
}

/// The seed's `visitor_created` payload, with a name that varies by `n`.
pub fn payload(n: u64) -> Bytes {
    let template = include_str!("../../tests/fixtures/visitor_created.json");
    Bytes::from(template.replace("Sarah Johnson", &format!("Sarah Johnson {n}")))
}

/// The real relay, durable, on loopback.
pub async fn start_relay(
    dir: &std::path::Path,
    targets: Vec<TargetConfig>,
) -> (SocketAddr, SocketAddr, CancellationToken) {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = dir.to_owned();
    config.targets = targets;
    let relay = leadflo_relay::Relay::build(config, Some(Secret::new(SECRET)))
        .await
        .unwrap();
    let addr = relay.ingest_addr();
    let admin = relay.admin_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(relay.run_until_stopped(shutdown.clone()));
    (addr, admin, shutdown)
}

/// `connections` keep-alive HTTP/1.1 connections to `addr`, handshaken.
pub async fn connect_senders(
    addr: SocketAddr,
    connections: usize,
) -> Vec<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let mut senders = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        senders.push(sender);
    }
    senders
}

/// `connections` keep-alive HTTP/1.1 connections, each sending its share of
/// `iters` requests one after another; returns the wall time.
pub async fn drive(addr: SocketAddr, connections: usize, iters: u64) -> Duration {
    let senders = connect_senders(addr, connections).await;
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut sender)| {
            let share =
                iters / connections as u64 + u64::from((i as u64) < iters % connections as u64);
            tokio::spawn(async move {
                for n in 0..share {
                    let request = Request::post("/leadflo-webhook")
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .header("x-webhook-secret", SECRET)
                        .body(Full::new(payload(n)))
                        .unwrap();
                    sender.ready().await.unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    response.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

/// Like [`drive`], for a fixed `duration` instead of a count; returns how
/// many requests were acknowledged.
pub async fn drive_for(addr: SocketAddr, connections: usize, duration: Duration) -> u64 {
    timed_load(addr, "/leadflo-webhook", connections, duration)
        .await
        .acked
}

/// The real `leadflo-relay serve` binary as a child process.
pub struct RelayChild {
    pub child: std::process::Child,
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
}

impl RelayChild {
    /// Starts the release binary on loopback port 0 with `data_dir` and
    /// `extra` flags; waits until it reports both addresses.
    pub fn start(data_dir: &std::path::Path, extra: &[String]) -> RelayChild {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_leadflo-relay"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("LEADFLO_WEBHOOK_SECRET", SECRET)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the relay binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let addr = line
                    .split_whitespace()
                    .find_map(|t| t.strip_prefix("addr="))
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                if let Some(addr) = addr {
                    let kind = if line.contains("ingest listening") {
                        "ingest"
                    } else {
                        "admin"
                    };
                    let _ = tx.send((kind, addr));
                }
            }
        });
        let (mut ingest, mut admin) = (None, None);
        while ingest.is_none() || admin.is_none() {
            match rx
                .recv_timeout(Duration::from_secs(120))
                .expect("relay reports its addresses")
            {
                ("ingest", a) => ingest = Some(a),
                (_, a) => admin = Some(a),
            }
        }
        RelayChild {
            child,
            ingest: ingest.unwrap(),
            admin: admin.unwrap(),
        }
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// CPU time the relay has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times (`getconf CLK_TCK`,
/// i.e. `sysconf(_SC_CLK_TCK)`; USER_HZ, 100 on x86 Linux but not on every
/// architecture).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let ticks = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0);
        ticks.unwrap_or_else(|| {
            eprintln!("getconf CLK_TCK failed: assuming 100 ticks per second");
            100.0
        })
    })
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// `/proc/<pid>/stat` (in clock ticks, see [`clock_ticks`]).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ")".
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// What a timed load run saw.
pub struct LoadRun {
    pub acked: u64,
    pub elapsed: Duration,
    /// Every request's latency in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl LoadRun {
    pub fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile (0..=1) of the latencies, in microseconds.
    pub fn quantile(&self, q: f64) -> f64 {
        quantile(&self.latencies_us, q)
    }
}

pub fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[rank] as f64
}

/// `connections` keep-alive senders POST distinct leads (names and emails
/// vary) for `duration`, timing every request.
pub async fn timed_load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    duration: Duration,
) -> LoadRun {
    let senders = connect_senders(addr, connections).await;
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(c, mut sender)| {
            let path = path.to_owned();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let body = lead_payload(c as u64 * 1_000_000_000 + n);
                    let request = Request::post(path.as_str())
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .header("x-webhook-secret", SECRET)
                        .body(Full::new(body))
                        .unwrap();
                    let sent = Instant::now();
                    sender.ready().await.unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    response.into_body().collect().await.unwrap();
                    latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    LoadRun {
        acked: latencies_us.len() as u64,
        elapsed,
        latencies_us,
    }
}

/// The seed's lead with a distinct name, email and phone per `n` (582 bytes).
pub fn lead_payload(n: u64) -> Bytes {
    let template = include_str!("../../tests/fixtures/visitor_created.json");
    Bytes::from(
        template
            .replace("Sarah Johnson", &format!("Sarah Johnson-{n:012}"))
            .replace("sarah@example.com", &format!("sarah.{n:012}@example.com"))
            .replace("+1 555 123 4567", &format!("+1 555 {:07}", n % 10_000_000))
            .replace("vis_xyz", &format!("vis_{n:016x}")),
    )
}

/// Serves a fast target on `listener`: reads each body, answers 200, and
/// counts what it got, until `shutdown`.
pub fn counting_target(
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let handler = move |request: hyper::Request<hyper::body::Incoming>| {
        let count = count.clone();
        async move {
            let _ = request.into_body().collect().await;
            count.fetch_add(1, Ordering::Relaxed);
            leadflo_relay::ingest::json_response(StatusCode::OK, Bytes::from_static(b"{}"))
        }
    };
    let limits = leadflo_relay::http::ConnectionLimits {
        max_connections: 4096,
        header_read_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(1),
    };
    tokio::spawn(leadflo_relay::http::serve(
        listener, limits, handler, shutdown,
    ));
    received
}
