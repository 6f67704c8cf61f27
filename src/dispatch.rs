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

use crate::alerts::{Alert, Alerter};
use crate::clock::now_ms;
use crate::deliver::Deliverer;
use crate::metrics::Metrics;
use crate::outbound::EventView;
use crate::retry::{Decision, RetryPolicy, decide};
use crate::store::{DeadLetter, Delivery, DeliveryState, Due, DueQuery, EventId, Source, Store};
use bytes::Bytes;

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
/// this one. Dead letters and circuit changes are told to `alerts`.
pub async fn run(
    store: Store,
    settings: tokio::sync::watch::Receiver<Arc<Target>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    not_before: Instant,
    alerts: Alerter,
) -> Instant {
    let mut dispatcher = Dispatcher::new(store, settings, &metrics, not_before, alerts);
    loop {
        dispatcher.follow_settings();
        let wake_at = dispatcher.fill().min(dispatcher.flush_watermark());
        let wake = dispatcher.target.wake.clone();
        let woken = tokio::select! {
            _ = shutdown.cancelled() => Woken::Stop,
            Some(joined) = dispatcher.attempts.join_next_with_id(), if !dispatcher.attempts.is_empty() => {
                Woken::Finished(joined)
            }
            _ = wake.notified() => Woken::Look,
            Ok(()) = dispatcher.settings.changed() => Woken::Look,
            _ = tokio::time::sleep_until(wake_at.into()) => Woken::Look,
        };
        match woken {
            Woken::Stop => break,
            Woken::Finished(joined) => dispatcher.on_finished(joined),
            Woken::Look => {}
        }
    }
    dispatcher.drain().await
}

/// Why the dispatcher's loop woke up.
enum Woken {
    Stop,
    Finished(Result<(tokio::task::Id, Verdict), tokio::task::JoinError>),
    Look,
}

/// One target's dispatcher: its loop's state between two wake-ups.
struct Dispatcher {
    store: Store,
    settings: tokio::sync::watch::Receiver<Arc<Target>>,
    target: Arc<Target>,
    /// The deliveries being attempted, by the task attempting them (so that
    /// even a panicked attempt frees its slot), and whether each is implicit.
    in_flight: HashMap<tokio::task::Id, (EventId, Source)>,
    attempts: JoinSet<Verdict>,
    circuit: Circuit,
    limiter: RateLimiter,
    /// Where the last scan stopped: the next one resumes there instead of
    /// re-reading (and skipping) everything in flight. Reset to the front
    /// whenever a scan finds nothing, so late arrivals are never missed.
    cursor: Option<(u64, EventId)>,
    circuit_gauge: prometheus::IntGauge,
    counted: Arc<AttemptMetrics>,
    alerts: Alerter,
}

impl Dispatcher {
    fn new(
        store: Store,
        mut settings: tokio::sync::watch::Receiver<Arc<Target>>,
        metrics: &Metrics,
        not_before: Instant,
        alerts: Alerter,
    ) -> Dispatcher {
        let target = settings.borrow_and_update().clone();
        let mut limiter = RateLimiter::new(target.rate_per_second);
        limiter.hold_until(not_before);
        let circuit_gauge = metrics.circuit_open.with_label_values(&[&target.name]);
        circuit_gauge.set(0);
        Dispatcher {
            counted: Arc::new(AttemptMetrics::new(metrics, &target.name)),
            store,
            settings,
            target,
            in_flight: HashMap::new(),
            attempts: JoinSet::new(),
            circuit: Circuit {
                consecutive_failures: 0,
                open_until: None,
                catching_up: false,
            },
            limiter,
            cursor: None,
            circuit_gauge,
            alerts,
        }
    }

    /// Takes a reload's settings for the next attempts. Compared by
    /// identity, not `has_changed`: the loop's `changed()` arm marks a
    /// change seen before this reads it.
    fn follow_settings(&mut self) {
        let latest = self.settings.borrow_and_update().clone();
        if !Arc::ptr_eq(&latest, &self.target) {
            self.target = latest;
            self.limiter.set_rate(self.target.rate_per_second);
        }
    }

    /// How many attempts may start now, and when to look again if none.
    fn capacity(&self) -> (usize, Instant) {
        let idle = Instant::now() + MAX_IDLE;
        match self.circuit.open_until {
            // Open: one probe at a time, once its interval has passed.
            Some(until) if self.in_flight.is_empty() && Instant::now() >= until => (1, idle),
            // With an attempt in flight (the probe, or those from before
            // the circuit opened), its end wakes the loop; a probe time
            // already passed would wake it at once, again and again.
            Some(until) if self.in_flight.is_empty() => (0, idle.min(until)),
            Some(_) => (0, idle),
            None => (
                self.target.concurrency.saturating_sub(self.in_flight.len()),
                idle,
            ),
        }
    }

    /// Starts as many due attempts as the circuit, the concurrency and the
    /// rate allow; returns when the loop should look again.
    fn fill(&mut self) -> Instant {
        let (capacity, mut wake_at) = self.capacity();
        if capacity > 0 && Instant::now() >= self.limiter.ready_at() {
            wake_at = wake_at.min(self.start_due(capacity));
        } else if capacity > 0 {
            wake_at = wake_at.min(self.limiter.ready_at());
        }
        // Recompute: starting attempts may have used the capacity up.
        let may_start =
            self.circuit.open_until.is_none() && self.in_flight.len() < self.target.concurrency;
        if may_start && self.limiter.ready_at() > Instant::now() {
            wake_at = wake_at.min(self.limiter.ready_at());
        }
        wake_at
    }

    /// Reads up to `capacity` due deliveries and starts an attempt for
    /// each; returns when the next one falls due.
    fn start_due(&mut self, capacity: usize) -> Instant {
        let probing = self.circuit.open_until.is_some();
        // A rate limit admits one start at a time.
        let limit = if self.target.rate_per_second.is_some() {
            1
        } else {
            capacity
        };
        let in_flight = &self.in_flight;
        let query = DueQuery {
            now_ms: now_ms(),
            limit,
            ignore_due: probing || self.circuit.catching_up,
            after: self.cursor,
            skip: &|id| {
                in_flight
                    .values()
                    .any(|&(busy, source)| source == Source::Explicit && busy == id)
            },
        };
        let Due {
            deliveries: due,
            next_due_ms,
        } = match self.store.due_deliveries(&self.target.name, &query) {
            Ok(found) => found,
            Err(err) => {
                tracing::error!(target = %self.target.name, error = %err, "cannot read the delivery queue");
                return Instant::now() + MAX_IDLE;
            }
        };
        // Only explicit queue entries move the cursor; implicit deliveries
        // keep their own place in the log.
        self.cursor = due
            .iter()
            .rev()
            .find(|d| d.source == Source::Explicit)
            .map(|d| (d.due_ms, d.id));
        for delivery in due {
            self.limiter.take();
            let id = (delivery.id, delivery.source);
            let (store, target, counted, alerts) = (
                self.store.clone(),
                self.target.clone(),
                self.counted.clone(),
                self.alerts.clone(),
            );
            let task = self
                .attempts
                .spawn(async move { attempt(&store, &target, &counted, &alerts, delivery).await });
            self.in_flight.insert(task.id(), id);
        }
        match next_due_ms {
            Some(due_ms) => Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms())),
            None => Instant::now() + MAX_IDLE,
        }
    }

    /// Writes a watermark that moved within a few tens of ms, also when no
    /// further delivery settles; returns when to look again.
    fn flush_watermark(&self) -> Instant {
        let name = &self.target.name;
        if self.store.watermark_unsaved(name) {
            if let Err(err) = self.store.save_watermarks(false) {
                tracing::warn!(target = %name, error = %err, "cannot write a delivery watermark; will try again");
            }
            if self.store.watermark_unsaved(name) {
                return Instant::now() + WATERMARK_RECHECK;
            }
        }
        Instant::now() + MAX_IDLE
    }

    /// An attempt ended (and those that ended meanwhile: one pass of the
    /// loop then starts as many).
    fn on_finished(&mut self, joined: Result<(tokio::task::Id, Verdict), tokio::task::JoinError>) {
        let mut joined = Some(joined);
        while let Some(done) = joined {
            match done {
                Ok((task, verdict)) => {
                    self.in_flight.remove(&task);
                    // A `Retry-After` speaks for the target, not just for
                    // the delivery it answered: nothing starts before it
                    // has passed.
                    if let Verdict::Failing(Some(asked)) = verdict {
                        self.limiter.hold_until(Instant::now() + asked);
                    }
                    let change = record_verdict(
                        &self.target,
                        &mut self.circuit,
                        verdict,
                        &self.circuit_gauge,
                    );
                    if let Some(alert) = change {
                        self.alerts.send(alert);
                    }
                }
                Err(err) => {
                    // The delivery stays queued; it is tried again later.
                    if let Some((id, implicit)) = self.in_flight.remove(&err.id()) {
                        self.store.release(&self.target.name, id, implicit);
                    }
                    tracing::error!(target = %self.target.name, "a delivery attempt panicked");
                }
            }
            joined = self.attempts.try_join_next_with_id();
        }
    }

    /// Shutdown: lets attempts in flight finish within the grace period,
    /// abandons the rest (read again by the next dispatcher of this target),
    /// and returns when the next attempt could have started.
    async fn drain(mut self) -> Instant {
        let (attempts, in_flight) = (&mut self.attempts, &mut self.in_flight);
        let drained = tokio::time::timeout(self.target.shutdown_grace, async {
            while let Some(done) = attempts.join_next_with_id().await {
                in_flight.remove(&done.map_or_else(|err| err.id(), |(id, _)| id));
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                target = %self.target.name,
                abandoned = self.attempts.len(),
                "attempts still running after the grace period; they stay queued and are retried"
            );
            self.attempts.abort_all();
            // An aborted attempt stops at its next await; wait for that, so
            // that nothing records a delivery once this returns.
            while self.attempts.join_next().await.is_some() {}
        }
        for (id, implicit) in self.in_flight.into_values() {
            self.store.release(&self.target.name, id, implicit);
        }
        self.limiter.ready_at()
    }
}

/// Updates the circuit after an attempt; returns the alert to tell when it
/// opened or closed.
fn record_verdict(
    target: &Target,
    circuit: &mut Circuit,
    verdict: Verdict,
    gauge: &prometheus::IntGauge,
) -> Option<Alert> {
    match verdict {
        Verdict::Healthy | Verdict::Answered => {
            circuit.consecutive_failures = 0;
            if circuit.open_until.take().is_some() {
                gauge.set(0);
                circuit.catching_up = verdict == Verdict::Healthy;
                tracing::info!(target = %target.name, "circuit closed: the target answers again");
                return Some(Alert::circuit_closed(&target.name));
            }
            None
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
                let opened = circuit.open_until.is_none();
                circuit.open_until = Some(Instant::now() + interval);
                if opened {
                    gauge.set(1);
                    tracing::warn!(
                        target = %target.name,
                        failures = circuit.consecutive_failures,
                        probe_every_ms = interval.as_millis() as u64,
                        "circuit open: the target keeps failing; probing with one attempt at a time"
                    );
                    let reason = format!(
                        "{} failures in a row; deliveries wait, one probe at a time",
                        circuit.consecutive_failures
                    );
                    return Some(Alert::circuit_open(&target.name, reason));
                }
            }
            None
        }
        Verdict::Unknown => None,
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

/// The event a delivery is for, as an attempt needs it.
struct Stored {
    received_at_ms: u64,
    body: Bytes,
}

/// `delivery`'s event: an implicit delivery comes with its body, due at
/// its receive time; an explicit one is read. `None` when it cannot be
/// attempted now (the event is gone, and the delivery with it; or it
/// cannot be read, and the delivery is released to be read again).
fn stored_event(store: &Store, name: &str, delivery: &Delivery) -> Option<Stored> {
    if let Some(body) = &delivery.body {
        return Some(Stored {
            received_at_ms: delivery.due_ms,
            body: body.clone(),
        });
    }
    match store.event(delivery.id) {
        Ok(Some(event)) => Some(Stored {
            received_at_ms: event.received_at_ms,
            body: Bytes::from(event.body),
        }),
        Ok(None) => {
            // Pruned or purged: nothing left to deliver.
            tracing::warn!(target = %name, id = %delivery.id, "queued delivery has no event; dropping it");
            let _ = store.delivered(name, delivery);
            None
        }
        Err(err) => {
            tracing::error!(target = %name, id = %delivery.id, error = %err, "cannot read event");
            store.release(name, delivery.id, delivery.source);
            None
        }
    }
}

/// Makes one attempt of `delivery` and records its outcome in the log; a
/// dead letter, once recorded, is told to `alerts`.
async fn attempt(
    store: &Store,
    target: &Target,
    metrics: &AttemptMetrics,
    alerts: &Alerter,
    delivery: Delivery,
) -> Verdict {
    let name = target.name.as_str();
    let Some(Stored {
        received_at_ms,
        body,
    }) = stored_event(store, name, &delivery)
    else {
        return Verdict::Unknown;
    };
    let number = delivery.state.attempts.saturating_add(1);
    let started = Instant::now();
    let started_ms = now_ms();
    let event = EventView {
        id: delivery.id,
        received_at_ms,
        body: &body,
    };
    let outcome = target.deliverer.attempt(&event, number).await;
    metrics.duration.observe(started.elapsed().as_secs_f64());
    let jitter = rand::random::<f64>();
    let decision = decide(
        &target.policy,
        &delivery.state,
        &outcome,
        started_ms,
        now_ms(),
        jitter,
    );
    let mut dead_letter = None;
    let (verdict, recorded) = match decision {
        Decision::Delivered => {
            metrics.success.inc();
            metrics.last_success.set(now_ms() as f64 / 1000.0);
            crate::crashpoint::reached(crate::crashpoint::DELIVERY_ANSWERED);
            (Verdict::Healthy, store.delivered(name, &delivery))
        }
        Decision::Retry {
            due_ms,
            state,
            hold,
        } => {
            metrics.retry.inc();
            (
                Verdict::Failing(hold),
                store.reschedule(name, &delivery, due_ms, &state),
            )
        }
        Decision::Dead {
            reason,
            state,
            failing,
        } => {
            metrics.dead.inc();
            let verdict = if failing {
                Verdict::Failing(None)
            } else {
                Verdict::Answered
            };
            // The stored reason may quote the target's answer; the alert's
            // is made from the outcome alone.
            let told = crate::alerts::dead_letter_reason(&outcome, state.attempts);
            dead_letter = Some(Alert::dead_letter(name, delivery.id, told));
            (verdict, bury(store, name, &delivery, &state, reason))
        }
    };
    if let Err(err) = recorded {
        tracing::error!(target = %name, id = %delivery.id, error = %err, "cannot record a delivery outcome; it will be retried");
        store.release(name, delivery.id, delivery.source);
        return Verdict::Unknown;
    }
    if let Some(alert) = dead_letter {
        alerts.send(alert);
    }
    verdict
}

fn bury(
    store: &Store,
    target: &str,
    delivery: &Delivery,
    state: &DeliveryState,
    reason: String,
) -> Result<(), crate::store::StoreError> {
    // One line per state change; the reason may quote the target's answer,
    // so it is stored, not logged.
    tracing::warn!(target = %target, id = %delivery.id, attempts = state.attempts, status = state.last_status, "delivery dead-lettered");
    store.bury(
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
