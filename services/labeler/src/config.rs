//! labeler configuration (defaults in `default.toml`).

use std::{collections::BTreeMap, path::Path, time::Duration};

use feedloop_core::{
    config::{self, ConfigError},
    kafka::KafkaConfig,
};
use serde::Deserialize;

use crate::spec::{EXAMPLE_SPEC, LabelSpec};

pub use feedloop_core::config::{ControlConfig, LogConfig, RegistryConfig};

pub const DEFAULTS: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub specs: SpecsConfig,
    pub inputs: InputsConfig,
    pub datasets: DatasetsConfig,
    pub state: StateConfig,
    pub kafka: KafkaConfig,
    pub producer: BTreeMap<String, String>,
    pub consumer: BTreeMap<String, String>,
    pub registry: RegistryConfig,
    pub control: ControlConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecsConfig {
    #[serde(deserialize_with = "feedloop_core::config::paths")]
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputsConfig {
    pub events_topic: String,
    pub cdc_prefix: String,
    pub wait_for_topics_ms: u64,
    /// How long an input partition must stay at its end before it stops holding the
    /// watermark back (see [`crate::window::Watermarks`]).
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsConfig {
    pub root: String,
    pub options: BTreeMap<String, String>,
    pub commit_interval_ms: u64,
    pub commit_max_rows: usize,
    pub labels_partitions: i32,
}

/// Which `StateStore` adapter holds the join state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Postgres,
    Scylla,
    /// In the labeler's memory, made durable by checkpoints committed with the offsets
    /// (segments under `<datasets.root>/_state/`). The eraser cannot reach it; see the
    /// README's erasure section. `memory` is the name earlier versions gave it.
    #[serde(alias = "memory")]
    Local,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    pub store: StoreKind,
    pub scylla_nodes: Vec<String>,
    pub scylla_keyspace: String,
    pub scylla_replication_factor: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// `[http.tls]`: HTTPS, when a certificate is set.
    pub tls: feedloop_core::tls::ServerTls,
}

impl Config {
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: Self = config::load_from_env(DEFAULTS, file)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The defaults alone, unvalidated, for embedding.
    pub fn from_defaults() -> Result<Self, ConfigError> {
        config::load(DEFAULTS, None, Vec::new())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.tls.validate("http.tls")?;
        self.kafka.validate("kafka")?;
        let specs = self.label_specs()?;
        let mut names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::invalid(
                "specs.files",
                "two specs have the same name",
            ));
        }
        if self.datasets.root.is_empty() {
            return Err(ConfigError::invalid("datasets.root", "must not be empty"));
        }
        if self.datasets.commit_interval_ms == 0 || self.datasets.commit_max_rows == 0 {
            return Err(ConfigError::invalid(
                "datasets.commit_interval_ms",
                "commit interval and max rows must be positive",
            ));
        }
        if self.datasets.labels_partitions < 1 {
            return Err(ConfigError::invalid(
                "datasets.labels_partitions",
                "must be positive",
            ));
        }
        if self.state.store == StoreKind::Scylla && self.state.scylla_nodes.is_empty() {
            return Err(ConfigError::invalid(
                "state.scylla_nodes",
                "required when state.store = \"scylla\"",
            ));
        }
        self.registry.validate()?;
        Ok(())
    }

    /// The label specs to run: the files, or the built-in example.
    pub fn label_specs(&self) -> Result<Vec<LabelSpec>, ConfigError> {
        if self.specs.files.is_empty() {
            return LabelSpec::parse("built-in match_outcomes", EXAMPLE_SPEC)
                .map(|s| vec![s])
                .map_err(|e| ConfigError::invalid("specs.files", e));
        }
        self.specs
            .files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| ConfigError::invalid("specs.files", format!("{f}: {e}")))?;
                LabelSpec::parse(f, &text).map_err(|e| ConfigError::invalid("specs.files", e))
            })
            .collect()
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.datasets.commit_interval_ms)
    }
}
