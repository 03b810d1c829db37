//! `feedloop bench eraser`: the time to erase one user from a dataset of ~10M rows in hourly
//! partitions — what the eraser's datasets target does: the per-user index lookup, then a
//! rewrite of only the partitions that hold the user, each committed as a new manifest
//! version — against DuckDB rewriting every file of the dataset without the user.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};
use feedloop_core::model::FeatureValue;
use feedloop_labeler::{
    dataset::{self, DataFile, Example, Manifest, Revision, Root, data_file_rel, manifest_rel},
    erasure,
    spec::{EXAMPLE_SPEC, LabelSpec},
    window::{Compiled, Impression, Scalar, SourceRef},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use uuid::Uuid;

use super::{Machine, Row, Stat, machine, print_table};
use crate::dev::PgCluster;

#[derive(Debug, Clone)]
pub struct Options {
    pub rows: usize,
    pub hours: usize,
    pub repetitions: usize,
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    machine: Machine,
    rows: usize,
    partitions: usize,
    partitions_with_user: usize,
    measurements: Vec<Row>,
}

const T0: i64 = 1_795_132_800_000;
const HOUR: i64 = 3_600_000;
const DATASET: &str = "bench_erase";
/// Users of the pool; each partition holds most of them once or more.
const USERS: usize = 20_000;

/// Writes the dataset: `hours` partitions of `rows / hours` examples; the user `target(rep)`
/// appears in 3 partitions per repetition.
async fn build(
    root: &Root,
    control: &sqlx::PgPool,
    rows: usize,
    hours: usize,
    repetitions: usize,
) -> anyhow::Result<()> {
    let spec = LabelSpec::parse("example", EXAMPLE_SPEC)?;
    let compiled = Compiled::new(spec.clone());
    let schema = dataset::arrow_schema(&spec);
    let mut rng = StdRng::seed_from_u64(11);
    let per = rows / hours;
    let stride = hours / repetitions.max(1);
    for h in 0..hours {
        let mut examples = Vec::with_capacity(per);
        for i in 0..per {
            let mut viewer = format!("user-{}", rng.random_range(0..USERS));
            // Each repetition's user sits in 3 partitions, 5 rows each.
            let rep = h / stride;
            if rep < repetitions && h % stride < 3 && i < 5 {
                viewer = target(rep);
            }
            let impression = Impression {
                event_id: Uuid::new_v4(),
                match_id: Uuid::new_v4(),
                viewer_id: viewer,
                candidate_id: format!("user-{}", rng.random_range(0..USERS)),
                time_ms: T0 + h as i64 * HOUR + (i as i64 % HOUR),
                request_id: "r".into(),
                model_version: "m7".into(),
                experiment_id: None,
                experiment_arm: Some("a".into()),
                rank: 1,
                score: 0.5,
                features: BTreeMap::from([("x".to_owned(), Some(FeatureValue::Double(0.5)))]),
                source: SourceRef {
                    topic: "feedloop.events".into(),
                    partition: 0,
                    offset: (h * per + i) as i64,
                },
            };
            let mut labeled = compiled.label(&impression, &[]);
            labeled.values[0].1 = Scalar::Bool(rng.random_bool(0.5));
            examples.push(Example {
                example_id: compiled.example_id(&impression),
                version: 1,
                impression,
                labeled,
                revision: Revision::First,
            });
        }
        let partition = dataset::hive_partition(T0 + h as i64 * HOUR);
        let batch = dataset::record_batch(&spec, &schema, &examples)?;
        let bytes = dataset::parquet_bytes(&batch)?;
        let rel = data_file_rel(DATASET, &partition);
        let file = DataFile {
            uri: root.uri_of(&rel),
            row_count: per as i64,
            byte_size: bytes.len() as i64,
            sha256: dataset::sha256_hex(&bytes),
        };
        root.put(&rel, bytes).await?;
        let manifest = Manifest {
            dataset: DATASET.into(),
            partition: partition.clone(),
            version: 1,
            manifest_uri: root.uri_of(&manifest_rel(DATASET, &partition, 1)),
            row_count: file.row_count,
            byte_size: file.byte_size,
            files: vec![file],
            schema_id: 1,
            event_time_min: T0 + h as i64 * HOUR,
            event_time_max: T0 + (h as i64 + 1) * HOUR - 1,
            sources: Vec::new(),
            label_spec_hash: compiled.hash.clone(),
            label_counts: BTreeMap::new(),
            examples: per as i64,
            late_data: Default::default(),
            erasure_epoch: 0,
            supersedes_version: None,
            committed_at: 0,
        };
        root.put(
            &manifest_rel(DATASET, &partition, 1),
            serde_json::to_vec(&manifest)?,
        )
        .await?;
        sqlx::query(
            "INSERT INTO labeler.partitions (dataset, partition, version, manifest_uri, manifest, row_count, byte_size, erasure_epoch)
             VALUES ($1, $2, 1, $3, $4, $5, $6, 0)",
        )
        .bind(DATASET)
        .bind(&partition)
        .bind(&manifest.manifest_uri)
        .bind(serde_json::to_string(&manifest)?)
        .bind(manifest.row_count)
        .bind(manifest.byte_size)
        .execute(control)
        .await?;
        let users: Vec<String> = examples
            .iter()
            .flat_map(|e| {
                [
                    e.impression.viewer_id.clone(),
                    e.impression.candidate_id.clone(),
                ]
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let partitions = vec![partition.clone(); users.len()];
        sqlx::query(
            "INSERT INTO labeler.partition_users (dataset, user_id, partition)
             SELECT $1, u, p FROM UNNEST($2::text[], $3::text[]) AS t(u, p) ON CONFLICT DO NOTHING",
        )
        .bind(DATASET)
        .bind(&users)
        .bind(&partitions)
        .execute(control)
        .await?;
        if h % 24 == 23 {
            println!("  {} of {hours} partitions written", h + 1);
        }
    }
    Ok(())
}

fn target(rep: usize) -> String {
    format!("user-to-erase-{rep}")
}

const DUCKDB_SCRIPT: &str = r#"
import glob, json, os, sys, time, duckdb
base, out, user = sys.argv[1], sys.argv[2], sys.argv[3]
files = sorted(glob.glob(os.path.join(base, "dt=*", "hour=*", "*.parquet")))
con = duckdb.connect()
start = time.perf_counter()
for i, f in enumerate(files):
    con.execute(f"COPY (SELECT * FROM read_parquet('{f}') WHERE viewer_id <> ? AND candidate_id <> ?) TO '{out}/{i}.parquet' (FORMAT parquet, COMPRESSION zstd)", [user, user])
print(json.dumps({"seconds": time.perf_counter() - start, "files": len(files)}))
"#;

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    if opts.hours < 3 * opts.repetitions {
        bail!("--hours must be at least 3 × --repetitions");
    }
    println!("Starting Postgres…");
    let pg = PgCluster::start().await?;
    let control = feedloop_core::postgres::connect(&pg.url(), 4).await?;
    feedloop_core::postgres::migrate(&control).await?;
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-eraser");
    let _ = std::fs::remove_dir_all(&work);
    let root_dir = work.join("datasets");
    std::fs::create_dir_all(&root_dir)?;
    let root = Root::open(&root_dir.display().to_string(), &BTreeMap::new())?;
    println!(
        "Writing {} rows in {} hourly partitions…",
        opts.rows, opts.hours
    );
    build(&root, &control, opts.rows, opts.hours, opts.repetitions).await?;

    let mut ours = Vec::new();
    let mut touched = 0;
    for rep in 0..opts.repetitions {
        let user = [target(rep)];
        let started = Instant::now();
        let parts = erasure::partitions_with_users(&control, &user).await?;
        let request = uuid::Uuid::now_v7();
        let mut removed = 0;
        for (d, p) in &parts {
            removed += erasure::rewrite_partition(&control, &root, d, p, &user, request)
                .await?
                .rows_removed;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "  erase {}: {} partitions rewritten, {removed} rows removed in {secs:.2} s",
            user[0],
            parts.len()
        );
        if removed == 0 {
            bail!("the user to erase was not found");
        }
        touched = parts.len();
        ours.push(secs * 1000.0);
    }
    let python = {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-venv");
        super::ensure_venv(&venv, "import duckdb", &["duckdb"])?;
        venv.join("bin/python")
    };
    let mut peer = Vec::new();
    for rep in 0..opts.repetitions {
        let out_dir = work.join(format!("duckdb-{rep}"));
        std::fs::create_dir_all(&out_dir)?;
        let out = Command::new(&python)
            .args(["-c", DUCKDB_SCRIPT])
            .arg(root_dir.join(DATASET))
            .arg(&out_dir)
            .arg(target(rep))
            .output()?;
        if !out.status.success() {
            bail!("DuckDB failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let secs = v["seconds"].as_f64().context("DuckDB seconds")?;
        println!(
            "  DuckDB rewriting all {} files: {secs:.2} s",
            v["files"].as_u64().unwrap_or(0)
        );
        peer.push(secs * 1000.0);
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    let (ours, peer) = (Stat::of(ours), Stat::of(peer));
    let measurements = vec![
        Row {
            measurement: format!("erase one user from {} rows", opts.rows),
            unit: "ms".into(),
            ratio: Some(peer.median / ours.median.max(1e-9)),
            feedloop: ours,
            against: "DuckDB rewriting every file".into(),
            peer: Some(peer),
            goal: "< 10 000 ms; faster than DuckDB (ratio = DuckDB time / ours)".into(),
        },
        super::peak_rss_row("writing the dataset, then erasing"),
    ];
    print_table("feedloop bench eraser", &machine, &measurements);
    let report = Report {
        scenario: "eraser",
        machine,
        rows: opts.rows,
        partitions: opts.hours,
        partitions_with_user: touched,
        measurements,
    };
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&report)?)?;
    println!("Report written to {}", opts.out.display());
    Ok(())
}
