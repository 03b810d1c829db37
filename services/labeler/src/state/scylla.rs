//! ScyllaDB `StateStore`, for join state beyond one Postgres. Tables are partitioned so that
//! every read and write touches one partition (or a few time buckets), and everything is
//! written with a TTL so that state nobody expires explicitly still goes away:
//!
//! - `impressions ((dataset, example_id))`: the impression itself, and what its example's last
//!   committed version said (`emitted`);
//! - `impressions_by_close ((dataset, bucket), close_ms, example_id)`: due scans, one hour
//!   per partition; `close_buckets ((dataset), bucket)` lists the buckets in use;
//! - `impressions_by_key ((dataset, join_key), example_id)`: lookups for late outcomes;
//! - `outcomes ((dataset, join_key), name, outcome_id)`: outcomes waiting for impressions;
//! - `outcomes_by_time ((dataset, bucket), time_ms, join_key, name, outcome_id)` and
//!   `outcome_buckets ((dataset), bucket)`: expiry by event time;
//! - `by_user ((user_id), dataset, kind, entry)`: what to purge for an erased user.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use scylla::{
    client::{session::Session, session_builder::SessionBuilder},
    statement::prepared::PreparedStatement,
};
use uuid::Uuid;

use super::{CloseCursor, Emitted, StateError, StateStore, StoredImpression};
use crate::window::{Impression, Outcome};

const BUCKET_MS: i64 = 3_600_000;

fn bucket(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS)
}

fn err(e: impl std::fmt::Display) -> StateError {
    StateError::Scylla(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(v).map_err(|e| StateError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(b).map_err(|e| StateError::Corrupt(e.to_string()))
}

struct Statements {
    put_impression: PreparedStatement,
    put_emitted: PreparedStatement,
    put_by_close: PreparedStatement,
    put_close_bucket: PreparedStatement,
    put_by_key: PreparedStatement,
    put_outcome: PreparedStatement,
    put_by_time: PreparedStatement,
    put_outcome_bucket: PreparedStatement,
    put_by_user: PreparedStatement,
    get_impression: PreparedStatement,
    close_buckets: PreparedStatement,
    due: PreparedStatement,
    by_key: PreparedStatement,
    outcomes: PreparedStatement,
    outcome_buckets: PreparedStatement,
    by_time: PreparedStatement,
    by_user: PreparedStatement,
    del_impression: PreparedStatement,
    del_by_close: PreparedStatement,
    del_by_key: PreparedStatement,
    del_outcome: PreparedStatement,
    del_by_time: PreparedStatement,
    del_by_user: PreparedStatement,
    del_close_bucket: PreparedStatement,
    del_outcome_bucket: PreparedStatement,
    get_outcome: PreparedStatement,
}

pub struct ScyllaStore {
    session: Session,
    st: Statements,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore").finish_non_exhaustive()
    }
}

/// Entries expire on their own after this long (the explicit expiry usually comes first).
const TTL_SECONDS: i32 = 8 * 24 * 3600;

impl ScyllaStore {
    /// Connects, creates the keyspace and tables if missing, and prepares every statement.
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        replication_factor: u32,
    ) -> Result<Self, StateError> {
        if keyspace.is_empty()
            || !keyspace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(StateError::Scylla(format!(
                "keyspace `{keyspace}`: letters, digits and _ only"
            )));
        }
        let session = SessionBuilder::new()
            .known_nodes(nodes)
            .build()
            .await
            .map_err(err)?;
        let ks = keyspace;
        let ddl = [
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', 'replication_factor': {replication_factor}}}"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.impressions (dataset text, example_id uuid, close_ms bigint, payload blob, emitted blob, PRIMARY KEY ((dataset, example_id)))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.impressions_by_close (dataset text, bucket bigint, close_ms bigint, example_id uuid, PRIMARY KEY ((dataset, bucket), close_ms, example_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.close_buckets (dataset text, bucket bigint, PRIMARY KEY ((dataset), bucket))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.impressions_by_key (dataset text, join_key text, example_id uuid, PRIMARY KEY ((dataset, join_key), example_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.outcomes (dataset text, join_key text, name text, outcome_id text, time_ms bigint, payload blob, PRIMARY KEY ((dataset, join_key), name, outcome_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.outcomes_by_time (dataset text, bucket bigint, time_ms bigint, join_key text, name text, outcome_id text, PRIMARY KEY ((dataset, bucket), time_ms, join_key, name, outcome_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.outcome_buckets (dataset text, bucket bigint, PRIMARY KEY ((dataset), bucket))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.by_user (user_id text, dataset text, kind text, entry text, PRIMARY KEY ((user_id), dataset, kind, entry))"
            ),
        ];
        for stmt in ddl {
            session.query_unpaged(stmt, &[]).await.map_err(err)?;
        }
        // Tables created before `emitted` existed get it; where it exists already this fails,
        // and a real failure shows when the statements below are prepared.
        if let Err(e) = session
            .query_unpaged(
                format!("ALTER TABLE {ks}.impressions ADD emitted blob"),
                &[],
            )
            .await
        {
            tracing::debug!(error = %e, "impressions.emitted not added (it exists)");
        }
        let p = |q: String| {
            let session = &session;
            async move { session.prepare(q).await.map_err(err) }
        };
        let ttl = TTL_SECONDS;
        let st = Statements {
            put_impression: p(format!("INSERT INTO {ks}.impressions (dataset, example_id, close_ms, payload) VALUES (?, ?, ?, ?) USING TTL {ttl}")).await?,
            put_by_close: p(format!("INSERT INTO {ks}.impressions_by_close (dataset, bucket, close_ms, example_id) VALUES (?, ?, ?, ?) USING TTL {ttl}")).await?,
            put_close_bucket: p(format!("INSERT INTO {ks}.close_buckets (dataset, bucket) VALUES (?, ?) USING TTL {ttl}")).await?,
            put_by_key: p(format!("INSERT INTO {ks}.impressions_by_key (dataset, join_key, example_id) VALUES (?, ?, ?) USING TTL {ttl}")).await?,
            put_outcome: p(format!("INSERT INTO {ks}.outcomes (dataset, join_key, name, outcome_id, time_ms, payload) VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL {ttl}")).await?,
            put_by_time: p(format!("INSERT INTO {ks}.outcomes_by_time (dataset, bucket, time_ms, join_key, name, outcome_id) VALUES (?, ?, ?, ?, ?, ?) USING TTL {ttl}")).await?,
            put_outcome_bucket: p(format!("INSERT INTO {ks}.outcome_buckets (dataset, bucket) VALUES (?, ?) USING TTL {ttl}")).await?,
            put_by_user: p(format!("INSERT INTO {ks}.by_user (user_id, dataset, kind, entry) VALUES (?, ?, ?, ?) USING TTL {ttl}")).await?,
            put_emitted: p(format!("UPDATE {ks}.impressions USING TTL {ttl} SET emitted = ? WHERE dataset = ? AND example_id = ?")).await?,
            get_impression: p(format!("SELECT close_ms, payload, emitted FROM {ks}.impressions WHERE dataset = ? AND example_id = ?")).await?,
            close_buckets: p(format!("SELECT bucket FROM {ks}.close_buckets WHERE dataset = ? AND bucket >= ? AND bucket <= ?")).await?,
            due: p(format!("SELECT close_ms, example_id FROM {ks}.impressions_by_close WHERE dataset = ? AND bucket = ? AND (close_ms, example_id) > (?, ?) AND close_ms <= ? LIMIT ?")).await?,
            by_key: p(format!("SELECT example_id FROM {ks}.impressions_by_key WHERE dataset = ? AND join_key = ?")).await?,
            outcomes: p(format!("SELECT payload FROM {ks}.outcomes WHERE dataset = ? AND join_key = ?")).await?,
            outcome_buckets: p(format!("SELECT bucket FROM {ks}.outcome_buckets WHERE dataset = ? AND bucket <= ?")).await?,
            by_time: p(format!("SELECT time_ms, join_key, name, outcome_id FROM {ks}.outcomes_by_time WHERE dataset = ? AND bucket = ? AND time_ms < ?")).await?,
            by_user: p(format!("SELECT dataset, kind, entry FROM {ks}.by_user WHERE user_id = ?")).await?,
            del_impression: p(format!("DELETE FROM {ks}.impressions WHERE dataset = ? AND example_id = ?")).await?,
            del_by_close: p(format!("DELETE FROM {ks}.impressions_by_close WHERE dataset = ? AND bucket = ? AND close_ms = ? AND example_id = ?")).await?,
            del_by_key: p(format!("DELETE FROM {ks}.impressions_by_key WHERE dataset = ? AND join_key = ? AND example_id = ?")).await?,
            del_outcome: p(format!("DELETE FROM {ks}.outcomes WHERE dataset = ? AND join_key = ? AND name = ? AND outcome_id = ?")).await?,
            del_by_time: p(format!("DELETE FROM {ks}.outcomes_by_time WHERE dataset = ? AND bucket = ? AND time_ms = ? AND join_key = ? AND name = ? AND outcome_id = ?")).await?,
            del_by_user: p(format!("DELETE FROM {ks}.by_user WHERE user_id = ? AND dataset = ? AND kind = ? AND entry = ?")).await?,
            del_close_bucket: p(format!("DELETE FROM {ks}.close_buckets WHERE dataset = ? AND bucket = ?")).await?,
            del_outcome_bucket: p(format!("DELETE FROM {ks}.outcome_buckets WHERE dataset = ? AND bucket = ?")).await?,
            get_outcome: p(format!("SELECT time_ms, payload FROM {ks}.outcomes WHERE dataset = ? AND join_key = ? AND name = ? AND outcome_id = ?")).await?,
        };
        Ok(Self { session, st })
    }

    /// Every row `st` selects with `values`, page by page.
    async fn select<T>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<T>, StateError>
    where
        T: 'static + for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        self.session
            .execute_iter(st.clone(), values)
            .await
            .map_err(err)?
            .rows_stream::<T>()
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)
    }

    async fn impression(
        &self,
        dataset: &str,
        id: Uuid,
    ) -> Result<Option<StoredImpression>, StateError> {
        type Row = (Option<i64>, Option<Vec<u8>>, Option<Vec<u8>>);
        let rows: Vec<Row> = self.select(&self.st.get_impression, (dataset, id)).await?;
        match rows.into_iter().next() {
            Some((Some(close_ms), Some(payload), emitted)) => Ok(Some(StoredImpression {
                example_id: id,
                close_ms,
                impression: from_json::<Impression>(&payload)?,
                emitted: emitted.as_deref().map(from_json).transpose()?,
            })),
            // No row, or only an `emitted` written after the impression went (an UPDATE
            // creates the row): no impression.
            _ => Ok(None),
        }
    }

    async fn delete_impression(
        &self,
        dataset: &str,
        i: &StoredImpression,
    ) -> Result<(), StateError> {
        let s = &self.session;
        s.execute_unpaged(&self.st.del_impression, (dataset, i.example_id))
            .await
            .map_err(err)?;
        s.execute_unpaged(
            &self.st.del_by_close,
            (dataset, bucket(i.close_ms), i.close_ms, i.example_id),
        )
        .await
        .map_err(err)?;
        for k in i.impression.keys() {
            s.execute_unpaged(&self.st.del_by_key, (dataset, &k, i.example_id))
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    async fn delete_outcome(
        &self,
        dataset: &str,
        join_key: &str,
        name: &str,
        id: &str,
    ) -> Result<bool, StateError> {
        let found: Vec<(i64, Vec<u8>)> = self
            .select(&self.st.get_outcome, (dataset, join_key, name, id))
            .await?;
        let Some((time_ms, _)) = found.into_iter().next() else {
            return Ok(false);
        };
        self.session
            .execute_unpaged(&self.st.del_outcome, (dataset, join_key, name, id))
            .await
            .map_err(err)?;
        self.session
            .execute_unpaged(
                &self.st.del_by_time,
                (dataset, bucket(time_ms), time_ms, join_key, name, id),
            )
            .await
            .map_err(err)?;
        Ok(true)
    }
}

#[async_trait]
impl StateStore for ScyllaStore {
    async fn put_impressions(
        &self,
        dataset: &str,
        items: Vec<StoredImpression>,
    ) -> Result<(), StateError> {
        let items = items.as_slice();
        let s = &self.session;
        let mut buckets = BTreeSet::new();
        for i in items {
            if let Some(old) = self.impression(dataset, i.example_id).await?
                && old.close_ms != i.close_ms
            {
                s.execute_unpaged(
                    &self.st.del_by_close,
                    (dataset, bucket(old.close_ms), old.close_ms, old.example_id),
                )
                .await
                .map_err(err)?;
            }
            s.execute_unpaged(
                &self.st.put_impression,
                (dataset, i.example_id, i.close_ms, json(&i.impression)?),
            )
            .await
            .map_err(err)?;
            s.execute_unpaged(
                &self.st.put_by_close,
                (dataset, bucket(i.close_ms), i.close_ms, i.example_id),
            )
            .await
            .map_err(err)?;
            buckets.insert(bucket(i.close_ms));
            for k in i.impression.keys() {
                s.execute_unpaged(&self.st.put_by_key, (dataset, &k, i.example_id))
                    .await
                    .map_err(err)?;
            }
            for u in i.impression.users() {
                s.execute_unpaged(
                    &self.st.put_by_user,
                    (&u, dataset, "i", i.example_id.to_string()),
                )
                .await
                .map_err(err)?;
            }
        }
        for b in buckets {
            s.execute_unpaged(&self.st.put_close_bucket, (dataset, b))
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    async fn put_emitted(&self, dataset: &str, items: &[Emitted]) -> Result<(), StateError> {
        for e in items {
            self.session
                .execute_unpaged(
                    &self.st.put_emitted,
                    (json(&e.emission)?, dataset, e.example_id),
                )
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    async fn put_outcomes(&self, dataset: &str, items: Vec<Outcome>) -> Result<(), StateError> {
        let items = items.as_slice();
        let s = &self.session;
        let mut buckets = BTreeSet::new();
        for o in items {
            // IF NOT EXISTS: the first copy of a record stays, as in the other adapters.
            s.execute_unpaged(
                &self.st.put_outcome,
                (dataset, &o.join_key, &o.name, &o.id, o.time_ms, json(o)?),
            )
            .await
            .map_err(err)?;
            s.execute_unpaged(
                &self.st.put_by_time,
                (
                    dataset,
                    bucket(o.time_ms),
                    o.time_ms,
                    &o.join_key,
                    &o.name,
                    &o.id,
                ),
            )
            .await
            .map_err(err)?;
            buckets.insert(bucket(o.time_ms));
            for u in &o.users {
                let entry = format!("{}\u{1f}{}\u{1f}{}", o.join_key, o.name, o.id);
                s.execute_unpaged(&self.st.put_by_user, (u, dataset, "o", entry))
                    .await
                    .map_err(err)?;
            }
        }
        for b in buckets {
            s.execute_unpaged(&self.st.put_outcome_bucket, (dataset, b))
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    async fn due_impressions(
        &self,
        dataset: &str,
        from: CloseCursor,
        upto_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredImpression>, StateError> {
        let buckets: Vec<i64> = self
            .select::<(i64,)>(
                &self.st.close_buckets,
                (dataset, bucket(from.close_ms), bucket(upto_ms)),
            )
            .await?
            .into_iter()
            .map(|(b,)| b)
            .collect();
        let mut out = Vec::new();
        for b in buckets {
            let left = limit.saturating_sub(out.len());
            if left == 0 {
                break;
            }
            let ids: Vec<(i64, Uuid)> = self
                .select(
                    &self.st.due,
                    (
                        dataset,
                        b,
                        from.close_ms,
                        from.example_id,
                        upto_ms,
                        i32::try_from(left).unwrap_or(i32::MAX),
                    ),
                )
                .await?;
            for (_, id) in ids {
                if let Some(i) = self.impression(dataset, id).await? {
                    out.push(i);
                }
            }
        }
        Ok(out)
    }

    async fn impressions_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<StoredImpression>, StateError> {
        let mut ids = BTreeSet::new();
        for k in keys {
            let rows: Vec<(Uuid,)> = self.select(&self.st.by_key, (dataset, k)).await?;
            for (id,) in rows {
                ids.insert(id);
            }
        }
        let mut out = Vec::new();
        for id in ids {
            if let Some(i) = self.impression(dataset, id).await? {
                out.push(i);
            }
        }
        Ok(out)
    }

    async fn outcomes_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<Outcome>, StateError> {
        let mut out = Vec::new();
        for k in keys {
            let rows: Vec<(Vec<u8>,)> = self.select(&self.st.outcomes, (dataset, k)).await?;
            for (payload,) in rows {
                out.push(from_json::<Outcome>(&payload)?);
            }
        }
        Ok(out)
    }

    async fn expire(
        &self,
        dataset: &str,
        impressions_closed_before: i64,
        outcomes_before: i64,
    ) -> Result<u64, StateError> {
        let mut n = 0u64;
        // Impressions: whole buckets before the cutoff, and the cutoff's own bucket in part.
        loop {
            let due = self
                .due_impressions(
                    dataset,
                    CloseCursor::after(i64::MIN),
                    impressions_closed_before.saturating_sub(1),
                    1000,
                )
                .await?;
            if due.is_empty() {
                break;
            }
            for i in &due {
                self.delete_impression(dataset, i).await?;
                n += 1;
            }
        }
        // Drop the listing of buckets the loop above emptied.
        let emptied: Vec<i64> = self
            .select::<(i64,)>(
                &self.st.close_buckets,
                (
                    dataset,
                    i64::MIN / BUCKET_MS,
                    bucket(impressions_closed_before) - 1,
                ),
            )
            .await?
            .into_iter()
            .map(|(b,)| b)
            .collect();
        for b in emptied {
            self.session
                .execute_unpaged(&self.st.del_close_bucket, (dataset, b))
                .await
                .map_err(err)?;
        }
        // Outcomes by event-time bucket.
        let buckets: Vec<i64> = self
            .select::<(i64,)>(&self.st.outcome_buckets, (dataset, bucket(outcomes_before)))
            .await?
            .into_iter()
            .map(|(b,)| b)
            .collect();
        for b in buckets {
            let gone: Vec<(i64, String, String, String)> = self
                .select(&self.st.by_time, (dataset, b, outcomes_before))
                .await?;
            for (_, key, name, id) in gone {
                if self.delete_outcome(dataset, &key, &name, &id).await? {
                    n += 1;
                }
            }
            if b < bucket(outcomes_before) {
                self.session
                    .execute_unpaged(&self.st.del_outcome_bucket, (dataset, b))
                    .await
                    .map_err(err)?;
            }
        }
        Ok(n)
    }

    async fn purge_users(&self, users: &[String]) -> Result<u64, StateError> {
        let mut n = 0u64;
        for u in users {
            let entries: Vec<(String, String, String)> =
                self.select(&self.st.by_user, (u,)).await?;
            let mut impressions: HashMap<String, Vec<Uuid>> = HashMap::new();
            for (dataset, kind, entry) in &entries {
                match kind.as_str() {
                    "i" => {
                        if let Ok(id) = Uuid::parse_str(entry) {
                            impressions.entry(dataset.clone()).or_default().push(id);
                        }
                    }
                    _ => {
                        let mut parts = entry.splitn(3, '\u{1f}');
                        if let (Some(k), Some(name), Some(id)) =
                            (parts.next(), parts.next(), parts.next())
                            && self.delete_outcome(dataset, k, name, id).await?
                        {
                            n += 1;
                        }
                    }
                }
                self.session
                    .execute_unpaged(&self.st.del_by_user, (u, dataset, kind, entry))
                    .await
                    .map_err(err)?;
            }
            for (dataset, ids) in impressions {
                for id in ids {
                    if let Some(i) = self.impression(&dataset, id).await? {
                        self.delete_impression(&dataset, &i).await?;
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }
}
