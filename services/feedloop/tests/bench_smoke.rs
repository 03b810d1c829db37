//! Every `feedloop bench` scenario runs end to end at a tiny size, so that the harness keeps
//! working: the report exists and holds numbers for feedloop and its peer or limit. No timing
//! is asserted (debug build, shared CI machine); the figures come from release runs
//! (docs/benchmarks.md).

use std::{path::Path, process::Command};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_feedloop");

fn bench(args: &[&str], out: &Path) -> Value {
    let output = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("feedloop bench runs");
    assert!(
        output.status.success(),
        "feedloop bench {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(out).expect("report written")).expect("JSON report")
}

/// A row's median for feedloop and, when it has one, for its peer: both positive numbers.
fn assert_measured(row: &Value, with_peer: bool) {
    let ours = row["feedloop"]["median"].as_f64().unwrap_or(-1.0);
    assert!(ours > 0.0, "no feedloop figure: {row}");
    if with_peer {
        let peer = row["peer"]["median"].as_f64().unwrap_or(-1.0);
        assert!(peer > 0.0, "no peer figure: {row}");
        assert!(row["ratio"].as_f64().is_some(), "no ratio: {row}");
    }
}

#[test]
fn bench_cdc_reports_changes_per_second_against_pg_recvlogical() {
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("cdc.json");
    let report = bench(
        &[
            "cdc",
            "--rows",
            "2000",
            "--repetitions",
            "1",
            "--rates",
            "200",
            "--lag-seconds",
            "1",
        ],
        &out,
    );
    assert!(report["machine"]["cores"].as_u64() > Some(0), "{report}");
    assert_measured(&report["rows"][0], true);
    assert!(
        report["lag"][0]["p99_ms"].as_f64().is_some(),
        "no lag step: {report}"
    );
}

#[test]
fn bench_eraser_reports_erase_time_against_duckdb() {
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("eraser.json");
    let report = bench(
        &[
            "eraser",
            "--rows",
            "20000",
            "--hours",
            "4",
            "--repetitions",
            "1",
        ],
        &out,
    );
    assert_measured(&report["measurements"][0], true);
}

#[test]
fn bench_labeler_reports_events_per_second_against_duckdb() {
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("labeler.json");
    let report = bench(
        &[
            "labeler",
            "--events",
            "3000",
            "--repetitions",
            "1",
            "--parquet-rows",
            "20000",
            "--stores",
            "local",
        ],
        &out,
    );
    let rows = report["rows"].as_array().expect("rows");
    assert!(rows.len() >= 2, "{report}");
    assert_measured(&rows[0], true);
}

#[test]
fn bench_collector_reports_events_per_second_against_a_bare_producer() {
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("collector.json");
    let report = bench(
        &[
            "collector",
            "--step-seconds",
            "1",
            "--repetitions",
            "1",
            "--no-peer",
        ],
        &out,
    );
    let rows = report["rows"].as_array().expect("rows");
    assert!(!rows.is_empty(), "{report}");
    assert_measured(&rows[0], true);
    let null_sink = rows
        .iter()
        .find(|r| {
            r["measurement"]
                .as_str()
                .is_some_and(|m| m.contains("null sink"))
        })
        .unwrap_or_else(|| panic!("no null-sink row: {report}"));
    assert_measured(null_sink, true);
}

#[test]
fn bench_codec_reports_events_per_second_against_serde_json() {
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("codec.json");
    let report = bench(&["codec", "--repetitions", "1", "--seconds", "0.2"], &out);
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{report}");
    for row in rows {
        assert_measured(row, true);
    }
    assert_eq!(report["batch_events"], 50);
}
