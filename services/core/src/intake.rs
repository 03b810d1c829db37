//! Consuming a catalogue topic into a service's state: each record decoded with the registry
//! and handed over once it decodes; records that do not decode, or that the handler calls
//! poison, go to `feedloop.deadletter`; the offset is committed only after the record was
//! handled (at least once: handlers are idempotent). Errors the handler calls transient are
//! retried, so that a database outage pauses the intake instead of skipping records.

use std::{future::Future, sync::Arc, time::Duration};

use futures_util::StreamExt;
use rdkafka::{
    Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::KafkaError,
    producer::FutureRecord,
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{
    avro::CompiledSchema,
    catalogue::DEADLETTER_TOPIC,
    kafka::{HealingProducer, KafkaConfig},
    model::{DeadLetter, DeadLetterReason},
    registry_client::{RegistryClient, RegistryClientError},
};

/// What a handler made of a record.
#[derive(Debug)]
pub enum Handled {
    Done,
    /// It can never be handled: it goes to the dead-letter topic with this reason.
    Poison(String),
}

pub struct Intake {
    consumer: StreamConsumer,
    topic: &'static str,
    service: &'static str,
    registry: Arc<RegistryClient>,
    producer: Arc<HealingProducer>,
    deadletter: Arc<CompiledSchema>,
    /// The service's counter of dead-lettered records.
    dead_letters_metric: Option<&'static str>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Intake {
    /// Subscribes consumer group `group` to `topic` (from the earliest offset when the group
    /// is new).
    pub fn new(
        kafka: &KafkaConfig,
        group: &str,
        topic: &'static str,
        service: &'static str,
        registry: Arc<RegistryClient>,
        producer: Arc<HealingProducer>,
        deadletter: Arc<CompiledSchema>,
    ) -> Result<Self, KafkaError> {
        // With the replica's instance id (static membership), a replica killed and started
        // again takes its partitions back at once; without one, after the session timeout.
        let mut cfg = kafka.group_config(group);
        let consumer: StreamConsumer = cfg
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            consumer,
            topic,
            service,
            registry,
            producer,
            deadletter,
            dead_letters_metric: None,
        })
    }

    /// Counts dead-lettered records in the counter `metric` (the service's
    /// `feedloop_<service>_dead_letters_total`).
    pub fn counting_dead_letters(mut self, metric: &'static str) -> Self {
        self.dead_letters_metric = Some(metric);
        self
    }

    /// Hands every record to `handle` until `shutdown`. `Err` from the handler is transient:
    /// the same record is handed again after a pause.
    pub async fn run<T, F, Fut>(self, shutdown: CancellationToken, handle: F)
    where
        T: DeserializeOwned,
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<Handled, String>>,
    {
        let mut stream = self.consumer.stream();
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return,
                m = stream.next() => m,
            };
            let Some(msg) = msg else { return };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(topic = self.topic, error = %e, "Intake: Kafka error");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // Tombstones carry nothing to take in.
            if let Some(payload) = msg.payload() {
                loop {
                    let outcome = match self.registry.decode::<T>(payload).await {
                        Ok(record) => handle(record).await,
                        Err(RegistryClientError::Codec(e)) => Ok(Handled::Poison(e.to_string())),
                        // Written with a schema this registry never had: it cannot ever decode.
                        Err(RegistryClientError::Api {
                            status: 404,
                            message,
                            ..
                        }) => Ok(Handled::Poison(format!(
                            "schema unknown to this registry: {message}"
                        ))),
                        Err(e) => Err(e.to_string()),
                    };
                    let outcome = match outcome {
                        Ok(Handled::Poison(reason)) => self
                            .dead_letter(&reason, payload, msg.partition(), msg.offset())
                            .await
                            .map(|()| Handled::Done),
                        other => other,
                    };
                    match outcome {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(topic = self.topic, error = %e, "Cannot take a record in yet; retrying");
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            }
            if let Err(e) = self.consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(topic = self.topic, error = %e, "Cannot commit the intake offset; the record may be read again (handlers are idempotent)");
            }
        }
    }

    async fn dead_letter(
        &self,
        detail: &str,
        original: &[u8],
        partition: i32,
        offset: i64,
    ) -> Result<(), String> {
        tracing::warn!(
            topic = self.topic,
            partition,
            offset,
            detail,
            "Record sent to the dead-letter topic"
        );
        let dl = DeadLetter {
            source_topic: Some(self.topic.into()),
            source_partition: Some(partition),
            source_offset: Some(offset),
            ..DeadLetter::new(
                self.service,
                DeadLetterReason::DecodeFailure,
                detail,
                original,
                now_ms(),
            )
        };
        let mut value = Vec::new();
        self.deadletter
            .encode(&dl, &mut value)
            .map_err(|e| e.to_string())?;
        let key = format!("{}/{partition}", self.topic);
        if let Some(metric) = self.dead_letters_metric {
            metrics::counter!(metric).increment(1);
        }
        let sent = self
            .producer
            .get()
            .send(
                FutureRecord::to(DEADLETTER_TOPIC).key(&key).payload(&value),
                Duration::from_secs(30),
            )
            .await;
        self.producer
            .observe(sent)
            .await
            .map_err(|(e, _)| e.to_string())?;
        Ok(())
    }
}
