//! Every metric cdc exports, described once.

use std::time::Duration;

use feedloop_core::http::HttpMetrics;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const CHANGES: &str = "feedloop_cdc_changes_total";
pub const TOMBSTONES: &str = "feedloop_cdc_tombstones_total";
pub const SNAPSHOT_ROWS: &str = "feedloop_cdc_snapshot_rows_total";
pub const SNAPSHOT_TABLES_DONE: &str = "feedloop_cdc_snapshot_tables_completed_total";
pub const OUTBOX: &str = "feedloop_cdc_outbox_events_total";
pub const ERASURE_REQUESTS: &str = "feedloop_cdc_erasure_requests_total";
pub const DEAD_LETTERS: &str = "feedloop_cdc_dead_letters_total";
pub const SEALED_VALUES: &str = "feedloop_cdc_sealed_values_total";
pub const SCHEMA_CHANGES: &str = "feedloop_cdc_schema_changes_total";
pub const RECONNECTS: &str = "feedloop_cdc_reconnects_total";
pub const PRODUCER_RESETS: &str = "feedloop_cdc_producer_resets_total";
pub const SLOT_LAG_BYTES: &str = "feedloop_cdc_slot_lag_bytes";
pub const CONFIRMED_LSN: &str = "feedloop_cdc_confirmed_lsn";
pub const LAG_SECONDS: &str = "feedloop_cdc_slot_lag_seconds";
pub const COMMIT_TO_ACK: &str = "feedloop_cdc_commit_to_ack_seconds";
pub const HTTP_REQUESTS: &str = "feedloop_cdc_http_requests_total";
pub const HTTP_DURATION: &str = "feedloop_cdc_http_request_duration_seconds";

pub const HTTP: HttpMetrics = HttpMetrics {
    requests: HTTP_REQUESTS,
    duration: HTTP_DURATION,
};

pub fn describe() {
    describe_counter!(
        CHANGES,
        "Change events published, by operation (c, u, d, r, t)."
    );
    describe_counter!(TOMBSTONES, "Tombstones published after deletes.");
    describe_counter!(
        PRODUCER_RESETS,
        "Kafka producers replaced because the broker stopped taking their records (it lost \
         their idempotence state: a restart without durable storage)."
    );
    describe_counter!(
        SNAPSHOT_ROWS,
        "Rows read by the initial snapshot, by table."
    );
    describe_counter!(SNAPSHOT_TABLES_DONE, "Tables whose snapshot completed.");
    describe_counter!(OUTBOX, "Outbox rows routed to outbox topics.");
    describe_counter!(
        ERASURE_REQUESTS,
        "Erasure requests raised by deleted or soft-deleted users."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Changes sent to the dead-letter topic, by reason."
    );
    describe_counter!(
        SEALED_VALUES,
        "Personal column values sealed with their owner's data key."
    );
    describe_counter!(SCHEMA_CHANGES, "New table schemas registered, by outcome.");
    describe_counter!(RECONNECTS, "Replication sessions restarted after an error.");
    describe_gauge!(
        SLOT_LAG_BYTES,
        metrics::Unit::Bytes,
        "WAL bytes the slot has not confirmed."
    );
    describe_gauge!(
        CONFIRMED_LSN,
        "Last LSN confirmed to Postgres (everything before it is acked by Kafka)."
    );
    describe_histogram!(
        COMMIT_TO_ACK,
        metrics::Unit::Seconds,
        "From commit in Postgres to the last broker ack of the transaction."
    );
}

pub fn change(op: &'static str) {
    counter!(CHANGES, "op" => op).increment(1);
}

pub fn tombstone() {
    counter!(TOMBSTONES).increment(1);
}

pub fn snapshot_rows(table: &str, n: u64) {
    counter!(SNAPSHOT_ROWS, "table" => table.to_owned()).increment(n);
}

pub fn snapshot_table_done() {
    counter!(SNAPSHOT_TABLES_DONE).increment(1);
}

pub fn outbox() {
    counter!(OUTBOX).increment(1);
}

pub fn erasure_request() {
    counter!(ERASURE_REQUESTS).increment(1);
}

pub fn sealed(n: u64) {
    if n > 0 {
        counter!(SEALED_VALUES).increment(n);
    }
}

pub fn dead_letter(reason: &'static str) {
    counter!(DEAD_LETTERS, "reason" => reason).increment(1);
}

pub fn schema_change(outcome: &'static str) {
    counter!(SCHEMA_CHANGES, "outcome" => outcome).increment(1);
}

pub fn reconnect() {
    counter!(RECONNECTS).increment(1);
}

pub fn producer_reset() {
    counter!(PRODUCER_RESETS).increment(1);
}

pub fn slot_lag(bytes: i64) {
    gauge!(SLOT_LAG_BYTES).set(bytes as f64);
}

/// Commit times (ms; 0 when unknown) of the batches handed to the producer and not yet
/// acknowledged, oldest first.
static PENDING: std::sync::Mutex<std::collections::VecDeque<i64>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

fn epoch_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A batch (a transaction, or a position outside one) went to the producer.
pub fn batch_sent(committed: Option<std::time::SystemTime>) {
    if let Ok(mut q) = PENDING.lock() {
        q.push_back(committed.map_or(0, epoch_ms));
    }
}

/// The oldest batch was acknowledged.
pub fn batch_acked() {
    if let Ok(mut q) = PENDING.lock() {
        q.pop_front();
    }
}

/// The stream restarts: nothing it sent is waited for any more.
pub fn batches_reset() {
    if let Ok(mut q) = PENDING.lock() {
        q.clear();
    }
}

/// Publishes the slot lag in seconds: how long ago the oldest transaction that Kafka has not
/// acknowledged yet committed in Postgres (0 when everything is acknowledged). Called
/// periodically.
pub fn report_lag_seconds() {
    let oldest = PENDING
        .lock()
        .ok()
        .and_then(|q| q.iter().copied().find(|ms| *ms > 0));
    let lag = oldest.map_or(0.0, |since| {
        (epoch_ms(std::time::SystemTime::now()) - since).max(0) as f64 / 1000.0
    });
    gauge!(LAG_SECONDS).set(lag);
}

pub fn confirmed(lsn: u64) {
    gauge!(CONFIRMED_LSN).set(lsn as f64);
}

pub fn commit_to_ack(d: Duration) {
    histogram!(COMMIT_TO_ACK).record(d.as_secs_f64());
}
