//! `feedloop demo` at a small size, as a user runs it: the binary, its embedded broker and its
//! own throwaway Postgres. Its summary must reconcile; the dataset it writes, read back with
//! pyarrow, must hold its rows and none of the erased users; its log must hold none of the
//! simulated users' emails or phone numbers; and the same seed must give the same labels.

use std::{collections::BTreeSet, path::Path, process::Command};

use feedloop::demo::sim::{self, SimOptions};
use feedloop_integration_tests::{labeler::read_dataset, service::binary};
use serde_json::Value;

const USERS: usize = 200;
const EVENTS: usize = 6_000;
const SEED: u64 = 7;

/// Runs the demo in `cwd` with the relative `--out out` (as a user types it), and returns its
/// summary.
fn demo(cwd: &Path, out: &str) -> Value {
    let run = Command::new(binary("feedloop"))
        .current_dir(cwd)
        .args(["demo", "--quiet", "--stage-timeout", "120"])
        .args(["--users", &USERS.to_string()])
        .args(["--events", &EVENTS.to_string()])
        .args(["--seed", &SEED.to_string()])
        .args(["--out", out])
        .output()
        .expect("feedloop demo runs");
    let out = cwd.join(out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "feedloop demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("Reconciled"), "{stdout}");
    serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json"))
        .expect("summary.json is JSON")
}

#[test]
fn the_demo_reconciles_erases_and_is_reproducible() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = demo(dir.path(), "first");
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);

    // in = published + dead-lettered + suppressed + duplicates, and every stage agrees.
    assert_eq!(first["problems"], serde_json::json!([]), "{first:#}");
    let a = &first["answers"];
    assert_eq!(
        n(&first["events_sent"]),
        n(&a["accepted"]) + n(&a["rejected"]) + n(&a["suppressed"]) + n(&a["duplicates"])
    );
    assert!(n(&a["rejected"]) > 0 && n(&a["suppressed"]) > 0 && n(&a["duplicates"]) > 0);
    assert_eq!(first["collector"], first["answers"]);
    assert_eq!(n(&first["events_in_log"][0]), n(&a["accepted"]));
    assert_eq!(n(&first["cdc_changes"]), n(&first["rows_changed"]));
    assert!(!first["triggers"].as_array().expect("triggers").is_empty());

    // Erasures: the API's and the account deletion's, each with a certificate.
    let world = sim::generate(SimOptions {
        users: USERS,
        events: EVENTS,
        seed: SEED,
        t0: 0,
    });
    let erasures = first["erasures"].as_array().expect("erasures");
    // The users who asked, in one request; one per deleted account.
    assert_eq!(
        erasures.len(),
        usize::from(!world.erase.is_empty()) + world.deleted.len()
    );
    for e in erasures {
        assert_eq!(e["status"], "completed", "{e}");
        assert!(e["certificate_id"].is_string(), "{e}");
    }

    // The dataset as pyarrow reads it: every row the summary counted, no erased user.
    let root = dir.path().join("first/datasets");
    let dataset_path = Path::new(first["dataset_path"].as_str().expect("dataset_path"));
    assert!(dataset_path.is_absolute(), "{dataset_path:?}");
    assert_eq!(
        std::fs::canonicalize(dataset_path).expect("dataset_path exists"),
        std::fs::canonicalize(root.join("match_outcomes")).expect("the dataset exists"),
        "the summary names the dataset under --out"
    );
    let dataset = read_dataset(&root, "match_outcomes");
    let rows = dataset["rows"].as_array().expect("rows");
    assert_eq!(rows.len() as u64, n(&first["dataset"]["rows"]));
    assert_eq!(rows.len() as u64, n(&first["expected_examples"]));
    let erased: BTreeSet<&str> = world
        .erase
        .iter()
        .chain(&world.deleted)
        .map(String::as_str)
        .collect();
    for row in rows {
        for column in ["viewer_id", "candidate_id"] {
            let user = row[column].as_str().expect("user id");
            assert!(!erased.contains(user), "erased user in the dataset: {row}");
        }
    }
    // No file outside the current manifests, so a glob over the directory (as the summary's
    // duckdb line does) reads exactly the dataset.
    let listed: u64 = dataset["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| n(&p["files"]))
        .sum();
    let on_disk = walk(&root.join("match_outcomes"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .count() as u64;
    assert_eq!(on_disk, listed);

    // No personal data in the services' log.
    let log = std::fs::read_to_string(dir.path().join("first/demo.log")).expect("demo.log");
    assert!(log.len() > 1_000, "the log is nearly empty");
    for user in &world.users {
        assert!(!log.contains(&user.email), "an email is in the log");
        assert!(!log.contains(&user.phone), "a phone number is in the log");
    }

    // The same command again, into the same --out (the README's command run twice): it
    // replaces the earlier run, and the same seed gives the same labels.
    let second = demo(dir.path(), "first");
    assert_eq!(second["problems"], serde_json::json!([]), "{second:#}");
    assert_eq!(
        first["dataset"]["fingerprint"],
        second["dataset"]["fingerprint"]
    );
    assert_eq!(first["dataset"]["labels"], second["dataset"]["labels"]);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
