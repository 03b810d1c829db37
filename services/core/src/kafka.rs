//! Kafka adapter basics: client configuration, readiness, and topic provisioning.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    ClientConfig, ClientContext,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::{KafkaError, RDKafkaErrorCode},
};
use serde::Deserialize;

use crate::catalogue::TopicSpec;

/// Where the brokers are and how to talk to them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated host:port list.
    pub bootstrap: String,
    /// Replication factor of topics feedloop creates (use 3 on a real cluster).
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Extra librdkafka properties (tuning), passed through verbatim. feedloop builds
    /// librdkafka without TLS and SASL (docs/reliability.md).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// This replica's stable name (its pod name, say): consumer groups then know it across
    /// restarts (static membership, `group.instance.id`), so a replica killed and started
    /// again takes its partitions back at once instead of after a session timeout and a
    /// rebalance. Unique per replica of a service; unset, membership is dynamic.
    #[serde(default)]
    pub instance_id: Option<String>,
}

const fn default_replication() -> i32 {
    1
}

impl KafkaConfig {
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            replication_factor: default_replication(),
            properties: BTreeMap::new(),
            instance_id: None,
        }
    }

    /// A librdkafka configuration with the bootstrap servers, `client.id` and the extra
    /// properties.
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap)
            .set("client.id", client_id);
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    /// [`client_config`](Self::client_config) for a member of consumer group `group`, with
    /// its static membership when the replica has an [`instance_id`](Self::instance_id).
    pub fn group_config(&self, group: &str) -> ClientConfig {
        let mut cfg = self.client_config(group);
        cfg.set("group.id", group);
        if let Some(instance) = self.instance_id.as_deref().filter(|i| !i.is_empty()) {
            cfg.set("group.instance.id", format!("{group}-{instance}"));
        }
        cfg
    }
}

/// Decides when an idempotent producer must be replaced: after `after` failed deliveries in a
/// row while the broker answers. That is a broker that lost its state (a restart without
/// durable storage): it no longer knows the producer's id, and the old producer would time out
/// forever. Replacing it is safe wherever the caller re-sends only what the log lacks (the
/// collector's read-back, cdc's slot, the labeler's last commit).
#[derive(Debug)]
pub struct ProducerHealth {
    failures: u32,
    after: u32,
}

impl ProducerHealth {
    pub fn new(after: u32) -> Self {
        Self { failures: 0, after }
    }

    /// A delivery went through.
    pub fn delivered(&mut self) {
        self.failures = 0;
    }

    /// A delivery failed; true when the producer should be replaced now (and the count
    /// starts again). A broker that does not answer at all is down, not forgetful: no.
    pub async fn failed(&mut self, kafka: &KafkaConfig, service: &str) -> bool {
        self.failures += 1;
        if self.failures < self.after || wait_ready(kafka, Duration::from_secs(2)).await.is_err() {
            return false;
        }
        self.failures = 0;
        tracing::error!(
            service,
            "Replacing the Kafka producer: the broker answers but no longer takes its records \
             (it lost their idempotence state, as a broker restarted without durable storage does)"
        );
        true
    }
}

/// Why a Kafka operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaAdminError {
    #[error("Kafka client error: {0}")]
    Client(#[from] KafkaError),
    #[error("creating topic {topic} failed: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("Kafka at {bootstrap} not reachable within {timeout:?}: {source}")]
    NotReady {
        bootstrap: String,
        timeout: Duration,
        source: KafkaError,
    },
    #[error("Kafka metadata call panicked or was cancelled")]
    Join,
}

/// Waits until the cluster answers a metadata request.
pub async fn wait_ready(config: &KafkaConfig, timeout: Duration) -> Result<(), KafkaAdminError> {
    let consumer: BaseConsumer = config.client_config("feedloop-ready").create()?;
    let bootstrap = config.bootstrap.clone();
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, timeout)
            .map(|_| ())
            .map_err(|source| KafkaAdminError::NotReady {
                bootstrap,
                timeout,
                source,
            })
    })
    .await
    .map_err(|_| KafkaAdminError::Join)?
}

/// Creates the catalogue topics that do not exist yet; existing ones are left as they are.
pub async fn ensure_topics(
    config: &KafkaConfig,
    topics: &[TopicSpec],
) -> Result<(), KafkaAdminError> {
    let specs: Vec<(&str, i32, bool)> = topics
        .iter()
        .map(|t| (t.name, t.partitions, t.compacted))
        .collect();
    create_missing(config, &specs).await
}

/// Creates topics given as (name, partitions, compacted) unless they exist.
pub async fn create_missing(
    config: &KafkaConfig,
    topics: &[(&str, i32, bool)],
) -> Result<(), KafkaAdminError> {
    let admin: AdminClient<DefaultClientContext> =
        config.client_config("feedloop-admin").create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions, compacted)| {
            let topic = NewTopic::new(
                name,
                *partitions,
                TopicReplication::Fixed(config.replication_factor),
            );
            if *compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaAdminError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// A consumer context for readers that ask for end-of-partition events
/// (`enable.partition.eof`): reaching the end is what they wait for, not an error to log.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::warn!(error = %error, reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for QuietEof {}
