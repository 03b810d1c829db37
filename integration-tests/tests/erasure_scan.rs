//! Erasure leaves nothing readable (issue 20): a user seeded through every path feedloop takes
//! personal data in — events with a device id, a report comment, a malformed request that
//! dead-letters, a product row with email and phone, cdc changes, impressions that reach the
//! dataset and the labels topic — is erased through the API, another by deleting their
//! product row, and `feedloop erase verify` then finds nothing of either: every topic's raw
//! bytes (compacted ones as they stand once compacted), every dataset file, feedloop's tables,
//! the key store. A bystander seeded the same way is still found everywhere, so the scan is not
//! blind.
//!
//! Everything runs on a broker of its own that compacts every second (Kafka does within the
//! topics' max.compaction.lag.ms), so that no other test's eraser takes the product-DB
//! erasure from the shared request topic.

use std::time::Duration;

use feedloop_core::{config::Secret, kafka::KafkaConfig};
use feedloop_integration_tests::{
    TestCollector, cdc::TestCdc, events, fresh_database, labeler, test_kek,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "admin-token-for-the-erasure-scan";

/// Every personal value of `u` the test sends, each through its own path.
fn personal(u: &str) -> [String; 6] {
    [
        format!("{u}@mail.example"),
        format!("+44 7700 {:06}", u.len() * 7919),
        format!("Display name of {u}"),
        format!("dev-{u}"),
        format!("report comment written by {u}"),
        format!("reported-row comment by {u}"),
    ]
}

async fn wait_completed(http: &reqwest::Client, url: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let v: Value = http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        match v["status"].as_str() {
            Some("completed") => return v,
            Some("partially_failed") => panic!("the erasure failed: {v}"),
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the erasure did not complete: {v}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_user_leaves_nothing_readable_through_any_path() {
    let broker = feedloop::dev::BrokerProcess::start_compacting(1)
        .await
        .expect("broker");
    let bootstrap = broker.bootstrap();
    let kafka = KafkaConfig::new(bootstrap.clone());
    feedloop_core::kafka::ensure_topics(&kafka, feedloop_core::catalogue::TOPICS)
        .await
        .expect("topics");
    let control_url = fresh_database().await;

    // cdc on the product database, and a dataset's worth of events and product rows.
    let cdc = TestCdc::start_with(
        |_| async {},
        |c| {
            c.control.url = Secret::new(control_url.clone());
            c.kafka.bootstrap = bootstrap.clone();
        },
    )
    .await;
    let prefix = cdc.config.topics.prefix.clone();
    let scenario = labeler::scenario(41, 120);
    labeler::insert_rows(&cdc.source, &scenario).await;
    let events_topic = format!("{prefix}.events");
    labeler::publish_events_to(&kafka, &cdc.registry.client(), &events_topic, &scenario).await;
    let mut viewers: Vec<String> = scenario
        .impressions
        .iter()
        .map(|i| i.viewer.clone())
        .collect();
    viewers.dedup();
    let mut distinct = Vec::new();
    for v in viewers {
        if !distinct.contains(&v) {
            distinct.push(v);
        }
    }
    let [api_user, deleted_user, bystander] = [0, 1, 2].map(|i| distinct[i].clone());
    let people = [api_user.clone(), deleted_user.clone(), bystander.clone()];

    // Product rows with email, phone and name; a report row with a comment.
    for u in &people {
        let [email, phone, name, _, _, row_comment] = personal(u);
        sqlx::query(
            "INSERT INTO app.users (id, email, phone, display_name) VALUES ($1, $2, $3, $4)",
        )
        .bind(u)
        .bind(email)
        .bind(phone)
        .bind(name)
        .execute(&cdc.source)
        .await
        .expect("user row");
        sqlx::query(
            "INSERT INTO app.reports (reporter_id, reported_id, reason, comment)
             VALUES ($1, 'someone', 'spam', $2)",
        )
        .bind(u)
        .bind(row_comment)
        .execute(&cdc.source)
        .await
        .expect("report row");
    }

    // Through the collector: a report with a device id and a comment, and a malformed event
    // (a dead letter) carrying both.
    let collector = TestCollector::start(|c| {
        c.postgres.url = Secret::new(control_url.clone());
        c.kafka.bootstrap = bootstrap.clone();
    })
    .await;
    let report = |u: &str| {
        let mut e = events::chat_ended(u, uuid::Uuid::now_v7(), 1000);
        e["event_type"] = json!("report_submitted");
        e["properties"] = json!({"reported_user_id": "someone", "reason": "harassment", "comment": personal(u)[4]});
        e
    };
    let malformed = |u: &str| {
        let mut e = report(u);
        e["properties"]["reason"] = json!(42);
        e
    };
    let batch: Vec<Value> = people
        .iter()
        .flat_map(|u| [report(u), malformed(u)])
        .collect();
    let (status, answer) = collector.post_native(&json!(batch)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["rejected"], 3, "{answer}");

    // The labeler: impressions of all three reach the dataset and the labels topic.
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("es_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let mut lcfg = labeler::config(&cdc.registry, &spec, &events_topic, &prefix, &root).await;
    lcfg.kafka.bootstrap = bootstrap.clone();
    lcfg.control.url = Secret::new(control_url.clone());
    let control = PgPool::connect(&control_url).await.expect("control");
    labeler::label_until(&lcfg, &control, &dataset, scenario.impressions.len() as i64).await;
    let labels_topic = feedloop_core::catalogue::labels_topic(&dataset);

    // Everything has landed: the user rows on cdc's topic, the dead letters.
    let read = |topic: String| {
        let kafka = kafka.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                feedloop_core::kafka::read_to_end(&kafka, &topic, Duration::from_secs(60))
            })
            .await
            .expect("reader")
            .expect("read")
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read(format!("{prefix}.app.users")).await.len() < people.len()
        || read(format!("{prefix}.app.reports")).await.len() < people.len()
    {
        assert!(std::time::Instant::now() < deadline, "cdc did not publish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!read(labels_topic.clone()).await.is_empty());

    // The eraser.
    let mut ecfg = feedloop_eraser::Config::from_defaults().expect("defaults");
    ecfg.http.listen = "127.0.0.1:0".into();
    ecfg.auth.admin_token = Secret::new(TOKEN);
    ecfg.keys.kek = test_kek();
    ecfg.erasure.hash_key = Secret::new("hash-key-for-tests-0123456789");
    ecfg.erasure.poll_interval_ms = 100;
    ecfg.erasure.cdc_topic_prefix = prefix.clone();
    ecfg.erasure.requests_topic = cdc.config.users.erasure_requests_topic.clone();
    ecfg.datasets.root = root.display().to_string();
    ecfg.kafka.bootstrap = bootstrap.clone();
    ecfg.registry = lcfg.registry.clone();
    ecfg.control.url = Secret::new(control_url.clone());
    ecfg.log.json = false;
    ecfg.validate().expect("eraser config");
    let stop = CancellationToken::new();
    let eraser = feedloop_eraser::start(ecfg, stop.clone())
        .await
        .expect("eraser");
    let base = format!("http://{}/v1/erasure-requests", eraser.addr);
    let http = reqwest::Client::new();

    // One through the API; one by deleting their product row (cdc raises the request).
    let created: Value = http
        .post(&base)
        .bearer_auth(TOKEN)
        .json(&json!({"user_ids": [api_user], "reason": "asked", "requested_by": "privacy"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let api_request = created["id"].as_str().expect("id").to_owned();
    sqlx::query("DELETE FROM app.users WHERE id = $1")
        .bind(&deleted_user)
        .execute(&cdc.source)
        .await
        .expect("delete the product row");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let deleted_request = loop {
        let listed: Value = http
            .get(format!("{base}?user_id={deleted_user}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        if let Some(id) = listed["requests"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deleting the product row raised no erasure request: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // The inventory opens every sealed value of theirs still in the log: all six for the API
    // erasure; for the deleted row, compaction already left only its tombstone on cdc's topic,
    // so the report row's comment, the device id and the event's comment.
    for (who, id, least) in [
        (&api_user, &api_request, 6),
        (&deleted_user, &deleted_request, 3),
    ] {
        let done = wait_completed(&http, &format!("{base}/{id}")).await;
        let inventory = done["targets"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["target"] == "inventory"))
            .cloned()
            .unwrap_or_default();
        assert!(
            inventory["affected"].as_i64() >= Some(least),
            "{who}: the inventory found too few personal values to search for: {inventory}"
        );
        let certificate: Value = http
            .get(format!("{base}/{id}/certificate"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("certificate")
            .json()
            .await
            .expect("json");
        assert_eq!(
            certificate["verification"]["passed"], true,
            "{who}: {}",
            certificate["verification"]
        );
        assert!(
            certificate["remains"]
                .as_array()
                .is_some_and(|r| r.len() >= 2),
            "{certificate}"
        );
    }

    // `feedloop erase verify`, as an operator runs it later, with every value the test sent.
    for (who, id) in [(&api_user, &api_request), (&deleted_user, &deleted_request)] {
        let passed = feedloop::erase::verify(feedloop::erase::VerifyOptions {
            id: id.clone(),
            dev: None,
            control: Some(control_url.clone()),
            kafka: Some(bootstrap.clone()),
            datasets_root: Some(root.display().to_string()),
            kek: Some(test_kek().expose().to_owned()),
            values: personal(who).to_vec(),
        })
        .await
        .expect("verify runs");
        assert!(
            passed,
            "`feedloop erase verify {id}` found {who} (the table is above)"
        );
    }

    // The scan is not blind: the bystander, seeded the same way, is found.
    let keys = feedloop_integration_tests::test_key_store(control.clone());
    let places = feedloop_eraser::verify::Places {
        kafka: kafka.clone(),
        control: control.clone(),
        datasets: feedloop_labeler::dataset::Root::open(
            &root.display().to_string(),
            &Default::default(),
        )
        .expect("root"),
    };
    let checks = feedloop_eraser::verify::verify(
        &places,
        &keys,
        &feedloop_eraser::verify::Needles {
            users: vec![bystander.clone()],
            values: personal(&bystander)[..4].to_vec(),
        },
    )
    .await
    .expect("scan");
    let failing: Vec<&str> = checks
        .iter()
        .filter(|c| c.status == "fail")
        .map(|c| c.check.as_str())
        .collect();
    for place in ["datasets", "key store", "table labeler.partition_users"] {
        assert!(
            failing.contains(&place),
            "the scan does not see the bystander in {place}: {failing:?}"
        );
    }
    assert!(
        failing
            .iter()
            .any(|c| *c == format!("topic {labels_topic}")),
        "the scan does not see the bystander on the labels topic: {failing:?}"
    );

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), eraser.task).await;
    collector.stop().await;
    cdc.cleanup().await;
}
