//! Typed Avro encoding and decoding in the Confluent wire format.
//!
//! Schemas are parsed and compiled once ([`CompiledSchema::new`]); encoding and decoding then go
//! straight between serde types and Avro bytes (serde_avro_fast), never through a dynamic value
//! tree. Decoding uses the writer's schema; evolution is handled by serde on the Rust type
//! (fields the writer lacks take their `#[serde(default)]`).

use std::{collections::HashMap, io::ErrorKind, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};
use serde_avro_fast::{
    de::{DeError, DeserializerConfig, DeserializerState, read::ReaderRead},
    ser::SerializerConfig,
};

use super::wire::{self, FrameError};

/// Deepest nesting a decoded value may have; guards the stack against hostile input.
const MAX_DEPTH: usize = 32;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unknown schema id {0}: not in the registry")]
    UnknownSchemaId(u32),
    #[error("truncated Avro body for schema id {id}: {detail}")]
    Truncated { id: u32, detail: String },
    #[error("{trailing} bytes of trailing garbage after the Avro body for schema id {id}")]
    TrailingBytes { id: u32, trailing: usize },
    #[error("Avro body does not match schema id {id}: {detail}")]
    InvalidBody { id: u32, detail: String },
    #[error("value does not fit schema id {id}: {detail}")]
    Encode { id: u32, detail: String },
    #[error("invalid Avro schema: {0}")]
    InvalidSchema(String),
}

impl CodecError {
    /// True when the bytes themselves are bad (a poison record), as opposed to a schema that
    /// could not be found.
    pub fn is_poison(&self) -> bool {
        !matches!(self, Self::UnknownSchemaId(_) | Self::InvalidSchema(_))
    }
}

/// A registered schema, parsed once and ready for the hot path.
pub struct CompiledSchema {
    id: u32,
    json: Arc<str>,
    fast: serde_avro_fast::Schema,
    full_name: Option<Arc<str>>,
}

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledSchema")
            .field("id", &self.id)
            .finish()
    }
}

impl CompiledSchema {
    /// Parses `json` (an Avro schema) registered under `id`.
    pub fn new(id: u32, json: &str) -> Result<Self, CodecError> {
        let fast = json
            .parse::<serde_avro_fast::Schema>()
            .map_err(|e| CodecError::InvalidSchema(e.to_string()))?;
        let full_name = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| {
                let name = v.get("name")?.as_str()?;
                Some(match v.get("namespace").and_then(|n| n.as_str()) {
                    Some(ns) if !ns.is_empty() && !name.contains('.') => format!("{ns}.{name}"),
                    _ => name.to_owned(),
                })
            })
            .map(Arc::from);
        Ok(Self {
            id,
            json: Arc::from(json),
            fast,
            full_name,
        })
    }

    /// Full name (`namespace.name`) of a named top-level type.
    pub fn full_name(&self) -> Option<&str> {
        self.full_name.as_deref()
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The schema text as registered.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// An encoder that reuses its buffers across values; prefer it for batches.
    pub fn encoder(&self) -> Encoder<'_> {
        Encoder {
            id: self.id,
            config: SerializerConfig::new(&self.fast),
        }
    }

    /// Appends the Confluent frame of `value` to `out`.
    pub fn encode<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        self.encoder().encode(value, out)
    }

    /// Decodes an Avro body (without the frame header) written with this schema. The whole
    /// body must be consumed: trailing bytes are an error, not silently ignored.
    pub fn decode_body<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, CodecError> {
        let mut reader = ReaderRead::new(body);
        // A length prefix can never legitimately exceed the body it sits in.
        reader.max_alloc_size = body.len();
        let mut config = DeserializerConfig::new(&self.fast);
        config.allowed_depth = MAX_DEPTH;
        config.max_seq_size = body.len();
        let mut state = DeserializerState::with_config(reader, config);
        let value = T::deserialize(state.deserializer()).map_err(|e| self.decode_error(&e))?;
        let rest = state.into_reader().into_inner();
        if rest.is_empty() {
            Ok(value)
        } else {
            Err(CodecError::TrailingBytes {
                id: self.id,
                trailing: rest.len(),
            })
        }
    }

    fn decode_error(&self, e: &DeError) -> CodecError {
        let eof = e
            .io_error()
            .is_some_and(|io| io.kind() == ErrorKind::UnexpectedEof)
            || e.to_string().contains("end of slice")
            || e.to_string().contains("EOF");
        let detail = e.to_string();
        if eof {
            CodecError::Truncated {
                id: self.id,
                detail,
            }
        } else {
            CodecError::InvalidBody {
                id: self.id,
                detail,
            }
        }
    }
}

/// Encodes many values with one schema, reusing serializer buffers.
pub struct Encoder<'s> {
    id: u32,
    config: SerializerConfig<'s>,
}

impl std::fmt::Debug for Encoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("id", &self.id).finish()
    }
}

impl Encoder<'_> {
    /// Appends the Confluent frame of `value` to `out`. On error `out` is left as it was.
    pub fn encode<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let start = out.len();
        wire::write_header(out, self.id);
        match serde_avro_fast::to_datum(value, &mut *out, &mut self.config) {
            Ok(_) => Ok(()),
            Err(e) => {
                out.truncate(start);
                Err(CodecError::Encode {
                    id: self.id,
                    detail: e.to_string(),
                })
            }
        }
    }
}

/// Writer schemas known by id: decodes any Confluent frame whose schema it holds.
#[derive(Debug, Default, Clone)]
pub struct SchemaSet {
    by_id: HashMap<u32, Arc<CompiledSchema>>,
}

impl SchemaSet {
    pub fn insert(&mut self, schema: Arc<CompiledSchema>) {
        self.by_id.insert(schema.id(), schema);
    }

    pub fn get(&self, id: u32) -> Option<&Arc<CompiledSchema>> {
        self.by_id.get(&id)
    }

    /// Decodes a full Confluent frame.
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let frame = wire::split(bytes)?;
        let schema = self
            .get(frame.schema_id)
            .ok_or(CodecError::UnknownSchemaId(frame.schema_id))?;
        schema.decode_body(frame.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const SCHEMA: &str = r#"{"type":"record","name":"T","fields":[
        {"name":"id","type":{"type":"string","logicalType":"uuid"}},
        {"name":"n","type":"long"},
        {"name":"tags","type":{"type":"array","items":"string"}},
        {"name":"note","type":["null","string"],"default":null}]}"#;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct T {
        id: uuid::Uuid,
        n: i64,
        tags: Vec<String>,
        note: Option<String>,
    }

    fn sample() -> T {
        T {
            id: uuid::Uuid::now_v7(),
            n: -42,
            tags: vec!["a".into(), "bb".into()],
            note: Some("hi".into()),
        }
    }

    fn set() -> SchemaSet {
        let mut set = SchemaSet::default();
        set.insert(Arc::new(CompiledSchema::new(7, SCHEMA).expect("schema")));
        set
    }

    fn framed() -> Vec<u8> {
        let set = set();
        let mut buf = Vec::new();
        set.get(7)
            .expect("id 7")
            .encode(&sample(), &mut buf)
            .expect("encode");
        buf
    }

    #[test]
    fn round_trips_typed_value() {
        let set = set();
        let value = sample();
        let mut buf = Vec::new();
        set.get(7)
            .expect("id 7")
            .encode(&value, &mut buf)
            .expect("encode");
        assert_eq!(&buf[..5], &[0, 0, 0, 0, 7]);
        let back: T = set.decode(&buf).expect("decode");
        assert_eq!(back, value);
    }

    #[test]
    fn empty_input_is_a_frame_error() {
        let err = set().decode::<T>(&[]).expect_err("empty");
        assert!(matches!(err, CodecError::Frame(FrameError::Empty)), "{err}");
    }

    #[test]
    fn wrong_magic_is_a_frame_error() {
        let mut buf = framed();
        buf[0] = 1;
        let err = set().decode::<T>(&buf).expect_err("magic");
        assert!(
            matches!(err, CodecError::Frame(FrameError::WrongMagic(1))),
            "{err}"
        );
    }

    #[test]
    fn unknown_id_is_reported_as_such() {
        let mut buf = framed();
        buf[4] = 99;
        let err = set().decode::<T>(&buf).expect_err("id");
        assert!(matches!(err, CodecError::UnknownSchemaId(99)), "{err}");
        assert!(!err.is_poison());
    }

    #[test]
    fn truncated_body_is_reported_at_every_cut() {
        let buf = framed();
        for cut in 5..buf.len() {
            let err = set().decode::<T>(&buf[..cut]).expect_err("truncated");
            assert!(
                matches!(
                    err,
                    CodecError::Truncated { id: 7, .. } | CodecError::InvalidBody { id: 7, .. }
                ),
                "cut {cut}: {err}"
            );
            assert!(err.is_poison());
        }
        // Cutting inside the string payload must read as truncation, not as some other failure.
        let err = set()
            .decode::<T>(&buf[..buf.len() - 1])
            .expect_err("truncated");
        assert!(matches!(err, CodecError::Truncated { .. }), "{err}");
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        let mut buf = framed();
        buf.extend_from_slice(&[1, 2, 3]);
        let err = set().decode::<T>(&buf).expect_err("trailing");
        assert!(
            matches!(err, CodecError::TrailingBytes { id: 7, trailing: 3 }),
            "{err}"
        );
    }

    #[test]
    fn huge_length_prefix_does_not_allocate_or_panic() {
        // id, then a string length of ~2^62 as a zig-zag varint.
        let mut buf = vec![0, 0, 0, 0, 7];
        buf.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        let err = set().decode::<T>(&buf).expect_err("huge");
        assert!(err.is_poison(), "{err}");
    }

    #[test]
    fn encode_error_leaves_buffer_untouched() {
        #[derive(Serialize)]
        struct Wrong {
            id: u32,
        }
        let set = set();
        let mut buf = vec![9];
        let err = set
            .get(7)
            .expect("id 7")
            .encode(&Wrong { id: 1 }, &mut buf)
            .expect_err("mismatch");
        assert!(matches!(err, CodecError::Encode { id: 7, .. }), "{err}");
        assert_eq!(buf, vec![9]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let mut framed = vec![0, 0, 0, 0, 7];
            framed.extend_from_slice(&bytes);
            let _ = set().decode::<T>(&framed);
            let _ = set().decode::<T>(&bytes);
        }
    }
}
