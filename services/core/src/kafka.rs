//! Kafka adapter basics: client configuration, readiness, and topic provisioning.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    ClientConfig, ClientContext,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::{KafkaError, RDKafkaErrorCode},
    producer::FutureProducer,
};
use serde::Deserialize;

use crate::{
    catalogue::TopicSpec,
    config::{ConfigError, Secret},
};

/// How long a delivery report may take with `producer` properties: `message.timeout.ms`
/// (librdkafka's default, 5 minutes, when unset) and 15 s more. Awaiting a delivery for longer
/// means librdkafka lost track of it; the caller fails instead of waiting.
pub fn delivery_limit(producer: &BTreeMap<String, String>) -> Duration {
    let ms = producer
        .get("message.timeout.ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(300_000);
    Duration::from_millis(ms.saturating_add(15_000))
}

/// librdkafka's default `message.max.bytes`.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// `max.message.bytes` of the topics feedloop creates: Kafka's default, above the producers'
/// [`LIBRDKAFKA_MESSAGE_MAX_BYTES`], so that every record a producer sends fits its topic.
pub const TOPIC_MAX_MESSAGE_BYTES: &str = "1048588";

/// Where the brokers are and how to talk to them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated host:port list.
    pub bootstrap: String,
    /// Replication factor of topics feedloop creates (use 3 on a real cluster).
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// `[kafka.tls]`: TLS to the brokers.
    #[serde(default)]
    pub tls: KafkaTls,
    /// `[kafka.sasl]`: SASL authentication to the brokers.
    #[serde(default)]
    pub sasl: KafkaSasl,
    /// Extra librdkafka properties (tuning), passed through verbatim, after the settings above.
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

/// `[kafka.tls]`: TLS to the brokers (librdkafka's OpenSSL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTls {
    /// Speak TLS to the brokers.
    #[serde(default)]
    pub enabled: bool,
    /// PEM file of the CA that signed the brokers' certificates; empty: the system's roots.
    #[serde(default, deserialize_with = "crate::config::path")]
    pub ca: String,
    /// Client certificate and key (PEM) for brokers that authenticate clients by TLS (mTLS).
    #[serde(default, deserialize_with = "crate::config::path")]
    pub cert: String,
    #[serde(default, deserialize_with = "crate::config::path")]
    pub key: String,
    /// Check that a broker's certificate names the host connected to (leave on: off only
    /// for certificates issued to IP addresses that librdkafka cannot match).
    #[serde(default = "yes")]
    pub verify_hostname: bool,
}

const fn yes() -> bool {
    true
}

impl Default for KafkaTls {
    fn default() -> Self {
        Self {
            enabled: false,
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            verify_hostname: true,
        }
    }
}

/// `[kafka.sasl]`: SASL authentication. An empty mechanism: none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[serde(default)]
    pub mechanism: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: Secret,
}

/// SASL mechanisms librdkafka speaks without Kerberos.
const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

impl KafkaConfig {
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            replication_factor: default_replication(),
            tls: KafkaTls::default(),
            sasl: KafkaSasl::default(),
            properties: BTreeMap::new(),
            instance_id: None,
        }
    }

    /// `[kafka.tls]` and `[kafka.sasl]` make sense together; `section` names them in errors.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let tls = &self.tls;
        let files = [&tls.ca, &tls.cert, &tls.key];
        if !tls.enabled && files.iter().any(|f| !f.is_empty()) {
            return Err(ConfigError::invalid(
                &format!("{section}.tls.enabled"),
                "must be true when a CA, certificate or key is set",
            ));
        }
        if tls.cert.is_empty() != tls.key.is_empty() {
            return Err(ConfigError::invalid(
                &format!("{section}.tls.cert"),
                "a client certificate and its key go together",
            ));
        }
        let sasl = &self.sasl;
        if !sasl.mechanism.is_empty() {
            if !SASL_MECHANISMS.contains(&sasl.mechanism.as_str()) {
                return Err(ConfigError::invalid(
                    &format!("{section}.sasl.mechanism"),
                    format!("one of {}", SASL_MECHANISMS.join(", ")),
                ));
            }
            if sasl.user.is_empty() || sasl.password.is_empty() {
                return Err(ConfigError::invalid(
                    &format!("{section}.sasl.user"),
                    "a user and a password are required with a mechanism",
                ));
            }
        }
        Ok(())
    }

    /// A librdkafka configuration with the bootstrap servers, `client.id`, TLS and SASL, and
    /// the extra properties.
    /// The largest record a producer with `producer` properties sends: `message.max.bytes`
    /// from them or from `[kafka.properties]`, else librdkafka's default (1,000,000).
    pub fn message_max_bytes(
        &self,
        producer: &BTreeMap<String, String>,
    ) -> Result<usize, ConfigError> {
        let set = producer
            .get("message.max.bytes")
            .map(|v| ("producer.\"message.max.bytes\"", v))
            .or_else(|| {
                self.properties
                    .get("message.max.bytes")
                    .map(|v| ("kafka.properties.\"message.max.bytes\"", v))
            });
        match set {
            None => Ok(LIBRDKAFKA_MESSAGE_MAX_BYTES),
            Some((key, v)) => v
                .trim()
                .parse()
                .map_err(|_| ConfigError::invalid(key, "must be a number of bytes")),
        }
    }

    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap)
            .set("client.id", client_id);
        let sasl = !self.sasl.mechanism.is_empty();
        let protocol = match (self.tls.enabled, sasl) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        cfg.set("security.protocol", protocol);
        if self.tls.enabled {
            let set = |cfg: &mut ClientConfig, key: &str, value: &str| {
                if !value.is_empty() {
                    cfg.set(key, value);
                }
            };
            set(&mut cfg, "ssl.ca.location", &self.tls.ca);
            set(&mut cfg, "ssl.certificate.location", &self.tls.cert);
            set(&mut cfg, "ssl.key.location", &self.tls.key);
            cfg.set(
                "ssl.endpoint.identification.algorithm",
                if self.tls.verify_hostname {
                    "https"
                } else {
                    "none"
                },
            );
        }
        if sasl {
            cfg.set("sasl.mechanism", &self.sasl.mechanism)
                .set("sasl.username", &self.sasl.user)
                .set("sasl.password", self.sasl.password.expose());
        }
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    /// The idempotent producer (`acks=all`) of client `client_id`: the service's `[producer]`
    /// `properties` tune it; idempotence and acknowledgement by every in-sync replica are fixed.
    pub fn producer(
        &self,
        client_id: &str,
        properties: &BTreeMap<String, String>,
    ) -> Result<FutureProducer, KafkaError> {
        let mut cfg = self.client_config(client_id);
        for (k, v) in properties {
            cfg.set(k, v);
        }
        cfg.set("enable.idempotence", "true").set("acks", "all");
        cfg.create()
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

/// The [`producer`](KafkaConfig::producer) of a service that sends records now and then and
/// retries what fails (the eraser, the trigger, dead letters): it replaces itself by the rule
/// of [`ProducerHealth`] and counts it in the service's `resets_metric`. Sends go through
/// [`get`](Self::get), their outcomes through [`observe`](Self::observe).
pub struct HealingProducer {
    kafka: KafkaConfig,
    client_id: &'static str,
    properties: BTreeMap<String, String>,
    resets_metric: &'static str,
    current: std::sync::RwLock<FutureProducer>,
    health: tokio::sync::Mutex<ProducerHealth>,
}

impl std::fmt::Debug for HealingProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealingProducer")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl HealingProducer {
    /// Two failed sends in a row while the broker answers replace the producer.
    const AFTER: u32 = 2;

    pub fn new(
        kafka: &KafkaConfig,
        client_id: &'static str,
        properties: &BTreeMap<String, String>,
        resets_metric: &'static str,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            current: std::sync::RwLock::new(kafka.producer(client_id, properties)?),
            kafka: kafka.clone(),
            client_id,
            properties: properties.clone(),
            resets_metric,
            health: tokio::sync::Mutex::new(ProducerHealth::new(Self::AFTER)),
        })
    }

    /// The producer to send with now.
    pub fn get(&self) -> FutureProducer {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Records how a send (or a batch of them) went, replacing the producer when the broker
    /// keeps failing it; passes the outcome on.
    pub async fn observe<T, E>(&self, outcome: Result<T, E>) -> Result<T, E> {
        self.record(outcome.is_ok()).await;
        outcome
    }

    /// Records whether a send went through (`false`: Kafka failed it).
    pub async fn record(&self, delivered: bool) {
        let mut health = self.health.lock().await;
        if delivered {
            health.delivered();
            return;
        }
        if !health.failed(&self.kafka, self.client_id).await {
            return;
        }
        match self.kafka.producer(self.client_id, &self.properties) {
            Ok(fresh) => {
                match self.current.write() {
                    Ok(mut p) => *p = fresh,
                    Err(poisoned) => *poisoned.into_inner() = fresh,
                }
                metrics::counter!(self.resets_metric).increment(1);
            }
            Err(e) => tracing::error!(error = %e, "Cannot create a new Kafka producer"),
        }
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

/// `max.compaction.lag.ms` (and `delete.retention.ms`) of the compacted topics feedloop
/// creates: one day.
pub const COMPACTION_MAX_LAG_MS: u64 = 86_400_000;
const COMPACTION_MAX_LAG: &str = "86400000";

/// Creates the topics of `topics` (name, partitions, compacted) that do not exist; a
/// compacted one gets `cleanup.policy=compact` with [`COMPACTION_MAX_LAG_MS`].
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
            // Explicit, not the broker's default: a cluster configured lower would refuse
            // records the producers send (their message.max.bytes is librdkafka's 1,000,000).
            let topic = topic.set("max.message.bytes", TOPIC_MAX_MESSAGE_BYTES);
            if *compacted {
                // Compaction within a bound: an erased key's earlier records are gone at most
                // this long after its tombstone, and the tombstone a day after that.
                topic
                    .set("cleanup.policy", "compact")
                    .set("max.compaction.lag.ms", COMPACTION_MAX_LAG)
                    .set("delete.retention.ms", COMPACTION_MAX_LAG)
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

/// A record read back by [`read_to_end`].
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl LogRecord {
    /// The first header named `key`.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("Kafka client error: {0}")]
    Client(#[from] KafkaError),
    #[error("topic {topic} not read to its end within {within:?}")]
    Timeout { topic: String, within: Duration },
}

/// Every record of `topic` from the beginning to the current end of each partition (its
/// end-of-partition event: the embedded broker's high watermarks are not reliable), with a
/// plain consumer outside any group. Blocking: call it from `spawn_blocking`. An absent topic
/// reads as empty.
pub fn read_to_end(
    kafka: &KafkaConfig,
    topic: &str,
    within: Duration,
) -> Result<Vec<LogRecord>, ReadError> {
    use rdkafka::{Message, Offset, TopicPartitionList, message::Headers};
    let consumer: BaseConsumer<QuietEof> = kafka
        .client_config("feedloop-read")
        .set("group.id", "feedloop-read")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create_with_context(QuietEof)?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut open = std::collections::HashSet::new();
    for t in md.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            open.insert(p.id());
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    let mut out = Vec::new();
    if open.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + within;
    // The next offset expected per partition: a record below it was delivered already (the
    // embedded broker serves a compacted log's records again after the gaps compaction left).
    let mut next: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    while !open.is_empty() {
        if std::time::Instant::now() >= deadline {
            return Err(ReadError::Timeout {
                topic: topic.to_owned(),
                within,
            });
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) if next.get(&m.partition()).is_some_and(|n| m.offset() < *n) => {}
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                out.push(LogRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(out)
}
