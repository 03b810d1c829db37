//! What the fuzz targets share: the collector's request context, and the round trip every
//! accepted event must survive (encoded with its writer schema, read back equal).

use std::sync::LazyLock;

use feedloop_collector::{config::Config, ingest::Context, pipeline::Codecs};
use feedloop_core::{
    avro::{SchemaSet, wire},
    model::Event,
};

/// Receive time of every fuzzed request (2026-01-01T00:00:00Z): a run is reproducible.
pub const RECEIVED_AT: i64 = 1_767_225_600_000;

/// The collector's default configuration: the limits a request meets in production.
pub static COLLECTOR: LazyLock<Config> =
    LazyLock::new(|| Config::from_defaults().expect("the collector's defaults load"));

/// The catalogue's writer schemas, compiled as the collector does, and the same by id.
pub static CODECS: LazyLock<(Codecs, SchemaSet)> = LazyLock::new(|| {
    let codecs = Codecs::local().expect("the catalogue compiles");
    let set = codecs.schema_set();
    (codecs, set)
});

/// A request of the `fuzz` application, received at [`RECEIVED_AT`].
pub fn context() -> Context<'static> {
    Context {
        app_id: "fuzz",
        received_at: RECEIVED_AT,
        max_event_bytes: COLLECTOR.http.max_event_bytes,
        time: &COLLECTOR.time,
    }
}

/// The Confluent frame of `event`, as the collector writes it.
pub fn encode(event: &Event) -> Vec<u8> {
    let mut frame = Vec::new();
    CODECS
        .0
        .encode_event(event, &mut frame)
        .expect("an event encodes with its schema");
    frame
}

/// Reads a frame written with one of the catalogue's schemas.
pub fn decode(frame: &[u8]) -> Event {
    let split = wire::split(frame).expect("the encoder writes a Confluent frame");
    let schema = CODECS
        .1
        .get(split.schema_id)
        .expect("the frame's schema is known");
    Event::decode(schema, split.body).expect("the encoded event decodes")
}

/// An event encodes, decodes, and encodes again to the same bytes; returns what was read back.
/// (Bytes, not values: a consumer may read a NaN score, which equals nothing.)
pub fn round_trip(event: &Event) -> Event {
    let frame = encode(event);
    let back = decode(&frame);
    assert_eq!(
        encode(&back),
        frame,
        "the event's frame changed in a round trip"
    );
    back
}
