//! Erasure hooks for the eraser: which dataset partitions hold a user (the per-user index
//! written with every commit), and a rewrite of a partition without a set of users as a new
//! manifest version.
//!
//! A rewrite reads only the files of the partition's current version that hold the users,
//! writes their rows minus the users' to new files, commits a new version (Postgres row,
//! manifest JSON, erasure epoch bumped) and then deletes the replaced files. The labeler
//! announces the new version on `feedloop.datasets.partitions` at its next commit (unannounced
//! versions are picked up by `engine::publish_pending`). A labeler commit racing on the same
//! partition loses on the (dataset, partition, version) key and retries from its last commit.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{SystemTime, UNIX_EPOCH},
};

use arrow_array::{Array, BooleanArray, Int32Array, RecordBatch, StringArray};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sqlx::{PgPool, Row};

use crate::dataset::{self, DataFile, DatasetError, Manifest, Root, data_file_rel, manifest_rel};

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("control database: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("dataset {dataset} partition {partition} has no committed version")]
    NoPartition { dataset: String, partition: String },
    #[error("file {0} has no {1} column")]
    Column(String, &'static str),
    #[error("join-state checkpoint of dataset {0}: {1}")]
    Checkpoint(String, String),
}

/// Advisory lock that orders the eraser's suppression (its first step) against labeler
/// commits: the eraser holds it exclusively while it adds users to the suppression list, a
/// commit holds it shared while it checks its rows against the list and records them. A commit
/// therefore either sees the new entries, or is recorded (with its per-user index) before them,
/// where the eraser's dataset rewrite finds it.
pub const SUPPRESSION_LOCK: i64 = 0x6665_6564_6c6f_6f70;

/// Puts `users` on the suppression list, under the exclusive [`SUPPRESSION_LOCK`]; returns
/// how many were not on it yet.
pub async fn suppress(control: &PgPool, users: &[String]) -> Result<u64, sqlx::Error> {
    let mut tx = control.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SUPPRESSION_LOCK)
        .execute(&mut *tx)
        .await?;
    let n = sqlx::query(
        "INSERT INTO collector.suppressed_users (user_id) SELECT unnest($1::text[])
         ON CONFLICT (user_id) DO NOTHING",
    )
    .bind(users)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(n)
}

/// The datasets whose local join state (`state.store = "local"`) may still name one of
/// `users`: their committed checkpoint was written before the users were suppressed. Each
/// one's labeler purges them and commits a snapshot without them at its next commit. `None`
/// when none of `users` is on the suppression list.
pub async fn local_state_behind(
    control: &PgPool,
    users: &[String],
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(
        "SELECT max(seq) FROM collector.suppressed_users WHERE user_id = ANY($1)",
    )
    .bind(users)
    .fetch_one(control)
    .await?;
    let Some(seq) = seq else {
        return Ok(None);
    };
    let behind = sqlx::query_scalar(
        "SELECT dataset FROM labeler.positions
         WHERE checkpoint IS NOT NULL AND suppression_through < $1 ORDER BY dataset",
    )
    .bind(seq)
    .fetch_all(control)
    .await?;
    Ok(Some(behind))
}

/// The advisory lock a dataset's labeler holds while it runs (on a connection of its own).
/// [`purge_idle_checkpoint`] takes the same key for one transaction.
pub const DATASET_LOCK_SQL: &str =
    "SELECT pg_try_advisory_lock(hashtext('feedloop.labeler.' || $1))";

/// For a dataset with local join state whose labeler is not running: purges every user
/// suppressed since its checkpoint from the checkpoint itself, as the labeler would at its next
/// commit. Holds the dataset's lock throughout, so no labeler starts meanwhile; reads the
/// committed segments, writes a snapshot without the users, records it (and the suppression seq
/// it covers) and deletes the old segments. Returns the entries removed, or `None` when the
/// labeler holds the lock (it purges them itself).
pub async fn purge_idle_checkpoint(
    control: &PgPool,
    root: &Root,
    dataset: &str,
) -> Result<Option<u64>, ErasureError> {
    use crate::state::{
        LocalState, StateStore,
        checkpoint::{Checkpoint, Segment, SegmentRef, segment_rel},
        memory::MemoryStore,
    };
    // A transaction-level lock: released with the transaction, however this ends.
    let mut tx = control.begin().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('feedloop.labeler.' || $1))")
            .bind(dataset)
            .fetch_one(&mut *tx)
            .await?;
    if !locked {
        return Ok(None);
    }
    let row: Option<(i64, Option<String>, i64)> = sqlx::query_as(
        "SELECT seq, checkpoint, suppression_through FROM labeler.positions WHERE dataset = $1",
    )
    .bind(dataset)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((seq, Some(text), through)) = row else {
        return Ok(Some(0));
    };
    let suppressed: Vec<(String, i64)> =
        sqlx::query_as("SELECT user_id, seq FROM collector.suppressed_users WHERE seq > $1")
            .bind(through)
            .fetch_all(&mut *tx)
            .await?;
    let Some(latest) = suppressed.iter().map(|(_, s)| *s).max() else {
        return Ok(Some(0));
    };
    let corrupt = |m: String| ErasureError::Checkpoint(dataset.to_owned(), m);
    let checkpoint: Checkpoint = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    let state = MemoryStore::default();
    for s in &checkpoint.segments {
        let bytes = root.get(&s.path).await?;
        if dataset::sha256_hex(&bytes) != s.sha256 {
            return Err(corrupt(format!(
                "segment {} does not match its checksum",
                s.path
            )));
        }
        state.apply(
            dataset,
            Segment::decode(&bytes).map_err(|e| corrupt(e.to_string()))?,
        );
    }
    let users: Vec<String> = suppressed.into_iter().map(|(u, _)| u).collect();
    let removed = state
        .purge_users(&users)
        .await
        .map_err(|e| corrupt(e.to_string()))?;
    let taken = state.take(dataset, true, &[]);
    let rel = segment_rel(dataset, seq);
    let next = Checkpoint {
        segments: vec![SegmentRef {
            path: rel.clone(),
            sha256: dataset::sha256_hex(&taken.bytes),
            rows: taken.rows,
            bytes: taken.bytes.len() as u64,
        }],
    };
    root.put(&rel, taken.bytes).await?;
    // A failure from here leaves the new segment unlisted: the labeler's next start removes it.
    sqlx::query(
        "UPDATE labeler.positions SET checkpoint = $2, suppression_through = $3 WHERE dataset = $1",
    )
    .bind(dataset)
    .bind(serde_json::to_string(&next).map_err(|e| corrupt(e.to_string()))?)
    .bind(latest)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for s in &checkpoint.segments {
        root.delete(&s.path).await?;
    }
    tracing::info!(
        dataset,
        entries = removed,
        "Erased users purged from an idle labeler's join-state checkpoint"
    );
    Ok(Some(removed))
}

/// Which of `users` are erased (on the suppression list the eraser keeps).
pub async fn erased_among<'c, E>(conn: E, users: &[String]) -> Result<HashSet<String>, sqlx::Error>
where
    E: sqlx::PgExecutor<'c>,
{
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM collector.suppressed_users WHERE user_id = ANY($1)",
    )
    .bind(users)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// What a rewrite did.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    pub before: Manifest,
    /// The new version; `None` when the partition held none of the users.
    pub after: Option<Manifest>,
    pub rows_removed: i64,
    pub files_rewritten: usize,
    /// Distinct examples removed (each may have had several versions); their ids are kept
    /// for the request in `labeler.erased_examples` until its labels-topic tombstones are out.
    pub examples_removed: i64,
}

/// The (dataset, partition) pairs whose rows name any of `users`.
pub async fn partitions_with_users(
    control: &PgPool,
    users: &[String],
) -> Result<Vec<(String, String)>, ErasureError> {
    let rows = sqlx::query(
        "SELECT DISTINCT dataset, partition FROM labeler.partition_users
         WHERE user_id = ANY($1) ORDER BY dataset, partition",
    )
    .bind(users)
    .fetch_all(control)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("dataset")?, r.try_get("partition")?)))
        .collect()
}

fn keep_mask(
    batch: &RecordBatch,
    users: &HashSet<&str>,
    file: &str,
) -> Result<BooleanArray, ErasureError> {
    let column = |name: &'static str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| ErasureError::Column(file.to_owned(), name))
    };
    let viewer = column("viewer_id")?;
    let candidate = column("candidate_id")?;
    Ok((0..batch.num_rows())
        .map(|i| {
            let named = |a: &StringArray| !a.is_null(i) && users.contains(a.value(i));
            Some(!(named(viewer) || named(candidate)))
        })
        .collect())
}

/// Rewrites the current version of `partition` of `dataset` without `users`, for erasure
/// request `request`: the ids of the examples removed are recorded under it, in the same
/// transaction as the new version ([`erased_examples`]).
pub async fn rewrite_partition(
    control: &PgPool,
    root: &Root,
    dataset: &str,
    partition: &str,
    users: &[String],
    request: uuid::Uuid,
) -> Result<Rewrite, ErasureError> {
    let text: Option<String> = sqlx::query_scalar(
        "SELECT manifest FROM labeler.partitions WHERE dataset = $1 AND partition = $2
         ORDER BY version DESC LIMIT 1",
    )
    .bind(dataset)
    .bind(partition)
    .fetch_optional(control)
    .await?;
    let before: Manifest = match text {
        Some(t) => serde_json::from_str(&t).map_err(DatasetError::from)?,
        None => {
            return Err(ErasureError::NoPartition {
                dataset: dataset.to_owned(),
                partition: partition.to_owned(),
            });
        }
    };
    let wanted: HashSet<&str> = users.iter().map(String::as_str).collect();
    let mut files = Vec::with_capacity(before.files.len());
    let mut replaced = Vec::new();
    let mut removed = 0i64;
    let mut removed_examples: HashSet<String> = HashSet::new();
    // The latest version of each example kept: (version, label).
    let mut latest: HashMap<String, (i32, String)> = HashMap::new();
    for f in &before.files {
        let rel = root.rel_of_listed(&f.uri)?;
        let bytes: Bytes = root.get(&rel).await?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(DatasetError::from)?
            .build()
            .map_err(DatasetError::from)?;
        let mut kept = Vec::new();
        let mut dropped = 0i64;
        for batch in reader {
            let batch = batch.map_err(DatasetError::from)?;
            let mask = keep_mask(&batch, &wanted, &rel)?;
            dropped += mask.iter().filter(|k| *k == Some(false)).count() as i64;
            if let Some(ids) = batch
                .column_by_name("example_id")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            {
                for (i, keep) in mask.iter().enumerate() {
                    if keep == Some(false) && !ids.is_null(i) {
                        removed_examples.insert(ids.value(i).to_owned());
                    }
                }
            }
            let filtered = arrow_select::filter::filter_record_batch(&batch, &mask)
                .map_err(DatasetError::from)?;
            let column = |name: &str| filtered.column_by_name(name);
            if let (Some(ids), Some(versions), Some(labels)) = (
                column("example_id").and_then(|c| c.as_any().downcast_ref::<StringArray>()),
                column("version").and_then(|c| c.as_any().downcast_ref::<Int32Array>()),
                column("label").and_then(|c| c.as_any().downcast_ref::<StringArray>()),
            ) {
                for i in 0..filtered.num_rows() {
                    let version = versions.value(i);
                    let e = latest
                        .entry(ids.value(i).to_owned())
                        .or_insert((version, labels.value(i).to_owned()));
                    if version > e.0 {
                        *e = (version, labels.value(i).to_owned());
                    }
                }
            }
            kept.push(filtered);
        }
        if dropped == 0 {
            files.push(f.clone());
            continue;
        }
        removed += dropped;
        replaced.push(rel);
        let total: usize = kept.iter().map(RecordBatch::num_rows).sum();
        if total == 0 {
            continue;
        }
        let schema = kept[0].schema();
        let merged =
            arrow_select::concat::concat_batches(&schema, &kept).map_err(DatasetError::from)?;
        let out = dataset::parquet_bytes(&merged)?;
        let new_rel = data_file_rel(dataset, partition);
        files.push(DataFile {
            uri: root.uri_of(&new_rel),
            row_count: total as i64,
            byte_size: out.len() as i64,
            sha256: dataset::sha256_hex(&out),
        });
        root.put(&new_rel, out).await?;
    }
    if removed == 0 {
        // None of the users is in the current version: an index entry naming them here is
        // stale (a rewrite that committed before its caller noted it); it goes, so that the
        // index names only where they are.
        sqlx::query(
            "DELETE FROM labeler.partition_users WHERE dataset = $1 AND partition = $2 AND user_id = ANY($3)",
        )
        .bind(dataset)
        .bind(partition)
        .bind(users)
        .execute(control)
        .await?;
        return Ok(Rewrite {
            before,
            after: None,
            rows_removed: 0,
            files_rewritten: 0,
            examples_removed: 0,
        });
    }
    let mut tx = control.begin().await?;
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO labeler.erasure_epochs (dataset, epoch) VALUES ($1, 1)
         ON CONFLICT (dataset) DO UPDATE SET epoch = labeler.erasure_epochs.epoch + 1
         RETURNING epoch",
    )
    .bind(dataset)
    .fetch_one(&mut *tx)
    .await?;
    let version = before.version + 1;
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for (_, label) in latest.values() {
        *counts.entry(label.clone()).or_insert(0) += 1;
    }
    let after = Manifest {
        version,
        manifest_uri: root.uri_of(&manifest_rel(dataset, partition, version)),
        row_count: files.iter().map(|f| f.row_count).sum(),
        byte_size: files.iter().map(|f| f.byte_size).sum(),
        files,
        label_counts: counts,
        examples: latest.len() as i64,
        erasure_epoch: epoch,
        supersedes_version: Some(before.version),
        committed_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        ..before.clone()
    };
    let new_files = || {
        after
            .files
            .iter()
            .filter(|f| !before.files.iter().any(|b| b.uri == f.uri))
            .filter_map(|f| root.rel_of(&f.uri))
            .collect::<Vec<_>>()
    };
    let removed_examples: Vec<String> = removed_examples.into_iter().collect();
    let recorded = async {
        record_rewrite(&mut tx, dataset, partition, users, &after).await?;
        sqlx::query(
            "INSERT INTO labeler.erased_examples (request_id, dataset, example_id)
             SELECT $1::uuid, $2, unnest($3::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(request.to_string())
        .bind(dataset)
        .bind(&removed_examples)
        .execute(&mut *tx)
        .await?;
        Ok::<_, ErasureError>(())
    }
    .await;
    if let Err(e) = recorded {
        // A labeler commit took this version first: the new files go now; the eraser retries.
        drop(tx);
        for rel in new_files() {
            let _ = root.delete(&rel).await;
        }
        return Err(e);
    }
    if let Err(e) = tx.commit().await {
        // COMMIT itself failed: Postgres may have committed and lost the reply. Unless the
        // version is known not to be there, its files stay (a labeler start removes them
        // once unreferenced and older than its grace period).
        let committed: Result<Option<String>, sqlx::Error> = sqlx::query_scalar(
            "SELECT manifest_uri FROM labeler.partitions
             WHERE dataset = $1 AND partition = $2 AND version = $3",
        )
        .bind(dataset)
        .bind(partition)
        .bind(version)
        .fetch_optional(control)
        .await;
        match committed {
            Ok(Some(uri)) if uri == after.manifest_uri => {
                tracing::warn!(dataset, partition, version, error = %e, "The reply to COMMIT was lost, but the rewrite went through");
            }
            _ => return Err(e.into()),
        }
    }
    // The JSON copy of the manifest, once the version is committed.
    root.put(
        &manifest_rel(dataset, partition, version),
        serde_json::to_vec_pretty(&after).map_err(DatasetError::from)?,
    )
    .await?;
    for rel in &replaced {
        root.delete(rel).await?;
    }
    Ok(Rewrite {
        before,
        after: Some(after),
        rows_removed: removed,
        files_rewritten: replaced.len(),
        examples_removed: removed_examples.len() as i64,
    })
}

/// The new version's rows in one transaction: the manifest, and the users leave the index.
async fn record_rewrite(
    tx: &mut sqlx::PgConnection,
    dataset: &str,
    partition: &str,
    users: &[String],
    after: &Manifest,
) -> Result<(), ErasureError> {
    let version = after.version;
    let epoch = after.erasure_epoch;
    sqlx::query(
        "INSERT INTO labeler.partitions
         (dataset, partition, version, manifest_uri, manifest, row_count, byte_size, erasure_epoch)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(dataset)
    .bind(partition)
    .bind(version)
    .bind(&after.manifest_uri)
    .bind(serde_json::to_string(after).map_err(DatasetError::from)?)
    .bind(after.row_count)
    .bind(after.byte_size)
    .bind(epoch)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM labeler.partition_users WHERE dataset = $1 AND partition = $2 AND user_id = ANY($3)")
        .bind(dataset)
        .bind(partition)
        .bind(users)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The examples erasure request `request` removed from the datasets, by dataset: their keys on
/// `feedloop.labels.<dataset>` get a tombstone.
pub async fn erased_examples(
    control: &PgPool,
    request: uuid::Uuid,
) -> Result<BTreeMap<String, Vec<String>>, ErasureError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT dataset, example_id FROM labeler.erased_examples WHERE request_id = $1::uuid
         ORDER BY dataset, example_id",
    )
    .bind(request.to_string())
    .fetch_all(control)
    .await?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (dataset, example) in rows {
        out.entry(dataset).or_default().push(example);
    }
    Ok(out)
}

/// Forgets the examples a completed request removed (nothing about it is kept).
pub async fn forget_erased_examples(
    control: &PgPool,
    request: uuid::Uuid,
) -> Result<u64, ErasureError> {
    Ok(
        sqlx::query("DELETE FROM labeler.erased_examples WHERE request_id = $1::uuid")
            .bind(request.to_string())
            .execute(control)
            .await?
            .rows_affected(),
    )
}
