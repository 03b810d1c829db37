//! A Kafka record value as consumers read it: a Confluent frame (magic byte, schema id, Avro
//! body). The frame is decoded whole, and its body against its schema; whatever decodes as an
//! event must encode, and encode again after a round trip, to the same bytes.
#![no_main]

use feedloop_core::{
    avro::wire,
    model::{DeadLetter, Event},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (_, set) = &*feedloop_fuzz::CODECS;
    let _ = set.decode::<DeadLetter>(data);
    let Ok(frame) = wire::split(data) else {
        return;
    };
    let Some(schema) = set.get(frame.schema_id) else {
        return;
    };
    if let Ok(event) = Event::decode(schema, frame.body) {
        let _ = feedloop_fuzz::round_trip(&event);
    }
});
