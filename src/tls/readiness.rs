//! Whether the ingest listener has a certificate to serve yet (ACME,
//! before the first order completes): `/readyz` answers 503 with the
//! reason, and failed handshakes are counted as `no_certificate` and
//! logged at most once a minute, never with what the client sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Whether the ingest listener has a certificate to serve; shared with
/// `/readyz` and the handshake.
#[derive(Clone, Debug)]
pub struct Readiness {
    inner: Arc<ReadinessState>,
}

#[derive(Debug)]
struct ReadinessState {
    ready: AtomicBool,
    domains: String,
    /// When a refused handshake was last logged, in seconds since the
    /// epoch: at most one line a minute.
    last_logged: AtomicU64,
}

impl Readiness {
    pub(super) fn new(domains: &[String]) -> Readiness {
        Readiness {
            inner: Arc::new(ReadinessState {
                ready: AtomicBool::new(false),
                domains: domains.join(", "),
                last_logged: AtomicU64::new(0),
            }),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    pub(super) fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::Release);
    }

    /// Why the relay is not ready, for `/readyz`; `None` once it is.
    pub fn why_not(&self) -> Option<String> {
        (!self.is_ready()).then(|| {
            format!(
                "no certificate yet: the first ACME order for {} is under way; HTTPS handshakes \
                 fail until it is served",
                self.inner.domains
            )
        })
    }

    /// Logs a handshake that failed for want of a certificate, at most
    /// once a minute.
    pub(super) fn refused(&self) {
        let now = crate::clock::now_ms() / 1000;
        let last = self.inner.last_logged.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 60 {
            return;
        }
        if self
            .inner
            .last_logged
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                "refused HTTPS handshakes: no certificate for {} yet (the first ACME order is \
                 under way; see /readyz and leadflo_relay_acme_orders_total)",
                self.inner.domains
            );
        }
    }
}
