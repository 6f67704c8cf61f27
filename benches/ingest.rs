//! Ingest baselines (criterion): what later work is measured against.
//!
//! - `append/N`: N concurrent writers calling the log's group commit
//!   directly (apply + flush + fdatasync), no HTTP.
//! - `fsync_1k`: write 1 KiB and `fdatasync` on the same filesystem as the
//!   data directory: the physical floor of one durable ack.
//! - `http/durable/N` and `http/no_persistence/N`: the same hyper front end
//!   (same accept loop, secret check and validation) on loopback, driven by
//!   N keep-alive connections; the first is the real relay, the second answers
//!   200 without storing anything. Their ratio at N = 64 is the cost of
//!   durability.
//!
//! Run with `cargo bench --bench ingest`; data lives in a temp dir under the
//! current directory (so on the filesystem `./data` would use).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Limited};
use hyper::{Request, StatusCode};
use leadflo_relay::config::Secret;
use leadflo_relay::http::{self, ConnectionLimits};
use leadflo_relay::ingest::{SecretCheck, event_type, json_response};
use leadflo_relay::metrics::Metrics;
use leadflo_relay::store::{Committer, Entry, Store};
use support::{SECRET, drive, payload, start_relay};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;

const CONCURRENCY: [usize; 3] = [1, 16, 64];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bench_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(".").expect("temp dir in the current directory")
}

fn bench_append(c: &mut Criterion) {
    let rt = runtime();
    let dir = bench_dir();
    let options = support::store_options(dir.path());
    let store = Store::open(&options).unwrap();
    let (committer, handle) = store
        .start_committer(&options, Vec::new(), Arc::new(Metrics::new()))
        .unwrap();
    let mut group = c.benchmark_group("append");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for writers in CONCURRENCY {
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::from_parameter(writers),
            &writers,
            |b, &writers| {
                b.to_async(&rt)
                    .iter_custom(|iters| append_concurrently(committer.clone(), writers, iters));
            },
        );
    }
    group.finish();
    rt.block_on(handle.close());
}

async fn append_concurrently(committer: Committer, writers: usize, iters: u64) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers as u64)
        .map(|w| {
            let committer = committer.clone();
            let share = iters / writers as u64 + u64::from(w < iters % writers as u64);
            tokio::spawn(async move {
                for n in 0..share {
                    let entry = Entry::Event {
                        event: "visitor_created".into(),
                        body: payload(n),
                    };
                    committer.append(entry).await.expect("append commits");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

fn bench_fsync(c: &mut Criterion) {
    let dir = bench_dir();
    let mut file = std::fs::File::create(dir.path().join("probe")).unwrap();
    let block = [b'x'; 1024];
    c.bench_function("fsync_1k", |b| {
        b.iter(|| {
            file.write_all(&block).unwrap();
            file.sync_data().unwrap();
        })
    });
}

/// The same front end, secret check and validation, answering 200 without
/// storing anything: persistence switched off.
async fn start_no_persistence() -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let check = SecretCheck::new(&Secret::new(SECRET));
    let shutdown = CancellationToken::new();
    let limits = ConnectionLimits {
        max_connections: 1024,
        header_read_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(1),
    };
    let handler = move |request: Request<hyper::body::Incoming>| {
        let check = check.clone();
        async move {
            let authorized = request
                .headers()
                .get("x-webhook-secret")
                .is_some_and(|v| check.matches(v.as_bytes()));
            let body = Limited::new(request.into_body(), 1 << 20)
                .collect()
                .await
                .map(|b| b.to_bytes());
            match (authorized, body) {
                (true, Ok(body)) if event_type(&body).is_ok() => json_response(
                    StatusCode::OK,
                    Bytes::from_static(br#"{"status":"accepted","id":"0"}"#),
                ),
                _ => json_response(StatusCode::BAD_REQUEST, Bytes::from_static(b"{}")),
            }
        }
    };
    tokio::spawn(http::serve(listener, limits, handler, shutdown.clone()));
    (addr, shutdown)
}

fn bench_http(c: &mut Criterion) {
    let rt = runtime();
    let dir = bench_dir();
    let (durable, _, stop_durable) = rt.block_on(start_relay(dir.path(), Vec::new()));
    let (plain, stop_plain) = rt.block_on(start_no_persistence());
    let mut group = c.benchmark_group("http");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    for connections in CONCURRENCY {
        for (name, addr) in [("durable", durable), ("no_persistence", plain)] {
            group.bench_with_input(
                BenchmarkId::new(name, connections),
                &connections,
                |b, &n| {
                    b.to_async(&rt).iter_custom(|iters| drive(addr, n, iters));
                },
            );
        }
    }
    group.finish();
    stop_durable.cancel();
    stop_plain.cancel();
}

criterion_group!(benches, bench_fsync, bench_append, bench_http);
criterion_main!(benches);
