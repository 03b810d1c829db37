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

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use futures_util::StreamExt;
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
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
    resume::{Resume, STALL, Step},
};

/// Notes that the group's assignment changed: reading positions are looked up again.
#[derive(Debug, Default)]
struct Assignments {
    changed: std::sync::atomic::AtomicBool,
}

impl ClientContext for Assignments {
    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::QuietEof.error(error, reason);
    }
}

impl ConsumerContext for Assignments {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.changed
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

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

/// The counters an intake keeps, named for its service.
#[derive(Debug, Clone, Copy)]
pub struct IntakeMetrics {
    /// `feedloop_<service>_dead_letters_total`.
    pub dead_letters: &'static str,
    /// `feedloop_<service>_intake_retries_total`, by the failure's class.
    pub retries: &'static str,
    /// `feedloop_<service>_intake_gap_records_total`: records missing from the log.
    pub gap_records: &'static str,
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
    consumer: StreamConsumer<Assignments>,
    topic: String,
    service: &'static str,
    registry: Arc<RegistryClient>,
    producer: Arc<HealingProducer>,
    deadletter: Arc<CompiledSchema>,
    /// The service's counters of dead-lettered records, of failed attempts, and of records
    /// missing from the log.
    metrics: Option<IntakeMetrics>,
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
        topic: &str,
        service: &'static str,
        registry: Arc<RegistryClient>,
        producer: Arc<HealingProducer>,
        deadletter: Arc<CompiledSchema>,
    ) -> Result<Self, KafkaError> {
        // With the replica's instance id (static membership), a replica killed and started
        // again takes its partitions back at once; without one, after the session timeout.
        let mut cfg = kafka.group_config(group);
        let consumer: StreamConsumer<Assignments> = cfg
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .create_with_context(Assignments::default())?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            service,
            registry,
            producer,
            deadletter,
            metrics: None,
            retries: Retries::default(),
        })
    }

    /// Counts in the service's metrics.
    pub fn counting(mut self, metrics: IntakeMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Where a record stands in its partition's read: a record after the offset needed means
    /// records were skipped ([`Resume`]). The position starts at the group's committed offset.
    fn step(&self, resume: &mut HashMap<i32, Resume>, partition: i32, offset: i64) -> Step {
        if self
            .consumer
            .context()
            .changed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            resume.clear();
        }
        resume
            .entry(partition)
            .or_insert_with(|| Resume::at(self.committed(partition).unwrap_or(offset)))
            .step(offset)
    }

    /// The end of `partition` was reached: `Some(offset)` to read again from, when it came
    /// before any record since the read started at the committed offset ([`Resume::ended`]).
    fn ended(&self, resume: &mut HashMap<i32, Resume>, partition: i32) -> Option<i64> {
        if self
            .consumer
            .context()
            .changed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            resume.clear();
        }
        let r = match resume.entry(partition) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Resume::at(self.committed(partition)?))
            }
        };
        match r.ended() {
            Some(Step::Rewind(to)) => Some(to),
            _ => None,
        }
    }

    /// Reads again from further back the assigned partitions whose read got nothing for
    /// [`STALL`] (see [`Resume::stalled`]).
    fn unstall(&self, resume: &mut HashMap<i32, Resume>) {
        if self
            .consumer
            .context()
            .changed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            resume.clear();
        }
        let Ok(assigned) = self.consumer.assignment() else {
            return;
        };
        for elem in assigned.elements_for_topic(&self.topic) {
            let partition = elem.partition();
            if !resume.contains_key(&partition)
                && let Some(committed) = self.committed(partition)
            {
                resume.insert(partition, Resume::at(committed));
            }
            let to = match resume.get_mut(&partition).and_then(|r| r.stalled(STALL)) {
                Some(Step::Rewind(to)) => to,
                _ => continue,
            };
            tracing::debug!(
                topic = %self.topic,
                partition,
                rewind_to = to,
                "A read got nothing; reading again from further back"
            );
            self.seek(resume, partition, to);
        }
    }

    fn seek(&self, resume: &mut HashMap<i32, Resume>, partition: i32, to: i64) {
        if let Err(e) = self.consumer.seek(
            &self.topic,
            partition,
            Offset::Offset(to),
            Duration::from_secs(10),
        ) {
            tracing::warn!(topic = %self.topic, error = %e, "Cannot seek back; reading the partition again from the committed offset");
            resume.remove(&partition);
        }
    }

    /// The group's committed offset of `partition`, if any.
    fn committed(&self, partition: i32) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .ok()?;
        match committed.find_partition(&self.topic, partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
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
        let mut resume: HashMap<i32, Resume> = HashMap::new();
        let mut check = tokio::time::Instant::now() + STALL;
        loop {
            if tokio::time::Instant::now() >= check {
                check = tokio::time::Instant::now() + STALL / 2;
                self.unstall(&mut resume);
            }
            let msg = tokio::select! {
                () = shutdown.cancelled() => return,
                m = stream.next() => m,
                () = tokio::time::sleep_until(check) => continue,
            };
            let Some(msg) = msg else { return };
            let msg = match msg {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(partition)) => {
                    if let Some(to) = self.ended(&mut resume, partition) {
                        self.seek(&mut resume, partition, to);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "Intake: Kafka error");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match self.step(&mut resume, msg.partition(), msg.offset()) {
                Step::Take => {}
                Step::Skip => continue,
                Step::Rewind(to) => {
                    tracing::debug!(
                        topic = %self.topic,
                        partition = msg.partition(),
                        got = msg.offset(),
                        rewind_to = to,
                        "A read skipped records; reading again from further back"
                    );
                    self.seek(&mut resume, msg.partition(), to);
                    continue;
                }
                Step::Gap { expected, got } => {
                    tracing::error!(
                        topic = %self.topic,
                        partition = msg.partition(),
                        expected,
                        got,
                        "Records are missing from the log (retention, a truncated log)"
                    );
                    if let Some(m) = self.metrics {
                        metrics::counter!(m.gap_records)
                            .increment(u64::try_from(got - expected).unwrap_or(0));
                    }
                }
                Step::Reset { expected, got } => {
                    tracing::error!(
                        topic = %self.topic,
                        partition = msg.partition(),
                        expected,
                        got,
                        "The partition went back behind the committed offset: the broker lost its log"
                    );
                }
            }
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
                        tracing::warn!(topic = %self.topic, error = %e, "Cannot dead-letter a record yet; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                }
            }
            if let Err(e) = self.consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(topic = %self.topic, error = %e, "Cannot commit the intake offset; the record may be read again (handlers are idempotent)");
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
            if let Some(IntakeMetrics {
                retries: metric, ..
            }) = self.metrics
            {
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
            tracing::warn!(topic = %self.topic, error = %failure.message, attempts, "Cannot take a record in yet; retrying");
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
            topic = %self.topic,
            partition,
            offset,
            detail,
            "Record sent to the dead-letter topic"
        );
        let dl = DeadLetter {
            source_topic: Some(self.topic.clone()),
            source_partition: Some(partition),
            source_offset: Some(offset),
            ..DeadLetter::new(self.service, reason, detail, original, now_ms())
        };
        let mut value = Vec::new();
        self.deadletter
            .encode(&dl, &mut value)
            .map_err(|e| e.to_string())?;
        let key = format!("{}/{partition}", self.topic);
        if let Some(m) = self.metrics {
            metrics::counter!(m.dead_letters).increment(1);
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
