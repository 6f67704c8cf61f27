//! Retry timing and the retry decision: pure functions of (attempt, policy,
//! Retry-After, jitter, the time given). No I/O and no clock reads, so
//! every rule is unit-tested exactly. [`decide`] is where a delivery's
//! fate after an attempt is decided: delivered, retried when, or
//! dead-lettered why. (The `backoff` crate is unmaintained,
//! RUSTSEC-2025-0012; this is its replacement.)
//!
//! Exponential backoff with full jitter: the ceiling for attempt `n` (1-based,
//! the attempt that just failed) is `initial * multiplier^(n-1)`, capped at
//! `max_interval`; the delay is a uniform draw in `[0, ceiling]`, never below
//! a small floor so a failing target is not hammered by near-zero delays.
//! A `Retry-After` from the target wins when it asks for longer, capped at
//! `max_interval`.

use std::time::{Duration, SystemTime};

use crate::deliver::Outcome;
use crate::store::DeliveryState;

/// The shortest delay between two attempts of one delivery.
pub const MIN_DELAY: Duration = Duration::from_millis(100);

/// The `[targets.retry]` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub multiplier: f64,
    pub max_interval: Duration,
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(3600),
            max_age: Duration::from_secs(72 * 3600),
        }
    }
}

impl RetryPolicy {
    /// The backoff ceiling after `attempt` failed attempts (`attempt >= 1`).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1000) as i32;
        let seconds = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let max = self.max_interval.as_secs_f64();
        if seconds.is_finite() && seconds < max {
            Duration::from_secs_f64(seconds)
        } else {
            self.max_interval
        }
    }

    /// The delay before the next attempt, after `attempt` failed attempts.
    /// `jitter` is a uniform draw from `[0, 1)`.
    pub fn next_delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jittered = ceiling
            .mul_f64(jitter.clamp(0.0, 1.0))
            .max(MIN_DELAY.min(ceiling));
        match retry_after {
            Some(asked) => jittered.max(asked).min(self.max_interval),
            None => jittered,
        }
    }
}

/// What an attempt means for its delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The target has it.
    Delivered,
    /// Try again at `due_ms`; `hold` is how long the target asked the relay
    /// to stay away (`Retry-After`, capped at `max_interval`), if it did.
    Retry {
        due_ms: u64,
        state: DeliveryState,
        hold: Option<Duration>,
    },
    /// Give up: into the dead letters, saying why. `failing` tells a
    /// target that kept failing (the retry window closed) from one that
    /// answered and refused.
    Dead {
        reason: String,
        state: DeliveryState,
        failing: bool,
    },
}

/// Decides what `outcome` means for a delivery that was in `state` before
/// an attempt that started at `started_ms` and ended at `now_ms`; `jitter`
/// is a uniform draw from `[0, 1)`.
pub fn decide(
    policy: &RetryPolicy,
    state: &DeliveryState,
    outcome: &Outcome,
    started_ms: u64,
    now_ms: u64,
    jitter: f64,
) -> Decision {
    let number = state.attempts.saturating_add(1);
    let mut state = DeliveryState {
        attempts: number,
        first_attempt_ms: if state.first_attempt_ms == 0 {
            started_ms
        } else {
            state.first_attempt_ms
        },
        last_attempt_ms: started_ms,
        ..state.clone()
    };
    match outcome {
        Outcome::Delivered { .. } => Decision::Delivered,
        Outcome::Retry {
            failure,
            retry_after,
        } => {
            state.last_status = failure.status().unwrap_or(0);
            state.last_error = failure.to_string();
            let delay = policy.next_delay(number, *retry_after, jitter);
            let due_ms = now_ms.saturating_add(delay.as_millis() as u64);
            let expires_ms = state
                .enqueued_ms
                .saturating_add(policy.max_age.as_millis() as u64);
            if due_ms > expires_ms {
                let reason = format!(
                    "gave up after {number} attempts: the next would come after the retry window of {} had closed; last: {failure}",
                    crate::duration::HumanDuration(policy.max_age)
                );
                Decision::Dead {
                    reason,
                    state,
                    failing: true,
                }
            } else {
                let hold = retry_after.map(|asked| asked.min(policy.max_interval));
                Decision::Retry {
                    due_ms,
                    state,
                    hold,
                }
            }
        }
        Outcome::Unrenderable { reason } => Decision::Dead {
            reason: format!("template: {reason}"),
            state,
            failing: false,
        },
        Outcome::Reject { status, body } => {
            state.last_status = *status;
            let reason = if body.is_empty() {
                format!("HTTP {status} (not retryable)")
            } else {
                format!("HTTP {status} (not retryable): {body}")
            };
            Decision::Dead {
                reason,
                state,
                failing: false,
            }
        }
    }
}

/// Parses a `Retry-After` header value: delay-seconds or an HTTP-date
/// (relative to `now`). Anything else is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    // delay-seconds is digits only (RFC 9110): no sign. More seconds than
    // a u64 holds is still "a very long time" (capped at max_interval by
    // the caller), not no answer.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(
            value
                .parse::<u64>()
                .map_or(Duration::MAX, Duration::from_secs),
        );
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn ceiling_grows_exponentially_then_caps() {
        let p = policy();
        let ceilings: Vec<u64> = (1..=8).map(|n| p.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(60), "no overflow");
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = policy();
        assert_eq!(p.next_delay(3, None, 0.0), MIN_DELAY);
        assert_eq!(p.next_delay(3, None, 0.5), Duration::from_secs(2));
        assert_eq!(p.next_delay(3, None, 0.999_999).as_millis(), 3999);
        for jitter in [0.0, 0.1, 0.7, 0.99] {
            assert!(p.next_delay(10, None, jitter) <= Duration::from_secs(60));
        }
    }

    #[test]
    fn retry_after_wins_when_longer_and_is_capped() {
        let p = policy();
        let asked = Some(Duration::from_secs(2));
        assert_eq!(p.next_delay(1, asked, 0.1), Duration::from_secs(2));
        // The backoff is longer than asked: keep the backoff.
        assert_eq!(p.next_delay(6, asked, 0.5), Duration::from_secs(16));
        // Asking for a day is capped at max_interval.
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(86400)), 0.1),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("+5", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::MAX)
        );
        assert_eq!(
            policy().next_delay(1, Some(Duration::MAX), 0.1),
            Duration::from_secs(60)
        );
    }

    fn waiting_since(enqueued_ms: u64) -> DeliveryState {
        DeliveryState {
            enqueued_ms,
            ..DeliveryState::default()
        }
    }

    fn failed(status: u16, retry_after: Option<Duration>) -> Outcome {
        Outcome::Retry {
            failure: crate::deliver::Failure::Status(status),
            retry_after,
        }
    }

    #[test]
    fn a_2xx_is_delivered() {
        let decision = decide(
            &policy(),
            &waiting_since(0),
            &Outcome::Delivered { status: 204 },
            5,
            6,
            0.5,
        );
        assert_eq!(decision, Decision::Delivered);
    }

    #[test]
    fn a_failure_is_retried_within_the_backoff_and_the_state_records_it() {
        let before = DeliveryState {
            attempts: 2,
            first_attempt_ms: 1_000,
            ..waiting_since(0)
        };
        let Decision::Retry {
            due_ms,
            state,
            hold,
        } = decide(&policy(), &before, &failed(503, None), 10_000, 10_050, 0.5)
        else {
            panic!("a 503 within the retry window is retried");
        };
        // Third attempt: ceiling 4 s, half of it.
        assert_eq!(due_ms, 10_050 + 2_000);
        assert_eq!(hold, None);
        assert_eq!(
            (
                state.attempts,
                state.first_attempt_ms,
                state.last_attempt_ms
            ),
            (3, 1_000, 10_000)
        );
        assert_eq!(state.last_status, 503);
        assert!(!state.last_error.is_empty());
    }

    #[test]
    fn retry_after_holds_the_target_capped_at_max_interval() {
        let asked = Some(Duration::from_secs(10 * 3600));
        let Decision::Retry { hold, due_ms, .. } =
            decide(&policy(), &waiting_since(0), &failed(429, asked), 0, 0, 0.0)
        else {
            panic!("a 429 is retried");
        };
        assert_eq!(hold, Some(policy().max_interval));
        assert_eq!(due_ms, policy().max_interval.as_millis() as u64);
    }

    #[test]
    fn a_retry_past_the_window_is_dead_and_says_so() {
        let now = policy().max_age.as_millis() as u64;
        let decision = decide(
            &policy(),
            &waiting_since(0),
            &failed(500, None),
            now,
            now,
            0.5,
        );
        let Decision::Dead {
            reason,
            failing,
            state,
        } = decision
        else {
            panic!("a retry past max_age gives up");
        };
        assert!(failing, "the target kept failing");
        assert!(reason.contains("retry window"), "{reason}");
        assert_eq!(state.attempts, 1);
    }

    #[test]
    fn a_rejection_is_dead_at_once_with_the_answer() {
        let rejected = Outcome::Reject {
            status: 422,
            body: "bad email".to_owned(),
        };
        let Decision::Dead {
            reason,
            failing,
            state,
        } = decide(&policy(), &waiting_since(0), &rejected, 0, 0, 0.5)
        else {
            panic!("a 4xx is not retried");
        };
        assert!(!failing, "the target answered");
        assert_eq!(reason, "HTTP 422 (not retryable): bad email");
        assert_eq!(state.last_status, 422);
    }
}
