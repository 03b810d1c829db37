//! The eraser's metrics (`feedloop_eraser_*`).

use feedloop_core::http::HttpMetrics;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
use sqlx::PgPool;

pub const OPEN_REQUESTS: &str = "feedloop_eraser_open_requests";
pub const OLDEST_OPEN: &str = "feedloop_eraser_oldest_open_request_age_seconds";
pub const OVERDUE: &str = "feedloop_eraser_overdue_requests";
pub const NEXT_DEADLINE: &str = "feedloop_eraser_next_deadline_seconds";
pub const DEAD_LETTERS: &str = "feedloop_eraser_dead_letters_total";
pub const INTAKE_RETRIES: &str = "feedloop_eraser_intake_retries_total";
pub const INTAKE_GAPS: &str = "feedloop_eraser_intake_gap_records_total";
pub const TARGET_FAILURES: &str = "feedloop_eraser_target_failures_total";
pub const REQUESTS: &str = "feedloop_eraser_requests_total";

pub const PRODUCER_RESETS: &str = "feedloop_eraser_producer_resets_total";
pub const KEYS_REWRAPPED: &str = "feedloop_eraser_keys_rewrapped_total";

pub const HTTP: HttpMetrics = HttpMetrics {
    requests: "feedloop_eraser_http_requests_total",
    duration: "feedloop_eraser_http_request_duration_seconds",
};

pub fn describe() {
    describe_gauge!(OPEN_REQUESTS, "Erasure requests pending or running.");
    describe_gauge!(OLDEST_OPEN, "Age of the oldest open erasure request.");
    describe_gauge!(OVERDUE, "Open erasure requests past their deadline.");
    describe_counter!(
        INTAKE_GAPS,
        "Erasure requests missing from the log (retention, a truncated log): never taken in (alerted on)."
    );
    describe_counter!(
        INTAKE_RETRIES,
        "Failed attempts to take in erasure requests from the log, by the failure's class (bad_input, unavailable, internal); a record that keeps failing is dead-lettered."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Erasure requests from the log that cannot be decoded, sent to the dead-letter topic."
    );
    describe_gauge!(
        NEXT_DEADLINE,
        "Seconds until the earliest deadline of an open erasure request (negative once passed; +Inf when none is open)."
    );
    describe_counter!(
        TARGET_FAILURES,
        "Erasure targets that failed after every attempt, by target."
    );
    describe_counter!(REQUESTS, "Erasure requests accepted, by origin.");
    describe_counter!(
        PRODUCER_RESETS,
        "Kafka producers replaced because the broker kept failing them while it answered (it lost their state)."
    );
    describe_counter!(
        KEYS_REWRAPPED,
        "Data keys re-wrapped with the current key-encryption key (after a KEK rotation)."
    );
    describe_counter!(HTTP.requests, "HTTP requests.");
    describe_histogram!(HTTP.duration, "HTTP request duration.");
}

pub fn keys_rewrapped(n: u64) {
    counter!(KEYS_REWRAPPED).increment(n);
}

pub fn target_failed(target: &'static str) {
    counter!(TARGET_FAILURES, "target" => target).increment(1);
}

pub fn request(origin: &str) {
    counter!(REQUESTS, "origin" => origin.to_owned()).increment(1);
}

/// Refreshes the open-request gauges from the database.
pub async fn open_requests(pool: &PgPool) {
    let row: Result<(i64, f64, i64, Option<f64>), _> = sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(requested_at)), 0)::float8,
                count(*) FILTER (WHERE deadline_at < now()),
                EXTRACT(EPOCH FROM min(deadline_at) - now())::float8
         FROM eraser.requests WHERE status IN ('pending', 'running')",
    )
    .fetch_one(pool)
    .await;
    if let Ok((open, oldest, overdue, next_deadline)) = row {
        gauge!(OPEN_REQUESTS).set(open as f64);
        gauge!(OLDEST_OPEN).set(oldest);
        gauge!(OVERDUE).set(overdue as f64);
        gauge!(NEXT_DEADLINE).set(next_deadline.unwrap_or(f64::INFINITY));
    }
}
