//! The next version of a Hive partition's manifest: the files, label counts, late-data
//! counts, event-time range and lineage of the versions before it plus one commit's rows. Pure:
//! the caller reads the previous version and writes the result.

use std::collections::BTreeMap;

use crate::{
    dataset::{DataFile, Example, Manifest, Revision, Root, SourceRange, manifest_rel},
    engine::LATE_IMPRESSIONS_KEY,
};

/// What [`next_manifest`] builds a version from.
pub struct NextManifest<'a> {
    pub previous: Option<&'a Manifest>,
    pub root: &'a Root,
    pub dataset: &'a str,
    pub partition: &'a str,
    pub file: DataFile,
    pub rows: &'a [Example],
    pub schema_id: u32,
    pub spec_hash: &'a str,
    pub epoch: i64,
    pub committed_at: i64,
    pub late_outcomes: &'a BTreeMap<String, i64>,
}

/// The partition's next version: the previous files plus the new one.
pub fn next_manifest(n: NextManifest<'_>) -> Manifest {
    let version = n.previous.map_or(1, |p| p.version + 1);
    let mut files = n.previous.map(|p| p.files.clone()).unwrap_or_default();
    files.push(n.file);
    // Labels of the latest versions: a correction moves its example from the label it
    // replaces to its own.
    let mut counts = n
        .previous
        .map(|p| p.label_counts.clone())
        .unwrap_or_default();
    let mut examples = n.previous.map_or(0, |p| p.examples);
    let mut late = n.previous.map(|p| p.late_data.clone()).unwrap_or_default();
    for r in n.rows {
        *counts
            .entry(r.labeled.label.as_str().to_owned())
            .or_insert(0) += 1;
        match r.revision {
            Revision::First => examples += 1,
            Revision::Late => {
                examples += 1;
                late.late_impression_rows += 1;
            }
            Revision::Correction { replaces } => {
                late.correction_rows += 1;
                if let Some(c) = replaces.and_then(|l| counts.get_mut(l.as_str())) {
                    *c -= 1;
                }
            }
        }
    }
    counts.retain(|_, c| *c > 0);
    late.dataset_late_outcomes = n.late_outcomes.clone();
    late.dataset_late_outcomes.remove(LATE_IMPRESSIONS_KEY);
    let times = n.rows.iter().map(|r| r.impression.time_ms);
    let (mut lo, mut hi) = n.previous.map_or((i64::MAX, i64::MIN), |p| {
        (p.event_time_min, p.event_time_max)
    });
    for t in times {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    // Lineage: the offset ranges of every impression and joined outcome behind the rows.
    let mut sources: BTreeMap<(String, i32), (i64, i64)> = BTreeMap::new();
    let mut add = |topic: &str, partition: i32, start: i64, end: i64| {
        let e = sources
            .entry((topic.to_owned(), partition))
            .or_insert((start, end));
        e.0 = e.0.min(start);
        e.1 = e.1.max(end);
    };
    for s in n.previous.map(|p| p.sources.as_slice()).unwrap_or_default() {
        add(&s.topic, s.partition, s.start_offset, s.end_offset);
    }
    for r in n.rows {
        let src = &r.impression.source;
        add(&src.topic, src.partition, src.offset, src.offset + 1);
        for origin in &r.labeled.origins {
            let mut parts = origin.rsplitn(3, '/');
            let (Some(offset), Some(partition), Some(topic)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let (Ok(o), Ok(p)) = (offset.parse::<i64>(), partition.parse::<i32>()) {
                add(topic, p, o, o + 1);
            }
        }
    }
    let rel = manifest_rel(n.dataset, n.partition, version);
    Manifest {
        dataset: n.dataset.to_owned(),
        partition: n.partition.to_owned(),
        version,
        manifest_uri: n.root.uri_of(&rel),
        row_count: files.iter().map(|f| f.row_count).sum(),
        byte_size: files.iter().map(|f| f.byte_size).sum(),
        files,
        schema_id: i32::try_from(n.schema_id).unwrap_or(i32::MAX),
        event_time_min: lo,
        event_time_max: hi,
        sources: sources
            .into_iter()
            .map(
                |((topic, partition), (start_offset, end_offset))| SourceRange {
                    topic,
                    partition,
                    start_offset,
                    end_offset,
                },
            )
            .collect(),
        label_spec_hash: n.spec_hash.to_owned(),
        label_counts: counts,
        examples,
        late_data: late,
        erasure_epoch: n.epoch,
        supersedes_version: n.previous.map(|p| p.version),
        committed_at: n.committed_at,
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::{
        dataset::LateData,
        spec::Label,
        window::{Impression, Labeled, SourceRef},
    };

    const T: i64 = 1_795_888_800_000;

    fn row(n: u128, label: Label, revision: Revision, origins: &[&str]) -> Example {
        Example {
            example_id: Uuid::from_u128(n),
            version: match revision {
                Revision::Correction { .. } => 2,
                _ => 1,
            },
            impression: Impression {
                event_id: Uuid::from_u128(1000 + n),
                match_id: Uuid::from_u128(2000 + n),
                viewer_id: "a".into(),
                candidate_id: "b".into(),
                time_ms: T + n as i64,
                request_id: "r".into(),
                model_version: "m".into(),
                experiment_id: None,
                experiment_arm: None,
                rank: 1,
                score: 0.5,
                features: BTreeMap::new(),
                source: SourceRef {
                    topic: "events".into(),
                    partition: 1,
                    offset: 100 + n as i64,
                },
            },
            labeled: Labeled {
                values: Vec::new(),
                label,
                close_ms: T + 60_000,
                origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            },
            revision,
        }
    }

    fn file(name: &str, rows: i64) -> DataFile {
        DataFile {
            uri: format!("file:///d/{name}"),
            row_count: rows,
            byte_size: rows * 10,
            sha256: name.into(),
        }
    }

    fn next(
        root: &Root,
        previous: Option<&Manifest>,
        rows: &[Example],
        f: DataFile,
        late: &BTreeMap<String, i64>,
    ) -> Manifest {
        next_manifest(NextManifest {
            previous,
            root,
            dataset: "ds",
            partition: "dt=2026-11-28/hour=18",
            file: f,
            rows,
            schema_id: 7,
            spec_hash: "h",
            epoch: 0,
            committed_at: 5,
            late_outcomes: late,
        })
    }

    /// Versions count up and keep every earlier file; a correction moves its example from the
    /// label it replaces to its own without adding an example; late rows and corrections are
    /// counted; the event-time range and the lineage cover every version's rows and the
    /// outcomes they joined (origins that do not parse are left out).
    #[test]
    fn versions_accumulate_files_counts_and_lineage() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = Root::open(&tmp.path().display().to_string(), &BTreeMap::new()).expect("root");
        let late = BTreeMap::from([
            (LATE_IMPRESSIONS_KEY.to_owned(), 4),
            ("corrected".to_owned(), 1),
        ]);
        let first_rows = [
            row(1, Label::Negative, Revision::First, &["events/1/150"]),
            row(
                2,
                Label::Unknown,
                Revision::First,
                &["app.blocks/0/7", "junk"],
            ),
        ];
        let v1 = next(&root, None, &first_rows, file("one", 2), &late);
        assert_eq!(v1.version, 1);
        assert_eq!(v1.supersedes_version, None);
        assert_eq!(v1.row_count, 2);
        assert_eq!(v1.examples, 2);
        assert_eq!(
            v1.label_counts,
            BTreeMap::from([("negative".to_owned(), 1), ("unknown".to_owned(), 1)])
        );
        assert_eq!((v1.event_time_min, v1.event_time_max), (T + 1, T + 2));
        assert_eq!(
            v1.sources,
            vec![
                SourceRange {
                    topic: "app.blocks".into(),
                    partition: 0,
                    start_offset: 7,
                    end_offset: 8,
                },
                SourceRange {
                    topic: "events".into(),
                    partition: 1,
                    start_offset: 101,
                    end_offset: 151,
                },
            ]
        );
        assert_eq!(
            v1.manifest_uri,
            root.uri_of("ds/dt=2026-11-28/hour=18/_manifest.v000001.json")
        );
        assert_eq!(
            v1.late_data.dataset_late_outcomes,
            BTreeMap::from([("corrected".to_owned(), 1)]),
            "late impressions are counted per row, not as a late outcome"
        );

        let second_rows = [
            row(
                1,
                Label::Positive,
                Revision::Correction {
                    replaces: Some(Label::Negative),
                },
                &[],
            ),
            row(9, Label::Positive, Revision::Late, &[]),
        ];
        let v2 = next(&root, Some(&v1), &second_rows, file("two", 2), &late);
        assert_eq!(v2.version, 2);
        assert_eq!(v2.supersedes_version, Some(1));
        assert_eq!(v2.files.len(), 2);
        assert_eq!(v2.row_count, 4);
        assert_eq!(v2.byte_size, 40);
        assert_eq!(v2.examples, 3, "a correction is no new example");
        assert_eq!(
            v2.label_counts,
            BTreeMap::from([("positive".to_owned(), 2), ("unknown".to_owned(), 1)]),
            "the corrected example left negative, which is gone at zero"
        );
        assert_eq!(
            v2.late_data,
            LateData {
                correction_rows: 1,
                late_impression_rows: 1,
                dataset_late_outcomes: BTreeMap::from([("corrected".to_owned(), 1)]),
            }
        );
        assert_eq!((v2.event_time_min, v2.event_time_max), (T + 1, T + 9));
        assert_eq!(
            v2.sources.last().map(|s| (s.start_offset, s.end_offset)),
            Some((101, 151))
        );
    }
}
