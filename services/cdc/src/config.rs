//! cdc configuration (defaults in `default.toml`).

use std::{collections::BTreeMap, path::Path, time::Duration};

use feedloop_core::{
    config::{self, ConfigError, Secret},
    kafka::KafkaConfig,
};
use serde::Deserialize;

pub use feedloop_core::{
    config::{ControlConfig, LogConfig, RegistryConfig},
    crypto::KeysConfig,
};

pub const DEFAULTS: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub topics: TopicsConfig,
    pub outbox: OutboxConfig,
    pub users: UsersConfig,
    pub schema_changes: SchemaChangesConfig,
    pub toast: ToastConfig,
    pub pii: PiiConfig,
    pub keys: KeysConfig,
    pub kafka: KafkaConfig,
    pub producer: BTreeMap<String, String>,
    pub registry: RegistryConfig,
    pub control: ControlConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

/// When to read existing rows before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    Initial,
    WhenNeeded,
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub url: Secret,
    pub slot: String,
    pub publication: String,
    pub tables: Vec<String>,
    pub snapshot: SnapshotMode,
    pub snapshot_chunk_rows: u32,
    pub status_interval_ms: u64,
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    pub prefix: String,
    pub partitions: i32,
    pub compacted: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    pub table: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersConfig {
    pub table: String,
    pub id_column: String,
    pub deleted_at_column: String,
    /// Where the erasure requests it raises go.
    pub erasure_requests_topic: String,
}

/// What to do with a table whose new shape its readers cannot follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncompatiblePolicy {
    DeadLetter,
    Force,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaChangesConfig {
    pub incompatible: IncompatiblePolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToastConfig {
    pub placeholder: String,
}

/// `[pii]`: personal columns, sealed with their owner's data key (crypto-shredding).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiConfig {
    /// By `schema.table`.
    pub tables: BTreeMap<String, PiiTable>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiTable {
    /// The column holding the id of the user the row's personal data belongs to.
    pub user_column: String,
    /// Text columns to seal.
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// `[http.tls]`: HTTPS, when a certificate is set.
    pub tls: feedloop_core::tls::ServerTls,
}

/// A `schema.table` name split in two.
pub fn split_table(name: &str) -> Option<(&str, &str)> {
    name.split_once('.')
        .filter(|(s, t)| !s.is_empty() && !t.is_empty() && !t.contains('.'))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
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
        for (key, value) in [
            ("source.slot", &self.source.slot),
            ("source.publication", &self.source.publication),
        ] {
            if !is_identifier(value) {
                return Err(ConfigError::invalid(key, "letters, digits and _ only"));
            }
        }
        if self.source.tables.is_empty() {
            return Err(ConfigError::invalid("source.tables", "at least one table"));
        }
        self.keys.validate()?;
        for (table, pii) in &self.pii.tables {
            let key = format!("pii.tables.{table}");
            if split_table(table).is_none() {
                return Err(ConfigError::invalid(&key, "not schema.table"));
            }
            if pii.user_column.is_empty() || pii.columns.is_empty() {
                return Err(ConfigError::invalid(
                    &key,
                    "needs user_column and at least one column",
                ));
            }
            if pii.columns.contains(&pii.user_column) {
                return Err(ConfigError::invalid(
                    &key,
                    "the owner column cannot be sealed (rows would lose their owner)",
                ));
            }
        }
        for t in &self.source.tables {
            match split_table(t) {
                Some((s, n)) if is_identifier(s) && is_identifier(n) => {}
                _ => {
                    return Err(ConfigError::invalid(
                        "source.tables",
                        format!("{t:?} is not schema.table"),
                    ));
                }
            }
        }
        for (key, table) in [
            ("outbox.table", &self.outbox.table),
            ("users.table", &self.users.table),
        ] {
            if !table.is_empty() && !self.source.tables.contains(table) {
                return Err(ConfigError::invalid(
                    key,
                    format!("{table} is not in source.tables"),
                ));
            }
        }
        if self.source.snapshot_chunk_rows == 0 {
            return Err(ConfigError::invalid(
                "source.snapshot_chunk_rows",
                "must be positive",
            ));
        }
        if self.topics.prefix.is_empty() {
            return Err(ConfigError::invalid("topics.prefix", "must not be empty"));
        }
        if self.topics.partitions < 1 {
            return Err(ConfigError::invalid(
                "topics.partitions",
                "must be positive",
            ));
        }
        self.registry.validate()?;
        Ok(())
    }

    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.source.status_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_once_a_password_and_a_key_ring_are_set() {
        let mut cfg = Config::from_defaults().expect("parses");
        assert!(cfg.validate().is_err(), "registry password missing");
        cfg.registry.password = Secret::new("pw");
        let err = cfg.validate().expect_err("no key ring").to_string();
        assert!(err.contains("keys.kek"), "{err}");
        cfg.keys.kek = Secret::new(feedloop_core::crypto::KeyRing::generate_entry("k1"));
        cfg.validate().expect("valid");
        cfg.source.tables.push("nodot".into());
        assert!(
            cfg.validate()
                .expect_err("bad table")
                .to_string()
                .contains("source.tables")
        );
    }
}
