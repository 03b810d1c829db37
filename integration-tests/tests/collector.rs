//! The collector against the real broker and Postgres.

use std::{collections::HashMap, io::Write, time::Duration};

use feedloop_core::{
    catalogue::{DEADLETTER_TOPIC, EVENTS_TOPIC},
    model::{
        DeadLetter, DeadLetterReason, MatchDecision, MatchImpression, ScreenViewed, UserIdentified,
    },
};
use feedloop_integration_tests::{
    TestCollector, WRITE_KEY, events, infra,
    log::{Landed, read_all},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// The records of `topic` carrying one of `ids`, by id.
async fn landed(topic: &str, ids: &[Uuid]) -> HashMap<Uuid, Vec<Landed>> {
    let mut out: HashMap<Uuid, Vec<Landed>> = HashMap::new();
    for r in read_all(&infra().kafka_bootstrap, topic).await {
        if let Some(id) = r.event_id
            && ids.contains(&id)
        {
            out.entry(id).or_default().push(r);
        }
    }
    out
}

#[tokio::test]
async fn mixed_batch_gets_per_event_results_and_only_valid_events_land() {
    let c = TestCollector::start(|_| {}).await;
    let user = format!("user-{}", Uuid::now_v7());
    let m = Uuid::now_v7();
    let good = [
        events::impression(&user, m),
        events::decision(&user, m, true),
        events::chat_ended(&user, m, 61_000),
    ];
    let mut bad_schema = events::decision(&user, m, true);
    bad_schema["properties"]["decision"] = json!("maybe");
    let mut unknown = events::decision(&user, m, true);
    unknown["event_type"] = json!("match_declined");
    let batch = json!([good[0], good[1], good[2], bad_schema, unknown, good[1]]);
    let (status, body) = c.post_native(&batch).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        [
            "accepted", "accepted", "accepted", "rejected", "rejected", "rejected"
        ],
        "{body}"
    );
    assert_eq!(body["results"][3]["reason"], "schema_violation");
    assert_eq!(body["results"][3]["path"], "/properties/decision");
    assert_eq!(body["results"][4]["reason"], "unknown_event_type");
    assert_eq!(
        body["results"][5]["reason"], "in_flight",
        "a repeat inside one batch is not published twice"
    );
    assert_eq!(body["durability"], "acked");

    // Resending: duplicates, not republished.
    let (status, again) = c.post_native(&json!([good[0], good[1]])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["duplicates"], 2, "{again}");

    let ids: Vec<Uuid> = good.iter().map(events::id).collect();
    let found = landed(EVENTS_TOPIC, &ids).await;
    assert_eq!(found.len(), 3, "all three valid events landed");
    assert!(found.values().all(|v| v.len() == 1), "each exactly once");
    let client = c.registry.client();
    let imp: MatchImpression = client
        .decode(&found[&ids[0]][0].value)
        .await
        .expect("decodes");
    assert_eq!(imp.match_id, m);
    assert_eq!(imp.envelope.user_id, user);
    assert_eq!(imp.rank, 3);
    assert_eq!(imp.experiment_arm.as_deref(), Some("treatment"));
    assert_eq!(
        found[&ids[0]][0].key,
        m.to_string().into_bytes(),
        "keyed by match_id"
    );
    // Impression, decision and chat of one match share a partition.
    let partitions: std::collections::HashSet<i32> =
        found.values().map(|v| v[0].partition).collect();
    assert_eq!(partitions.len(), 1);
    let dec: MatchDecision = client
        .decode(&found[&ids[1]][0].value)
        .await
        .expect("decodes");
    assert_eq!(
        dec.envelope.timestamp,
        dec.envelope.received_at
            - (dec.envelope.sent_at.unwrap_or(0) - dec.envelope.client_timestamp)
    );

    // The two invalid events are dead letters with reason, path and their original bytes,
    // sealed with their user's data key: nothing of them is in the clear on the topic.
    let mut dls = Vec::new();
    let device = format!("dev-{user}");
    for r in read_all(&infra().kafka_bootstrap, DEADLETTER_TOPIC).await {
        if let Ok(dl) = client.decode::<DeadLetter>(&r.value).await
            && dl.app_id.as_deref() == Some("test-app")
            && dl.sealed_by.as_deref() == Some(user.as_str())
        {
            assert!(
                !String::from_utf8_lossy(&r.value).contains(&device),
                "a dead letter holds the device id in the clear"
            );
            dls.push(dl);
        }
    }
    assert_eq!(dls.len(), 2, "{dls:?}");
    let schema = dls
        .iter()
        .find(|d| d.reason == DeadLetterReason::SchemaViolation)
        .expect("schema violation");
    assert_eq!(schema.path.as_deref(), Some("/properties/decision"));
    let control = c.config.postgres.url.expose();
    let original: Value =
        serde_json::from_slice(&feedloop_integration_tests::unsealed(control, schema).await)
            .expect("original JSON");
    assert_eq!(original, bad_schema);
    assert!(
        String::from_utf8_lossy(&feedloop_integration_tests::unsealed(control, schema).await)
            .contains(&device),
        "the sealed original is the whole event"
    );
    assert!(
        dls.iter()
            .any(|d| d.reason == DeadLetterReason::UnknownEventType
                && d.event_type.as_deref() == Some("match_declined"))
    );
    c.stop().await;
}

#[tokio::test]
async fn segment_batch_lands_as_catalogue_records_with_corrected_time() {
    let c = TestCollector::start(|_| {}).await;
    let user = format!("seg-{}", Uuid::now_v7());
    let m = Uuid::now_v7();
    let now = events::now_ms();
    // The device clock is 10 minutes behind; it sent 2 s after the event.
    let skew = 600_000;
    let iso = |ms: i64| chrono_like(ms);
    let body = json!({
        "sentAt": iso(now - skew),
        "batch": [
            {"type": "track", "event": "Match Impression", "messageId": format!("m1-{user}"), "userId": user,
             "timestamp": iso(now - skew - 2000),
             "context": {"os": {"name": "Android", "version": "14"}, "app": {"version": "7.1"}, "device": {"id": "dev-9"}},
             "properties": {"match_id": m, "candidate_id": "c-1", "request_id": "r", "model_version": "v9", "rank": 0, "score": 0.9}},
            {"type": "track", "event": "Not In Catalogue", "messageId": format!("m2-{user}"), "userId": user, "timestamp": iso(now - skew)}
        ]
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/batch", c.url))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.expect("json");
    assert_eq!(answer["success"], true);
    assert_eq!(answer["results"][0]["status"], "accepted");
    assert_eq!(answer["results"][1]["reason"], "unknown_event_type");
    let id = feedloop_collector::ingest::segment::event_id("test-app", Some(&format!("m1-{user}")));
    let found = landed(EVENTS_TOPIC, &[id]).await;
    let imp: MatchImpression = c
        .registry
        .client()
        .decode(&found[&id][0].value)
        .await
        .expect("decodes");
    assert_eq!(imp.envelope.user_id, user);
    assert_eq!(imp.envelope.app_version, "7.1");
    // The device id is personal: sealed with the user's data key, which opens it.
    assert_eq!(
        feedloop_integration_tests::open_sealed(
            c.config.postgres.url.expose(),
            &user,
            imp.envelope.device_id.as_deref().unwrap_or_default(),
        )
        .await,
        feedloop_core::crypto::Opened::Clear("dev-9".into())
    );
    // Corrected: about 2 s before it was received, although the client said 10 minutes earlier.
    let age = imp.envelope.received_at - imp.envelope.timestamp;
    assert!((1_900..=2_100).contains(&age), "corrected age {age} ms");
    assert_eq!(imp.envelope.client_timestamp, now - skew - 2000);
    c.stop().await;
}

/// RFC 3339 in UTC from epoch ms, without a date library in the tests.
fn chrono_like(ms: i64) -> String {
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}.{:03}", ms / 1000, ms % 1000),
            "+%Y-%m-%dT%H:%M:%S.%3NZ",
        ])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn the_official_segment_python_sdk_works_by_changing_its_host() {
    let c = TestCollector::start(|_| {}).await;
    let user = format!("sdk-{}", Uuid::now_v7());
    let python = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.is_file(),
        "run integration-tests/run to create the venv"
    );
    let out = tokio::process::Command::new(python)
        .arg(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/segment_sdk.py"))
        .env("WRITE_KEY", WRITE_KEY)
        .env("COLLECTOR_URL", &c.url)
        .env("USER_ID", &user)
        .output()
        .await
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["errors"], json!([]), "{report}");
    let ids: HashMap<String, Uuid> = report["sent"]
        .as_array()
        .expect("sent")
        .iter()
        .map(|s| {
            let kind = s["kind"].as_str().unwrap_or_default().to_owned();
            (
                kind,
                feedloop_collector::ingest::segment::event_id("test-app", s["message_id"].as_str()),
            )
        })
        .collect();
    let found = landed(EVENTS_TOPIC, &ids.values().copied().collect::<Vec<_>>()).await;
    let client = c.registry.client();
    let d: MatchDecision = client
        .decode(&found[&ids["track"]][0].value)
        .await
        .expect("track");
    assert_eq!(d.envelope.user_id, user);
    assert_eq!(d.envelope.platform, feedloop_core::model::Platform::Ios);
    assert!(
        d.envelope.client_timestamp - d.envelope.received_at > 100_000,
        "raw client time kept"
    );
    assert!(
        (d.envelope.received_at - d.envelope.timestamp).abs() < 5_000,
        "skew corrected"
    );
    let s: ScreenViewed = client
        .decode(&found[&ids["screen"]][0].value)
        .await
        .expect("screen");
    assert_eq!(s.name.as_deref(), Some("Matches"));
    let i: UserIdentified = client
        .decode(&found[&ids["identify"]][0].value)
        .await
        .expect("identify");
    assert_eq!(
        i.trait_names,
        vec!["email", "plan"],
        "trait values are not kept"
    );
    assert!(
        !found.contains_key(&ids["unknown"]),
        "unknown track events are dead-lettered, not published"
    );
    c.stop().await;
}

#[tokio::test]
async fn bad_requests_get_4xx_and_the_collector_stays_healthy() {
    let c = TestCollector::start(|cfg| {
        cfg.http.max_request_bytes = 64 * 1024;
        cfg.http.max_decompressed_bytes = 256 * 1024;
        cfg.limits.events_per_second = 1_000_000;
        cfg.limits.burst = 1_000_000;
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/events", c.url);
    let post = |body: Vec<u8>,
                content_type: &'static str,
                encoding: Option<&'static str>,
                key: Option<&'static str>| {
        let mut req = http
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        if let Some(k) = key {
            req = req.basic_auth(k, Some(""));
        }
        req.send()
    };
    let gzip = |data: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).expect("gzip");
        enc.finish().expect("gzip")
    };
    let valid = serde_json::to_vec(&json!([events::decision("u-bad", Uuid::now_v7(), true)]))
        .expect("json");
    let cases: Vec<(&str, reqwest::Response, StatusCode, &str)> = vec![
        (
            "malformed json",
            post(
                b"[{\"event_id\":".to_vec(),
                "application/json",
                None,
                Some(WRITE_KEY),
            )
            .await
            .expect("send"),
            StatusCode::BAD_REQUEST,
            "malformed_batch",
        ),
        (
            "wrong content type",
            post(valid.clone(), "application/xml", None, Some(WRITE_KEY))
                .await
                .expect("send"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "oversized body",
            post(
                vec![b' '; 100 * 1024],
                "application/json",
                None,
                Some(WRITE_KEY),
            )
            .await
            .expect("send"),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "bad gzip",
            post(
                b"not gzip at all".to_vec(),
                "application/json",
                Some("gzip"),
                Some(WRITE_KEY),
            )
            .await
            .expect("send"),
            StatusCode::BAD_REQUEST,
            "bad_gzip",
        ),
        (
            "gzip bomb",
            post(
                gzip(&vec![b' '; 4 << 20]),
                "application/json",
                Some("gzip"),
                Some(WRITE_KEY),
            )
            .await
            .expect("send"),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "missing key",
            post(valid.clone(), "application/json", None, None)
                .await
                .expect("send"),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "wrong key",
            post(
                valid.clone(),
                "application/json",
                None,
                Some("wk-not-a-real-key-000"),
            )
            .await
            .expect("send"),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
    ];
    for (name, resp, status, code) in cases {
        assert_eq!(resp.status(), status, "{name}");
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(body["code"], code, "{name}: {body}");
    }
    // Gzip done right is accepted.
    let ok = post(
        gzip(&valid),
        "application/json",
        Some("gzip"),
        Some(WRITE_KEY),
    )
    .await
    .expect("send");
    assert_eq!(ok.status(), StatusCode::OK);

    // 10,000 random byte bodies, 32 at a time: all 4xx, none crashes anything.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let bodies: Vec<Vec<u8>> = (0..10_000)
        .map(|_| {
            let len = rng.random_range(0..512);
            (0..len).map(|_| rng.random::<u8>()).collect()
        })
        .collect();
    for chunk in bodies.chunks(32) {
        let mut set = tokio::task::JoinSet::new();
        for b in chunk {
            set.spawn(post(b.clone(), "application/json", None, Some(WRITE_KEY)));
        }
        while let Some(resp) = set.join_next().await {
            let status = resp.expect("joined").expect("answered").status();
            assert!(status.is_client_error(), "random body answered {status}");
        }
    }
    let health = http
        .get(format!("{}/healthz", c.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
    let (status, _) = c
        .post_native(&json!([events::decision("u-after", Uuid::now_v7(), false)]))
        .await;
    assert_eq!(status, StatusCode::OK, "still accepting after the abuse");
    c.stop().await;
}

/// A malformed body as large as the collector accepts (1 MiB, or 8 MiB once gunzipped) is
/// dead-lettered as its first 64 KiB with its length and digest: a dead letter carrying it whole
/// would pass librdkafka's `message.max.bytes` (1,000,000), be refused by the producer, spooled,
/// and retried forever, with every later request answered `spooled`.
#[tokio::test]
async fn a_malformed_body_at_the_size_limit_is_dead_lettered_and_the_next_batch_is_acked() {
    use sha2::{Digest, Sha256};
    let c = TestCollector::start(|cfg| {
        cfg.http.max_request_bytes = 1 << 20;
        cfg.http.max_decompressed_bytes = 8 << 20;
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/events", c.url);
    let marker = format!("marker-{}", Uuid::now_v7());
    let mut plain = format!("[{{\"event_id\": \"{marker}\", \"junk\": \"").into_bytes();
    plain.resize((1 << 20) - 16, b'x');
    let mut inflated = plain.clone();
    inflated.resize((8 << 20) - 16, b'y');
    let gzipped = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&inflated).expect("gzip");
        enc.finish().expect("gzip")
    };
    for (name, body, encoding, original) in [
        ("1 MiB malformed body", plain.clone(), None, &plain),
        (
            "8 MiB malformed body, gzipped",
            gzipped,
            Some("gzip"),
            &inflated,
        ),
    ] {
        let mut req = http
            .post(&url)
            .header("content-type", "application/json")
            .basic_auth(WRITE_KEY, Some(""))
            .body(body);
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{name}");
        let (status, body) = c
            .post_native(&json!([events::decision("u-next", Uuid::now_v7(), true)]))
            .await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert_eq!(
            body["durability"], "acked",
            "{name}: the next batch must reach the broker, not the spool: {body}"
        );
        let ready = http
            .get(format!("{}/readyz", c.url))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), StatusCode::OK, "{name}");

        let client = c.registry.client();
        let control = c.config.postgres.url.expose();
        let mut found = Vec::new();
        for r in read_all(&infra().kafka_bootstrap, DEADLETTER_TOPIC).await {
            if let Ok(dl) = client.decode::<DeadLetter>(&r.value).await
                && dl.original_size == Some(original.len() as i64)
                && dl.app_id.as_deref() == Some("test-app")
            {
                assert!(
                    !String::from_utf8_lossy(&r.value).contains(&marker),
                    "{name}: the original is in the clear"
                );
                let opened = feedloop_integration_tests::unsealed(control, &dl).await;
                if String::from_utf8_lossy(&opened[..60.min(opened.len())]).contains(&marker) {
                    found.push((dl, opened));
                }
            }
        }
        assert_eq!(found.len(), 1, "{name}: one dead letter");
        let (dl, opened) = &found[0];
        // Nobody named: the day's unattributed key.
        assert!(
            dl.sealed_by
                .as_deref()
                .is_some_and(|o| o.starts_with(feedloop_core::crypto::UNATTRIBUTED_PREFIX)),
            "{name}: {:?}",
            dl.sealed_by
        );
        assert_eq!(opened.len(), 64 * 1024, "{name}");
        assert_eq!(opened[..], original[..64 * 1024], "{name}");
        assert_eq!(
            dl.original_sha256.as_deref(),
            Some(hex::encode(Sha256::digest(original)).as_str()),
            "{name}"
        );
    }
    c.stop().await;
}

/// A spooled record the producer refuses for its size (a spool written under a larger limit,
/// or a topic whose max.message.bytes is lower) is dead-lettered about itself, as its first
/// 64 KiB with its size and digest, and the spool drains past it: the collector never stays in
/// spool mode on a permanent error, and answers `acked` again.
#[tokio::test]
async fn a_spooled_record_the_broker_refuses_is_dead_lettered_and_the_spool_drains_past_it() {
    use feedloop_collector::spool::{Record, Spool};
    let dir = tempfile::tempdir().expect("spool dir");
    let refused_id = Uuid::now_v7();
    let value = vec![0xAB_u8; 300_000];
    {
        let (spool, pending) = Spool::open(dir.path(), 64 << 20, 8 << 20).expect("spool");
        assert!(pending.is_empty());
        spool
            .append(vec![Record {
                id: refused_id.as_u128(),
                topic: EVENTS_TOPIC.into(),
                key: b"user-refused".to_vec(),
                value: value.clone(),
                event_type: "match_decision".into(),
                at_ms: events::now_ms(),
            }])
            .await
            .expect("append");
        spool.close();
    }
    let spool_dir = dir.path().to_path_buf();
    let c = TestCollector::start(move |cfg| {
        cfg.spool.dir = spool_dir;
        cfg.producer
            .insert("message.max.bytes".into(), "200000".into());
    })
    .await;
    let (status, body) = c
        .post_native(&json!([events::decision("u-after", Uuid::now_v7(), true)]))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["durability"], "acked", "{body}");

    let client = c.registry.client();
    let refused = refused_id.to_string();
    let mut letters = Vec::new();
    for r in read_all(&infra().kafka_bootstrap, DEADLETTER_TOPIC).await {
        if let Ok(dl) = client.decode::<DeadLetter>(&r.value).await
            && dl.event_id.as_deref() == Some(refused.as_str())
        {
            letters.push(dl);
        }
    }
    assert_eq!(letters.len(), 1, "one dead letter about the refused record");
    let dl = &letters[0];
    assert_eq!(dl.service, "collector");
    assert_eq!(dl.source_topic.as_deref(), Some(EVENTS_TOPIC));
    assert_eq!(dl.original_size, Some(300_000));
    assert_eq!(dl.original.len(), 64 * 1024);
    assert!(dl.detail.contains("refused"), "{}", dl.detail);
    assert!(
        landed(EVENTS_TOPIC, &[refused_id]).await.is_empty(),
        "the refused record itself must not reach its topic"
    );
    let metrics = reqwest::get(format!("{}/metrics", c.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "feedloop_collector_refused_records_total 1"),
        "{metrics}"
    );
    c.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let c = TestCollector::start(|cfg| {
        cfg.limits.events_per_second = 5;
        cfg.limits.burst = 5;
        cfg.http.max_batch_len = 5;
    })
    .await;
    let batch: Vec<Value> = (0..5)
        .map(|_| events::decision("u-rl", Uuid::now_v7(), true))
        .collect();
    let (status, _) = c.post_native(&json!(batch)).await;
    assert_eq!(status, StatusCode::OK);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/events", c.url))
        .header("x-write-key", WRITE_KEY)
        .json(&json!(batch))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().get("retry-after").is_some());
    c.stop().await;
}

#[tokio::test]
async fn suppressed_users_are_dropped_within_seconds() {
    let c = TestCollector::start(|_| {}).await;
    let user = format!("erased-{}", Uuid::now_v7());
    let pool = sqlx::PgPool::connect(c.config.postgres.url.expose())
        .await
        .expect("pg");
    sqlx::query("INSERT INTO collector.suppressed_users (user_id) VALUES ($1)")
        .bind(&user)
        .execute(&pool)
        .await
        .expect("insert");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let event = loop {
        let event = events::decision(&user, Uuid::now_v7(), true);
        let (status, body) = c.post_native(&json!([event])).await;
        assert_eq!(status, StatusCode::OK);
        if body["results"][0]["status"] == "suppressed" {
            break event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not suppressed within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let found = landed(EVENTS_TOPIC, &[events::id(&event)]).await;
    assert!(found.is_empty(), "a suppressed event was published");
    let metrics = reqwest::get(format!("{}/metrics", c.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("feedloop_collector_events_suppressed_total"),
        "{metrics}"
    );
    c.stop().await;
}

#[tokio::test]
async fn openapi_document_describes_the_api() {
    let c = TestCollector::start(|_| {}).await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", c.url))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.0.3");
    for path in ["/v1/events", "/v1/batch", "/readyz", "/metrics"] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    c.stop().await;
}

/// The read-back that keeps the spool drain from publishing twice finds every id since its
/// start time when that time falls inside a record batch. (The embedded broker answers a time
/// lookup with the start of the batch, so this passes without `Resume` too; the read-back
/// still reads again from further back whenever a read skips.)
#[tokio::test]
async fn the_read_back_finds_the_ids_of_a_batch_it_starts_inside() {
    use rdkafka::{
        message::{Header, OwnedHeaders},
        producer::{FutureProducer, FutureRecord},
    };
    let topic = format!("test.scan.{}", Uuid::now_v7());
    feedloop_core::kafka::create_missing(
        &feedloop_integration_tests::kafka(),
        &[(&topic, 1, false)],
    )
    .await
    .expect("topic");
    let producer: FutureProducer = feedloop_integration_tests::kafka()
        .client_config("scan-test")
        .set("linger.ms", "500")
        .create()
        .expect("producer");
    let t0 = events::now_ms() - 60_000;
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let mut sends = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let id = id.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: "event_id",
            value: Some(id.as_str()),
        });
        sends.push(
            producer
                .send_result(
                    FutureRecord::<(), _>::to(&topic)
                        .payload("x")
                        .headers(headers)
                        .timestamp(t0 + i as i64 * 1_000),
                )
                .expect("enqueue"),
        );
    }
    for s in sends {
        s.await.expect("delivered").expect("acked");
    }
    let found = feedloop_collector::scan::event_ids_since(
        &feedloop_integration_tests::kafka(),
        &[topic.as_str()],
        t0 + 2_500,
    )
    .await
    .expect("scan");
    for id in &ids[3..] {
        assert!(
            found.contains_key(&id.as_u128()),
            "{id} (after the start time) was not found: {found:?}"
        );
    }
}

/// `feedloop deadletters show` opens a rejected event's dead letter with its user's key; once
/// that key is destroyed (the user's erasure) the letter reads as erased, and nothing of it was
/// ever in the clear on the topic.
#[tokio::test]
async fn deadletters_show_opens_a_users_letter_until_their_erasure() {
    use feedloop::deadletters::{Connection, Filter, read};
    use feedloop_core::crypto::KeyStore;
    let c = TestCollector::start(|_| {}).await;
    let user = format!("dl-{}", Uuid::now_v7());
    let mut bad = events::decision(&user, Uuid::now_v7(), true);
    bad["properties"]["decision"] = json!("maybe");
    let event_id = events::id(&bad).to_string();
    let (status, body) = c.post_native(&json!([bad])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], 1, "{body}");
    let control = c.config.postgres.url.expose().to_owned();
    let connection = || Connection {
        dev: None,
        kafka: Some(infra().kafka_bootstrap),
        registry: Some(c.registry.url.clone()),
        registry_user: Some(c.registry.user.clone()),
        registry_password: Some(c.registry.password.clone()),
        control: Some(control.clone()),
        kek: Some(feedloop_integration_tests::test_kek().expose().to_owned()),
    };
    let filter = Filter {
        service: Some("collector".into()),
        id: None,
        limit: usize::MAX,
    };
    let mine = |letters: Vec<Value>| -> Vec<Value> {
        letters
            .into_iter()
            .filter(|l| l["event_id"] == event_id.as_str())
            .collect()
    };
    let letters = mine(read(connection(), filter.clone()).await.expect("read"));
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["sealed_by"], user.as_str());
    assert_eq!(letters[0]["original"]["state"], "clear", "{}", letters[0]);
    let text = letters[0]["original"]["text"].as_str().unwrap_or_default();
    assert!(text.contains(&format!("dev-{user}")), "{text}");
    assert!(
        !read_all(&infra().kafka_bootstrap, DEADLETTER_TOPIC)
            .await
            .iter()
            .any(|r| String::from_utf8_lossy(&r.value).contains(&format!("dev-{user}"))),
        "the device id is in the clear on the dead-letter topic"
    );

    // The user is erased: their key is destroyed, and the letter with it.
    let pool = sqlx::PgPool::connect(&control).await.expect("control");
    feedloop_integration_tests::test_key_store(pool.clone())
        .destroy(std::slice::from_ref(&user))
        .await
        .expect("destroy");
    let letters = mine(read(connection(), filter).await.expect("read"));
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["original"]["state"], "erased", "{}", letters[0]);
    assert!(letters[0]["original"].get("text").is_none());
    pool.close().await;
    c.stop().await;
}
