//! A native `POST /v1/events` body: split into events, each parsed and validated; every event
//! accepted must encode and read back equal.
#![no_main]

use feedloop_collector::ingest::{Parsed, native};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok((events, sent_at)) = native::split(body, feedloop_fuzz::COLLECTOR.http.max_batch_len)
    else {
        return;
    };
    let ctx = feedloop_fuzz::context();
    for raw in events {
        if let Parsed::Event(event) = native::parse_event(raw, sent_at, &ctx) {
            // JSON has no NaN: what the collector accepts reads back equal.
            assert_eq!(
                feedloop_fuzz::round_trip(&event),
                *event,
                "read back differs"
            );
        }
    }
});
