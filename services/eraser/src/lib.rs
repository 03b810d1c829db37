//! eraser: one erasure request reaches everything — the collector's suppression list, the
//! labeler's join state and datasets, and tombstones on user-keyed compacted topics — with an
//! audit certificate.
//!
//! - `store`: requests, targets and transitions in Postgres;
//! - `worker`: runs the targets, idempotently, retried with backoff;
//! - `api`: the admin HTTP API; `intake`: requests from cdc on `feedloop.erasure.requests`.

pub mod api;
pub mod config;
pub mod intake;
pub mod observability;
pub mod store;
pub mod verify;
pub mod worker;

use std::{net::SocketAddr, sync::Arc};

use feedloop_core::{
    catalogue::{Catalogue, ERASURE_AUDIT_TOPIC, PARTITIONS_TOPIC, TOPICS},
    kafka::{HealingProducer, ensure_topics},
    postgres,
    registry_client::RegistryClientError,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

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
    #[error("catalogue: {0}")]
    Catalogue(#[from] feedloop_core::catalogue::CatalogueError),
    #[error("datasets: {0}")]
    Dataset(#[from] feedloop_labeler::dataset::DatasetError),
    #[error("join state: {0}")]
    State(#[from] feedloop_labeler::StartError),
    #[error(transparent)]
    Bind(#[from] feedloop_core::http::BindError),
    #[error("data key store: {0}")]
    Keys(#[from] feedloop_core::crypto::CryptoError),
}

/// A started eraser.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Starts the API, the worker and the intake of cdc's requests; runs until `shutdown`.
pub fn start(
    config: Config,
    shutdown: CancellationToken,
) -> feedloop_core::Starting<Running, StartError> {
    Box::pin(start_up(config, shutdown))
}

async fn start_up(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    feedloop_core::telemetry::install_metrics(observability::describe);
    let control = postgres::connect(config.control.url.expose(), 8).await?;
    postgres::migrate(&control).await?;
    let registry = Arc::new(config.registry.client()?);
    if let Err(e) = ensure_topics(&config.kafka, TOPICS).await {
        tracing::warn!(error = %e, "Could not ensure topics; continuing");
    }
    // A requests topic of another name (one deployment's of several on a cluster) is made
    // like the catalogue's.
    if let Err(e) = feedloop_core::kafka::create_missing(
        &config.kafka,
        &[(config.erasure.requests_topic.as_str(), 3, false)],
    )
    .await
    {
        tracing::warn!(error = %e, "Could not ensure the erasure requests topic; continuing");
    }
    let catalogue = Catalogue::embedded()?;
    let subject = |topic: &str, record: &str| {
        TOPICS
            .iter()
            .find(|t| t.name == topic)
            .map(|t| t.subject(record))
            .unwrap_or_default()
    };
    let partitions_schema = registry
        .register_compiled(
            &subject(PARTITIONS_TOPIC, "io.feedloop.datasets.DatasetPartition"),
            &catalogue.composed("io.feedloop.datasets.DatasetPartition")?,
        )
        .await?;
    let audit_schema = registry
        .register_compiled(
            &subject(ERASURE_AUDIT_TOPIC, "io.feedloop.erasure.ErasureAudit"),
            &catalogue.composed("io.feedloop.erasure.ErasureAudit")?,
        )
        .await?;
    let producer = Arc::new(HealingProducer::new(
        &config.kafka,
        "feedloop-eraser",
        &config.producer,
        observability::PRODUCER_RESETS,
    )?);
    let cfg = Arc::new(config);
    let worker = worker::Worker {
        cfg: cfg.clone(),
        control: control.clone(),
        state: feedloop_labeler::state_store(&cfg.state, &control).await?,
        keys: feedloop_core::crypto::key_store(&cfg.keys, &control).await?,
        root: feedloop_labeler::dataset::Root::open(&cfg.datasets.root, &cfg.datasets.options)?,
        producer: producer.clone(),
        partitions_schema,
        audit_schema,
    };
    let deadletter = registry
        .register_compiled(
            &subject(
                feedloop_core::catalogue::DEADLETTER_TOPIC,
                "io.feedloop.deadletter.DeadLetter",
            ),
            &catalogue.composed("io.feedloop.deadletter.DeadLetter")?,
        )
        .await?;
    let intake = feedloop_core::intake::Intake::new(
        &cfg.kafka,
        "feedloop-eraser",
        &cfg.erasure.requests_topic,
        "eraser",
        registry,
        producer,
        deadletter,
    )?
    .counting(feedloop_core::intake::IntakeMetrics {
        dead_letters: observability::DEAD_LETTERS,
        retries: observability::INTAKE_RETRIES,
        gap_records: observability::INTAKE_GAPS,
    });
    let (listener, addr) = feedloop_core::http::bind(&cfg.http.listen, &cfg.http.tls).await?;
    let app = api::routes(api::Api {
        cfg: cfg.clone(),
        control: control.clone(),
    })
    .merge(feedloop_core::http::ops_routes())
    .merge(feedloop_core::http::postgres_readyz(control.clone()))
    .layer(feedloop_core::http::timeout(
        feedloop_core::http::REQUEST_TIMEOUT,
    ))
    .layer(axum::middleware::from_fn_with_state(
        observability::HTTP,
        feedloop_core::http::track,
    ));
    let http_stop = shutdown.child_token();
    let http = tokio::spawn(feedloop_core::http::serve(listener, app, http_stop.clone()));
    tracing::info!(%addr, "eraser listening");
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    let intake_task = {
        let control = control.clone();
        let deadline_ms = i64::from(cfg.erasure.deadline_days) * 86_400_000;
        tokio::spawn(intake.run(
            shutdown.clone(),
            move |request: feedloop_core::model::ErasureRequest| {
                let control = control.clone();
                async move { intake::take(&control, request, deadline_ms).await }
            },
        ))
    };
    let task = tokio::spawn(async move {
        let _ = worker_task.await;
        let _ = intake_task.await;
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("eraser stopped");
    });
    Ok(Running { addr, task })
}
