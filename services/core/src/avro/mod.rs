//! Avro: the Confluent wire format, typed codec, schema normalization and compatibility.

pub mod canonical;
pub mod codec;
pub mod compat;
pub mod wire;

pub use codec::{CodecError, CompiledSchema, Encoder, SchemaSet};

/// Parses and validates an Avro schema, returning the parser's message on failure.
pub fn parse_schema(json: &str) -> Result<apache_avro::Schema, String> {
    apache_avro::Schema::parse_str(json).map_err(|e| e.to_string())
}
