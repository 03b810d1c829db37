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
    /// Whose data key `original` is sealed with ([`DeadLetter::seal`]): the user the input was
    /// about, or the day's unattributed key ([`crate::crypto::unattributed_owner`]). `None`:
    /// in the clear (written before dead letters were sealed).
    #[serde(default)]
    pub sealed_by: Option<String>,
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
            sealed_by: None,
        }
    }

    /// Seals `original` with the data key of `owner` (the user the input is about, when known)
    /// or else with today's unattributed key, so that erasing the user — or the unattributed
    /// key's expiry — makes it unreadable. An owner whose key is destroyed (an erased user)
    /// keeps nothing of the input but its length and digest.
    pub async fn seal(
        mut self,
        keys: &crate::crypto::KeyCache,
        owner: Option<&str>,
        now_ms: i64,
    ) -> Result<Self, crate::crypto::CryptoError> {
        let owner = match owner.filter(|o| !o.is_empty()) {
            Some(o) => o.to_owned(),
            None => crate::crypto::unattributed_owner(now_ms),
        };
        self.original = match keys.sealing_key(&owner).await? {
            Some(key) => crate::crypto::seal_bytes(&key, &owner, &self.original)?,
            None => Vec::new(),
        };
        self.sealed_by = Some(owner);
        Ok(self)
    }

    /// The original bytes, opened with the key of [`DeadLetter::sealed_by`] (`key`: that key
    /// from the store, `None` if destroyed).
    pub fn open(&self, key: Option<&crate::crypto::DataKey>) -> OpenedOriginal {
        let Some(owner) = &self.sealed_by else {
            return OpenedOriginal::Clear(self.original.clone());
        };
        match key {
            None => OpenedOriginal::Erased,
            Some(_) if self.original.is_empty() => OpenedOriginal::Erased,
            Some(k) => crate::crypto::open_bytes(k, owner, &self.original)
                .map_or(OpenedOriginal::Invalid, OpenedOriginal::Clear),
        }
    }
}

/// A dead letter's original bytes, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenedOriginal {
    /// Decrypted, or never sealed.
    Clear(Vec<u8>),
    /// Its key is destroyed (the user was erased, or the unattributed key expired).
    Erased,
    /// Sealed, but not by that key, or tampered with.
    Invalid,
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
    use crate::crypto::{KeyCache, KeyStore, MemoryKeyStore};
    use std::{sync::Arc, time::Duration};

    #[tokio::test]
    async fn sealed_originals_open_with_their_owners_key_until_it_is_destroyed() {
        let store = Arc::new(MemoryKeyStore::default());
        let keys = KeyCache::new(store.clone(), Duration::from_millis(1));
        let input = br#"{"user_id":"u1","properties":{"comment":"call me on +33 6 12"}}"#;
        let now = 1_765_000_000_000;
        let dl = DeadLetter::new(
            "collector",
            DeadLetterReason::SchemaViolation,
            "bad",
            input,
            now,
        )
        .seal(&keys, Some("u1"), now)
        .await
        .unwrap();
        assert_eq!(dl.sealed_by.as_deref(), Some("u1"));
        assert!(!dl.original.windows(6).any(|w| w == b"+33 6 "), "sealed");
        let key = store.get("u1").await.unwrap();
        assert_eq!(dl.open(key.as_ref()), OpenedOriginal::Clear(input.to_vec()));
        // Another user's key does not open it.
        let other = store.get_or_create("u2").await.unwrap();
        assert_eq!(dl.open(other.as_ref()), OpenedOriginal::Invalid);
        // Unknown owner: today's unattributed key.
        let anon = DeadLetter::new(
            "collector",
            DeadLetterReason::ProtocolViolation,
            "bad",
            b"{",
            now,
        )
        .seal(&keys, None, now)
        .await
        .unwrap();
        let day = crate::crypto::unattributed_owner(now);
        assert_eq!(anon.sealed_by.as_deref(), Some(day.as_str()));
        assert!(day.starts_with(crate::crypto::UNATTRIBUTED_PREFIX) && day.ends_with("2025-12-06"));
        let k = store.get(&day).await.unwrap();
        assert_eq!(anon.open(k.as_ref()), OpenedOriginal::Clear(b"{".to_vec()));
        // Erased: the key is gone, and a letter sealed afterwards keeps nothing of its input.
        store.destroy(&["u1".into()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(dl.open(None), OpenedOriginal::Erased);
        let after = DeadLetter::new(
            "collector",
            DeadLetterReason::SchemaViolation,
            "bad",
            input,
            now,
        )
        .seal(&keys, Some("u1"), now)
        .await
        .unwrap();
        assert!(after.original.is_empty());
        assert_eq!(after.original_size, Some(input.len() as i64));
        assert_eq!(after.open(None), OpenedOriginal::Erased);
    }

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
