//! Crash points for the crash matrix: exact places where the relay can be
//! killed on purpose, so a test can crash it between two particular writes
//! rather than at whatever moment a timed `kill -9` lands.
//!
//! `LEADFLO_RELAY_CRASH_AT=<point>:<n>` makes the process SIGKILL itself the
//! `n`th time execution reaches `<point>` (no destructor, no flush: the same
//! as `kill -9`). For tests only; unset, each point costs one load of a
//! value read once at start. The points are listed in [`POINTS`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms a crash point.
pub const ENV: &str = "LEADFLO_RELAY_CRASH_AT";

/// Half of a group commit's frame is in the write-ahead log (a torn write).
pub const COMMIT_TORN: &str = "commit.torn";
/// A group commit is in the write-ahead log and fdatasync'ed; no sender has
/// its 200 yet.
pub const COMMIT_LOGGED: &str = "commit.logged";
/// The senders of a group commit have their 200s; sled does not have the
/// commit yet (only the write-ahead log does).
pub const COMMIT_ACKNOWLEDGED: &str = "commit.acknowledged";
/// sled has part of a group commit on disk: the writes up to one event's
/// record (flushed), not that event's deliveries nor the rest of the group.
pub const APPLY_PARTIAL: &str = "apply.partial";
/// A checkpoint has flushed sled; its data file is not yet fdatasync'ed and
/// the write-ahead log not yet emptied.
pub const CHECKPOINT_FLUSHED: &str = "checkpoint.flushed";
/// A target answered 2xx; the log does not know yet.
pub const DELIVERY_ANSWERED: &str = "delivery.answered";
/// Between the two writes that record a delivery as done.
pub const DELIVERY_HALF_RECORDED: &str = "delivery.half_recorded";
/// Between the two writes that move a failed delivery to its next attempt.
pub const RESCHEDULE_HALF_RECORDED: &str = "reschedule.half_recorded";
/// A replay has queued one chunk of events and not the next.
pub const REPLAY_CHUNK: &str = "replay.chunk";
/// Retention has deleted one batch of events and not the next.
pub const PRUNE_BATCH: &str = "prune.batch";
/// The committer has moved to a reload's new targets; the apply thread has
/// not written the change yet. The crash comes a second later, after more
/// events.
pub const RELOAD_CHANGE: &str = "reload.change";
/// A reload's change of targets is written and the committer has moved;
/// the retired targets' deliveries are not queued yet, nor the new
/// dispatchers started. The crash comes a second later, after more events.
pub const RELOAD_CUT: &str = "reload.cut";

/// Every crash point.
pub const POINTS: [&str; 12] = [
    COMMIT_TORN,
    COMMIT_LOGGED,
    COMMIT_ACKNOWLEDGED,
    APPLY_PARTIAL,
    CHECKPOINT_FLUSHED,
    DELIVERY_ANSWERED,
    DELIVERY_HALF_RECORDED,
    RESCHEDULE_HALF_RECORDED,
    REPLAY_CHUNK,
    PRUNE_BATCH,
    RELOAD_CHANGE,
    RELOAD_CUT,
];

/// The environment variable that arms a fault point:
/// `LEADFLO_RELAY_FAIL_AT=<point>:<n>` makes the `n`th hit of `<point>`
/// report an I/O error instead of doing its work (once). For tests only.
pub const FAIL_ENV: &str = "LEADFLO_RELAY_FAIL_AT";

/// A checkpoint's `fdatasync` of sled's data file reports an error, as a
/// failing disk would (without syncing anything).
pub const CHECKPOINT_SYNC: &str = "checkpoint.sync";

/// A group commit's write to the write-ahead log fails halfway, and so does
/// cutting the half frame off again (once), as on a failing disk.
pub const COMMIT_WRITE: &str = "commit.write";

/// Every fault point.
pub const FAULT_POINTS: [&str; 2] = [CHECKPOINT_SYNC, COMMIT_WRITE];

struct Armed {
    point: String,
    /// Hits left before the crash.
    left: AtomicU64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
static ARMED_FAULT: OnceLock<Option<Armed>> = OnceLock::new();

/// Reads [`ENV`]; returns an error naming a bad value. Call once at start so
/// a typo fails loudly instead of never crashing.
pub fn arm_from_env() -> Result<(), String> {
    let parsed = match std::env::var(ENV) {
        Ok(value) => Some(parse(&value)?),
        Err(_) => None,
    };
    let fault = match std::env::var(FAIL_ENV) {
        Ok(value) => Some(parse_for(FAIL_ENV, &FAULT_POINTS, &value)?),
        Err(_) => None,
    };
    let armed = ARMED.get_or_init(|| parsed);
    if let Some(armed) = armed {
        tracing::warn!(
            point = %armed.point,
            hits = armed.left.load(Ordering::Relaxed),
            "crash point armed ({ENV}): this process will kill itself there"
        );
    }
    if let Some(armed) = ARMED_FAULT.get_or_init(|| fault) {
        tracing::warn!(
            point = %armed.point,
            hits = armed.left.load(Ordering::Relaxed),
            "fault point armed ({FAIL_ENV}): an I/O error will be reported there"
        );
    }
    Ok(())
}

/// Counts a hit of fault point `point`; true when this hit must fail.
pub fn fails(point: &'static str) -> bool {
    counts_down(&ARMED_FAULT, point)
}

fn parse(value: &str) -> Result<Armed, String> {
    parse_for(ENV, &POINTS, value)
}

fn parse_for(env: &str, points: &[&str], value: &str) -> Result<Armed, String> {
    let (point, n) = value.rsplit_once(':').unwrap_or((value, "1"));
    if !points.contains(&point) {
        return Err(format!(
            "{env}={value:?}: unknown point {point:?}; expected one of {}",
            points.join(", ")
        ));
    }
    let n: u64 = n
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("{env}={value:?}: the hit count must be a number from 1"))?;
    Ok(Armed {
        point: point.to_owned(),
        left: AtomicU64::new(n),
    })
}

/// Execution reached `point`: crash here if it is armed and this is the
/// hit it waits for.
pub fn reached(point: &'static str) {
    if hits(point) {
        crash(point);
    }
}

/// Counts a hit of `point`; true when this is the hit to crash at (for a
/// point that must do something first, such as write half a frame).
pub fn hits(point: &'static str) -> bool {
    counts_down(&ARMED, point)
}

/// Counts a hit of `point` if `armed` is armed there; true at the hit it
/// waits for.
fn counts_down(armed: &OnceLock<Option<Armed>>, point: &str) -> bool {
    let Some(Some(armed)) = armed.get() else {
        return false;
    };
    armed.point == point && armed.left.fetch_sub(1, Ordering::SeqCst) == 1
}

/// Kills this process with SIGKILL, as `kill -9` would.
pub fn crash(point: &'static str) -> ! {
    eprintln!("crash point {point} reached: killing this process (SIGKILL)");
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    // `kill` missing: abort is the next best thing (no destructors either).
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_counts() {
        let armed = parse("commit.logged:3").unwrap();
        assert_eq!(armed.point, "commit.logged");
        assert_eq!(armed.left.load(Ordering::Relaxed), 3);
        assert_eq!(
            parse("prune.batch").unwrap().left.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn fault_points_are_their_own_list() {
        let armed = parse_for(FAIL_ENV, &FAULT_POINTS, "checkpoint.sync:2").unwrap();
        assert_eq!(armed.point, CHECKPOINT_SYNC);
        assert_eq!(armed.left.load(Ordering::Relaxed), 2);
        let err = parse_for(FAIL_ENV, &FAULT_POINTS, "commit.logged")
            .err()
            .unwrap();
        assert!(
            err.contains(FAIL_ENV) && err.contains("checkpoint.sync"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_choices() {
        let err = parse("commit.nowhere:1").err().unwrap();
        assert!(err.contains(ENV) && err.contains("commit.torn"), "{err}");
        let err = parse("commit.logged:0").err().unwrap();
        assert!(err.contains("hit count"), "{err}");
    }
}
