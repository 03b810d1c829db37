//! `feedloop datasets ls|show` and `feedloop replay`: what the labeler committed, read from
//! the control database, and rebuilding a dataset from the log into a new root.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::Context;
use serde::Serialize;
use sqlx::{Connection, Executor, PgPool, Row};

/// A dataset's current state.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DatasetSummary {
    pub dataset: String,
    pub partitions: i64,
    pub rows: i64,
    pub bytes: i64,
    pub last_commit: String,
}

/// A partition's current version.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionSummary {
    pub partition: String,
    pub version: i32,
    pub rows: i64,
    pub bytes: i64,
    pub files: usize,
    pub erasure_epoch: i64,
    pub manifest_uri: String,
    pub committed_at: String,
}

pub async fn list(control: &PgPool) -> anyhow::Result<Vec<DatasetSummary>> {
    let rows = sqlx::query(
        "SELECT dataset, count(*) AS partitions, COALESCE(SUM(row_count), 0)::bigint AS rows,
                COALESCE(SUM(byte_size), 0)::bigint AS bytes, max(committed_at)::text AS last_commit
         FROM (SELECT DISTINCT ON (dataset, partition) dataset, row_count, byte_size, committed_at
               FROM labeler.partitions ORDER BY dataset, partition, version DESC) v
         GROUP BY dataset ORDER BY dataset",
    )
    .fetch_all(control)
    .await
    .context("reading labeler.partitions")?;
    rows.iter()
        .map(|r| {
            Ok(DatasetSummary {
                dataset: r.try_get("dataset")?,
                partitions: r.try_get("partitions")?,
                rows: r.try_get("rows")?,
                bytes: r.try_get("bytes")?,
                last_commit: r.try_get("last_commit")?,
            })
        })
        .collect()
}

pub async fn show(control: &PgPool, dataset: &str) -> anyhow::Result<Vec<PartitionSummary>> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (partition) partition, version, row_count, byte_size, erasure_epoch,
                manifest_uri, manifest, committed_at::text AS committed_at
         FROM labeler.partitions WHERE dataset = $1 ORDER BY partition, version DESC",
    )
    .bind(dataset)
    .fetch_all(control)
    .await
    .context("reading labeler.partitions")?;
    if rows.is_empty() {
        anyhow::bail!("dataset {dataset} has no committed partition");
    }
    rows.iter()
        .map(|r| {
            let manifest: feedloop_labeler::dataset::Manifest =
                serde_json::from_str(&r.try_get::<String, _>("manifest")?)?;
            Ok(PartitionSummary {
                partition: r.try_get("partition")?,
                version: r.try_get("version")?,
                rows: r.try_get("row_count")?,
                bytes: r.try_get("byte_size")?,
                files: manifest.files.len(),
                erasure_epoch: r.try_get("erasure_epoch")?,
                manifest_uri: r.try_get("manifest_uri")?,
                committed_at: r.try_get("committed_at")?,
            })
        })
        .collect()
}

/// Creates a fresh database on the server of `url` for a replay's bookkeeping.
pub async fn fresh_control_database(url: &str, dataset: &str) -> anyhow::Result<String> {
    let name = format!(
        "feedloop_replay_{dataset}_{}",
        &uuid::Uuid::now_v7().simple().to_string()[..12]
    );
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| "connecting to the labeler's control database")?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .context("creating the replay's control database")?;
    let _ = conn.close().await;
    let mut parsed = url::Url::parse(url).context("control URL")?;
    parsed.set_path(&format!("/{name}"));
    Ok(parsed.to_string())
}

/// Gives the replay's bookkeeping database the erased users of the labeler's, so that the
/// rebuilt dataset leaves them out as the live one does.
async fn copy_suppression_list(from: &str, to: &str) -> anyhow::Result<()> {
    let source = feedloop_core::postgres::connect(from, 1).await?;
    let erased: Vec<String> = sqlx::query_scalar("SELECT user_id FROM collector.suppressed_users")
        .fetch_all(&source)
        .await
        .context("reading the suppression list")?;
    source.close().await;
    let target = feedloop_core::postgres::connect(to, 1).await?;
    feedloop_core::postgres::migrate(&target).await?;
    feedloop_labeler::erasure::suppress(&target, &erased)
        .await
        .context("copying the suppression list")?;
    target.close().await;
    Ok(())
}

/// Options of `feedloop replay`.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The labeler's configuration (specs, inputs, Kafka, registry, control database).
    pub config: feedloop_labeler::Config,
    pub dataset: String,
    /// The new root to write the rebuilt dataset to.
    pub root: String,
    /// Bookkeeping database of the rebuild; a fresh one next to the labeler's when absent.
    pub control: Option<String>,
    pub progress: bool,
}

/// Rebuilds a dataset from the earliest offsets of its inputs into a new root.
pub async fn replay(options: ReplayOptions) -> anyhow::Result<feedloop_labeler::ReplaySummary> {
    let mut config = options.config;
    let control = match options.control {
        Some(c) => c,
        None => fresh_control_database(config.control.url.expose(), &options.dataset).await?,
    };
    copy_suppression_list(config.control.url.expose(), &control).await?;
    config.control.url = feedloop_core::config::Secret::new(control);
    config.datasets.root = options.root;
    let records = Arc::new(AtomicU64::new(0));
    let bar = options.progress.then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let records = records.clone();
        tokio::spawn(async move {
            loop {
                let n = records.load(std::sync::atomic::Ordering::Relaxed);
                bar.set_message(format!("{n} records read"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let result = feedloop_labeler::replay(config, &options.dataset, records).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(result?)
}
