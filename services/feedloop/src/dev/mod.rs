//! The dev stack: a throwaway Postgres, a Kafka-compatible broker and feedloop's services on one
//! machine. `feedloop dev up` runs it; the integration tests use it as a library.

pub mod broker;
pub mod postgres;
pub mod process;
pub mod stack;

pub use broker::{Broker, BrokerProcess, EmbeddedBroker};
pub use feedloop_broker::Storage;
pub use postgres::PgCluster;
pub use stack::{BrokerChoice, ENDPOINTS_FILE, Endpoints, Stack, StackOptions};

/// Why the dev stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("missing prerequisite: {0}")]
    Prerequisite(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what} did not start:\n{detail}")]
    Start { what: &'static str, detail: String },
    #[error("{0} is not running")]
    NotRunning(&'static str),
    #[error("registry: {0}")]
    Registry(#[from] feedloop_registry::StartError),
    #[error("collector: {0}")]
    Collector(#[from] feedloop_collector::StartError),
    #[error("cdc: {0}")]
    Cdc(#[from] feedloop_cdc::StartError),
    #[error("labeler: {0}")]
    Labeler(#[from] feedloop_labeler::StartError),
    #[error("eraser: {0}")]
    Eraser(#[from] feedloop_eraser::StartError),
    #[error("trigger: {0}")]
    Trigger(#[from] feedloop_trigger::StartError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("schema registration: {0}")]
    Schemas(String),
    #[error("kafka: {0}")]
    Kafka(#[from] feedloop_core::kafka::KafkaAdminError),
    #[error(transparent)]
    Broker(#[from] feedloop_broker::BrokerError),
}

impl DevError {
    pub fn io(what: &'static str, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }
}
