//! Dead-letter records (`feedloop.deadletter`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `io.feedloop.deadletter.DeadLetterReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    SchemaViolation,
    SizeViolation,
    ProtocolViolation,
    UnknownEventType,
    DecodeFailure,
    ProcessingFailure,
    #[serde(other)]
    Other,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SchemaViolation => "schema_violation",
            Self::SizeViolation => "size_violation",
            Self::ProtocolViolation => "protocol_violation",
            Self::UnknownEventType => "unknown_event_type",
            Self::DecodeFailure => "decode_failure",
            Self::ProcessingFailure => "processing_failure",
            Self::Other => "other",
        }
    }
}

/// `io.feedloop.deadletter.DeadLetter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub dead_letter_id: Uuid,
    pub service: String,
    pub reason: DeadLetterReason,
    pub detail: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub event_type: Option<String>,
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub app_id: Option<String>,
    #[serde(default)]
    pub source_topic: Option<String>,
    #[serde(default)]
    pub source_partition: Option<i32>,
    #[serde(default)]
    pub source_offset: Option<i64>,
    /// At most [`ORIGINAL_MAX_BYTES`] of the input: build it with [`Original::keep`].
    #[serde(with = "serde_bytes")]
    pub original: Vec<u8>,
    pub received_at: i64,
    /// The whole input's length; `original` holds only its first bytes when this is larger.
    #[serde(default)]
    pub original_size: Option<i64>,
    /// SHA-256 of the whole input, lowercase hex.
    #[serde(default)]
    pub original_sha256: Option<String>,
}

impl DeadLetter {
    /// A dead letter, with a fresh id, about `input`: it keeps at most [`ORIGINAL_MAX_BYTES`]
    /// of it, with its length and digest. What else is known of the input (its path, event,
    /// app or source record) the caller fills in.
    pub fn new(
        service: &str,
        reason: DeadLetterReason,
        detail: impl Into<String>,
        input: &[u8],
        received_at: i64,
    ) -> Self {
        let kept = Original::keep(input);
        Self {
            dead_letter_id: Uuid::now_v7(),
            service: service.to_owned(),
            reason,
            detail: detail.into(),
            path: None,
            event_type: None,
            event_id: None,
            app_id: None,
            source_topic: None,
            source_partition: None,
            source_offset: None,
            original: kept.bytes,
            received_at,
            original_size: Some(kept.size),
            original_sha256: Some(kept.sha256),
        }
    }
}

/// The most of an input's bytes a dead letter keeps. A dead letter must always fit what the
/// broker accepts (librdkafka's `message.max.bytes` is 1,000,000 by default): one carrying a
/// whole oversized input would itself be refused, and whatever produced it would be stuck.
pub const ORIGINAL_MAX_BYTES: usize = 64 * 1024;

/// What a dead letter keeps of its input: a prefix, the full length and the digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    pub bytes: Vec<u8>,
    pub size: i64,
    pub sha256: String,
}

impl Original {
    /// The first [`ORIGINAL_MAX_BYTES`] of `input`, its length and its SHA-256.
    pub fn keep(input: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        use std::fmt::Write;
        let digest = Sha256::digest(input);
        let mut sha256 = String::with_capacity(64);
        for b in digest {
            let _ = write!(sha256, "{b:02x}");
        }
        Self {
            bytes: input[..input.len().min(ORIGINAL_MAX_BYTES)].to_vec(),
            size: i64::try_from(input.len()).unwrap_or(i64::MAX),
            sha256,
        }
    }

    /// Whether the input was longer than what is kept.
    pub fn truncated(&self) -> bool {
        usize::try_from(self.size).map_or(true, |n| n > self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_small_inputs_whole_and_large_ones_as_a_prefix_with_length_and_digest() {
        let small = Original::keep(b"abc");
        assert_eq!(small.bytes, b"abc");
        assert_eq!(small.size, 3);
        // FIPS 180-2's test vector for "abc".
        assert_eq!(
            small.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!small.truncated());

        let big = vec![7u8; 1 << 20];
        let kept = Original::keep(&big);
        assert_eq!(kept.bytes.len(), ORIGINAL_MAX_BYTES);
        assert_eq!(kept.bytes, big[..ORIGINAL_MAX_BYTES]);
        assert_eq!(kept.size, 1 << 20);
        assert!(kept.truncated());
        assert_eq!(kept.sha256, Original::keep(&big).sha256);
        assert_ne!(kept.sha256, Original::keep(&big[1..]).sha256);
    }
}
