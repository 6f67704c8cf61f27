//! Event ids that no two relays share: the layout of an id, and the node
//! identity each relay mixes into its ids.
//!
//! An id is one `u64`, written as a decimal string:
//!
//! | bits    | holds |
//! |---------|-------|
//! | 62..21  | receive time, ms since the epoch (runs ahead of it only in bursts of more than 32 events per ms, or after the clock was set back) |
//! | 20..16  | a sequence within that ms |
//! | 15..0   | the relay's node identity |
//!
//! Two relays with different node identities never issue the same id,
//! whatever their clocks do; one relay's ids strictly increase across
//! restarts, node changes and the upgrade from the ids of earlier builds
//! (the receive time in microseconds, always below [`FIRST_NODE_ID`]).
//! Ids stay below `i64::MAX` until the year 2109, for receivers that store
//! idempotency keys as signed 64-bit numbers.
//!
//! This module never does I/O but in [`NodeId::load_or_create`].

use std::path::{Path, PathBuf};

use rand::Rng;

/// Bits of an id that hold the node identity.
const NODE_BITS: u32 = 16;
/// Bits of an id that hold the sequence within one millisecond.
const SEQUENCE_BITS: u32 = 5;
/// Where the millisecond begins in an id.
const TIME_SHIFT: u32 = NODE_BITS + SEQUENCE_BITS;
/// Every id issued with a node identity is at or above this; every id of
/// the earlier layout (microseconds, below 2^56 until the year 4253) is
/// below it. A millisecond clock reaches it in February 1971 (2^35 ms).
pub const FIRST_NODE_ID: u64 = 1 << 56;

/// The file in the data directory that holds the node identity.
pub const NODE_ID_FILE: &str = "node_id";

/// A relay's node identity: the low 16 bits of each of its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeId(pub u16);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a relay's node identity came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSource {
    /// `server.node_id` in the configuration.
    Configured,
    /// The data directory's `node_id` file.
    DataDir(PathBuf),
    /// Not yet created: the data directory has no `node_id` file, and the
    /// first `serve` makes one.
    NotYetCreated,
}

/// Why the node identity could not be had.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot read the node identity {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold a node identity (expected a whole number from 0 to 65535, got {text:?}); \
         delete it to have a new one made, or set server.node_id"
    )]
    Invalid { path: PathBuf, text: String },
    #[error("cannot create the node identity {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl NodeId {
    /// The node identity of the relay using `data_dir`: `configured` when
    /// set, else the one kept in the directory, made at random (and kept,
    /// durably) when there is none yet.
    pub fn load_or_create(configured: Option<u16>, data_dir: &Path) -> Result<NodeId, NodeError> {
        if let Some(node) = configured {
            return Ok(NodeId(node));
        }
        if let Some(node) = NodeId::stored(data_dir)? {
            return Ok(node);
        }
        let node = NodeId(rand::rng().random());
        crate::durable_file::write_durably(
            &data_dir.join(NODE_ID_FILE),
            format!("{node}\n").as_bytes(),
            0o666,
        )
        .map_err(|source| NodeError::Create {
            path: data_dir.join(NODE_ID_FILE),
            source,
        })?;
        Ok(node)
    }

    /// The node identity kept in `data_dir`, if it holds one.
    pub fn stored(data_dir: &Path) -> Result<Option<NodeId>, NodeError> {
        let path = data_dir.join(NODE_ID_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(NodeError::Read { path, source }),
        };
        match text.trim().parse() {
            Ok(node) => Ok(Some(NodeId(node))),
            Err(_) => Err(NodeError::Invalid { path, text }),
        }
    }

    /// What a relay with this configuration and data directory would use,
    /// without creating anything (for `check-config`).
    pub fn peek(
        configured: Option<u16>,
        data_dir: &Path,
    ) -> Result<(Option<NodeId>, NodeSource), NodeError> {
        if let Some(node) = configured {
            return Ok((Some(NodeId(node)), NodeSource::Configured));
        }
        Ok(match NodeId::stored(data_dir)? {
            Some(node) => (Some(node), NodeSource::DataDir(data_dir.join(NODE_ID_FILE))),
            None => (None, NodeSource::NotYetCreated),
        })
    }
}

/// The id after `last` for an event received at `received_ms`, issued by
/// `node`: strictly above `last` (of either layout), at the receive time
/// when the clock allows, and never below [`FIRST_NODE_ID`].
pub fn next_id(last: u64, received_ms: u64, node: NodeId) -> u64 {
    let last_tick = if last < FIRST_NODE_ID {
        0
    } else {
        last >> NODE_BITS
    };
    // A clock that reads before 1971 (one reset to 0) would otherwise make
    // an id of the earlier layout, read back as microseconds.
    let tick = (last_tick + 1)
        .max(received_ms << SEQUENCE_BITS)
        .max(FIRST_NODE_ID >> NODE_BITS);
    (tick << NODE_BITS) | u64::from(node.0)
}

/// The millisecond an id stands for: its receive time, or later when ids
/// ran ahead of the clock.
pub fn id_ms(id: u64) -> u64 {
    if id < FIRST_NODE_ID {
        id / 1000
    } else {
        id >> TIME_SHIFT
    }
}

/// The ids, of either layout, that can stand for a time in `[from_ms,
/// to_ms]`: one range of the earlier layout and one of the current, each
/// possibly empty (start above end).
pub fn id_ranges(from_ms: u64, to_ms: u64) -> [(u64, u64); 2] {
    let legacy_end = to_ms
        .saturating_add(1)
        .saturating_mul(1000)
        .saturating_sub(1)
        .min(FIRST_NODE_ID - 1);
    let current_start = (from_ms.min(u64::MAX >> TIME_SHIFT) << TIME_SHIFT).max(FIRST_NODE_ID);
    let current_end = match to_ms.checked_add(1) {
        Some(next) if next <= u64::MAX >> TIME_SHIFT => (next << TIME_SHIFT) - 1,
        _ => u64::MAX,
    };
    [
        (from_ms.saturating_mul(1000), legacy_end),
        (current_start, current_end),
    ]
}

/// The smallest id of the current layout for an event received at `ms`
/// (for tests and tools that make ids by hand).
pub fn first_id_at(ms: u64) -> u64 {
    ms << TIME_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_764_930_000_000; // 2025-12-05

    #[test]
    fn ids_of_two_nodes_never_meet_whatever_the_clocks_do() {
        let (a, b) = (NodeId(1), NodeId(2));
        let (mut last_a, mut last_b) = (0, 0);
        let mut seen = std::collections::HashSet::new();
        for n in 0..10_000u64 {
            // Both at the same millisecond, in bursts, and clocks that jump.
            let ms = NOW_MS + n / 100;
            last_a = next_id(last_a, ms, a);
            last_b = next_id(last_b, ms, b);
            assert!(seen.insert(last_a), "id {last_a} issued twice");
            assert!(seen.insert(last_b), "id {last_b} issued twice");
        }
    }

    #[test]
    fn ids_strictly_increase_across_bursts_clock_steps_and_node_changes() {
        let mut last = 0;
        let mut node = NodeId(7);
        for n in 0..5_000u64 {
            // The clock stands still, steps back, and the node changes.
            let ms = if n % 1000 < 500 {
                NOW_MS
            } else {
                NOW_MS - 60_000
            };
            if n == 2_500 {
                node = NodeId(3);
            }
            let id = next_id(last, ms, node);
            assert!(id > last, "id {id} is not above {last}");
            assert_eq!(id & 0xffff, u64::from(node.0));
            last = id;
        }
    }

    #[test]
    fn the_first_id_after_an_upgrade_is_above_every_old_one() {
        // Earlier builds issued the receive time in microseconds.
        let old_last = NOW_MS * 1000 + 999;
        let id = next_id(old_last, NOW_MS, NodeId(0));
        assert!(id > old_last && id >= FIRST_NODE_ID);
        assert_eq!(id_ms(id), NOW_MS);
        assert_eq!(id_ms(old_last), NOW_MS);
        // 2106-04-07: still a signed 64-bit number.
        assert!(next_id(0, 4_300_000_000_000, NodeId(u16::MAX)) < i64::MAX as u64);
    }

    #[test]
    fn a_clock_before_1971_still_issues_ids_of_the_current_layout() {
        let node = NodeId(5);
        let first = next_id(0, 0, node);
        assert_eq!(first, FIRST_NODE_ID | 5, "a clock at 0 issued {first}");
        let second = next_id(first, 0, node);
        assert!(second > first && second >= FIRST_NODE_ID);
        assert_eq!(second & 0xffff, 5);
        // The last old-layout id, then the clock at 1970-01-02.
        let after_old = next_id(FIRST_NODE_ID - 1, 86_400_000, node);
        assert!(
            after_old >= FIRST_NODE_ID,
            "{after_old} is of the earlier layout"
        );
        // Once the clock is past the floor, ids follow it again.
        assert_eq!(id_ms(next_id(second, NOW_MS, node)), NOW_MS);
    }

    #[test]
    fn time_ranges_cover_ids_of_both_layouts() {
        let old = NOW_MS * 1000 + 5;
        let new = next_id(0, NOW_MS, NodeId(9));
        let [legacy, current] = id_ranges(NOW_MS, NOW_MS);
        assert!((legacy.0..=legacy.1).contains(&old));
        assert!((current.0..=current.1).contains(&new));
        assert!(!(current.0..=current.1).contains(&next_id(0, NOW_MS + 1, NodeId(9))));
        assert!(!(current.0..=current.1).contains(&next_id(0, NOW_MS - 1, NodeId(9))));
    }

    #[test]
    fn the_identity_is_made_once_kept_and_can_be_configured() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            NodeId::peek(None, dir.path()).unwrap(),
            (None, NodeSource::NotYetCreated)
        );
        let made = NodeId::load_or_create(None, dir.path()).unwrap();
        assert_eq!(NodeId::load_or_create(None, dir.path()).unwrap(), made);
        assert_eq!(NodeId::stored(dir.path()).unwrap(), Some(made));
        assert_eq!(
            NodeId::load_or_create(Some(42), dir.path()).unwrap(),
            NodeId(42)
        );
        std::fs::write(dir.path().join(NODE_ID_FILE), "seventy\n").unwrap();
        let err = NodeId::stored(dir.path()).unwrap_err().to_string();
        assert!(err.contains("node_id") && err.contains("seventy"), "{err}");
    }
}
