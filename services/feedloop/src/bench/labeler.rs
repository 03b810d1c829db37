//! `feedloop bench labeler`: events joined per second, from the log to committed Parquet, with
//! the Postgres join state (the default) and with the in-memory one (the join without its
//! database); Parquet write rows/s on one core; and, side by side, DuckDB computing the same
//! labels in one batch query over the same events.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use arrow_array::{
    ArrayRef, RecordBatch,
    builder::{BooleanBuilder, Int64Builder, StringBuilder},
};
use arrow_schema::{DataType, Field, Schema};
use feedloop_core::{
    avro::CompiledSchema,
    catalogue::{Catalogue, TOPICS},
    config::Secret,
    kafka::{KafkaConfig, create_missing, ensure_topics},
    model::{
        ChatEnded, ChatEndedBy, Decision, Envelope, FeatureValue, MatchDecision, MatchImpression,
        Platform, ReportReason, ReportSubmitted, ScreenViewed, UserBlocked,
    },
    registry_client::RegistryClient,
};
use feedloop_labeler::{
    config::StoreKind,
    dataset::{self, Example, Revision},
    spec::{EXAMPLE_SPEC, LabelSpec},
    window::{Compiled, Impression, Scalar, SourceRef},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Machine, Row, Stat, machine, print_table};
use crate::dev::{Broker, PgCluster, Storage};

#[derive(Debug, Clone)]
pub struct Options {
    /// Approximate number of events (impressions and outcomes) to label.
    pub events: usize,
    pub repetitions: usize,
    /// Rows per Parquet-write repetition.
    pub parquet_rows: usize,
    /// Join-state stores to measure.
    pub stores: Vec<StoreKind>,
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    machine: Machine,
    events: usize,
    impressions: usize,
    rows: Vec<Row>,
    label_counts_feedloop: BTreeMap<String, i64>,
    label_counts_duckdb: BTreeMap<String, i64>,
}

const T0: i64 = 1_795_132_800_000;
const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

/// One generated event (flat, as DuckDB reads it too).
#[derive(Debug, Clone)]
struct Ev {
    kind: &'static str,
    id: Uuid,
    match_id: Uuid,
    user: String,
    other: String,
    time: i64,
    accept: bool,
    ms: i64,
}

fn generate(events: usize) -> Vec<Ev> {
    let mut rng = StdRng::seed_from_u64(42);
    let matches = events / 4;
    let users = (matches / 4).max(8);
    let span = 12 * HOUR;
    let mut out = Vec::with_capacity(events + 8);
    for _ in 0..matches {
        let m = Uuid::new_v4();
        let a = format!("u{}", rng.random_range(0..users));
        let b = format!("u{}", rng.random_range(0..users));
        let t = T0 + rng.random_range(0..span);
        let ev = |kind, user: &str, other: &str, time, accept, ms| Ev {
            kind,
            id: Uuid::new_v4(),
            match_id: m,
            user: user.to_owned(),
            other: other.to_owned(),
            time,
            accept,
            ms,
        };
        for (v, c) in [(&a, &b), (&b, &a)] {
            out.push(ev("impression", v, c, t, false, 0));
            if rng.random_bool(0.8) {
                let dt = rng.random_range(0..15 * MIN);
                out.push(ev("decision", v, c, t + dt, rng.random_bool(0.6), 0));
            }
        }
        if rng.random_bool(0.5) {
            let dt = rng.random_range(MIN..150 * MIN);
            out.push(ev(
                "chat",
                &a,
                &b,
                t + dt,
                false,
                rng.random_range(3_000..300_000),
            ));
        }
        if rng.random_bool(0.05) {
            out.push(ev(
                "report",
                &b,
                &a,
                t + rng.random_range(0..30 * HOUR),
                false,
                0,
            ));
        }
        if rng.random_bool(0.05) {
            out.push(ev(
                "block",
                &a,
                &b,
                t + rng.random_range(0..30 * HOUR),
                false,
                0,
            ));
        }
    }
    // Publish order: event time with a little disorder.
    let mut keyed: Vec<(i64, Ev)> = out
        .into_iter()
        .map(|e| (e.time + rng.random_range(0..5_000), e))
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    let mut out: Vec<Ev> = keyed.into_iter().map(|(_, e)| e).collect();
    out.push(Ev {
        kind: "clock",
        id: Uuid::new_v4(),
        match_id: Uuid::nil(),
        user: "clock".into(),
        other: String::new(),
        time: T0 + 4 * 24 * HOUR,
        accept: false,
        ms: 0,
    });
    out
}

fn envelope(e: &Ev, event_type: &str) -> Envelope {
    Envelope {
        event_id: e.id,
        event_type: event_type.into(),
        user_id: e.user.clone(),
        anonymous_id: None,
        device_id: None,
        session_id: None,
        timestamp: e.time,
        client_timestamp: e.time,
        sent_at: Some(e.time),
        received_at: e.time,
        app_id: "bench".into(),
        platform: Platform::Ios,
        app_version: "1.0".into(),
        os_version: None,
        clock_skew_flagged: false,
    }
}

fn encode(e: &Ev, schemas: &HashMap<&str, Arc<CompiledSchema>>) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    let s = |r: &str| schemas.get(r).context("schema");
    match e.kind {
        "impression" => s("io.feedloop.events.MatchImpression")?.encode(
            &MatchImpression {
                envelope: envelope(e, "match_impression"),
                match_id: e.match_id,
                candidate_id: e.other.clone(),
                request_id: "r".into(),
                model_version: "m7".into(),
                experiment_id: None,
                experiment_arm: Some("a".into()),
                rank: 1,
                score: 0.5,
                features: BTreeMap::from([("x".to_owned(), Some(FeatureValue::Double(0.5)))]),
            },
            &mut out,
        )?,
        "decision" => s("io.feedloop.events.MatchDecision")?.encode(
            &MatchDecision {
                envelope: envelope(e, "match_decision"),
                match_id: e.match_id,
                decision: if e.accept {
                    Decision::Accept
                } else {
                    Decision::Skip
                },
                decision_latency_ms: None,
            },
            &mut out,
        )?,
        "chat" => s("io.feedloop.events.ChatEnded")?.encode(
            &ChatEnded {
                envelope: envelope(e, "chat_ended"),
                match_id: e.match_id,
                duration_ms: e.ms,
                ended_by: ChatEndedBy::Peer,
            },
            &mut out,
        )?,
        "report" => s("io.feedloop.events.ReportSubmitted")?.encode(
            &ReportSubmitted {
                envelope: envelope(e, "report_submitted"),
                match_id: Some(e.match_id),
                reported_user_id: e.other.clone(),
                reason: ReportReason::Spam,
                comment: None,
            },
            &mut out,
        )?,
        "block" => s("io.feedloop.events.UserBlocked")?.encode(
            &UserBlocked {
                envelope: envelope(e, "user_blocked"),
                match_id: Some(e.match_id),
                blocked_user_id: e.other.clone(),
            },
            &mut out,
        )?,
        _ => s("io.feedloop.events.ScreenViewed")?.encode(
            &ScreenViewed {
                envelope: envelope(e, "screen_viewed"),
                name: None,
                category: None,
                properties: BTreeMap::new(),
            },
            &mut out,
        )?,
    }
    Ok(out)
}

/// The events as one Parquet file for DuckDB.
fn events_parquet(events: &[Ev], path: &Path) -> anyhow::Result<()> {
    let n = events.len();
    let mut kind = StringBuilder::with_capacity(n, n * 8);
    let mut id = StringBuilder::with_capacity(n, n * 36);
    let mut m = StringBuilder::with_capacity(n, n * 36);
    let mut user = StringBuilder::with_capacity(n, n * 8);
    let mut other = StringBuilder::with_capacity(n, n * 8);
    let mut time = Int64Builder::with_capacity(n);
    let mut accept = BooleanBuilder::with_capacity(n);
    let mut ms = Int64Builder::with_capacity(n);
    for e in events {
        kind.append_value(e.kind);
        id.append_value(e.id.to_string());
        m.append_value(e.match_id.to_string());
        user.append_value(&e.user);
        other.append_value(&e.other);
        time.append_value(e.time);
        accept.append_value(e.accept);
        ms.append_value(e.ms);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("kind", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("match_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("other", DataType::Utf8, false),
        Field::new("time_ms", DataType::Int64, false),
        Field::new("accept", DataType::Boolean, false),
        Field::new("duration_ms", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(kind.finish()),
        Arc::new(id.finish()),
        Arc::new(m.finish()),
        Arc::new(user.finish()),
        Arc::new(other.finish()),
        Arc::new(time.finish()),
        Arc::new(accept.finish()),
        Arc::new(ms.finish()),
    ];
    let batch = RecordBatch::try_new(schema, columns)?;
    std::fs::write(path, dataset::parquet_bytes(&batch)?)?;
    Ok(())
}

/// The same labels as the example spec, in one DuckDB query.
const DUCKDB_SCRIPT: &str = r#"
import json, sys, time, duckdb
path, reps = sys.argv[1], int(sys.argv[2])
q = f"""
WITH ev AS (SELECT * FROM read_parquet('{path}')),
imp AS (SELECT event_id, match_id, user_id AS viewer, other AS candidate, time_ms,
               least(user_id, other) AS lo, greatest(user_id, other) AS hi FROM ev WHERE kind = 'impression'),
acc AS (SELECT i.event_id, arg_min(d.accept, d.time_ms::varchar || d.event_id) AS accepted
        FROM imp i JOIN ev d ON d.kind = 'decision' AND d.match_id = i.match_id AND d.user_id = i.viewer
         AND d.time_ms >= i.time_ms AND d.time_ms < i.time_ms + 600000 GROUP BY i.event_id),
chat AS (SELECT i.event_id, max(c.duration_ms) * 0.001 AS secs
         FROM imp i JOIN ev c ON c.kind = 'chat' AND c.match_id = i.match_id
          AND c.time_ms >= i.time_ms AND c.time_ms < i.time_ms + 7200000 GROUP BY i.event_id),
rep AS (SELECT DISTINCT i.event_id FROM imp i JOIN ev r ON r.kind = 'report'
         AND least(r.user_id, r.other) = i.lo AND greatest(r.user_id, r.other) = i.hi
         AND r.time_ms >= i.time_ms AND r.time_ms < i.time_ms + 86400000),
blk AS (SELECT DISTINCT i.event_id FROM imp i JOIN ev b ON b.kind = 'block'
         AND least(b.user_id, b.other) = i.lo AND greatest(b.user_id, b.other) = i.hi
         AND b.time_ms >= i.time_ms AND b.time_ms < i.time_ms + 86400000)
SELECT CASE
  WHEN rep.event_id IS NOT NULL OR blk.event_id IS NOT NULL OR acc.accepted = false THEN 'negative'
  WHEN acc.accepted AND chat.secs >= 30 THEN 'positive'
  WHEN acc.accepted AND chat.secs < 30 THEN 'negative'
  ELSE 'unknown' END AS label, count(*) AS n
FROM imp LEFT JOIN acc USING (event_id) LEFT JOIN chat USING (event_id)
LEFT JOIN rep USING (event_id) LEFT JOIN blk USING (event_id)
GROUP BY 1 ORDER BY 1
"""
times, counts = [], {}
for _ in range(reps):
    con = duckdb.connect()
    start = time.perf_counter()
    counts = dict(con.execute(q).fetchall())
    times.append(time.perf_counter() - start)
    con.close()
print(json.dumps({"seconds": times, "counts": counts}))
"#;

/// Reads `records` records of `topic` from its beginning with a plain consumer polled in a
/// loop on its own thread (the labeler's fetch settings, nothing decoded); returns records per
/// second.
async fn bare_read_rate(kafka: &KafkaConfig, topic: &str, records: usize) -> anyhow::Result<f64> {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
    };
    let consumer: BaseConsumer = kafka
        .client_config("bench-bare-consumer")
        .set("group.id", format!("bench-bare-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120);
        let mut read = 0usize;
        while read < records {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(_)) => read += 1,
                Some(Err(e)) => bail!("bare consumer: {e}"),
                None if Instant::now() > deadline => {
                    bail!("bare consumer: {read} of {records} records in time")
                }
                None => {}
            }
        }
        Ok(read as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}

fn duckdb_python() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = root.join("target/bench-venv");
    super::ensure_venv(&venv, "import duckdb", &["duckdb"])?;
    Ok(venv.join("bin/python"))
}

/// Rows per Parquet file in the write measurement: the labeler's default `commit_max_rows`, the
/// most one commit writes (spread over the hourly partitions it touches).
const PARQUET_FILE_ROWS: usize = 200_000;

/// `rows` examples of the example spec, as the labeler hands them to the writer.
fn parquet_examples(rows: usize) -> anyhow::Result<(LabelSpec, Vec<Example>)> {
    let spec = LabelSpec::parse("example", EXAMPLE_SPEC)?;
    let compiled = Compiled::new(spec.clone());
    let mut rng = StdRng::seed_from_u64(7);
    let examples = (0..rows)
        .map(|i| {
            let impression = Impression {
                event_id: Uuid::new_v4(),
                match_id: Uuid::new_v4(),
                viewer_id: format!("u{}", rng.random_range(0..100_000)),
                candidate_id: format!("u{}", rng.random_range(0..100_000)),
                time_ms: T0 + i as i64,
                request_id: "r".into(),
                model_version: "m7".into(),
                experiment_id: None,
                experiment_arm: Some("a".into()),
                rank: 1,
                score: 0.5,
                features: BTreeMap::from([("x".to_owned(), Some(FeatureValue::Double(0.5)))]),
                source: SourceRef {
                    topic: "feedloop.events".into(),
                    partition: 0,
                    offset: i as i64,
                },
            };
            let mut labeled = compiled.label(&impression, &[]);
            labeled.values[0].1 = Scalar::Bool(rng.random_bool(0.5));
            Example {
                example_id: compiled.example_id(&impression),
                version: 1,
                impression,
                labeled,
                revision: Revision::First,
            }
        })
        .collect();
    Ok((spec, examples))
}

/// Rows/s of building the Arrow batch and encoding the Parquet file (zstd) for every file of
/// `examples`, `PARQUET_FILE_ROWS` rows each, on the calling thread.
fn parquet_rows_per_second(spec: &LabelSpec, examples: &[Example]) -> anyhow::Result<f64> {
    let schema = dataset::arrow_schema(spec);
    let started = Instant::now();
    let mut bytes = 0;
    for rows in examples.chunks(PARQUET_FILE_ROWS) {
        let batch = dataset::record_batch(spec, &schema, rows)?;
        bytes += dataset::parquet_bytes(&batch)?.len();
    }
    let secs = started.elapsed().as_secs_f64();
    if bytes == 0 {
        bail!("empty Parquet files");
    }
    Ok(examples.len() as f64 / secs)
}

struct Setup {
    kafka: KafkaConfig,
    registry: String,
    password: String,
    postgres: String,
    topic_prefix: String,
    impressions: usize,
    events: usize,
}

/// The labeler's `inputs.idle_timeout_ms` in the bench (see `labeler_run`).
const BENCH_IDLE_TIMEOUT_MS: u64 = 200;

/// A fresh control database and label spec for one run of the labeler over the bench's log.
async fn labeler_config(
    setup: &Setup,
    store: StoreKind,
    dataset: &str,
    dir: &Path,
) -> anyhow::Result<(feedloop_labeler::Config, PgPool)> {
    let spec_path = dir.join("spec.toml");
    std::fs::write(
        &spec_path,
        EXAMPLE_SPEC.replace(
            "name = \"match_outcomes\"",
            &format!("name = \"{dataset}\""),
        ),
    )?;
    let control = crate::datasets::fresh_control_database(&setup.postgres, dataset).await?;
    let mut cfg = feedloop_labeler::Config::from_defaults()?;
    cfg.specs.files = vec![spec_path.display().to_string()];
    cfg.inputs.events_topic = format!("{}.events", setup.topic_prefix);
    cfg.inputs.cdc_prefix = setup.topic_prefix.clone();
    cfg.datasets.root = dir.join("datasets").display().to_string();
    cfg.state.store = store;
    // A partition read to its end holds the watermark for the idle timeout (5 s by default)
    // before the labeler trusts that nothing more is coming: a fixed wait at the end of the
    // log, not a cost per event. The bench measures the rate, so it waits 0.2 s.
    cfg.inputs.idle_timeout_ms = BENCH_IDLE_TIMEOUT_MS;
    cfg.kafka = setup.kafka.clone();
    cfg.registry.url = setup.registry.clone();
    cfg.registry.password = Secret::new(setup.password.clone());
    cfg.control.url = Secret::new(control.clone());
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.validate()?;
    let pool = PgPool::connect(&control).await?;
    Ok((cfg, pool))
}

fn store_name(store: StoreKind) -> &'static str {
    match store {
        StoreKind::Postgres => "pg",
        StoreKind::Local => "local",
        StoreKind::Scylla => "scylla",
    }
}

/// Rows of the latest version of every partition of `dataset`.
async fn committed_rows(pool: &PgPool, dataset: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(row_count), 0)::bigint FROM (SELECT DISTINCT ON (partition) row_count
         FROM labeler.partitions WHERE dataset = $1 ORDER BY partition, version DESC) v",
    )
    .bind(dataset)
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

/// Polls `done` every 50 ms until it holds, for at most 30 minutes.
async fn wait_until<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(1800);
    while !done().await? {
        if Instant::now() > deadline {
            bail!("{what}: not after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn labeler_run(
    setup: &Setup,
    store: StoreKind,
    rep: usize,
) -> anyhow::Result<(f64, BTreeMap<String, i64>)> {
    let dataset = format!("bench_{}_{rep}", store_name(store));
    let dir = tempfile::tempdir()?;
    let (cfg, pool) = labeler_config(setup, store, &dataset, dir.path()).await?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let running = feedloop_labeler::start(cfg, shutdown.clone()).await?;
    let target = setup.impressions as i64;
    wait_until("every row committed", || async {
        Ok(committed_rows(&pool, &dataset).await >= target)
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let mut counts = BTreeMap::new();
    let manifests: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT ON (partition) manifest FROM labeler.partitions WHERE dataset = $1
         ORDER BY partition, version DESC",
    )
    .bind(&dataset)
    .fetch_all(&pool)
    .await?;
    for m in manifests {
        let m: feedloop_labeler::dataset::Manifest = serde_json::from_str(&m)?;
        for (k, v) in m.label_counts {
            *counts.entry(k).or_insert(0) += v;
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    pool.close().await;
    Ok((setup.events as f64 / secs, counts))
}

/// Records of the bench's log that `dataset`'s committed position does not cover yet.
async fn uncommitted_records(
    pool: &PgPool,
    dataset: &str,
    log_end: &BTreeMap<String, i64>,
) -> anyhow::Result<i64> {
    let offsets: Option<String> =
        sqlx::query_scalar("SELECT offsets::text FROM labeler.positions WHERE dataset = $1")
            .bind(dataset)
            .fetch_optional(pool)
            .await?;
    let offsets: BTreeMap<String, i64> = match offsets {
        Some(o) => serde_json::from_str(&o)?,
        None => BTreeMap::new(),
    };
    Ok(log_end
        .iter()
        .map(|(tp, end)| (end - offsets.get(tp).copied().unwrap_or(0)).max(0))
        .sum())
}

/// The end offset of every partition of the bench's input topics, keyed as the labeler's
/// position keys them (`topic/partition`).
fn log_end(kafka: &KafkaConfig, topics: &[String]) -> anyhow::Result<BTreeMap<String, i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka.client_config("bench-labeler-ends").create()?;
    let mut ends = BTreeMap::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in md.topics() {
            for p in t.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                if high > 0 {
                    ends.insert(format!("{topic}/{}", p.id()), high);
                }
            }
        }
    }
    Ok(ends)
}

/// A labeler crashes after the first commit that covers half the log, while it is still
/// reading (it commits every second, so every store crashes at about the same point), and a
/// new one starts in its place: the time from that start until the committed position covers
/// the whole log, and how many records it had to read again (the log after the crashed
/// labeler's committed offsets). The new labeler restores what the crashed one committed of its
/// join state: nothing for a shared store, the checkpoint for local state.
async fn restart_run(
    setup: &Setup,
    store: StoreKind,
    rep: usize,
    log_end: &BTreeMap<String, i64>,
) -> anyhow::Result<(f64, i64)> {
    let dataset = format!("bench_restart_{}_{rep}", store_name(store));
    let dir = tempfile::tempdir()?;
    let (cfg, pool) = labeler_config(setup, store, &dataset, dir.path()).await?;
    let mut crashing = cfg.clone();
    crashing.datasets.commit_interval_ms = 1000;
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(crashing, shutdown.clone()).await?;
    let half = log_end.values().sum::<i64>() / 2;
    wait_until("a commit covering half the log", || async {
        Ok(uncommitted_records(&pool, &dataset, log_end).await? <= half)
    })
    .await?;
    running.task.abort();
    let _ = running.task.await;
    shutdown.cancel();
    // A crashed process's connections close with it, and Postgres releases its dataset lock at
    // once; an aborted task's go when the runtime drops them, a moment later.
    wait_until("the crashed labeler's dataset lock released", || async {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&pool)
        .await?;
        Ok(held == 0)
    })
    .await?;
    let backlog = uncommitted_records(&pool, &dataset, log_end).await?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let running = feedloop_labeler::start(cfg, shutdown.clone()).await?;
    wait_until("caught up after the restart", || async {
        Ok(uncommitted_records(&pool, &dataset, log_end).await? == 0)
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    pool.close().await;
    Ok((secs, backlog))
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    println!("Starting Postgres, the broker and the registry…");
    let pg = PgCluster::start().await?;
    let broker = Broker::start(Storage::Memory).await?;
    let kafka = KafkaConfig::new(broker.bootstrap());
    ensure_topics(&kafka, TOPICS).await?;
    let shutdown = CancellationToken::new();
    let (registry, password) = super::registry(&pg.url(), &shutdown).await?;
    let prefix = "benchlabeler";
    let topic = format!("{prefix}.events");
    create_missing(
        &kafka,
        &[
            (topic.as_str(), 6, false),
            (&format!("{prefix}.app.reports"), 3, true),
            (&format!("{prefix}.app.blocks"), 3, true),
        ],
    )
    .await?;

    println!("Generating and publishing about {} events…", opts.events);
    let events = generate(opts.events);
    let impressions = events.iter().filter(|e| e.kind == "impression").count();
    let client = RegistryClient::new(
        &registry,
        Some(("feedloop".to_owned(), Secret::new(password.clone()))),
        "",
        Duration::from_secs(10),
    )?;
    let catalogue = Catalogue::embedded()?;
    let mut schemas = HashMap::new();
    for r in [
        "io.feedloop.events.MatchImpression",
        "io.feedloop.events.MatchDecision",
        "io.feedloop.events.ChatEnded",
        "io.feedloop.events.ReportSubmitted",
        "io.feedloop.events.UserBlocked",
        "io.feedloop.events.ScreenViewed",
    ] {
        let s = client
            .register_compiled(&format!("{topic}-{r}"), &catalogue.composed(r)?)
            .await?;
        schemas.insert(r, s);
    }
    let producer: FutureProducer = kafka
        .client_config("bench-labeler")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut pending = Vec::with_capacity(events.len());
    for e in &events {
        let value = encode(e, &schemas)?;
        let key = e.match_id.to_string();
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, _)) => {
                    if pending.len() > 100_000 {
                        for f in pending.drain(..) {
                            let _ = f.await;
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let _ = e;
                    }
                }
            }
        }
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-labeler");
    std::fs::create_dir_all(&work)?;
    let events_file = work.join("events.parquet");
    events_parquet(&events, &events_file)?;

    let setup = Setup {
        kafka,
        registry,
        password,
        postgres: pg.url(),
        topic_prefix: prefix.to_owned(),
        impressions,
        events: events.len(),
    };
    let mut rows = Vec::new();
    let mut feedloop_counts = BTreeMap::new();
    println!("DuckDB: the same labels in one batch query…");
    let out = Command::new(duckdb_python()?)
        .args(["-c", DUCKDB_SCRIPT])
        .arg(&events_file)
        .arg(opts.repetitions.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "DuckDB query failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let duck: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let duck_rates: Vec<f64> = duck["seconds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_f64)
        .map(|s| events.len() as f64 / s)
        .collect();
    let duck_counts: BTreeMap<String, i64> = serde_json::from_value(duck["counts"].clone())?;
    let duck = Stat::of(duck_rates);
    // The broker's limit for any consumer of the log: a bare consumer reading the events.
    let mut bare = Vec::new();
    for _ in 0..opts.repetitions {
        let rate = bare_read_rate(&setup.kafka, &topic, events.len()).await?;
        println!("  bare consumer {rate:>9.0} events/s");
        bare.push(rate);
    }
    let bare = Stat::of(bare);
    rows.push(Row {
        measurement: "log read limit: a bare consumer reading the events (no decoding)".into(),
        unit: "events/s".into(),
        ratio: Some(bare.median / duck.median),
        feedloop: bare,
        against: "DuckDB batch query".into(),
        peer: Some(duck.clone()),
        goal: "diagnostic: the labeler cannot read faster".into(),
    });
    for &store in &opts.stores {
        let mut rates = Vec::new();
        for rep in 0..opts.repetitions {
            let (rate, counts) = labeler_run(&setup, store, rep).await?;
            println!("  labeler ({store:?} state) {rate:>9.0} events/s");
            if counts != duck_counts {
                bail!("labels differ from DuckDB's: feedloop {counts:?}, DuckDB {duck_counts:?}");
            }
            feedloop_counts = counts;
            rates.push(rate);
        }
        let stat = Stat::of(rates);
        rows.push(Row {
            measurement: format!("labeler, log → committed Parquet ({store:?} join state)"),
            unit: "events/s".into(),
            ratio: Some(stat.median / duck.median),
            feedloop: stat,
            against: "DuckDB batch query".into(),
            peer: Some(duck.clone()),
            goal: "≥200k events/s; ≥1× DuckDB".into(),
        });
    }
    let inputs = [
        topic.clone(),
        format!("{prefix}.app.reports"),
        format!("{prefix}.app.blocks"),
    ];
    let ends = log_end(&setup.kafka, &inputs)?;
    for &store in &opts.stores {
        let mut secs = Vec::new();
        let mut backlogs = Vec::new();
        for rep in 0..opts.repetitions {
            let (s, backlog) = restart_run(&setup, store, rep, &ends).await?;
            println!(
                "  restart ({store:?} state) caught up in {s:.2} s, {backlog} records read again"
            );
            secs.push(s);
            backlogs.push(backlog as f64);
        }
        let backlog = Stat::of(backlogs).median;
        rows.push(Row {
            measurement: format!(
                "labeler restart after a crash → caught up ({store:?} join state; median {backlog:.0} records after the committed offsets)"
            ),
            unit: "s".into(),
            feedloop: Stat::of(secs),
            against: "goal".into(),
            peer: Some(Stat::of(vec![10.0])),
            ratio: None,
            goal: "< 10 s for the benchmark's state".into(),
        });
    }
    let n = opts.parquet_rows;
    let reps = opts.repetitions;
    let parquet = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let (spec, examples) = parquet_examples(n)?;
        // One file first, untimed: the allocator's first touch of fresh pages is start-up cost,
        // not the steady state of a labeler that writes a commit after another.
        parquet_rows_per_second(&spec, &examples[..examples.len().min(PARQUET_FILE_ROWS)])?;
        (0..reps)
            .map(|_| parquet_rows_per_second(&spec, &examples))
            .collect()
    })
    .await??;
    rows.push(super::goal_row(
        "Parquet write (build + encode, files of 200k rows, one core)",
        "rows/s",
        parquet,
        1_000_000.0,
        "≥1M rows/s per core",
    ));
    rows.push(super::peak_rss_row("labeler and the generated events"));
    print_table("feedloop bench labeler", &machine, &rows);
    println!("labels: feedloop {feedloop_counts:?}, DuckDB {duck_counts:?}");
    let report = Report {
        scenario: "labeler",
        machine,
        events: events.len(),
        impressions,
        rows,
        label_counts_feedloop: feedloop_counts,
        label_counts_duckdb: duck_counts,
    };
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&report)?)?;
    println!("Report written to {}", opts.out.display());
    shutdown.cancel();
    Ok(())
}
