//! Postgres `StateStore` (the default): tables `labeler.impressions` and `labeler.outcomes`
//! (migration `20261128000004_labeler.sql`), batched writes with `UNNEST`.

use async_trait::async_trait;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{CloseCursor, Emitted, StateError, StateStore, StoredImpression};
use crate::window::{Impression, Outcome};

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Every outcome of `dataset` (to move a dataset's state to another store).
    pub async fn all_outcomes(&self, dataset: &str) -> Result<Vec<Outcome>, StateError> {
        let rows = sqlx::query("SELECT payload FROM labeler.outcomes WHERE dataset = $1")
            .bind(dataset)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| decode::<Outcome>(&r.try_get::<Vec<u8>, _>("payload")?))
            .collect()
    }

    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(value).map_err(|e| StateError::Corrupt(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt(e.to_string()))
}

fn impressions(rows: Vec<sqlx::postgres::PgRow>) -> Result<Vec<StoredImpression>, StateError> {
    rows.into_iter()
        .map(|r| {
            let id: String = r.try_get("example_id")?;
            let example_id =
                Uuid::parse_str(&id).map_err(|e| StateError::Corrupt(e.to_string()))?;
            let payload: Vec<u8> = r.try_get("payload")?;
            let emitted: Option<Vec<u8>> = r.try_get("emitted")?;
            Ok(StoredImpression {
                example_id,
                close_ms: r.try_get("close_ms")?,
                impression: decode::<Impression>(&payload)?,
                emitted: emitted.as_deref().map(decode).transpose()?,
            })
        })
        .collect()
}

/// Postgres arrays of arrays must be rectangular; keys and users travel as one string each,
/// split on the unit separator.
fn joined(parts: &[String]) -> String {
    parts.join("\u{1e}")
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn put_impressions(
        &self,
        dataset: &str,
        items: Vec<StoredImpression>,
    ) -> Result<(), StateError> {
        let items = items.as_slice();
        if items.is_empty() {
            return Ok(());
        }
        // ON CONFLICT cannot touch one row twice in a statement: the last copy of each wins.
        let mut unique: Vec<&StoredImpression> = Vec::with_capacity(items.len());
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        for i in items.iter().rev() {
            if seen.insert(i.example_id) {
                unique.push(i);
            }
        }
        let items = unique;
        let mut ids = Vec::with_capacity(items.len());
        let mut closes = Vec::with_capacity(items.len());
        let mut keys = Vec::with_capacity(items.len());
        let mut users = Vec::with_capacity(items.len());
        let mut payloads = Vec::with_capacity(items.len());
        for i in items {
            ids.push(i.example_id.to_string());
            closes.push(i.close_ms);
            keys.push(joined(&i.impression.keys()));
            users.push(joined(&i.impression.users()));
            payloads.push(encode(&i.impression)?);
        }
        sqlx::query(
            "INSERT INTO labeler.impressions (dataset, example_id, close_ms, keys, users, payload)
             SELECT $1, id::uuid, close_ms, string_to_array(keys, E'\\x1e'),
                    string_to_array(users, E'\\x1e'), payload
             FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[], $6::bytea[])
                  AS t(id, close_ms, keys, users, payload)
             ON CONFLICT (dataset, example_id) DO UPDATE
             SET close_ms = EXCLUDED.close_ms, keys = EXCLUDED.keys, users = EXCLUDED.users,
                 payload = EXCLUDED.payload",
        )
        .bind(dataset)
        .bind(&ids)
        .bind(&closes)
        .bind(&keys)
        .bind(&users)
        .bind(&payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn put_emitted(&self, dataset: &str, items: &[Emitted]) -> Result<(), StateError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(items.len());
        let mut emissions = Vec::with_capacity(items.len());
        // ON CONFLICT cannot touch one row twice in a statement: the last copy of each wins.
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        let mut closes = Vec::with_capacity(items.len());
        for e in items.iter().rev() {
            if seen.insert(e.example_id) {
                ids.push(e.example_id.to_string());
                closes.push(e.close_ms);
                emissions.push(encode(&e.emission)?);
            }
        }
        sqlx::query(
            "INSERT INTO labeler.emissions (dataset, example_id, close_ms, emitted)
             SELECT $1, t.id::uuid, t.close_ms, t.emitted
             FROM UNNEST($2::text[], $3::bigint[], $4::bytea[]) AS t(id, close_ms, emitted)
             WHERE EXISTS (SELECT 1 FROM labeler.impressions i
                           WHERE i.dataset = $1 AND i.example_id = t.id::uuid)
             ON CONFLICT (dataset, example_id) DO UPDATE
             SET close_ms = EXCLUDED.close_ms, emitted = EXCLUDED.emitted",
        )
        .bind(dataset)
        .bind(&ids)
        .bind(&closes)
        .bind(&emissions)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn put_outcomes(&self, dataset: &str, items: Vec<Outcome>) -> Result<(), StateError> {
        let items = items.as_slice();
        if items.is_empty() {
            return Ok(());
        }
        // ON CONFLICT cannot touch one row twice in a statement: drop repeats first.
        let mut unique: Vec<&Outcome> = items.iter().collect();
        unique.sort_by(|a, b| (&a.join_key, &a.name, &a.id).cmp(&(&b.join_key, &b.name, &b.id)));
        unique.dedup_by(|a, b| a.join_key == b.join_key && a.name == b.name && a.id == b.id);
        let mut keys = Vec::with_capacity(unique.len());
        let mut names = Vec::with_capacity(unique.len());
        let mut ids = Vec::with_capacity(unique.len());
        let mut times = Vec::with_capacity(unique.len());
        let mut users = Vec::with_capacity(unique.len());
        let mut payloads = Vec::with_capacity(unique.len());
        for o in unique {
            keys.push(o.join_key.clone());
            names.push(o.name.clone());
            ids.push(o.id.clone());
            times.push(o.time_ms);
            users.push(joined(&o.users));
            payloads.push(encode(o)?);
        }
        sqlx::query(
            "INSERT INTO labeler.outcomes (dataset, join_key, name, outcome_id, time_ms, users, payload)
             SELECT $1, k, n, i, t, CASE WHEN u = '' THEN '{}'::text[] ELSE string_to_array(u, E'\\x1e') END, p
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bytea[])
                  AS x(k, n, i, t, u, p)
             ON CONFLICT (dataset, join_key, name, outcome_id) DO NOTHING",
        )
        .bind(dataset)
        .bind(&keys)
        .bind(&names)
        .bind(&ids)
        .bind(&times)
        .bind(&users)
        .bind(&payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn due_impressions(
        &self,
        dataset: &str,
        from: CloseCursor,
        upto_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredImpression>, StateError> {
        let rows = sqlx::query(
            "SELECT i.example_id::text AS example_id, i.close_ms, i.payload, e.emitted
             FROM labeler.impressions i
             LEFT JOIN labeler.emissions e ON e.dataset = i.dataset AND e.example_id = i.example_id
             WHERE i.dataset = $1 AND (i.close_ms, i.example_id) > ($2, $3::uuid) AND i.close_ms <= $4
             ORDER BY i.close_ms, i.example_id LIMIT $5",
        )
        .bind(dataset)
        .bind(from.close_ms)
        .bind(from.example_id.to_string())
        .bind(upto_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        impressions(rows)
    }

    async fn impressions_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<StoredImpression>, StateError> {
        let rows = sqlx::query(
            "SELECT i.example_id::text AS example_id, i.close_ms, i.payload, e.emitted
             FROM labeler.impressions i
             LEFT JOIN labeler.emissions e ON e.dataset = i.dataset AND e.example_id = i.example_id
             WHERE i.dataset = $1 AND i.keys && $2::text[] ORDER BY i.example_id",
        )
        .bind(dataset)
        .bind(keys)
        .fetch_all(&self.pool)
        .await?;
        impressions(rows)
    }

    async fn outcomes_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<Outcome>, StateError> {
        let rows = sqlx::query(
            "SELECT payload FROM labeler.outcomes WHERE dataset = $1 AND join_key = ANY($2)",
        )
        .bind(dataset)
        .bind(keys)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| decode::<Outcome>(&r.try_get::<Vec<u8>, _>("payload")?))
            .collect()
    }

    async fn expire(
        &self,
        dataset: &str,
        impressions_closed_before: i64,
        outcomes_before: i64,
    ) -> Result<u64, StateError> {
        sqlx::query("DELETE FROM labeler.emissions WHERE dataset = $1 AND close_ms < $2")
            .bind(dataset)
            .bind(impressions_closed_before)
            .execute(&self.pool)
            .await?;
        let a = sqlx::query("DELETE FROM labeler.impressions WHERE dataset = $1 AND close_ms < $2")
            .bind(dataset)
            .bind(impressions_closed_before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let b = sqlx::query("DELETE FROM labeler.outcomes WHERE dataset = $1 AND time_ms < $2")
            .bind(dataset)
            .bind(outcomes_before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(a + b)
    }

    async fn purge_users(&self, users: &[String]) -> Result<u64, StateError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM labeler.emissions e USING labeler.impressions i
             WHERE i.users && $1::text[] AND e.dataset = i.dataset AND e.example_id = i.example_id",
        )
        .bind(users)
        .execute(&mut *tx)
        .await?;
        let a = sqlx::query("DELETE FROM labeler.impressions WHERE users && $1::text[]")
            .bind(users)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let b = sqlx::query("DELETE FROM labeler.outcomes WHERE users && $1::text[]")
            .bind(users)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(a + b)
    }
}
