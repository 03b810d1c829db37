//! The eraser killed with SIGKILL in the middle of a request, and restarted, completes it.

use std::time::{Duration, Instant};

use feedloop_integration_tests::{TestRegistry, fresh_database, infra, kafka, service::Service};
use serde_json::{Value, json};

const TOKEN: &str = "admin-token-for-tests-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn get(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eraser_killed_mid_request_completes_it_after_a_restart() {
    let registry = TestRegistry::start().await;
    let dir = tempfile::tempdir().expect("dir");
    // The tombstone topic does not exist yet: that target keeps retrying, which holds the
    // request in the middle while the eraser is killed.
    let topic = format!("later_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let port = free_port();
    let file = dir.path().join("eraser.toml");
    std::fs::write(
        &file,
        format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n[auth]\nadmin_token = \"{TOKEN}\"\n\
             [erasure]\nhash_key = \"hash-key-for-tests-0123456789\"\npoll_interval_ms = 100\nmax_attempts = 50\n\
             tombstone_topics = [\"{topic}\"]\n\
             [datasets]\nroot = \"{root}\"\n[kafka]\nbootstrap = \"{bootstrap}\"\n\
             [producer]\n\"message.timeout.ms\" = \"1000\"\n\
             [registry]\nurl = \"{registry}\"\nuser = \"{user}\"\npassword = \"{password}\"\n\
             [control]\nurl = \"{control}\"\n[keys]\nkek = \"{kek}\"\n[log]\njson = false\n",
            kek = feedloop_integration_tests::test_kek().expose(),
            root = dir.path().join("datasets").display(),
            bootstrap = infra().kafka_bootstrap,
            registry = registry.url,
            user = registry.user,
            password = registry.password,
            control = fresh_database().await,
        ),
    )
    .expect("config");
    let spawn = || Service::spawn("eraser", &file, dir.path());
    let base = format!("http://127.0.0.1:{port}/v1/erasure-requests");
    let http = reqwest::Client::new();
    let mut first = spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let created: Value = loop {
        if let Ok(r) = http
            .post(&base)
            .bearer_auth(TOKEN)
            .json(&json!({"user_ids": ["u-7"], "reason": "r", "requested_by": "t"}))
            .send()
            .await
            && let Ok(v) = r.json::<Value>().await
        {
            break v;
        }
        assert!(Instant::now() < deadline, "the eraser never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let url = format!("{base}/{}", created["id"].as_str().expect("id"));
    // Mid-request: the first targets are done, the tombstones target is retrying.
    loop {
        let s = get(&http, &url).await.unwrap_or_default();
        let attempts = s["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["target"] == "tombstones")
            .and_then(|t| t["attempts"].as_i64())
            .unwrap_or(0);
        if s["status"] == "running" && attempts >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never mid-request: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill();
    feedloop_core::kafka::create_missing(&kafka(), &[(topic.as_str(), 1, true)])
        .await
        .expect("topic");
    let _second = spawn();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = get(&http, &url).await.unwrap_or_default();
        if s["status"] == "completed" {
            assert!(
                s["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|t| t["status"] == "completed"),
                "{s}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not completed after the restart: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
