//! Datasets: labeled examples as Parquet files in the Hive layout
//! `<root>/<dataset>/dt=YYYY-MM-DD/hour=HH/part-<uuid>.parquet`, on any `object_store` (local
//! filesystem or S3-compatible), with a JSON manifest per partition version next to the files.
//!
//! Columns are typed: timestamps as `timestamp[ms, UTC]`, one typed column per spec outcome,
//! the experiment arm and model version kept as strings for slicing, and the serving features
//! as a JSON string.

use std::{collections::BTreeMap, sync::Arc};

use arrow_array::{
    ArrayRef, RecordBatch,
    builder::{
        BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
        TimestampMillisecondBuilder,
    },
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};
use parquet::{
    arrow::ArrowWriter,
    basic::{Compression, ZstdLevel},
    file::properties::{EnabledStatistics, WriterProperties},
    schema::types::ColumnPath,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    spec::{Label, LabelSpec, ValueType},
    window::{Impression, Labeled, Scalar},
};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset root `{uri}`: {message}")]
    Root { uri: String, message: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error(
        "a manifest lists {uri}, which is not under the dataset root {root}: is the root configured as the service that wrote it had it?"
    )]
    Outside { uri: String, root: String },
    #[error("Parquet encoding: {0}")]
    Encoding(String),
}

/// One labeled example, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub example_id: Uuid,
    pub version: i32,
    pub impression: Impression,
    pub labeled: Labeled,
    pub revision: Revision,
}

/// Why a row was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revision {
    /// Version 1, when the dataset's watermark passed the example's close.
    First,
    /// Version 1 of an impression read after its example's close.
    Late,
    /// A later version; `replaces` is the label of the version before it, when known.
    Correction { replaces: Option<Label> },
}

impl Example {
    /// The Hive partition of the example: its impression's hour.
    pub fn partition(&self) -> String {
        hive_partition(self.impression.time_ms)
    }
}

/// `dt=YYYY-MM-DD/hour=HH` of a time in ms since the epoch (UTC).
pub fn hive_partition(time_ms: i64) -> String {
    let secs = time_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let hour = secs.rem_euclid(86_400) / 3600;
    let (y, m, d) = civil_from_days(days);
    format!("dt={y:04}-{m:02}-{d:02}/hour={hour:02}")
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The Arrow schema of a spec's dataset.
pub fn arrow_schema(spec: &LabelSpec) -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new("example_id", DataType::Utf8, false),
        Field::new("version", DataType::Int32, false),
        Field::new("impression_event_id", DataType::Utf8, false),
        Field::new("match_id", DataType::Utf8, false),
        Field::new("viewer_id", DataType::Utf8, false),
        Field::new("candidate_id", DataType::Utf8, false),
        Field::new("impression_time", ts(), false),
        Field::new("request_id", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, false),
        Field::new("experiment_id", DataType::Utf8, true),
        Field::new("experiment_arm", DataType::Utf8, true),
        Field::new("rank", DataType::Int32, false),
        Field::new("score", DataType::Float64, false),
        Field::new("features", DataType::Utf8, false),
    ];
    for o in &spec.outcomes {
        let t = match o.value_type {
            ValueType::Boolean => DataType::Boolean,
            ValueType::Long => DataType::Int64,
            ValueType::Double => DataType::Float64,
            ValueType::String => DataType::Utf8,
        };
        fields.push(Field::new(&o.name, t, true));
    }
    fields.extend([
        Field::new("label", DataType::Utf8, false),
        Field::new("window_closed_at", ts(), false),
        Field::new("source_topic", DataType::Utf8, false),
        Field::new("source_partition", DataType::Int32, false),
        Field::new("source_offset", DataType::Int64, false),
    ]);
    let metadata = [
        ("feedloop.dataset".to_owned(), spec.name.clone()),
        ("feedloop.label_spec_hash".to_owned(), spec.hash()),
    ];
    Arc::new(
        Schema::new(fields).with_metadata(
            metadata
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        ),
    )
}

/// Builds one record batch of `rows` under `spec`'s schema.
pub fn record_batch(
    spec: &LabelSpec,
    schema: &SchemaRef,
    rows: &[Example],
) -> Result<RecordBatch, DatasetError> {
    let n = rows.len();
    let utf8 = || StringBuilder::with_capacity(n, n * 16);
    let (mut example_id, mut event_id, mut match_id, mut viewer, mut candidate) =
        (utf8(), utf8(), utf8(), utf8(), utf8());
    let (mut request, mut model, mut exp, mut arm, mut features, mut label, mut topic) =
        (utf8(), utf8(), utf8(), utf8(), utf8(), utf8(), utf8());
    let mut version = Int32Builder::with_capacity(n);
    let mut rank = Int32Builder::with_capacity(n);
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut score = Float64Builder::with_capacity(n);
    let mut time = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut closed = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut outcomes: Vec<OutcomeColumn> = spec
        .outcomes
        .iter()
        .map(|o| OutcomeColumn::new(o.value_type, n))
        .collect();
    let mut uuid = Uuid::encode_buffer();
    let mut json = Vec::with_capacity(256);
    for r in rows {
        let i = &r.impression;
        example_id.append_value(r.example_id.hyphenated().encode_lower(&mut uuid));
        event_id.append_value(i.event_id.hyphenated().encode_lower(&mut uuid));
        match_id.append_value(i.match_id.hyphenated().encode_lower(&mut uuid));
        version.append_value(r.version);
        viewer.append_value(&i.viewer_id);
        candidate.append_value(&i.candidate_id);
        time.append_value(i.time_ms);
        request.append_value(&i.request_id);
        model.append_value(&i.model_version);
        exp.append_option(i.experiment_id.as_deref());
        arm.append_option(i.experiment_arm.as_deref());
        rank.append_value(i.rank);
        score.append_value(i.score);
        json.clear();
        serde_json::to_writer(&mut json, &i.features)?;
        features.append_value(std::str::from_utf8(&json).unwrap_or_default());
        for (col, (_, value)) in outcomes.iter_mut().zip(&r.labeled.values) {
            col.append(value);
        }
        label.append_value(r.labeled.label.as_str());
        closed.append_value(r.labeled.close_ms);
        topic.append_value(&i.source.topic);
        partition.append_value(i.source.partition);
        offset.append_value(i.source.offset);
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(example_id.finish()),
        Arc::new(version.finish()),
        Arc::new(event_id.finish()),
        Arc::new(match_id.finish()),
        Arc::new(viewer.finish()),
        Arc::new(candidate.finish()),
        Arc::new(time.finish()),
        Arc::new(request.finish()),
        Arc::new(model.finish()),
        Arc::new(exp.finish()),
        Arc::new(arm.finish()),
        Arc::new(rank.finish()),
        Arc::new(score.finish()),
        Arc::new(features.finish()),
    ];
    columns.extend(outcomes.iter_mut().map(OutcomeColumn::finish));
    columns.extend([
        Arc::new(label.finish()) as ArrayRef,
        Arc::new(closed.finish()),
        Arc::new(topic.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
    ]);
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

enum OutcomeColumn {
    Bool(BooleanBuilder),
    Long(Int64Builder),
    Double(Float64Builder),
    Text(StringBuilder),
}

impl OutcomeColumn {
    fn new(t: ValueType, n: usize) -> Self {
        match t {
            ValueType::Boolean => Self::Bool(BooleanBuilder::with_capacity(n)),
            ValueType::Long => Self::Long(Int64Builder::with_capacity(n)),
            ValueType::Double => Self::Double(Float64Builder::with_capacity(n)),
            ValueType::String => Self::Text(StringBuilder::with_capacity(n, n * 8)),
        }
    }

    fn append(&mut self, v: &Scalar) {
        match (self, v) {
            (Self::Bool(b), Scalar::Bool(x)) => b.append_value(*x),
            (Self::Long(b), Scalar::Long(x)) => b.append_value(*x),
            (Self::Long(b), Scalar::Double(x)) => b.append_value(x.round() as i64),
            (Self::Double(b), Scalar::Double(x)) => b.append_value(*x),
            (Self::Double(b), Scalar::Long(x)) => b.append_value(*x as f64),
            (Self::Text(b), Scalar::Text(x)) => b.append_value(x),
            (Self::Bool(b), _) => b.append_null(),
            (Self::Long(b), _) => b.append_null(),
            (Self::Double(b), _) => b.append_null(),
            (Self::Text(b), _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Bool(b) => Arc::new(b.finish()),
            Self::Long(b) => Arc::new(b.finish()),
            Self::Double(b) => Arc::new(b.finish()),
            Self::Text(b) => Arc::new(b.finish()),
        }
    }
}

/// Columns of random ids: a dictionary never pays for them (every value is new, so the
/// writer builds one only to throw it away at the page limit), nor do min/max statistics.
const ID_COLUMNS: [&str; 3] = ["example_id", "impression_event_id", "match_id"];

/// Encodes `batch` as one Parquet file (zstd).
pub fn parquet_bytes(batch: &RecordBatch) -> Result<Vec<u8>, DatasetError> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(256 * 1024));
    for column in ID_COLUMNS {
        let path = ColumnPath::from(column);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    let props = props.build();
    let mut out = Vec::with_capacity(batch.num_rows() * 64);
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(out)
}

/// The Parquet files of several partitions' rows (`record_batch`, then `parquet_bytes`), in
/// the order given, encoded on as many threads as there are cores and files.
pub fn parquet_files(
    spec: &LabelSpec,
    schema: &SchemaRef,
    parts: &[&[Example]],
) -> Result<Vec<Vec<u8>>, DatasetError> {
    let one = |rows: &[Example]| parquet_bytes(&record_batch(spec, schema, rows)?);
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(parts.len());
    if threads <= 1 {
        return parts.iter().map(|rows| one(rows)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, Result<Vec<u8>, DatasetError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(rows) = parts.get(i) else { break };
                        mine.push((i, one(rows)));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    if done.len() != parts.len() {
        return Err(DatasetError::Encoding(
            "a Parquet encoding thread panicked".into(),
        ));
    }
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// Object URI.
    pub uri: String,
    pub row_count: i64,
    pub byte_size: i64,
    pub sha256: String,
}

/// A half-open offset range of a source topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRange {
    pub topic: String,
    pub partition: i32,
    pub start_offset: i64,
    pub end_offset: i64,
}

/// A dataset partition version: the JSON manifest next to the files, the row in
/// `labeler.partitions`, and (Avro `DatasetPartition`) the announcement on
/// `feedloop.datasets.partitions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub dataset: String,
    pub partition: String,
    pub version: i32,
    pub manifest_uri: String,
    pub files: Vec<DataFile>,
    pub schema_id: i32,
    pub row_count: i64,
    pub byte_size: i64,
    pub event_time_min: i64,
    pub event_time_max: i64,
    pub sources: Vec<SourceRange>,
    pub label_spec_hash: String,
    /// Labels of the latest version of each example in the partition.
    pub label_counts: BTreeMap<String, i64>,
    /// Examples in the partition (rows count every version of each).
    #[serde(default)]
    pub examples: i64,
    #[serde(default)]
    pub late_data: LateData,
    pub erasure_epoch: i64,
    pub supersedes_version: Option<i32>,
    pub committed_at: i64,
}

/// Late data behind a partition version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateData {
    /// Rows written to this partition as corrections (version 2 and later), over all its
    /// versions.
    pub correction_rows: i64,
    /// Rows written to this partition for impressions read after their example's close.
    pub late_impression_rows: i64,
    /// The dataset's late outcomes when this version was committed, by reason (`corrected`,
    /// `unchanged`, `beyond_horizon`, `dropped`; see `feedloop_labeler_late_outcomes_total`).
    pub dataset_late_outcomes: BTreeMap<String, i64>,
}

/// Where datasets live: a URL (`file:///abs/path`, `s3://bucket/prefix`) or a filesystem path
/// (absolute, or relative to the working directory), and the object store behind it.
#[derive(Debug, Clone)]
pub struct Root {
    pub store: Arc<dyn ObjectStore>,
    /// The root's path inside the store.
    pub prefix: Path,
    /// The root's URI in manifests: for a directory, the `file://` URL of its canonical path.
    pub uri: String,
    /// A directory root's spellings (canonical, and absolute as configured): a file URI under
    /// any of them is under the root, however a manifest (an earlier version's, another
    /// service's) spelled it.
    dirs: Vec<std::path::PathBuf>,
}

impl Root {
    /// Opens `uri`; S3 options (`aws_endpoint`, `aws_access_key_id`, `aws_allow_http`, …) come
    /// from `options` and the `AWS_*` environment.
    pub fn open(uri: &str, options: &BTreeMap<String, String>) -> Result<Self, DatasetError> {
        let root_err = |message: String| DatasetError::Root {
            uri: uri.to_owned(),
            message,
        };
        let given = if uri.contains("://") {
            url::Url::parse(uri).map_err(|e| root_err(e.to_string()))?
        } else {
            let dir = std::path::absolute(uri).map_err(|e| root_err(e.to_string()))?;
            url::Url::from_directory_path(&dir)
                .map_err(|()| root_err("not a usable directory path".into()))?
        };
        let (url, dirs) = if given.scheme() == "file" {
            // A directory: created, then named by its canonical path (no `..`, which object
            // stores refuse; symlinks resolved), so that every spelling of it gives one URI.
            let dir = given
                .to_file_path()
                .map_err(|()| root_err("not an absolute file path".into()))?;
            std::fs::create_dir_all(&dir).map_err(|e| root_err(e.to_string()))?;
            let canonical = std::fs::canonicalize(&dir).map_err(|e| root_err(e.to_string()))?;
            let url = url::Url::from_directory_path(&canonical)
                .map_err(|()| root_err("not a usable directory path".into()))?;
            let mut dirs = vec![canonical];
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
            (url, dirs)
        } else {
            (given, Vec::new())
        };
        let mut opts: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        opts.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (store, prefix) =
            object_store::parse_url_opts(&url, opts).map_err(|e| root_err(e.to_string()))?;
        Ok(Self {
            store: Arc::from(store),
            prefix,
            uri: url.as_str().trim_end_matches('/').to_owned(),
            dirs,
        })
    }

    /// Path of `rel` (`dataset/dt=…/…`) in the store.
    pub fn path(&self, rel: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    /// URI of `rel` for manifests.
    pub fn uri_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.uri)
    }

    /// `rel` of a URI under this root: one it produced, or, for a directory, a `file://` URI of
    /// a file under any spelling of it (escaped or not, through a symlink or not).
    pub fn rel_of(&self, uri: &str) -> Option<String> {
        if let Some(rel) = uri
            .strip_prefix(&self.uri)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|r| !r.is_empty())
        {
            return Some(rel.to_owned());
        }
        let path = url::Url::parse(uri).ok()?.to_file_path().ok()?;
        self.dirs.iter().find_map(|dir| {
            let rel = path.strip_prefix(dir).ok()?;
            let parts: Option<Vec<&str>> = rel
                .components()
                .map(|c| match c {
                    std::path::Component::Normal(part) => part.to_str(),
                    _ => None,
                })
                .collect();
            parts.filter(|p| !p.is_empty()).map(|p| p.join("/"))
        })
    }

    /// [`Self::rel_of`], or an error naming a file a manifest lists outside this root (a root
    /// configured differently from the one that wrote the manifest): never guessed at, since
    /// what is not under the root would be read, rewritten or deleted as if it were.
    pub fn rel_of_listed(&self, uri: &str) -> Result<String, DatasetError> {
        self.rel_of(uri).ok_or_else(|| DatasetError::Outside {
            uri: uri.to_owned(),
            root: self.uri.clone(),
        })
    }

    pub async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), DatasetError> {
        self.store
            .put(&self.path(rel), PutPayload::from(Bytes::from(bytes)))
            .await?;
        Ok(())
    }

    pub async fn get(&self, rel: &str) -> Result<Bytes, DatasetError> {
        Ok(self.store.get(&self.path(rel)).await?.bytes().await?)
    }

    pub async fn delete(&self, rel: &str) -> Result<(), DatasetError> {
        match self.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object under `rel`, as paths relative to the root.
    pub async fn list(&self, rel: &str) -> Result<Vec<String>, DatasetError> {
        use futures_util::TryStreamExt;
        let base = self.path(rel);
        let objects: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&base)).try_collect().await?;
        let prefix = self.prefix.as_ref();
        Ok(objects
            .into_iter()
            .map(|o| {
                let full = o.location.as_ref().to_owned();
                full.strip_prefix(prefix)
                    .map(|s| s.trim_start_matches('/').to_owned())
                    .unwrap_or(full)
            })
            .collect())
    }
}

/// Relative path of a new data file in `partition` of `dataset`.
pub fn data_file_rel(dataset: &str, partition: &str) -> String {
    format!("{dataset}/{partition}/part-{}.parquet", Uuid::now_v7())
}

/// Relative path of a partition version's manifest.
pub fn manifest_rel(dataset: &str, partition: &str, version: i32) -> String {
    format!("{dataset}/{partition}/_manifest.v{version:06}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files encoded side by side are the files encoded one after another, in the order given.
    #[test]
    fn partitions_encoded_in_parallel_are_the_files_encoded_one_by_one() {
        use crate::{
            spec::EXAMPLE_SPEC,
            window::{Compiled, SourceRef},
        };
        let spec = Compiled::new(LabelSpec::parse("example", EXAMPLE_SPEC).expect("spec"));
        let schema = arrow_schema(&spec.spec);
        let example = |n: u128| {
            let impression = Impression {
                event_id: Uuid::from_u128(n),
                match_id: Uuid::from_u128(n / 2),
                viewer_id: format!("u{}", n % 7),
                candidate_id: format!("u{}", n % 5),
                time_ms: 1_795_888_800_000 + n as i64 * 1000,
                request_id: "r".into(),
                model_version: "m1".into(),
                experiment_id: None,
                experiment_arm: Some("b".into()),
                rank: 1,
                score: 0.5,
                features: BTreeMap::new(),
                source: SourceRef {
                    topic: "events".into(),
                    partition: 0,
                    offset: n as i64,
                },
            };
            let labeled = spec.label(&impression, &[]);
            Example {
                example_id: Uuid::from_u128(n + 1000),
                version: 1,
                impression,
                labeled,
                revision: Revision::First,
            }
        };
        let parts: Vec<Vec<Example>> = [3u128, 50, 1, 17, 8]
            .iter()
            .enumerate()
            .map(|(p, n)| (0..*n).map(|i| example(p as u128 * 100 + i)).collect())
            .collect();
        let slices: Vec<&[Example]> = parts.iter().map(Vec::as_slice).collect();
        let together = parquet_files(&spec.spec, &schema, &slices).expect("encoded");
        let one_by_one: Vec<Vec<u8>> = parts
            .iter()
            .map(|rows| parquet_bytes(&record_batch(&spec.spec, &schema, rows).expect("batch")))
            .collect::<Result<_, _>>()
            .expect("encoded");
        assert_eq!(together.len(), 5);
        assert!(together == one_by_one, "the files differ");
        assert!(
            parquet_files(&spec.spec, &schema, &[])
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn hive_partitions_are_utc_hours() {
        assert_eq!(hive_partition(0), "dt=1970-01-01/hour=00");
        // 2026-11-28T17:59:59.999Z
        assert_eq!(hive_partition(1_795_888_799_999), "dt=2026-11-28/hour=17");
        assert_eq!(hive_partition(1_795_888_800_000), "dt=2026-11-28/hour=18");
        assert_eq!(hive_partition(951_782_400_000), "dt=2000-02-29/hour=00");
        assert_eq!(hive_partition(-1), "dt=1969-12-31/hour=23");
    }

    /// A relative root, a plain absolute path and a file:// URL of the same directory open the
    /// same root, named by one absolute URI; a relative path is resolved against the working
    /// directory, and names with spaces are escaped as URLs escape them.
    #[tokio::test]
    async fn every_spelling_of_a_directory_opens_one_absolute_root() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("my datasets");
        let cwd = std::env::current_dir().expect("cwd");
        let up = "../".repeat(cwd.components().count().saturating_sub(1));
        let relative = format!("{up}{}", dir.display().to_string().trim_start_matches('/'));
        assert!(!relative.starts_with('/'));
        let options = BTreeMap::new();
        let opened = [
            Root::open(&relative, &options).expect("relative"),
            Root::open(&dir.display().to_string(), &options).expect("absolute"),
            Root::open(&format!("{relative}/"), &options).expect("trailing slash"),
        ];
        let canonical = std::fs::canonicalize(&dir).expect("the root's directory was created");
        let want = format!("file://{}", canonical.display()).replace(' ', "%20");
        for root in &opened {
            assert_eq!(root.uri, want);
        }
        let by_url = Root::open(&want, &options).expect("file URL");
        assert_eq!(by_url.uri, want);
        opened[0].put("d/x.txt", b"x".to_vec()).await.expect("put");
        assert_eq!(&by_url.get("d/x.txt").await.expect("get")[..], b"x");
        assert!(canonical.join("d/x.txt").is_file());
        assert_eq!(
            by_url.rel_of(&opened[1].uri_of("d/x.txt")).as_deref(),
            Some("d/x.txt")
        );
        // Manifests of earlier versions spelled the root unescaped, as configured.
        let legacy = format!("file://{}/d/x.txt", dir.display());
        assert_eq!(by_url.rel_of(&legacy).as_deref(), Some("d/x.txt"));
        assert_eq!(opened[0].rel_of_listed(&legacy).expect("under"), "d/x.txt");
        // A symlink to the root is the root.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        let through = Root::open(&link.display().to_string(), &options).expect("through a link");
        assert_eq!(through.uri, want);
        let via_link = format!("file://{}/d/x.txt", link.display());
        assert_eq!(through.rel_of(&via_link).as_deref(), Some("d/x.txt"));
        // Outside the root: none, and an error where a manifest lists it.
        let outside = format!("file://{}/x.txt", tmp.path().display());
        assert_eq!(by_url.rel_of(&outside), None);
        assert!(matches!(
            by_url.rel_of_listed(&outside),
            Err(DatasetError::Outside { .. })
        ));
        assert_eq!(
            by_url.rel_of(&format!("{want}/")),
            None,
            "the root itself is no file"
        );
        assert!(Root::open("bad://", &options).is_err());
    }
}
