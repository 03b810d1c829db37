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
    #[serde(with = "serde_bytes")]
    pub original: Vec<u8>,
    pub received_at: i64,
}
