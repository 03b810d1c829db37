//! Making accepted records durable before the client hears 2xx: acknowledged by the broker
//! (idempotent producer, acks=all), or, when the broker does not answer in time, written to the
//! local spool. While the spool holds anything, new records go to the spool too, so that per-key
//! order is kept; a drain task empties it, in order, once the broker is back.
//!
//! No record is published twice: before draining, the task waits until every earlier attempt
//! the producer still had in flight has resolved, then reads back the log since the oldest
//! spooled record and skips the ids it finds there.
//!
//! A record the broker refuses for what it is (too large, invalid: [`ErrorClass::BadInput`])
//! is never retried and never sends the collector to the spool: a small dead letter about it
//! (its first 64 KiB, size and digest) is published instead, and if even that is refused the
//! record is counted as dropped (`feedloop_collector_dropped_records_total`, alerted on).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use feedloop_core::{
    avro::CompiledSchema,
    catalogue::{self, DEADLETTER_TOPIC},
    error::{Classify, ErrorClass},
    kafka::{KafkaConfig, ProducerHealth},
    model::{DeadLetter, DeadLetterReason},
};
use rdkafka::{
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::{
    config::SinkKind,
    dedup::Dedup,
    observability,
    scan::{self, EVENT_ID_HEADER, EVENT_TYPE_HEADER},
    spool::{Record, Spool, SpoolError},
};

/// Records read from the spool per drain step.
const DRAIN_BATCH: usize = 500;
/// Read-back starts this long before the oldest record it must cover (clock differences
/// between the collector and the broker's timestamps).
const SCAN_MARGIN_MS: i64 = 60_000;
/// A spool that has not drained a record for this long while the broker answers is stuck:
/// `/readyz` fails.
pub const DRAIN_STALL_MS: i64 = 60_000;

/// How a write was made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Acked,
    Spooled,
    /// The null sink threw the records away (`[sink] kind = "null"`).
    Discarded,
}

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("the broker is unreachable and the spool is full")]
    SpoolFull,
    #[error("the spool failed: {0}")]
    Spool(SpoolError),
    #[error("Kafka producer: {0}")]
    Producer(#[from] KafkaError),
    #[error("the write task failed: {0}")]
    Crashed(String),
}

/// The spool's event type of a dead letter about a refused record.
const REFUSAL_TYPE: &str = "refusal";

/// The collector's Kafka client id.
pub const CLIENT_ID: &str = "feedloop-collector";

pub struct Durable {
    /// Replaced when the broker stops taking its records (see [`Durable::drain`]).
    producer: std::sync::RwLock<FutureProducer>,
    /// The producer's tuning, to make a new one.
    properties: std::collections::BTreeMap<String, String>,
    spool: Spool,
    dedup: Arc<Dedup>,
    kafka: KafkaConfig,
    ack_timeout: Duration,
    /// Records go to the spool (the broker failed us, or the spool is not drained yet).
    spooling: AtomicBool,
    /// Serializes spool appends with the drain's switch back to direct mode.
    switch: Mutex<()>,
    /// Producer attempts of spooled records that have not resolved yet.
    unresolved: Arc<AtomicUsize>,
    wake: Notify,
    /// Set once the idempotency window has been rebuilt from the log.
    rebuilt: AtomicBool,
    /// The null sink: records are dropped instead of published.
    discard: bool,
    /// Encodes dead letters about records the broker refuses.
    deadletter: Arc<CompiledSchema>,
    /// When the drain last made progress (or the collector last left spool mode), epoch ms.
    progress_at: AtomicI64,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("spooling", &self.is_spooling())
            .field("unresolved", &self.unresolved.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn headers(r: &Record) -> OwnedHeaders {
    let id = uuid::Uuid::from_u128(r.id).to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: EVENT_ID_HEADER,
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: EVENT_TYPE_HEADER,
            value: Some(r.event_type.as_ref()),
        })
}

fn enqueue(producer: &FutureProducer, r: &Record) -> Result<DeliveryFuture, KafkaError> {
    let record = FutureRecord::to(&r.topic)
        .key(&r.key)
        .payload(&r.value)
        .headers(headers(r));
    producer.send_result(record).map_err(|(e, _)| e)
}

impl Durable {
    /// Starts in spool mode: direct publishing begins once the drain task has rebuilt the
    /// idempotency window from the log and emptied whatever a previous run left spooled.
    /// With `sink` [`SinkKind::Null`], every write is discarded and nothing needs draining.
    pub fn new(
        kafka: KafkaConfig,
        properties: std::collections::BTreeMap<String, String>,
        spool: Spool,
        dedup: Arc<Dedup>,
        ack_timeout: Duration,
        sink: SinkKind,
        deadletter: Arc<CompiledSchema>,
    ) -> Result<Self, KafkaError> {
        let discard = sink == SinkKind::Null;
        Ok(Self {
            producer: std::sync::RwLock::new(kafka.producer(CLIENT_ID, &properties)?),
            properties,
            spool,
            dedup,
            kafka,
            ack_timeout,
            spooling: AtomicBool::new(!discard),
            switch: Mutex::new(()),
            unresolved: Arc::new(AtomicUsize::new(0)),
            wake: Notify::new(),
            rebuilt: AtomicBool::new(discard),
            discard,
            deadletter,
            progress_at: AtomicI64::new(now_ms()),
        })
    }

    /// The current producer (a cheap handle).
    fn producer(&self) -> FutureProducer {
        match self.producer.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the producer with a new one (a new producer id, sequence numbers from zero).
    fn reset_producer(&self) {
        match self.kafka.producer(CLIENT_ID, &self.properties) {
            Ok(p) => {
                match self.producer.write() {
                    Ok(mut current) => *current = p,
                    Err(poisoned) => *poisoned.into_inner() = p,
                }
                observability::producer_reset();
            }
            Err(e) => tracing::error!(error = %e, "Cannot create a new Kafka producer"),
        }
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn is_spooling(&self) -> bool {
        self.spooling.load(Ordering::Acquire)
    }

    pub fn is_rebuilt(&self) -> bool {
        self.rebuilt.load(Ordering::Acquire)
    }

    /// Makes `records` durable.
    pub async fn write(&self, records: Vec<Record>) -> Result<Durability, DurableError> {
        if self.discard {
            observability::discarded(records.len());
            return Ok(Durability::Discarded);
        }
        if records.is_empty() {
            // Nothing to store; say which way it would have gone.
            return Ok(if self.is_spooling() {
                Durability::Spooled
            } else {
                Durability::Acked
            });
        }
        if self.is_spooling() {
            let guard = self.switch.lock().await;
            if self.is_spooling() {
                let r = self.append(records).await;
                drop(guard);
                return r.map(|()| Durability::Spooled);
            }
        }
        self.publish(records).await
    }

    async fn append(&self, records: Vec<Record>) -> Result<(), DurableError> {
        let n = records.len();
        match self.spool.append(records).await {
            Ok(()) => {
                observability::spooled(n);
                self.report();
                self.wake.notify_one();
                Ok(())
            }
            Err(SpoolError::Full { .. }) => Err(DurableError::SpoolFull),
            Err(e) => Err(DurableError::Spool(e)),
        }
    }

    async fn publish(&self, records: Vec<Record>) -> Result<Durability, DurableError> {
        let started = Instant::now();
        let producer = self.producer();
        let mut futures = Vec::with_capacity(records.len());
        for r in &records {
            futures.push(enqueue(&producer, r));
        }
        let deadline = tokio::time::Instant::now() + self.ack_timeout;
        let mut failed: Vec<usize> = Vec::new();
        let mut refused: Vec<(usize, KafkaError)> = Vec::new();
        let mut in_flight: Vec<DeliveryFuture> = Vec::new();
        for (i, fut) in futures.into_iter().enumerate() {
            let mut fut = match fut {
                Ok(fut) => fut,
                Err(e) if e.class() == ErrorClass::BadInput => {
                    refused.push((i, e));
                    continue;
                }
                Err(_) => {
                    failed.push(i);
                    continue;
                }
            };
            match tokio::time::timeout_at(deadline, &mut fut).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) if e.class() == ErrorClass::BadInput => refused.push((i, e)),
                Ok(_) => failed.push(i),
                Err(_) => {
                    failed.push(i);
                    in_flight.push(fut);
                }
            }
        }
        observability::produce_latency(started.elapsed());
        // Refused for what they are: their dead letters take their place, and go the way the
        // others go (acknowledged, or spooled with the unacknowledged).
        let mut records: Vec<Option<Record>> = records.into_iter().map(Some).collect();
        let mut letters = Vec::new();
        for (i, e) in refused {
            if let Some(r) = records.get_mut(i).and_then(Option::take) {
                letters.extend(self.refusal(&r, &e));
            }
        }
        if !letters.is_empty() {
            let letters = self.publish_letters(&producer, letters).await;
            for r in letters {
                failed.push(records.len());
                records.push(Some(r));
            }
        }
        if failed.is_empty() {
            return Ok(Durability::Acked);
        }
        // The broker did not acknowledge in time: switch to the spool. Attempts still in flight
        // may yet land; the drain waits for them and skips what they delivered.
        tracing::warn!(
            unacked = failed.len(),
            "Broker did not acknowledge in time; spooling"
        );
        self.spooling.store(true, Ordering::Release);
        if !in_flight.is_empty() {
            self.unresolved.fetch_add(in_flight.len(), Ordering::AcqRel);
            let unresolved = self.unresolved.clone();
            tokio::spawn(async move {
                for fut in in_flight {
                    let _ = fut.await;
                    unresolved.fetch_sub(1, Ordering::AcqRel);
                }
            });
        }
        let failed: std::collections::HashSet<usize> = failed.into_iter().collect();
        let unacked: Vec<Record> = records
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| if failed.contains(&i) { r } else { None })
            .collect();
        let guard = self.switch.lock().await;
        let r = self.append(unacked).await;
        drop(guard);
        r.map(|()| Durability::Spooled)
    }

    /// A dead letter about `r`, which the broker refused for what it is; `None` when `r` is
    /// itself such a letter that was refused (it is counted as dropped).
    fn refusal(&self, r: &Record, e: &KafkaError) -> Option<Record> {
        let id = uuid::Uuid::from_u128(r.id).to_string();
        tracing::error!(error = %e, topic = %r.topic, bytes = r.value.len(), event_id = %id, "The broker refused a record; dead-lettering it");
        if r.event_type == REFUSAL_TYPE {
            observability::dropped(1);
            return None;
        }
        // A refused dead letter keeps only the size and digest of what it was about.
        let input: &[u8] = if r.topic == DEADLETTER_TOPIC {
            &[]
        } else {
            &r.value
        };
        let mut dl = DeadLetter {
            event_type: Some(r.event_type.to_string()),
            event_id: Some(id),
            source_topic: Some(r.topic.to_string()),
            ..DeadLetter::new(
                "collector",
                DeadLetterReason::ProcessingFailure,
                format!(
                    "the broker refused the record ({} bytes): {e}",
                    r.value.len()
                ),
                input,
                r.at_ms,
            )
        };
        if input.is_empty() {
            let whole = feedloop_core::model::Original::keep(&r.value);
            dl.original_size = Some(whole.size);
            dl.original_sha256 = Some(whole.sha256);
        }
        let mut value = Vec::with_capacity(256 + dl.original.len());
        if let Err(e) = self.deadletter.encode(&dl, &mut value) {
            tracing::error!(error = %e, "Cannot encode a dead letter about a refused record");
            observability::dropped(1);
            return None;
        }
        observability::refused(1);
        Some(Record {
            id: dl.dead_letter_id.as_u128(),
            topic: DEADLETTER_TOPIC.into(),
            key: r.key.clone(),
            value,
            event_type: REFUSAL_TYPE.into(),
            at_ms: r.at_ms,
        })
    }

    /// Publishes dead letters about refused records; returns those not acknowledged for a
    /// reason other than their own (to be stored like any unacknowledged record).
    async fn publish_letters(
        &self,
        producer: &FutureProducer,
        letters: Vec<Record>,
    ) -> Vec<Record> {
        let mut pending = Vec::new();
        for r in letters {
            match enqueue(producer, &r) {
                Ok(f) => pending.push((r, Some(f))),
                Err(e) if e.class() == ErrorClass::BadInput => {
                    let _ = self.refusal(&r, &e);
                }
                Err(_) => pending.push((r, None)),
            }
        }
        let mut left = Vec::new();
        for (r, f) in pending {
            let outcome = match f {
                Some(f) => tokio::time::timeout(self.ack_timeout, f).await,
                None => {
                    left.push(r);
                    continue;
                }
            };
            match outcome {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) if e.class() == ErrorClass::BadInput => {
                    let _ = self.refusal(&r, &e);
                }
                _ => left.push(r),
            }
        }
        left
    }

    /// Whether the spool is stuck: records wait in it, and the drain has not moved any of them
    /// for [`DRAIN_STALL_MS`].
    pub fn drain_stalled(&self) -> bool {
        self.is_spooling()
            && !self.spool.is_empty()
            && now_ms() - self.progress_at.load(Ordering::Acquire) > DRAIN_STALL_MS
    }

    /// Publishes the spool's size and the idempotency window's to the metrics.
    fn report(&self) {
        observability::spool_state(self.spool.depth(), self.spool.used_bytes());
        observability::dedup_size(self.dedup.len());
    }

    /// Drains the spool into the log until `shutdown`. Rebuilds the idempotency window first.
    ///
    /// A producer the broker keeps failing while it answers otherwise (three failed drains in a
    /// row, [`ProducerHealth`]), or one with a fatal error, is replaced; the read-back of the
    /// log before each drain keeps the new producer from duplicating.
    pub async fn drain(self: Arc<Self>, window_ms: i64, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let mut health = ProducerHealth::new(3);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let result = self.drain_once(window_ms).await;
            self.report();
            match result {
                Ok(()) => {
                    backoff = Duration::from_millis(200);
                    health.delivered();
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Spool drain paused");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if let Some((_, reason)) = self.producer().client().fatal_error() {
                        tracing::error!(
                            reason,
                            "The Kafka producer hit a fatal error; replacing it"
                        );
                        self.reset_producer();
                    } else if matches!(e, DrainError::Kafka(_))
                        && health.failed(&self.kafka, "collector").await
                    {
                        self.reset_producer();
                    }
                }
            }
            if !self.is_spooling() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }

    async fn drain_once(&self, window_ms: i64) -> Result<(), DrainError> {
        if !self.is_spooling() {
            return Ok(());
        }
        // Earlier attempts must resolve first, or the read-back could miss them.
        while self.unresolved.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = now_ms();
        if self.spool.is_empty() {
            self.progress_at.store(now, Ordering::Release);
        }
        let oldest = self
            .spool
            .read(None, 1)?
            .records
            .first()
            .map(|(_, r)| r.at_ms);
        let since = if self.is_rebuilt() {
            oldest.unwrap_or(now)
        } else {
            oldest.unwrap_or(now).min(now - window_ms)
        } - SCAN_MARGIN_MS;
        let topics = [catalogue::EVENTS_TOPIC, catalogue::DEADLETTER_TOPIC];
        let present = scan::event_ids_since(&self.kafka, &topics, since).await?;
        if !self.is_rebuilt() {
            self.dedup
                .remember(present.iter().map(|(id, at)| (*id, *at)), now);
            self.rebuilt.store(true, Ordering::Release);
            tracing::info!(
                ids = present.len(),
                "Idempotency window rebuilt from the log"
            );
        }
        let producer = self.producer();
        let mut from = None;
        loop {
            let read = self.spool.read(from, DRAIN_BATCH)?;
            let last = read.end;
            let batch = read.records;
            if batch.is_empty() && !read.skipped {
                let guard = self.switch.lock().await;
                if self.spool.is_empty() {
                    self.progress_at.store(now_ms(), Ordering::Release);
                    self.spooling.store(false, Ordering::Release);
                    tracing::info!("Spool drained; publishing directly");
                }
                drop(guard);
                return Ok(());
            }
            let n = batch.len() as u64;
            let mut futures = Vec::new();
            let mut refused = Vec::new();
            let mut skipped = 0;
            for (_, r) in &batch {
                if present.contains_key(&r.id) {
                    skipped += 1;
                    continue;
                }
                match enqueue(&producer, r) {
                    Ok(f) => futures.push((r, f)),
                    Err(e) if e.class() == ErrorClass::BadInput => refused.push((r, e)),
                    Err(e) => return Err(DrainError::Kafka(e)),
                }
            }
            let mut error = None;
            for (r, fut) in futures {
                // No timeout: every attempt resolves (message.timeout.ms bounds it), so a
                // failure is known to be final before the next read-back.
                match fut.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) if e.class() == ErrorClass::BadInput => refused.push((r, e)),
                    Ok(Err((e, _))) => error = Some(e),
                    Err(_) => error = Some(KafkaError::Canceled),
                }
            }
            if let Some(e) = error {
                return Err(DrainError::Kafka(e));
            }
            // Refused for what they are: a dead letter about each takes its place. One that
            // cannot be published yet keeps the batch in the spool (the next read-back skips
            // whatever this attempt delivered).
            let letters: Vec<Record> = refused
                .iter()
                .filter_map(|(r, e)| self.refusal(r, e))
                .collect();
            if !self.publish_letters(&producer, letters).await.is_empty() {
                return Err(DrainError::Kafka(KafkaError::Canceled));
            }
            self.spool.commit(last, n)?;
            self.progress_at.store(now_ms(), Ordering::Release);
            observability::drained(n, skipped);
            self.report();
            from = Some(last);
        }
    }

    /// Flushes what the producer still holds (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer().flush(timeout);
        self.spool.close();
    }

    /// Whether the broker answers right now.
    pub async fn broker_reachable(&self) -> bool {
        feedloop_core::kafka::wait_ready(&self.kafka, Duration::from_secs(2))
            .await
            .is_ok()
    }
}

#[derive(Debug, thiserror::Error)]
enum DrainError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Scan(#[from] scan::ScanError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
