//! The `StateStore` port: the labeler's join state (impressions waiting for their windows to
//! close, and outcomes waiting for impressions), with adapters for memory (tests), Postgres
//! (the default) and ScyllaDB (scale-out). `contract` is the one test suite every adapter
//! passes.
//!
//! Every write is an idempotent upsert keyed by record identity, so that replaying the log
//! from the last committed offsets over a state that already saw some of it changes nothing.
//! Deletions happen only for what a committed dataset already covers.

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
        items: &[StoredImpression],
    ) -> Result<(), StateError>;

    /// Records the committed version of examples whose impressions are in the state (others
    /// are skipped): later reads of the impression carry it. Written only after the commit
    /// that emitted the version (the labeler keeps them in its commit's outbox until then).
    async fn put_emitted(&self, dataset: &str, items: &[Emitted]) -> Result<(), StateError>;

    /// Upserts outcomes by (join key, name, id).
    async fn put_outcomes(&self, dataset: &str, items: &[Outcome]) -> Result<(), StateError>;

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
}
