//! Reading back what the log already holds: the event ids (header `event_id`) appended to
//! topics since a point in time. Used at start to rebuild the idempotency window, and before
//! draining the spool so that no spooled record is published twice.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use feedloop_core::{
    kafka::{KafkaConfig, QuietEof},
    resume::{Resume, Step},
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    message::Headers,
};
use rustc_hash::FxHashMap;

/// Header carrying a record's event id (a UUID string) on every record the collector writes.
pub const EVENT_ID_HEADER: &str = "event_id";
/// Header carrying the record's event type.
pub const EVENT_TYPE_HEADER: &str = "event_type";

/// Event ids found in the log, with their append time (epoch ms).
pub type Found = FxHashMap<u128, i64>;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading back the log failed: {0}")]
    Kafka(#[from] KafkaError),
    #[error("reading back the log was cancelled")]
    Join,
}

/// Every event id appended to `topics` since `since_ms`, up to the end of each partition as it
/// was when the scan started.
pub async fn event_ids_since(
    config: &KafkaConfig,
    topics: &[&str],
    since_ms: i64,
) -> Result<Found, ScanError> {
    let config = config.clone();
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || scan_blocking(&config, &topics, since_ms))
        .await
        .map_err(|_| ScanError::Join)?
}

fn scan_blocking(
    config: &KafkaConfig,
    topics: &[String],
    since_ms: i64,
) -> Result<Found, ScanError> {
    let mut found = Found::default();
    for topic in topics {
        scan_topic(config, topic, since_ms, &mut found)?;
    }
    Ok(found)
}

/// Reads one topic from `since_ms` to its end. The end of a partition is its end-of-partition
/// event, or a record appended after the scan began (writers that keep going must not keep the
/// scan going). High watermarks are not trusted: tansu 0.6 under-reports them for multi-record
/// batches.
fn scan_topic(
    config: &KafkaConfig,
    topic: &str,
    since_ms: i64,
    found: &mut Found,
) -> Result<(), ScanError> {
    let timeout = Duration::from_secs(10);
    let started = crate::durable::now_ms();
    let consumer: BaseConsumer<QuietEof> = config
        .client_config("feedloop-collector-scan")
        .set("group.id", "feedloop-collector-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.max.bytes", "52428800")
        .create_with_context(QuietEof)?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut by_time = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            by_time.add_partition_offset(topic, p.id(), Offset::Offset(since_ms))?;
        }
    }
    if by_time.count() == 0 {
        return Ok(());
    }
    let starts = consumer.offsets_for_times(by_time, timeout)?;
    let mut assignment = TopicPartitionList::new();
    let mut open: HashSet<i32> = HashSet::new();
    // The record at each start exists: a read that skips it (the embedded broker, when the
    // start is inside a batch) is started again further back (see `Resume`).
    let mut resume: HashMap<i32, Resume> = HashMap::new();
    for elem in starts.elements() {
        // No record at or after the time: nothing to read there.
        if let Offset::Offset(o) = elem.offset() {
            assignment.add_partition_offset(topic, elem.partition(), Offset::Offset(o))?;
            open.insert(elem.partition());
            resume.insert(elem.partition(), Resume::at(o));
        }
    }
    if open.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let mut idle = 0;
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            None => {
                idle += 1;
                if idle > 120 {
                    return Err(ScanError::Kafka(KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    )));
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(r) = resume.get_mut(&p)
                    && let Some(Step::Rewind(to)) = r.ended()
                {
                    consumer.seek(topic, p, Offset::Offset(to), timeout)?;
                    continue;
                }
                open.remove(&p);
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(msg)) => {
                idle = 0;
                if let Some(r) = resume.get_mut(&msg.partition())
                    && let Step::Rewind(to) = r.step(msg.offset())
                {
                    consumer.seek(topic, msg.partition(), Offset::Offset(to), timeout)?;
                    continue;
                }
                let at = msg.timestamp().to_millis().unwrap_or(since_ms);
                if let Some(id) = header_id(&msg) {
                    found.insert(id, at);
                }
                if at > started {
                    open.remove(&msg.partition());
                }
            }
        }
    }
    Ok(())
}

fn header_id(msg: &impl Message) -> Option<u128> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == EVENT_ID_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .map(|u| u.as_u128())
}
