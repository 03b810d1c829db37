//! trigger configuration (defaults in `default.toml`).

use std::{collections::BTreeMap, path::Path, time::Duration};

pub use feedloop_core::config::{ControlConfig, LogConfig, RegistryConfig};
use feedloop_core::{
    config::{self, ConfigError, Secret},
    kafka::KafkaConfig,
};
use serde::Deserialize;

use crate::policy::Policy;

pub const DEFAULTS: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub trigger: TriggerConfig,
    pub policies: BTreeMap<String, Policy>,
    pub sinks: Vec<SinkConfig>,
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
    pub token: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    pub source: String,
    /// Consumer group of the intake of `feedloop.datasets.partitions`.
    pub consumer_group: String,
    pub evaluate_interval_ms: u64,
    pub deliver_interval_ms: u64,
    pub delivery_max_elapsed_ms: u64,
    pub delivery_lease_ms: u64,
    pub max_page: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Airflow,
    Dagster,
    Webhook,
}

/// CloudEvents HTTP binding mode of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookMode {
    /// The whole event as `application/cloudevents+json`.
    #[default]
    Structured,
    /// Attributes as `ce-*` headers, the data as the body.
    Binary,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    pub url: String,
    #[serde(default = "all_datasets")]
    pub datasets: Vec<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub bearer_token: Option<Secret>,
    #[serde(default = "default_airflow_version")]
    pub airflow_version: u8,
    #[serde(default = "default_dataset_uri")]
    pub dataset_uri: String,
    #[serde(default)]
    pub asset_id: Option<i64>,
    #[serde(default = "default_asset_key")]
    pub asset_key: String,
    #[serde(default)]
    pub mode: WebhookMode,
    #[serde(default)]
    pub hmac_secret: Option<Secret>,
    /// PEM file of the CA of an `https://` sink the system does not trust.
    #[serde(default, deserialize_with = "feedloop_core::config::path")]
    pub ca: String,
}

fn all_datasets() -> Vec<String> {
    vec!["*".into()]
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_airflow_version() -> u8 {
    2
}
fn default_dataset_uri() -> String {
    "feedloop://datasets/{dataset}".into()
}
fn default_asset_key() -> String {
    "{dataset}".into()
}

impl SinkConfig {
    pub fn wants(&self, dataset: &str) -> bool {
        self.datasets.iter().any(|d| d == "*" || d == dataset)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
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

    /// The policy of `dataset`: its own, else `"*"`.
    pub fn policy(&self, dataset: &str) -> Option<&Policy> {
        self.policies
            .get(dataset)
            .or_else(|| self.policies.get("*"))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.tls.validate("http.tls")?;
        self.kafka.validate("kafka")?;
        if self.auth.token.expose().len() < 16 {
            return Err(ConfigError::invalid(
                "auth.token",
                "required, at least 16 characters",
            ));
        }
        let t = &self.trigger;
        if t.evaluate_interval_ms == 0
            || t.deliver_interval_ms == 0
            || t.delivery_max_elapsed_ms == 0
            || t.delivery_lease_ms == 0
            || t.max_page <= 0
        {
            return Err(ConfigError::invalid(
                "trigger",
                "intervals, delivery_max_elapsed_ms, delivery_lease_ms and max_page must be positive",
            ));
        }
        for (name, p) in &self.policies {
            p.validate()
                .map_err(|m| ConfigError::invalid(&format!("policies.{name}"), m))?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sinks.iter().enumerate() {
            let key = format!("sinks[{i}]");
            if s.name.is_empty() || s.name == "kafka" || !names.insert(s.name.as_str()) {
                return Err(ConfigError::invalid(
                    &key,
                    "name: required, unique, and not `kafka` (the retrain topic's)",
                ));
            }
            if !(s.url.starts_with("http://") || s.url.starts_with("https://")) {
                return Err(ConfigError::invalid(&key, "url: http(s) URL required"));
            }
            if s.bearer_token.is_some() && s.user.is_some() {
                return Err(ConfigError::invalid(
                    &key,
                    "auth: either user/password or bearer_token",
                ));
            }
            if s.kind == SinkKind::Airflow {
                match s.airflow_version {
                    2 => {}
                    3 if s.asset_id.is_some() && s.user.is_some() => {}
                    3 => {
                        return Err(ConfigError::invalid(
                            &key,
                            "airflow_version 3 needs asset_id, user and password",
                        ));
                    }
                    _ => {
                        return Err(ConfigError::invalid(&key, "airflow_version: 2 or 3"));
                    }
                }
            }
            if s.timeout_ms == 0 {
                return Err(ConfigError::invalid(&key, "timeout_ms must be positive"));
            }
        }
        self.registry.validate()
    }
}
