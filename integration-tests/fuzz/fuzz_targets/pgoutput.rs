//! A pgoutput (logical replication, protocol 1) message as cdc receives it in XLogData; every
//! text column value of a decoded row is then read as each column type cdc maps.
#![no_main]

use feedloop_cdc::{
    pgoutput::{self, Message, Value},
    types,
};
use libfuzzer_sys::fuzz_target;

/// bool, bytea, int2, int4, int8, oid, float4, float8, date, time, timestamp, timestamptz,
/// uuid, and text (every other type).
const OIDS: [u32; 14] = [
    16, 17, 21, 23, 20, 26, 700, 701, 1082, 1083, 1114, 1184, 2950, 25,
];

fuzz_target!(|data: &[u8]| {
    let Ok(message) = pgoutput::decode(data) else {
        return;
    };
    let tuples = match &message {
        Message::Insert { new, .. } => vec![new],
        Message::Update { old, new, .. } => old.iter().map(|o| o.tuple()).chain([new]).collect(),
        Message::Delete { old, .. } => vec![old.tuple()],
        _ => Vec::new(),
    };
    for value in tuples.into_iter().flatten() {
        if let Value::Text(text) = value {
            for oid in OIDS {
                if let Ok(datum) = types::parse(types::kind(oid), text) {
                    let _ = datum.to_json();
                }
            }
        }
    }
});
