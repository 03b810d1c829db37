//! labeler: joins impressions with their outcomes inside label windows and writes labeled
//! examples to Kafka and to Parquet datasets, committed exactly once with lineage manifests.
//!
//! - `spec`: the declarative label spec (TOML);
//! - `window`: the pure window, label and watermark logic;
//! - `input`: events and cdc rows as impressions and outcomes;
//! - `state`: the `StateStore` port for join state and its adapters;
//! - `dataset`: Parquet files, manifests and the object store root;
//! - `engine`: one pipeline per dataset, and the commit protocol;
//! - `erasure`: the per-user partition index and partition rewrites for the eraser.

pub mod config;
pub mod dataset;
pub mod engine;
pub mod erasure;
pub mod input;
pub mod manifest;
pub mod observability;
pub mod spec;
pub mod state;
pub mod window;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, routing::get};
use feedloop_core::{
    catalogue::{Catalogue, DEADLETTER_TOPIC, PARTITIONS_TOPIC, TOPICS, labels_topic},
    kafka::ensure_topics,
    postgres,
    registry_client::RegistryClientError,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::{
    config::StoreKind,
    dataset::Root,
    engine::{Dataset, Mode, Shared},
    state::StateStore,
    window::Compiled,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("cannot migrate the control-plane schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryClientError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("configuration: {0}")]
    Config(#[from] feedloop_core::config::ConfigError),
    #[error("catalogue: {0}")]
    Catalogue(#[from] feedloop_core::catalogue::CatalogueError),
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Bind(#[from] feedloop_core::http::BindError),
}

/// A started labeler.
#[derive(Debug)]
pub struct Running {
    /// Address of the operational HTTP endpoints.
    pub addr: SocketAddr,
    /// Ends after a shutdown's final commits. Aborting it stops every pipeline where it is,
    /// with no final commit, as a crash would.
    pub task: JoinHandle<()>,
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The configured join-state adapter.
pub async fn state_store(
    state: &config::StateConfig,
    control: &sqlx::PgPool,
) -> Result<Arc<dyn StateStore>, StartError> {
    Ok(match state.store {
        StoreKind::Postgres => Arc::new(state::postgres::PostgresStore::new(control.clone())),
        StoreKind::Local => Arc::new(state::memory::MemoryStore::default()),
        StoreKind::Scylla => Arc::new(
            state::scylla::ScyllaStore::connect(
                &state.scylla_nodes,
                &state.scylla_keyspace,
                state.scylla_replication_factor,
            )
            .await?,
        ),
    })
}

/// Connects what the pipelines share and prepares one dataset per label spec.
async fn prepare(config: &Config, mode: Mode) -> Result<(Shared, Vec<Dataset>), StartError> {
    let specs = config.label_specs()?;
    let control = postgres::connect(config.control.url.expose(), 8).await?;
    postgres::migrate(&control).await?;
    let registry = Arc::new(config.registry.client()?);
    if let Err(e) = ensure_topics(&config.kafka, TOPICS).await {
        tracing::warn!(error = %e, "Could not ensure topics; continuing");
    }
    let catalogue = Catalogue::embedded()?;
    let subject = |topic: &str, record: &str| {
        TOPICS
            .iter()
            .find(|t| t.name == topic)
            .map(|t| t.subject(record))
            .unwrap_or_default()
    };
    let deadletter = registry
        .register_compiled(
            &subject(DEADLETTER_TOPIC, "io.feedloop.deadletter.DeadLetter"),
            &catalogue.composed("io.feedloop.deadletter.DeadLetter")?,
        )
        .await?;
    let partitions_schema = registry
        .register_compiled(
            &subject(PARTITIONS_TOPIC, "io.feedloop.datasets.DatasetPartition"),
            &catalogue.composed("io.feedloop.datasets.DatasetPartition")?,
        )
        .await?;
    let labels_json = catalogue.composed("io.feedloop.labels.LabeledExample")?;
    let root = Root::open(&config.datasets.root, &config.datasets.options)?;
    let state = state_store(&config.state, &control).await?;
    let shared = Shared {
        cfg: Arc::new(config.clone()),
        control,
        state,
        root,
        registry: registry.clone(),
        producer: config
            .kafka
            .producer("feedloop-labeler", &config.producer)?,
        deadletter,
        partitions_schema,
        mode,
        poison: Arc::default(),
    };
    let mut datasets = Vec::new();
    for spec in specs {
        let topic = labels_topic(&spec.name);
        let labels_schema = registry
            .register_compiled(&format!("{topic}-value"), &labels_json)
            .await?;
        datasets.push(Dataset {
            spec: Arc::new(Compiled::new(spec)),
            labels_schema,
            labels_topic: topic,
        });
    }
    Ok((shared, datasets))
}

/// What a replay wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub dataset: String,
    pub root: String,
    pub records: u64,
    pub rows: i64,
    pub partitions: i64,
}

/// Rebuilds `dataset` from the earliest offsets of its inputs into `config.datasets.root`,
/// with its bookkeeping in `config.control.url` (use a fresh database: positions and
/// manifests of the rebuild must not mix with the live dataset's). Publishes nothing.
/// `records` counts the records read, for progress.
pub async fn replay(
    mut config: Config,
    dataset: &str,
    records: Arc<std::sync::atomic::AtomicU64>,
) -> Result<ReplaySummary, ReplayError> {
    let specs = config.label_specs()?;
    let Some(spec) = specs.iter().find(|s| s.name == dataset) else {
        return Err(ReplayError::UnknownDataset {
            dataset: dataset.to_owned(),
            known: specs.iter().map(|s| s.name.clone()).collect(),
        });
    };
    // A shared store would mix the rebuild's state with the live dataset's; local state is the
    // rebuild's own, checkpointed under its root.
    if config.state.store != StoreKind::Local {
        config.state.store = StoreKind::Postgres;
    }
    config.specs.files = config
        .specs
        .files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|t| spec::LabelSpec::parse(f, &t).ok())
                .is_some_and(|s| s.name == spec.name)
        })
        .cloned()
        .collect();
    let (shared, datasets) = prepare(&config, Mode::Replay { records }).await?;
    let Some(d) = datasets.into_iter().find(|d| d.spec.spec.name == dataset) else {
        return Err(ReplayError::UnknownDataset {
            dataset: dataset.to_owned(),
            known: Vec::new(),
        });
    };
    let done = Arc::new(AtomicBool::new(false));
    engine::session(
        &shared,
        &d,
        &CancellationToken::new(),
        &done,
        &mut engine::Failed::default(),
    )
    .await?;
    let (rows, partitions): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(row_count), 0)::bigint, count(*) FROM (
           SELECT DISTINCT ON (partition) row_count FROM labeler.partitions
           WHERE dataset = $1 ORDER BY partition, version DESC) v",
    )
    .bind(dataset)
    .fetch_one(&shared.control)
    .await
    .map_err(StartError::from)?;
    Ok(ReplaySummary {
        dataset: dataset.to_owned(),
        root: shared.root.uri.clone(),
        records: match &shared.mode {
            Mode::Replay { records } => records.load(Ordering::Relaxed),
            Mode::Serve => 0,
        },
        rows,
        partitions,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("no label spec names dataset {dataset} (configured: {known:?})")]
    UnknownDataset { dataset: String, known: Vec<String> },
    #[error("configuration: {0}")]
    Config(#[from] feedloop_core::config::ConfigError),
}

/// Starts one pipeline per label spec; runs until `shutdown`.
pub fn start(
    config: Config,
    shutdown: CancellationToken,
) -> feedloop_core::Starting<Running, StartError> {
    Box::pin(start_up(config, shutdown))
}

async fn start_up(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    feedloop_core::telemetry::install_metrics(observability::describe);
    let (shared, datasets) = prepare(&config, Mode::Serve).await?;
    let (listener, addr) = feedloop_core::http::bind(&config.http.listen, &config.http.tls).await?;
    let ready: Vec<Arc<AtomicBool>> = datasets
        .iter()
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let all_ready = ready.clone();
    let app = Router::new()
        .route(
            "/readyz",
            get(move || {
                let ok = all_ready.iter().all(|r| r.load(Ordering::Acquire));
                async move {
                    if ok {
                        (axum::http::StatusCode::OK, "running")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "starting or restarting a dataset pipeline",
                        )
                    }
                }
            }),
        )
        .merge(feedloop_core::http::ops_routes())
        .layer(feedloop_core::http::timeout(
            feedloop_core::http::REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn_with_state(
            observability::HTTP,
            feedloop_core::http::track,
        ));
    let http_stop = shutdown.child_token();
    let http = tokio::spawn(feedloop_core::http::serve(listener, app, http_stop.clone()));
    tracing::info!(%addr, datasets = datasets.len(), "labeler operational endpoints listening");
    let pipelines: Vec<JoinHandle<()>> = datasets
        .into_iter()
        .zip(ready)
        .map(|(d, r)| tokio::spawn(engine::run(shared.clone(), d, shutdown.clone(), r)))
        .collect();
    let task = tokio::spawn(async move {
        // Aborting this task (as a crash would) aborts the pipelines too: none of them gets to
        // make the final commit of a shutdown.
        let _abort = AbortOnDrop(pipelines.iter().map(JoinHandle::abort_handle).collect());
        for p in pipelines {
            let _ = p.await;
        }
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("labeler stopped");
    });
    Ok(Running { addr, task })
}
