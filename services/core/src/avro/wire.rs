//! The Confluent wire format: magic byte 0, a 4-byte big-endian schema id, then the Avro body.
//!
//! Pure functions of bytes; no IO.

/// The only magic byte the Confluent wire format defines.
pub const MAGIC: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// Why a byte string is not a Confluent frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty record: a Confluent-framed Avro value has at least {HEADER_LEN} bytes")]
    Empty,
    #[error("wrong magic byte {0:#04x}: expected 0x00 (Confluent wire format)")]
    WrongMagic(u8),
    #[error("truncated frame header: {0} bytes, need {HEADER_LEN}")]
    TruncatedHeader(usize),
}

/// A frame split into its schema id and Avro body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub schema_id: u32,
    pub body: &'a [u8],
}

/// Splits a Confluent frame. The body is not checked here; the codec does that against the
/// writer schema.
pub fn split(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
    match bytes {
        [] => Err(FrameError::Empty),
        [magic, ..] if *magic != MAGIC => Err(FrameError::WrongMagic(*magic)),
        [_, a, b, c, d, body @ ..] => Ok(Frame {
            schema_id: u32::from_be_bytes([*a, *b, *c, *d]),
            body,
        }),
        short => Err(FrameError::TruncatedHeader(short.len())),
    }
}

/// Appends the frame header for `schema_id` to `buf`.
pub fn write_header(buf: &mut Vec<u8>, schema_id: u32) {
    buf.push(MAGIC);
    buf.extend_from_slice(&schema_id.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_header() {
        let mut buf = Vec::new();
        write_header(&mut buf, 0x0102_0304);
        buf.extend_from_slice(b"body");
        let frame = split(&buf).expect("valid frame");
        assert_eq!(frame.schema_id, 0x0102_0304);
        assert_eq!(frame.body, b"body");
    }

    #[test]
    fn rejects_bad_frames_with_typed_errors() {
        assert_eq!(split(&[]), Err(FrameError::Empty));
        assert_eq!(split(&[1, 0, 0, 0, 1]), Err(FrameError::WrongMagic(1)));
        assert_eq!(split(&[0, 0, 0]), Err(FrameError::TruncatedHeader(3)));
    }

    #[test]
    fn header_only_frame_has_empty_body() {
        let frame = split(&[0, 0, 0, 0, 7]).expect("valid frame");
        assert_eq!(frame.schema_id, 7);
        assert!(frame.body.is_empty());
    }
}
