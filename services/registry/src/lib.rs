//! A Confluent-compatible schema registry, stored in Postgres.
//!
//! `api` speaks the REST subset Confluent clients use; `service` decides what registering,
//! deleting and checking mean; `store` holds it in Postgres. Compatibility rules come from
//! `feedloop_core::avro::compat`.

pub mod api;
pub mod config;
pub mod error;
pub mod observability;
pub mod service;
pub mod store;

use std::{net::SocketAddr, sync::Arc};

use feedloop_core::postgres;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::RegistryError;

/// Why the registry could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("cannot migrate the control-plane schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Bind(#[from] feedloop_core::http::BindError),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// A started registry.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub task: JoinHandle<Result<(), StartError>>,
}

/// Connects, migrates, binds and serves until `shutdown` is cancelled.
pub fn start(
    config: Config,
    shutdown: CancellationToken,
) -> feedloop_core::Starting<Running, StartError> {
    Box::pin(start_up(config, shutdown))
}

async fn start_up(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    feedloop_core::telemetry::install_metrics(observability::describe);
    let pool = postgres::connect(
        config.postgres.url.expose(),
        config.postgres.max_connections,
    )
    .await?;
    postgres::migrate(&pool).await?;
    let (listener, addr) = feedloop_core::http::bind(&config.http.listen, &config.http.tls).await?;
    let state = api::AppState {
        registry: service::Registry::new(store::Store::new(pool)),
        users: Arc::new(config.auth.users.clone()),
    };
    let app = api::router(state, config.http.max_body_bytes, config.request_timeout());
    tracing::info!(%addr, "Registry listening");
    let task = tokio::spawn(async move {
        feedloop_core::http::serve(listener, app, shutdown)
            .await
            .map_err(StartError::Serve)
    });
    Ok(Running { addr, task })
}
