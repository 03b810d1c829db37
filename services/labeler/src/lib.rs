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
    time::Duration,
};

use axum::{Router, routing::get};
use feedloop_core::{
    catalogue::{Catalogue, DEADLETTER_TOPIC, PARTITIONS_TOPIC, TOPICS, labels_topic},
    kafka::{create_missing, ensure_topics},
    postgres,
    registry_client::{RegistryClient, RegistryClientError},
};
use rdkafka::producer::FutureProducer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::{
    config::StoreKind,
    dataset::Root,
    engine::{Dataset, Shared},
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
    pub task: JoinHandle<()>,
}

fn producer(config: &Config) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    let mut cfg = config.kafka.client_config("feedloop-labeler");
    for (k, v) in &config.producer {
        cfg.set(k, v);
    }
    cfg.set("enable.idempotence", "true").set("acks", "all");
    cfg.create()
}

/// The configured join-state adapter.
pub async fn state_store(
    config: &Config,
    control: &sqlx::PgPool,
) -> Result<Arc<dyn StateStore>, StartError> {
    Ok(match config.state.store {
        StoreKind::Postgres => Arc::new(state::postgres::PostgresStore::new(control.clone())),
        StoreKind::Scylla => Arc::new(
            state::scylla::ScyllaStore::connect(
                &config.state.scylla_nodes,
                &config.state.scylla_keyspace,
                config.state.scylla_replication_factor,
            )
            .await?,
        ),
    })
}

/// Starts one pipeline per label spec; runs until `shutdown`.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    observability::describe();
    let specs = config.label_specs()?;
    let control = postgres::connect(config.control.url.expose(), 8).await?;
    postgres::migrate(&control).await?;
    let auth = (!config.registry.user.is_empty()).then(|| {
        (
            config.registry.user.clone(),
            config.registry.password.clone(),
        )
    });
    let registry = Arc::new(RegistryClient::new(
        &config.registry.url,
        auth,
        Duration::from_secs(10),
    )?);
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
    let state = state_store(&config, &control).await?;
    let shared = Shared {
        cfg: Arc::new(config.clone()),
        control,
        state,
        root,
        registry: registry.clone(),
        producer: producer(&config)?,
        deadletter,
        partitions_schema,
    };
    let mut datasets = Vec::new();
    for spec in specs {
        let topic = labels_topic(&spec.name);
        if let Err(e) = create_missing(
            &config.kafka,
            &[(topic.as_str(), config.datasets.labels_partitions, false)],
        )
        .await
        {
            tracing::warn!(error = %e, topic, "Could not create the labels topic; continuing");
        }
        let labels_schema = registry
            .register_compiled(&format!("{topic}-value"), &labels_json)
            .await?;
        datasets.push(Dataset {
            spec: Arc::new(Compiled::new(spec)),
            labels_schema,
            labels_topic: topic,
        });
    }
    let (listener, addr) = feedloop_core::http::bind(&config.http.listen).await?;
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
        for p in pipelines {
            let _ = p.await;
        }
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("labeler stopped");
    });
    Ok(Running { addr, task })
}
