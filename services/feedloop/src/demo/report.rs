//! The demo's summary: what each stage counted, what the log and the dataset hold, and the
//! reconciliation between them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt::Write as _,
    time::Duration,
};

use anyhow::Context;
use arrow_array::{Array, Int32Array, RecordBatch, StringArray};
use feedloop_core::kafka::{KafkaConfig, QuietEof};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::{
    Message,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    topic_partition_list::{Offset, TopicPartitionList},
};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Per-event outcomes, as the phones were told or as the collector counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub accepted: u64,
    pub duplicates: u64,
    pub suppressed: u64,
    pub rejected: u64,
    /// Events of requests that never got an answer.
    pub unanswered: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.accepted + self.duplicates + self.suppressed + self.rejected + self.unanswered
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Erasure {
    pub request_id: String,
    /// Where the request came from (`api`, or `cdc` for an account deletion).
    pub origin: String,
    pub status: String,
    pub certificate_id: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Trigger {
    pub dataset: String,
    pub rule: String,
    pub reason: String,
    pub deliveries: Vec<String>,
}

/// What the dataset holds, read back from its Parquet files.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DatasetReport {
    pub partitions: usize,
    pub files: usize,
    /// Rows: every version of every example.
    pub rows: u64,
    /// Examples (distinct example ids).
    pub examples: u64,
    /// Rows that are corrections (version 2 and later).
    pub corrections: u64,
    /// Examples by the label of their latest version, from the Parquet rows.
    pub labels: BTreeMap<String, u64>,
    /// Examples by label, as the manifests state them.
    pub manifest_labels: BTreeMap<String, i64>,
    /// Rows that repeat an (example id, version).
    pub duplicate_examples: u64,
    /// Examples whose versions are not 1, 2, … without gaps.
    pub version_gaps: u64,
    /// A digest of (impression id, label of the latest version), sorted: the same seed gives
    /// the same.
    pub fingerprint: String,
    /// The label of each example's latest version, by impression id.
    #[serde(skip)]
    pub latest: BTreeMap<Uuid, String>,
    #[serde(skip)]
    pub impressions: BTreeSet<Uuid>,
    #[serde(skip)]
    pub users: HashSet<String>,
}

/// What the labeler counted (its own metrics).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LabelerCounts {
    /// Input records read (events and cdc changes).
    pub records: u64,
    /// Example rows written (corrections and erasure rewrites included).
    pub examples: u64,
    pub late_impressions: u64,
    pub late_outcomes: u64,
    pub dead_letters: u64,
}

/// Everything the demo counted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub users: usize,
    pub seconds: f64,
    pub events_sent: u64,
    pub malformed_sent: u64,
    pub retried_requests: u64,
    /// Rejected events by reason and field.
    pub rejections: BTreeMap<String, u64>,
    /// What the phones were told.
    pub answers: Counts,
    /// What the collector counted.
    pub collector: Counts,
    /// Records in `feedloop.events`, and how many distinct event ids they carry.
    pub events_in_log: (u64, u64),
    pub dead_letters_in_log: (u64, u64),
    pub rows_changed: u64,
    pub cdc_changes: u64,
    pub cdc_tombstones: u64,
    pub labeler: LabelerCounts,
    pub expected_examples: u64,
    pub dataset_path: String,
    pub dataset: DatasetReport,
    pub triggers: Vec<Trigger>,
    pub erasures: Vec<Erasure>,
    /// Every way the counters fail to reconcile; empty when the run lost and duplicated
    /// nothing.
    pub problems: Vec<String>,
}

/// Sum of every series of a counter or gauge in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}')?.1
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None;
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// What a topic holds of one run: its records, and how often each id appears (the values of
/// the headers [`record_ids`] was asked for, joined by `/`).
#[derive(Debug, Clone, Default)]
pub struct LogIds {
    pub records: u64,
    pub ids: HashMap<String, u32>,
}

/// Reads `topic` from the first record at or after `since_ms` to the end of every partition
/// (tansu under-reports high watermarks, so the end is where reading stops): records of earlier
/// runs on a shared cluster are not counted.
pub async fn record_ids(
    kafka: &KafkaConfig,
    topic: &str,
    since_ms: i64,
    id_headers: &[&str],
) -> anyhow::Result<LogIds> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    let id_headers: Vec<String> = id_headers.iter().map(|h| (*h).to_owned()).collect();
    tokio::task::spawn_blocking(move || -> anyhow::Result<LogIds> {
        let consumer: BaseConsumer<QuietEof> = kafka
            .client_config("feedloop-demo-count")
            .set("group.id", "feedloop-demo-count")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create_with_context(QuietEof)?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut by_time = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                by_time.add_partition_offset(&topic, p.id(), Offset::Offset(since_ms))?;
            }
        }
        let starts = consumer.offsets_for_times(by_time, Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        let mut open = HashSet::new();
        for p in starts.elements() {
            // No record at or after `since_ms`: nothing of this run there.
            if let Offset::Offset(o) = p.offset() {
                tpl.add_partition_offset(&topic, p.partition(), Offset::Offset(o))?;
                open.insert(p.partition());
            }
        }
        if open.is_empty() {
            return Ok(LogIds::default());
        }
        consumer.assign(&tpl)?;
        let mut log = LogIds::default();
        let mut idle = 0;
        while !open.is_empty() {
            match consumer.poll(Duration::from_millis(500)) {
                None => {
                    idle += 1;
                    anyhow::ensure!(idle < 60, "{topic}: no end of partition after 30 s");
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => {
                    idle = 0;
                    log.records += 1;
                    let values: Vec<String> = id_headers
                        .iter()
                        .filter_map(|name| {
                            let h = m.headers()?;
                            rdkafka::message::Headers::iter(h)
                                .find(|h| h.key == name.as_str())
                                .and_then(|h| h.value)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        })
                        .collect();
                    if values.len() == id_headers.len() {
                        *log.ids.entry(values.join("/")).or_default() += 1;
                    }
                }
            }
        }
        Ok(log)
    })
    .await?
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .with_context(|| format!("the dataset has no text column {name}"))
}

/// Reads the current version of every partition of `dataset` back from its Parquet files.
pub async fn read_dataset(
    control: &PgPool,
    root: &str,
    dataset: &str,
) -> anyhow::Result<DatasetReport> {
    let manifests = sqlx::query(
        "SELECT DISTINCT ON (partition) manifest FROM labeler.partitions
         WHERE dataset = $1 ORDER BY partition, version DESC",
    )
    .bind(dataset)
    .fetch_all(control)
    .await
    .context("reading the dataset's manifests")?;
    let root = feedloop_labeler::dataset::Root::open(root, &BTreeMap::new())?;
    let mut report = DatasetReport {
        partitions: manifests.len(),
        ..DatasetReport::default()
    };
    // example id → versions written; impression → (version, label) of the latest.
    let mut versions: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    let mut latest: BTreeMap<Uuid, (i32, String)> = BTreeMap::new();
    for row in manifests {
        let manifest: feedloop_labeler::dataset::Manifest =
            serde_json::from_str(&row.try_get::<String, _>("manifest")?)?;
        for (label, n) in manifest.label_counts {
            *report.manifest_labels.entry(label).or_default() += n;
        }
        for file in &manifest.files {
            report.files += 1;
            let rel = root
                .rel_of(&file.uri)
                .with_context(|| format!("{} is outside the dataset root", file.uri))?;
            let bytes = root.get(&rel).await?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
            for batch in reader {
                let batch = batch?;
                let (example, impression, viewer, candidate, label) = (
                    strings(&batch, "example_id")?,
                    strings(&batch, "impression_event_id")?,
                    strings(&batch, "viewer_id")?,
                    strings(&batch, "candidate_id")?,
                    strings(&batch, "label")?,
                );
                let version = batch
                    .column_by_name("version")
                    .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
                    .context("the dataset has no version column")?;
                for i in 0..batch.num_rows() {
                    report.rows += 1;
                    let v = version.value(i);
                    versions
                        .entry(example.value(i).to_owned())
                        .or_default()
                        .push(v);
                    if let Ok(id) = impression.value(i).parse() {
                        report.impressions.insert(id);
                        let l = latest.entry(id).or_insert((0, String::new()));
                        if v > l.0 {
                            *l = (v, label.value(i).to_owned());
                        }
                    }
                    report.users.insert(viewer.value(i).to_owned());
                    report.users.insert(candidate.value(i).to_owned());
                }
            }
        }
    }
    report.examples = versions.len() as u64;
    for v in versions.values_mut() {
        v.sort_unstable();
        let n = v.len();
        v.dedup();
        report.duplicate_examples += (n - v.len()) as u64;
        report.corrections += v.iter().filter(|x| **x > 1).count() as u64;
        if v.iter().zip(1..).any(|(x, want)| *x != want) {
            report.version_gaps += 1;
        }
    }
    report.latest = latest.into_iter().map(|(id, (_, l))| (id, l)).collect();
    let mut digest = String::with_capacity(report.latest.len() * 48);
    for (impression, label) in &report.latest {
        *report.labels.entry(label.clone()).or_default() += 1;
        let _ = writeln!(digest, "{impression} {label}");
    }
    report.fingerprint = feedloop_labeler::dataset::sha256_hex(digest.as_bytes())[..16].to_owned();
    Ok(report)
}

/// Every way the run's counters fail to add up.
pub fn reconcile(
    s: &Summary,
    expected: &BTreeMap<Uuid, &'static str>,
    erased: &BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    check(
        s.answers.total() == s.events_sent,
        format!(
            "the phones sent {} events but were answered for {}",
            s.events_sent,
            s.answers.total()
        ),
    );
    check(
        s.answers.unanswered == 0,
        format!("{} events never got an answer", s.answers.unanswered),
    );
    check(
        s.collector == s.answers,
        format!(
            "the collector counted {:?}, the phones were told {:?}",
            s.collector, s.answers
        ),
    );
    check(
        s.answers.rejected == s.malformed_sent,
        format!(
            "{} events were malformed but {} were rejected",
            s.malformed_sent, s.answers.rejected
        ),
    );
    check(
        s.events_in_log.0 == s.collector.accepted && s.events_in_log.1 == s.events_in_log.0,
        format!(
            "the collector accepted {} events; {} records with {} distinct ids are in the log",
            s.collector.accepted, s.events_in_log.0, s.events_in_log.1
        ),
    );
    check(
        s.dead_letters_in_log.0 >= s.collector.rejected,
        format!(
            "the collector rejected {} events; {} dead letters are in the log",
            s.collector.rejected, s.dead_letters_in_log.0
        ),
    );
    check(
        s.cdc_changes == s.rows_changed,
        format!(
            "the product database changed {} rows; cdc published {} changes",
            s.rows_changed, s.cdc_changes
        ),
    );
    let d = &s.dataset;
    check(
        d.duplicate_examples == 0,
        format!(
            "{} dataset rows repeat an example's version",
            d.duplicate_examples
        ),
    );
    check(
        d.version_gaps == 0,
        format!("{} examples have versions with gaps", d.version_gaps),
    );
    let missing = expected
        .keys()
        .filter(|i| !d.impressions.contains(i))
        .count();
    let extra = d
        .impressions
        .iter()
        .filter(|i| !expected.contains_key(i))
        .count();
    check(
        missing == 0 && extra == 0 && d.examples == expected.len() as u64,
        format!(
            "the dataset has {} examples: {missing} expected impressions missing, {extra} unexpected",
            d.examples
        ),
    );
    // Labels, not only rows: the latest version of every example says what the simulation
    // knows happened.
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(id, want)| {
            let got = d.latest.get(id)?;
            (got != want).then(|| format!("{id}: {got}, expected {want}"))
        })
        .collect();
    check(
        wrong.is_empty(),
        format!(
            "{} examples have the wrong label in their latest version, e.g. {}",
            wrong.len(),
            wrong.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        ),
    );
    let manifest_total: i64 = d.manifest_labels.values().sum();
    check(
        manifest_total == d.examples as i64,
        format!(
            "the manifests count {manifest_total} examples, the files hold {}",
            d.examples
        ),
    );
    let present = erased.iter().filter(|u| d.users.contains(*u)).count();
    check(
        present == 0,
        format!("{present} erased users are still in the dataset"),
    );
    for e in &s.erasures {
        check(
            e.status == "completed" && e.certificate_id.is_some(),
            format!(
                "erasure {} ended {} without a certificate",
                e.request_id, e.status
            ),
        );
    }
    problems
}

/// One "label  value" line of the summary table.
fn line(t: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(t, "  {label:<34} {value:>9}");
}

/// The summary as the terminal shows it.
pub fn render(s: &Summary, out_dir: &str) -> String {
    let mut t = String::new();
    let a = &s.answers;
    let _ = writeln!(
        t,
        "\nfeedloop demo: {} users, seed {}, {:.0} s\n",
        s.users, s.seed, s.seconds
    );
    let _ = writeln!(t, "Events");
    line(&mut t, "sent by the phones", s.events_sent);
    line(&mut t, "published to feedloop.events", a.accepted);
    line(&mut t, "dead-lettered (malformed)", a.rejected);
    for (why, n) in &s.rejections {
        let _ = writeln!(t, "    {why:<32} {n:>9}");
    }
    line(&mut t, "suppressed (erased users)", a.suppressed);
    line(&mut t, "duplicates (retried batches)", a.duplicates);
    line(&mut t, "records in feedloop.events", s.events_in_log.0);
    line(&mut t, "requests retried (429/503)", s.retried_requests);
    let _ = writeln!(t, "\nProduct database → cdc");
    line(&mut t, "rows changed", s.rows_changed);
    line(&mut t, "change events published", s.cdc_changes);
    line(&mut t, "tombstones", s.cdc_tombstones);
    let l = &s.labeler;
    let _ = writeln!(t, "\nLabeler");
    line(&mut t, "records read", l.records);
    line(&mut t, "example rows written", l.examples);
    line(
        &mut t,
        "late impressions (held, emitted)",
        l.late_impressions,
    );
    line(&mut t, "late outcomes", l.late_outcomes);
    line(&mut t, "dead-lettered", l.dead_letters);
    let d = &s.dataset;
    let _ = writeln!(
        t,
        "\nLabeled examples ({} expected), by the label of their latest version",
        s.expected_examples
    );
    for (label, n) in &d.labels {
        line(&mut t, label, n);
    }
    line(&mut t, "total", d.examples);
    line(&mut t, "rows (corrections included)", d.rows);
    let _ = writeln!(
        t,
        "\nPartitions: {} committed, {} files, fingerprint {}\n  {}",
        d.partitions, d.files, d.fingerprint, s.dataset_path
    );
    let _ = writeln!(t, "\nTriggers fired: {}", s.triggers.len());
    for tr in &s.triggers {
        let _ = writeln!(
            t,
            "  {} · {} · {} [{}]",
            tr.dataset,
            tr.rule,
            tr.reason,
            tr.deliveries.join(", ")
        );
    }
    let _ = writeln!(t, "\nErasures: {}", s.erasures.len());
    for e in &s.erasures {
        let _ = writeln!(
            t,
            "  request {} ({}) {} certificate {}",
            e.request_id,
            e.origin,
            e.status,
            e.certificate_id.as_deref().unwrap_or("none")
        );
    }
    let _ = writeln!(t, "\nRead the dataset:");
    let _ = writeln!(
        t,
        "  duckdb -c \"SELECT label, count(*) FROM (SELECT * FROM read_parquet('{}/**/*.parquet', hive_partitioning = true) QUALIFY row_number() OVER (PARTITION BY example_id ORDER BY version DESC) = 1) GROUP BY label\"",
        s.dataset_path
    );
    let _ = writeln!(
        t,
        "  python3 -c \"import pandas as pd; df = pd.read_parquet('{}'); print(df.sort_values('version').drop_duplicates('example_id', keep='last').label.value_counts())\"",
        s.dataset_path
    );
    let _ = writeln!(
        t,
        "Summary: {out_dir}/summary.json; services' log: {out_dir}/demo.log"
    );
    if s.problems.is_empty() {
        let _ = writeln!(
            t,
            "\nReconciled: in = published + dead-lettered + suppressed + duplicates ({} = {} + {} + {} + {}); every expected example is in the dataset exactly once.",
            s.events_sent, a.accepted, a.rejected, a.suppressed, a.duplicates
        );
    } else {
        let _ = writeln!(t, "\nRECONCILIATION FAILED:");
        for p in &s.problems {
            let _ = writeln!(t, "  - {p}");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_add_every_series_of_one_name() {
        let text = "# TYPE x_total counter\nx_total{op=\"c\"} 3\nx_total{op=\"d\"} 2\nx_total_other 9\nx_totals 1\ny 4\n";
        assert_eq!(metric_sum(text, "x_total"), 5.0);
        assert_eq!(metric_sum(text, "y"), 4.0);
        assert_eq!(metric_sum(text, "z"), 0.0);
    }
}
