//! The delivery worker pool: its own threads, at a lower CPU priority than
//! ingest's.

use anyhow::Context;

/// The name of every thread of the delivery worker pool.
pub const DELIVERY_THREAD_NAME: &str = "leadflo-deliver";

/// How far below the rest of the relay the delivery threads' CPU priority
/// is set, as a nice increment: under CPU contention Linux gives a thread
/// at +5 about a third of the time of one at +0 (weights 335 and 1024).
/// The sender never retries and delivery can always catch up from the log,
/// so when the cores are short, acks come first; an idle core still goes
/// to delivery at once.
pub const DELIVERY_NICE_INCREMENT: i32 = 5;

/// The nice value of the calling thread (the relay's own, when called from
/// a thread that did not change it), or `None` where there is none.
fn own_nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Sets the calling thread's nice value to `base` +
/// [`DELIVERY_NICE_INCREMENT`] (Linux keeps one per thread). Absolute, not
/// relative: a thread started from a delivery thread (tokio's blocking
/// pool, for reqwest's name lookups) inherits the lowered value, and a
/// relative step would lower it twice. Lowering needs no privilege; a
/// failure is logged once and delivery runs at the usual priority.
fn yield_cpu_to_ingest(base: i32) {
    #[cfg(target_os = "linux")]
    {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let lowered = rustix::process::setpriority_process(
            Some(rustix::thread::gettid()),
            base.saturating_add(DELIVERY_NICE_INCREMENT).min(19),
        );
        if let Err(err) = lowered {
            WARNED.call_once(|| {
                tracing::warn!(error = %err, "cannot lower the delivery threads' CPU priority; delivery competes with ingest for the cores");
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = base;
}

/// The delivery worker pool. Shut down without waiting when dropped (a
/// runtime may not block inside another), after its dispatchers have
/// finished.
pub(super) struct DeliveryRuntime(Option<tokio::runtime::Runtime>);

impl DeliveryRuntime {
    pub(super) fn start() -> anyhow::Result<DeliveryRuntime> {
        // Read here, on a thread at the relay's own priority.
        let base = own_nice();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(DELIVERY_THREAD_NAME)
            .on_thread_start(move || {
                if let Some(base) = base {
                    yield_cpu_to_ingest(base);
                }
            })
            .enable_all()
            .build()
            .context("cannot start the delivery worker pool")?;
        Ok(DeliveryRuntime(Some(runtime)))
    }

    pub(super) fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("running").handle().clone()
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
