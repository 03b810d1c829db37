//! cdc: the product database's changes, streamed from Postgres logical replication (pgoutput)
//! into Kafka as Debezium-compatible Avro change events.
//!
//! - `pgoutput`: a pure decoder of the replication messages;
//! - `types`, `tables`: Postgres types as Avro, table schemas from the catalogue's template;
//! - `source`: SQL on the captured database (publication, slot, snapshot reads, heartbeats);
//! - `engine`: sessions, the snapshot, the stream; `sink`: acks before confirmation.

pub mod config;
pub mod engine;
pub mod observability;
pub mod pgoutput;
pub mod pii;
pub mod sink;
pub mod source;
pub mod tables;
pub mod types;

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, routing::get};
use feedloop_core::{
    catalogue::TOPICS,
    crypto::{CryptoError, key_cache},
    kafka::ensure_topics,
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
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Bind(#[from] feedloop_core::http::BindError),
    #[error("data key store: {0}")]
    Keys(#[from] CryptoError),
}

/// A started cdc.
#[derive(Debug)]
pub struct Running {
    /// Address of the operational HTTP endpoints.
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Starts capturing; runs until `shutdown`.
pub fn start(
    config: Config,
    shutdown: CancellationToken,
) -> feedloop_core::Starting<Running, StartError> {
    Box::pin(start_up(config, shutdown))
}

async fn start_up(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    feedloop_core::telemetry::install_metrics(observability::describe);
    let control = postgres::connect(config.control.url.expose(), 4).await?;
    postgres::migrate(&control).await?;
    let source = postgres::connect(config.source.url.expose(), 4).await?;
    let registry = Arc::new(config.registry.client()?);
    if let Err(e) = ensure_topics(&config.kafka, TOPICS).await {
        tracing::warn!(error = %e, "Could not ensure topics; continuing");
    }
    // A requests topic of another name (one deployment's of several on a cluster) is made
    // like the catalogue's.
    if let Err(e) = feedloop_core::kafka::create_missing(
        &config.kafka,
        &[(config.users.erasure_requests_topic.as_str(), 3, false)],
    )
    .await
    {
        tracing::warn!(error = %e, "Could not ensure the erasure requests topic; continuing");
    }
    let producer = config.kafka.producer("feedloop-cdc", &config.producer)?;
    let (listener, addr) = feedloop_core::http::bind(&config.http.listen, &config.http.tls).await?;
    let keys = key_cache(&config.keys, &control, &shutdown).await?;
    let engine = engine::Engine::new(config, source, control, registry, producer, keys).await?;
    let streaming = engine.streaming();
    let app = Router::new()
        .route(
            "/readyz",
            get(move || {
                let streaming = streaming.clone();
                async move {
                    if streaming.load(std::sync::atomic::Ordering::Acquire) {
                        (axum::http::StatusCode::OK, "streaming")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not streaming (connecting or snapshotting)",
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
    tracing::info!(%addr, "cdc operational endpoints listening");
    let task = tokio::spawn(async move {
        engine.run(shutdown).await;
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("cdc stopped");
    });
    Ok(Running { addr, task })
}
