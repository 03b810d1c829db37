//! The README's quick start, word for word, from a fresh copy of the repository.
//!
//! Every ```` ```sh ```` block of README.md's quick-start section ("The two commands") is a
//! command a new user types. This test reads them
//! from the README itself, so that the README and the product cannot drift apart:
//! - `integration-tests/run` is the test command running this test; it is skipped;
//! - every other block must be one of the commands below, which the test runs exactly as
//!   written, from a copy of the repository's tracked files (no build output, no state from
//!   earlier runs) in `<target>/quickstart/repo`:
//!   - `… demo`: with a smaller `--users`/`--events` appended; it must exit 0, print the
//!     reconciled summary, and leave its summary and a dataset pyarrow reads in the default
//!     (relative) `--out`, named by absolute paths;
//!   - `… dev up --dir DIR`: it must write `DIR/endpoints.json`, and its collector must
//!     acknowledge an event into its own broker;
//!   - `… dev down --dir DIR`: it must stop that stack, which then exits 0.
//!
//! A README command the test does not know fails it. The copy builds into this repository's
//! target directory (`CARGO_TARGET_DIR`), so dependencies are compiled once per machine; the
//! commands themselves are not changed.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use feedloop_integration_tests::labeler::read_dataset;
use serde_json::Value;

const USERS: &str = "300";
const EVENTS: &str = "8000";

/// The repository this test belongs to.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests has a parent")
        .to_path_buf()
}

/// The section of README.md that holds the quick start.
const QUICK_START: &str = "## The two commands";

/// The commands of the ```` ```sh ```` blocks of README.md's quick-start section (from its
/// heading to the next `## ` heading), one per non-empty line, in order.
fn readme_commands(readme: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_section = false;
    // Inside a fenced block: whether it is a ```sh one.
    let mut fence: Option<bool> = None;
    for line in readme.lines() {
        let trimmed = line.trim();
        match fence {
            Some(_) if trimmed.starts_with("```") => fence = None,
            Some(true) if in_section && !trimmed.is_empty() && !trimmed.starts_with('#') => {
                commands.push(trimmed.to_owned());
            }
            Some(_) => {}
            None if trimmed.starts_with("```") => fence = Some(trimmed == "```sh"),
            None if line.starts_with("## ") => in_section = line.trim_end() == QUICK_START,
            None => {}
        }
    }
    commands
}

/// The target directory the copy builds into: this repository's (or `CARGO_TARGET_DIR`), so
/// that dependencies are compiled once per machine.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| repo().join("target"), PathBuf::from)
}

/// A copy of the repository's tracked files (as they are in the work tree, modification times
/// kept) in `<target>/quickstart/repo`, emptied first: nothing untracked, nothing an earlier
/// run left. Always the same path, so that cargo can reuse what it built for an unchanged
/// crate.
fn fresh_copy() -> PathBuf {
    let repo = repo();
    let out = Command::new("git")
        .current_dir(&repo)
        .args(["ls-files", "-z"])
        .output()
        .expect("git ls-files runs");
    assert!(out.status.success(), "git ls-files failed");
    let copy = target_dir().join("quickstart/repo");
    if copy.exists() {
        std::fs::remove_dir_all(&copy).expect("remove the previous copy");
    }
    for name in out.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).expect("file names are UTF-8");
        let from = repo.join(name);
        let Ok(meta) = std::fs::metadata(&from) else {
            continue; // deleted in the work tree, not yet committed
        };
        let to = copy.join(name);
        std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {name}: {e}"));
        if let Ok(modified) = meta.modified() {
            let file = std::fs::File::options()
                .write(true)
                .open(&to)
                .expect("open the copy");
            file.set_modified(modified)
                .expect("keep the modification time");
        }
    }
    copy
}

/// What a user's shell would have of this test's environment: the machine's toolchain, build
/// and proxy settings, but none of the variables cargo sets for a test (`CARGO_MANIFEST_DIR`,
/// …), nor the test command's own (`KAFKA_BOOTSTRAP`, `FEEDLOOP_*`, `RUST_LOG`, …).
const USER_ENVIRONMENT: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "CARGO_HOME",
    "RUSTUP_HOME",
    "RUSTUP_TOOLCHAIN",
    "RUSTFLAGS",
    "RUSTC_WRAPPER",
    "CC",
    "CXX",
    "AR",
    "PKG_CONFIG_PATH",
    "OPENSSL_DIR",
    "OPENSSL_LIB_DIR",
    "OPENSSL_INCLUDE_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "PG_BINDIR",
];

/// `command` run by the shell in `dir`, as a user's terminal runs it.
fn shell(dir: &Path, command: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.current_dir(dir)
        .arg("-c")
        .arg(format!("exec {command}"))
        .env_clear()
        .envs(
            USER_ENVIRONMENT
                .iter()
                .filter_map(|k| Some((*k, std::env::var_os(k)?))),
        )
        .env("CARGO_TARGET_DIR", target_dir());
    cmd
}

/// Kills a command still running when the test fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The value of `--dir` in a `dev up` / `dev down` command.
fn dir_of(command: &str) -> &str {
    let mut words = command.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--dir" {
            return words.next().expect("--dir has a value");
        }
    }
    panic!("{command}: no --dir")
}

fn run_demo(copy: &Path, command: &str) {
    let full = format!("{command} --users {USERS} --events {EVENTS}");
    let out = shell(copy, &full).output().expect("the demo command runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{full}` failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Reconciled"), "{stdout}");

    // The default --out is relative: everything lands in the copy, named absolutely.
    let out_dir = copy.join("feedloop-demo");
    let summary: Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("summary.json")).expect("feedloop-demo/summary.json"),
    )
    .expect("summary.json is JSON");
    assert_eq!(summary["problems"], serde_json::json!([]), "{summary:#}");
    let dataset_path = summary["dataset_path"].as_str().expect("dataset_path");
    assert!(Path::new(dataset_path).is_absolute(), "{dataset_path}");
    assert_eq!(
        std::fs::canonicalize(dataset_path).expect("dataset_path exists"),
        std::fs::canonicalize(out_dir.join("datasets/match_outcomes")).expect("the dataset"),
    );
    assert!(
        stdout.contains(dataset_path),
        "the summary prints the absolute dataset path: {stdout}"
    );
    let dataset = read_dataset(&out_dir.join("datasets"), "match_outcomes");
    let rows = dataset["rows"].as_array().expect("rows").len() as u64;
    assert!(rows > 0, "an empty dataset");
    assert_eq!(Some(rows), summary["dataset"]["rows"].as_u64());
}

/// Starts `dev up`, checks it serves, and returns it running.
fn run_dev_up(copy: &Path, command: &str) -> Running {
    let dir = copy.join(dir_of(command));
    let mut up = Running(
        shell(copy, command)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dev up starts"),
    );
    let endpoints_path = dir.join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !endpoints_path.exists() {
        assert!(
            up.0.try_wait().expect("wait").is_none(),
            "`{command}` exited before writing {}",
            endpoints_path.display()
        );
        assert!(Instant::now() < deadline, "no endpoints.json after 600 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let endpoints: Value =
        serde_json::from_slice(&std::fs::read(&endpoints_path).expect("endpoints.json"))
            .expect("endpoints.json is JSON");
    let root = endpoints["datasets_root"].as_str().expect("datasets_root");
    assert!(Path::new(root).is_absolute(), "{root}");
    assert_eq!(
        std::fs::canonicalize(root).expect("datasets_root exists"),
        std::fs::canonicalize(dir.join("datasets")).expect("DIR/datasets exists"),
    );
    let bootstrap = endpoints["kafka_bootstrap"].as_str().expect("bootstrap");
    let collector = endpoints["collector_url"].as_str().expect("collector_url");
    let write_key = endpoints["write_key"].as_str().expect("write_key");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A new event each time: one answered `spooled` (the collector starts in spool
            // mode until it has read the log back) is kept, and sending it again would be
            // answered `duplicate`.
            let event = serde_json::json!([{
                "event_id": uuid::Uuid::now_v7(), "event_type": "match_decision",
                "user_id": "quick-start-user", "timestamp": now_ms(), "platform": "ios",
                "app_version": "1.0",
                "properties": {"match_id": uuid::Uuid::now_v7(), "decision": "accept"}
            }]);
            let body: Value = http
                .post(format!("{collector}/v1/events"))
                .basic_auth(write_key, Some(""))
                .json(&event)
                .send()
                .await
                .expect("the collector answers")
                .json()
                .await
                .expect("JSON");
            if body["results"][0]["status"] == "accepted" && body["durability"] == "acked" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the collector did not acknowledge an event into {bootstrap}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    up
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn the_readme_quick_start_works_word_for_word_from_a_fresh_copy() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let commands = readme_commands(&readme);
    let copy = fresh_copy();
    let copy = copy.as_path();
    let mut ran = Vec::new();
    let mut stack: Option<(String, Running)> = None;
    for command in &commands {
        if command == "integration-tests/run" {
            continue; // the test command: what runs this test
        }
        let words: Vec<&str> = command.split_whitespace().collect();
        let args = words
            .iter()
            .position(|w| *w == "--")
            .map(|i| &words[i + 1..]);
        assert!(
            words.starts_with(&["cargo", "run", "--release", "-p", "feedloop", "--"]),
            "the quick-start test does not know how to check the README's `{command}`"
        );
        match args.unwrap_or_default() {
            ["demo"] => run_demo(copy, command),
            ["dev", "up", "--dir", _] => {
                assert!(stack.is_none(), "two `dev up` without a `dev down`");
                stack = Some((dir_of(command).to_owned(), run_dev_up(copy, command)));
            }
            ["dev", "down", "--dir", dir] => {
                let (up_dir, mut up) = stack.take().expect("`dev down` after a `dev up`");
                assert_eq!(*dir, up_dir, "`dev down` names the `dev up` directory");
                let out = shell(copy, command).output().expect("dev down runs");
                assert!(
                    out.status.success(),
                    "`{command}` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let status = up.0.wait().expect("dev up exits");
                assert!(status.success(), "dev up exited with {status}");
            }
            _ => panic!("the quick-start test does not know how to check the README's `{command}`"),
        }
        ran.push(command.clone());
    }
    assert!(stack.is_none(), "the README leaves a `dev up` running");
    for needed in ["demo", "dev up", "dev down"] {
        assert!(
            ran.iter().any(|c| c.contains(&format!("-- {needed}"))),
            "the README's quick start has no `{needed}` command: {ran:?}"
        );
    }
}

#[test]
fn readme_commands_are_the_lines_of_the_quick_starts_sh_blocks() {
    let text = "```sh\nbefore\n```\n## The two commands\nintro\n```sh\ncargo run -- demo\n\n\
                # a comment\n```\n```\n## not a heading\nnot sh\n```\n```sh\n  b c\n```\n\
                ## Layout\n```sh\ncurl after\n```\n";
    assert_eq!(readme_commands(text), ["cargo run -- demo", "b c"]);
}

#[test]
fn the_readme_has_a_quick_start() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let commands = readme_commands(&readme);
    assert!(commands.len() >= 3, "{commands:?}");
}
