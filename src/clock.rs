//! The wall clock, in milliseconds since the Unix epoch: the unit of every
//! receive time, due time and time window the relay stores.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in ms since the epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    ms_since_epoch(SystemTime::now())
}

/// `time` in ms since the epoch (0 if it is before 1970).
pub fn ms_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
