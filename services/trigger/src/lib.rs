//! trigger: committed dataset partitions become retraining triggers for Airflow-style
//! schedulers.
//!
//! - `intake`: the catalogue of committed partition versions, from
//!   `feedloop.datasets.partitions`;
//! - `policy` and `decide`: when to retrain, per dataset, with the rule and its numbers;
//! - `event`: a trigger as a CloudEvents 1.0 event; `deliver`: to `feedloop.retrain`,
//!   Airflow, Dagster and webhooks, once per decision;
//! - `api`: the pull API for sensors.

pub mod api;
pub mod config;
pub mod decide;
pub mod deliver;
pub mod event;
pub mod observability;
pub mod policy;
pub mod store;

use std::{net::SocketAddr, sync::Arc};

use feedloop_core::{
    catalogue::{Catalogue, DEADLETTER_TOPIC, PARTITIONS_TOPIC, RETRAIN_TOPIC, TOPICS},
    intake::{Handled, Intake},
    kafka::{HealingProducer, ensure_topics},
    postgres,
    registry_client::RegistryClientError,
};
use feedloop_labeler::dataset::Manifest;
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
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("sink CA: {0}")]
    Tls(#[from] feedloop_core::tls::TlsError),
    #[error(transparent)]
    Bind(#[from] feedloop_core::http::BindError),
}

/// A started trigger.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Starts the intake, the decision loop, the deliveries and the pull API; runs until
/// `shutdown`.
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
    let catalogue = Catalogue::embedded()?;
    let subject = |topic: &str, record: &str| {
        TOPICS
            .iter()
            .find(|t| t.name == topic)
            .map(|t| t.subject(record))
            .unwrap_or_default()
    };
    let retrain_schema = registry
        .register_compiled(
            &subject(RETRAIN_TOPIC, "io.feedloop.trigger.RetrainTrigger"),
            &catalogue.composed("io.feedloop.trigger.RetrainTrigger")?,
        )
        .await?;
    let deadletter = registry
        .register_compiled(
            &subject(DEADLETTER_TOPIC, "io.feedloop.deadletter.DeadLetter"),
            &catalogue.composed("io.feedloop.deadletter.DeadLetter")?,
        )
        .await?;
    let producer = Arc::new(HealingProducer::new(
        &config.kafka,
        "feedloop-trigger",
        &config.producer,
        observability::PRODUCER_RESETS,
    )?);
    let cfg = Arc::new(config);
    let intake = Intake::new(
        &cfg.kafka,
        &cfg.trigger.consumer_group,
        PARTITIONS_TOPIC,
        "trigger",
        registry,
        producer.clone(),
        deadletter,
    )?
    .counting(feedloop_core::intake::IntakeMetrics {
        dead_letters: observability::DEAD_LETTERS,
        retries: observability::INTAKE_RETRIES,
        gap_records: observability::INTAKE_GAPS,
    });
    let deliverer = Arc::new(deliver::Deliverer {
        cfg: cfg.clone(),
        control: control.clone(),
        producer,
        schema: retrain_schema,
        http: feedloop_core::tls::client_builder(cfg.sinks.iter().map(|s| s.ca.as_str()))?
            .build()?,
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
    tracing::info!(%addr, "trigger listening");
    let intake_task = {
        let control = control.clone();
        tokio::spawn(intake.run(shutdown.clone(), move |m: Manifest| {
            let control = control.clone();
            async move {
                if m.dataset.is_empty() || m.partition.is_empty() || m.version < 1 {
                    return Ok(Handled::Poison(
                        "a partition record needs a dataset, a partition and a version ≥ 1".into(),
                    ));
                }
                match store::record_partition(&control, &m).await {
                    Ok(true) => {
                        observability::partition();
                        Ok(Handled::Done)
                    }
                    Ok(false) => Ok(Handled::Done),
                    Err(e) => Err(e.into()),
                }
            }
        }))
    };
    let decide_task = tokio::spawn(decide::run(cfg.clone(), control, shutdown.clone()));
    let deliver_task = tokio::spawn(deliverer.run(shutdown.clone()));
    let task = tokio::spawn(async move {
        let _ = intake_task.await;
        let _ = decide_task.await;
        let _ = deliver_task.await;
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("trigger stopped");
    });
    Ok(Running { addr, task })
}
