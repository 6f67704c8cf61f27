//! Does pruning give disk space back? Measured in one run
//! (`cargo bench --bench retention`, `-- --quick` for fewer events):
//!
//! 1. write N events (the seed's lead payload, ~700 bytes) through the
//!    group commit; measure the store;
//! 2. prune them all (as retention would once they are delivered and old);
//!    measure again right away;
//! 3. write another N events; measure: if sled reuses the freed space, the
//!    store stays near its size after step 1 instead of doubling.
//!
//! Prints a markdown table.

use std::sync::Arc;
use std::time::Instant;

use leadflo_relay::metrics::Metrics;
use leadflo_relay::store::{Entry, Store};

#[path = "support/mod.rs"]
mod support;

fn size(dir: &std::path::Path) -> u64 {
    leadflo_relay::disk::store_size(dir).unwrap()
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let events: u64 = if quick { 20_000 } else { 200_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(".").unwrap();
    let options = support::store_options(dir.path());
    let store = Store::open(&options).unwrap();
    let (committer, handle) = store
        .start_committer(&options, Vec::new(), Arc::new(Metrics::new()))
        .unwrap();
    let body_bytes = support::payload(0).len() as u64;

    let write = |offset: u64| {
        let committer = committer.clone();
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..64u64)
                .map(|w| {
                    let committer = committer.clone();
                    tokio::spawn(async move {
                        let mut n = w;
                        while n < events {
                            let entry = Entry::Event {
                                event: "visitor_created".into(),
                                body: support::payload(offset + n),
                            };
                            committer.append(entry).await.unwrap();
                            n += 64;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        })
    };

    let started = Instant::now();
    write(0);
    let after_first = size(dir.path());
    let written_in = started.elapsed();

    let started = Instant::now();
    let cutoff = leadflo_relay::clock::now_ms() + 1000;
    let mut after = None;
    let mut pruned = 0;
    loop {
        let step = store.prune_before(cutoff, after, 1024, &[]).unwrap();
        pruned += step.deleted;
        if step.examined < 1024 {
            break;
        }
        after = step.last;
    }
    let after_prune = size(dir.path());
    let pruned_in = started.elapsed();

    write(events);
    let after_second = size(dir.path());
    let stored = store.events().count() as u64;
    assert_eq!(stored, events, "the second batch is not all stored");
    runtime.block_on(handle.close());

    let per_event = |bytes: u64| bytes as f64 / events as f64;
    println!(
        "\n{events} events of {body_bytes} bytes; pruned {pruned} in {:.2} s (written in {:.2} s)\n",
        pruned_in.as_secs_f64(),
        written_in.as_secs_f64()
    );
    println!("| step | store size | bytes per event written so far | × body size |");
    println!("|---|---|---|---|");
    println!(
        "| after writing N | {after_first} | {:.0} | {:.2} |",
        per_event(after_first),
        per_event(after_first) / body_bytes as f64
    );
    println!("| after pruning all N | {after_prune} | — | — |");
    println!(
        "| after writing N more | {after_second} | {:.0} | {:.2} |",
        per_event(after_second) / 2.0,
        per_event(after_second) / 2.0 / body_bytes as f64
    );
    println!(
        "\nsecond N took {:.2}× the space the first N did (2.00× would mean no space was reused)",
        after_second as f64 / after_first as f64
    );
}
