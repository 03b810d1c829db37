//! The capture loop: one replication session at a time (reconnecting after any failure), an
//! optional consistent snapshot before streaming, and every change published before its
//! position is confirmed to Postgres.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use feedloop_core::{
    avro::CompiledSchema,
    catalogue::{Catalogue, DEADLETTER_TOPIC, ERASURE_REQUESTS_TOPIC, TOPICS},
    crypto::KeyCache,
    kafka::{KafkaConfig, create_missing},
    model::{
        DeadLetter, DeadLetterReason, ErasureOrigin, ErasureRequest, erasure::DEFAULT_DEADLINE_MS,
    },
    registry_client::{RegistryClient, RegistryClientError},
};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use serde::Serialize;
use serde_json::Value as Json;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::{Config, IncompatiblePolicy, SnapshotMode},
    observability,
    pgoutput::{self, Message, OldTuple, Relation, Tuple, Value},
    pii::{self, Pii},
    sink::{self, Batch, Position},
    source::{self, SnapshotReader},
    tables::{EnvelopeOut, RowOut, Shape, Source, Table},
    types::Datum,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("source database: {0}")]
    Source(#[from] source::SourceError),
    #[error("control database: {0}")]
    Control(#[from] sqlx::Error),
    #[error("replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("Kafka topics: {0}")]
    Topics(#[from] feedloop_core::kafka::KafkaAdminError),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryClientError),
    #[error("encoding: {0}")]
    Codec(#[from] feedloop_core::avro::CodecError),
    #[error("catalogue: {0}")]
    Catalogue(String),
    #[error("a delivery failed: {0}")]
    Delivery(String),
    #[error("source url: {0}")]
    Url(String),
    #[error("CREATE_REPLICATION_SLOT returned no usable row")]
    SlotCreation,
    #[error("data keys: {0}")]
    Keys(#[from] feedloop_core::crypto::CryptoError),
    #[error(transparent)]
    Config(#[from] feedloop_core::config::ConfigError),
}

/// Room left in a record for its headers (source position, unchanged TOAST columns) and the
/// batch framing, below the producer's `message.max.bytes`.
const RECORD_OVERHEAD_BYTES: usize = 16 * 1024;

/// Row changes held back to look their data keys up together.
const KEY_LOOKAHEAD: usize = 512;

/// A captured table: encodable, or blocked by an incompatible schema change.
enum Entry {
    Ready(Table),
    Blocked { shape: Shape, reason: String },
}

impl Entry {
    fn shape(&self) -> &Shape {
        match self {
            Entry::Ready(t) => &t.shape,
            Entry::Blocked { shape, .. } => shape,
        }
    }
}

/// The transaction being streamed.
struct Txn {
    xid: u32,
    commit_lsn: u64,
    committed: SystemTime,
    ordinal: u32,
    futures: Vec<DeliveryFuture>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Postgres timestamps count microseconds from 2000-01-01.
fn pg_time(micros: i64) -> SystemTime {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let base = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    if micros >= 0 {
        base + Duration::from_micros(micros.unsigned_abs())
    } else {
        base - Duration::from_micros(micros.unsigned_abs())
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Replication connection settings from a `postgres://` URL, TLS included: `sslmode`
/// (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`; libpq's default `prefer`),
/// `sslrootcert`, and `sslcert` with `sslkey` for client certificates, as libpq reads them.
fn replication_config(cfg: &Config) -> Result<ReplicationConfig, EngineError> {
    let url =
        url::Url::parse(cfg.source.url.expose()).map_err(|e| EngineError::Url(e.to_string()))?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let db = url.path().trim_start_matches('/').to_owned();
    let tls = replication_tls(&url)?;
    Ok(ReplicationConfig::new(
        host,
        url.username().to_owned(),
        url.password().unwrap_or_default().to_owned(),
        if db.is_empty() {
            "postgres".to_owned()
        } else {
            db
        },
        cfg.source.slot.clone(),
        cfg.source.publication.clone(),
    )
    .with_port(url.port().unwrap_or(5432))
    .with_tls(tls)
    .with_status_interval(cfg.status_interval())
    .with_options("-c TimeZone=UTC -c DateStyle=ISO,YMD -c extra_float_digits=3")
    .with_application_name(format!("feedloop-cdc-{}", cfg.source.slot)))
}

/// The replication connection's TLS, from the URL's libpq parameters.
fn replication_tls(url: &url::Url) -> Result<TlsConfig, EngineError> {
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty())
    };
    let root = param("sslrootcert").map(std::path::PathBuf::from);
    let mode = param("sslmode").unwrap_or_else(|| "prefer".to_owned());
    let mut tls = match mode.as_str() {
        "disable" | "allow" => TlsConfig::disabled(),
        "prefer" => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::disabled()
        },
        "require" if root.is_none() => TlsConfig::require(),
        // libpq: `require` with a root certificate verifies it as `verify-ca` does.
        "require" | "verify-ca" => TlsConfig::verify_ca(root),
        "verify-full" => TlsConfig::verify_full(root),
        other => {
            return Err(EngineError::Url(format!(
                "sslmode {other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
            )));
        }
    };
    match (param("sslcert"), param("sslkey")) {
        (Some(cert), Some(key)) => tls = tls.with_client_cert(cert, key),
        (None, None) => {}
        _ => {
            return Err(EngineError::Url(
                "sslcert and sslkey go together".to_owned(),
            ));
        }
    }
    Ok(tls)
}

pub struct Engine {
    cfg: Config,
    source: PgPool,
    control: PgPool,
    registry: Arc<RegistryClient>,
    producer: FutureProducer,
    kafka: KafkaConfig,
    template: Json,
    tables: HashMap<u32, Entry>,
    topics: HashSet<String>,
    erasure: Arc<CompiledSchema>,
    deadletter: Arc<CompiledSchema>,
    outbox: HashMap<String, Arc<CompiledSchema>>,
    outbox_schema: String,
    db: String,
    /// A replication session is streaming (snapshot done).
    streaming: Arc<AtomicBool>,
    /// Seals personal columns.
    keys: Arc<KeyCache>,
    /// The largest key and value a change may have: a larger one the producer (or a broker
    /// aligned with it) would refuse, and retrying it from the slot would hold every later
    /// change back while WAL piles up on the source.
    max_record_bytes: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("slot", &self.cfg.source.slot)
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub async fn new(
        cfg: Config,
        source: PgPool,
        control: PgPool,
        registry: Arc<RegistryClient>,
        producer: FutureProducer,
        keys: Arc<KeyCache>,
    ) -> Result<Self, EngineError> {
        let catalogue = Catalogue::embedded().map_err(|e| EngineError::Catalogue(e.to_string()))?;
        let composed = |r: &str| {
            catalogue
                .composed(r)
                .map_err(|e| EngineError::Catalogue(e.to_string()))
        };
        let template: Json = serde_json::from_str(&composed("io.feedloop.cdc.Envelope")?)
            .map_err(|e| EngineError::Catalogue(e.to_string()))?;
        let subject_on = |topic: &str, name: &str, record: &str| {
            TOPICS
                .iter()
                .find(|t| t.name == topic)
                .map(|t| t.subject_as(name, record))
                .unwrap_or_default()
        };
        let subject = |topic: &str, record: &str| subject_on(topic, topic, record);
        let erasure = registry
            .register_compiled(
                &subject_on(
                    ERASURE_REQUESTS_TOPIC,
                    &cfg.users.erasure_requests_topic,
                    "io.feedloop.erasure.ErasureRequest",
                ),
                &composed("io.feedloop.erasure.ErasureRequest")?,
            )
            .await?;
        let deadletter = registry
            .register_compiled(
                &subject(DEADLETTER_TOPIC, "io.feedloop.deadletter.DeadLetter"),
                &composed("io.feedloop.deadletter.DeadLetter")?,
            )
            .await?;
        let outbox_schema = composed("io.feedloop.cdc.OutboxEvent")?;
        let db = url::Url::parse(cfg.source.url.expose())
            .map(|u| u.path().trim_start_matches('/').to_owned())
            .unwrap_or_default();
        let kafka = cfg.kafka.clone();
        let max_record_bytes = kafka
            .message_max_bytes(&cfg.producer)?
            .saturating_sub(RECORD_OVERHEAD_BYTES);
        Ok(Self {
            max_record_bytes,
            cfg,
            source,
            control,
            registry,
            producer,
            kafka,
            template,
            tables: HashMap::new(),
            topics: HashSet::new(),
            erasure,
            deadletter,
            outbox: HashMap::new(),
            outbox_schema,
            db,
            streaming: Arc::new(AtomicBool::new(false)),
            keys,
        })
    }

    /// Whether changes are being streamed right now (for readiness).
    pub fn streaming(&self) -> Arc<AtomicBool> {
        self.streaming.clone()
    }

    /// Runs sessions until `shutdown`, reconnecting with backoff after failures.
    ///
    /// Two sessions in a row that end on a failed delivery while the broker answers
    /// ([`ProducerHealth`](feedloop_core::kafka::ProducerHealth)): the broker lost its state, so
    /// the producer is replaced and the topics are created again where they are missing. The
    /// slot still holds every change not delivered.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let mut health = feedloop_core::kafka::ProducerHealth::new(2);
        loop {
            match self.session(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    observability::reconnect();
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Replication session ended; reconnecting");
                    if !matches!(e, EngineError::Delivery(_)) {
                        health.delivered();
                    } else if health.failed(&self.kafka, "cdc").await {
                        self.reset_producer();
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn reset_producer(&mut self) {
        match self.cfg.kafka.producer("feedloop-cdc", &self.cfg.producer) {
            Ok(p) => {
                self.producer = p;
                self.topics.clear();
                observability::producer_reset();
            }
            Err(e) => tracing::error!(error = %e, "Cannot create a new Kafka producer"),
        }
    }

    async fn snapshot_done(&self) -> Result<bool, EngineError> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM cdc.snapshots WHERE slot = $1)")
                .bind(&self.cfg.source.slot)
                .fetch_one(&self.control)
                .await?,
        )
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), EngineError> {
        let slot = self.cfg.source.slot.clone();
        source::prepare(
            &self.source,
            &self.cfg.source.publication,
            &self.cfg.source.tables,
        )
        .await?;
        let exists = source::slot_exists(&self.source, &slot).await?;
        let done = self.snapshot_done().await?;
        let snapshot = match self.cfg.source.snapshot {
            SnapshotMode::Never => false,
            SnapshotMode::Initial => !done,
            SnapshotMode::WhenNeeded => !done || !exists,
        };
        if exists && snapshot {
            tracing::warn!(
                slot,
                "Snapshot incomplete or needed again; recreating the slot"
            );
            source::drop_slot(&self.source, &slot).await?;
        }
        if !exists && done && !snapshot {
            tracing::error!(
                slot,
                "The replication slot was lost after its snapshot; changes since then are missing (snapshot = \"when_needed\" would re-read the tables)"
            );
        }
        // Schemas are re-derived from the stream in every session.
        self.tables.clear();
        let cfg = replication_config(&self.cfg)?;
        let mut client = if !exists || snapshot {
            let mut client = ReplicationClient::connect_gated(cfg).await?;
            let mode = if snapshot { "export" } else { "nothing" };
            let rows = client
                .simple_query(&format!(
                    "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT '{mode}')"
                ))
                .await?;
            let row = rows.first().ok_or(EngineError::SlotCreation)?;
            let text = |i: usize| {
                row.get(i)
                    .and_then(|v| v.as_ref())
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            };
            let point = text(1).ok_or(EngineError::SlotCreation)?;
            tracing::info!(slot, consistent_point = %point, snapshot, "Replication slot created");
            if snapshot {
                let name = text(2).ok_or(EngineError::SlotCreation)?;
                self.snapshot(&name, &point).await?;
            }
            client.start().await?;
            client
        } else {
            ReplicationClient::connect(cfg).await?
        };
        client.wait_started().await?;
        tracing::info!(slot, "Streaming changes");
        self.streaming.store(true, Ordering::Release);
        let result = self.stream(&mut client, shutdown).await;
        self.streaming.store(false, Ordering::Release);
        let _ = client.shutdown().await;
        result
    }

    /// Reads every captured table as of the slot's exported snapshot and publishes the rows as
    /// `r` events; records the snapshot as complete once Kafka acknowledged all of them.
    async fn snapshot(
        &mut self,
        snapshot: &str,
        consistent_point: &str,
    ) -> Result<(), EngineError> {
        let lsn = Lsn::parse(consistent_point)
            .map(|l| l.as_u64())
            .unwrap_or(0);
        let mut reader = SnapshotReader::open(self.cfg.source.url.expose(), snapshot).await?;
        let tables: Vec<String> = self
            .cfg
            .source
            .tables
            .iter()
            .filter(|t| **t != self.cfg.outbox.table)
            .cloned()
            .collect();
        // Outbox rows are events already routed when written; they are not replayed.
        let mut total = 0u64;
        let mut futures = Vec::new();
        let count = tables.len();
        // One row is held back, so that the very last one can be marked `last`.
        let mut held: Option<(Table, Tuple, u32)> = None;
        for name in &tables {
            let relation = source::relation(&self.source, name).await?;
            let oid = relation.oid;
            self.on_relation(relation).await?;
            let Some(Entry::Ready(table)) = self.tables.get(&oid) else {
                continue;
            };
            let table = table.clone();
            reader.declare(&table.shape.relation).await?;
            let mut ordinal = 0u32;
            loop {
                let rows = reader.fetch(self.cfg.source.snapshot_chunk_rows).await?;
                if rows.is_empty() {
                    break;
                }
                let n = rows.len();
                let tuples: Vec<Tuple> = rows
                    .into_iter()
                    .map(|row| {
                        row.into_iter()
                            .map(|v| v.map_or(Value::Null, |s| Value::Text(s.into_bytes())))
                            .collect()
                    })
                    .collect();
                if let Some(pii) = &table.pii {
                    self.keys
                        .prefetch(tuples.iter().filter_map(|t| pii.owner_of(t)))
                        .await?;
                }
                for tuple in tuples {
                    if let Some((t, tuple, ord)) = held.replace((table.clone(), tuple, ordinal)) {
                        self.snapshot_row(&t, &tuple, ord, lsn, false, &mut futures)
                            .await?;
                    }
                    ordinal += 1;
                }
                total += n as u64;
                observability::snapshot_rows(name, n as u64);
                // Bound memory: wait for what is queued before reading more.
                await_all(&mut futures).await?;
            }
            reader.close_cursor().await?;
            observability::snapshot_table_done();
            tracing::info!(table = %name, "Snapshot of table complete");
        }
        if let Some((t, tuple, ord)) = held.take() {
            self.snapshot_row(&t, &tuple, ord, lsn, true, &mut futures)
                .await?;
        }
        await_all(&mut futures).await?;
        reader.finish().await?;
        sqlx::query(
            "INSERT INTO cdc.snapshots (slot, consistent_point, tables, rows) VALUES ($1, $2, $3, $4)
             ON CONFLICT (slot) DO UPDATE SET consistent_point = EXCLUDED.consistent_point,
                 tables = EXCLUDED.tables, rows = EXCLUDED.rows, completed_at = now()",
        )
        .bind(&self.cfg.source.slot)
        .bind(consistent_point)
        .bind(i32::try_from(count).unwrap_or(i32::MAX))
        .bind(i64::try_from(total).unwrap_or(i64::MAX))
        .execute(&self.control)
        .await?;
        tracing::info!(rows = total, "Snapshot complete");
        Ok(())
    }

    async fn snapshot_row(
        &self,
        table: &Table,
        tuple: &Tuple,
        ordinal: u32,
        lsn: u64,
        last: bool,
        futures: &mut Vec<DeliveryFuture>,
    ) -> Result<(), EngineError> {
        let pos = Position {
            commit_lsn: lsn,
            ordinal,
            xid: 0,
            commit_ms: now_ms(),
        };
        let source = self.source_block(
            &table.shape,
            Some(if last { "last" } else { "true" }),
            now_ms(),
            None,
            lsn,
        );
        self.change(table, "r", None, Some(tuple), &source, &pos, futures)
            .await
    }

    fn source_block(
        &self,
        shape: &Shape,
        snapshot: Option<&'static str>,
        ts_ms: i64,
        xid: Option<u32>,
        lsn: u64,
    ) -> Source {
        Source {
            version: feedloop_core::VERSION,
            connector: "postgresql",
            name: self.cfg.topics.prefix.clone(),
            ts_ms,
            snapshot: Some(snapshot.unwrap_or("false")),
            db: self.db.clone(),
            sequence: None,
            schema: shape.relation.namespace.clone(),
            table: shape.relation.name.clone(),
            tx_id: xid.map(i64::from),
            lsn: i64::try_from(lsn).ok(),
            xmin: None,
        }
    }

    async fn ensure_topic(&mut self, topic: &str, compacted: bool) -> Result<(), EngineError> {
        if !self.topics.contains(topic) {
            create_missing(
                &self.kafka,
                &[(topic, self.cfg.topics.partitions, compacted)],
            )
            .await?;
            self.topics.insert(topic.to_owned());
        }
        Ok(())
    }

    /// A table's shape arrived (first change after connecting, or after DDL): (re)derive and
    /// register its schemas when they changed.
    async fn on_relation(&mut self, mut relation: Relation) -> Result<(), EngineError> {
        // The key is the primary key, whatever the replica identity marks.
        let keys = source::key_columns(&self.source, relation.oid).await?;
        for c in &mut relation.columns {
            c.key = keys.contains(&c.name);
        }
        let shape = Shape::new(relation);
        if let Some(existing) = self.tables.get(&shape.relation.oid)
            && existing.shape().same_encoding(&shape)
            && matches!(existing, Entry::Ready(_))
        {
            return Ok(());
        }
        let table_name = format!("{}.{}", shape.relation.namespace, shape.relation.name);
        if table_name == self.cfg.outbox.table {
            // Routed, not captured as changes: only the shape is needed.
            self.tables.insert(
                shape.relation.oid,
                Entry::Blocked {
                    shape,
                    reason: "outbox".into(),
                },
            );
            return Ok(());
        }
        let pii = match self.cfg.pii.tables.get(&table_name) {
            None => None,
            Some(cfg) => match Pii::resolve(cfg, &shape) {
                Ok(p) => Some(p),
                Err(reason) => {
                    tracing::error!(table = %table_name, %reason, "Personal columns cannot be sealed; this table's changes go to the dead-letter topic (sealed) until its shape or [pii] is fixed");
                    self.tables
                        .insert(shape.relation.oid, Entry::Blocked { shape, reason });
                    return Ok(());
                }
            },
        };
        let topic = format!(
            "{}.{}.{}",
            self.cfg.topics.prefix, shape.relation.namespace, shape.relation.name
        );
        self.ensure_topic(&topic, self.cfg.topics.compacted).await?;
        let value_json = shape.value_schema(&self.template, &self.cfg.topics.prefix);
        let key_json = shape.key_schema(&self.cfg.topics.prefix);
        let value_subject = format!("{topic}-value");
        let registered = match self
            .registry
            .register_compiled(&value_subject, &value_json)
            .await
        {
            Err(RegistryClientError::Api {
                code: 409, message, ..
            }) => match self.cfg.schema_changes.incompatible {
                IncompatiblePolicy::DeadLetter => {
                    observability::schema_change("incompatible");
                    tracing::error!(table = %table_name, "Incompatible schema change; this table's changes go to the dead-letter topic until its shape is compatible again");
                    self.tables.insert(
                        shape.relation.oid,
                        Entry::Blocked {
                            shape,
                            reason: message,
                        },
                    );
                    return Ok(());
                }
                IncompatiblePolicy::Force => {
                    tracing::warn!(table = %table_name, "Incompatible schema change; registering it anyway (schema_changes.incompatible = force)");
                    self.registry
                        .set_compatibility(Some(&value_subject), "NONE")
                        .await?;
                    observability::schema_change("forced");
                    self.registry
                        .register_compiled(&value_subject, &value_json)
                        .await?
                }
            },
            other => {
                let compiled = other?;
                observability::schema_change("registered");
                compiled
            }
        };
        let key = match key_json {
            Some(k) => {
                let subject = format!("{topic}-key");
                match self.registry.register_compiled(&subject, &k).await {
                    Err(RegistryClientError::Api { code: 409, .. }) => {
                        self.registry
                            .set_compatibility(Some(&subject), "NONE")
                            .await?;
                        Some(self.registry.register_compiled(&subject, &k).await?)
                    }
                    other => Some(other?),
                }
            }
            None => None,
        };
        tracing::info!(table = %table_name, schema_id = registered.id(), "Table schema ready");
        self.tables.insert(
            shape.relation.oid,
            Entry::Ready(Table {
                shape,
                topic,
                value: registered,
                key,
                pii,
            }),
        );
        Ok(())
    }

    /// Publishes one change event (and a tombstone after a delete).
    #[allow(clippy::too_many_arguments)]
    async fn change(
        &self,
        table: &Table,
        op: &'static str,
        before: Option<&Tuple>,
        after: Option<&Tuple>,
        source: &Source,
        pos: &Position,
        futures: &mut Vec<DeliveryFuture>,
    ) -> Result<(), EngineError> {
        let placeholder = &self.cfg.toast.placeholder;
        let (mut before, mut after) = match (
            table.shape.maybe_row(before, placeholder),
            table.shape.maybe_row(after, placeholder),
        ) {
            (Ok(b), Ok(a)) => (b, a),
            (Err(e), _) | (_, Err(e)) => {
                return self
                    .dead_letter(
                        DeadLetterReason::DecodeFailure,
                        &e,
                        (b"", None),
                        pos,
                        futures,
                    )
                    .await;
            }
        };
        if let Some(pii) = &table.pii {
            for (values, unchanged) in [&mut before, &mut after].into_iter().flatten() {
                let n = pii
                    .seal_row(&self.keys, &table.shape, values, unchanged)
                    .await?;
                observability::sealed(n);
            }
        }
        let mut value = Vec::with_capacity(256);
        table.value.encode(
            &EnvelopeOut {
                before: before.as_ref().map(|(v, _)| RowOut {
                    fields: &table.shape.fields,
                    values: v,
                }),
                after: after.as_ref().map(|(v, _)| RowOut {
                    fields: &table.shape.fields,
                    values: v,
                }),
                source,
                op,
                ts_ms: Some(now_ms()),
                transaction: None,
            },
            &mut value,
        )?;
        let key_row = after
            .as_ref()
            .or(before.as_ref())
            .map(|(v, _)| v.as_slice())
            .unwrap_or(&[]);
        let mut key = Vec::new();
        let keyed = table.encode_key(key_row, &mut key)?;
        let key = keyed.then_some(key.as_slice());
        if self
            .oversized(&table.topic, key, &value, pos, futures)
            .await?
        {
            if op == "d" && key.is_some() {
                futures.push(sink::send(&self.producer, &table.topic, key, None, pos, &[]).await?);
                observability::tombstone();
            }
            return Ok(());
        }
        let unchanged: Vec<String> = after.iter().flat_map(|(_, u)| u.iter().cloned()).collect();
        let unchanged = unchanged.join(",");
        // The user a row of an owned table belongs to: the eraser finds their keys by it.
        let owner = table.pii.as_ref().and_then(|pii| {
            after
                .as_ref()
                .or(before.as_ref())
                .and_then(|(v, _)| pii.row_owner(v))
        });
        let mut extra: Vec<(&str, &str)> = Vec::new();
        if !unchanged.is_empty() {
            extra.push(("feedloop.unchanged_toast", unchanged.as_str()));
        }
        if let Some(owner) = &owner {
            extra.push((feedloop_core::catalogue::OWNER_HEADER, owner.as_str()));
        }
        futures
            .push(sink::send(&self.producer, &table.topic, key, Some(&value), pos, &extra).await?);
        observability::change(op);
        if op == "d" && key.is_some() {
            futures.push(sink::send(&self.producer, &table.topic, key, None, pos, &[]).await?);
            observability::tombstone();
        }
        Ok(())
    }

    /// Publishes a dead letter about `original`, sealed with the data key of `owner` (the
    /// user the row belongs to, when known) or the day's unattributed key.
    async fn dead_letter(
        &self,
        reason: DeadLetterReason,
        detail: &str,
        (original, owner): (&[u8], Option<&str>),
        pos: &Position,
        futures: &mut Vec<DeliveryFuture>,
    ) -> Result<(), EngineError> {
        let dl = DeadLetter {
            source_offset: i64::try_from(pos.commit_lsn).ok(),
            ..DeadLetter::new("cdc", reason, detail, original, now_ms())
        }
        .seal(&self.keys, owner, now_ms())
        .await?;
        let mut value = Vec::new();
        self.deadletter.encode(&dl, &mut value)?;
        let id = dl.dead_letter_id.to_string();
        futures.push(
            sink::send(
                &self.producer,
                DEADLETTER_TOPIC,
                None,
                Some(&value),
                pos,
                &[("event_id", id.as_str())],
            )
            .await?,
        );
        observability::dead_letter(reason.as_str());
        tracing::warn!(
            reason = reason.as_str(),
            detail,
            "Change sent to the dead-letter topic"
        );
        Ok(())
    }

    /// Whether a record for `topic` is too large to publish; if so, a dead letter about it (its
    /// first 64 KiB, size and digest) is published instead.
    async fn oversized(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        pos: &Position,
        futures: &mut Vec<DeliveryFuture>,
    ) -> Result<bool, EngineError> {
        let size = value.len() + key.map_or(0, <[u8]>::len);
        if size <= self.max_record_bytes {
            return Ok(false);
        }
        let detail = format!(
            "a record of {size} bytes for {topic} exceeds the {} bytes the producer's message.max.bytes leaves for key and value",
            self.max_record_bytes
        );
        self.dead_letter(
            DeadLetterReason::SizeViolation,
            &detail,
            (value, None),
            pos,
            futures,
        )
        .await?;
        Ok(true)
    }

    /// Routes an outbox row to `outbox.<aggregate_type>`.
    async fn route_outbox(
        &mut self,
        shape: &Shape,
        tuple: &Tuple,
        pos: &Position,
        futures: &mut Vec<DeliveryFuture>,
    ) -> Result<(), EngineError> {
        let (row, _) = match shape.row(tuple, &self.cfg.toast.placeholder) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .dead_letter(
                        DeadLetterReason::DecodeFailure,
                        &e,
                        (b"", None),
                        pos,
                        futures,
                    )
                    .await;
            }
        };
        let col = |name: &str| {
            shape
                .relation
                .columns
                .iter()
                .position(|c| c.name == name)
                .and_then(|i| row.get(i))
        };
        let text = |name: &str| col(name).and_then(Datum::as_str).map(str::to_owned);
        let (Some(id), Some(aggregate_type), Some(aggregate_id), Some(kind)) = (
            text("id"),
            text("aggregate_type"),
            text("aggregate_id"),
            text("type"),
        ) else {
            let detail = "outbox row lacks id, aggregate_type, aggregate_id or type";
            let original = serde_json::to_vec(&row.iter().map(Datum::to_json).collect::<Vec<_>>())
                .unwrap_or_default();
            return self
                .dead_letter(
                    DeadLetterReason::SchemaViolation,
                    detail,
                    (&original, None),
                    pos,
                    futures,
                )
                .await;
        };
        let topic = format!("outbox.{}", crate::tables::avro_name(&aggregate_type));
        let schema = match self.outbox.get(&topic) {
            Some(s) => s.clone(),
            None => {
                self.ensure_topic(&topic, false).await?;
                let s = self
                    .registry
                    .register_compiled(&format!("{topic}-value"), &self.outbox_schema)
                    .await?;
                self.outbox.insert(topic.clone(), s.clone());
                s
            }
        };
        #[derive(Serialize)]
        struct OutboxEvent<'a> {
            id: &'a str,
            aggregate_type: &'a str,
            aggregate_id: &'a str,
            r#type: &'a str,
            payload: Option<&'a str>,
            created_at: Option<i64>,
            commit_lsn: i64,
        }
        let created_at = match col("created_at") {
            Some(Datum::Long(v)) => Some(*v),
            _ => None,
        };
        let mut value = Vec::new();
        schema.encode(
            &OutboxEvent {
                id: &id,
                aggregate_type: &aggregate_type,
                aggregate_id: &aggregate_id,
                r#type: &kind,
                payload: text("payload").as_deref(),
                created_at,
                commit_lsn: i64::try_from(pos.commit_lsn).unwrap_or(i64::MAX),
            },
            &mut value,
        )?;
        if self
            .oversized(&topic, Some(aggregate_id.as_bytes()), &value, pos, futures)
            .await?
        {
            return Ok(());
        }
        futures.push(
            sink::send(
                &self.producer,
                &topic,
                Some(aggregate_id.as_bytes()),
                Some(&value),
                pos,
                &[("id", id.as_str()), ("type", kind.as_str())],
            )
            .await?,
        );
        observability::outbox();
        Ok(())
    }

    /// Raises an erasure request when a user row is deleted or its `deleted_at` gets set.
    async fn user_change(
        &self,
        shape: &Shape,
        before: Option<&Tuple>,
        after: Option<&Tuple>,
        pos: &Position,
        futures: &mut Vec<DeliveryFuture>,
    ) -> Result<(), EngineError> {
        let id_col = shape
            .relation
            .columns
            .iter()
            .position(|c| c.name == self.cfg.users.id_column);
        let del_col = shape
            .relation
            .columns
            .iter()
            .position(|c| c.name == self.cfg.users.deleted_at_column);
        let Some(id_col) = id_col else { return Ok(()) };
        let text = |t: Option<&Tuple>, i: usize| match t.and_then(|t| t.get(i)) {
            Some(Value::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        let set = |t: Option<&Tuple>, i: Option<usize>| {
            i.and_then(|i| t.and_then(|t| t.get(i)))
                .is_some_and(|v| matches!(v, Value::Text(_)))
        };
        let (origin, user) = match (before, after) {
            (Some(b), None) => (ErasureOrigin::CdcDelete, text(Some(b), id_col)),
            (b, Some(a)) if set(Some(a), del_col) && !set(b, del_col) => {
                (ErasureOrigin::CdcSoftDelete, text(Some(a), id_col))
            }
            _ => return Ok(()),
        };
        let Some(user) = user else { return Ok(()) };
        let kind = if origin == ErasureOrigin::CdcDelete {
            "delete"
        } else {
            "soft_delete"
        };
        let now = now_ms();
        let request = ErasureRequest {
            // The same deletion replayed (at-least-once) yields the same request.
            request_id: Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("feedloop.cdc:{}:{user}:{kind}", self.cfg.source.slot).as_bytes(),
            ),
            user_ids: vec![user.clone()],
            reason: if origin == ErasureOrigin::CdcDelete {
                "account_deleted".into()
            } else {
                "account_soft_deleted".into()
            },
            requested_by: "cdc".into(),
            origin,
            idempotency_key: Some(format!("cdc:{user}:{kind}")),
            requested_at: now,
            deadline_at: now + DEFAULT_DEADLINE_MS,
        };
        let mut value = Vec::new();
        self.erasure.encode(&request, &mut value)?;
        let id = request.request_id.to_string();
        futures.push(
            sink::send(
                &self.producer,
                &self.cfg.users.erasure_requests_topic,
                Some(user.as_bytes()),
                Some(&value),
                pos,
                &[("event_id", id.as_str())],
            )
            .await?,
        );
        observability::erasure_request();
        Ok(())
    }

    /// Applies the row changes held back, after looking up the data keys they need at once.
    async fn apply_pending(
        &mut self,
        pending: &mut Vec<Message>,
        txn: &mut Txn,
    ) -> Result<(), EngineError> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut owners = Vec::new();
        for msg in pending.iter() {
            let (relation, tuple) = match msg {
                Message::Insert { relation, new } | Message::Update { relation, new, .. } => {
                    (relation, new)
                }
                Message::Delete { relation, old } => (relation, old.tuple()),
                _ => continue,
            };
            if let Some(Entry::Ready(Table { pii: Some(pii), .. })) = self.tables.get(relation)
                && let Some(owner) = pii.owner_of(tuple)
            {
                owners.push(owner);
            }
        }
        if !owners.is_empty() {
            self.keys.prefetch(owners).await?;
        }
        for msg in pending.drain(..) {
            self.apply(msg, txn).await?;
        }
        Ok(())
    }

    /// Handles one decoded message inside a transaction.
    async fn apply(&mut self, msg: Message, txn: &mut Txn) -> Result<(), EngineError> {
        let mut pos = Position {
            commit_lsn: txn.commit_lsn,
            ordinal: txn.ordinal,
            xid: txn.xid,
            commit_ms: unix_ms(txn.committed),
        };
        let (oid, before, after, op): (u32, Option<OldTuple>, Option<Tuple>, &'static str) =
            match msg {
                Message::Relation(r) => return self.on_relation(r).await,
                Message::Insert { relation, new } => (relation, None, Some(new), "c"),
                Message::Update { relation, old, new } => (relation, old, Some(new), "u"),
                Message::Delete { relation, old } => (relation, Some(old), None, "d"),
                Message::Truncate { relations, .. } => {
                    for oid in relations {
                        if let Some(Entry::Ready(table)) = self.tables.get(&oid) {
                            let source = self.source_block(
                                &table.shape,
                                None,
                                unix_ms(txn.committed),
                                Some(txn.xid),
                                txn.commit_lsn,
                            );
                            let mut value = Vec::new();
                            table.value.encode(
                                &EnvelopeOut {
                                    before: None,
                                    after: None,
                                    source: &source,
                                    op: "t",
                                    ts_ms: Some(now_ms()),
                                    transaction: None,
                                },
                                &mut value,
                            )?;
                            txn.futures.push(
                                sink::send(
                                    &self.producer,
                                    &table.topic,
                                    None,
                                    Some(&value),
                                    &pos,
                                    &[],
                                )
                                .await?,
                            );
                            observability::change("t");
                            txn.ordinal += 1;
                            pos.ordinal = txn.ordinal;
                        }
                    }
                    return Ok(());
                }
                Message::Type { .. }
                | Message::Origin { .. }
                | Message::Begin { .. }
                | Message::Commit { .. }
                | Message::LogicalMessage { .. } => return Ok(()),
            };
        txn.ordinal += 1;
        let Some(entry) = self.tables.get(&oid) else {
            let detail = format!("change for relation {oid} before its Relation message");
            return self
                .dead_letter(
                    DeadLetterReason::ProtocolViolation,
                    &detail,
                    (b"", None),
                    &pos,
                    &mut txn.futures,
                )
                .await;
        };
        let shape = entry.shape().clone();
        let table_name = format!("{}.{}", shape.relation.namespace, shape.relation.name);
        if table_name == self.cfg.users.table {
            self.user_change(
                &shape,
                before.as_ref().map(OldTuple::tuple),
                after.as_ref(),
                &pos,
                &mut txn.futures,
            )
            .await?;
        }
        if table_name == self.cfg.outbox.table {
            if let Some(a) = &after
                && op == "c"
            {
                return self.route_outbox(&shape, a, &pos, &mut txn.futures).await;
            }
            return Ok(());
        }
        let table = match self.tables.get(&oid) {
            Some(Entry::Ready(t)) => t.clone(),
            Some(Entry::Blocked { reason, .. }) => {
                let reason = reason.clone();
                let mut images = [
                    before.as_ref().map(|o| tuple_json(o.tuple())),
                    after.as_ref().map(tuple_json),
                ];
                // The row's owner, whose key seals the letter (and its personal columns).
                let mut owner = None;
                if let Some(cfg) = self.cfg.pii.tables.get(&table_name) {
                    for row in images.iter_mut().flatten() {
                        owner = owner.or_else(|| pii::owner_of_json(cfg, &shape, row));
                        pii::seal_json(&self.keys, cfg, &shape, row).await?;
                    }
                }
                let [before, after] = images;
                let change = serde_json::json!({
                    "table": table_name, "op": op,
                    "before": before,
                    "after": after,
                });
                let detail = format!("table schema not registered: {reason}");
                let original = change.to_string().into_bytes();
                return self
                    .dead_letter(
                        DeadLetterReason::SchemaViolation,
                        &detail,
                        (&original, owner.as_deref()),
                        &pos,
                        &mut txn.futures,
                    )
                    .await;
            }
            None => return Ok(()),
        };
        let source = self.source_block(
            &table.shape,
            None,
            unix_ms(txn.committed),
            Some(txn.xid),
            txn.commit_lsn,
        );
        // A key change is a delete of the old key and a create of the new one, as Debezium does.
        if let (Some(OldTuple::Key(old)), Some(new)) = (&before, &after)
            && table.shape.key.iter().any(|&i| old.get(i) != new.get(i))
        {
            self.change(
                &table,
                "d",
                Some(old),
                None,
                &source,
                &pos,
                &mut txn.futures,
            )
            .await?;
            txn.ordinal += 1;
            pos.ordinal = txn.ordinal;
            return self
                .change(
                    &table,
                    "c",
                    None,
                    Some(new),
                    &source,
                    &pos,
                    &mut txn.futures,
                )
                .await;
        }
        self.change(
            &table,
            op,
            before.as_ref().map(OldTuple::tuple),
            after.as_ref(),
            &source,
            &pos,
            &mut txn.futures,
        )
        .await
    }

    async fn stream(
        &mut self,
        client: &mut ReplicationClient,
        shutdown: &CancellationToken,
    ) -> Result<(), EngineError> {
        observability::batches_reset();
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(4096);
        let (confirmed_tx, mut confirmed_rx) = watch::channel(0u64);
        let (failed_tx, mut failed_rx) = watch::channel(None::<String>);
        let acker = sink::acker(batch_rx, confirmed_tx, failed_tx);
        let heartbeat = {
            let pool = self.source.clone();
            let every = Duration::from_millis(self.cfg.source.heartbeat_interval_ms.max(100));
            let slot = self.cfg.source.slot.clone();
            let stop = shutdown.child_token();
            let stop2 = stop.clone();
            (
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tick.tick() => {
                                if let Err(e) = source::heartbeat(&pool).await {
                                    tracing::debug!(error = %e, "Heartbeat failed");
                                }
                                if let Ok(Some(lag)) = source::slot_lag_bytes(&pool, &slot).await {
                                    observability::slot_lag(lag);
                                }
                                observability::report_lag_seconds();
                            }
                        }
                    }
                }),
                stop2,
            )
        };
        let mut txn: Option<Txn> = None;
        let mut pending: Vec<Message> = Vec::with_capacity(KEY_LOOKAHEAD);
        let mut submitted = 0u64;
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                changed = confirmed_rx.changed() => {
                    if changed.is_ok() {
                        let lsn = *confirmed_rx.borrow_and_update();
                        client.update_applied_lsn(Lsn::from_u64(lsn));
                        observability::confirmed(lsn);
                    }
                }
                changed = failed_rx.changed() => {
                    if changed.is_ok() && let Some(e) = failed_rx.borrow().clone() {
                        break Err(EngineError::Delivery(e));
                    }
                }
                event = client.recv() => {
                    let event = match event {
                        Ok(Some(e)) => e,
                        Ok(None) => break Err(EngineError::Delivery("replication stream ended".into())),
                        Err(e) => break Err(e.into()),
                    };
                    match event {
                        ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                            txn = Some(Txn { xid, commit_lsn: final_lsn.as_u64(), committed: pg_time(commit_time_micros), ordinal: 0, futures: Vec::new() });
                        }
                        ReplicationEvent::XLogData { data, .. } => {
                            let decoded = pgoutput::decode(&data);
                            let t = txn.get_or_insert_with(|| Txn { xid: 0, commit_lsn: submitted, committed: SystemTime::now(), ordinal: 0, futures: Vec::new() });
                            let applied = match decoded {
                                // Row changes wait a little, so that the data keys of a batch of
                                // them are looked up in one round trip.
                                Ok(msg @ (Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. })) => {
                                    pending.push(msg);
                                    if pending.len() >= KEY_LOOKAHEAD {
                                        self.apply_pending(&mut pending, t).await
                                    } else {
                                        Ok(())
                                    }
                                }
                                Ok(msg) => match self.apply_pending(&mut pending, t).await {
                                    Ok(()) => self.apply(msg, t).await,
                                    Err(e) => Err(e),
                                },
                                Err(e) => match self.apply_pending(&mut pending, t).await {
                                    Ok(()) => {
                                        let pos = Position { commit_lsn: t.commit_lsn, ordinal: t.ordinal, xid: t.xid, commit_ms: unix_ms(t.committed) };
                                        self.dead_letter(DeadLetterReason::DecodeFailure, &e.to_string(), (&data, None), &pos, &mut t.futures).await
                                    }
                                    Err(e) => Err(e),
                                },
                            };
                            if let Err(e) = applied {
                                break Err(e);
                            }
                        }
                        ReplicationEvent::Commit { end_lsn, .. } => {
                            if let Some(t) = txn.as_mut()
                                && let Err(e) = self.apply_pending(&mut pending, t).await
                            {
                                break Err(e);
                            }
                            let t = txn.take();
                            let (futures, committed) = t.map(|t| (t.futures, Some(t.committed))).unwrap_or_default();
                            submitted = end_lsn.as_u64();
                            observability::batch_sent(committed);
                            if batch_tx.send(Batch { futures, end_lsn: submitted, committed }).await.is_err() {
                                break Err(EngineError::Delivery("acknowledgement task stopped".into()));
                            }
                        }
                        // Outside a transaction, everything before these positions was handled.
                        ReplicationEvent::KeepAlive { wal_end, .. } if txn.is_none() && wal_end.as_u64() > submitted => {
                            submitted = wal_end.as_u64();
                            observability::batch_sent(None);
                            let _ = batch_tx.send(Batch { futures: Vec::new(), end_lsn: submitted, committed: None }).await;
                        }
                        ReplicationEvent::Message { lsn, transactional: false, .. } if txn.is_none() && lsn.as_u64() > submitted => {
                            submitted = lsn.as_u64();
                            observability::batch_sent(None);
                            let _ = batch_tx.send(Batch { futures: Vec::new(), end_lsn: submitted, committed: None }).await;
                        }
                        ReplicationEvent::StoppedAt { .. } => break Ok(()),
                        _ => {}
                    }
                }
            }
        };
        heartbeat.1.cancel();
        let _ = heartbeat.0.await;
        // Let what was submitted be acknowledged and confirmed before leaving.
        drop(batch_tx);
        let _ = tokio::time::timeout(Duration::from_secs(30), acker).await;
        let lsn = *confirmed_rx.borrow();
        if lsn > 0 {
            client.update_applied_lsn(Lsn::from_u64(lsn));
            observability::confirmed(lsn);
        }
        result
    }
}

async fn await_all(futures: &mut Vec<DeliveryFuture>) -> Result<(), EngineError> {
    for f in futures.drain(..) {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(EngineError::Delivery(e.to_string())),
            Err(_) => return Err(EngineError::Delivery("cancelled".into())),
        }
    }
    Ok(())
}

fn tuple_json(t: &Tuple) -> Json {
    Json::Array(
        t.iter()
            .map(|v| match v {
                Value::Null => Json::Null,
                Value::UnchangedToast => Json::String("(unchanged toast)".into()),
                Value::Text(b) | Value::Binary(b) => {
                    Json::String(String::from_utf8_lossy(b).into_owned())
                }
            })
            .collect(),
    )
}
