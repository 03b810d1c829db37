//! The collector: the HTTP API mobile clients post event batches to.
//!
//! - `api`: HTTP (native and Segment formats, auth, limits, errors);
//! - `ingest`: pure parsing and validation into catalogue events;
//! - `pipeline`: suppression, deduplication, encoding;
//! - `durable`, `spool`, `scan`: acknowledged by the broker or spooled to disk, never lost;
//! - `dedup`, `suppression`, `auth`: the state the request path consults.

// Rejections (`ingest::Reject`, HTTP refusals) are large but rare on the hot path, where
// results are `Ok`; boxing them would cost an allocation on every bad event for no gain.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod auth;
pub mod config;
pub mod dedup;
pub mod durable;
pub mod ingest;
pub mod observability;
pub mod pipeline;
pub mod scan;
pub mod spool;
pub mod suppression;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use feedloop_core::{
    catalogue::TOPICS,
    crypto::{CryptoError, key_cache},
    kafka::{KafkaAdminError, ensure_topics},
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
    #[error("schemas: {0}")]
    Codecs(#[from] pipeline::CodecsError),
    #[error("spool: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("Kafka topics: {0}")]
    Topics(#[from] KafkaAdminError),
    #[error(transparent)]
    Bind(#[from] feedloop_core::http::BindError),
    #[error("data key store: {0}")]
    Keys(#[from] CryptoError),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// A started collector.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Ends when the server stopped and the spool and producer were flushed.
    pub task: JoinHandle<Result<(), StartError>>,
}

/// Starts the collector; it runs until `shutdown` is cancelled, then drains in-flight requests,
/// flushes the producer and closes the spool.
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
    let registry = config.registry.client()?;
    let codecs = pipeline::Codecs::register(&registry).await?;
    // Best effort: topics may already exist, or be managed by the cluster's operators.
    if let Err(e) = ensure_topics(&config.kafka, TOPICS).await {
        tracing::warn!(error = %e, "Could not ensure topics; continuing");
    }

    let dedup = Arc::new(dedup::Dedup::new(
        config.dedup.window_ms,
        config.dedup.max_entries,
    ));
    let (spool, pending) = spool::Spool::open(
        &config.spool.dir,
        config.spool.max_bytes,
        config.spool.segment_bytes,
    )?;
    // Spooled events were acknowledged: retries of them are duplicates.
    let now = durable::now_ms();
    dedup.remember(pending.iter().map(|r| (r.id, r.at_ms.min(now))), now);
    if !pending.is_empty() {
        tracing::info!(
            records = pending.len(),
            "Spool holds records from a previous run"
        );
    }
    let durable = Arc::new(durable::Durable::new(
        config.kafka.clone(),
        config.producer.clone(),
        spool,
        dedup.clone(),
        config.ack_timeout(),
        config.sink.kind,
        codecs.deadletter(),
    )?);
    if config.sink.kind == config::SinkKind::Null {
        tracing::warn!("[sink] kind = \"null\": accepted events are discarded, not published");
    }
    let suppression = Arc::new(suppression::Suppression::default());
    let keys = key_cache(&config.keys, &pool, &shutdown).await?;

    let background = CancellationToken::new();
    let drain = (config.sink.kind == config::SinkKind::Kafka).then(|| {
        tokio::spawn(durable.clone().drain(
            i64::try_from(config.dedup.window_ms).unwrap_or(i64::MAX),
            background.clone(),
        ))
    });
    let follow = tokio::spawn(suppression.clone().follow(
        pool,
        Duration::from_millis(config.suppression.refresh_ms),
        background.clone(),
    ));

    let state = Arc::new(api::AppState {
        pipeline: Arc::new(pipeline::Pipeline {
            dedup,
            durable: durable.clone(),
            suppression,
            codecs,
            keys,
        }),
        keys: auth::Keys::new(&config.auth),
        limiter: auth::RateLimiter::new(&config.limits),
        time: config.time.clone(),
        max_decompressed_bytes: config.http.max_decompressed_bytes,
        max_event_bytes: config.http.max_event_bytes,
        max_batch_len: config.http.max_batch_len,
    });
    let app = api::router(state, &config);
    let (listener, addr) = feedloop_core::http::bind(&config.http.listen, &config.http.tls).await?;
    tracing::info!(%addr, "Collector listening");
    let task = tokio::spawn(async move {
        let served = feedloop_core::http::serve(listener, app, shutdown).await;
        // In-flight requests are done: stop the background work, flush what is queued.
        background.cancel();
        if let Some(drain) = drain {
            let _ = drain.await;
        }
        let _ = follow.await;
        let d = durable.clone();
        let _ = tokio::task::spawn_blocking(move || d.flush(Duration::from_secs(10))).await;
        tracing::info!("Collector stopped");
        served.map_err(StartError::Serve)
    });
    Ok(Running { addr, task })
}
