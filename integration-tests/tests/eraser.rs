//! The eraser end to end: a dataset built by the labeler from events and cdc rows, personal
//! data sealed by the collector and cdc, then two users erased through the API: their rows
//! leave the dataset (read back with pyarrow), their join state goes, no record in any topic
//! still decrypts to their personal data, their new events are suppressed, tombstones are
//! written, and the certificate proves it without naming them. Everyone else's rows are
//! unchanged, and a bystander's personal data still decrypts.

use std::{collections::BTreeMap, time::Duration};

use feedloop_core::crypto::{KeyStore as _, Opened, SEALED_PREFIX, open};
use feedloop_core::{catalogue::EVENTS_TOPIC, config::Secret};
use feedloop_integration_tests::{
    TestCollector,
    cdc::TestCdc,
    events, fresh_database, infra, kafka,
    labeler::{self},
    log::read_all,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "admin-token-for-tests-0123456789";

fn rows_without(data: &Value, users: &[&str]) -> BTreeMap<String, Value> {
    data["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| {
            !users
                .iter()
                .any(|u| r["viewer_id"] == *u || r["candidate_id"] == *u)
        })
        .map(|r| {
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() {
                o.remove("_partition");
            }
            (r["example_id"].as_str().unwrap_or_default().to_owned(), r)
        })
        .collect()
}

async fn wait_status(http: &reqwest::Client, url: &str, want: &str) -> Value {
    // The verify target scans every topic of the broker, which the whole suite shares: late in
    // a full run, under its load, that alone has taken over 70 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let r: Value = http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        if r["status"] == want {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "request never became {want}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_two_users_removes_them_everywhere_with_a_certificate() {
    // One control database for every service, as in a deployment: the data keys the collector
    // and cdc seal with are the ones the eraser destroys.
    let control_url = fresh_database().await;
    // A dataset from events and cdc rows.
    let scenario = labeler::scenario(23, 500);
    let cdc = TestCdc::start_with(
        |_| async {},
        |c| c.control.url = Secret::new(control_url.clone()),
    )
    .await;
    labeler::insert_rows(&cdc.source, &scenario).await;
    let events_topic = format!("{}.events", cdc.config.topics.prefix);
    labeler::publish_events(&cdc.registry.client(), &events_topic, &scenario).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("er_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let lcfg = labeler::config(
        &cdc.registry,
        &spec,
        &events_topic,
        &cdc.config.topics.prefix,
        &root,
    )
    .await;
    let mut lcfg = lcfg;
    lcfg.control.url = Secret::new(control_url.clone());
    let control = PgPool::connect(lcfg.control.url.expose())
        .await
        .expect("control");
    labeler::label_until(&lcfg, &control, &dataset, scenario.impressions.len() as i64).await;
    let before = labeler::read_dataset(&root, &dataset);

    // Two users with rows, and pending join state for them.
    let a = scenario.impressions[0].viewer.clone();
    let b = scenario
        .impressions
        .iter()
        .map(|i| i.viewer.clone())
        .find(|v| *v != a)
        .expect("another viewer");
    let erased = [a.as_str(), b.as_str()];

    // Personal data through the real writers, for them and a bystander: profile rows captured
    // by cdc, and a report with a device id and a free-text comment through the collector.
    let bystander = format!("bystander-{}", uuid::Uuid::new_v4().simple());
    let people = [a.clone(), b.clone(), bystander.clone()];
    let personal = |u: &str| {
        [
            format!("{u}@mail.example"),
            format!("+1 555 {}", u.len() * 7919),
            format!("Name of {u}"),
            format!("dev-{u}"),
            format!("comment by {u}"),
        ]
    };
    for u in &people {
        let [email, phone, name, ..] = personal(u);
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
    }
    let collector =
        TestCollector::start(|c| c.postgres.url = Secret::new(control_url.clone())).await;
    let report = |u: &str| {
        let mut e = events::chat_ended(u, uuid::Uuid::now_v7(), 1000);
        e["event_type"] = json!("report_submitted");
        e["properties"] = json!({"reported_user_id": "someone", "reason": "harassment", "comment": personal(u)[4]});
        e
    };
    let batch: Vec<Value> = people.iter().map(|u| report(u)).collect();
    let (status, answer) = collector.post_native(&json!(batch)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 3, "{answer}");
    let report_ids: Vec<uuid::Uuid> = batch.iter().map(events::id).collect();
    let users_topic = cdc.topic("app.users");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read_all(&infra().kafka_bootstrap, &users_topic).await.len() < people.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "cdc did not publish the user rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = feedloop_labeler::state::postgres::PostgresStore::new(control.clone());
    let mut pending = scenario.impressions[0].clone();
    pending.time += 10 * 86_400_000;
    use feedloop_labeler::state::StateStore;
    state
        .put_impressions(
            &dataset,
            vec![feedloop_labeler::state::StoredImpression {
                example_id: uuid::Uuid::new_v4(),
                close_ms: pending.time + 86_430_000,
                impression: feedloop_labeler::window::Impression {
                    event_id: pending.event_id,
                    match_id: pending.match_id,
                    viewer_id: a.clone(),
                    candidate_id: pending.candidate.clone(),
                    time_ms: pending.time,
                    request_id: "r".into(),
                    model_version: "m".into(),
                    experiment_id: None,
                    experiment_arm: None,
                    rank: 1,
                    score: 0.1,
                    features: BTreeMap::new(),
                    source: feedloop_labeler::window::SourceRef {
                        topic: events_topic.clone(),
                        partition: 0,
                        offset: 0,
                    },
                },
                emitted: None,
            }],
        )
        .await
        .expect("state");

    // Their data keys, and a field sealed with one.
    use feedloop_core::crypto::seal;
    let keys = feedloop_integration_tests::test_key_store(control.clone());
    let key_a = keys.get_or_create(&a).await.expect("key").expect("new key");
    keys.get_or_create(&b).await.expect("key").expect("new key");
    let sealed_email = seal(&key_a, &a, "a@example.com").expect("seal");

    // The eraser, on the labeler's control database and dataset root.
    let tombstone_topic = format!("{}.users.compacted", cdc.config.topics.prefix);
    feedloop_core::kafka::create_missing(&kafka(), &[(tombstone_topic.as_str(), 1, true)])
        .await
        .expect("topic");
    let mut ecfg = feedloop_eraser::Config::from_defaults().expect("defaults");
    ecfg.http.listen = "127.0.0.1:0".into();
    ecfg.auth.admin_token = Secret::new(TOKEN);
    ecfg.keys.kek = feedloop_integration_tests::test_kek();
    ecfg.erasure.hash_key = Secret::new("hash-key-for-tests-0123456789");
    ecfg.erasure.poll_interval_ms = 100;
    ecfg.erasure.tombstone_topics = vec![tombstone_topic.clone()];
    ecfg.erasure.cdc_topic_prefix = cdc.config.topics.prefix.clone();
    ecfg.erasure.requests_topic = cdc.config.users.erasure_requests_topic.clone();
    ecfg.datasets.root = root.display().to_string();
    ecfg.kafka.bootstrap = infra().kafka_bootstrap;
    ecfg.registry = lcfg.registry.clone();
    ecfg.control.url = lcfg.control.url.clone();
    ecfg.log.json = false;
    ecfg.validate().expect("config");
    let stop = CancellationToken::new();
    let running = feedloop_eraser::start(ecfg, stop.clone())
        .await
        .expect("eraser");
    let base = format!("http://{}/v1/erasure-requests", running.addr);
    let http = reqwest::Client::new();

    // Auth and validation.
    let anonymous = http
        .post(&base)
        .json(&json!({"user_ids": [a], "reason": "gdpr", "requested_by": "t"}))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status(), 401);
    let wrong = http
        .get(&base)
        .bearer_auth("nope")
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), 401);
    for bad in [
        json!({"user_ids": [], "reason": "gdpr", "requested_by": "t"}),
        json!({"user_ids": [""], "reason": "gdpr", "requested_by": "t"}),
        json!({"user_ids": ["x"], "reason": "", "requested_by": "t"}),
        json!({"user_ids": ["x"], "reason": "gdpr"}),
        json!({"user_ids": ["x"], "reason": "gdpr", "requested_by": "t", "surprise": 1}),
        json!({"user_ids": (0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>(), "reason": "gdpr", "requested_by": "t"}),
    ] {
        let r = http
            .post(&base)
            .bearer_auth(TOKEN)
            .json(&bad)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.expect("json error");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let not_json = http
        .post(&base)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .expect("send");
    assert_eq!(not_json.status(), 400);
    let bad_id = http
        .get(format!("{base}/not-a-uuid"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(bad_id.status(), 400);

    // Erase two users; the same idempotency key does not make a second request.
    let body = json!({"user_ids": [a, b], "reason": "user asked", "requested_by": "privacy@example.com", "idempotency_key": "ticket-1"});
    let created: Value = http
        .post(&base)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let again = http
        .post(&base)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["id"], created["id"]);
    let id = created["id"].as_str().expect("id").to_owned();
    let done = wait_status(&http, &format!("{base}/{id}"), "completed").await;
    let targets: BTreeMap<String, Value> = done["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap_or_default().to_owned(),
                t.clone(),
            )
        })
        .collect();
    for t in [
        "suppression",
        "crypto_keys",
        "join_state",
        "datasets",
        "labels_topic",
        "tombstones",
    ] {
        assert_eq!(targets[t]["status"], "completed", "{t}: {}", targets[t]);
    }
    assert!(targets["join_state"]["affected"].as_i64() >= Some(1));
    // One per user on the external user-keyed topic, and one per key their rows had on cdc's
    // topics (their users rows at least).
    let cdc_keys = targets["tombstones"]["details"]["cdc_row_keys"]
        .as_i64()
        .unwrap_or_default();
    assert!(cdc_keys >= 2, "{}", targets["tombstones"]);
    assert_eq!(
        targets["tombstones"]["affected"].as_i64(),
        Some(2 + cdc_keys),
        "{}",
        targets["tombstones"]
    );

    // Their keys are destroyed: the sealed field is erased for good.
    assert_eq!(targets["crypto_keys"]["affected"].as_i64(), Some(2));
    let gone = keys.get(&a).await.expect("get");
    assert_eq!(open(gone.as_ref(), &a, &sealed_email), Opened::Erased);

    // No record in any topic decrypts to their personal data any more, and none holds it in
    // the clear; the bystander's still decrypts (the check can see personal data).
    let store = feedloop_integration_tests::test_key_store(control.clone());
    let mut user_keys = BTreeMap::new();
    for u in &people {
        user_keys.insert(u.clone(), store.get(u).await.expect("key store"));
    }
    assert!(user_keys[&a].is_none() && user_keys[&b].is_none());
    assert!(user_keys[&bystander].is_some());
    let mut logged = Vec::new();
    for table in ["app.users", "app.reports"] {
        logged.push((
            cdc.registry.client(),
            read_all(&infra().kafka_bootstrap, &cdc.topic(table)).await,
        ));
    }
    let reports: Vec<_> = read_all(&infra().kafka_bootstrap, EVENTS_TOPIC)
        .await
        .into_iter()
        .filter(|r| r.event_id.is_some_and(|id| report_ids.contains(&id)))
        .collect();
    assert_eq!(reports.len(), 3, "the reports were logged");
    logged.push((collector.registry.client(), reports));
    let (mut sealed_total, mut readable) = (0, 0);
    for (client, records) in &logged {
        for r in records.iter().filter(|r| !r.tombstone) {
            for u in &people {
                for p in personal(u) {
                    assert!(
                        !r.value.windows(p.len()).any(|w| w == p.as_bytes()),
                        "{p:?} in the clear in the log"
                    );
                }
            }
            let value: Value = client.decode(&r.value).await.expect("decodes");
            let mut sealed = Vec::new();
            sealed_strings(&value, &mut sealed);
            for text in sealed {
                sealed_total += 1;
                for u in &people {
                    if let Opened::Clear(p) = open(user_keys[u].as_ref(), u, &text) {
                        assert_eq!(*u, bystander, "{p:?} of an erased user decrypts");
                        assert!(personal(u).contains(&p), "{p:?}");
                        readable += 1;
                    }
                }
            }
        }
    }
    assert!(
        sealed_total >= 15,
        "{sealed_total} sealed fields in the log"
    );
    assert_eq!(
        readable, 5,
        "the bystander's email, phone, name, device id, comment"
    );
    // Their new events are suppressed by the collector.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = collector.post_native(&json!([report(&a)])).await;
        assert_eq!(status, 200, "{answer}");
        if answer["results"][0]["status"] == "suppressed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new events of an erased user still accepted: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // No dataset row for them; every other row unchanged.
    let after = labeler::read_dataset(&root, &dataset);
    assert_eq!(
        rows_without(&after, &[]),
        rows_without(&before, &erased),
        "only the erased users' rows went"
    );
    let removed = before["rows"].as_array().map_or(0, Vec::len)
        - after["rows"].as_array().map_or(0, Vec::len);
    assert!(removed > 0);
    assert_eq!(
        targets["datasets"]["affected"].as_i64(),
        Some(removed as i64)
    );
    // No join state, suppressed, tombstoned.
    let left: i64 = sqlx::query_scalar("SELECT (SELECT count(*) FROM labeler.impressions WHERE users && $1) + (SELECT count(*) FROM labeler.outcomes WHERE users && $1)")
        .bind([a.clone(), b.clone()])
        .fetch_one(&control)
        .await
        .expect("count");
    assert_eq!(left, 0);
    let suppressed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM collector.suppressed_users WHERE user_id = ANY($1)",
    )
    .bind([a.clone(), b.clone()])
    .fetch_one(&control)
    .await
    .expect("count");
    assert_eq!(suppressed, 2);
    let tombstones = read_all(&infra().kafka_bootstrap, &tombstone_topic).await;
    for u in &erased {
        assert!(
            tombstones
                .iter()
                .any(|t| t.tombstone && t.key == u.as_bytes()),
            "no tombstone for {u}"
        );
    }
    // Every key an erased user's rows had on cdc's topics got a tombstone, in cdc's own key
    // format (the Avro-framed primary key), though the rows were never deleted; the
    // bystander's keys did not.
    for table in ["app.users", "app.reports"] {
        let records = read_all(&infra().kafka_bootstrap, &cdc.topic(table)).await;
        let keys_of = |who: &str| -> std::collections::HashSet<Vec<u8>> {
            records
                .iter()
                .filter(|r| r.header(feedloop_core::catalogue::OWNER_HEADER) == Some(who))
                .map(|r| r.key.clone())
                .collect()
        };
        let last_is_tombstone = |key: &[u8]| {
            records
                .iter()
                .rev()
                .find(|r| r.key == key)
                .is_some_and(|r| r.tombstone)
        };
        for u in &erased {
            let keys = keys_of(u);
            if table == "app.users" {
                assert_eq!(keys.len(), 1, "{table}: the row of {u}");
            }
            for k in keys {
                assert!(
                    last_is_tombstone(&k),
                    "{table}: a key of {u}'s row has no tombstone after its last change"
                );
            }
        }
        for k in keys_of(&bystander) {
            assert!(
                !last_is_tombstone(&k),
                "{table}: the bystander's row was tombstoned"
            );
        }
    }
    // The certificate: hashes, not ids; before/after checksums of every manifest touched.
    let cert: Value = http
        .get(format!("{base}/{id}/certificate"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let text = cert.to_string();
    assert!(
        !text.contains(&a) && !text.contains(&b),
        "the certificate names a user: {text}"
    );
    assert_eq!(cert["user_id_hashes"].as_array().map(Vec::len), Some(2));
    let manifests = cert["manifests"].as_array().expect("manifests");
    assert!(!manifests.is_empty());
    for m in manifests {
        assert_ne!(m["before_sha256"], m["after_sha256"]);
        assert_eq!(
            m["after_version"].as_i64(),
            m["before_version"].as_i64().map(|v| v + 1)
        );
    }
    // Listing by user finds it.
    let listed: Value = http
        .get(format!("{base}?user_id={a}&status=completed"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(
        listed["requests"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["id"] == id.as_str()))
    );

    // A user in no partition: completes without touching a file.
    let files_before = after["partitions"]
        .as_array()
        .expect("p")
        .iter()
        .map(|p| p["version"].clone())
        .collect::<Vec<_>>();
    let nobody: Value = http
        .post(&base)
        .bearer_auth(TOKEN)
        .json(&json!({"user_ids": ["user-who-never-was"], "reason": "r", "requested_by": "t"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let done = wait_status(
        &http,
        &format!("{base}/{}", nobody["id"].as_str().expect("id")),
        "completed",
    )
    .await;
    assert!(
        done["targets"]
            .as_array()
            .expect("t")
            .iter()
            .any(|t| t["target"] == "datasets" && t["affected"] == 0)
    );
    let untouched = labeler::read_dataset(&root, &dataset);
    assert_eq!(
        untouched["partitions"]
            .as_array()
            .expect("p")
            .iter()
            .map(|p| p["version"].clone())
            .collect::<Vec<_>>(),
        files_before
    );

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    collector.stop().await;
    cdc.cleanup().await;
}

/// Every sealed string in a decoded record.
fn sealed_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.starts_with(SEALED_PREFIX) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|x| sealed_strings(x, out)),
        Value::Object(fields) => fields.values().for_each(|x| sealed_strings(x, out)),
        _ => {}
    }
}

/// A target that keeps failing (its topic does not exist yet) leaves the request
/// partially_failed with the reason; once the cause is fixed, `retry` completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_reports_partially_failed_and_retry_completes_it() {
    let registry = feedloop_integration_tests::TestRegistry::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = format!(
        "missing_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let mut ecfg = feedloop_eraser::Config::from_defaults().expect("defaults");
    ecfg.http.listen = "127.0.0.1:0".into();
    ecfg.auth.admin_token = Secret::new(TOKEN);
    ecfg.keys.kek = feedloop_integration_tests::test_kek();
    ecfg.erasure.hash_key = Secret::new("hash-key-for-tests-0123456789");
    ecfg.erasure.poll_interval_ms = 100;
    ecfg.erasure.max_attempts = 2;
    ecfg.erasure.tombstone_topics = vec![topic.clone()];
    ecfg.erasure.requests_topic = format!("{topic}.erasure.requests");
    ecfg.producer
        .insert("message.timeout.ms".into(), "1500".into());
    ecfg.datasets.root = dir.path().display().to_string();
    ecfg.kafka.bootstrap = infra().kafka_bootstrap;
    ecfg.registry = feedloop_core::config::RegistryConfig::new(
        registry.url.clone(),
        registry.user.clone(),
        Secret::new(registry.password.clone()),
    );
    ecfg.control.url = Secret::new(feedloop_integration_tests::fresh_database().await);
    ecfg.log.json = false;
    let stop = CancellationToken::new();
    let running = feedloop_eraser::start(ecfg, stop.clone())
        .await
        .expect("eraser");
    let base = format!("http://{}/v1/erasure-requests", running.addr);
    let http = reqwest::Client::new();
    let created: Value = http
        .post(&base)
        .bearer_auth(TOKEN)
        .json(&json!({"user_ids": ["u-1"], "reason": "r", "requested_by": "t"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let url = format!("{base}/{}", created["id"].as_str().expect("id"));
    let failed = wait_status(&http, &url, "partially_failed").await;
    let tomb = failed["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["target"] == "tombstones")
        .expect("tombstones target")
        .clone();
    assert_eq!(tomb["status"], "failed");
    assert_eq!(tomb["attempts"], 2);
    assert!(
        tomb["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{tomb}"
    );
    assert!(
        failed["targets"]
            .as_array()
            .expect("t")
            .iter()
            .any(|t| t["target"] == "suppression" && t["status"] == "completed")
    );
    let no_cert = http
        .get(format!("{url}/certificate"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(no_cert.status(), 404);

    feedloop_core::kafka::create_missing(&kafka(), &[(topic.as_str(), 1, true)])
        .await
        .expect("topic");
    let retried = http
        .post(format!("{url}/retry"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(retried.status(), 202);
    let done = wait_status(&http, &url, "completed").await;
    assert!(
        done["targets"]
            .as_array()
            .expect("t")
            .iter()
            .all(|t| t["status"] == "completed"),
        "{done}"
    );
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

#[tokio::test]
async fn postgres_key_store_passes_the_contract() {
    let pool =
        feedloop_core::postgres::connect(&feedloop_integration_tests::fresh_database().await, 4)
            .await
            .expect("connect");
    feedloop_core::postgres::migrate(&pool)
        .await
        .expect("migrate");
    let store = feedloop_integration_tests::test_key_store(pool);
    feedloop_core::crypto::key_store_contract(&store)
        .await
        .expect("contract");
}

#[tokio::test]
#[ignore = "needs ScyllaDB, which cannot run here: start deploy/compose.scylla.yaml (or any cluster), set SCYLLA_NODES=host:9042 and run with --ignored; integration-tests/run does when SCYLLA_NODES is set"]
async fn scylla_key_store_passes_the_contract() {
    let nodes: Vec<String> = std::env::var("SCYLLA_NODES")
        .expect("SCYLLA_NODES is not set")
        .split(',')
        .map(str::to_owned)
        .collect();
    let keyspace = format!("keys_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let ring =
        feedloop_core::crypto::KeyRing::parse(feedloop_integration_tests::test_kek().expose())
            .expect("KEK");
    let store = feedloop_core::crypto::ScyllaKeyStore::connect(
        &nodes,
        &keyspace,
        1,
        ring,
        std::time::Duration::from_secs(1),
    )
    .await
    .expect("connect to ScyllaDB");
    feedloop_core::crypto::key_store_contract(&store)
        .await
        .expect("contract");
}

async fn migrated_control() -> sqlx::PgPool {
    let pool =
        feedloop_core::postgres::connect(&feedloop_integration_tests::fresh_database().await, 4)
            .await
            .expect("connect");
    feedloop_core::postgres::migrate(&pool)
        .await
        .expect("migrate");
    pool
}

/// Key custody: the control database holds data keys only wrapped by a KEK it never sees; a
/// copy of it with another ring yields errors, not keys; a new KEK re-wraps every key online
/// (keys stored before envelope encryption too) and the old one can then be retired; and
/// destruction deletes the wrapped key.
#[tokio::test]
async fn a_copy_of_the_key_store_alone_yields_no_key_and_a_kek_rotation_rewraps_online() {
    use feedloop_core::crypto::{DataKey, KeyRing, PostgresKeyStore};
    let pool = migrated_control().await;
    let old = KeyRing::generate_entry("k1");
    let new = KeyRing::generate_entry("k2");
    let ring = |text: &str| KeyRing::parse(text).expect("ring");
    let store1 = PostgresKeyStore::new(pool.clone(), ring(&old));
    let alice = store1
        .get_or_create("alice")
        .await
        .expect("key")
        .expect("new");
    let bob = store1
        .get_or_create_many(&["bob".to_owned()])
        .await
        .expect("keys")
        .remove("bob")
        .flatten()
        .expect("new");
    // A key stored before envelope encryption, in the clear.
    let carol = DataKey::generate();
    sqlx::query("INSERT INTO keys.user_keys (user_id, key) VALUES ('carol', $1)")
        .bind(carol.as_bytes().as_slice())
        .execute(&pool)
        .await
        .expect("legacy key");

    // Everything the database holds, as bytes: no data key in it (but carol's, not yet
    // re-wrapped).
    let dump = || async {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT encode(convert_to(t::text, 'UTF8'), 'hex') FROM keys.user_keys t",
        )
        .fetch_all(&pool)
        .await
        .expect("dump");
        rows.join("")
    };
    let hex = |k: &DataKey| {
        k.as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let text = dump().await;
    let before: String = sqlx::query_scalar("SELECT string_agg(t::text, '') FROM keys.user_keys t")
        .fetch_one(&pool)
        .await
        .expect("dump");
    for (who, key) in [("alice", &alice), ("bob", &bob)] {
        assert!(
            !before.contains(&hex(key)) && !text.contains(&hex(key)),
            "{who}'s data key is readable in the control database"
        );
    }
    assert!(
        before.contains(&hex(&carol)),
        "the legacy key is there to re-wrap"
    );

    // A copy of the database with another key ring (the same KEK id, another key): errors,
    // never keys, and never taken for destroyed keys.
    let thief = PostgresKeyStore::new(pool.clone(), ring(&KeyRing::generate_entry("k1")));
    assert!(thief.get("alice").await.is_err(), "a wrong KEK must fail");
    assert!(
        thief.get_or_create("bob").await.is_err(),
        "a wrong KEK must fail, not make a key"
    );
    let unknown = PostgresKeyStore::new(pool.clone(), ring(&new));
    assert!(
        matches!(
            unknown.get("alice").await,
            Err(feedloop_core::crypto::CryptoError::UnknownKek(id)) if id == "k1"
        ),
        "a ring without the key's KEK says which KEK it lacks"
    );

    // Rotation: k2 current, k1 still in the ring; every key still opens, then is re-wrapped.
    let rotating = PostgresKeyStore::new(pool.clone(), ring(&format!("{new}\n{old}")));
    assert_eq!(
        rotating.get("alice").await.expect("get"),
        Some(alice.clone())
    );
    let mut rewrapped = 0;
    loop {
        let n = rotating.rewrap(2).await.expect("rewrap");
        if n == 0 {
            break;
        }
        rewrapped += n;
    }
    assert_eq!(rewrapped, 3, "alice, bob and the legacy key");
    let kek_ids: Vec<(String, Option<String>, bool)> =
        sqlx::query_as("SELECT user_id, kek_id, key IS NULL FROM keys.user_keys ORDER BY user_id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert!(
        kek_ids
            .iter()
            .all(|(_, id, cleared)| id.as_deref() == Some("k2") && *cleared),
        "{kek_ids:?}"
    );
    assert!(
        !dump().await.contains(&hex(&carol)),
        "the legacy key is gone"
    );

    // k1 retired: the ring holds k2 only, and every key is the same.
    let retired = PostgresKeyStore::new(pool.clone(), ring(&new));
    assert_eq!(retired.get("alice").await.expect("get"), Some(alice));
    assert_eq!(retired.get("bob").await.expect("get"), Some(bob));
    assert_eq!(retired.get("carol").await.expect("get"), Some(carol));

    // Destruction deletes the wrapped key itself, and a rewrap never brings it back.
    assert_eq!(
        retired
            .destroy(&["alice".to_owned()])
            .await
            .expect("destroy"),
        1
    );
    let (wrapped, kek_id, destroyed): (Option<Vec<u8>>, Option<String>, bool) = sqlx::query_as(
        "SELECT wrapped, kek_id, destroyed_at IS NOT NULL FROM keys.user_keys WHERE user_id = 'alice'",
    )
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!((wrapped, kek_id, destroyed), (None, None, true));
    assert_eq!(rotating.rewrap(100).await.expect("rewrap"), 0);
    assert_eq!(retired.get_or_create("alice").await.expect("get"), None);
}

/// A destroyed key is forgotten by a writer's cache as soon as the destruction commits (the
/// store's NOTIFY), not after the cache's lifetime; a cache without the broadcast would have
/// gone on sealing with it.
#[tokio::test]
async fn a_destroyed_key_leaves_every_writer_cache_within_the_broadcast_grace() {
    use feedloop_core::crypto::{DESTRUCTION_BROADCAST_GRACE, KeyCache, KeyStore};
    use std::sync::Arc;
    let pool = migrated_control().await;
    let store: Arc<dyn KeyStore> =
        Arc::new(feedloop_integration_tests::test_key_store(pool.clone()));
    let hour = Duration::from_secs(3600);
    let broadcast = Arc::new(KeyCache::broadcast(store.clone(), hour));
    let shutdown = CancellationToken::new();
    tokio::spawn(
        broadcast
            .clone()
            .follow_destructions(pool.clone(), shutdown.clone()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !broadcast.is_listening() {
        assert!(
            std::time::Instant::now() < deadline,
            "the cache never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ttl_only = KeyCache::new(store.clone(), hour);
    let key = broadcast
        .sealing_key("u1")
        .await
        .expect("key")
        .expect("new");
    assert_eq!(
        ttl_only.sealing_key("u1").await.expect("key"),
        Some(key.clone())
    );

    // The eraser destroys it through its own store (its own connections).
    let eraser_pool = migrated_control_of(&pool).await;
    feedloop_integration_tests::test_key_store(eraser_pool)
        .destroy(&["u1".to_owned()])
        .await
        .expect("destroy");
    let destroyed_at = std::time::Instant::now();
    loop {
        let cached = broadcast.sealing_key("u1").await.expect("key");
        if cached.is_none() {
            break;
        }
        assert!(
            destroyed_at.elapsed() < DESTRUCTION_BROADCAST_GRACE,
            "a writer still seals with a destroyed key {:?} after its destruction",
            destroyed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        ttl_only.sealing_key("u1").await.expect("key"),
        Some(key),
        "without the broadcast the cache keeps the key for its lifetime (what the broadcast fixes)"
    );
    shutdown.cancel();
}

/// Another pool on the same database as `pool`.
async fn migrated_control_of(pool: &sqlx::PgPool) -> sqlx::PgPool {
    sqlx::PgPool::connect_with((*pool.connect_options()).clone())
        .await
        .expect("connect")
}

/// `feedloop.labels.<dataset>` is compacted and keyed by example id, and an erasure tombstones
/// exactly the examples the dataset rewrite removed: a consumer reading the topic once the
/// broker has compacted it finds only tombstones under the erased user's examples, and the
/// other examples' records untouched. (On a broker of its own that compacts every second;
/// Kafka does within the topic's max.compaction.lag.ms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_compaction_the_labels_topic_holds_none_of_an_erased_users_examples() {
    use feedloop_core::kafka::{KafkaConfig, create_missing, read_to_end};
    use std::collections::{HashMap, HashSet};
    let broker = feedloop::dev::BrokerProcess::start_compacting(1)
        .await
        .expect("compacting broker");
    let kafka = KafkaConfig::new(broker.bootstrap());
    let registry = feedloop_integration_tests::TestRegistry::start().await;
    let control_url = fresh_database().await;
    let prefix = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // The cdc topics the example spec reads exist (empty: this dataset comes from events).
    let cdc_topics = [
        format!("{prefix}.app.reports"),
        format!("{prefix}.app.blocks"),
    ];
    let specs: Vec<(&str, i32, bool)> = cdc_topics.iter().map(|t| (t.as_str(), 1, false)).collect();
    create_missing(&kafka, &specs).await.expect("cdc topics");
    let events_topic = format!("{prefix}.events");
    let scenario = labeler::scenario(31, 150);
    labeler::publish_events_to(&kafka, &registry.client(), &events_topic, &scenario).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("lc_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let mut lcfg = labeler::config(&registry, &spec, &events_topic, &prefix, &root).await;
    lcfg.kafka.bootstrap = broker.bootstrap();
    lcfg.control.url = Secret::new(control_url.clone());
    let control = PgPool::connect(&control_url).await.expect("control");
    labeler::label_until(&lcfg, &control, &dataset, scenario.impressions.len() as i64).await;
    let before = labeler::read_dataset(&root, &dataset);
    let user = scenario.impressions[0].viewer.clone();
    let mut theirs = HashSet::new();
    let mut others = HashSet::new();
    for r in before["rows"].as_array().expect("rows") {
        let id = r["example_id"].as_str().expect("example_id").to_owned();
        if r["viewer_id"] == user.as_str() || r["candidate_id"] == user.as_str() {
            theirs.insert(id);
        } else {
            others.insert(id);
        }
    }
    assert!(!theirs.is_empty() && !others.is_empty());
    let topic = feedloop_core::catalogue::labels_topic(&dataset);
    let read = |kafka: KafkaConfig, topic: String| async move {
        tokio::task::spawn_blocking(move || read_to_end(&kafka, &topic, Duration::from_secs(60)))
            .await
            .expect("reader")
            .expect("read the labels topic")
    };
    let published = read(kafka.clone(), topic.clone()).await;
    assert!(
        published
            .iter()
            .all(|r| r.header("example_id") == Some(r.key.as_slice())),
        "keyed by example id"
    );

    // An example of the user that a labeler published in a commit it never recorded (it
    // stopped between publishing and its transaction): no committed row names it. Its value
    // is the published record of one of the user's examples (the user as an Avro string in
    // it), under a key of its own.
    let unrecorded = uuid::Uuid::new_v4().to_string();
    {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let template = published
            .iter()
            .find(|r| theirs.contains(String::from_utf8_lossy(&r.key).as_ref()))
            .and_then(|r| r.value.clone())
            .expect("a published example of the user");
        let producer: FutureProducer = kafka
            .client_config("unrecorded-commit")
            .create()
            .expect("producer");
        producer
            .send(
                FutureRecord::to(&topic).key(&unrecorded).payload(&template),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }

    // The erasure, through the eraser's API.
    let mut ecfg = feedloop_eraser::Config::from_defaults().expect("defaults");
    ecfg.http.listen = "127.0.0.1:0".into();
    ecfg.auth.admin_token = Secret::new(TOKEN);
    ecfg.keys.kek = feedloop_integration_tests::test_kek();
    ecfg.erasure.hash_key = Secret::new("hash-key-for-tests-0123456789");
    ecfg.erasure.poll_interval_ms = 100;
    ecfg.datasets.root = root.display().to_string();
    ecfg.kafka.bootstrap = broker.bootstrap();
    ecfg.registry = lcfg.registry.clone();
    ecfg.control.url = Secret::new(control_url.clone());
    ecfg.log.json = false;
    let stop = CancellationToken::new();
    let eraser = feedloop_eraser::start(ecfg, stop.clone())
        .await
        .expect("eraser");
    let url = format!("http://{}", eraser.addr);
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{url}/v1/erasure-requests"))
        .bearer_auth(TOKEN)
        .json(&json!({"user_ids": [user], "reason": "test", "requested_by": "test"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    wait_status(
        &http,
        &format!("{url}/v1/erasure-requests/{id}"),
        "completed",
    )
    .await;
    let certificate: Value = http
        .get(format!("{url}/v1/erasure-requests/{id}/certificate"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("certificate")
        .json()
        .await
        .expect("json");
    let labels = certificate["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["target"] == "labels_topic")
        .cloned()
        .expect("a labels_topic target");
    assert_eq!(
        labels["affected"].as_i64(),
        Some(theirs.len() as i64 + 1),
        "{labels}"
    );
    let detail: Value =
        serde_json::from_str(labels["detail"].as_str().unwrap_or("{}")).expect("detail");
    assert_eq!(
        detail["found_by_scan"].as_u64(),
        Some(theirs.len() as u64 + 1),
        "the unrecorded example found with the others: {labels}"
    );
    theirs.insert(unrecorded);
    let remaining: i64 = sqlx::query_scalar("SELECT count(*) FROM labeler.erased_examples")
        .fetch_one(&control)
        .await
        .expect("count");
    assert_eq!(
        remaining, 0,
        "the removed examples' ids are forgotten once done"
    );

    // Once compacted: each erased example only as its tombstone; every other as before.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let records = read(kafka.clone(), topic.clone()).await;
        let mut by_key: HashMap<String, Vec<bool>> = HashMap::new();
        let mut offsets: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
        for r in &records {
            let k = String::from_utf8_lossy(&r.key).into_owned();
            offsets
                .entry(k.clone())
                .or_default()
                .push((r.partition, r.offset));
            by_key.entry(k).or_default().push(r.value.is_some());
        }
        let erased_left: Vec<&String> = theirs
            .iter()
            .filter(|k| by_key.get(*k).is_none_or(|v| v.as_slice() != [false]))
            .collect();
        if erased_left.is_empty() {
            for k in &others {
                assert!(
                    by_key.get(k).is_some_and(|v| v.last() == Some(&true)),
                    "example {k} of another user lost its record"
                );
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 60 s of compaction, {} erased examples still have records on {topic}: {:?}",
            erased_left.len(),
            erased_left
                .iter()
                .take(3)
                .map(|k| (&by_key[*k], &offsets[*k]))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), eraser.task).await;
}
