//! Retry timing: pure functions of (attempt, policy, Retry-After, jitter).
//! No I/O and no clock reads, so every rule is unit-tested exactly.
//!
//! Exponential backoff with full jitter: the ceiling for attempt `n` (1-based,
//! the attempt that just failed) is `initial * multiplier^(n-1)`, capped at
//! `max_interval`; the delay is a uniform draw in `[0, ceiling]`, never below
//! a small floor so a failing target is not hammered by near-zero delays.
//! A `Retry-After` from the target wins when it asks for longer, capped at
//! `max_interval`.

use std::time::{Duration, SystemTime};

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
}
