//! Any body: the validation either names an event type or explains the
//! problem; it never panics, and an accepted event type is within bounds.
#![no_main]

use leadflo_relay::ingest::{MAX_EVENT_TYPE_LEN, event_type};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match event_type(body) {
        Ok(event) => assert!(!event.is_empty() && event.len() <= MAX_EVENT_TYPE_LEN),
        Err(why) => assert!(!why.is_empty()),
    }
});
