//! The labeler's metrics (`feedloop_labeler_*`).

use feedloop_core::http::HttpMetrics;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const RECORDS: &str = "feedloop_labeler_records_total";
pub const EXAMPLES: &str = "feedloop_labeler_examples_total";
pub const ERASED_EXAMPLES: &str = "feedloop_labeler_erased_examples_total";
pub const LATE_OUTCOMES: &str = "feedloop_labeler_late_outcomes_total";
pub const LATE_IMPRESSIONS: &str = "feedloop_labeler_late_impressions_total";
pub const HELD_IMPRESSIONS: &str = "feedloop_labeler_held_impressions";
pub const OFFSET_REWINDS: &str = "feedloop_labeler_offset_rewinds_total";
pub const OFFSET_GAPS: &str = "feedloop_labeler_offset_gap_records_total";
pub const DUPLICATE_IMPRESSIONS: &str = "feedloop_labeler_duplicate_impressions_total";
pub const DEAD_LETTERS: &str = "feedloop_labeler_dead_letters_total";
pub const COMMITS: &str = "feedloop_labeler_commits_total";
pub const COMMIT_DURATION: &str = "feedloop_labeler_commit_duration_seconds";
pub const WATERMARK_LAG: &str = "feedloop_labeler_watermark_lag_seconds";
pub const PENDING_ROWS: &str = "feedloop_labeler_pending_rows";
pub const RESTARTS: &str = "feedloop_labeler_restarts_total";
pub const STATE_EXPIRED: &str = "feedloop_labeler_state_expired_entries_total";
pub const LOG_RESETS: &str = "feedloop_labeler_log_resets_total";
pub const PRODUCER_RESETS: &str = "feedloop_labeler_producer_resets_total";
pub const STATE_ENTRIES: &str = "feedloop_labeler_state_entries";
pub const CHECKPOINT_BYTES: &str = "feedloop_labeler_checkpoint_bytes";

pub const HTTP: HttpMetrics = HttpMetrics {
    requests: "feedloop_labeler_http_requests_total",
    duration: "feedloop_labeler_http_request_duration_seconds",
};

pub fn describe() {
    describe_counter!(
        RECORDS,
        "Input records read, by dataset and kind (impression, outcome, other, dead_letter)."
    );
    describe_counter!(
        ERASED_EXAMPLES,
        "Examples not written because a user in them is erased."
    );
    describe_counter!(
        EXAMPLES,
        "Labeled examples written, by dataset and kind (first: version 1 when the watermark \
         passed its close; late: version 1 of an impression read after its close; correction: \
         a later version)."
    );
    describe_counter!(
        LATE_OUTCOMES,
        "Outcomes read after an example they join was emitted, by dataset and reason: \
         corrected (a new version), unchanged (the example said the same with it), \
         beyond_horizon (every example it can join is past close + correction_horizon: not \
         applied), dropped (late_outcomes = \"drop\")."
    );
    describe_gauge!(
        HELD_IMPRESSIONS,
        "Late impressions held for the outcomes read with them, by dataset."
    );
    describe_counter!(
        OFFSET_REWINDS,
        "Reads of an input partition started again further back because records were skipped (the embedded broker skips the rest of a batch when a fetch starts inside it)."
    );
    describe_counter!(
        OFFSET_GAPS,
        "Input records missing from the log (retention, a truncated log), by dataset and topic (alerted on)."
    );
    describe_counter!(
        DUPLICATE_IMPRESSIONS,
        "Impressions read again under another record after their example was emitted (a client retry, at-least-once delivery): not emitted twice."
    );
    describe_counter!(
        LATE_IMPRESSIONS,
        "Impressions read after their own example had closed (held, then emitted with the \
         outcomes read with them), by dataset and whether within the correction horizon \
         (horizon = within, beyond)."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Input records sent to feedloop.deadletter, by dataset and reason."
    );
    describe_counter!(
        COMMITS,
        "Dataset commits (files, manifests and offsets), by dataset."
    );
    describe_histogram!(
        COMMIT_DURATION,
        "Time to commit a batch: files, Kafka, Postgres."
    );
    describe_gauge!(
        WATERMARK_LAG,
        "Wall clock minus the dataset's global event-time watermark."
    );
    describe_gauge!(
        PENDING_ROWS,
        "Examples waiting for the next commit, by dataset."
    );
    describe_gauge!(
        STATE_ENTRIES,
        "Impressions and outcomes in the local join state, by dataset (it is held in memory)."
    );
    describe_gauge!(
        CHECKPOINT_BYTES,
        "Bytes of the segments the local join state's committed checkpoint lists, by dataset."
    );
    describe_counter!(
        RESTARTS,
        "Pipeline restarts from the last commit after an error, by dataset."
    );
    describe_counter!(
        STATE_EXPIRED,
        "Join-state entries expired after their examples were committed."
    );
    describe_counter!(
        LOG_RESETS,
        "Input partitions that went back behind the committed position (the broker lost its \
         log, or the topic was re-created), by dataset and topic."
    );
    describe_counter!(
        PRODUCER_RESETS,
        "Kafka producers replaced because the broker stopped taking their records (it lost \
         their idempotence state: a restart without durable storage), by dataset."
    );
    describe_counter!(HTTP.requests, "HTTP requests to the operational endpoints.");
    describe_histogram!(HTTP.duration, "HTTP request duration.");
}

pub fn producer_reset(dataset: &str) {
    counter!(PRODUCER_RESETS, "dataset" => dataset.to_owned()).increment(1);
}

pub fn log_reset(dataset: &str, topic: &str) {
    counter!(LOG_RESETS, "dataset" => dataset.to_owned(), "topic" => topic.to_owned()).increment(1);
}

/// Input records handled since the last report, by kind: counted in the hot path with no
/// lookup, reported to the registry by [`RecordCounts::report`].
#[derive(Debug, Default)]
pub struct RecordCounts {
    counts: [u64; RECORD_KINDS.len()],
}

#[derive(Debug, Clone, Copy)]
pub enum RecordKind {
    Impression = 0,
    Outcome = 1,
    Other = 2,
    DeadLetter = 3,
}

const RECORD_KINDS: [&str; 4] = ["impression", "outcome", "other", "dead_letter"];

impl RecordCounts {
    pub fn add(&mut self, kind: RecordKind) {
        self.counts[kind as usize] += 1;
    }

    pub fn report(&mut self, dataset: &str) {
        for (kind, n) in RECORD_KINDS.iter().zip(&mut self.counts) {
            if *n > 0 {
                counter!(RECORDS, "dataset" => dataset.to_owned(), "kind" => *kind).increment(*n);
                *n = 0;
            }
        }
    }
}

pub fn erased_examples(dataset: &str, n: u64) {
    counter!(ERASED_EXAMPLES, "dataset" => dataset.to_owned()).increment(n);
}

pub fn examples(dataset: &str, kind: &'static str, n: u64) {
    counter!(EXAMPLES, "dataset" => dataset.to_owned(), "kind" => kind).increment(n);
}

pub fn late_outcomes(dataset: &str, reason: &'static str, n: u64) {
    counter!(LATE_OUTCOMES, "dataset" => dataset.to_owned(), "reason" => reason).increment(n);
}

pub fn late_impression(dataset: &str, horizon: &'static str) {
    counter!(LATE_IMPRESSIONS, "dataset" => dataset.to_owned(), "horizon" => horizon).increment(1);
}

pub fn held_impressions(dataset: &str, n: usize) {
    gauge!(HELD_IMPRESSIONS, "dataset" => dataset.to_owned()).set(n as f64);
}

pub fn rewind(dataset: &str, topic: &str) {
    counter!(OFFSET_REWINDS, "dataset" => dataset.to_owned(), "topic" => topic.to_owned())
        .increment(1);
}

pub fn offset_gap(dataset: &str, topic: &str, records: i64) {
    counter!(OFFSET_GAPS, "dataset" => dataset.to_owned(), "topic" => topic.to_owned())
        .increment(u64::try_from(records).unwrap_or(0));
}

pub fn duplicate_impression(dataset: &str) {
    counter!(DUPLICATE_IMPRESSIONS, "dataset" => dataset.to_owned()).increment(1);
}

pub fn dead_letter(dataset: &str, reason: &'static str) {
    counter!(DEAD_LETTERS, "dataset" => dataset.to_owned(), "reason" => reason).increment(1);
}

pub fn committed(dataset: &str, seconds: f64, pending: usize) {
    counter!(COMMITS, "dataset" => dataset.to_owned()).increment(1);
    histogram!(COMMIT_DURATION, "dataset" => dataset.to_owned()).record(seconds);
    gauge!(PENDING_ROWS, "dataset" => dataset.to_owned()).set(pending as f64);
}

pub fn watermark(dataset: &str, watermark_ms: i64, now_ms: i64) {
    if watermark_ms > i64::MIN {
        let lag = (now_ms.saturating_sub(watermark_ms)) as f64 / 1000.0;
        gauge!(WATERMARK_LAG, "dataset" => dataset.to_owned()).set(lag);
    }
}

pub fn restart(dataset: &str) {
    counter!(RESTARTS, "dataset" => dataset.to_owned()).increment(1);
}

pub fn expired(dataset: &str, n: u64) {
    counter!(STATE_EXPIRED, "dataset" => dataset.to_owned()).increment(n);
}

/// The local join state's size after a commit.
pub fn local_state(dataset: &str, entries: u64, checkpoint_bytes: u64) {
    gauge!(STATE_ENTRIES, "dataset" => dataset.to_owned()).set(entries as f64);
    gauge!(CHECKPOINT_BYTES, "dataset" => dataset.to_owned()).set(checkpoint_bytes as f64);
}
