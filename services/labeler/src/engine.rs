//! One pipeline per dataset: read the inputs from the committed offsets, keep join state,
//! emit examples as the watermark passes their close, and commit files, manifests and offsets
//! together.
//!
//! Commit protocol (exactly once across crashes and replays):
//! 1. join state writes are idempotent upserts, flushed before the commit;
//! 2. under the shared suppression lock (checked first: a user erased since the rows were
//!    labeled makes the commit start again without them), the Parquet files are written and
//!    the examples published to `feedloop.labels.<dataset>` and acknowledged, the two encoded
//!    side by side;
//! 3. in the same transaction, still under the lock, the partition versions (manifests), the
//!    per-user index, and the dataset's position (next offsets, per-partition watermarks,
//!    emitted-through watermark) are inserted; after COMMIT, each manifest's JSON copy is
//!    written next to its files;
//! 4. the new versions are announced on `feedloop.datasets.partitions`, and join state that
//!    committed examples no longer need expires.
//!
//! A crash before 3 leaves files no manifest in Postgres references: the next session deletes
//! them and resumes from the previous position, and replays produce the same examples (same
//! ids). Examples on the labels topic are at-least-once: a replay may publish an
//! (example_id, version) again, which consumers drop by id.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use feedloop_core::{
    avro::{CodecError, CompiledSchema, wire},
    catalogue::{DEADLETTER_TOPIC, PARTITIONS_TOPIC},
    error::{Classify, ErrorClass},
    kafka::{KafkaConfig, QuietEof},
    model::{DeadLetter, DeadLetterReason, FeatureValue},
    registry_client::{RegistryClient, RegistryClientError},
    resume::{Resume, STALL, Step},
};
use futures_util::{StreamExt, stream::select_all};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, StreamConsumer},
    error::KafkaError,
    message::{BorrowedMessage, Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde::Serialize;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::Config,
    dataset::{
        self, DataFile, DatasetError, Example, Manifest, Revision, Root, data_file_rel,
        manifest_rel,
    },
    erasure,
    input::{self, Decoded, Input},
    manifest::{NextManifest, next_manifest},
    observability::{self, RecordCounts, RecordKind},
    spec::{Label, LatePolicy, TYPED_OUTCOMES},
    state::{
        CloseCursor, Emission, Emitted, StateError, StateStore, StoredImpression,
        checkpoint::{self, Checkpoint, Segment, SegmentRef},
        decode_emissions, encode_emissions,
    },
    window::{Compiled, Outcome, Scalar, SourceRef, Watermarks, match_key, tp},
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("control database: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryClientError),
    #[error("encoding: {0}")]
    Codec(#[from] CodecError),
    #[error("corrupt position of dataset {dataset}: {message}")]
    Position { dataset: String, message: String },
    #[error(
        "dataset {dataset} was built with label spec {committed}, the configured spec hashes to {configured}: \
         give a changed spec a new dataset name, or rebuild it with `feedloop replay`"
    )]
    SpecChanged {
        dataset: String,
        committed: String,
        configured: String,
    },
    #[error(
        "dataset {dataset} was committed with its join state in {committed}, but the configured \
         state.store keeps it in {configured}: set state.store back, or rebuild the dataset with \
         `feedloop replay`"
    )]
    StoreChanged {
        dataset: String,
        committed: &'static str,
        configured: &'static str,
    },
    #[error("another labeler holds dataset {0}; waiting for it to stop")]
    Locked(String),
    #[error("input topic {0} does not exist (is cdc running with the same prefix?)")]
    MissingTopic(String),
    #[error("dataset {0}: users were erased while a commit was in flight; redoing it without them")]
    ErasureRaced(String),
}

impl Classify for EngineError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::State(StateError::Postgres(e)) | Self::Postgres(e) => e.class(),
            Self::State(StateError::Scylla(_))
            | Self::Dataset(DatasetError::Store(_))
            | Self::Locked(_)
            | Self::MissingTopic(_)
            | Self::ErasureRaced(_) => ErrorClass::Unavailable,
            Self::Kafka(e) => e.class(),
            Self::Registry(RegistryClientError::Codec(_)) => ErrorClass::BadInput,
            Self::Registry(_) => ErrorClass::Unavailable,
            Self::State(StateError::Corrupt(_))
            | Self::Dataset(_)
            | Self::Codec(_)
            | Self::Position { .. }
            | Self::SpecChanged { .. }
            | Self::StoreChanged { .. } => ErrorClass::Internal,
        }
    }
}

/// What the session does after a record.
enum Flow {
    Next,
    /// Read the record's partition again from this offset.
    Seek(i64),
}

/// How a commit's transaction failed.
enum Recorded {
    /// Before COMMIT: nothing was recorded.
    Not(EngineError),
    /// COMMIT itself failed: it may have gone through (with these manifests).
    Unknown(EngineError, Vec<Manifest>),
}

/// The committed sequence number of `dataset`'s position.
async fn committed_seq(control: &PgPool, dataset: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT seq FROM labeler.positions WHERE dataset = $1")
        .bind(dataset)
        .fetch_optional(control)
        .await
}

/// A record whose handling failed this many times in a row, for a reason other than an
/// unavailable dependency, is dead-lettered when the next session reaches it.
const RECORD_STRIKES: u32 = 3;

/// How old an unreferenced data file must be before a start deletes it.
const ORPHAN_GRACE_MS: i64 = 15 * 60 * 1000;

/// When a data file was created: its name is `part-<UUIDv7>.parquet`.
fn file_time_ms(file: &str) -> Option<i64> {
    let id = file.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let (secs, nanos) = Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    Some(secs as i64 * 1000 + i64::from(nanos / 1_000_000))
}

/// Every viewer and candidate of `rows`, once each.
fn row_users(rows: &[Example]) -> Vec<String> {
    rows.iter()
        .flat_map(|r| [&r.impression.viewer_id, &r.impression.candidate_id])
        .collect::<HashSet<_>>()
        .into_iter()
        .cloned()
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What every dataset pipeline shares.
#[derive(Clone)]
pub struct Shared {
    pub cfg: Arc<Config>,
    pub control: PgPool,
    pub state: Arc<dyn StateStore>,
    pub root: Root,
    pub registry: Arc<RegistryClient>,
    pub producer: FutureProducer,
    pub deadletter: Arc<CompiledSchema>,
    pub partitions_schema: Arc<CompiledSchema>,
    pub mode: Mode,
    /// Input records (`topic/partition/offset`) that failed [`RECORD_STRIKES`] sessions in a
    /// row, with the last error: dead-lettered when read again.
    pub poison: Arc<std::sync::Mutex<HashMap<String, String>>>,
}

/// How a pipeline runs.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Follow the log until shut down; publish examples and partition announcements.
    Serve,
    /// Rebuild: read the log to its end, commit, and stop; publish nothing (no labels, no
    /// announcements, so schedulers are not triggered). `records` counts what was read.
    Replay {
        records: Arc<std::sync::atomic::AtomicU64>,
    },
}

impl Mode {
    fn publishes(&self) -> bool {
        matches!(self, Mode::Serve)
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("root", &self.root.uri)
            .finish_non_exhaustive()
    }
}

/// A dataset: its compiled spec and its labels schema.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub spec: Arc<Compiled>,
    pub labels_schema: Arc<CompiledSchema>,
    pub labels_topic: String,
}

impl Dataset {
    fn name(&self) -> &str {
        &self.spec.spec.name
    }
}

/// The input topics of a dataset: the events topic and the cdc topics of its spec's tables.
pub fn input_topics(cfg: &Config, spec: &Compiled) -> Vec<(String, Option<String>)> {
    let mut topics = vec![(cfg.inputs.events_topic.clone(), None)];
    for table in spec.spec.cdc_tables() {
        topics.push((format!("{}.{table}", cfg.inputs.cdc_prefix), Some(table)));
    }
    topics
}

/// Runs the dataset's pipeline until `shutdown`, restarting from the last commit after errors.
///
/// Two sessions in a row that fail delivering while the broker answers
/// ([`ProducerHealth`](feedloop_core::kafka::ProducerHealth)) replace the producer: the broker
/// lost its state. The next session starts from the last commit, so nothing is published twice
/// but what the labels topic's at-least-once allows.
pub async fn run(
    mut shared: Shared,
    dataset: Dataset,
    shutdown: CancellationToken,
    ready: Arc<AtomicBool>,
) {
    let mut delay = Duration::from_millis(200);
    let mut health = feedloop_core::kafka::ProducerHealth::new(2);
    // The record the last sessions failed on, and how many times in a row.
    let mut strikes: Option<(String, u32)> = None;
    // Sessions in a row that failed, their dependencies answering, on no record in particular
    // (in a flush of the join state), and how carefully the next one goes.
    let mut unblamed = 0u32;
    let mut careful = 0u64;
    loop {
        let mut failed_at = Failed {
            careful,
            ..Failed::default()
        };
        match session(&shared, &dataset, &shutdown, &ready, &mut failed_at).await {
            Ok(()) => return,
            Err(e) => {
                ready.store(false, Ordering::Release);
                observability::restart(dataset.name());
                tracing::warn!(dataset = dataset.name(), error = %e, "Labeler pipeline failed; restarting from the last commit");
                // A record that fails every session while its dependencies answer would stop
                // the dataset for good: after RECORD_STRIKES, it is dead-lettered instead.
                // A flush that fails with no record to blame, twice: the next session flushes
                // after each of the records the failed one read, so that the failure is
                // pinned on one and the strikes below can set it aside.
                if failed_at.at.is_none() && e.class() != ErrorClass::Unavailable {
                    unblamed += 1;
                    if unblamed >= 2 && careful == 0 {
                        careful = failed_at.handled.saturating_add(1);
                        tracing::warn!(
                            dataset = dataset.name(),
                            records = careful,
                            "Failing twice on no record in particular; the next sessions flush after every record to find it"
                        );
                    }
                } else {
                    unblamed = 0;
                }
                strikes = match (failed_at.at, strikes.take()) {
                    (Some(at), _) if e.class() == ErrorClass::Unavailable => Some((at, 0)),
                    (Some(at), Some((last, n))) if at == last => Some((at, n + 1)),
                    (Some(at), _) => Some((at, 1)),
                    (None, kept) => kept,
                };
                if let Some((at, n)) = &strikes
                    && *n >= RECORD_STRIKES
                {
                    tracing::error!(dataset = dataset.name(), record = %at, error = %e, "A record failed every attempt; it goes to the dead-letter topic");
                    if let Ok(mut poison) = shared.poison.lock() {
                        poison.insert(at.clone(), e.to_string());
                    }
                    careful = 0;
                    unblamed = 0;
                    strikes = None;
                }
                if !matches!(e, EngineError::Kafka(KafkaError::MessageProduction(_))) {
                    health.delivered();
                } else if health.failed(&shared.cfg.kafka, "labeler").await {
                    match shared
                        .cfg
                        .kafka
                        .producer("feedloop-labeler", &shared.cfg.producer)
                    {
                        Ok(p) => {
                            shared.producer = p;
                            observability::producer_reset(dataset.name());
                        }
                        Err(e) => tracing::error!(error = %e, "Cannot create a new Kafka producer"),
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Where a session failed, and how far it got.
#[derive(Debug, Default)]
pub(crate) struct Failed {
    /// The input record (`topic/partition/offset`) it failed on, when one is to blame.
    at: Option<String>,
    /// Input records it handled.
    handled: u64,
    /// Flush the join state after each of the first this many records (0: as usual).
    careful: u64,
}

pub(crate) async fn session(
    shared: &Shared,
    dataset: &Dataset,
    shutdown: &CancellationToken,
    ready: &AtomicBool,
    failed_at: &mut Failed,
) -> Result<(), EngineError> {
    let name = dataset.name().to_owned();
    // One writer per dataset: a session-level advisory lock on its own connection.
    let mut lock = shared.control.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar(erasure::DATASET_LOCK_SQL)
        .bind(&name)
        .fetch_one(&mut lock)
        .await?;
    if !locked {
        return Err(EngineError::Locked(name));
    }
    // Every session makes sure the labels topic exists: a broker that lost its state lost it.
    if let Err(e) = feedloop_core::kafka::create_missing(
        &shared.cfg.kafka,
        &[(
            dataset.labels_topic.as_str(),
            shared.cfg.datasets.labels_partitions,
            // Keyed by example id: compaction keeps each example's latest version, and an
            // erasure's tombstones remove every version of its examples.
            true,
        )],
    )
    .await
    {
        tracing::warn!(error = %e, topic = %dataset.labels_topic, "Could not create the labels topic; continuing");
    }
    let mut p = Pipeline::open(shared.clone(), dataset.clone()).await?;
    let consumers = p.consumers(shutdown).await?;
    let mut merged = select_all(
        consumers
            .iter()
            .enumerate()
            .map(|(i, (_, _, c))| c.stream().map(move |m| (i, m))),
    );
    ready.store(true, Ordering::Release);
    tracing::info!(dataset = %name, "Labeler pipeline running");
    let interval = shared.cfg.commit_interval();
    let mut next_commit = tokio::time::Instant::now() + interval;
    let mut since_advance = 0usize;
    let mut stall_check = tokio::time::Instant::now() + STALL;
    loop {
        if tokio::time::Instant::now() >= stall_check {
            stall_check = tokio::time::Instant::now() + STALL / 2;
            for (topic, partition, to) in p.stalled() {
                tracing::debug!(dataset = %name, topic, partition, rewind_to = to, "A read got nothing; reading again from further back");
                if let Some((_, _, c)) = consumers.iter().find(|(t, _, _)| *t == topic) {
                    c.seek(
                        &topic,
                        partition,
                        Offset::Offset(to),
                        Duration::from_secs(10),
                    )?;
                }
            }
        }
        let item = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                p.advance().await?;
                p.commit(true).await?;
                tracing::info!(dataset = %name, "Labeler pipeline stopped after a final commit");
                return Ok(());
            }
            item = merged.next() => item,
            () = tokio::time::sleep_until(next_commit.min(stall_check)) => None,
        };
        match item {
            Some((i, Ok(msg))) => {
                let (topic, table, _) = &consumers[i];
                failed_at.handled += 1;
                let handled = match p.handle(topic, table.as_deref(), &msg).await {
                    Ok(Flow::Next) if failed_at.handled <= failed_at.careful => {
                        p.flush().await.map(|()| Flow::Next)
                    }
                    other => other,
                };
                match handled {
                    Ok(Flow::Next) => {}
                    Ok(Flow::Seek(to)) => {
                        consumers[i].2.seek(
                            topic,
                            msg.partition(),
                            Offset::Offset(to),
                            Duration::from_secs(10),
                        )?;
                        continue;
                    }
                    Err(e) => {
                        failed_at.at =
                            Some(format!("{topic}/{}/{}", msg.partition(), msg.offset()));
                        return Err(e);
                    }
                }
                since_advance += 1;
                if let Mode::Replay { records } = &shared.mode {
                    records.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some((i, Err(KafkaError::PartitionEOF(partition)))) => {
                let (topic, table, consumer) = &consumers[i];
                if let Some(to) = p.ended(topic, table.as_deref(), partition) {
                    consumer.seek(
                        topic,
                        partition,
                        Offset::Offset(to),
                        Duration::from_secs(10),
                    )?;
                    continue;
                }
                tracing::debug!(dataset = %name, topic = %consumers[i].0, partition, "Reached the end of a partition");
                p.watermarks
                    .reached_end(&consumers[i].0, partition, std::time::Instant::now());
                since_advance = usize::MAX;
            }
            Some((_, Err(e))) => return Err(e.into()),
            None => since_advance = usize::MAX,
        }
        if since_advance >= 2000 {
            p.advance().await?;
            since_advance = 0;
        }
        if matches!(shared.mode, Mode::Replay { .. }) && p.watermarks.all_at_end() {
            p.advance().await?;
            p.commit(true).await?;
            tracing::info!(dataset = %name, "Replay reached the end of the log");
            return Ok(());
        }
        let due = tokio::time::Instant::now() >= next_commit;
        if due {
            // An erasure is progress: an idle labeler with local state still commits a
            // snapshot without the users.
            p.poll_suppressions().await?;
        }
        // Caught up with every input: commit now rather than at the next interval, so that a
        // quiet log does not hold finished examples back.
        let caught_up = since_advance == 0 && p.watermarks.all_at_end() && p.has_work();
        if p.due.len() >= shared.cfg.datasets.commit_max_rows
            || (due && p.has_progress())
            || caught_up
        {
            p.advance().await?;
            p.commit(false).await?;
        }
        if due {
            next_commit = tokio::time::Instant::now() + interval;
        }
    }
}

/// The committed position of a dataset.
#[derive(Debug)]
struct Position {
    seq: i64,
    offsets: BTreeMap<String, i64>,
    starts: BTreeMap<String, (i64, i64)>,
    watermarks: BTreeMap<String, i64>,
    emitted: CloseCursor,
    held: Vec<Held>,
    late: BTreeMap<String, i64>,
    /// The local join state's checkpoint (JSON), `None` if the state is in a shared store.
    checkpoint: Option<String>,
    suppression_through: i64,
}

/// Where a local join state is said to be, and a shared one, in errors.
const LOCAL_STATE: &str = "local memory with checkpoints";
const SHARED_STATE: &str = "a shared store (postgres or scylla)";

/// Records read past a late impression before it is emitted: the outcomes a phone sent with
/// it (the same batch, published together) are read by then. Its partition read to its end
/// releases it earlier.
pub const LATE_HOLD_RECORDS: i64 = 1000;

/// A late impression waiting for the outcomes read with it (committed with the position; the
/// impression itself is in the join state).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct Held {
    example_id: Uuid,
    match_id: Uuid,
    close_ms: i64,
    time_ms: i64,
    topic: String,
    partition: i32,
    /// Released once the partition's next offset to read is here.
    release_at: i64,
}

/// An outcome read after examples it may join were emitted, with the emission cursor's close
/// time when it was read: the correction horizon is judged then.
#[derive(Debug, Clone)]
struct Touched {
    outcome: Outcome,
    emitted_ms: i64,
}

/// Reasons a late outcome is counted for (`feedloop_labeler_late_outcomes_total{reason}`).
const CORRECTED: &str = "corrected";
const UNCHANGED: &str = "unchanged";
const BEYOND_HORIZON: &str = "beyond_horizon";
const DROPPED: &str = "dropped";
pub(crate) const LATE_IMPRESSIONS_KEY: &str = "late_impressions";

struct Pipeline {
    shared: Shared,
    dataset: Dataset,
    name: String,
    watermarks: Watermarks,
    /// Next offset to read, per `topic/partition`.
    offsets: BTreeMap<String, i64>,
    /// The first record of each input partition's log, as read from its start: `topic/partition`
    /// → (offset, timestamp). It tells a log from another one started again under its name.
    starts: BTreeMap<String, (i64, i64)>,
    /// Partitions read from their start in this session: their first record is their `starts`.
    from_start: HashSet<String>,
    /// The reading position of each events partition, to catch skipped records.
    resume: HashMap<String, HashMap<i32, Resume>>,

    /// First offset read since the last commit, per `topic/partition`.
    batch_start: BTreeMap<String, i64>,
    /// Examples up to this (close, id) were emitted, or are in `due`.
    emitted: CloseCursor,
    seq: i64,
    pending_impressions: Vec<StoredImpression>,
    pending_outcomes: Vec<Outcome>,
    /// Examples the watermark passed since the last commit: labeled at the next commit, with
    /// every outcome read by then.
    due: Vec<StoredImpression>,
    due_ids: HashSet<Uuid>,
    /// Late impressions waiting for the outcomes read with them.
    held: BTreeMap<Uuid, Held>,
    /// Outcomes read since the last commit that may join emitted examples.
    touched: Vec<Touched>,
    /// The dataset's late-data counts (committed with the position).
    late: BTreeMap<String, i64>,
    /// Records handled since they were last reported to the metrics registry.
    records: RecordCounts,
    /// The committed checkpoint of the local join state; `None` when the state is in a shared
    /// store.
    checkpoint: Option<Checkpoint>,
    /// Local state: the users on the suppression list (never let into the state), through
    /// which `seq` of the list, and whether the next segment must be a snapshot because users
    /// were purged that earlier segments may name.
    suppressed: HashSet<String>,
    suppression_through: i64,
    snapshot_due: bool,
    /// Local state read from the Postgres store at this start: the first commit of a
    /// checkpoint deletes the dataset's rows there, in its transaction.
    moved_from_postgres: bool,
}

impl Pipeline {
    async fn open(shared: Shared, dataset: Dataset) -> Result<Self, EngineError> {
        let name = dataset.name().to_owned();
        let row = sqlx::query(
            "SELECT spec_hash, seq, offsets, starts, watermarks, emitted_through_ms,
                    emitted_through_id::text AS emitted_through_id, held, late, checkpoint,
                    suppression_through
             FROM labeler.positions WHERE dataset = $1",
        )
        .bind(&name)
        .fetch_optional(&shared.control)
        .await?;
        let position = match row {
            None => Position {
                seq: 0,
                offsets: BTreeMap::new(),
                starts: BTreeMap::new(),
                watermarks: BTreeMap::new(),
                emitted: CloseCursor::after(i64::MIN),
                held: Vec::new(),
                late: BTreeMap::new(),
                checkpoint: None,
                suppression_through: 0,
            },
            Some(r) => {
                let committed: String = r.try_get("spec_hash")?;
                if committed != dataset.spec.hash {
                    return Err(EngineError::SpecChanged {
                        dataset: name,
                        committed,
                        configured: dataset.spec.hash.clone(),
                    });
                }
                let position_err = |e: serde_json::Error| EngineError::Position {
                    dataset: name.clone(),
                    message: e.to_string(),
                };
                let parse = |text: String| {
                    serde_json::from_str::<BTreeMap<String, i64>>(&text).map_err(position_err)
                };
                Position {
                    seq: r.try_get("seq")?,
                    offsets: parse(r.try_get("offsets")?)?,
                    starts: serde_json::from_str(&r.try_get::<String, _>("starts")?).map_err(
                        |e| EngineError::Position {
                            dataset: name.clone(),
                            message: e.to_string(),
                        },
                    )?,
                    watermarks: parse(r.try_get("watermarks")?)?,
                    held: serde_json::from_str(&r.try_get::<String, _>("held")?)
                        .map_err(position_err)?,
                    late: parse(r.try_get("late")?)?,
                    checkpoint: r.try_get("checkpoint")?,
                    suppression_through: r.try_get("suppression_through")?,
                    emitted: CloseCursor {
                        close_ms: r.try_get("emitted_through_ms")?,
                        example_id: Uuid::parse_str(&r.try_get::<String, _>("emitted_through_id")?)
                            .map_err(|e| EngineError::Position {
                                dataset: name.clone(),
                                message: e.to_string(),
                            })?,
                    },
                }
            }
        };
        let mut watermarks = Watermarks::default();
        watermarks.restore(position.watermarks);
        let mut p = Self {
            shared,
            dataset,
            name,
            watermarks,
            offsets: position.offsets,
            starts: position.starts,
            from_start: HashSet::new(),
            resume: HashMap::new(),
            batch_start: BTreeMap::new(),
            emitted: position.emitted,
            seq: position.seq,
            pending_impressions: Vec::new(),
            pending_outcomes: Vec::new(),
            due: Vec::new(),
            due_ids: HashSet::new(),
            held: position
                .held
                .into_iter()
                .map(|h| (h.example_id, h))
                .collect(),
            touched: Vec::new(),
            late: position.late,
            records: RecordCounts::default(),
            checkpoint: None,
            suppressed: HashSet::new(),
            suppression_through: position.suppression_through,
            snapshot_due: false,
            moved_from_postgres: false,
        };
        let moving = position.checkpoint.is_none() && p.seq > 0;
        p.checkpoint = p.restore(position.checkpoint).await?;
        p.moved_from_postgres = moving && p.checkpoint.is_some();
        if p.checkpoint.is_some() {
            p.load_suppressed().await?;
        }
        p.clean_uncommitted().await?;
        p.apply_outbox().await?;
        if p.shared.mode.publishes() {
            publish_pending(&p.shared, Some(&p.name)).await?;
        }
        Ok(p)
    }

    /// A local join state: forgets what this process holds of the dataset and reads the
    /// committed checkpoint back, so the state is exactly what the committed offsets follow
    /// (whatever an earlier session of this process wrote since is replayed from the log). A
    /// shared store needs nothing. A dataset committed with the other kind of store is refused:
    /// its state is not where the configured store looks.
    async fn restore(&self, committed: Option<String>) -> Result<Option<Checkpoint>, EngineError> {
        let changed = |committed, configured| EngineError::StoreChanged {
            dataset: self.name.clone(),
            committed,
            configured,
        };
        let Some(local) = self.shared.state.local() else {
            return match committed {
                None => Ok(None),
                Some(_) => Err(changed(LOCAL_STATE, SHARED_STATE)),
            };
        };
        let checkpoint = match committed {
            None if self.seq > 0 => {
                // Committed with the Postgres store (the default before local state): its
                // state moves into memory, and the next commit checkpoints it as a snapshot.
                // A ScyllaDB state is not moved: set the store back, or replay.
                let imported = self.import_postgres_state(local).await?;
                if imported.is_none() {
                    return Err(changed(SHARED_STATE, LOCAL_STATE));
                }
                return Ok(Some(Checkpoint::default()));
            }
            None => Checkpoint::default(),
            Some(text) => serde_json::from_str(&text).map_err(|e| EngineError::Position {
                dataset: self.name.clone(),
                message: format!("checkpoint: {e}"),
            })?,
        };
        let started = Instant::now();
        local.reset(&self.name);
        let mut bytes_read = 0;
        for s in &checkpoint.segments {
            let bytes = self.shared.root.get(&s.path).await?;
            if dataset::sha256_hex(&bytes) != s.sha256 {
                return Err(EngineError::Position {
                    dataset: self.name.clone(),
                    message: format!("state segment {} does not match its checksum", s.path),
                });
            }
            bytes_read += bytes.len();
            let segment = tokio::task::block_in_place(|| Segment::decode(&bytes))?;
            local.apply(&self.name, segment);
        }
        observability::local_state(&self.name, local.live(&self.name), checkpoint.bytes());
        tracing::info!(
            dataset = %self.name,
            segments = checkpoint.segments.len(),
            bytes = bytes_read,
            entries = local.live(&self.name),
            ms = started.elapsed().as_millis() as u64,
            "Join state restored from its checkpoint"
        );
        Ok(Some(checkpoint))
    }

    /// Local state for a dataset whose state is in the Postgres store: reads it all into
    /// memory and has the next commit write a snapshot. `None` when the Postgres store holds
    /// nothing of the dataset (its state was elsewhere).
    async fn import_postgres_state(
        &self,
        local: &dyn crate::state::LocalState,
    ) -> Result<Option<()>, EngineError> {
        let store = crate::state::postgres::PostgresStore::new(self.shared.control.clone());
        let started = Instant::now();
        local.reset(&self.name);
        let mut from = CloseCursor::after(i64::MIN);
        let mut impressions = 0;
        loop {
            let page = store
                .due_impressions(&self.name, from, i64::MAX, 5000)
                .await?;
            let Some(last) = page.last() else { break };
            from = CloseCursor {
                close_ms: last.close_ms,
                example_id: last.example_id,
            };
            impressions += page.len();
            self.shared.state.put_impressions(&self.name, page).await?;
        }
        let outcomes = store.all_outcomes(&self.name).await?;
        let n = outcomes.len();
        self.shared.state.put_outcomes(&self.name, outcomes).await?;
        if impressions + n == 0 {
            let position: i64 =
                sqlx::query_scalar("SELECT count(*) FROM labeler.partitions WHERE dataset = $1")
                    .bind(&self.name)
                    .fetch_one(&self.shared.control)
                    .await?;
            // An empty state is only certain for a dataset that never committed a row.
            if position > 0 {
                return Ok(None);
            }
        }
        tracing::info!(
            dataset = %self.name,
            impressions,
            outcomes = n,
            ms = started.elapsed().as_millis() as u64,
            "Join state moved from the Postgres store into local state; the next commit checkpoints it"
        );
        Ok(Some(()))
    }

    /// Local state: reads the suppression list the checkpoint was written without, then takes
    /// the users suppressed since out of the state (its segments may name them: the next one
    /// is a snapshot).
    async fn load_suppressed(&mut self) -> Result<(), EngineError> {
        let users: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM collector.suppressed_users WHERE seq <= $1")
                .bind(self.suppression_through)
                .fetch_all(&self.shared.control)
                .await?;
        self.suppressed.extend(users);
        self.poll_suppressions().await
    }

    /// Local state: takes the users suppressed since the last look on the list and out of the
    /// state.
    async fn poll_suppressions(&mut self) -> Result<(), EngineError> {
        if self.checkpoint.is_none() {
            return Ok(());
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT user_id, seq FROM collector.suppressed_users WHERE seq > $1 ORDER BY seq",
        )
        .bind(self.suppression_through)
        .fetch_all(&self.shared.control)
        .await?;
        let mut new = Vec::with_capacity(rows.len());
        for (user, seq) in rows {
            self.suppression_through = self.suppression_through.max(seq);
            self.suppressed.insert(user.clone());
            new.push(user);
        }
        self.purge(&new).await
    }

    /// Purges newly suppressed users from the local state; the next segment is then a
    /// snapshot, which supersedes every segment that may name them.
    async fn purge(&mut self, users: &[String]) -> Result<(), EngineError> {
        if users.is_empty() {
            return Ok(());
        }
        let pending = self.pending_impressions.len() + self.pending_outcomes.len();
        self.pending_impressions.retain(|i| {
            !users.contains(&i.impression.viewer_id) && !users.contains(&i.impression.candidate_id)
        });
        self.pending_outcomes
            .retain(|o| !o.users.iter().any(|u| users.contains(u)));
        let purged = self.shared.state.purge_users(users).await?;
        let dropped = pending - self.pending_impressions.len() - self.pending_outcomes.len();
        tracing::info!(
            dataset = %self.name,
            users = users.len(),
            entries = purged + dropped as u64,
            "Erased users purged from the local join state; the next checkpoint is a snapshot"
        );
        self.snapshot_due = true;
        Ok(())
    }

    /// The local join state's changes since the last commit as a new segment, written next to
    /// the commit's files (a snapshot of the whole state when the segments grew too many or
    /// too heavy), with what the commit emits; returns the checkpoint once the commit records
    /// it and the segments that then go. `None` when the state is in a shared store.
    async fn write_segment(
        &self,
        emitted: &[Emitted],
        written: &mut Vec<String>,
    ) -> Result<Option<(Checkpoint, Vec<SegmentRef>, bool)>, EngineError> {
        let (Some(local), Some(committed)) = (self.shared.state.local(), &self.checkpoint) else {
            return Ok(None);
        };
        let started = Instant::now();
        let full = self.snapshot_due || committed.wants_snapshot(local.live(&self.name));
        let taken = tokio::task::block_in_place(|| local.take(&self.name, full, emitted));
        let encoded_ms = started.elapsed().as_millis() as u64;
        if !taken.changes && emitted.is_empty() {
            return Ok(Some((committed.clone(), Vec::new(), false)));
        }
        let (bytes, rows) = (taken.bytes, taken.rows);
        let rel = checkpoint::segment_rel(&self.name, self.seq + 1);
        let r = SegmentRef {
            path: rel.clone(),
            sha256: dataset::sha256_hex(&bytes),
            rows,
            bytes: bytes.len() as u64,
        };
        let size = bytes.len();
        let hashed_ms = started.elapsed().as_millis() as u64;
        self.shared.root.put(&rel, bytes).await?;
        written.push(rel);
        tracing::debug!(
            dataset = %self.name,
            full,
            rows,
            bytes = size,
            encoded_ms,
            hashed_ms,
            written_ms = started.elapsed().as_millis() as u64,
            "Commit: state segment written"
        );
        let (next, gone) = committed.with(r, full);
        Ok(Some((next, gone, full)))
    }

    /// Deletes data files no committed partition version references, left by a commit that
    /// crashed, once they are older than [`ORPHAN_GRACE_MS`] (a younger one may belong to an
    /// eraser rewrite about to commit); writes the JSON manifest of any committed version a
    /// crash left without one.
    async fn clean_uncommitted(&self) -> Result<(), EngineError> {
        let rows = sqlx::query(
            "SELECT DISTINCT ON (partition) manifest
             FROM labeler.partitions WHERE dataset = $1 ORDER BY partition, version DESC",
        )
        .bind(&self.name)
        .fetch_all(&self.shared.control)
        .await?;
        let mut keep = HashSet::new();
        let mut manifests = Vec::new();
        for r in rows {
            let manifest: Manifest = serde_json::from_str(&r.try_get::<String, _>("manifest")?)
                .map_err(DatasetError::from)?;
            for f in &manifest.files {
                // A file outside the root fails the start: cleaning up against the wrong root
                // would delete committed files as orphans.
                keep.insert(self.shared.root.rel_of_listed(&f.uri)?);
            }
            manifests.push(manifest);
        }
        let listed: HashSet<String> = self
            .shared
            .root
            .list(&self.name)
            .await?
            .into_iter()
            .collect();
        for m in &manifests {
            let rel = manifest_rel(&self.name, &m.partition, m.version);
            if !listed.contains(&rel) {
                self.shared
                    .root
                    .put(
                        &rel,
                        serde_json::to_vec_pretty(m).map_err(DatasetError::from)?,
                    )
                    .await?;
            }
        }
        let now = now_ms();
        let mut removed = 0;
        for rel in listed {
            let Some((_, file)) = rel.rsplit_once('/') else {
                continue;
            };
            // Manifest JSON is written only once its version is committed, so a JSON newer
            // than the versions read above is an eraser rewrite that committed meanwhile: kept.
            let orphan = file.ends_with(".parquet")
                && !keep.contains(&rel)
                && file_time_ms(file).is_some_and(|t| now - t > ORPHAN_GRACE_MS);
            if orphan {
                self.shared.root.delete(&rel).await?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(dataset = %self.name, files = removed, "Removed files of an unfinished commit");
        }
        // State segments no committed checkpoint lists: of a commit that did not go through,
        // or superseded by a snapshot and not deleted yet. Only this dataset's labeler (which
        // holds its lock) writes them, so none can be about to commit.
        if let Some(checkpoint) = &self.checkpoint {
            let keep: HashSet<&str> = checkpoint
                .segments
                .iter()
                .map(|s| s.path.as_str())
                .collect();
            let dir = checkpoint::segments_dir(&self.name);
            let mut removed = 0;
            for rel in self.shared.root.list(&dir).await? {
                if !keep.contains(rel.as_str()) {
                    self.shared.root.delete(&rel).await?;
                    removed += 1;
                }
            }
            if removed > 0 {
                tracing::info!(dataset = %self.name, files = removed, "Removed state segments no checkpoint lists");
            }
        }
        Ok(())
    }

    /// Records in the join state the versions committed by commits whose outbox is still there
    /// (the process stopped between a commit and its state write).
    async fn apply_outbox(&self) -> Result<(), EngineError> {
        let rows = sqlx::query(
            "SELECT seq, emissions FROM labeler.emission_outbox WHERE dataset = $1 ORDER BY seq",
        )
        .bind(&self.name)
        .fetch_all(&self.shared.control)
        .await?;
        for r in rows {
            let seq: i64 = r.try_get("seq")?;
            let emitted =
                decode_emissions(&r.try_get::<Vec<u8>, _>("emissions")?).map_err(|e| {
                    EngineError::Position {
                        dataset: self.name.clone(),
                        message: format!("emission outbox {seq}: {e}"),
                    }
                })?;
            self.emitted_recorded(seq, &emitted).await?;
        }
        Ok(())
    }

    /// Writes a committed commit's versions to the join state, then drops its outbox entry.
    async fn emitted_recorded(&self, seq: i64, emitted: &[Emitted]) -> Result<(), EngineError> {
        for chunk in emitted.chunks(2000) {
            self.shared.state.put_emitted(&self.name, chunk).await?;
        }
        if self.checkpoint.is_some() {
            // The commit's state segment carries them; it wrote no outbox entry.
            return Ok(());
        }
        sqlx::query("DELETE FROM labeler.emission_outbox WHERE dataset = $1 AND seq <= $2")
            .bind(&self.name)
            .bind(seq)
            .execute(&self.shared.control)
            .await?;
        Ok(())
    }

    /// Consumers of the input topics, assigned from the committed offsets.
    async fn consumers(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Vec<(String, Option<String>, StreamConsumer<QuietEof>)>, EngineError> {
        let cfg = self.shared.cfg.clone();
        let mut out = Vec::new();
        for (topic, table) in input_topics(&cfg, &self.dataset.spec) {
            let consumer: StreamConsumer<QuietEof> =
                consumer_config(&cfg.kafka, &cfg.consumer, &self.name)
                    .create_with_context(QuietEof)?;
            let partitions = wait_for_partitions(
                &consumer,
                &topic,
                Duration::from_millis(cfg.inputs.wait_for_topics_ms),
                shutdown,
            )
            .await?;
            let same = self.same_logs(&topic, &partitions).await?;
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                let key = tp(&topic, p);
                let offset = match self.offsets.get(&key).copied() {
                    Some(next) if same.contains(&p) => {
                        if table.is_none() {
                            self.resume
                                .entry(topic.clone())
                                .or_default()
                                .insert(p, Resume::at(next));
                        }
                        Offset::Offset(next)
                    }
                    _ => {
                        self.offsets.remove(&key);
                        self.from_start.insert(key);
                        Offset::Beginning
                    }
                };
                tpl.add_partition_offset(&topic, p, offset)?;
                self.watermarks.assign(&topic, p);
            }
            consumer.assign(&tpl)?;
            out.push((topic, table, consumer));
        }
        Ok(out)
    }

    /// The partitions of `topic` whose log is still the one committed against. The first
    /// record of each is looked up again, all partitions in one read: a log that holds another
    /// record there, or none, was lost and started again (a broker without durable storage
    /// restarted, or the topic was deleted and created again). That is reported, and the new
    /// log is read from its start. Offsets going back would only show a new log still shorter
    /// than the committed position; one that had grown past it would be read from there, its
    /// first records skipped. Partitions committed before first records were kept have nothing
    /// to compare, and count as the same.
    async fn same_logs(
        &mut self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<HashSet<i32>, EngineError> {
        let mut same = HashSet::new();
        let mut probes = Vec::new();
        for &p in partitions {
            match self.starts.get(&tp(topic, p)).copied() {
                Some((start, timestamp)) => probes.push((p, start, timestamp)),
                None => {
                    same.insert(p);
                }
            }
        }
        if probes.is_empty() {
            return Ok(same);
        }
        let probe = consumer_config(
            &self.shared.cfg.kafka,
            &self.shared.cfg.consumer,
            &self.name,
        )
        .create_with_context::<_, BaseConsumer<QuietEof>>(QuietEof)?;
        let (owned, at) = (
            topic.to_owned(),
            probes
                .iter()
                .map(|&(p, start, _)| (p, start))
                .collect::<Vec<_>>(),
        );
        let found = tokio::task::spawn_blocking(move || {
            read_first(&probe, &owned, &at, Duration::from_secs(10))
        })
        .await
        .map_err(|_| KafkaError::Canceled)?;
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(dataset = %self.name, topic, error = %e, "Cannot read the first records of the input partitions; assuming their logs are the ones committed against");
                same.extend(probes.iter().map(|&(p, _, _)| p));
                return Ok(same);
            }
        };
        for (p, start, timestamp) in probes {
            let is_same = match found.get(&p).copied().flatten() {
                Some((offset, ts)) if offset == start => ts == Some(timestamp),
                // Expired or compacted away, later records kept: the same log, shortened.
                Some((offset, _)) => offset > start,
                None => false,
            };
            if is_same {
                same.insert(p);
            } else {
                let key = tp(topic, p);
                let committed = self.offsets.get(&key).copied().unwrap_or(0);
                self.log_reset(topic, p, committed, start);
                self.starts.remove(&key);
            }
        }
        Ok(same)
    }

    /// Whether a commit now would write rows (or may: held impressions and touched outcomes).
    fn has_work(&self) -> bool {
        !self.due.is_empty() || !self.touched.is_empty() || !self.held.is_empty()
    }

    fn has_progress(&self) -> bool {
        self.has_work() || !self.batch_start.is_empty() || self.snapshot_due
    }

    /// Reports an input partition that went back behind the committed position: a log lost
    /// and started again (a broker without durable storage restarted, or the topic was deleted
    /// and created again). Records between the committed position and the old end are gone, and
    /// the new log is read as new.
    fn log_reset(&self, topic: &str, partition: i32, committed: i64, got: i64) {
        observability::log_reset(&self.name, topic);
        tracing::error!(
            dataset = %self.name,
            topic,
            partition,
            committed,
            got,
            "The input partition went back behind the committed position: the broker lost its log"
        );
    }

    /// The reading position of an events partition, starting at `expected` if new.
    fn resume_of(&mut self, topic: &str, partition: i32, expected: i64) -> &mut Resume {
        if !self.resume.contains_key(topic) {
            self.resume.insert(topic.to_owned(), HashMap::new());
        }
        self.resume
            .get_mut(topic)
            .map(|partitions| {
                partitions
                    .entry(partition)
                    .or_insert_with(|| Resume::at(expected))
            })
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// The end of an input partition was reached; `Some(offset)` when it came before any
    /// record since the read started, to read again from there (see [`Resume::ended`]).
    fn ended(&mut self, topic: &str, table: Option<&str>, partition: i32) -> Option<i64> {
        if table.is_some() {
            return None;
        }
        let expected = self.offsets.get(&tp(topic, partition)).copied()?;
        match self.resume_of(topic, partition, expected).ended() {
            Some(Step::Rewind(to)) => {
                observability::rewind(&self.name, topic);
                Some(to)
            }
            _ => None,
        }
    }

    /// Events partitions whose read got nothing for [`STALL`], with the offset to read them
    /// again from (see [`Resume::stalled`]).
    fn stalled(&mut self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for (topic, partitions) in &mut self.resume {
            for (partition, r) in partitions {
                if let Some(Step::Rewind(to)) = r.stalled(STALL) {
                    observability::rewind(&self.name, topic);
                    out.push((topic.clone(), *partition, to));
                }
            }
        }
        out
    }

    /// Handles one input record; [`Flow::Seek`] asks the caller to read the partition again
    /// from an earlier offset (see [`Resume`]).
    async fn handle(
        &mut self,
        topic: &str,
        table: Option<&str>,
        msg: &BorrowedMessage<'_>,
    ) -> Result<Flow, EngineError> {
        let partition = msg.partition();
        let offset = msg.offset();
        let key = tp(topic, partition);
        if let Some(expected) = self.offsets.get(&key).copied() {
            if table.is_some() {
                // Compacted (cdc): gaps are expected; only going back is news.
                if offset < expected {
                    self.log_reset(topic, partition, expected, offset);
                }
            } else {
                let step = self.resume_of(topic, partition, expected).step(offset);
                match step {
                    Step::Take => {}
                    Step::Skip => return Ok(Flow::Next),
                    Step::Rewind(to) => {
                        observability::rewind(&self.name, topic);
                        tracing::debug!(dataset = %self.name, topic, partition, expected, got = offset, rewind_to = to, "A read skipped records; reading again from further back");
                        return Ok(Flow::Seek(to));
                    }
                    Step::Gap { expected, got } => {
                        observability::offset_gap(&self.name, topic, got - expected);
                        tracing::error!(dataset = %self.name, topic, partition, expected, got, "Input records are missing from the log (retention, a truncated log): the dataset lacks them");
                    }
                    Step::Reset { expected, got } => {
                        self.log_reset(topic, partition, expected, got);
                    }
                }
            }
        }
        self.take(topic, table, msg, key).await.map(|()| Flow::Next)
    }

    async fn take(
        &mut self,
        topic: &str,
        table: Option<&str>,
        msg: &BorrowedMessage<'_>,
        key: String,
    ) -> Result<(), EngineError> {
        let partition = msg.partition();
        let offset = msg.offset();
        match self.offsets.get_mut(&key) {
            Some(next) => *next = offset + 1,
            None => {
                self.offsets.insert(key.clone(), offset + 1);
            }
        }
        if !self.from_start.is_empty()
            && self.from_start.remove(&key)
            && let Some(ts) = msg.timestamp().to_millis()
        {
            self.starts.insert(key.clone(), (offset, ts));
        }
        if !self.batch_start.contains_key(&key) {
            self.batch_start.insert(key.clone(), offset);
        }
        let Some(bytes) = msg.payload() else {
            // Tombstones of compacted cdc topics carry nothing to label.
            self.records.add(RecordKind::Other);
            return Ok(());
        };
        let poisoned = self.shared.poison.lock().ok().and_then(|mut p| {
            if p.is_empty() {
                None
            } else {
                p.remove(&format!("{topic}/{partition}/{offset}"))
            }
        });
        if let Some(error) = poisoned {
            let source = SourceRef {
                topic: topic.to_owned(),
                partition,
                offset,
            };
            let detail = format!("failed {RECORD_STRIKES} times in a row: {error}");
            return self
                .dead_letter(DeadLetterReason::ProcessingFailure, &detail, bytes, &source)
                .await;
        }
        let source = SourceRef {
            topic: topic.to_owned(),
            partition,
            offset,
        };
        let decoded = match self.decode(table, msg.key(), bytes, source.clone()).await? {
            Ok(d) => d,
            Err((reason, detail)) => {
                return self.dead_letter(reason, &detail, bytes, &source).await;
            }
        };
        self.watermarks.observe_tp(&key, decoded.time_ms);
        match decoded.input {
            Input::Impression(impression) => {
                self.records.add(RecordKind::Impression);
                let spec = &self.dataset.spec;
                let stored = StoredImpression {
                    example_id: spec.example_id(&impression),
                    close_ms: spec.close_ms(&impression),
                    impression: *impression,
                    emitted: None,
                };
                let at = CloseCursor {
                    close_ms: stored.close_ms,
                    example_id: stored.example_id,
                };
                if at <= self.emitted {
                    self.late_impression(stored, offset).await?;
                } else {
                    self.pending_impressions.push(stored);
                }
            }
            Input::Outcomes(outcomes) if outcomes.is_empty() => {
                self.records.add(RecordKind::Other);
            }
            Input::Outcomes(outcomes) => {
                self.records.add(RecordKind::Outcome);
                let spec = self.dataset.spec.clone();
                let emitted_ms = self.emitted.close_ms;
                for o in outcomes {
                    // Most outcomes can join no emitted example; the others are looked at at
                    // the next commit, all together.
                    if spec.may_join_emitted(&o, emitted_ms) {
                        if spec.beyond_horizon(&o, emitted_ms) {
                            let reason = match spec.spec.late_outcomes {
                                LatePolicy::Correct => BEYOND_HORIZON,
                                LatePolicy::Drop => DROPPED,
                            };
                            self.count_late(reason, 1);
                        } else {
                            self.touched.push(Touched {
                                outcome: o.clone(),
                                emitted_ms,
                            });
                        }
                    }
                    self.pending_outcomes.push(o);
                }
            }
        }
        Ok(())
    }

    /// An impression read after its example's close. A copy of one already emitted (a
    /// client's retry, at-least-once delivery) is dropped; otherwise it is held until the
    /// records read with it are in (see [`LATE_HOLD_RECORDS`]) and emitted at the next commit
    /// after that, with every outcome known then.
    async fn late_impression(
        &mut self,
        stored: StoredImpression,
        offset: i64,
    ) -> Result<(), EngineError> {
        let id = stored.example_id;
        if self.due_ids.contains(&id) || self.held.contains_key(&id) {
            observability::duplicate_impression(&self.name);
            return Ok(());
        }
        self.flush().await?;
        let known = self
            .shared
            .state
            .impressions_by_keys(&self.name, &[match_key(&stored.impression.match_id)])
            .await?;
        if known
            .iter()
            .any(|k| k.example_id == id && k.emitted.is_some())
        {
            observability::duplicate_impression(&self.name);
            return Ok(());
        }
        let spec = &self.dataset.spec;
        let horizon = if spec.correctable(stored.close_ms, self.emitted.close_ms) {
            "within"
        } else {
            "beyond"
        };
        observability::late_impression(&self.name, horizon);
        self.count_late(LATE_IMPRESSIONS_KEY, 1);
        let source = &stored.impression.source;
        self.held.insert(
            id,
            Held {
                example_id: id,
                match_id: stored.impression.match_id,
                close_ms: stored.close_ms,
                time_ms: stored.impression.time_ms,
                topic: source.topic.clone(),
                partition: source.partition,
                release_at: offset.saturating_add(1 + LATE_HOLD_RECORDS),
            },
        );
        observability::held_impressions(&self.name, self.held.len());
        self.pending_impressions.push(stored);
        Ok(())
    }

    fn count_late(&mut self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if reason != LATE_IMPRESSIONS_KEY {
            observability::late_outcomes(&self.name, reason, n);
        }
        *self.late.entry(reason.to_owned()).or_insert(0) += i64::try_from(n).unwrap_or(i64::MAX);
    }

    /// Decodes a record; `Ok(Err(..))` is a poison record for the dead-letter topic.
    async fn decode(
        &self,
        table: Option<&str>,
        key: Option<&[u8]>,
        bytes: &[u8],
        source: SourceRef,
    ) -> Result<Result<Decoded, (DeadLetterReason, String)>, EngineError> {
        let frame = match wire::split(bytes) {
            Ok(f) => f,
            Err(e) => return Ok(Err((DeadLetterReason::DecodeFailure, e.to_string()))),
        };
        let schema = match self.shared.registry.schema(frame.schema_id).await {
            Ok(s) => s,
            Err(RegistryClientError::Codec(e)) => {
                return Ok(Err((DeadLetterReason::DecodeFailure, e.to_string())));
            }
            Err(e) => return Err(e.into()),
        };
        let spec = &self.dataset.spec;
        let decoded = match table {
            None => input::event(spec, &schema, frame.body, source),
            Some(table) => {
                let origin = format!("{}/{}/{}", source.topic, source.partition, source.offset);
                input::change(spec, table, &schema, key, frame.body, &origin)
            }
        };
        Ok(decoded
            .and_then(input::Decoded::checked)
            .map_err(|e| (DeadLetterReason::DecodeFailure, e.to_string())))
    }

    async fn flush(&mut self) -> Result<(), EngineError> {
        if !self.suppressed.is_empty() {
            // Local state never takes a suppressed user in, whatever the log still holds.
            let erased = &self.suppressed;
            self.pending_impressions.retain(|i| {
                !erased.contains(&i.impression.viewer_id)
                    && !erased.contains(&i.impression.candidate_id)
            });
            self.pending_outcomes
                .retain(|o| !o.users.iter().any(|u| erased.contains(u)));
        }
        if !self.pending_impressions.is_empty() {
            self.shared
                .state
                .put_impressions(&self.name, std::mem::take(&mut self.pending_impressions))
                .await?;
        }
        if !self.pending_outcomes.is_empty() {
            self.shared
                .state
                .put_outcomes(&self.name, std::mem::take(&mut self.pending_outcomes))
                .await?;
        }
        Ok(())
    }

    /// Emits every example whose close the global watermark has reached: they are labeled at
    /// the next commit.
    async fn advance(&mut self) -> Result<(), EngineError> {
        // A replay reads a log that is all there: its end is the end.
        let idle_after = match self.shared.mode {
            Mode::Serve => Duration::from_millis(self.shared.cfg.inputs.idle_timeout_ms),
            Mode::Replay { .. } => Duration::ZERO,
        };
        let w = self
            .watermarks
            .global(std::time::Instant::now(), idle_after);
        observability::watermark(&self.name, w, now_ms());
        self.records.report(&self.name);
        let target = CloseCursor::after(w);
        if target <= self.emitted {
            return Ok(());
        }
        self.flush().await?;
        let state = self.shared.state.clone();
        let max_rows = self.shared.cfg.datasets.commit_max_rows;
        loop {
            let page = state
                .due_impressions(&self.name, self.emitted, w, max_rows.clamp(1, 2000))
                .await?;
            let Some(last) = page.last() else { break };
            self.emitted = CloseCursor {
                close_ms: last.close_ms,
                example_id: last.example_id,
            };
            self.due_ids.extend(page.iter().map(|i| i.example_id));
            self.due.extend(page);
            // A long catch-up commits as it goes, so that a crash does not redo it all.
            if self.due.len() >= max_rows {
                self.commit(false).await?;
            }
        }
        self.emitted = target;
        Ok(())
    }

    /// The rows of the next commit, each counting every outcome known now: version 1 of the
    /// examples the watermark passed and of late impressions whose hold is over (all of them
    /// when `release_all`), and the next version of emitted examples that outcomes read since
    /// the last commit join, when it says something new (at most one per example).
    async fn label_rows(&mut self, release_all: bool) -> Result<Vec<Example>, EngineError> {
        self.flush().await?;
        let spec = self.dataset.spec.clone();
        let state = self.shared.state.clone();

        let mut work: Vec<(StoredImpression, Revision)> =
            self.due.drain(..).map(|i| (i, Revision::First)).collect();
        self.due_ids.clear();
        let released: Vec<Held> = self
            .held
            .values()
            .filter(|h| {
                release_all
                    || self
                        .offsets
                        .get(&tp(&h.topic, h.partition))
                        .copied()
                        .unwrap_or(0)
                        >= h.release_at
                    || self.watermarks.at_end(&h.topic, h.partition)
            })
            .cloned()
            .collect();
        if !released.is_empty() {
            let keys: Vec<String> = released
                .iter()
                .map(|h| match_key(&h.match_id))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let found = state.impressions_by_keys(&self.name, &keys).await?;
            for h in &released {
                self.held.remove(&h.example_id);
                match found.iter().find(|i| i.example_id == h.example_id) {
                    Some(i) if i.emitted.is_none() => work.push((i.clone(), Revision::Late)),
                    Some(_) => {}
                    None => {
                        // Purged by an erasure while it was held.
                        tracing::debug!(dataset = %self.name, "A held late impression left the join state");
                    }
                }
            }
            observability::held_impressions(&self.name, self.held.len());
        }
        let firsts: HashSet<Uuid> = work.iter().map(|(i, _)| i.example_id).collect();

        // Emitted examples the touched outcomes join, and which outcomes join each.
        let touched = std::mem::take(&mut self.touched);
        let mut joining: HashMap<Uuid, Vec<usize>> = HashMap::new();
        let mut fate: Vec<Option<&'static str>> = vec![None; touched.len()];
        if !touched.is_empty() {
            let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
            for (n, t) in touched.iter().enumerate() {
                by_key
                    .entry(t.outcome.join_key.as_str())
                    .or_default()
                    .push(n);
            }
            let keys: Vec<String> = by_key.keys().map(|k| (*k).to_owned()).collect();
            for chunk in keys.chunks(1000) {
                for imp in state.impressions_by_keys(&self.name, chunk).await? {
                    let emitted = CloseCursor {
                        close_ms: imp.close_ms,
                        example_id: imp.example_id,
                    } <= self.emitted;
                    if !emitted
                        || firsts.contains(&imp.example_id)
                        || self.held.contains_key(&imp.example_id)
                        || joining.contains_key(&imp.example_id)
                    {
                        continue;
                    }
                    let ikeys = imp.impression.keys();
                    // Only the touched outcomes under one of its keys can join it.
                    let by: Vec<usize> = ikeys
                        .iter()
                        .filter_map(|k| by_key.get(k.as_str()))
                        .flatten()
                        .copied()
                        .filter(|n| spec.joins(&imp.impression, &ikeys, &touched[*n].outcome))
                        .collect();
                    if by.is_empty() {
                        continue;
                    }
                    // Each outcome is judged against the examples emitted when it was read,
                    // not at this commit: how far the watermark moved since (a long catch-up
                    // between commits) must not push it past the correction horizon.
                    let (by, past): (Vec<usize>, Vec<usize>) =
                        by.into_iter().partition(|n| match spec.spec.late_outcomes {
                            LatePolicy::Drop => false,
                            LatePolicy::Correct => {
                                spec.correctable(imp.close_ms, touched[*n].emitted_ms)
                            }
                        });
                    let past_fate = match spec.spec.late_outcomes {
                        LatePolicy::Drop => DROPPED,
                        LatePolicy::Correct => BEYOND_HORIZON,
                    };
                    for n in past {
                        fate[n].get_or_insert(past_fate);
                    }
                    if by.is_empty() {
                        continue;
                    }
                    joining.insert(imp.example_id, by);
                    let previous = imp.emitted.map(|e| e.label);
                    work.push((imp, Revision::Correction { replaces: previous }));
                }
            }
        }

        // Label, a page at a time.
        let mut rows = Vec::with_capacity(work.len());
        let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut work = work.into_iter();
        loop {
            let page: Vec<(StoredImpression, Revision)> = work.by_ref().take(2000).collect();
            if page.is_empty() {
                break;
            }
            let page_keys: Vec<Vec<String>> =
                page.iter().map(|(i, _)| i.impression.keys()).collect();
            let mut keys: Vec<String> = page_keys.iter().flatten().cloned().collect();
            keys.sort_unstable();
            keys.dedup();
            let found = state.outcomes_by_keys(&self.name, &keys).await?;
            let mut by_key: HashMap<&str, Vec<&Outcome>> = HashMap::new();
            for o in &found {
                by_key.entry(o.join_key.as_str()).or_default().push(o);
            }
            for ((imp, revision), ikeys) in page.into_iter().zip(&page_keys) {
                let outcomes = ikeys
                    .iter()
                    .filter_map(|k| by_key.get(k.as_str()))
                    .flatten()
                    .copied();
                let labeled = spec.label_keyed(&imp.impression, ikeys, outcomes);
                let version = match revision {
                    Revision::First | Revision::Late => 1,
                    Revision::Correction { .. } => {
                        let by = joining.get(&imp.example_id).map_or(&[][..], Vec::as_slice);
                        let same = imp.emitted.is_some_and(|e| e.digest == labeled.digest());
                        for n in by {
                            let f = &mut fate[*n];
                            if same {
                                f.get_or_insert(UNCHANGED);
                            } else {
                                *f = Some(CORRECTED);
                            }
                        }
                        if same {
                            continue;
                        }
                        imp.emitted.map_or(2, |e| e.version.saturating_add(1))
                    }
                };
                *kinds
                    .entry(match revision {
                        Revision::First => "first",
                        Revision::Late => "late",
                        Revision::Correction { .. } => "correction",
                    })
                    .or_insert(0) += 1;
                rows.push(Example {
                    example_id: imp.example_id,
                    version,
                    impression: imp.impression,
                    labeled,
                    revision,
                });
            }
        }
        for (kind, n) in kinds {
            observability::examples(&self.name, kind, n);
        }
        for reason in [CORRECTED, UNCHANGED, BEYOND_HORIZON, DROPPED] {
            let n = fate.iter().filter(|f| **f == Some(reason)).count() as u64;
            self.count_late(reason, n);
        }
        Ok(rows)
    }

    /// Writes the waiting examples and commits them with the position they cover;
    /// `release_all` emits every held late impression (the last commit of a session).
    async fn commit(&mut self, release_all: bool) -> Result<(), EngineError> {
        self.poll_suppressions().await?;
        if !self.has_progress() {
            return Ok(());
        }
        let started = Instant::now();
        let mut rows = self.label_rows(release_all).await?;
        tracing::debug!(dataset = %self.name, rows = rows.len(), ms = started.elapsed().as_millis(), "Commit: rows labeled");
        let shared = self.shared.clone();
        let root = &shared.root;
        let spec = &self.dataset.spec;

        // 0. Erased users never reach a dataset again: their rows are dropped here, whether
        // their events were still in the log or the state when the erasure happened, or are
        // replayed later.
        let erased = erasure::erased_among(&shared.control, &row_users(&rows)).await?;
        tracing::debug!(dataset = %self.name, ms = started.elapsed().as_millis(), "Commit: rows checked against the suppression list");
        if !erased.is_empty() {
            let before = rows.len();
            rows.retain(|r| {
                !erased.contains(&r.impression.viewer_id)
                    && !erased.contains(&r.impression.candidate_id)
            });
            observability::erased_examples(&self.name, (before - rows.len()) as u64);
        }

        // 1. Rows grouped by Hive partition, the per-user index, and what each example's
        // version says (for the join state).
        let mut by_partition: BTreeMap<String, Vec<Example>> = BTreeMap::new();
        for row in rows {
            by_partition.entry(row.partition()).or_default().push(row);
        }
        let mut users: Vec<(String, String)> = Vec::new();
        for (partition, rows) in &by_partition {
            let mut seen = HashSet::new();
            for r in rows {
                for u in [&r.impression.viewer_id, &r.impression.candidate_id] {
                    if seen.insert(u.as_str()) {
                        users.push((u.clone(), partition.clone()));
                    }
                }
            }
        }
        // In the index's key order: Postgres then inserts into its B-tree leaf after leaf.
        users.sort_unstable();
        let emitted: Vec<Emitted> = by_partition
            .values()
            .flatten()
            .map(|r| Emitted {
                example_id: r.example_id,
                close_ms: r.labeled.close_ms,
                emission: Emission {
                    version: r.version,
                    digest: r.labeled.digest(),
                    label: r.labeled.label,
                },
            })
            .collect();
        let mut written: Vec<String> = Vec::new();
        let segment = match self.write_segment(&emitted, &mut written).await {
            Ok(segment) => segment,
            Err(e) => {
                for rel in &written {
                    let _ = root.delete(rel).await;
                }
                return Err(e);
            }
        };
        let recorded = self
            .record(
                &by_partition,
                users,
                &emitted,
                segment.as_ref().map(|(next, _, _)| next),
                &shared,
                &mut written,
            )
            .await;
        let manifests = match recorded {
            Ok(manifests) => manifests,
            Err(Recorded::Not(e)) => {
                // Nothing of this commit is recorded: its files go now, not at the next start
                // (an eraser rewriting the same partitions may be writing files of its own
                // meanwhile).
                for rel in &written {
                    let _ = root.delete(rel).await;
                }
                return Err(e);
            }
            Err(Recorded::Unknown(e, manifests)) => {
                // COMMIT itself failed: Postgres may have committed and lost the reply. Its
                // files stay unless the position says it did not; files of a version that did
                // not commit are removed by a later start, once older than ORPHAN_GRACE_MS.
                match committed_seq(&shared.control, &self.name).await {
                    Ok(Some(seq)) if seq == self.seq + 1 => {
                        tracing::warn!(dataset = %self.name, error = %e, "The reply to COMMIT was lost, but the commit went through");
                        manifests
                    }
                    Ok(_) => {
                        tracing::warn!(dataset = %self.name, error = %e, "COMMIT failed and did not go through; its files are left for the start-up clean-up");
                        return Err(e);
                    }
                    Err(lookup) => {
                        tracing::warn!(dataset = %self.name, error = %e, lookup = %lookup, "COMMIT failed and its outcome cannot be looked up; its files are kept");
                        return Err(e);
                    }
                }
            }
        };
        tracing::debug!(dataset = %self.name, ms = started.elapsed().as_millis(), "Commit: recorded");
        // The manifests' JSON copies, once their versions are committed (a start writes any
        // that a crash left out).
        for m in &manifests {
            root.put(
                &manifest_rel(&self.name, &m.partition, m.version),
                serde_json::to_vec_pretty(m).map_err(DatasetError::from)?,
            )
            .await?;
        }
        self.seq += 1;
        self.batch_start.clear();
        if let Some((next, gone, full)) = segment {
            self.moved_from_postgres = false;
            if let Some(local) = shared.state.local() {
                observability::local_state(&self.name, local.live(&self.name), next.bytes());
            }
            self.checkpoint = Some(next);
            if full {
                self.snapshot_due = false;
            }
            for s in gone {
                if let Err(e) = root.delete(&s.path).await {
                    tracing::warn!(dataset = %self.name, segment = %s.path, error = %e, "Could not delete a superseded state segment; the next start does");
                }
            }
        }
        let rows: usize = by_partition.values().map(Vec::len).sum();
        if !emitted.is_empty() {
            self.emitted_recorded(self.seq, &emitted).await?;
        }
        tracing::debug!(dataset = %self.name, ms = started.elapsed().as_millis(), "Commit: join state told");

        // 4. Announce, then forget state committed examples no longer need.
        if shared.mode.publishes() {
            publish_pending(&shared, Some(&self.name)).await?;
            tracing::debug!(dataset = %self.name, "Commit: partitions announced");
        }
        let emitted_ms = self.emitted.close_ms;
        if emitted_ms > i64::MIN {
            let keep_after_close = spec.retention_after_close_ms;
            let mut impressions_before = emitted_ms.saturating_sub(keep_after_close);
            let mut outcomes_before = impressions_before.saturating_sub(spec.close_after_ms);
            // Held late impressions, and the outcomes they join, stay until emitted.
            for h in self.held.values() {
                impressions_before = impressions_before.min(h.close_ms);
                outcomes_before = outcomes_before.min(h.time_ms);
            }
            let expired = shared
                .state
                .expire(&self.name, impressions_before, outcomes_before)
                .await?;
            observability::expired(&self.name, expired);
        }
        observability::committed(&self.name, started.elapsed().as_secs_f64(), 0);
        tracing::debug!(dataset = %self.name, rows, partitions = manifests.len(), "Committed");
        Ok(())
    }

    /// Steps 2 to 4 of a commit: the files and the examples on the labels topic, then one
    /// transaction with the manifests, the per-user index and the position. Files it wrote
    /// are added to `written`.
    async fn record(
        &self,
        by_partition: &BTreeMap<String, Vec<Example>>,
        users: Vec<(String, String)>,
        emitted: &[Emitted],
        checkpoint: Option<&Checkpoint>,
        shared: &Shared,
        written: &mut Vec<String>,
    ) -> Result<Vec<Manifest>, Recorded> {
        let (tx, manifests) = self
            .record_until_commit(by_partition, users, emitted, checkpoint, shared, written)
            .await
            .map_err(Recorded::Not)?;
        match tx.commit().await {
            Ok(()) => Ok(manifests),
            Err(e) => Err(Recorded::Unknown(e.into(), manifests)),
        }
    }

    /// [`record`](Self::record) up to the COMMIT, which it leaves to the caller.
    async fn record_until_commit(
        &self,
        by_partition: &BTreeMap<String, Vec<Example>>,
        users: Vec<(String, String)>,
        emitted: &[Emitted],
        checkpoint: Option<&Checkpoint>,
        shared: &Shared,
        written: &mut Vec<String>,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Vec<Manifest>), EngineError> {
        let spec = &self.dataset.spec;
        let root = &shared.root;
        // Everything from here runs under the shared suppression lock, taken first and checked
        // against the rows' users: an erasure that suppressed one of them since step 0 is
        // noticed before anything is published, and one that comes later waits for this
        // commit, whose rows its dataset rewrite then finds (with their examples, which it
        // tombstones on the labels topic). Publishing first and checking after would leave the
        // examples of a user erased in between on the labels topic, named by no committed row.
        let mut tx = shared.control.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(erasure::SUPPRESSION_LOCK)
            .execute(&mut *tx)
            .await?;
        let user_ids: Vec<String> = users.iter().map(|(u, _)| u.clone()).collect();
        if !erasure::erased_among(&mut *tx, &user_ids).await?.is_empty() {
            return Err(EngineError::ErasureRaced(self.name.clone()));
        }
        // A local state's segment was written without the users suppressed through
        // `suppression_through`; one suppressed since may be in it.
        if checkpoint.is_some() {
            // The checkpoint holds the state from here on: what the Postgres store kept of it
            // (moved at this start), and its outbox of emissions, go in the same transaction.
            let statements: &[&'static str] = if self.moved_from_postgres {
                &[
                    "DELETE FROM labeler.emission_outbox WHERE dataset = $1",
                    "DELETE FROM labeler.impressions WHERE dataset = $1",
                    "DELETE FROM labeler.outcomes WHERE dataset = $1",
                    "DELETE FROM labeler.emissions WHERE dataset = $1",
                ]
            } else {
                &["DELETE FROM labeler.emission_outbox WHERE dataset = $1"]
            };
            for statement in statements {
                sqlx::query(*statement)
                    .bind(&self.name)
                    .execute(&mut *tx)
                    .await?;
            }
            let latest: i64 =
                sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM collector.suppressed_users")
                    .fetch_one(&mut *tx)
                    .await?;
            if latest > self.suppression_through {
                return Err(EngineError::ErasureRaced(self.name.clone()));
            }
        }

        // 2. The Parquet files and the labels topic's records, encoded side by side: the
        // files on every core but one, the records on this thread, which enqueues them.
        let schema = dataset::arrow_schema(&spec.spec);
        let parts: Vec<&[Example]> = by_partition.values().map(Vec::as_slice).collect();
        let (files, deliveries) = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let files = scope.spawn(|| dataset::parquet_files(&spec.spec, &schema, &parts));
                let deliveries = if shared.mode.publishes() {
                    self.enqueue_examples(by_partition)
                } else {
                    Ok(Vec::new())
                };
                (files.join(), deliveries)
            })
        });
        let files = files
            .map_err(|_| DatasetError::Encoding("a Parquet encoding thread panicked".into()))??;
        let deliveries = deliveries?;
        let epoch: i64 =
            sqlx::query_scalar("SELECT epoch FROM labeler.erasure_epochs WHERE dataset = $1")
                .bind(&self.name)
                .fetch_optional(&shared.control)
                .await?
                .unwrap_or(0);
        let committed_at = now_ms();
        let mut manifests = Vec::with_capacity(files.len());
        for ((partition, rows), bytes) in by_partition.iter().zip(files) {
            let rel = data_file_rel(&self.name, partition);
            let file = DataFile {
                uri: root.uri_of(&rel),
                row_count: rows.len() as i64,
                byte_size: bytes.len() as i64,
                sha256: dataset::sha256_hex(&bytes),
            };
            root.put(&rel, bytes).await?;
            written.push(rel);
            let previous = latest_manifest(&shared.control, &self.name, partition).await?;
            manifests.push(next_manifest(NextManifest {
                previous: previous.as_ref(),
                root,
                dataset: &self.name,
                partition,
                file,
                rows,
                schema_id: self.dataset.labels_schema.id(),
                spec_hash: &spec.hash,
                epoch,
                committed_at,
                late_outcomes: &self.late,
            }));
        }
        tracing::debug!(dataset = %self.name, files = manifests.len(), "Commit: files written");
        let limit = delivery_limit(&shared.cfg);
        for f in deliveries {
            delivered(f, limit).await?;
        }
        if shared.mode.publishes() {
            tracing::debug!(dataset = %self.name, "Commit: examples acknowledged");
        }

        // 3. One transaction: manifests, the per-user index, the position.
        for m in &manifests {
            sqlx::query(
                "INSERT INTO labeler.partitions
                 (dataset, partition, version, manifest_uri, manifest, row_count, byte_size, erasure_epoch)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&m.dataset)
            .bind(&m.partition)
            .bind(m.version)
            .bind(&m.manifest_uri)
            .bind(serde_json::to_string(m).map_err(DatasetError::from)?)
            .bind(m.row_count)
            .bind(m.byte_size)
            .bind(m.erasure_epoch)
            .execute(&mut *tx)
            .await?;
        }
        if !users.is_empty() {
            let (user_ids, partitions): (Vec<String>, Vec<String>) = users.into_iter().unzip();
            sqlx::query(
                "INSERT INTO labeler.partition_users (dataset, user_id, partition)
                 SELECT $1, u, p FROM UNNEST($2::text[], $3::text[]) AS t(u, p)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&self.name)
            .bind(&user_ids)
            .bind(&partitions)
            .execute(&mut *tx)
            .await?;
        }
        // A local state's segment carries what the commit emits; a shared store is told after
        // COMMIT, from this outbox.
        if !emitted.is_empty() && checkpoint.is_none() {
            sqlx::query(
                "INSERT INTO labeler.emission_outbox (dataset, seq, emissions) VALUES ($1, $2, $3)",
            )
            .bind(&self.name)
            .bind(self.seq + 1)
            .bind(encode_emissions(emitted))
            .execute(&mut *tx)
            .await?;
        }
        let json =
            |m: &BTreeMap<String, i64>| serde_json::to_string(m).unwrap_or_else(|_| "{}".into());
        let held: Vec<&Held> = self.held.values().collect();
        sqlx::query(
            "INSERT INTO labeler.positions (dataset, spec_hash, seq, offsets, starts, watermarks, emitted_through_ms, emitted_through_id, held, late, checkpoint, suppression_through)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::uuid, $9, $10, $11, $12)
             ON CONFLICT (dataset) DO UPDATE SET spec_hash = EXCLUDED.spec_hash, seq = EXCLUDED.seq,
               offsets = EXCLUDED.offsets, starts = EXCLUDED.starts, watermarks = EXCLUDED.watermarks,
               emitted_through_ms = EXCLUDED.emitted_through_ms,
               emitted_through_id = EXCLUDED.emitted_through_id, held = EXCLUDED.held,
               late = EXCLUDED.late, checkpoint = EXCLUDED.checkpoint,
               suppression_through = EXCLUDED.suppression_through, committed_at = now()",
        )
        .bind(&self.name)
        .bind(&spec.hash)
        .bind(self.seq + 1)
        .bind(json(&self.offsets))
        .bind(serde_json::to_string(&self.starts).unwrap_or_else(|_| "{}".into()))
        .bind(json(&self.watermarks.snapshot()))
        .bind(self.emitted.close_ms)
        .bind(self.emitted.example_id.to_string())
        .bind(serde_json::to_string(&held).map_err(DatasetError::from)?)
        .bind(json(&self.late))
        .bind(
            checkpoint
                .map(serde_json::to_string)
                .transpose()
                .map_err(DatasetError::from)?,
        )
        .bind(self.suppression_through)
        .execute(&mut *tx)
        .await?;
        Ok((tx, manifests))
    }

    /// Encodes the examples and hands them to the producer (blocking while its queue is
    /// full); the caller awaits their deliveries.
    fn enqueue_examples(
        &self,
        rows: &BTreeMap<String, Vec<Example>>,
    ) -> Result<Vec<Delivery>, EngineError> {
        let topic = &self.dataset.labels_topic;
        let mut encoder = self.dataset.labels_schema.encoder();
        let mut deliveries = Vec::with_capacity(rows.values().map(Vec::len).sum());
        let mut value = Vec::with_capacity(512);
        let mut id = Uuid::encode_buffer();
        for row in rows.values().flatten() {
            let record = LabeledExampleRecord::new(&self.name, &self.dataset.spec.hash, row);
            value.clear();
            encoder.encode(&record, &mut value)?;
            let version = row.version.to_string();
            let id = row.example_id.hyphenated().encode_lower(&mut id);
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "example_id",
                    value: Some(&*id),
                })
                .insert(Header {
                    key: "version",
                    value: Some(version.as_str()),
                });
            let record = FutureRecord::to(topic)
                .key(&*id)
                .payload(&value)
                .headers(headers);
            deliveries.push(enqueue(&self.shared.producer, record)?);
        }
        Ok(deliveries)
    }

    async fn dead_letter(
        &mut self,
        reason: DeadLetterReason,
        detail: &str,
        original: &[u8],
        source: &SourceRef,
    ) -> Result<(), EngineError> {
        self.records.add(RecordKind::DeadLetter);
        observability::dead_letter(&self.name, reason.as_str());
        tracing::warn!(dataset = %self.name, topic = %source.topic, partition = source.partition, offset = source.offset, reason = reason.as_str(), detail, "Poison record sent to the dead-letter topic");
        let dl = DeadLetter {
            source_topic: Some(source.topic.clone()),
            source_partition: Some(source.partition),
            source_offset: Some(source.offset),
            ..DeadLetter::new("labeler", reason, detail, original, now_ms())
        };
        let mut value = Vec::new();
        self.shared.deadletter.encode(&dl, &mut value)?;
        let key = format!("{}/{}", source.topic, source.partition);
        let record: FutureRecord<'_, String, Vec<u8>> =
            FutureRecord::to(DEADLETTER_TOPIC).key(&key).payload(&value);
        let f = send(&self.shared.producer, record).await?;
        delivered(f, delivery_limit(&self.shared.cfg)).await?;
        Ok(())
    }
}

type Delivery = rdkafka::producer::DeliveryFuture;

fn delivery_limit(cfg: &Config) -> Duration {
    feedloop_core::kafka::delivery_limit(&cfg.producer)
}

/// Awaits a delivery for at most `limit`: a report that never comes (seen once after the
/// broker restarted from empty) fails the commit, and the session starts again, instead of
/// holding the pipeline.
async fn delivered(f: Delivery, limit: Duration) -> Result<(), KafkaError> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((e, _)))) => Err(e),
        Ok(Err(_)) => Err(KafkaError::Canceled),
        Err(_) => Err(KafkaError::MessageProduction(
            rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
        )),
    }
}

/// One attempt to enqueue a record: its delivery, or the record back when the producer queue
/// is full.
#[allow(clippy::type_complexity)]
fn try_enqueue<'a, K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
    producer: &FutureProducer,
    record: FutureRecord<'a, K, P>,
) -> Result<Result<Delivery, FutureRecord<'a, K, P>>, KafkaError> {
    match producer.send_result(record) {
        Ok(f) => Ok(Ok(f)),
        Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
            Ok(Err(r))
        }
        Err((e, _)) => Err(e),
    }
}

/// How long a full producer queue is left to drain before trying again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// [`send`] for a thread outside the runtime.
fn enqueue<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<Delivery, KafkaError> {
    loop {
        match try_enqueue(producer, record)? {
            Ok(f) => return Ok(f),
            Err(r) => record = r,
        }
        std::thread::sleep(QUEUE_FULL_PAUSE);
    }
}

/// Enqueues a record, waiting while the producer queue is full.
async fn send<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<Delivery, KafkaError> {
    loop {
        match try_enqueue(producer, record)? {
            Ok(f) => return Ok(f),
            Err(r) => record = r,
        }
        tokio::time::sleep(QUEUE_FULL_PAUSE).await;
    }
}

fn consumer_config(
    kafka: &KafkaConfig,
    properties: &BTreeMap<String, String>,
    dataset: &str,
) -> ClientConfig {
    let mut cfg: ClientConfig = kafka.client_config(&format!("feedloop-labeler-{dataset}"));
    for (k, v) in properties {
        cfg.set(k, v);
    }
    cfg.set("group.id", format!("feedloop-labeler-{dataset}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    cfg
}

/// A record's offset and timestamp (ms).
type FirstRecord = (i64, Option<i64>);

/// The first record of each partition of `topic` at or after its offset in `at`: its offset
/// and timestamp, or `None` when the partition ends before it. One read for every partition.
fn read_first(
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    at: &[(i32, i64)],
    timeout: Duration,
) -> Result<HashMap<i32, Option<FirstRecord>>, KafkaError> {
    let mut found = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &(partition, offset) in at {
        // Past the end, some brokers (tansu) answer nothing rather than "out of range".
        let (_, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        if high <= offset {
            found.insert(partition, None);
        } else {
            tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
    }
    let mut waiting = tpl.count();
    if waiting == 0 {
        return Ok(found);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    while waiting > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        let (partition, first) = match consumer.poll(left.min(Duration::from_millis(500))) {
            Some(Ok(m)) => (m.partition(), Some((m.offset(), m.timestamp().to_millis()))),
            Some(Err(KafkaError::PartitionEOF(partition))) => (partition, None),
            Some(Err(e)) => return Err(e),
            None => continue,
        };
        if let std::collections::hash_map::Entry::Vacant(v) = found.entry(partition) {
            v.insert(first);
            waiting -= 1;
        }
    }
    Ok(found)
}

async fn wait_for_partitions(
    consumer: &StreamConsumer<QuietEof>,
    topic: &str,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<Vec<i32>, EngineError> {
    let deadline = Instant::now() + wait;
    loop {
        let md = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
        })?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !partitions.is_empty() {
            return Ok(partitions);
        }
        if Instant::now() >= deadline || shutdown.is_cancelled() {
            return Err(EngineError::MissingTopic(topic.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn latest_manifest(
    pool: &PgPool,
    dataset: &str,
    partition: &str,
) -> Result<Option<Manifest>, EngineError> {
    let text: Option<String> = sqlx::query_scalar(
        "SELECT manifest FROM labeler.partitions WHERE dataset = $1 AND partition = $2
         ORDER BY version DESC LIMIT 1",
    )
    .bind(dataset)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    Ok(match text {
        Some(t) => Some(serde_json::from_str(&t).map_err(DatasetError::from)?),
        None => None,
    })
}

/// Announces committed partition versions not announced yet (of one dataset, or all).
async fn publish_pending(shared: &Shared, dataset: Option<&str>) -> Result<(), EngineError> {
    announce(
        &shared.control,
        &shared.producer,
        &shared.partitions_schema,
        dataset,
        delivery_limit(&shared.cfg),
    )
    .await
}

/// Publishes every committed partition version of `dataset` (or of all datasets) that was not
/// announced yet on `feedloop.datasets.partitions`, then marks them announced.
/// Each announcement's delivery may take `limit`.
pub async fn announce(
    control: &PgPool,
    producer: &FutureProducer,
    schema: &CompiledSchema,
    dataset: Option<&str>,
    limit: Duration,
) -> Result<(), EngineError> {
    let rows = sqlx::query(
        "SELECT dataset, partition, version, manifest FROM labeler.partitions
         WHERE published_at IS NULL AND ($1::text IS NULL OR dataset = $1)
         ORDER BY committed_at, dataset, partition, version",
    )
    .bind(dataset)
    .fetch_all(control)
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut futures = Vec::new();
    let mut done = Vec::new();
    for r in &rows {
        let manifest: Manifest = serde_json::from_str(&r.try_get::<String, _>("manifest")?)
            .map_err(DatasetError::from)?;
        let mut value = Vec::new();
        schema.encode(&manifest, &mut value)?;
        let record = FutureRecord::to(PARTITIONS_TOPIC)
            .key(&manifest.dataset)
            .payload(&value);
        futures.push(send(producer, record).await?);
        done.push((
            r.try_get::<String, _>("dataset")?,
            r.try_get::<String, _>("partition")?,
            r.try_get::<i32, _>("version")?,
        ));
    }
    for f in futures {
        delivered(f, limit).await?;
    }
    let (datasets, rest): (Vec<String>, Vec<(String, i32)>) =
        done.into_iter().map(|(d, p, v)| (d, (p, v))).unzip();
    let (partitions, versions): (Vec<String>, Vec<i32>) = rest.into_iter().unzip();
    sqlx::query(
        "UPDATE labeler.partitions p SET published_at = now()
         FROM UNNEST($1::text[], $2::text[], $3::int[]) AS t(d, pa, v)
         WHERE p.dataset = t.d AND p.partition = t.pa AND p.version = t.v",
    )
    .bind(&datasets)
    .bind(&partitions)
    .bind(&versions)
    .execute(control)
    .await?;
    Ok(())
}

/// `io.feedloop.labels.LabeledExample` on `feedloop.labels.<dataset>`.
#[derive(Debug, Serialize)]
struct LabeledExampleRecord<'a> {
    example_id: String,
    dataset: &'a str,
    label_spec_hash: &'a str,
    version: i32,
    impression_event_id: String,
    match_id: String,
    viewer_id: &'a str,
    candidate_id: &'a str,
    impression_time: i64,
    request_id: &'a str,
    model_version: &'a str,
    experiment_id: Option<&'a str>,
    experiment_arm: Option<&'a str>,
    rank: i32,
    score: f64,
    features: &'a BTreeMap<String, Option<FeatureValue>>,
    accepted: Option<bool>,
    chat_seconds: Option<f64>,
    reported: bool,
    blocked: bool,
    label: Label,
    extra_labels: BTreeMap<&'a str, Option<FeatureValue>>,
    window_closed_at: i64,
    source_topic: &'a str,
    source_partition: i32,
    source_offset: i64,
}

fn feature(v: &Scalar) -> Option<FeatureValue> {
    match v {
        Scalar::Null => None,
        Scalar::Bool(b) => Some(FeatureValue::Bool(*b)),
        Scalar::Long(l) => Some(FeatureValue::Long(*l)),
        Scalar::Double(d) => Some(FeatureValue::Double(*d)),
        Scalar::Text(t) => Some(FeatureValue::String(t.clone())),
    }
}

impl<'a> LabeledExampleRecord<'a> {
    fn new(dataset: &'a str, spec_hash: &'a str, row: &'a Example) -> Self {
        let i = &row.impression;
        let l = &row.labeled;
        let bool_of = |n: &str| matches!(l.value(n), Some(Scalar::Bool(true)));
        Self {
            example_id: row.example_id.to_string(),
            dataset,
            label_spec_hash: spec_hash,
            version: row.version,
            impression_event_id: i.event_id.to_string(),
            match_id: i.match_id.to_string(),
            viewer_id: &i.viewer_id,
            candidate_id: &i.candidate_id,
            impression_time: i.time_ms,
            request_id: &i.request_id,
            model_version: &i.model_version,
            experiment_id: i.experiment_id.as_deref(),
            experiment_arm: i.experiment_arm.as_deref(),
            rank: i.rank,
            score: i.score,
            features: &i.features,
            accepted: match l.value("accepted") {
                Some(Scalar::Bool(b)) => Some(*b),
                _ => None,
            },
            chat_seconds: match l.value("chat_seconds") {
                Some(Scalar::Double(d)) => Some(*d),
                Some(Scalar::Long(v)) => Some(*v as f64),
                _ => None,
            },
            reported: bool_of("reported"),
            blocked: bool_of("blocked"),
            label: l.label,
            extra_labels: l
                .values
                .iter()
                .filter(|(n, _)| !TYPED_OUTCOMES.iter().any(|(t, _)| t == n))
                .map(|(n, v)| (n.as_str(), feature(v)))
                .collect(),
            window_closed_at: l.close_ms,
            source_topic: &i.source.topic,
            source_partition: i.source.partition,
            source_offset: i.source.offset,
        }
    }
}
