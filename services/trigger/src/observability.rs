//! The trigger's metrics (`feedloop_trigger_*`).

use feedloop_core::http::HttpMetrics;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};

pub const PARTITIONS: &str = "feedloop_trigger_partitions_total";
pub const DECISIONS: &str = "feedloop_trigger_decisions_total";
pub const DELIVERIES: &str = "feedloop_trigger_deliveries_total";
pub const PENDING_ROWS: &str = "feedloop_trigger_pending_rows";
pub const DEAD_LETTERS: &str = "feedloop_trigger_dead_letters_total";
pub const INTAKE_RETRIES: &str = "feedloop_trigger_intake_retries_total";
pub const INTAKE_GAPS: &str = "feedloop_trigger_intake_gap_records_total";

pub const PRODUCER_RESETS: &str = "feedloop_trigger_producer_resets_total";

pub const HTTP: HttpMetrics = HttpMetrics {
    requests: "feedloop_trigger_http_requests_total",
    duration: "feedloop_trigger_http_request_duration_seconds",
};

pub fn describe() {
    describe_counter!(PARTITIONS, "Committed partition versions recorded.");
    describe_counter!(DECISIONS, "Triggers decided, by dataset and rule.");
    describe_counter!(
        DELIVERIES,
        "Delivery attempts, by sink and outcome (delivered, retry, failed)."
    );
    describe_gauge!(
        PENDING_ROWS,
        "Rows committed since the dataset's last trigger."
    );
    describe_counter!(
        INTAKE_GAPS,
        "Partition records missing from the log (retention, a truncated log): never taken in (alerted on)."
    );
    describe_counter!(
        INTAKE_RETRIES,
        "Failed attempts to take in partition records from the log, by the failure's class (bad_input, unavailable, internal); a record that keeps failing is dead-lettered."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Partition records sent to the dead-letter topic."
    );
    describe_counter!(
        PRODUCER_RESETS,
        "Kafka producers replaced because the broker kept failing them while it answered (it lost their state)."
    );
    describe_counter!(HTTP.requests, "HTTP requests.");
    describe_histogram!(HTTP.duration, "HTTP request duration.");
}

pub fn partition() {
    counter!(PARTITIONS).increment(1);
}

pub fn decision(dataset: &str, rule: &'static str) {
    counter!(DECISIONS, "dataset" => dataset.to_owned(), "rule" => rule).increment(1);
}

pub fn delivery(sink: &str, outcome: &'static str) {
    counter!(DELIVERIES, "sink" => sink.to_owned(), "outcome" => outcome).increment(1);
}

pub fn pending_rows(dataset: &str, rows: i64) {
    gauge!(PENDING_ROWS, "dataset" => dataset.to_owned()).set(rows as f64);
}
