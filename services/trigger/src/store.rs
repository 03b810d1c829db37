//! The trigger's state in Postgres (`trigger.*`): the catalogue of committed partition
//! versions, decisions, deliveries. Rebuildable by replaying `feedloop.datasets.partitions`.

use std::collections::BTreeMap;

use feedloop_labeler::dataset::Manifest;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::policy::{Pending, Previous};

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

fn counts(text: &str) -> BTreeMap<String, i64> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Records a committed partition version, once. What it adds is counted against the version
/// it supersedes (the labeler's later commits to a partition, and erasure rewrites, are new
/// versions holding the earlier rows too). Returns whether it was new.
pub async fn record_partition(pool: &PgPool, m: &Manifest) -> Result<bool, sqlx::Error> {
    let previous = m.supersedes_version.or(if m.version > 1 {
        Some(m.version - 1)
    } else {
        None
    });
    let before: Option<(i64, String)> = match previous {
        None => None,
        Some(v) => {
            sqlx::query_as(
                "SELECT row_count, manifest FROM trigger.partitions
                 WHERE dataset = $1 AND partition = $2 AND version = $3",
            )
            .bind(&m.dataset)
            .bind(&m.partition)
            .bind(v)
            .fetch_optional(pool)
            .await?
        }
    };
    let (before_rows, before_labels) = match &before {
        Some((rows, manifest)) => (
            *rows,
            serde_json::from_str::<Manifest>(manifest)
                .map(|p| p.label_counts)
                .unwrap_or_default(),
        ),
        None => (0, BTreeMap::new()),
    };
    let mut added_labels = m.label_counts.clone();
    for (label, n) in before_labels {
        *added_labels.entry(label).or_default() -= n;
    }
    added_labels.retain(|_, n| *n != 0);
    // Inserts are serialized so that `seq` order is commit order: a reader paging by `seq`
    // never sees a later seq before an earlier one.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('feedloop.trigger.catalogue'))")
        .execute(&mut *tx)
        .await?;
    let done = sqlx::query(
        "INSERT INTO trigger.partitions
           (dataset, partition, version, manifest_uri, row_count, added_rows, added_labels, manifest, committed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_timestamp($9::float8 / 1000))
         ON CONFLICT (dataset, partition, version) DO NOTHING",
    )
    .bind(&m.dataset)
    .bind(&m.partition)
    .bind(m.version)
    .bind(&m.manifest_uri)
    .bind(m.row_count)
    .bind(m.row_count - before_rows)
    .bind(json(&added_labels))
    .bind(json(m))
    .bind(m.committed_at as f64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// A partition version a trigger covers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionRef {
    pub partition: String,
    pub version: i32,
    pub manifest_uri: String,
    pub row_count: i64,
}

/// What a dataset has committed since its last decision.
#[derive(Debug, Clone)]
pub struct PendingSet {
    pub from_seq: i64,
    pub through_seq: i64,
    pub pending: Pending,
    /// The latest pending version of each partition.
    pub partitions: Vec<PartitionRef>,
}

/// The last decision of `dataset`: (through_seq, what the policy needs).
pub async fn previous(
    pool: &PgPool,
    dataset: &str,
) -> Result<Option<(i64, Previous)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT through_seq, label_counts, (EXTRACT(EPOCH FROM decided_at) * 1000)::bigint AS ms
         FROM trigger.decisions WHERE dataset = $1 ORDER BY through_seq DESC LIMIT 1",
    )
    .bind(dataset)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok((
            r.try_get("through_seq")?,
            Previous {
                decided_ms: r.try_get("ms")?,
                label_counts: counts(&r.try_get::<String, _>("label_counts")?),
            },
        ))
    })
    .transpose()
}

/// Everything `dataset` committed after `after_seq`.
pub async fn pending(
    pool: &PgPool,
    dataset: &str,
    after_seq: i64,
) -> Result<Option<PendingSet>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, partition, version, manifest_uri, row_count, added_rows, added_labels,
                (EXTRACT(EPOCH FROM committed_at) * 1000)::bigint AS committed_ms
         FROM trigger.partitions WHERE dataset = $1 AND seq > $2 ORDER BY seq",
    )
    .bind(dataset)
    .bind(after_seq)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut p = Pending {
        oldest_ms: i64::MAX,
        ..Pending::default()
    };
    let (mut from_seq, mut through_seq) = (i64::MAX, 0);
    let mut latest: BTreeMap<String, PartitionRef> = BTreeMap::new();
    for r in rows {
        let seq: i64 = r.try_get("seq")?;
        from_seq = from_seq.min(seq);
        through_seq = through_seq.max(seq);
        p.versions += 1;
        p.new_rows += r.try_get::<i64, _>("added_rows")?;
        for (label, n) in counts(&r.try_get::<String, _>("added_labels")?) {
            *p.label_counts.entry(label).or_default() += n;
        }
        p.oldest_ms = p.oldest_ms.min(r.try_get("committed_ms")?);
        let part = PartitionRef {
            partition: r.try_get("partition")?,
            version: r.try_get("version")?,
            manifest_uri: r.try_get("manifest_uri")?,
            row_count: r.try_get("row_count")?,
        };
        match latest.get(&part.partition) {
            Some(have) if have.version >= part.version => {}
            _ => {
                latest.insert(part.partition.clone(), part);
            }
        }
    }
    p.label_counts.retain(|_, n| *n > 0);
    Ok(Some(PendingSet {
        from_seq,
        through_seq,
        pending: p,
        partitions: latest.into_values().collect(),
    }))
}

/// Datasets that committed something since their last decision.
pub async fn datasets_with_pending(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT p.dataset FROM trigger.partitions p
         GROUP BY p.dataset
         HAVING max(p.seq) > COALESCE(
           (SELECT max(d.through_seq) FROM trigger.decisions d WHERE d.dataset = p.dataset), 0)",
    )
    .fetch_all(pool)
    .await
}

/// The deterministic id of the decision over `(from_seq, through_seq]` of `dataset`.
pub fn decision_id(dataset: &str, from_seq: i64, through_seq: i64) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("feedloop-trigger:{dataset}:{from_seq}:{through_seq}").as_bytes(),
    )
}

/// A decision to store with its deliveries.
#[derive(Debug)]
pub struct NewDecision<'a> {
    pub id: Uuid,
    pub dataset: &'a str,
    pub rule: &'a str,
    pub reason: &'a str,
    pub from_seq: i64,
    pub through_seq: i64,
    pub label_counts: &'a BTreeMap<String, i64>,
    pub event: &'a str,
    pub sinks: &'a [String],
}

/// Stores a decision and one pending delivery per sink, in `tx`. Returns false when the
/// decision exists already.
pub async fn insert_decision(
    tx: &mut Transaction<'_, Postgres>,
    d: &NewDecision<'_>,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO trigger.decisions (id, dataset, rule, reason, from_seq, through_seq, label_counts, event)
         VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
    )
    .bind(d.id.to_string())
    .bind(d.dataset)
    .bind(d.rule)
    .bind(d.reason)
    .bind(d.from_seq)
    .bind(d.through_seq)
    .bind(json(d.label_counts))
    .bind(d.event)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        sqlx::query(
            "INSERT INTO trigger.deliveries (decision_id, sink)
             SELECT $1::uuid, unnest($2::text[])",
        )
        .bind(d.id.to_string())
        .bind(d.sinks)
        .execute(&mut **tx)
        .await?;
    }
    Ok(inserted)
}

/// A delivery to make now.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub decision_id: Uuid,
    pub sink: String,
    pub event: String,
}

/// Claims up to `limit` deliveries that are due (pending, or leased by an instance that
/// stopped), leasing them for `lease_ms`.
pub async fn claim(pool: &PgPool, lease_ms: i64, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query(
        "UPDATE trigger.deliveries d SET status = 'delivering',
           leased_until = now() + make_interval(secs => $1::float8 / 1000), updated_at = now()
         FROM trigger.decisions x
         WHERE x.id = d.decision_id AND (d.decision_id, d.sink) IN (
           SELECT decision_id, sink FROM trigger.deliveries
           WHERE status = 'pending' OR (status = 'delivering' AND leased_until < now())
           ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING d.decision_id::text AS id, d.sink, x.event",
    )
    .bind(lease_ms as f64)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let id: String = r.try_get("id")?;
            Ok(Claimed {
                decision_id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(e.into()))?,
                sink: r.try_get("sink")?,
                event: r.try_get("event")?,
            })
        })
        .collect()
}

/// Extends the lease of a delivery still being attempted.
pub async fn renew(pool: &PgPool, id: Uuid, sink: &str, lease_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE trigger.deliveries SET leased_until = now() + make_interval(secs => $3::float8 / 1000)
         WHERE decision_id = $1::uuid AND sink = $2 AND status = 'delivering'",
    )
    .bind(id.to_string())
    .bind(sink)
    .bind(lease_ms as f64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records one attempt's outcome: `Ok` delivered, `Err((error, final))` failed once (and for
/// good when `final`).
pub async fn attempted(
    pool: &PgPool,
    id: Uuid,
    sink: &str,
    outcome: Result<(), (&str, bool)>,
) -> Result<(), sqlx::Error> {
    let (status, error) = match outcome {
        Ok(()) => ("delivered", None),
        Err((e, true)) => ("failed", Some(e)),
        Err((e, false)) => ("delivering", Some(e)),
    };
    sqlx::query(
        "UPDATE trigger.deliveries SET status = $3, attempts = attempts + 1,
           last_error = COALESCE($4, last_error), updated_at = now(),
           delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END,
           leased_until = CASE WHEN $3 = 'delivering' THEN leased_until ELSE NULL END
         WHERE decision_id = $1::uuid AND sink = $2",
    )
    .bind(id.to_string())
    .bind(sink)
    .bind(status)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
