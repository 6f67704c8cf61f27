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

pub const SECRET: &str = "bench-secret";

/// Log settings for a bench's own data directory.
pub fn log_options(dir: &std::path::Path) -> leadflo_relay::log::LogOptions {
    leadflo_relay::log::LogOptions {
        data_dir: dir.to_owned(),
        cache_capacity_bytes: 64 << 20,
        quarantine_max_events: 10,
        quarantine_max_bytes: 1 << 20,
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

/// `connections` keep-alive HTTP/1.1 connections, each sending its share of
/// `iters` requests one after another; returns the wall time.
pub async fn drive(addr: SocketAddr, connections: usize, iters: u64) -> Duration {
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
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            while Instant::now() < deadline {
                let request = Request::post("/leadflo-webhook")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .header("x-webhook-secret", SECRET)
                    .body(Full::new(payload(acked)))
                    .unwrap();
                sender.ready().await.unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                response.into_body().collect().await.unwrap();
                acked += 1;
            }
            acked
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total
}
