//! Any stored bytes: the record decoders return a value or an error, never
//! panic; and whatever decodes as an event re-encodes to the same bytes.
#![no_main]

use leadflo_relay::store::{EventId, record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(event) = record::decode_event(bytes) {
        assert_eq!(record::encode_event(event.received_at_ms, event.event, event.body), bytes);
    }
    if let Ok(quarantined) = record::decode_quarantine(bytes) {
        assert_eq!(
            record::encode_quarantine(quarantined.received_at_ms, quarantined.reason, quarantined.body),
            bytes
        );
    }
    let _ = record::decode_state(bytes);
    let _ = record::decode_dead(bytes, EventId(1), "target");
});
