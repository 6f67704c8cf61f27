//! The byte encoding of stored records. Pure functions, no I/O.
//!
//! Event (version 1):
//! `[1u8][received_at_ms: u64 BE][event_len: u8][event: utf-8][body...]`
//!
//! Quarantine (version 1):
//! `[1u8][received_at_ms: u64 BE][reason_len: u16 BE][reason: utf-8][body...]`

const VERSION: u8 = 1;

/// The longest event type a record can hold.
pub const MAX_EVENT_LEN: usize = u8::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is truncated")]
    Truncated,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("text field is not UTF-8")]
    NotUtf8,
}

#[derive(Debug, PartialEq, Eq)]
pub struct EventRecord<'a> {
    pub received_at_ms: u64,
    pub event: &'a str,
    pub body: &'a [u8],
}

#[derive(Debug, PartialEq, Eq)]
pub struct QuarantineRecord<'a> {
    pub received_at_ms: u64,
    pub reason: &'a str,
    pub body: &'a [u8],
}

/// Encodes an event. `event` longer than [`MAX_EVENT_LEN`] bytes is cut
/// at a character boundary (ingest refuses such events before this).
pub fn encode_event(received_at_ms: u64, event: &str, body: &[u8]) -> Vec<u8> {
    let event = truncate_utf8(event, MAX_EVENT_LEN);
    let mut out = Vec::with_capacity(10 + event.len() + body.len());
    out.push(VERSION);
    out.extend_from_slice(&received_at_ms.to_be_bytes());
    out.push(event.len() as u8);
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(body);
    out
}

pub fn decode_event(bytes: &[u8]) -> Result<EventRecord<'_>, DecodeError> {
    let (received_at_ms, rest) = header(bytes)?;
    let (&len, rest) = rest.split_first().ok_or(DecodeError::Truncated)?;
    let (event, body) = split_text(rest, len as usize)?;
    Ok(EventRecord {
        received_at_ms,
        event,
        body,
    })
}

pub fn encode_quarantine(received_at_ms: u64, reason: &str, body: &[u8]) -> Vec<u8> {
    let reason = truncate_utf8(reason, u16::MAX as usize);
    let mut out = Vec::with_capacity(11 + reason.len() + body.len());
    out.push(VERSION);
    out.extend_from_slice(&received_at_ms.to_be_bytes());
    out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(body);
    out
}

pub fn decode_quarantine(bytes: &[u8]) -> Result<QuarantineRecord<'_>, DecodeError> {
    let (received_at_ms, rest) = header(bytes)?;
    if rest.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let (reason, body) = split_text(&rest[2..], len)?;
    Ok(QuarantineRecord {
        received_at_ms,
        reason,
        body,
    })
}

/// Delivery state (version 1): `[1u8][attempts u32][enqueued_ms u64]
/// [first_attempt_ms u64][last_attempt_ms u64][last_status u16][last_error...]`
pub fn encode_state(state: &super::DeliveryState) -> Vec<u8> {
    let error = truncate_utf8(&state.last_error, 1024);
    let mut out = Vec::with_capacity(31 + error.len());
    out.push(VERSION);
    out.extend_from_slice(&state.attempts.to_be_bytes());
    out.extend_from_slice(&state.enqueued_ms.to_be_bytes());
    out.extend_from_slice(&state.first_attempt_ms.to_be_bytes());
    out.extend_from_slice(&state.last_attempt_ms.to_be_bytes());
    out.extend_from_slice(&state.last_status.to_be_bytes());
    out.extend_from_slice(error.as_bytes());
    out
}

pub fn decode_state(bytes: &[u8]) -> Result<super::DeliveryState, DecodeError> {
    let mut r = Reader::versioned(bytes)?;
    Ok(super::DeliveryState {
        attempts: r.u32()?,
        enqueued_ms: r.u64()?,
        first_attempt_ms: r.u64()?,
        last_attempt_ms: r.u64()?,
        last_status: r.u16()?,
        last_error: r.rest_text()?.to_owned(),
    })
}

/// Dead letter (version 1): `[1u8][attempts u32][last_status u16]
/// [first_attempt_ms u64][last_attempt_ms u64][reason...]`
pub fn encode_dead(dead: &super::DeadLetter) -> Vec<u8> {
    let reason = truncate_utf8(&dead.reason, 4096);
    let mut out = Vec::with_capacity(23 + reason.len());
    out.push(VERSION);
    out.extend_from_slice(&dead.attempts.to_be_bytes());
    out.extend_from_slice(&dead.last_status.to_be_bytes());
    out.extend_from_slice(&dead.first_attempt_ms.to_be_bytes());
    out.extend_from_slice(&dead.last_attempt_ms.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    out
}

pub fn decode_dead(
    bytes: &[u8],
    id: super::EventId,
    target: &str,
) -> Result<super::DeadLetter, DecodeError> {
    let mut r = Reader::versioned(bytes)?;
    Ok(super::DeadLetter {
        id,
        target: target.to_owned(),
        attempts: r.u32()?,
        last_status: r.u16()?,
        first_attempt_ms: r.u64()?,
        last_attempt_ms: r.u64()?,
        reason: r.rest_text()?.to_owned(),
    })
}

/// Encodes backlog counts: target, queued, dead for each target.
pub fn encode_counts(counts: &[(&str, super::Backlog)]) -> Vec<u8> {
    let mut out = vec![VERSION];
    for (target, super::Backlog { queued, dead }) in counts {
        let target = truncate_utf8(target, u16::MAX as usize);
        out.extend_from_slice(&(target.len() as u16).to_be_bytes());
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(&queued.to_be_bytes());
        out.extend_from_slice(&dead.to_be_bytes());
    }
    out
}

pub fn decode_counts(bytes: &[u8]) -> Result<super::BacklogCounts, DecodeError> {
    let mut r = Reader::versioned(bytes)?;
    let mut counts = super::BacklogCounts::new();
    while !r.0.is_empty() {
        let len = r.u16()? as usize;
        let target = r.text(len)?;
        let (queued, dead) = (r.u64()?, r.u64()?);
        counts.insert(target.to_owned(), super::Backlog { queued, dead });
    }
    Ok(counts)
}

/// A target's watermark and the event types it took when it was set
/// (`None`: all): `[1u8][watermark u64]` then, for a filter, each type
/// as `[len u16][type]`, after a `1u8` (none for all).
pub fn encode_watermark(watermark: u64, events: Option<&[String]>) -> Vec<u8> {
    let mut out = vec![VERSION];
    out.extend_from_slice(&watermark.to_be_bytes());
    if let Some(events) = events {
        out.push(1);
        for event in events {
            let event = truncate_utf8(event, u16::MAX as usize);
            out.extend_from_slice(&(event.len() as u16).to_be_bytes());
            out.extend_from_slice(event.as_bytes());
        }
    }
    out
}

/// A decoded watermark record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkRecord {
    pub watermark: u64,
    /// The event types the target took (`None`: all).
    pub events: Option<Vec<String>>,
}

pub fn decode_watermark(bytes: &[u8]) -> Result<WatermarkRecord, DecodeError> {
    let mut r = Reader::versioned(bytes)?;
    let watermark = r.u64()?;
    if r.0.is_empty() {
        return Ok(WatermarkRecord {
            watermark,
            events: None,
        });
    }
    let [_] = r.take::<1>()?;
    let mut events = Vec::new();
    while !r.0.is_empty() {
        let len = r.u16()? as usize;
        events.push(r.text(len)?.to_owned());
    }
    Ok(WatermarkRecord {
        watermark,
        events: Some(events),
    })
}

/// Reads fixed-width big-endian fields off the front of a record.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn versioned(bytes: &'a [u8]) -> Result<Reader<'a>, DecodeError> {
        let (&version, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        Ok(Reader(rest))
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        if self.0.len() < N {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("N bytes"))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.take().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.take().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.take().map(u64::from_be_bytes)
    }

    fn text(&mut self, len: usize) -> Result<&'a str, DecodeError> {
        let (text, rest) = split_text(self.0, len)?;
        self.0 = rest;
        Ok(text)
    }

    fn rest_text(&mut self) -> Result<&'a str, DecodeError> {
        let text = std::str::from_utf8(self.0).map_err(|_| DecodeError::NotUtf8)?;
        self.0 = &[];
        Ok(text)
    }
}

fn header(bytes: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    if rest.len() < 8 {
        return Err(DecodeError::Truncated);
    }
    let (time, rest) = rest.split_at(8);
    Ok((u64::from_be_bytes(time.try_into().expect("8 bytes")), rest))
}

fn split_text(bytes: &[u8], len: usize) -> Result<(&str, &[u8]), DecodeError> {
    if bytes.len() < len {
        return Err(DecodeError::Truncated);
    }
    let (text, rest) = bytes.split_at(len);
    let text = std::str::from_utf8(text).map_err(|_| DecodeError::NotUtf8)?;
    Ok((text, rest))
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trips() {
        let body = "{\"event\":\"visitor_created\",\"name\":\"Zoë\"}".as_bytes();
        let bytes = encode_event(1_700_000_000_123, "visitor_created", body);
        let record = decode_event(&bytes).unwrap();
        assert_eq!(
            record,
            EventRecord {
                received_at_ms: 1_700_000_000_123,
                event: "visitor_created",
                body
            }
        );
    }

    #[test]
    fn quarantine_round_trips_with_binary_body() {
        let body = [0u8, 255, 1, 2];
        let bytes = encode_quarantine(7, "body is not valid JSON", &body);
        let record = decode_quarantine(&bytes).unwrap();
        assert_eq!(record.reason, "body is not valid JSON");
        assert_eq!(record.body, &body);
        assert_eq!(record.received_at_ms, 7);
    }

    #[test]
    fn long_event_types_are_cut_at_a_char_boundary() {
        let event = "é".repeat(200); // 400 bytes
        let bytes = encode_event(0, &event, b"{}");
        let record = decode_event(&bytes).unwrap();
        assert!(record.event.len() <= MAX_EVENT_LEN);
        assert!(event.starts_with(record.event));
        assert_eq!(record.body, b"{}");
    }

    #[test]
    fn backlog_counts_round_trip_and_reject_damage() {
        let crm = crate::store::Backlog {
            queued: 1_000_000,
            dead: 3,
        };
        let none = crate::store::Backlog::default();
        let bytes = encode_counts(&[("crm", crm), ("zoë-archive", none)]);
        let counts = decode_counts(&bytes).unwrap();
        assert_eq!(counts.len(), 2);
        assert_eq!(counts["crm"], crm);
        assert_eq!(counts["zoë-archive"], none);
        assert_eq!(decode_counts(&encode_counts(&[])).unwrap().len(), 0);
        assert!(decode_counts(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_counts(&[]).is_err());
    }

    #[test]
    fn delivery_state_and_dead_letters_round_trip() {
        let state = crate::store::DeliveryState {
            attempts: 3,
            enqueued_ms: 10,
            first_attempt_ms: 11,
            last_attempt_ms: 12,
            last_status: 503,
            last_error: "HTTP 503".into(),
        };
        assert_eq!(decode_state(&encode_state(&state)).unwrap(), state);
        let dead = crate::store::DeadLetter {
            id: crate::store::EventId(42),
            target: "crm".into(),
            attempts: 1,
            last_status: 400,
            first_attempt_ms: 5,
            last_attempt_ms: 5,
            reason: "HTTP 400: {\"error\":\"bad\"}".into(),
        };
        assert_eq!(
            decode_dead(&encode_dead(&dead), dead.id, "crm").unwrap(),
            dead
        );
        let bytes = encode_state(&state);
        for cut in 0..31 {
            assert_eq!(
                decode_state(&bytes[..cut]),
                Err(DecodeError::Truncated),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn truncated_and_foreign_records_are_errors_not_panics() {
        let bytes = encode_event(5, "visitor_created", b"{}");
        for cut in 0..11 {
            assert_eq!(
                decode_event(&bytes[..cut]),
                Err(DecodeError::Truncated),
                "cut {cut}"
            );
        }
        let mut foreign = bytes.clone();
        foreign[0] = 9;
        assert_eq!(decode_event(&foreign), Err(DecodeError::Version(9)));
        let mut bad_utf8 = bytes;
        bad_utf8[10] = 0xff;
        assert_eq!(decode_event(&bad_utf8), Err(DecodeError::NotUtf8));
    }
}
