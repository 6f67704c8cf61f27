//! End-to-end load bench against baselines measured in the same run.
//!
//! `cargo bench --bench e2e` (add `-- --quick` for a short run) starts, on
//! loopback:
//!
//! 1. **ceiling**: the relay's own hyper front end (same accept loop) with a
//!    handler that reads the body and answers 200: no secret check, no
//!    storage; a separate process, like the relay; and two variants of it:
//!    **+ write-ahead log only** (every body group-committed with the
//!    relay's own write-ahead log code before the answer, no sled: the most
//!    a durable relay built this way can do) and **+ forwarding** (every
//!    body POSTed to the fast target before the answer, no storage);
//! 2. **relay, ingest only**: the real release binary, durable, with the
//!    secret, no targets;
//! 3. **relay, ingest + delivery**: the same with one fast local target (a
//!    hyper server answering 200) receiving every event while ingest is
//!    loaded; after the load stops, the time until the target has them all;
//! 4. **fsync probe**: 1 KiB append + `fdatasync` in a loop on the data
//!    directory's filesystem: the physical floor of a durable ack; and the
//!    same over a preallocated file (as the write-ahead log writes), the
//!    stricter floor; run before every round and after the last, samples
//!    pooled, so the floor spans the minutes of the acks it is compared with.
//!
//! A built-in load generator (hyper client, one keep-alive connection per
//! sender, the seed's `visitor_created` payload with a different name, email
//! and phone per request) drives 1-3 at 1, 16 and 64 senders for a fixed time,
//! several rounds, and prints a markdown table and the ratios the
//! performance targets are stated in. The numbers are never checked against
//! thresholds here: they are reported.
//!
//! 5. **transports**: the relay's ingest over plain HTTP and HTTPS, with
//!    keep-alive connections and with a new connection per request
//!    (resumed, or a full handshake each time), with the relay's CPU per
//!    request (`e2e/https.rs`); `-- --https` runs only these.
//!
//! `-- --outage SECONDS`: the target refuses connections for that long while
//! 3,000 leads arrive, then comes back; reports how long until it has them.
//!
//! `-- --backlog N`: ingests N events while the target is down, then
//! restarts the relay with the target up and measures the relay's peak RSS,
//! the time from start to `/readyz` with that backlog, its peak RSS up to
//! then (`VmHWM`: startup included), the drain rate (deliveries made before
//! ready left out) (and its ratio to the rate the same run
//! ingested at: 64 senders, target down) and the relay's CPU per delivery; then,
//! as the bound, the **delivery floor**: the relay's own delivery client,
//! in a process of its own with no log, at the same concurrency into the
//! same target.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::StatusCode;
use leadflo_relay::http::{self, ConnectionLimits};
use leadflo_relay::ingest::json_response;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;

#[path = "e2e/https.rs"]
mod https;

use support::{LoadRun, RelayChild, timed_load};

const PATH: &str = "/leadflo-webhook";
const SENDERS: [usize; 3] = [1, 16, 64];
/// The fast target's `concurrency` in every relay run (and the floor's).
const TARGET_CONCURRENCY: usize = 16;

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        max_connections: 4096,
        header_read_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(1),
    }
}

/// Child role: the ceiling server. Prints its address, serves until killed.
fn run_ceiling() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("ADDR {}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        // With E2E_FORWARD, each body is also POSTed to that URL (pooled
        // keep-alive connections) before the answer: the least work any
        // relay that delivers every event must do, without storage.
        let forward = std::env::var("E2E_FORWARD")
            .ok()
            .map(|url| url.parse::<hyper::Uri>().unwrap());
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        // With E2E_DURABLE_DIR, each body is group-committed to the relay's
        // own write-ahead log code (one append + fdatasync per group, on a
        // thread of its own) before the answer: durability and nothing else.
        // With E2E_DURABLE_INLINE too, each request appends and syncs its
        // own frame on the tokio worker that serves it (no group commit, no
        // thread hand-off): the least latency a durable answer can have.
        let dir = std::env::var("E2E_DURABLE_DIR")
            .ok()
            .map(std::path::PathBuf::from);
        let inline = std::env::var("E2E_DURABLE_INLINE").is_ok();
        let durable = dir.clone().filter(|_| !inline).map(|dir| {
            let (tx, rx) = tokio::sync::mpsc::channel(8192);
            std::thread::spawn(move || group_commit(dir, rx));
            tx
        });
        let inline_log = dir.filter(|_| inline).map(|dir| {
            use leadflo_relay::store::wal;
            wal::prepare_spare(&dir).unwrap();
            Arc::new(std::sync::Mutex::new(wal::Wal::open(&dir).unwrap().0))
        });
        let handler = move |request: hyper::Request<hyper::body::Incoming>| {
            let (forward, client, durable) = (forward.clone(), client.clone(), durable.clone());
            let inline_log = inline_log.clone();
            async move {
                let body = Limited::new(request.into_body(), 1 << 20)
                    .collect()
                    .await
                    .map(|collected| collected.to_bytes());
                // A body that could not be read is not a request served.
                let Ok(body) = body else {
                    return json_response(StatusCode::BAD_REQUEST, Bytes::new());
                };
                if let Some(store) = &inline_log {
                    use leadflo_relay::store::wal;
                    tokio::task::block_in_place(|| {
                        let mut frame = wal::Frame::new();
                        frame.push(wal::KIND_EVENT, 1, &body, std::iter::empty::<&str>());
                        store.lock().unwrap().append(&mut frame).unwrap();
                    });
                }
                if let Some(durable) = &durable {
                    let (done, written) = tokio::sync::oneshot::channel();
                    if durable.send((body.clone(), done)).await.is_err() || written.await.is_err() {
                        return json_response(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
                    }
                }
                if let Some(uri) = forward {
                    let outbound = hyper::Request::post(uri)
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(body))
                        .unwrap();
                    // A failed forward must not be answered (and counted) as a success.
                    match client.request(outbound).await {
                        Ok(response) if response.status().is_success() => {
                            if response.into_body().collect().await.is_err() {
                                return json_response(StatusCode::BAD_GATEWAY, Bytes::new());
                            }
                        }
                        _ => return json_response(StatusCode::BAD_GATEWAY, Bytes::new()),
                    }
                }
                json_response(
                    StatusCode::OK,
                    Bytes::from_static(br#"{"status":"accepted","id":"0"}"#),
                )
            }
        };
        http::serve(listener, limits(), handler, CancellationToken::new()).await;
    });
}

type Durable = (Bytes, tokio::sync::oneshot::Sender<()>);

/// The durable floor's committer: everything waiting joins one frame of
/// the relay's write-ahead log, appended and `fdatasync`ed before any of it
/// is answered; segments rotate over a preallocated spare as in the relay.
fn group_commit(dir: std::path::PathBuf, mut rx: tokio::sync::mpsc::Receiver<Durable>) {
    use leadflo_relay::store::wal;
    wal::prepare_spare(&dir).unwrap();
    let (mut store, _, _) = wal::Wal::open(&dir).unwrap();
    let mut id = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let mut frame = wal::Frame::new();
        for (body, _) in &group {
            id += 1;
            frame.push(wal::KIND_EVENT, id, body, std::iter::empty::<&str>());
        }
        store.append(&mut frame).unwrap();
        for (_, done) in group {
            let _ = done.send(());
        }
        if store.len() >= wal::SEGMENT_BYTES {
            let through = store.rotate().unwrap();
            wal::remove_through(&dir, through).unwrap();
            wal::prepare_spare(&dir).unwrap();
        }
    }
}

struct Ceiling(std::process::Child, SocketAddr);

impl Ceiling {
    /// The ceiling; with `forward`, forwarding every body to that URL; with
    /// `durable`, group-committing every body to a write-ahead log there.
    fn start(forward: Option<&str>, durable: Option<&std::path::Path>, inline: bool) -> Ceiling {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        if let Some(url) = forward {
            command.env("E2E_FORWARD", url);
        }
        if let Some(dir) = durable {
            command.env("E2E_DURABLE_DIR", dir);
        }
        if inline {
            command.env("E2E_DURABLE_INLINE", "1");
        }
        let mut child = command
            .env("E2E_ROLE", "ceiling")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().strip_prefix("ADDR ").unwrap().parse().unwrap();
        Ceiling(child, addr)
    }

    /// Loads this server with `senders` for `duration`, recording the run
    /// and the server's CPU time in `cell`; then stops it.
    async fn load(self, cell: &mut Cell, senders: usize, duration: Duration) {
        let cpu = support::cpu_seconds(self.0.id());
        let run = timed_load(self.1, PATH, senders, duration).await;
        cell.add_cpu(support::cpu_seconds(self.0.id()) - cpu, &run);
        cell.add(&run);
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fast target in this process: reads each body, answers 200, counts.
async fn fast_target() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    (
        url,
        support::counting_target(listener, CancellationToken::new()),
    )
}

fn target_config(dir: &std::path::Path, url: &str) -> Vec<String> {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[[targets]]\nname = \"fast\"\nurl = \"{url}\"\nconcurrency = {TARGET_CONCURRENCY}\n"
        ),
    )
    .unwrap();
    vec!["--config".into(), path.to_str().unwrap().into()]
}

#[derive(Default)]
struct Cell {
    rates: Vec<f64>,
    latencies: Vec<u32>,
    deliveries_per_s: Vec<f64>,
    drains: Vec<f64>,
    /// Events acknowledged but not yet at the target when the load stopped.
    left_at_end: Vec<f64>,
    peak_rss: u64,
    bytes_per_event: Vec<f64>,
    /// The server process's CPU time per acknowledged request (for the
    /// relay with a target: until every event is delivered), in µs.
    cpu_us: Vec<f64>,
    /// This process's CPU time per acknowledged request over the same span,
    /// in µs: the load generator and, with a target, the fast target.
    bench_cpu_us: Vec<f64>,
}

impl Cell {
    fn add(&mut self, run: &LoadRun) {
        self.rates.push(run.rate());
        self.latencies.extend(&run.latencies_us);
    }

    /// Records `cpu_seconds` of the server's CPU for `run`'s requests.
    fn add_cpu(&mut self, cpu_seconds: f64, run: &LoadRun) {
        self.cpu_us
            .push(cpu_seconds * 1e6 / run.acked.max(1) as f64);
    }

    fn rate(&self) -> f64 {
        median(&self.rates)
    }

    fn q(&mut self, q: f64) -> f64 {
        self.latencies.sort_unstable();
        support::quantile(&self.latencies, q)
    }
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// 1 KiB written + `fdatasync`, `iterations` times: appended to a growing
/// file (the issue's probe), or, with `preallocated`, over a file already
/// written and synced at full size (what the write-ahead log does: no size
/// change, so no metadata to sync; the stricter floor).
fn fsync_probe(iterations: usize, preallocated: bool) -> Vec<u32> {
    use std::io::{Seek, SeekFrom};
    let dir = tempfile::tempdir_in(".").unwrap();
    let mut file = std::fs::File::create(dir.path().join("probe")).unwrap();
    let block = [b'x'; 1024];
    if preallocated {
        file.write_all(&vec![0; 1024 * iterations]).unwrap();
        file.sync_all().unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
    }
    let mut latencies: Vec<u32> = (0..iterations)
        .map(|_| {
            let started = Instant::now();
            file.write_all(&block).unwrap();
            file.sync_data().unwrap();
            started.elapsed().as_micros() as u32
        })
        .collect();
    latencies.sort_unstable();
    latencies
}

async fn wait_for(count: &AtomicU64, want: u64, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while count.load(Ordering::Relaxed) < want {
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(started.elapsed())
}

/// `cargo bench --bench e2e -- [OPTIONS]`.
#[derive(clap::Parser)]
#[command(about = "End-to-end load bench against baselines measured in the same run")]
struct Args {
    /// One round of one second per cell (noisy; what CI runs).
    #[arg(long)]
    quick: bool,
    /// Ingest N events with the target down, then measure the restart and
    /// the drain.
    #[arg(long, value_name = "N")]
    backlog: Option<u64>,
    /// The target refuses connections for this many seconds while 3,000
    /// leads arrive.
    #[arg(long, value_name = "SECONDS")]
    outage: Option<u64>,
    /// Only the transport rows: HTTP and HTTPS, keep-alive and new
    /// connections.
    #[arg(long)]
    https: bool,
    /// Passed by `cargo bench` to every bench binary.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The bench, or (with `E2E_ROLE`) one of its child processes.
fn main() {
    match std::env::var("E2E_ROLE").as_deref() {
        Ok("ceiling") => return run_ceiling(),
        Ok("deliverer") => return run_delivery_floor(),
        _ => {}
    }
    let args = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(events) = args.backlog {
        return runtime.block_on(backlog_mode(events));
    }
    if let Some(seconds) = args.outage {
        return runtime.block_on(outage_mode(Duration::from_secs(seconds), 3000));
    }
    let (rounds, duration) = if args.quick {
        (1, Duration::from_secs(1))
    } else {
        (3, Duration::from_secs(5))
    };
    if args.https {
        return runtime.block_on(https_mode(rounds, duration));
    }
    runtime.block_on(async {
        // The fsync probe runs before every round and after the last, and
        // its samples are pooled: a shared disk's latency drifts over the
        // minutes of a run, and the floor should span the same minutes as
        // the acks it is compared with.
        let probes = if args.quick { 300 } else { 2000 };
        let per_probe = probes / (rounds + 1);
        let mut fsync = Vec::new();
        let mut overwrite = Vec::new();
        let probe = |fsync: &mut Vec<u32>, overwrite: &mut Vec<u32>| {
            fsync.extend(fsync_probe(per_probe, false));
            overwrite.extend(fsync_probe(per_probe, true));
        };
        let mut ceiling: Vec<Cell> = SENDERS.iter().map(|_| Cell::default()).collect();
        let mut durable_floor: Vec<Cell> = SENDERS.iter().map(|_| Cell::default()).collect();
        let mut inline_floor: Vec<Cell> = SENDERS.iter().map(|_| Cell::default()).collect();
        let mut forwarding: Vec<Cell> = SENDERS.iter().map(|_| Cell::default()).collect();
        let mut ingest: Vec<Cell> = SENDERS.iter().map(|_| Cell::default()).collect();
        let mut delivery: Vec<Cell> = SENDERS.iter().map(|_| Cell::default()).collect();
        let mut transports = https::Rows::new();
        for round in 0..rounds {
            eprintln!("round {}/{rounds}", round + 1);
            probe(&mut fsync, &mut overwrite);
            for (n, &senders) in SENDERS.iter().enumerate() {
                // 1. ceiling
                let server = Ceiling::start(None, None, false);
                server.load(&mut ceiling[n], senders, duration).await;

                // 1a. ceiling that makes every body durable first (the
                // relay's write-ahead log alone: no sled, no secret check)
                let dir = tempfile::tempdir_in(".").unwrap();
                let server = Ceiling::start(None, Some(dir.path()), false);
                server.load(&mut durable_floor[n], senders, duration).await;
                // 1b. the same, each request syncing inline (latency floor)
                let dir = tempfile::tempdir_in(".").unwrap();
                let server = Ceiling::start(None, Some(dir.path()), true);
                inline_floor[n].add(&timed_load(server.1, PATH, senders, duration).await);
                drop(server);

                // 1c. ceiling that also forwards every body to a fast target
                let (url, received) = fast_target().await;
                let server = Ceiling::start(Some(&url), None, false);
                let run = timed_load(server.1, PATH, senders, duration).await;
                forwarding[n].add(&run);
                forwarding[n]
                    .deliveries_per_s
                    .push(received.load(Ordering::Relaxed) as f64 / run.elapsed.as_secs_f64());
                drop(server);

                // 2. relay, ingest only
                let dir = tempfile::tempdir_in(".").unwrap();
                let relay = RelayChild::start(&dir.path().join("data"), &[]);
                let cpu = relay.cpu_seconds();
                let run = timed_load(relay.ingest, PATH, senders, duration).await;
                ingest[n].add_cpu(relay.cpu_seconds() - cpu, &run);
                ingest[n].add(&run);
                ingest[n].peak_rss = ingest[n].peak_rss.max(relay.peak_rss());
                relay.stop();
                let stored = leadflo_relay::disk::store_size(&dir.path().join("data")).unwrap();
                ingest[n]
                    .bytes_per_event
                    .push(stored as f64 / run.acked.max(1) as f64);

                // 3. relay, ingest + delivery
                let dir = tempfile::tempdir_in(".").unwrap();
                let (url, received) = fast_target().await;
                let relay =
                    RelayChild::start(&dir.path().join("data"), &target_config(dir.path(), &url));
                let cpu = relay.cpu_seconds();
                let bench_cpu = support::cpu_seconds(std::process::id());
                let run = timed_load(relay.ingest, PATH, senders, duration).await;
                let at_end = received.load(Ordering::Relaxed);
                let during = at_end as f64 / run.elapsed.as_secs_f64();
                delivery[n]
                    .left_at_end
                    .push(run.acked.saturating_sub(at_end) as f64);
                let drain = wait_for(&received, run.acked, Duration::from_secs(300)).await;
                delivery[n].add_cpu(relay.cpu_seconds() - cpu, &run);
                delivery[n].bench_cpu_us.push(
                    (support::cpu_seconds(std::process::id()) - bench_cpu) * 1e6
                        / run.acked.max(1) as f64,
                );
                delivery[n].add(&run);
                delivery[n].deliveries_per_s.push(during);
                delivery[n]
                    .drains
                    .push(drain.map_or(f64::INFINITY, |d| d.as_secs_f64()));
                delivery[n].peak_rss = delivery[n].peak_rss.max(relay.peak_rss());
                relay.stop();
            }
            transports.round(duration).await;
        }
        probe(&mut fsync, &mut overwrite);
        fsync.sort_unstable();
        overwrite.sort_unstable();
        report(
            fsync,
            overwrite,
            &mut ceiling,
            &mut durable_floor,
            &mut inline_floor,
            &mut forwarding,
            &mut ingest,
            &mut delivery,
            rounds,
            duration,
        );
        transports.report();
    });
}

/// `-- --https`: only the transport rows (HTTP and HTTPS, keep-alive and a
/// new connection per request).
async fn https_mode(rounds: usize, duration: Duration) {
    let mut transports = https::Rows::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        transports.round(duration).await;
    }
    println!(
        "\n{rounds} round(s) of {} s per cell; the relay durable, no targets",
        duration.as_secs()
    );
    transports.report();
}

#[allow(clippy::too_many_arguments)]
fn report(
    fsync: Vec<u32>,
    overwrite: Vec<u32>,
    ceiling: &mut [Cell],
    durable_floor: &mut [Cell],
    inline_floor: &mut [Cell],
    forwarding: &mut [Cell],
    ingest: &mut [Cell],
    delivery: &mut [Cell],
    rounds: usize,
    duration: Duration,
) {
    let (f50, f99) = (
        support::quantile(&fsync, 0.5),
        support::quantile(&fsync, 0.99),
    );
    let o50 = support::quantile(&overwrite, 0.5);
    let body = support::lead_payload(0).len();
    println!();
    println!(
        "{rounds} round(s) of {} s per cell; payload {body} bytes; fsync probe (1 KiB + fdatasync): p50 {f50:.0} µs, p99 {f99:.0} µs; \
         over a preallocated file (as the write-ahead log writes): p50 {o50:.0} µs, p99 {:.0} µs\n",
        duration.as_secs(),
        support::quantile(&overwrite, 0.99),
    );
    println!(
        "| setup | senders | req/s | ack p50 µs | p99 µs | p99.9 µs | deliveries/s during load | drain after load | peak RSS MiB | disk bytes/event | server CPU µs/request |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mib = |b: u64| {
        if b == 0 {
            "—".to_owned()
        } else {
            format!("{:.1}", b as f64 / 1048576.0)
        }
    };
    for (name, cells) in [
        ("ceiling", &mut *ceiling),
        ("ceiling + write-ahead log only", &mut *durable_floor),
        (
            "ceiling + write-ahead log, synced inline",
            &mut *inline_floor,
        ),
        ("ceiling + forwarding", &mut *forwarding),
        ("relay, ingest only", &mut *ingest),
        ("relay, ingest + delivery", &mut *delivery),
    ] {
        for (n, cell) in cells.iter_mut().enumerate() {
            let deliveries = if cell.deliveries_per_s.is_empty() {
                "—".into()
            } else {
                format!("{:.0}", median(&cell.deliveries_per_s))
            };
            let drain = if cell.drains.is_empty() {
                "—".into()
            } else {
                format!("{:.2} s", median(&cell.drains))
            };
            let disk = if cell.bytes_per_event.is_empty() {
                "—".into()
            } else {
                format!("{:.0}", median(&cell.bytes_per_event))
            };
            let cpu = if cell.cpu_us.is_empty() {
                "—".into()
            } else {
                format!("{:.0}", median(&cell.cpu_us))
            };
            println!(
                "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {deliveries} | {drain} | {} | {disk} | {cpu} |",
                SENDERS[n],
                cell.rate(),
                cell.q(0.5),
                cell.q(0.99),
                cell.q(0.999),
                mib(cell.peak_rss),
            );
        }
    }
    let at = |cells: &[Cell], senders: usize| {
        SENDERS
            .iter()
            .position(|&s| s == senders)
            .map(|i| cells[i].rate())
            .unwrap()
    };
    let relay64 = at(ingest, 64);
    let ratio64 = relay64 / at(ceiling, 64);
    let ack50 = ingest[0].q(0.5);
    let ack99_16 = ingest[1].q(0.99);
    let deliveries64 = median(&delivery[2].deliveries_per_s);
    let with_delivery = at(delivery, 64) / relay64;
    let disk = median(&ingest[2].bytes_per_event) / body as f64;
    println!();
    println!("| target | measured | goal | met |");
    println!("|---|---|---|---|");
    let row = |what: &str, measured: String, goal: String, met: bool| {
        println!(
            "| {what} | {measured} | {goal} | {} |",
            if met { "yes" } else { "no" }
        );
    };
    row(
        "durable ingest / ceiling at 64 senders",
        format!("{ratio64:.2}×"),
        "≥ 0.70×".into(),
        ratio64 >= 0.7,
    );
    row(
        "ack p50 at 1 sender vs fsync p50",
        format!("{ack50:.0} µs ({:.2}× fsync)", ack50 / f50),
        format!("≤ {:.0} µs (1.5× fsync + 100 µs)", 1.5 * f50 + 100.0),
        ack50 <= 1.5 * f50 + 100.0,
    );
    // Not a target from the issue: the same goal against the stricter floor
    // (the relay's own write-ahead log overwrites preallocated space).
    row(
        "ack p50 at 1 sender vs preallocated fsync p50 (stricter)",
        format!("{ack50:.0} µs ({:.2}× that fsync)", ack50 / o50),
        format!("≤ {:.0} µs (1.5× + 100 µs)", 1.5 * o50 + 100.0),
        ack50 <= 1.5 * o50 + 100.0,
    );
    row(
        "ack p99 at 16 senders vs fsync p99",
        format!("{ack99_16:.0} µs"),
        format!("≤ {:.0} µs (3× fsync p99 + 1 ms)", 3.0 * f99 + 1000.0),
        ack99_16 <= 3.0 * f99 + 1000.0,
    );
    // The issue's bar is the durable ingest rate at 64 senders, the same
    // number as in the first row (ingest alone), not the ingest rate with
    // delivery running: deliveries during the load can never exceed that
    // one (an event is delivered only after it is acknowledged).
    row(
        "deliveries/s during load vs durable ingest (alone) at 64",
        format!(
            "{deliveries64:.0} vs {relay64:.0} (ingest with delivery {:.0}/s; {:.0} left at load end)",
            at(delivery, 64),
            median(&delivery[2].left_at_end),
        ),
        "≥ ingest alone".into(),
        deliveries64 >= relay64,
    );
    row(
        "ingest with delivery / ingest alone at 64",
        format!("{with_delivery:.2}×"),
        "≥ 0.80×".into(),
        with_delivery >= 0.8,
    );
    // Not a target from the issue: the physical bound for the one above on
    // this machine. A storage-free server that forwards every body gets
    // this fraction of the plain ceiling; no relay that delivers can beat it.
    let forwarding_bound = at(forwarding, 64) / at(ceiling, 64);
    let with_delivery_vs_bound = at(delivery, 64) / at(forwarding, 64);
    row(
        "disk per event / body size (not pruned)",
        format!("{disk:.2}×"),
        "≤ 2.5× once pruned".into(),
        disk <= 2.5,
    );
    println!(
        "\nbound: a storage-free server forwarding every body reaches {forwarding_bound:.2}× the ceiling at 64 senders; \
         the relay with delivery reaches {with_delivery_vs_bound:.2}× that server"
    );
    // Not a target either: the CPU budget of the two delivery targets
    // together. With every event delivered, each costs the relay's CPU
    // (ingest and delivery, measured until drained) plus this process's
    // (the load generator and the fast target, which share the machine);
    // the machine's cores bound the rate at which that can keep up.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let relay_cpu = median(&delivery[2].cpu_us);
    let bench_cpu = median(&delivery[2].bench_cpu_us);
    let keeping_up = cores * 1e6 / (relay_cpu + bench_cpu);
    println!(
        "bound: with every event delivered, an event at 64 senders took {relay_cpu:.0} µs of the relay's CPU and \
         {bench_cpu:.0} µs of the load generator's and target's: {cores:.0} cores keep up with at most {keeping_up:.0} events/s, \
         {:.2}× the relay's ingest alone",
        keeping_up / relay64,
    );
    // Not a target either: the same for durability. The ceiling with the
    // relay's write-ahead log and nothing else (no sled, no secret check,
    // no validation) is the most any durable relay built this way can do.
    println!(
        "bound: the ceiling with only the write-ahead log (group commit, no sled) reaches {:.2}× the ceiling at 64 senders \
         and acks in {:.0} µs p50 at 1 sender; the relay reaches {:.2}× and {:.2}× of that",
        at(durable_floor, 64) / at(ceiling, 64),
        durable_floor[0].q(0.5),
        relay64 / at(durable_floor, 64),
        ack50 / durable_floor[0].q(0.5),
    );
    println!(
        "bound: synced inline on the serving thread (no group commit, no hand-off), one sender's ack takes {:.0} µs p50: \
         {:.2}× the fsync probe, {:.2}× the preallocated one",
        inline_floor[0].q(0.5),
        inline_floor[0].q(0.5) / f50,
        inline_floor[0].q(0.5) / o50,
    );
}

async fn backlog_mode(events: u64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let data = dir.path().join("data");
    // The target's address, reserved and closed: connections are refused.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let url = format!("http://{target_addr}/hook");
    let config = target_config(dir.path(), &url);

    let relay = RelayChild::start(&data, &config);
    let started = Instant::now();
    let mut sent = 0;
    while sent < events {
        let run = support::timed_load(relay.ingest, PATH, 64, Duration::from_secs(2)).await;
        sent += run.acked;
        eprintln!("ingested {sent} / {events}");
    }
    let ingest_time = started.elapsed();
    let rss_ingest = relay.peak_rss();
    relay.stop();
    let store = leadflo_relay::disk::store_size(&data).unwrap();

    // The target comes back; the relay restarts with the backlog.
    let listener = TcpListener::bind(target_addr)
        .await
        .expect("target port still free");
    let received = support::counting_target(listener, CancellationToken::new());
    let started = Instant::now();
    let relay = RelayChild::start(&data, &config);
    wait_until_ready(relay.admin).await;
    let ready = started.elapsed();
    // Peak resident memory up to ready (VmHWM: startup's peak included;
    // the dispatchers start with the admin listener, so delivery may have
    // begun).
    let rss_ready = relay.peak_rss();
    let cpu = relay.cpu_seconds();
    // Deliveries made before ready are not in the drain's time: leave them
    // out of its rate.
    let before_ready = received.load(Ordering::Relaxed);
    let drained = (sent - before_ready.min(sent)) as f64;
    let drain = wait_for(&received, sent, Duration::from_secs(3600)).await;
    let cpu_us = (relay.cpu_seconds() - cpu) * 1e6 / sent as f64;
    let rss_drain = relay.peak_rss();
    relay.stop();
    // The same target, the same client code and concurrency, no log.
    let floor_count = sent.min(300_000);
    let (floor_rate, floor_cpu_us) = delivery_floor(&url, floor_count, TARGET_CONCURRENCY);
    println!();
    println!(
        "| backlog | ingest time | store after ingest | peak RSS (ingest) | start to ready | peak RSS to ready | delivered before ready | drain | drain rate | drain / ingest rate | relay CPU µs/delivery | peak RSS (drain) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ingest_rate = sent as f64 / ingest_time.as_secs_f64();
    println!(
        "| {sent} | {:.1} s | {:.0} MiB | {:.1} MiB | {:.2} s | {:.1} MiB | {before_ready} | {} | {} | {} | {cpu_us:.0} | {:.1} MiB |",
        ingest_time.as_secs_f64(),
        store as f64 / 1048576.0,
        rss_ingest as f64 / 1048576.0,
        ready.as_secs_f64(),
        rss_ready as f64 / 1048576.0,
        drain.map_or("not within 1 h".into(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        )),
        drain.map_or("—".into(), |d| format!(
            "{:.0}/s",
            drained / d.as_secs_f64()
        )),
        drain.map_or("—".into(), |d| format!(
            "{:.2}× ({ingest_rate:.0}/s)",
            drained / d.as_secs_f64() / ingest_rate
        )),
        rss_drain as f64 / 1048576.0,
    );
    println!();
    println!(
        "bound: the relay's delivery client alone (no log; {floor_count} deliveries at concurrency {TARGET_CONCURRENCY} \
         into the same target) delivers {floor_rate:.0}/s with {floor_cpu_us:.0} µs CPU each; the drain reaches {}",
        drain.map_or("—".into(), |d| format!(
            "{:.2}× of that",
            drained / d.as_secs_f64() / floor_rate
        )),
    );
}

/// The target refuses connections for `outage` while `events` leads arrive
/// spread over it, then comes back: how long until it has them all?
async fn outage_mode(outage: Duration, events: u64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let config = target_config(dir.path(), &format!("http://{target_addr}/hook"));
    let relay = RelayChild::start(&dir.path().join("data"), &config);
    let started = Instant::now();
    let pause = outage / events as u32;
    let mut sent = 0;
    while sent < events {
        let run =
            support::timed_load(relay.ingest, PATH, 1, pause.max(Duration::from_millis(1))).await;
        sent += run.acked;
        let due = started + pause * sent as u32;
        tokio::time::sleep_until(due.into()).await;
    }
    tokio::time::sleep_until((started + outage).into()).await;
    let listener = TcpListener::bind(target_addr)
        .await
        .expect("target port still free");
    let received = support::counting_target(listener, CancellationToken::new());
    let delivered = wait_for(&received, sent, Duration::from_secs(600)).await;
    relay.stop();
    println!();
    println!("| outage | events during it | all delivered after the target's return |");
    println!("|---|---|---|");
    println!(
        "| {} s | {sent} | {} |",
        outage.as_secs(),
        delivered.map_or("not within 600 s".into(), |d| format!(
            "{:.2} s",
            d.as_secs_f64()
        ))
    );
}

/// The delivery floor, run as its own process (like the relay): the
/// relay's own delivery client ([`leadflo_relay::deliver::Deliverer`]) POSTs
/// `E2E_COUNT` leads to `E2E_URL` from `E2E_CONCURRENCY` tasks, with no log
/// behind it (bodies built beforehand, nothing read or recorded). It prints
/// `DONE <seconds> <cpu seconds>`: the most a relay delivering with this
/// client can do against that target on this machine.
fn run_delivery_floor() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let url: reqwest::Url = var("E2E_URL").parse().unwrap();
    let count: u64 = var("E2E_COUNT").parse().unwrap();
    let concurrency: u64 = var("E2E_CONCURRENCY").parse().unwrap();
    // Sized like the relay's delivery pool: two workers.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bodies: Arc<Vec<Bytes>> = Arc::new((0..1024).map(support::lead_payload).collect());
    let raw = leadflo_relay::config::TargetConfig::new("bench", url.as_str());
    let outbound = leadflo_relay::outbound::Outbound::build(&raw).unwrap();
    let deliverer =
        leadflo_relay::deliver::Deliverer::new(url, None, Duration::from_secs(10), outbound)
            .unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (deliverer, bodies, next) = (deliverer.clone(), bodies.clone(), next.clone());
            tasks.spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    let body = bodies[(n % 1024) as usize].clone();
                    let event = leadflo_relay::outbound::EventView {
                        id: leadflo_relay::store::EventId(n),
                        received_at_ms: 0,
                        body: &body,
                    };
                    let outcome = deliverer.attempt(&event, 1).await;
                    assert!(
                        matches!(outcome, leadflo_relay::deliver::Outcome::Delivered { .. }),
                        "{outcome:?}"
                    );
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "DONE {seconds} {}",
        support::cpu_seconds(std::process::id())
    );
}

/// Runs [`run_delivery_floor`] in a child process against `url`; returns
/// its deliveries per second and CPU µs per delivery.
fn delivery_floor(url: &str, count: u64, concurrency: usize) -> (f64, f64) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env("E2E_ROLE", "deliverer")
        .env("E2E_URL", url)
        .env("E2E_COUNT", count.to_string())
        .env("E2E_CONCURRENCY", concurrency.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("DONE "))
        .unwrap_or_else(|| panic!("the delivery floor failed: {output:?}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    (count as f64 / fields[0], fields[1] * 1e6 / count as f64)
}

/// Polls `/readyz` until it answers 200 (raw HTTP, no client library).
async fn wait_until_ready(admin: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await {
            let _ = stream
                .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
