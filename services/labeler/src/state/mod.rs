//! The `StateStore` port: the labeler's join state (impressions waiting for their windows to
//! close, and outcomes waiting for impressions), with adapters for local memory (made durable
//! by the labeler's [`checkpoint`]s), Postgres (the default) and ScyllaDB. `contract` is the
//! one test suite every adapter passes.
//!
//! Every write is an idempotent upsert keyed by record identity, so that replaying the log
//! from the last committed offsets over a state that already saw some of it changes nothing.
//! Deletions happen only for what a committed dataset already covers.

pub mod checkpoint;
pub mod contract;
pub mod memory;
pub mod postgres;
pub mod scylla;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    spec::Label,
    window::{Impression, Outcome},
};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store (Postgres): {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("state store (ScyllaDB): {0}")]
    Scylla(String),
    #[error("state store: corrupt entry: {0}")]
    Corrupt(String),
}

/// An impression in the join state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredImpression {
    pub example_id: Uuid,
    /// When the example closes (event time, ms).
    pub close_ms: i64,
    pub impression: Impression,
    /// The example's last committed version, once one was (see [`StateStore::put_emitted`]).
    #[serde(default)]
    pub emitted: Option<Emission>,
}

/// What the last committed version of an example said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emission {
    pub version: i32,
    /// [`Labeled::digest`](crate::window::Labeled::digest) of that version.
    pub digest: i64,
    pub label: Label,
}

/// An example's emission, for [`StateStore::put_emitted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emitted {
    pub example_id: Uuid,
    pub close_ms: i64,
    pub emission: Emission,
}

/// The emission outbox's encoding (`labeler.emission_outbox.emissions`): a format byte, then
/// per emission the example id (16 bytes), close time (8), version (4), digest (8) and label
/// (1), big-endian. Rows written as a JSON array by earlier versions still read.
const EMISSIONS_FORMAT: u8 = 1;
const EMISSION_BYTES: usize = 16 + 8 + 4 + 8 + 1;

pub fn encode_emissions(items: &[Emitted]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + items.len() * EMISSION_BYTES);
    out.push(EMISSIONS_FORMAT);
    for e in items {
        out.extend_from_slice(e.example_id.as_bytes());
        out.extend_from_slice(&e.close_ms.to_be_bytes());
        out.extend_from_slice(&e.emission.version.to_be_bytes());
        out.extend_from_slice(&e.emission.digest.to_be_bytes());
        out.push(match e.emission.label {
            Label::Positive => 0,
            Label::Negative => 1,
            Label::Unknown => 2,
        });
    }
    out
}

pub fn decode_emissions(bytes: &[u8]) -> Result<Vec<Emitted>, StateError> {
    let corrupt = |m: &str| StateError::Corrupt(format!("emission outbox: {m}"));
    match bytes.split_first() {
        Some((b'[', _)) => serde_json::from_slice(bytes).map_err(|e| corrupt(&e.to_string())),
        Some((&EMISSIONS_FORMAT, body)) => {
            if body.len() % EMISSION_BYTES != 0 {
                return Err(corrupt("truncated entry"));
            }
            body.chunks_exact(EMISSION_BYTES)
                .map(|c| {
                    let (id, rest) = c.split_at(16);
                    let (close, rest) = rest.split_at(8);
                    let (version, rest) = rest.split_at(4);
                    let (digest, label) = rest.split_at(8);
                    let array = |b: &[u8]| <[u8; 8]>::try_from(b).map_err(|_| corrupt("entry"));
                    Ok(Emitted {
                        example_id: Uuid::from_slice(id).map_err(|e| corrupt(&e.to_string()))?,
                        close_ms: i64::from_be_bytes(array(close)?),
                        emission: Emission {
                            version: i32::from_be_bytes(
                                <[u8; 4]>::try_from(version).map_err(|_| corrupt("entry"))?,
                            ),
                            digest: i64::from_be_bytes(array(digest)?),
                            label: match label {
                                [0] => Label::Positive,
                                [1] => Label::Negative,
                                [2] => Label::Unknown,
                                _ => return Err(corrupt("unknown label")),
                            },
                        },
                    })
                })
                .collect()
        }
        Some((other, _)) => Err(corrupt(&format!("unknown format {other}"))),
        None => Ok(Vec::new()),
    }
}

/// A position in close order: impressions strictly after it are returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CloseCursor {
    pub close_ms: i64,
    pub example_id: Uuid,
}

impl CloseCursor {
    /// Before every impression closing after `close_ms`.
    pub fn after(close_ms: i64) -> Self {
        Self {
            close_ms,
            example_id: Uuid::max(),
        }
    }
}

/// The join state of every dataset, namespaced by dataset name.
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Upserts impressions by example id.
    async fn put_impressions(
        &self,
        dataset: &str,
        items: Vec<StoredImpression>,
    ) -> Result<(), StateError>;

    /// Records the committed version of examples whose impressions are in the state (others
    /// are skipped): later reads of the impression carry it. Written only after the commit
    /// that emitted the version (the labeler keeps them in its commit's outbox until then).
    async fn put_emitted(&self, dataset: &str, items: &[Emitted]) -> Result<(), StateError>;

    /// Upserts outcomes by (join key, name, id).
    async fn put_outcomes(&self, dataset: &str, items: Vec<Outcome>) -> Result<(), StateError>;

    /// Impressions with `from < (close, id)` and `close <= upto_ms`, in (close, id) order, at
    /// most `limit`.
    async fn due_impressions(
        &self,
        dataset: &str,
        from: CloseCursor,
        upto_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredImpression>, StateError>;

    /// Impressions that have any of `keys`.
    async fn impressions_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<StoredImpression>, StateError>;

    /// Outcomes with any of `keys`.
    async fn outcomes_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<Outcome>, StateError>;

    /// Forgets impressions that closed before `impressions_closed_before` and outcomes whose
    /// event time is before `outcomes_before`; returns how many entries went.
    async fn expire(
        &self,
        dataset: &str,
        impressions_closed_before: i64,
        outcomes_before: i64,
    ) -> Result<u64, StateError>;

    /// Erasure: deletes every impression and outcome, of every dataset, that names one of
    /// `users`; returns how many entries went.
    async fn purge_users(&self, users: &[String]) -> Result<u64, StateError>;

    /// A store that holds the state in this process, which the labeler then makes durable with
    /// [`checkpoint`]s; `None` for a store that is durable on its own.
    fn local(&self) -> Option<&dyn LocalState> {
        None
    }
}

/// Join state held in this process: the labeler resets it and restores it from the committed
/// checkpoint at every start, and writes what changed into a segment at every commit.
pub trait LocalState: Send + Sync {
    /// Forgets `dataset`'s state and its change log.
    fn reset(&self, dataset: &str);

    /// Applies a segment of the committed checkpoint (in order); leaves no change logged.
    fn apply(&self, dataset: &str, segment: checkpoint::Segment);

    /// What changed since the last call, or the whole state (`full`), encoded as a segment with
    /// `emitted` (what the commit emits); starts a new change log.
    fn take(&self, dataset: &str, full: bool, emitted: &[Emitted]) -> checkpoint::Taken;

    /// Entries (impressions and outcomes) in `dataset`'s state.
    fn live(&self, dataset: &str) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Emitted> {
        [Label::Positive, Label::Negative, Label::Unknown]
            .into_iter()
            .enumerate()
            .map(|(n, label)| Emitted {
                example_id: Uuid::from_u128(0x1234_5678_9abc_def0_u128 << n),
                close_ms: -5 + n as i64 * 1_795_132_800_000,
                emission: Emission {
                    version: n as i32 + 1,
                    digest: i64::MAX - n as i64,
                    label,
                },
            })
            .collect()
    }

    #[test]
    fn emissions_round_trip_and_read_the_json_of_earlier_versions() {
        let items = sample();
        let bytes = encode_emissions(&items);
        assert_eq!(bytes.len(), 1 + 3 * EMISSION_BYTES);
        assert_eq!(decode_emissions(&bytes).unwrap(), items);
        let json = serde_json::to_vec(&items).unwrap();
        assert_eq!(decode_emissions(&json).unwrap(), items);
        assert!(decode_emissions(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_emissions(&[9, 0]).is_err());
        assert_eq!(decode_emissions(&[]).unwrap(), Vec::new());
    }
}
