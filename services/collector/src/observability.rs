//! Every metric the collector exports, described once.

use std::time::Duration;

use feedloop_core::http::HttpMetrics;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const EVENTS_ACCEPTED: &str = "feedloop_collector_events_accepted_total";
pub const EVENTS_REJECTED: &str = "feedloop_collector_events_rejected_total";
pub const EVENTS_DUPLICATE: &str = "feedloop_collector_events_duplicate_total";
pub const EVENTS_SUPPRESSED: &str = "feedloop_collector_events_suppressed_total";
pub const RATE_LIMITED: &str = "feedloop_collector_rate_limited_requests_total";
pub const SHED: &str = "feedloop_collector_shed_requests_total";
pub const SPOOL_DEPTH: &str = "feedloop_collector_spool_depth_records";
pub const SPOOL_BYTES: &str = "feedloop_collector_spool_used_bytes";
pub const SPOOLED: &str = "feedloop_collector_spooled_records_total";
pub const SPOOL_QUARANTINED: &str = "feedloop_collector_spool_quarantined_segments_total";
pub const SPOOL_SKIPPED: &str = "feedloop_collector_spool_skipped_bytes_total";
pub const DISCARDED: &str = "feedloop_collector_discarded_records_total";
pub const DRAINED: &str = "feedloop_collector_drained_records_total";
pub const DRAIN_SKIPPED: &str = "feedloop_collector_drain_skipped_records_total";
pub const PRODUCE_LATENCY: &str = "feedloop_collector_produce_latency_seconds";
pub const DEDUP_IDS: &str = "feedloop_collector_dedup_ids";
pub const REFUSED: &str = "feedloop_collector_refused_records_total";
pub const DROPPED: &str = "feedloop_collector_dropped_records_total";
pub const PRODUCER_RESETS: &str = "feedloop_collector_producer_resets_total";
pub const HTTP_REQUESTS: &str = "feedloop_collector_http_requests_total";
pub const HTTP_DURATION: &str = "feedloop_collector_http_request_duration_seconds";

/// The request metrics, for `feedloop_core::http::track`.
pub const HTTP: HttpMetrics = HttpMetrics {
    requests: HTTP_REQUESTS,
    duration: HTTP_DURATION,
};

pub fn describe() {
    describe_counter!(
        PRODUCER_RESETS,
        "Kafka producers replaced because the broker stopped taking their records (it lost their \
         idempotence state: a restart without durable storage)."
    );
    describe_counter!(
        DISCARDED,
        "Records thrown away by the null sink ([sink] kind = \"null\": benchmarks only)."
    );
    describe_counter!(
        EVENTS_ACCEPTED,
        "Events accepted and made durable, by event type."
    );
    describe_counter!(
        EVENTS_REJECTED,
        "Events rejected and dead-lettered, by reason."
    );
    describe_counter!(
        EVENTS_DUPLICATE,
        "Events answered as duplicates and not republished."
    );
    describe_counter!(EVENTS_SUPPRESSED, "Events of users under erasure, dropped.");
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by the per-application rate limit."
    );
    describe_gauge!(
        SPOOL_DEPTH,
        "Records in the local spool waiting for the broker."
    );
    describe_gauge!(
        SPOOL_BYTES,
        metrics::Unit::Bytes,
        "Bytes in the local spool waiting for the broker."
    );
    describe_counter!(SPOOLED, "Records written to the local spool.");
    describe_counter!(
        SPOOL_QUARANTINED,
        "Spool segments with a corrupt frame, copied to the spool's quarantine/ directory (alerted on)."
    );
    describe_counter!(
        SPOOL_SKIPPED,
        "Bytes of corrupt spool frames skipped to reach the next valid frame."
    );
    describe_counter!(
        REFUSED,
        "Records the broker refused for what they are (size, format); a dead letter about each was published instead."
    );
    describe_counter!(
        DROPPED,
        "Records neither the broker nor the dead-letter topic would take (alerted on)."
    );
    describe_counter!(DRAINED, "Spooled records published to the broker.");
    describe_counter!(
        DRAIN_SKIPPED,
        "Spooled records found already in the log and not published again."
    );
    describe_histogram!(
        PRODUCE_LATENCY,
        metrics::Unit::Seconds,
        "Time from produce to broker acknowledgement, per request."
    );
    describe_gauge!(DEDUP_IDS, "Event ids in the idempotency window.");
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency, by route."
    );
}

pub fn accepted(event_type: &'static str, n: u64) {
    counter!(EVENTS_ACCEPTED, "event_type" => event_type).increment(n);
}

pub fn rejected(reason: &'static str) {
    counter!(EVENTS_REJECTED, "reason" => reason).increment(1);
}

pub fn duplicates(n: u64) {
    counter!(EVENTS_DUPLICATE).increment(n);
}

pub fn suppressed(n: u64) {
    counter!(EVENTS_SUPPRESSED).increment(n);
}

pub fn rate_limited() {
    counter!(RATE_LIMITED).increment(1);
}

pub fn shed() {
    counter!(SHED).increment(1);
}

pub fn discarded(n: usize) {
    counter!(DISCARDED).increment(n as u64);
}

pub fn spooled(n: usize) {
    counter!(SPOOLED).increment(n as u64);
}

pub fn spool_quarantined(skipped_bytes: u64) {
    counter!(SPOOL_QUARANTINED).increment(1);
    counter!(SPOOL_SKIPPED).increment(skipped_bytes);
}

pub fn refused(n: u64) {
    counter!(REFUSED).increment(n);
}

pub fn dropped(n: u64) {
    counter!(DROPPED).increment(n);
}

pub fn producer_reset() {
    counter!(PRODUCER_RESETS).increment(1);
}

pub fn drained(n: u64, skipped: u64) {
    counter!(DRAINED).increment(n - skipped);
    counter!(DRAIN_SKIPPED).increment(skipped);
}

pub fn spool_state(records: u64, bytes: u64) {
    gauge!(SPOOL_DEPTH).set(records as f64);
    gauge!(SPOOL_BYTES).set(bytes as f64);
}

pub fn dedup_size(n: usize) {
    gauge!(DEDUP_IDS).set(n as f64);
}

pub fn produce_latency(d: Duration) {
    histogram!(PRODUCE_LATENCY).record(d.as_secs_f64());
}
