//! Properties over arbitrary input: stored records decode to what was
//! encoded, decoders never panic on any bytes, and the ingest endpoint
//! answers any body with 200 or a 4xx, never a panic or a 5xx.

use crate::common::*;
use leadflo_relay::ingest::event_type;
use leadflo_relay::store::record;
use leadflo_relay::store::{DeadLetter, DeliveryState, EventId};
use proptest::prelude::*;

proptest! {
    #[test]
    fn event_records_round_trip(at in any::<u64>(), event in "\\PC{0,64}", body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assume!(event.len() <= record::MAX_EVENT_LEN);
        let bytes = record::encode_event(at, &event, &body);
        let decoded = record::decode_event(&bytes).unwrap();
        prop_assert_eq!(decoded.received_at_ms, at);
        prop_assert_eq!(decoded.event, event.as_str());
        prop_assert_eq!(decoded.body, &body[..]);
    }

    #[test]
    fn quarantine_records_round_trip(at in any::<u64>(), reason in "\\PC{0,200}", body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let bytes = record::encode_quarantine(at, &reason, &body);
        let decoded = record::decode_quarantine(&bytes).unwrap();
        prop_assert_eq!((decoded.received_at_ms, decoded.reason, decoded.body), (at, reason.as_str(), &body[..]));
    }

    #[test]
    fn delivery_state_and_dead_letters_round_trip(
        attempts in any::<u32>(), times in any::<(u64, u64, u64)>(), status in any::<u16>(), text in "\\PC{0,200}",
    ) {
        let state = DeliveryState {
            attempts,
            enqueued_ms: times.0,
            first_attempt_ms: times.1,
            last_attempt_ms: times.2,
            last_status: status,
            last_error: text.clone(),
        };
        prop_assert_eq!(record::decode_state(&record::encode_state(&state)).unwrap(), state);
        let dead = DeadLetter {
            id: EventId(times.0),
            target: "crm".into(),
            attempts,
            last_status: status,
            first_attempt_ms: times.1,
            last_attempt_ms: times.2,
            reason: text,
        };
        prop_assert_eq!(record::decode_dead(&record::encode_dead(&dead), dead.id, "crm").unwrap(), dead);
    }

    #[test]
    fn decoders_never_panic_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = record::decode_event(&bytes);
        let _ = record::decode_quarantine(&bytes);
        let _ = record::decode_state(&bytes);
        let _ = record::decode_dead(&bytes, EventId(1), "t");
    }

    #[test]
    fn validation_accepts_or_explains_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match event_type(&bytes) {
            Ok(event) => prop_assert!(!event.is_empty()),
            Err(why) => prop_assert!(!why.is_empty()),
        }
    }

    #[test]
    fn validation_accepts_any_json_object_with_a_string_event(event in "[a-z_]{1,40}", extra in "\\PC{0,100}") {
        let body = serde_json::json!({ "event": event, "data": { "note": extra } }).to_string();
        prop_assert_eq!(event_type(body.as_bytes()).unwrap(), event.as_str());
    }
}

/// Bodies that look almost like webhooks: mutations of the seed's payload.
fn near_miss_bodies() -> impl Strategy<Value = Vec<u8>> {
    let seed = fixture("visitor_created.json");
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (0..seed.len(), any::<u8>()).prop_map(move |(at, byte)| {
            let mut body = seed.clone();
            body[at] = byte;
            body
        }),
        (0..fixture("visitor_created.json").len())
            .prop_map(|cut| fixture("visitor_created.json")[..cut].to_vec()),
    ]
}

#[test]
fn the_endpoint_answers_any_body_with_200_or_4xx() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let relay = runtime.block_on(TestRelay::start());
    let client = client();
    let url = relay.url();
    let config = ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    };
    proptest!(config, |(body in near_miss_bodies())| {
        let (status, json) = runtime.block_on(post(&client, &url, Some(SECRET), body.clone()));
        prop_assert!(status == 200 || (400..500).contains(&status), "status {} for {:?}", status, String::from_utf8_lossy(&body));
        prop_assert!(json.is_object());
        if status == 200 {
            let id: EventId = json["id"].as_str().unwrap().parse().unwrap();
            let stored = runtime.block_on(stored_event(&relay.store, id));
            prop_assert_eq!(stored.body, body);
        }
    });
    runtime.block_on(relay.stop());
}
