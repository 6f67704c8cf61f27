//! The key schema: every key's prefix and layout, its builders and
//! parsers. Everything lives in one sled tree:
//!
//! | key | value |
//! |---|---|
//! | `e` + id (u64, big endian) | an event record ([`super::record`]) |
//! | `x` + id | a quarantined body ([`super::record`]) |
//! | `q` + target + 0 + due_ms + id | a delivery with a queue key ([`DeliveryState`]) |
//! | `p` + target + 0 + id | a delivery moved from its first place (by a failed attempt or a replay): enqueued_ms |
//! | `a` + target + 0 + enqueued_ms + id | the same delivery, by age (empty) |
//! | `d` + target + 0 + id | a dead letter ([`DeadLetter`]) |
//! | `w` + target + 0 | the target's watermark and event types |
//! | `r` + target + 0 + cut | a watermark a reload retired at `cut`, whose waiting deliveries are not queued yet |
//! | `m/last_id` | the highest id issued |
//! | `m/durable_id` | the highest id a checkpoint made durable against a power cut |
//! | `m/backlog_counts` | backlog counts a clean shutdown saved |
//! | `m/id_lead_ms` | the most ids ran ahead of the clock |
//!
//! Target names end in a 0 byte, so no name's keys are a prefix of
//! another's. Why each exists: `docs/design/storage.md`.

use super::*;

pub(super) const EVENT_PREFIX: u8 = b'e';

pub(super) const QUARANTINE_PREFIX: u8 = b'x';

pub(super) const META_LAST_ID: &[u8] = b"m/last_id";

/// The highest id a checkpoint has made durable against a power cut, sled
/// blob files included: opening the log writes every write-ahead log frame
/// above it again. Not `m/last_id`: sled's own flusher syncs its data file
/// every few milliseconds, so that mark can outlive a power cut while a
/// large event's blob file (sled writes values over a quarter of its
/// segment size to files of their own, without syncing them) does not.
pub(super) const META_DURABLE_ID: &[u8] = b"m/durable_id";

/// Per-target backlog counts saved by a clean shutdown (see
/// [`Store::save_backlog_counts`]); taken, and deleted, by the next open.
pub(super) const META_SAVED_COUNTS: &[u8] = b"m/backlog_counts";

/// The most an id ever ran ahead of its event's receive time, in ms, once
/// that was more than [`ID_CLOCK_MARGIN_MS`]: after the clock was set back
/// (ids never go back), until it caught up with the last id.
pub(super) const META_ID_LEAD: &[u8] = b"m/id_lead_ms";

pub(super) const QUEUE_PREFIX: u8 = b'q';

pub(super) const MOVED_PREFIX: u8 = b'p';

pub(super) const AGE_PREFIX: u8 = b'a';

pub(super) const DEAD_PREFIX: u8 = b'd';

pub(super) const WATERMARK_PREFIX: u8 = b'w';

pub(super) const RETIRED_PREFIX: u8 = b'r';

/// The receive time in the event record `value` stored at `key`.
pub(super) fn received_at(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    decode_event_record(key, value).map(|r| r.received_at_ms)
}

pub(super) fn decode_event_record<'a>(
    key: &[u8],
    value: &'a [u8],
) -> Result<record::EventRecord<'a>, StoreError> {
    record::decode_event(value).map_err(|reason| StoreError::Corrupt {
        key: key.to_vec(),
        reason,
    })
}

pub(super) fn decode_event(key: &[u8], value: &[u8]) -> Result<StoredEvent, StoreError> {
    let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
    let r = record::decode_event(value).map_err(|reason| StoreError::Corrupt {
        key: key.to_vec(),
        reason,
    })?;
    Ok(StoredEvent {
        id,
        received_at_ms: r.received_at_ms,
        event: r.event.to_owned(),
        body: r.body.to_vec(),
    })
}

pub(super) fn id_key(prefix: u8, id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

pub(super) fn queue_prefix(target: &str) -> Vec<u8> {
    target_prefix(QUEUE_PREFIX, target)
}

pub(super) fn queue_key(target: &str, due_ms: u64, id: EventId) -> Vec<u8> {
    timed_key(QUEUE_PREFIX, target, due_ms, id)
}

/// `prefix` + target + 0 + a time in ms + id: a key family in time order.
pub(super) fn timed_key(prefix: u8, target: &str, ms: u64, id: EventId) -> Vec<u8> {
    let mut key = target_prefix(prefix, target);
    key.extend_from_slice(&ms.to_be_bytes());
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

pub(super) fn parse_queue_key(key: &[u8]) -> Option<(u64, EventId)> {
    let tail = key.get(key.len().checked_sub(16)?..)?;
    Some((decode_u64(&tail[..8])?, EventId(decode_u64(&tail[8..])?)))
}

/// `prefix` + target + 0: the start of one target's range of a key family.
pub(super) fn target_prefix(prefix: u8, target: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(target.len() + 18);
    key.push(prefix);
    key.extend_from_slice(target.as_bytes());
    key.push(0);
    key
}

pub(super) fn age_prefix(target: &str) -> Vec<u8> {
    target_prefix(AGE_PREFIX, target)
}

/// Laid out as a queue key, so [`parse_queue_key`] reads it.
pub(super) fn age_key(target: &str, enqueued_ms: u64, id: EventId) -> Vec<u8> {
    timed_key(AGE_PREFIX, target, enqueued_ms, id)
}

pub(super) fn moved_prefix(target: &str) -> Vec<u8> {
    target_prefix(MOVED_PREFIX, target)
}

pub(super) fn moved_key(target: &str, id: EventId) -> Vec<u8> {
    let mut key = moved_prefix(target);
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

pub(super) fn dead_prefix(target: &str) -> Vec<u8> {
    target_prefix(DEAD_PREFIX, target)
}

pub(super) fn dead_key(target: &str, id: EventId) -> Vec<u8> {
    let mut key = dead_prefix(target);
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// The watermark of `target` that a reload retired at `cut` (see
/// [`super::retire`]).
pub(super) fn retired_key(target: &str, cut: u64) -> Vec<u8> {
    let mut key = target_prefix(RETIRED_PREFIX, target);
    key.extend_from_slice(&cut.to_be_bytes());
    key
}

/// Splits a `prefix + target + 0 + id` key.
pub(super) fn parse_target_key(key: &[u8]) -> Option<(&str, EventId)> {
    let rest = key.get(1..)?;
    let split = rest.len().checked_sub(9)?;
    if rest[split] != 0 {
        return None;
    }
    let target = std::str::from_utf8(&rest[..split]).ok()?;
    Some((target, EventId(decode_u64(&rest[split + 1..])?)))
}

pub(super) fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}
