//! Erasure records (`feedloop.erasure.requests`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `io.feedloop.erasure.ErasureOrigin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureOrigin {
    Api,
    CdcDelete,
    CdcSoftDelete,
    #[serde(other)]
    Other,
}

/// `io.feedloop.erasure.ErasureRequest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErasureRequest {
    pub request_id: Uuid,
    pub user_ids: Vec<String>,
    pub reason: String,
    pub requested_by: String,
    pub origin: ErasureOrigin,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub requested_at: i64,
    pub deadline_at: i64,
}

/// Default time allowed to complete an erasure: 30 days.
pub const DEFAULT_DEADLINE_MS: i64 = 30 * 86_400_000;
