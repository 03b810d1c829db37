//! The feedloop binary, end to end: `dev up` / `dev down` and `schemas check`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_feedloop");

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?}");
}

const V1: &str = r#"{"type":"record","name":"Thing","namespace":"t","fields":[
  {"name":"id","type":"string","doc":"id"},
  {"name":"size","type":"int","doc":"size"}]}"#;

fn repo_with(first: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("schemas/things")).expect("mkdir");
    git(dir.path(), &["init", "-q"]);
    std::fs::write(dir.path().join("schemas/things/thing.avsc"), first).expect("write");
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-qm", "v1"]);
    dir
}

fn check(repo: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["schemas", "check", "--repo"])
        .arg(repo)
        .args(extra)
        .output()
        .expect("feedloop runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn schemas_check_fails_on_a_breaking_change_with_a_reason() {
    let repo = repo_with(V1);
    // Uncommitted breaking change: a new field without a default (breaks BACKWARD, so FULL).
    let breaking = V1.replace(
        r#"{"name":"size","type":"int","doc":"size"}"#,
        r#"{"name":"size","type":"int","doc":"size"},{"name":"color","type":"string"}"#,
    );
    std::fs::write(repo.path().join("schemas/things/thing.avsc"), &breaking).expect("write");
    let (ok, text) = check(repo.path(), &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("BREAKING   t.Thing"), "{text}");
    assert!(
        text.contains("READER_FIELD_MISSING_DEFAULT_VALUE"),
        "{text}"
    );
    assert!(text.contains("'color'"), "{text}");
    // Under FORWARD the same change is fine.
    let (ok, text) = check(repo.path(), &["--compatibility", "FORWARD"]);
    assert!(ok, "{text}");

    // Once committed, the check compares HEAD with the previous commit: still breaking.
    git(repo.path(), &["commit", "-qam", "v2"]);
    let (ok, text) = check(repo.path(), &[]);
    assert!(!ok, "{text}");
}

#[test]
fn schemas_check_accepts_compatible_changes_and_new_files() {
    let repo = repo_with(V1);
    let compatible = V1.replace(
        r#"{"name":"size","type":"int","doc":"size"}"#,
        r#"{"name":"size","type":"int","doc":"size"},{"name":"color","type":"string","default":"red","doc":"c"}"#,
    );
    std::fs::write(repo.path().join("schemas/things/thing.avsc"), compatible).expect("write");
    std::fs::write(
        repo.path().join("schemas/things/other.avsc"),
        r#"{"type":"enum","name":"Other","namespace":"t","symbols":["A"]}"#,
    )
    .expect("write");
    let (ok, text) = check(repo.path(), &[]);
    assert!(ok, "{text}");
    assert!(text.contains("ok         t.Thing"), "{text}");
    assert!(text.contains("new        t.Other"), "{text}");
}

#[test]
fn schemas_check_passes_on_this_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (ok, text) = check(&root, &[]);
    assert!(ok, "{text}");
}

/// Kills the stack if the test fails before `dev down`.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn dev_up_writes_correct_endpoints_and_dev_down_stops_it() {
    // As the README runs it: a relative --dir, resolved against the working directory.
    let cwd = tempfile::tempdir().expect("tempdir");
    let dir = cwd.path().join(".feedloop");
    let child = Command::new(BIN)
        .current_dir(cwd.path())
        .args(["dev", "up", "--dir", ".feedloop"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dev up starts");
    let mut up = Up(child);
    let endpoints_path = dir.join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !endpoints_path.exists() {
        assert!(
            up.0.try_wait().expect("wait").is_none(),
            "dev up exited before writing endpoints"
        );
        assert!(Instant::now() < deadline, "no endpoints.json after 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let endpoints: Value =
        serde_json::from_slice(&std::fs::read(&endpoints_path).expect("read")).expect("json");

    // Postgres answers and has the control-plane schema.
    let url = endpoints["postgres_url"].as_str().expect("postgres_url");
    let pool = sqlx::PgPool::connect(url)
        .await
        .expect("postgres reachable");
    let wal: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(wal, "logical");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'registry'",
    )
    .fetch_one(&pool)
    .await
    .expect("query");
    assert!(tables >= 3, "registry tables migrated");
    pool.close().await;

    // The broker has the catalogue topics.
    let bootstrap = endpoints["kafka_bootstrap"]
        .as_str()
        .expect("kafka_bootstrap");
    let topics = feedloop_core_topics(bootstrap).await;
    for t in feedloop_core::catalogue::TOPICS {
        assert!(
            topics.contains(&t.name.to_owned()),
            "{} missing from {topics:?}",
            t.name
        );
    }

    // The registry serves the catalogue with the advertised credentials, and refuses others.
    let registry = endpoints["registry_url"].as_str().expect("registry_url");
    let user = endpoints["registry_user"].as_str().expect("user");
    let password = endpoints["registry_password"].as_str().expect("password");
    let http = reqwest::Client::new();
    let subjects: Vec<String> = http
        .get(format!("{registry}/subjects"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("registry reachable")
        .json()
        .await
        .expect("json");
    assert!(
        subjects.contains(&"feedloop.events-io.feedloop.events.MatchImpression".to_owned()),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&"feedloop.deadletter-value".to_owned()),
        "{subjects:?}"
    );
    let anonymous = http
        .get(format!("{registry}/subjects"))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(
        endpoints["admin_token"]
            .as_str()
            .is_some_and(|t| t.len() >= 16)
    );

    // cdc streams the demo product database.
    let cdc = endpoints["cdc_url"].as_str().expect("cdc_url");
    assert!(
        endpoints["product_url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/product"))
    );
    let mut streaming = false;
    for _ in 0..300 {
        if http
            .get(format!("{cdc}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            streaming = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(streaming, "cdc streams the product database");

    // The labeler runs the example spec into DIR/datasets.
    let labeler = endpoints["labeler_url"].as_str().expect("labeler_url");
    let root = endpoints["datasets_root"].as_str().expect("datasets_root");
    assert!(Path::new(root).is_absolute(), "{root}");
    assert_eq!(
        std::fs::canonicalize(root).expect("datasets_root exists"),
        std::fs::canonicalize(dir.join("datasets")).expect("DIR/datasets exists"),
        "under --dir"
    );
    let mut running = false;
    for _ in 0..300 {
        if http
            .get(format!("{labeler}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "the labeler's pipelines run");

    // The trigger's pull API answers with the advertised token.
    let trigger = endpoints["trigger_url"].as_str().expect("trigger_url");
    let token = endpoints["admin_token"].as_str().expect("admin_token");
    let datasets = http
        .get(format!("{trigger}/v1/datasets"))
        .bearer_auth(token)
        .send()
        .await
        .expect("trigger answers");
    assert_eq!(datasets.status(), 200);
    let body: serde_json::Value = datasets.json().await.expect("json");
    assert!(body["datasets"].is_array(), "{body}");

    // `feedloop erase` reaches the eraser with the advertised token and waits for completion.
    let eraser = endpoints["eraser_url"].as_str().expect("eraser_url");
    let token = endpoints["admin_token"].as_str().expect("admin_token");
    let out = Command::new(BIN)
        .args([
            "erase",
            "--user",
            "dev-user-to-erase",
            "--wait",
            "--eraser",
            eraser,
            "--token",
            token,
        ])
        .output()
        .expect("feedloop erase runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": completed"), "{stdout}");
    let id = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("erasure request ")
                .and_then(|r| r.split_whitespace().next())
        })
        .expect("request id printed")
        .to_owned();
    let out = Command::new(BIN)
        .args(["erase", "status", &id, "--eraser", eraser, "--token", token])
        .output()
        .expect("feedloop erase status runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("suppression"));

    // The collector accepts events with the advertised write key, and only with it.
    let collector = endpoints["collector_url"].as_str().expect("collector_url");
    let write_key = endpoints["write_key"].as_str().expect("write_key");
    let event = serde_json::json!([{
        "event_id": uuid::Uuid::now_v7(), "event_type": "match_decision", "user_id": "dev-user",
        "timestamp": chrono_now(), "platform": "ios", "app_version": "1.0",
        "properties": {"match_id": uuid::Uuid::now_v7(), "decision": "accept"}
    }]);
    let mut accepted = false;
    for _ in 0..100 {
        let resp = http
            .post(format!("{collector}/v1/events"))
            .basic_auth(write_key, Some(""))
            .json(&event)
            .send()
            .await
            .expect("collector reachable");
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        let body: Value = resp.json().await.expect("json");
        if body["results"][0]["status"] == "accepted" {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the collector accepted the event");
    let refused = http
        .post(format!("{collector}/v1/events"))
        .basic_auth("not-the-key", Some(""))
        .json(&event)
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);

    // dev down stops it and cleans up.
    let down = Command::new(BIN)
        .current_dir(cwd.path())
        .args(["dev", "down", "--dir", ".feedloop"])
        .output()
        .expect("dev down runs");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let status = up.0.wait().expect("wait");
    assert!(status.success(), "dev up exits cleanly: {status}");
    assert!(!endpoints_path.exists(), "endpoints.json removed");
    use sqlx::Connection;
    assert!(
        sqlx::PgConnection::connect(url).await.is_err(),
        "postgres is stopped"
    );
    if std::env::var("KAFKA_BOOTSTRAP").map_or(true, |b| b.trim().is_empty()) {
        assert!(
            std::net::TcpStream::connect(bootstrap).is_err(),
            "the stack's own broker process is stopped"
        );
    }
}

async fn feedloop_core_topics(bootstrap: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("consumer");
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata")
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .collect()
    })
    .await
    .expect("join")
}

/// Epoch milliseconds now (the collector accepts them as timestamps).
fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
