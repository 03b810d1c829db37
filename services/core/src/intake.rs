//! Consuming a catalogue topic into a service's state: each record decoded with the registry
//! and handed over once it decodes; records that do not decode, or that the handler calls
//! poison, go to `feedloop.deadletter`; the offset is committed only after the record was
//! handled (at least once: handlers are idempotent).
//!
//! A handler's failure is classified ([`Classify`]): input the dependency refuses goes to the
//! dead-letter topic at once; any other failure is retried with backoff, a bounded number of
//! times ([`Retries`]): a dependency that is down pauses the intake for up to
//! [`Retries::max_wait`], anything else for [`Retries::attempts`] attempts. Then the record goes
//! to the dead-letter topic with its topic, partition, offset and the last error, and the
//! intake moves on: no record holds it up for longer.

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
    error::{Classify, ErrorClass},
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

/// Why a handler could not take a record in.
#[derive(Debug)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
}

impl Failure {
    pub fn of(e: &(impl Classify + std::fmt::Display)) -> Self {
        Self {
            class: e.class(),
            message: e.to_string(),
        }
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Self::of(&e)
    }
}

/// How long a record may fail before it is dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Attempts of a record that fails while its dependency answers.
    pub attempts: u32,
    /// How long a record waits for a dependency that is down.
    pub max_wait: Duration,
    /// The first pause; each next one doubles, up to 30 s.
    pub first_pause: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: 5,
            max_wait: Duration::from_secs(15 * 60),
            first_pause: Duration::from_secs(1),
        }
    }
}

pub struct Intake {
    consumer: StreamConsumer,
    topic: &'static str,
    service: &'static str,
    registry: Arc<RegistryClient>,
    producer: Arc<HealingProducer>,
    deadletter: Arc<CompiledSchema>,
    /// The service's counters of dead-lettered records and of failed attempts.
    metrics: Option<(&'static str, &'static str)>,
    retries: Retries,
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
            metrics: None,
            retries: Retries::default(),
        })
    }

    /// Counts dead-lettered records in the counter `dead_letters` (the service's
    /// `feedloop_<service>_dead_letters_total`), and failed attempts to take a record in, by
    /// the failure's class, in `retries` (`feedloop_<service>_intake_retries_total`).
    pub fn counting(mut self, dead_letters: &'static str, retries: &'static str) -> Self {
        self.metrics = Some((dead_letters, retries));
        self
    }

    /// Retries failing records by `retries` instead of the default.
    pub fn with_retries(mut self, retries: Retries) -> Self {
        self.retries = retries;
        self
    }

    /// Hands every record to `handle` until `shutdown`. A failure is retried as its class and
    /// [`Retries`] say, then the record is dead-lettered with the error.
    pub async fn run<T, F, Fut>(self, shutdown: CancellationToken, handle: F)
    where
        T: DeserializeOwned,
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<Handled, Failure>>,
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
                let verdict = tokio::select! {
                    () = shutdown.cancelled() => return,
                    v = self.take(payload, &handle) => v,
                };
                if let Some((reason, detail)) = verdict {
                    // Dead-lettering waits for the broker: the offset is not committed before
                    // the record is somewhere.
                    let mut pause = self.retries.first_pause;
                    while let Err(e) = self
                        .dead_letter(reason, &detail, payload, msg.partition(), msg.offset())
                        .await
                    {
                        tracing::warn!(topic = self.topic, error = %e, "Cannot dead-letter a record yet; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                }
            }
            if let Err(e) = self.consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(topic = self.topic, error = %e, "Cannot commit the intake offset; the record may be read again (handlers are idempotent)");
            }
        }
    }

    /// Decodes and hands over one record, retrying as [`Retries`] says; `Some(why)` when it
    /// goes to the dead-letter topic.
    async fn take<T, F, Fut>(
        &self,
        payload: &[u8],
        handle: &F,
    ) -> Option<(DeadLetterReason, String)>
    where
        T: DeserializeOwned,
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<Handled, Failure>>,
    {
        let started = tokio::time::Instant::now();
        let mut attempts = 0u32;
        let mut pause = self.retries.first_pause;
        loop {
            let outcome = match self.registry.decode::<T>(payload).await {
                Ok(record) => handle(record).await,
                Err(RegistryClientError::Codec(e)) => {
                    return Some((DeadLetterReason::DecodeFailure, e.to_string()));
                }
                // Written with a schema this registry never had: it cannot ever decode.
                Err(RegistryClientError::Api {
                    status: 404,
                    message,
                    ..
                }) => {
                    return Some((
                        DeadLetterReason::DecodeFailure,
                        format!("schema unknown to this registry: {message}"),
                    ));
                }
                Err(e) => Err(Failure {
                    class: ErrorClass::Unavailable,
                    message: e.to_string(),
                }),
            };
            let failure = match outcome {
                Ok(Handled::Done) => return None,
                Ok(Handled::Poison(why)) => {
                    return Some((DeadLetterReason::ProcessingFailure, why));
                }
                Err(f) => f,
            };
            attempts += 1;
            if let Some((_, metric)) = self.metrics {
                let class = match failure.class {
                    ErrorClass::BadInput => "bad_input",
                    ErrorClass::Unavailable => "unavailable",
                    ErrorClass::Internal => "internal",
                };
                metrics::counter!(metric, "class" => class).increment(1);
            }
            let gave_up = match failure.class {
                ErrorClass::BadInput => Some("refused"),
                ErrorClass::Unavailable if started.elapsed() + pause > self.retries.max_wait => {
                    Some("still failing after waiting for its dependency")
                }
                ErrorClass::Internal if attempts >= self.retries.attempts => {
                    Some("still failing after every retry")
                }
                _ => None,
            };
            if let Some(why) = gave_up {
                return Some((
                    DeadLetterReason::ProcessingFailure,
                    format!(
                        "{why} ({attempts} attempts in {} s): {}",
                        started.elapsed().as_secs(),
                        failure.message
                    ),
                ));
            }
            tracing::warn!(topic = self.topic, error = %failure.message, attempts, "Cannot take a record in yet; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }

    async fn dead_letter(
        &self,
        reason: DeadLetterReason,
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
            ..DeadLetter::new(self.service, reason, detail, original, now_ms())
        };
        let mut value = Vec::new();
        self.deadletter
            .encode(&dl, &mut value)
            .map_err(|e| e.to_string())?;
        let key = format!("{}/{partition}", self.topic);
        if let Some((metric, _)) = self.metrics {
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
