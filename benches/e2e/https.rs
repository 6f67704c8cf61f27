//! The HTTPS rows: the relay's ingest (durable, no targets) over plain
//! HTTP and over HTTPS, with one keep-alive connection per sender and with
//! a new connection per request (LeadFloAgent's way: each webhook on a
//! fresh connection), resumed or with a full handshake each time; the
//! same load driver for every row, so the ratios compare transports only.

use std::time::Duration;

use super::support::RelayChild;
use super::support::transport::{BenchCertificate, Transport, timed_load_over};
use super::{Cell, PATH, SENDERS, median};

/// One transport: its name, TLS, a new connection per request, and
/// whether the client resumes TLS sessions.
struct Setup {
    name: &'static str,
    tls: bool,
    per_request: bool,
    resume: bool,
}

const SETUPS: [Setup; 5] = [
    Setup {
        name: "HTTP, keep-alive",
        tls: false,
        per_request: false,
        resume: false,
    },
    Setup {
        name: "HTTPS, keep-alive",
        tls: true,
        per_request: false,
        resume: true,
    },
    Setup {
        name: "HTTP, new connection per request",
        tls: false,
        per_request: true,
        resume: false,
    },
    Setup {
        name: "HTTPS, new connection per request, session resumed",
        tls: true,
        per_request: true,
        resume: true,
    },
    Setup {
        name: "HTTPS, new connection per request, full handshake",
        tls: true,
        per_request: true,
        resume: false,
    },
];

/// Every setup's cells, one per sender count.
pub struct Rows {
    certificate: BenchCertificate,
    cells: Vec<Vec<Cell>>,
    /// Per cell: TLS handshakes made, and those that resumed a session.
    handshakes: Vec<Vec<(u64, u64)>>,
}

impl Rows {
    pub fn new() -> Rows {
        Rows {
            certificate: BenchCertificate::new(),
            cells: SETUPS
                .iter()
                .map(|_| SENDERS.iter().map(|_| Cell::default()).collect())
                .collect(),
            handshakes: SETUPS.iter().map(|_| vec![(0, 0); SENDERS.len()]).collect(),
        }
    }

    /// One round: each setup at each sender count for `duration`, on a
    /// fresh relay, with the relay's CPU per request.
    pub async fn round(&mut self, duration: Duration) {
        for (s, setup) in SETUPS.iter().enumerate() {
            for (n, &senders) in SENDERS.iter().enumerate() {
                let dir = tempfile::tempdir_in(".").unwrap();
                let extra = if setup.tls {
                    let config = self.certificate.config_file(dir.path());
                    vec!["--config".to_owned(), config.to_str().unwrap().to_owned()]
                } else {
                    Vec::new()
                };
                let relay = RelayChild::start(&dir.path().join("data"), &extra);
                let transport = Transport {
                    tls: setup.tls.then(|| self.certificate.client()),
                    per_request: setup.per_request,
                    resume: setup.resume,
                };
                let cpu = relay.cpu_seconds();
                let over = timed_load_over(relay.ingest, PATH, senders, duration, &transport).await;
                let cell = &mut self.cells[s][n];
                cell.add_cpu(relay.cpu_seconds() - cpu, &over.run);
                cell.add(&over.run);
                let counts = &mut self.handshakes[s][n];
                *counts = (counts.0 + over.handshakes, counts.1 + over.resumed);
                relay.stop();
            }
        }
    }

    /// The table, and HTTPS against HTTP in the same connection mode.
    pub fn report(&mut self) {
        println!();
        println!(
            "| transport | senders | req/s | ack p50 µs | p99 µs | server CPU µs/request | TLS handshakes resumed |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (s, setup) in SETUPS.iter().enumerate() {
            for (n, cell) in self.cells[s].iter_mut().enumerate() {
                let (made, resumed) = self.handshakes[s][n];
                let resumed = if made == 0 {
                    "—".to_owned()
                } else {
                    format!("{resumed} of {made}")
                };
                println!(
                    "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {resumed} |",
                    setup.name,
                    SENDERS[n],
                    cell.rate(),
                    cell.q(0.5),
                    cell.q(0.99),
                    median(&cell.cpu_us),
                );
            }
        }
        println!();
        println!("| HTTPS vs HTTP | senders | req/s | ack p50 | server CPU/request |");
        println!("|---|---|---|---|---|");
        for (name, https, http) in [
            ("keep-alive", 1, 0),
            ("new connection, resumed", 3, 2),
            ("new connection, full handshake", 4, 2),
        ] {
            for (n, senders) in SENDERS.iter().enumerate() {
                let (rate, p50, cpu) = self.ratio(https, http, n);
                println!("| {name} | {senders} | {rate:.2}× | {p50:.2}× | {cpu:.2}× |");
            }
        }
    }

    /// HTTPS setup `https` against HTTP setup `http` at sender index `n`:
    /// rate, ack p50 and CPU per request ratios.
    fn ratio(&mut self, https: usize, http: usize, n: usize) -> (f64, f64, f64) {
        let (rate, p50, cpu) = {
            let cell = &mut self.cells[https][n];
            (cell.rate(), cell.q(0.5), median(&cell.cpu_us))
        };
        let base = &mut self.cells[http][n];
        (
            rate / base.rate(),
            p50 / base.q(0.5),
            cpu / median(&base.cpu_us),
        )
    }
}
