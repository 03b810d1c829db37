//! A Segment `POST /v1/batch` body (as analytics-* SDKs send it): every message parsed and
//! validated; every event accepted must encode and read back equal.
#![no_main]

use feedloop_collector::ingest::{Parsed, segment};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(batch) = serde_json::from_slice::<segment::SegmentBatch<'_>>(body) else {
        return;
    };
    let ctx = feedloop_fuzz::context();
    for raw in &batch.batch {
        if let Parsed::Event(event) = segment::parse_message(raw, &batch, &ctx) {
            // JSON has no NaN: what the collector accepts reads back equal.
            assert_eq!(
                feedloop_fuzz::round_trip(&event),
                *event,
                "read back differs"
            );
        }
    }
});
