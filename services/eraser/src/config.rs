//! eraser configuration (defaults in `default.toml`).

use std::{collections::BTreeMap, path::Path};

use feedloop_core::{
    config::{self, ConfigError, Secret},
    kafka::KafkaConfig,
};
pub use feedloop_core::{
    config::{ControlConfig, LogConfig, RegistryConfig},
    crypto::KeysConfig,
};
pub use feedloop_labeler::config::StateConfig;
use serde::Deserialize;

pub const DEFAULTS: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub erasure: ErasureConfig,
    pub datasets: DatasetsConfig,
    pub state: StateConfig,
    pub keys: KeysConfig,
    pub kafka: KafkaConfig,
    pub producer: BTreeMap<String, String>,
    pub registry: RegistryConfig,
    pub control: ControlConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    /// `[http.tls]`: HTTPS, when a certificate is set.
    pub tls: feedloop_core::tls::ServerTls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub admin_token: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureConfig {
    pub max_users: usize,
    pub deadline_days: u32,
    pub poll_interval_ms: u64,
    pub max_attempts: u32,
    /// Where erasure requests arrive from other services (cdc's account deletions).
    pub requests_topic: String,
    /// External compacted topics keyed by the raw user id (an explicit option: no feedloop
    /// topic is keyed so).
    pub tombstone_topics: Vec<String>,
    /// cdc's `topics.prefix`: the topics `<prefix>.*` whose records name their owner
    /// (`feedloop.owner`) get a tombstone under each key an erased user's row had.
    pub cdc_topic_prefix: String,
    pub hash_key: Secret,
    /// Days a dead letter whose user is unknown stays readable: its day's key is destroyed
    /// after them.
    pub unattributed_retention_days: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsConfig {
    pub root: String,
    pub options: BTreeMap<String, String>,
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
        if self.auth.admin_token.expose().len() < 16 {
            return Err(ConfigError::invalid(
                "auth.admin_token",
                "required, at least 16 characters",
            ));
        }
        if self.erasure.hash_key.expose().len() < 16 {
            return Err(ConfigError::invalid(
                "erasure.hash_key",
                "required, at least 16 characters",
            ));
        }
        self.keys.validate()?;
        if self.erasure.max_users == 0 || self.erasure.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "erasure.max_users",
                "max_users and max_attempts must be positive",
            ));
        }
        if !(1..=3650).contains(&self.erasure.unattributed_retention_days) {
            return Err(ConfigError::invalid(
                "erasure.unattributed_retention_days",
                "must be 1 to 3650",
            ));
        }
        if self.datasets.root.is_empty() {
            return Err(ConfigError::invalid("datasets.root", "must not be empty"));
        }
        self.registry.validate()
    }
}
