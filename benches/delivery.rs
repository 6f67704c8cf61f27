//! Delivery throughput against a fast local target, and what delivery costs
//! ingest, measured in one run (`cargo bench --bench delivery`, or
//! `cargo bench --bench delivery -- --quick` for a short run).
//!
//! 1. ingest alone: the relay with no target, 64 keep-alive senders;
//! 2. ingest + delivery: the same load with one target (a hyper server on
//!    loopback answering 200) receiving every event, for two target
//!    `concurrency` settings; after the load stops, the time until the
//!    target has every event (the backlog drains).
//!
//! Prints a markdown table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use leadflo_relay::config::TargetConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;

const SENDERS: usize = 64;

/// A target that reads each body and answers 200; counts what it got.
async fn fast_target() -> (String, Arc<AtomicU64>, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    (
        url,
        support::counting_target(listener, shutdown.clone()),
        shutdown,
    )
}

struct Row {
    setup: String,
    ingest_per_s: f64,
    delivered_during_per_s: Option<f64>,
    drain: Option<Duration>,
    delivered_overall_per_s: Option<f64>,
}

async fn ingest_alone(load: Duration) -> Row {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (addr, _, stop) = support::start_relay(dir.path(), Vec::new()).await;
    let acked = support::drive_for(addr, SENDERS, load).await;
    stop.cancel();
    Row {
        setup: "ingest alone".into(),
        ingest_per_s: acked as f64 / load.as_secs_f64(),
        delivered_during_per_s: None,
        drain: None,
        delivered_overall_per_s: None,
    }
}

async fn ingest_with_delivery(load: Duration, concurrency: usize) -> Row {
    let (url, received, stop_target) = fast_target().await;
    let dir = tempfile::tempdir_in(".").unwrap();
    let mut target = TargetConfig::new("fast", &url);
    target.concurrency = concurrency;
    let (addr, _, stop) = support::start_relay(dir.path(), vec![target]).await;
    let started = Instant::now();
    let acked = support::drive_for(addr, SENDERS, load).await;
    let load_time = started.elapsed();
    let during = received.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + Duration::from_secs(600);
    while received.load(Ordering::Relaxed) < acked && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = started.elapsed();
    let drained = received.load(Ordering::Relaxed) >= acked;
    stop.cancel();
    stop_target.cancel();
    Row {
        setup: format!("ingest + delivery (target concurrency {concurrency})"),
        ingest_per_s: acked as f64 / load.as_secs_f64(),
        delivered_during_per_s: Some(during as f64 / load_time.as_secs_f64()),
        drain: drained.then(|| total - load_time),
        delivered_overall_per_s: Some(
            received.load(Ordering::Relaxed) as f64 / total.as_secs_f64(),
        ),
    }
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let load = Duration::from_secs(if quick { 2 } else { 10 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = runtime.block_on(async {
        vec![
            ingest_alone(load).await,
            ingest_with_delivery(load, 4).await,
            ingest_with_delivery(load, 32).await,
        ]
    });
    let alone = rows[0].ingest_per_s;
    println!(
        "\n{SENDERS} senders, {} s of load per row\n",
        load.as_secs()
    );
    println!(
        "| setup | ingest req/s | vs alone | deliveries/s during load | drain after load | deliveries/s overall |"
    );
    println!("|---|---|---|---|---|---|");
    let or_dash = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.0}"));
    for row in &rows {
        println!(
            "| {} | {:.0} | {:.2}× | {} | {} | {} |",
            row.setup,
            row.ingest_per_s,
            row.ingest_per_s / alone,
            or_dash(row.delivered_during_per_s),
            match (row.delivered_during_per_s, row.drain) {
                (None, _) => "—".to_owned(),
                (Some(_), Some(d)) => format!("{:.2} s", d.as_secs_f64()),
                (Some(_), None) => "did not drain in 600 s".to_owned(),
            },
            or_dash(row.delivered_overall_per_s),
        );
    }
}
