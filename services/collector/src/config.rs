//! Collector configuration (defaults in `default.toml`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use feedloop_core::{
    config::{self, ConfigError, Secret},
    kafka::KafkaConfig,
};
use serde::Deserialize;

pub use feedloop_core::{
    config::{LogConfig, RegistryConfig},
    crypto::KeysConfig,
};

pub const DEFAULTS: &str = include_str!("../default.toml");

/// What a record adds to its event or dead-letter input, at most: the Avro envelope, the
/// dead letter's detail and identifiers, sealed fields' nonces and tags, headers and key.
const RECORD_OVERHEAD_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub kafka: KafkaConfig,
    /// librdkafka producer properties, on top of `kafka.properties`.
    pub producer: BTreeMap<String, String>,
    pub registry: RegistryConfig,
    pub postgres: PostgresConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub time: TimeConfig,
    pub dedup: DedupConfig,
    pub spool: SpoolConfig,
    pub sink: SinkConfig,
    pub suppression: SuppressionConfig,
    pub keys: KeysConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub max_request_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub max_event_bytes: usize,
    pub max_batch_len: usize,
    pub request_timeout_ms: u64,
    pub max_in_flight: usize,
    /// `[http.tls]`: HTTPS, when a certificate is set.
    pub tls: feedloop_core::tls::ServerTls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub url: Secret,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub apps: BTreeMap<String, AppConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Write keys of the application (several allow rotation).
    pub keys: Vec<Secret>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub events_per_second: u32,
    pub burst: u32,
}

/// What to do with events whose corrected time lies too far in the future.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FuturePolicy {
    Flag,
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    pub max_future_ms: i64,
    pub future: FuturePolicy,
    pub max_age_ms: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    pub window_ms: u64,
    pub max_entries: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    #[serde(deserialize_with = "feedloop_core::config::path_buf")]
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub ack_timeout_ms: u64,
}

/// `[sink]`: where accepted events go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub kind: SinkKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// The log (with the spool while the broker is away).
    Kafka,
    /// Nowhere: encoded events are discarded (benchmarks of the collector's own cost).
    Null,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressionConfig {
    pub refresh_ms: u64,
}

impl Config {
    /// Defaults, then `file`, then the environment; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: Self = config::load_from_env(DEFAULTS, file)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The defaults alone, unvalidated: for embedding (the dev stack, tests), which then fill
    /// in the endpoints and keys.
    pub fn from_defaults() -> Result<Self, ConfigError> {
        config::load(DEFAULTS, None, Vec::new())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.tls.validate("http.tls")?;
        self.kafka.validate("kafka")?;
        if self.auth.apps.is_empty() {
            return Err(ConfigError::invalid(
                "auth.apps",
                "at least one application with a write key is required",
            ));
        }
        for (app, cfg) in &self.auth.apps {
            if cfg.keys.is_empty() || cfg.keys.iter().any(|k| k.expose().len() < 16) {
                return Err(ConfigError::invalid(
                    &format!("auth.apps.{app}.keys"),
                    "needs at least one key, each of 16 characters or more",
                ));
            }
        }
        self.keys.validate()?;
        let positive = [
            ("http.max_request_bytes", self.http.max_request_bytes as u64),
            (
                "http.max_decompressed_bytes",
                self.http.max_decompressed_bytes as u64,
            ),
            ("http.max_event_bytes", self.http.max_event_bytes as u64),
            ("http.max_batch_len", self.http.max_batch_len as u64),
            ("http.max_in_flight", self.http.max_in_flight as u64),
            (
                "limits.events_per_second",
                u64::from(self.limits.events_per_second),
            ),
            ("dedup.window_ms", self.dedup.window_ms),
            ("dedup.max_entries", self.dedup.max_entries as u64),
            ("spool.max_bytes", self.spool.max_bytes),
            ("spool.segment_bytes", self.spool.segment_bytes),
            ("spool.ack_timeout_ms", self.spool.ack_timeout_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be positive"));
            }
        }
        if self.limits.burst < self.limits.events_per_second {
            return Err(ConfigError::invalid(
                "limits.burst",
                "must be at least limits.events_per_second",
            ));
        }
        if self.http.max_decompressed_bytes < self.http.max_request_bytes {
            return Err(ConfigError::invalid(
                "http.max_decompressed_bytes",
                "must be at least http.max_request_bytes",
            ));
        }
        let message_max = self.message_max_bytes()?;
        let largest = self
            .http
            .max_event_bytes
            .max(feedloop_core::model::ORIGINAL_MAX_BYTES)
            .saturating_add(RECORD_OVERHEAD_BYTES);
        if largest > message_max {
            return Err(ConfigError::invalid(
                "http.max_event_bytes",
                format!(
                    "an event of this size, or a dead letter ({} bytes of its input), with {} bytes of record overhead, must fit the producer's message.max.bytes ({message_max}): the broker would refuse it",
                    feedloop_core::model::ORIGINAL_MAX_BYTES,
                    RECORD_OVERHEAD_BYTES
                ),
            ));
        }
        self.registry.validate()?;
        Ok(())
    }

    /// The largest record the producer sends (see [`KafkaConfig::message_max_bytes`]).
    pub fn message_max_bytes(&self) -> Result<usize, ConfigError> {
        self.kafka.message_max_bytes(&self.producer)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.spool.ack_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut cfg = Config::from_defaults().expect("defaults");
        cfg.registry.password = Secret::new("registry-password");
        cfg.auth.apps.insert(
            "app".into(),
            AppConfig {
                keys: vec![Secret::new("0123456789abcdef")],
            },
        );
        cfg.keys.kek = Secret::new(feedloop_core::crypto::KeyRing::generate_entry("k1"));
        cfg
    }

    #[test]
    fn every_record_must_fit_what_the_producer_sends() {
        let mut cfg = valid();
        cfg.validate()
            .expect("the defaults fit librdkafka's 1,000,000 bytes");
        cfg.http.max_event_bytes = 990_000;
        let err = cfg.validate().expect_err("too close to message.max.bytes");
        assert!(err.to_string().contains("message.max.bytes"), "{err}");
        cfg.producer
            .insert("message.max.bytes".into(), "4000000".into());
        cfg.validate()
            .expect("a larger message.max.bytes makes room");
        cfg.producer
            .insert("message.max.bytes".into(), "60000".into());
        cfg.http.max_event_bytes = 1000;
        let err = cfg
            .validate()
            .expect_err("a dead letter keeps 64 KiB of its input");
        assert!(err.to_string().contains("message.max.bytes"), "{err}");
        cfg.producer.remove("message.max.bytes");
        cfg.kafka
            .properties
            .insert("message.max.bytes".into(), "lots".into());
        let err = cfg.validate().expect_err("not a number");
        assert!(err.to_string().contains("kafka.properties"), "{err}");
    }
}
