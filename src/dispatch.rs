//! Per-target scheduling: one dispatcher task per target takes due
//! deliveries from the front of the target's queue in the log, oldest first,
//! and runs attempts with at most `concurrency` in flight and at most
//! `rate_per_second` starts per second, behind a circuit breaker.
//!
//! The queue lives in the log; the dispatcher holds only the ids in flight
//! (at most `concurrency`), so memory does not grow with the backlog. A slow
//! or dead target only slows its own dispatcher: targets share nothing but
//! the log. This module never logs a body or a target URL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::deliver::{Deliverer, Outcome};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::store::{DeadLetter, Delivery, DeliveryState, DueQuery, EventId, Log};

/// The longest the dispatcher sleeps without looking at its queue again.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// How soon the dispatcher looks again at a watermark it could not write yet.
const WATERMARK_RECHECK: Duration = Duration::from_millis(10);

/// Everything one target's dispatcher needs.
pub struct Target {
    pub name: String,
    pub deliverer: Deliverer,
    /// The secret `deliverer` sends, to tell whether a reload changed it.
    pub secret: Option<crate::config::Secret>,
    pub policy: RetryPolicy,
    pub concurrency: usize,
    pub rate_per_second: Option<f64>,
    pub circuit_failures: u32,
    /// Longest wait between two probes of an open circuit.
    pub probe_max_interval: Duration,
    /// Woken by the committer when new deliveries are queued.
    pub wake: Arc<Notify>,
    /// Time in-flight attempts get to finish at shutdown.
    pub shutdown_grace: Duration,
}

/// What an attempt meant for the target's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The target answered 2xx.
    Healthy,
    /// The target answered, but refused this event (dead-lettered).
    Answered,
    /// The target failed (connect, timeout, 5xx, 429…), with how long it
    /// asked the relay to stay away (`Retry-After`, capped at
    /// `max_interval`), if it did.
    Failing(Option<Duration>),
    /// The attempt could not be made or recorded; says nothing of the target.
    Unknown,
}

/// The circuit breaker: closed, or open with the time of the next probe.
struct Circuit {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    /// After the circuit closes, queued deliveries are taken at once instead
    /// of at their backoff times, until the next failure.
    catching_up: bool,
}

/// Spaces attempt starts `1 / rate` apart; never bursts, also not after a
/// restart (a new limiter starts with no saved-up allowance).
struct RateLimiter {
    interval: Option<Duration>,
    next: Instant,
}

impl RateLimiter {
    fn new(rate_per_second: Option<f64>) -> RateLimiter {
        RateLimiter {
            interval: rate_per_second.map(|rate| Duration::from_secs_f64(1.0 / rate)),
            next: Instant::now(),
        }
    }

    /// When the next start is allowed.
    fn ready_at(&self) -> Instant {
        self.next
    }

    fn take(&mut self) {
        if let Some(interval) = self.interval {
            self.next = self.next.max(Instant::now()) + interval;
        }
    }

    /// A reload changed the rate: the next start keeps its time, so the
    /// change never lets a burst through.
    fn set_rate(&mut self, rate_per_second: Option<f64>) {
        self.interval = rate_per_second.map(|rate| Duration::from_secs_f64(1.0 / rate));
    }

    /// No start before `until`: the target asked for that (`Retry-After`).
    fn hold_until(&mut self, until: Instant) {
        self.next = self.next.max(until);
    }
}

/// Runs a target's dispatcher until `shutdown`; then gives in-flight
/// attempts the grace period and abandons the rest (they stay queued, and
/// are read again). `settings` holds the target as configured: a reload
/// changes it in place, and the next attempts use it while those in
/// flight finish with what they started with; the circuit, the rate
/// limiter's next start and the attempts in flight carry over, so the
/// limits hold across the change.
///
/// No attempt starts before `not_before` (when the previous dispatcher of
/// the same target could have started its next one); returns that time for
/// this one.
pub async fn run(
    log: Log,
    mut settings: tokio::sync::watch::Receiver<Arc<Target>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    not_before: Instant,
) -> Instant {
    let mut target = settings.borrow_and_update().clone();
    // The deliveries being attempted, by the task attempting them (so that
    // even a panicked attempt frees its slot).
    let mut in_flight: HashMap<tokio::task::Id, (EventId, bool)> = HashMap::new();
    let mut attempts: JoinSet<Verdict> = JoinSet::new();
    let mut circuit = Circuit {
        consecutive_failures: 0,
        open_until: None,
        catching_up: false,
    };
    let mut limiter = RateLimiter::new(target.rate_per_second);
    limiter.hold_until(not_before);
    // Where the last scan stopped: the next one resumes there instead of
    // re-reading (and skipping) everything in flight. Reset to the front
    // whenever a scan finds nothing, so late arrivals are never missed.
    let mut cursor: Option<(u64, EventId)> = None;
    let circuit_gauge = metrics.circuit_open.with_label_values(&[&target.name]);
    circuit_gauge.set(0);
    let counted = Arc::new(AttemptMetrics::new(&metrics, &target.name));

    loop {
        // Compared by identity, not `has_changed`: the `changed()` arm of
        // the select below marks a change seen before this reads it.
        let latest = settings.borrow_and_update().clone();
        if !Arc::ptr_eq(&latest, &target) {
            target = latest;
            limiter.set_rate(target.rate_per_second);
        }
        let mut wake_at = Instant::now() + MAX_IDLE;
        let capacity = match circuit.open_until {
            // Open: one probe at a time, once its interval has passed.
            Some(until) if in_flight.is_empty() && Instant::now() >= until => 1,
            Some(until) => {
                // With an attempt in flight (the probe, or those from before
                // the circuit opened), its end wakes the loop; a probe time
                // already passed would wake it at once, again and again.
                if in_flight.is_empty() {
                    wake_at = wake_at.min(until);
                }
                0
            }
            None => target.concurrency.saturating_sub(in_flight.len()),
        };
        if capacity > 0 && Instant::now() >= limiter.ready_at() {
            let probing = circuit.open_until.is_some();
            // A rate limit admits one start at a time.
            let limit = if target.rate_per_second.is_some() {
                1
            } else {
                capacity
            };
            let ignore_due = probing || circuit.catching_up;
            let query = DueQuery {
                now_ms: now_ms(),
                limit,
                ignore_due,
                after: cursor,
                skip: &|id| {
                    in_flight
                        .values()
                        .any(|&(busy, fresh)| !fresh && busy == id)
                },
            };
            match log.due_deliveries(&target.name, &query) {
                Ok((due, next_due_ms)) => {
                    // Only explicit queue entries move the cursor; fresh
                    // deliveries keep their own place in the log.
                    cursor = due
                        .iter()
                        .rev()
                        .find(|d| !d.fresh)
                        .map(|d| (d.due_ms, d.id));
                    for delivery in due {
                        limiter.take();
                        let id = (delivery.id, delivery.fresh);
                        let (log, target, counted) = (log.clone(), target.clone(), counted.clone());
                        let task = attempts
                            .spawn(async move { attempt(&log, &target, &counted, delivery).await });
                        in_flight.insert(task.id(), id);
                    }
                    if let Some(due_ms) = next_due_ms {
                        let wait = Duration::from_millis(due_ms.saturating_sub(now_ms()));
                        wake_at = wake_at.min(Instant::now() + wait);
                    }
                }
                Err(err) => {
                    tracing::error!(target = %target.name, error = %err, "cannot read the delivery queue");
                }
            }
        } else if capacity > 0 {
            wake_at = wake_at.min(limiter.ready_at());
        }
        // Recompute: starting attempts may have used the capacity up.
        let may_start = circuit.open_until.is_none() && in_flight.len() < target.concurrency;
        if may_start && limiter.ready_at() > Instant::now() {
            wake_at = wake_at.min(limiter.ready_at());
        }

        // A watermark that moved is written within a few tens of ms, also
        // when no further delivery settles.
        if log.watermark_unsaved(&target.name) {
            if let Err(err) = log.save_watermarks(false) {
                tracing::warn!(target = %target.name, error = %err, "cannot write a delivery watermark; will try again");
            }
            if log.watermark_unsaved(&target.name) {
                wake_at = wake_at.min(Instant::now() + WATERMARK_RECHECK);
            }
        }

        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(joined) = attempts.join_next_with_id(), if !attempts.is_empty() => {
                let mut joined = Some(joined);
                // Those that finished meanwhile too: one pass of the loop
                // then starts as many.
                while let Some(done) = joined {
                    match done {
                        Ok((task, verdict)) => {
                            in_flight.remove(&task);
                            // A `Retry-After` speaks for the target, not just
                            // for the delivery it answered: nothing starts
                            // before it has passed.
                            if let Verdict::Failing(Some(asked)) = verdict {
                                limiter.hold_until(Instant::now() + asked);
                            }
                            record_verdict(&target, &mut circuit, verdict, &circuit_gauge);
                        }
                        Err(err) => {
                            // The delivery stays queued; it is tried again later.
                            if let Some((id, fresh)) = in_flight.remove(&err.id()) {
                                log.release(&target.name, id, fresh);
                            }
                            tracing::error!(target = %target.name, "a delivery attempt panicked");
                        }
                    }
                    joined = attempts.try_join_next_with_id();
                }
            }
            _ = target.wake.notified() => {}
            Ok(()) = settings.changed() => {}
            _ = tokio::time::sleep_until(wake_at.into()) => {}
        }
    }

    // Shutdown: let attempts in flight finish, within the grace period.
    let drained = tokio::time::timeout(target.shutdown_grace, async {
        while let Some(done) = attempts.join_next_with_id().await {
            in_flight.remove(&done.map_or_else(|err| err.id(), |(id, _)| id));
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            target = %target.name,
            abandoned = attempts.len(),
            "attempts still running after the grace period; they stay queued and are retried"
        );
        attempts.abort_all();
        // An aborted attempt stops at its next await; wait for that, so that
        // nothing records a delivery once this returns.
        while attempts.join_next().await.is_some() {}
    }
    // What was abandoned is read again by the next dispatcher of this
    // target (after a reload changed it, in this same process).
    for (id, fresh) in in_flight.into_values() {
        log.release(&target.name, id, fresh);
    }
    limiter.ready_at()
}

fn record_verdict(
    target: &Target,
    circuit: &mut Circuit,
    verdict: Verdict,
    gauge: &prometheus::IntGauge,
) {
    match verdict {
        Verdict::Healthy | Verdict::Answered => {
            circuit.consecutive_failures = 0;
            if circuit.open_until.take().is_some() {
                gauge.set(0);
                circuit.catching_up = verdict == Verdict::Healthy;
                tracing::info!(target = %target.name, "circuit closed: the target answers again");
            }
        }
        Verdict::Failing(_) => {
            circuit.catching_up = false;
            circuit.consecutive_failures = circuit.consecutive_failures.saturating_add(1);
            let beyond = circuit
                .consecutive_failures
                .saturating_sub(target.circuit_failures);
            if circuit.consecutive_failures >= target.circuit_failures {
                // Probe interval: the backoff for the failures beyond the
                // threshold, capped so a target that comes back after a long
                // outage is noticed within `probe_max_interval`. (A
                // `Retry-After` holds the probe too: see the rate limiter's
                // `hold_until` in `run`.)
                let interval = target
                    .policy
                    .ceiling(beyond + 1)
                    .min(target.probe_max_interval);
                if circuit.open_until.is_none() {
                    gauge.set(1);
                    tracing::warn!(
                        target = %target.name,
                        failures = circuit.consecutive_failures,
                        probe_every_ms = interval.as_millis() as u64,
                        "circuit open: the target keeps failing; probing with one attempt at a time"
                    );
                }
                circuit.open_until = Some(Instant::now() + interval);
            }
        }
        Verdict::Unknown => {}
    }
}

/// A target's attempt metrics, looked up once (each lookup by label hashes
/// the labels and takes a lock).
struct AttemptMetrics {
    duration: prometheus::Histogram,
    success: prometheus::IntCounter,
    retry: prometheus::IntCounter,
    dead: prometheus::IntCounter,
    last_success: prometheus::Gauge,
}

impl AttemptMetrics {
    fn new(metrics: &Metrics, target: &str) -> AttemptMetrics {
        let attempts = |outcome| {
            metrics
                .delivery_attempts
                .with_label_values(&[target, outcome])
        };
        AttemptMetrics {
            duration: metrics.delivery_duration.with_label_values(&[target]),
            success: attempts("success"),
            retry: attempts("retry"),
            dead: attempts("dead"),
            last_success: metrics.last_success.with_label_values(&[target]),
        }
    }
}

/// Makes one attempt of `delivery` and records its outcome in the log.
async fn attempt(
    log: &Log,
    target: &Target,
    metrics: &AttemptMetrics,
    delivery: Delivery,
) -> Verdict {
    let name = target.name.as_str();
    let body = match delivery
        .body
        .clone()
        .map_or_else(|| log.event_body(delivery.id), |body| Ok(Some(body)))
    {
        Ok(Some(body)) => body,
        Ok(None) => {
            // The event is gone (pruned or purged): nothing left to deliver.
            tracing::warn!(target = %name, id = %delivery.id, "queued delivery has no event; dropping it");
            let _ = log.delivered(name, &delivery);
            return Verdict::Unknown;
        }
        Err(err) => {
            tracing::error!(target = %name, id = %delivery.id, error = %err, "cannot read event");
            log.release(name, delivery.id, delivery.fresh);
            return Verdict::Unknown;
        }
    };
    let number = delivery.state.attempts.saturating_add(1);
    let started = Instant::now();
    let started_ms = now_ms();
    let outcome = target.deliverer.attempt(delivery.id, number, body).await;
    metrics.duration.observe(started.elapsed().as_secs_f64());

    let mut state = DeliveryState {
        attempts: number,
        first_attempt_ms: if delivery.state.first_attempt_ms == 0 {
            started_ms
        } else {
            delivery.state.first_attempt_ms
        },
        last_attempt_ms: started_ms,
        ..delivery.state.clone()
    };
    let (verdict, recorded) = match outcome {
        Outcome::Delivered { .. } => {
            metrics.success.inc();
            metrics.last_success.set(now_ms() as f64 / 1000.0);
            crate::crashpoint::reached(crate::crashpoint::DELIVERY_ANSWERED);
            (Verdict::Healthy, log.delivered(name, &delivery))
        }
        Outcome::Retry {
            failure,
            retry_after,
        } => {
            state.last_status = failure.status().unwrap_or(0);
            state.last_error = failure.to_string();
            let delay = target
                .policy
                .next_delay(number, retry_after, rand::random::<f64>());
            let due_ms = now_ms().saturating_add(delay.as_millis() as u64);
            let expires_ms = state
                .enqueued_ms
                .saturating_add(target.policy.max_age.as_millis() as u64);
            if due_ms > expires_ms {
                let reason = format!(
                    "gave up after {number} attempts: the next would come after the retry window of {} had closed; last: {failure}",
                    crate::config::HumanDuration(target.policy.max_age)
                );
                metrics.dead.inc();
                (
                    Verdict::Failing(None),
                    bury(log, name, &delivery, &state, reason),
                )
            } else {
                metrics.retry.inc();
                let asked = retry_after.map(|asked| asked.min(target.policy.max_interval));
                (
                    Verdict::Failing(asked),
                    log.reschedule(name, &delivery, due_ms, &state),
                )
            }
        }
        Outcome::Reject { status, body } => {
            state.last_status = status;
            let reason = if body.is_empty() {
                format!("HTTP {status} (not retryable)")
            } else {
                format!("HTTP {status} (not retryable): {body}")
            };
            metrics.dead.inc();
            (
                Verdict::Answered,
                bury(log, name, &delivery, &state, reason),
            )
        }
    };
    if let Err(err) = recorded {
        tracing::error!(target = %name, id = %delivery.id, error = %err, "cannot record a delivery outcome; it will be retried");
        log.release(name, delivery.id, delivery.fresh);
        return Verdict::Unknown;
    }
    verdict
}

fn bury(
    log: &Log,
    target: &str,
    delivery: &Delivery,
    state: &DeliveryState,
    reason: String,
) -> Result<(), crate::store::LogError> {
    // One line per state change; the reason may quote the target's answer,
    // so it is stored, not logged.
    tracing::warn!(target = %target, id = %delivery.id, attempts = state.attempts, status = state.last_status, "delivery dead-lettered");
    log.bury(
        delivery,
        &DeadLetter {
            id: delivery.id,
            target: target.to_owned(),
            attempts: state.attempts,
            last_status: state.last_status,
            first_attempt_ms: state.first_attempt_ms,
            last_attempt_ms: state.last_attempt_ms,
            reason,
        },
    )
}
