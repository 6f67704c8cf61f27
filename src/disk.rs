//! Disk space: a sampler that reads the free space of the data directory's
//! filesystem and the store's own size once a second, publishes both as
//! metrics, and decides whether ingest must refuse new events (503) because
//! space fell below `storage.min_free_bytes` or the store reached
//! `storage.max_bytes`. Refusing early keeps what is already stored safe.
//!
//! Ingest and `/readyz` only read a flag; no filesystem call is on the
//! request path. Crossing the floor, either way, is told to the alerts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alerts::{Alert, Alerter};
use crate::metrics::Metrics;

/// Bytes an unprivileged process can still write on `path`'s filesystem.
pub fn available_space(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The size of `path`'s filesystem.
pub fn total_space(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_blocks.saturating_mul(stat.f_frsize))
}

/// How often space is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The default floor: the smaller of 5 % of the filesystem and 1 GiB.
pub fn default_min_free(total_bytes: u64) -> u64 {
    (total_bytes / 20).min(1 << 30)
}

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub store_bytes: u64,
    /// Of `store_bytes`, what the store frees for reuse before it grows
    /// its files again (space pruning released).
    pub reusable_bytes: u64,
}

/// Reads how many bytes of the store's files are free for reuse.
pub type ReusableBytes = Box<dyn Fn() -> u64 + Send + Sync>;

/// Space limits and the current verdict.
pub struct DiskGuard {
    data_dir: PathBuf,
    min_free_bytes: Option<u64>,
    max_bytes: Option<u64>,
    low: AtomicBool,
    reason: Mutex<Option<String>>,
    reusable: Option<ReusableBytes>,
    alerts: Alerter,
}

impl DiskGuard {
    pub fn new(
        data_dir: PathBuf,
        min_free_bytes: Option<u64>,
        max_bytes: Option<u64>,
    ) -> DiskGuard {
        DiskGuard {
            data_dir,
            min_free_bytes,
            max_bytes,
            low: AtomicBool::new(false),
            reason: Mutex::new(None),
            reusable: None,
            alerts: Alerter::disabled(),
        }
    }

    /// Where crossing the floor (or `storage.max_bytes`) and coming back
    /// is told.
    pub fn with_alerts(mut self, alerts: Alerter) -> DiskGuard {
        self.alerts = alerts;
        self
    }

    /// How to read the store's reusable bytes: `storage.max_bytes` is
    /// judged against the bytes in use, since the store's files do not
    /// shrink when pruning frees space in them (the store reuses it).
    pub fn with_reusable(mut self, reusable: ReusableBytes) -> DiskGuard {
        self.reusable = Some(reusable);
        self
    }

    /// Why ingest must refuse new events right now, if it must.
    pub fn refusal(&self) -> Option<String> {
        if !self.low.load(Ordering::Relaxed) {
            return None;
        }
        self.reason.lock().expect("disk reason lock").clone()
    }

    /// Reads the filesystem and the store, updates the verdict and metrics.
    pub fn sample(&self, metrics: &Metrics) -> std::io::Result<Sample> {
        let sample = Sample {
            free_bytes: available_space(&self.data_dir)?,
            total_bytes: total_space(&self.data_dir)?,
            store_bytes: store_size(&self.data_dir)?,
            reusable_bytes: self.reusable.as_ref().map_or(0, |reusable| reusable()),
        };
        metrics.disk_free_bytes.set(sample.free_bytes as i64);
        metrics.disk_total_bytes.set(sample.total_bytes as i64);
        metrics.store_size_bytes.set(sample.store_bytes as i64);
        self.judge(sample);
        Ok(sample)
    }

    fn judge(&self, sample: Sample) {
        let floor = self
            .min_free_bytes
            .unwrap_or_else(|| default_min_free(sample.total_bytes));
        let shortage = if sample.free_bytes < floor {
            Some(format!(
                "the relay is low on disk space ({} bytes free, below storage.min_free_bytes = \
                 {floor})",
                sample.free_bytes
            ))
        } else {
            let in_use = sample.store_bytes.saturating_sub(sample.reusable_bytes);
            match self.max_bytes {
                Some(max) if in_use >= max => Some(format!(
                    "the relay's store is full ({in_use} bytes in use, storage.max_bytes = \
                     {max})"
                )),
                _ => None,
            }
        };
        let was_low = self.low.swap(shortage.is_some(), Ordering::Relaxed);
        match (&shortage, was_low) {
            (Some(shortage), false) => {
                tracing::error!(
                    free_bytes = sample.free_bytes,
                    store_bytes = sample.store_bytes,
                    "disk space below the floor: ingest answers 503 until space returns"
                );
                self.alerts.send(Alert::disk_low(format!(
                    "{shortage}; ingest answers 503 until space returns"
                )));
            }
            (None, true) => {
                tracing::info!(
                    free_bytes = sample.free_bytes,
                    "disk space is back: ingest resumes"
                );
                self.alerts.send(Alert::disk_ok(format!(
                    "{} bytes free; ingest resumes",
                    sample.free_bytes
                )));
            }
            _ => {}
        }
        let reason = shortage.map(|shortage| format!("{shortage}; the event was not stored"));
        *self.reason.lock().expect("disk reason lock") = reason;
    }

    /// Samples every [`SAMPLE_EVERY`] until `shutdown`.
    pub async fn run(self: Arc<Self>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            match self.sample(&metrics) {
                Ok(_) => failing = false,
                Err(err) if !failing => {
                    failing = true;
                    tracing::warn!(error = %err, "cannot read disk space of the data directory");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
        }
    }
}

/// Bytes of every file in `dir` and one level of subdirectories (sled keeps
/// its data file, config and snapshots at the top, large values in `blobs/`).
///
/// Only `dir` itself must be readable. An entry that vanishes while it is
/// listed (a retired write-ahead log segment, a replaced sled snapshot, a
/// blob) or a directory the relay may not list (`lost+found` when `dir` is
/// a filesystem's root) is not counted: failing here would stop the
/// free-space check, and `serve` from starting.
pub fn store_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            let Ok(inner) = std::fs::read_dir(entry.path()) else {
                continue;
            };
            for inner in inner.flatten() {
                total += inner.metadata().map(|m| m.len()).unwrap_or(0);
            }
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertKind;

    fn guard(min_free: Option<u64>, max: Option<u64>) -> DiskGuard {
        DiskGuard::new(PathBuf::from("."), min_free, max)
    }

    #[test]
    fn default_floor_is_five_percent_capped_at_one_gib() {
        assert_eq!(default_min_free(10 << 30), 512 << 20);
        assert_eq!(default_min_free(100 << 30), 1 << 30);
    }

    #[test]
    fn refuses_below_the_floor_and_recovers() {
        let g = guard(Some(1000), None);
        g.judge(Sample {
            free_bytes: 999,
            total_bytes: 1 << 40,
            store_bytes: 0,
            reusable_bytes: 0,
        });
        assert!(
            g.refusal()
                .unwrap()
                .contains("storage.min_free_bytes = 1000")
        );
        g.judge(Sample {
            free_bytes: 1000,
            total_bytes: 1 << 40,
            store_bytes: 0,
            reusable_bytes: 0,
        });
        assert_eq!(g.refusal(), None);
    }

    #[test]
    fn refuses_when_the_store_reaches_max_bytes() {
        let g = guard(Some(0), Some(5000));
        g.judge(Sample {
            free_bytes: 1 << 30,
            total_bytes: 1 << 40,
            store_bytes: 5000,
            reusable_bytes: 0,
        });
        assert!(g.refusal().unwrap().contains("storage.max_bytes = 5000"));
        g.judge(Sample {
            free_bytes: 1 << 30,
            total_bytes: 1 << 40,
            store_bytes: 4999,
            reusable_bytes: 0,
        });
        assert_eq!(g.refusal(), None);
        // Files at the cap, but pruning freed space the store reuses.
        g.judge(Sample {
            free_bytes: 1 << 30,
            total_bytes: 1 << 40,
            store_bytes: 6000,
            reusable_bytes: 1001,
        });
        assert_eq!(g.refusal(), None);
    }

    #[test]
    fn crossing_the_floor_and_coming_back_are_each_alerted_once() {
        let (alerts, mut queued) = crate::alerts::test_alerter();
        let g = guard(Some(1000), None).with_alerts(alerts);
        let free = |free_bytes| Sample {
            free_bytes,
            total_bytes: 1 << 40,
            store_bytes: 0,
            reusable_bytes: 0,
        };
        for bytes in [5000, 999, 998, 1000, 1001, 999] {
            g.judge(free(bytes));
        }
        let told: Vec<(AlertKind, String)> = queued
            .queued()
            .into_iter()
            .map(|alert| (alert.kind, alert.reason))
            .collect();
        let kinds: Vec<AlertKind> = told.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(
            kinds,
            [AlertKind::DiskLow, AlertKind::DiskOk, AlertKind::DiskLow],
            "{told:?}"
        );
        assert!(
            told[0].1.contains("999 bytes free") && told[0].1.contains("storage.min_free_bytes"),
            "{told:?}"
        );
        assert!(told[1].1.contains("1000 bytes free"), "{told:?}");
    }

    /// A data directory at the root of its own filesystem holds
    /// `lost+found` (root's, mode 0700): the relay's user cannot list it.
    /// That is no part of the store, and must not make sampling fail (nor
    /// `serve` refuse to start, nor the free-space floor go unwatched).
    #[test]
    fn an_unreadable_subdirectory_does_not_stop_the_store_size() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), vec![0u8; 1000]).unwrap();
        let lost = dir.path().join("lost+found");
        std::fs::create_dir(&lost).unwrap();
        std::fs::set_permissions(&lost, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read_dir(&lost).is_ok() {
            // Root reads every directory: nothing to provoke here.
            std::fs::set_permissions(&lost, std::fs::Permissions::from_mode(0o700)).unwrap();
            eprintln!("SKIPPED: this test needs a user that cannot read a mode-000 directory");
            return;
        }
        let size = store_size(dir.path());
        std::fs::set_permissions(&lost, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(size.expect("store size") >= 1000);
    }
}
