//! The bad-input battery: hostile requests and records against the whole stack (every service
//! a process of its own, configured as the dev stack is). After each input, a normal batch must
//! be answered `acked` (not spooled) and the labeler must still commit a probe example: no input
//! may wedge a service. Prints a table of inputs and answers (docs/reliability.md).

use std::{io::Write, time::Duration};

use feedloop_core::catalogue::{DEADLETTER_TOPIC, EVENTS_TOPIC};
use feedloop_integration_tests::log::read_all;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Fixture, ONE_AT_A_TIME, now_ms, stack::DATASET, within};

const DAY: i64 = 86_400_000;

/// A normal event at `at` (a decision on a new match).
fn event(user: &str, at: i64) -> Value {
    let mut e = feedloop_integration_tests::events::decision(user, Uuid::now_v7(), true);
    e["timestamp"] = json!(at);
    e
}

fn impression(user: &str, candidate: &str, at: i64) -> Value {
    let mut e = feedloop_integration_tests::events::impression(user, Uuid::now_v7());
    e["timestamp"] = json!(at);
    e["properties"]["candidate_id"] = json!(candidate);
    e
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// A malformed JSON body of exactly `len` bytes.
fn malformed(len: usize) -> Vec<u8> {
    let mut b = b"[{\"event_id\": \"".to_vec();
    b.resize(len, b'x');
    b
}

struct Battery<'a> {
    fx: &'a Fixture,
    /// (input, what it was answered, what happened next)
    rows: Vec<(String, String)>,
    probes: usize,
}

impl Battery<'_> {
    async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        gzipped: bool,
        key: bool,
    ) -> (StatusCode, Value) {
        let mut req = self
            .fx
            .http
            .post(format!("{}{path}", self.fx.stack.url("collector")))
            .header("content-type", "application/json")
            .body(body);
        if gzipped {
            req = req.header("content-encoding", "gzip");
        }
        if key {
            req = req.basic_auth(&self.fx.stack.write_key, Some(""));
        }
        let resp = req.send().await.expect("collector answers");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Sends `input` and checks the answer's status; the row keeps the answer.
    async fn expect(
        &mut self,
        input: &str,
        path: &str,
        body: Vec<u8>,
        gzipped: bool,
        status: StatusCode,
    ) -> Value {
        let (got, answer) = self.post(path, body, gzipped, true).await;
        assert_eq!(got, status, "{input}: {answer}");
        let code = answer["error"]["code"]
            .as_str()
            .or_else(|| answer["code"].as_str())
            .unwrap_or("");
        self.rows
            .push((input.to_owned(), format!("{} {code}", got.as_u16())));
        self.probe(input).await;
        answer
    }

    /// A normal batch is acknowledged by the broker, and the labeler commits an example of it.
    async fn probe(&mut self, after: &str) {
        self.probes += 1;
        let user = format!("probe-{}-{}", self.probes, Uuid::now_v7().simple());
        let now = now_ms();
        let batch = json!([
            impression(&user, "probe-candidate", now - 2 * DAY),
            event(&user, now - 1000),
        ]);
        let (status, answer) = self
            .post(
                "/v1/events",
                serde_json::to_vec(&batch).expect("json"),
                false,
                true,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "after {after}: {answer}");
        assert_eq!(
            answer["durability"], "acked",
            "after {after}, a normal batch must reach the broker: {answer}"
        );
        assert!(
            answer["results"]
                .as_array()
                .is_some_and(|r| r.iter().all(|e| e["status"] == "accepted")),
            "after {after}: {answer}"
        );
        let control = &self.fx.control;
        let committed = within(Duration::from_secs(90), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM labeler.partition_users WHERE dataset = $1 AND user_id = $2",
            )
            .bind(DATASET)
            .bind(&user)
            .fetch_one(control)
            .await
            .unwrap_or(0)
                > 0
        })
        .await;
        assert!(
            committed,
            "after {after}, the labeler did not commit the probe example"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bad_input_wedges_a_service() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fx = Fixture::up().await;
    let mut b = Battery {
        fx: &fx,
        rows: Vec::new(),
        probes: 0,
    };
    b.probe("start").await;

    // Bodies at and over every limit (1 MiB, 8 MiB gunzipped), malformed and gzipped.
    let mib = 1 << 20;
    b.expect(
        "malformed native body of exactly 1 MiB",
        "/v1/events",
        malformed(mib),
        false,
        StatusCode::BAD_REQUEST,
    )
    .await;
    b.expect(
        "native body of 1 MiB + 1 byte",
        "/v1/events",
        malformed(mib + 1),
        false,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    b.expect(
        "malformed Segment batch of exactly 1 MiB",
        "/v1/batch",
        malformed(mib),
        false,
        StatusCode::BAD_REQUEST,
    )
    .await;
    b.expect(
        "malformed gzipped body, 8 MiB gunzipped",
        "/v1/events",
        gzip(&malformed(8 * mib)),
        true,
        StatusCode::BAD_REQUEST,
    )
    .await;
    b.expect(
        "gzip bomb: 64 MiB gunzipped from about 64 KiB",
        "/v1/events",
        gzip(&vec![b' '; 64 * mib]),
        true,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    b.expect(
        "body labelled gzip that is not",
        "/v1/events",
        b"[{\"not\": \"gzip\"}]".to_vec(),
        true,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let now = now_ms();
    let long: Vec<Value> = (0..1001).map(|i| event(&format!("u{i}"), now)).collect();
    b.expect(
        "1,001 events in one batch (limit 1,000)",
        "/v1/events",
        serde_json::to_vec(&long).expect("json"),
        false,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    let mut big = event("u-big", now);
    big["properties"]["pad"] = json!("x".repeat(40 << 10));
    let answer = b
        .expect(
            "one event of 40 KiB (limit 32 KiB) in a normal batch",
            "/v1/events",
            serde_json::to_vec(&json!([big, event("u-small", now)])).expect("json"),
            false,
            StatusCode::OK,
        )
        .await;
    assert_eq!(answer["results"][0]["status"], "rejected", "{answer}");
    assert_eq!(answer["results"][1]["status"], "accepted", "{answer}");

    // Ids with NUL, bidi controls and emoji; numbers out of range.
    for (what, user, candidate) in [
        ("user id with NUL", "u\u{0}evil", "c-1"),
        ("candidate id with NUL", "u-nul-cand", "c\u{0}2"),
        (
            "user id with a right-to-left override",
            "u\u{202e}lve",
            "c-3",
        ),
        (
            "user and candidate ids of emoji",
            "😀👩\u{200d}👩\u{200d}👧",
            "🦀",
        ),
    ] {
        let batch = json!([impression(user, candidate, now_ms() - 2 * DAY)]);
        let answer = b
            .expect(
                what,
                "/v1/events",
                serde_json::to_vec(&batch).expect("json"),
                false,
                StatusCode::OK,
            )
            .await;
        let status = answer["results"][0]["status"].as_str().unwrap_or("");
        assert!(
            ["accepted", "rejected"].contains(&status),
            "{what}: {answer}"
        );
        if let Some(last) = b.rows.last_mut() {
            last.1 = format!("{} (event {status})", last.1);
        }
    }
    // The score is written into the JSON as text: 1e400 is no f64.
    for (what, field, number) in [
        ("rank of 10^20", "rank", "1e20"),
        ("rank of 2^31", "rank", "2147483648"),
        ("score of 10^400", "score", "1e400"),
        ("score of -10^400", "score", "-1e400"),
    ] {
        let mut imp = impression("u-numbers", "c-n", now_ms() - DAY);
        imp["properties"][field] = json!(31_415_926_535_i64);
        let body = serde_json::to_string(&json!([imp]))
            .expect("json")
            .replace("31415926535", number)
            .into_bytes();
        let (status, answer) = b.post("/v1/events", body.clone(), false, true).await;
        assert!(
            status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
            "{what}: {answer}"
        );
        b.rows.push((
            what.to_owned(),
            format!(
                "{} (event {})",
                status.as_u16(),
                answer["results"][0]["status"].as_str().unwrap_or("-")
            ),
        ));
        b.probe(what).await;
    }
    for (what, timestamp) in [
        ("timestamp -1", json!(-1)),
        ("timestamp i64::MAX", json!(i64::MAX)),
        ("timestamp 10^19", json!(1e19)),
    ] {
        let mut e = event("u-time", 0);
        e["timestamp"] = timestamp;
        let body = serde_json::to_vec(&json!([e])).expect("json");
        let (status, answer) = b.post("/v1/events", body, false, true).await;
        assert_eq!(status, StatusCode::OK, "{what}: {answer}");
        // A timestamp far ahead is clamped to the receive time and flagged ([time] future).
        let verdict = answer["results"][0]["status"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(
            ["accepted", "rejected"].contains(&verdict.as_str()),
            "{what}: {answer}"
        );
        b.rows
            .push((what.to_owned(), format!("200 (event {verdict})")));
        b.probe(what).await;
    }

    // The same impression record three times in the log.
    let triple = format!("triple-{}", Uuid::now_v7().simple());
    let imp = impression(&triple, "c-triple", now_ms() - 2 * DAY);
    let id = imp["event_id"].as_str().expect("id").to_owned();
    let (status, answer) = b
        .post(
            "/v1/events",
            serde_json::to_vec(&json!([imp])).expect("json"),
            false,
            true,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let bootstrap = fx.stack.broker.bootstrap();
    let record = read_all(&bootstrap, EVENTS_TOPIC)
        .await
        .into_iter()
        .find(|r| r.event_id.map(|u| u.to_string()) == Some(id.clone()))
        .expect("the impression in the log");
    let producer: FutureProducer = fx
        .stack
        .kafka()
        .client_config("battery")
        .create()
        .expect("producer");
    for _ in 0..2 {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_str()),
            });
        }
        producer
            .send(
                FutureRecord::to(EVENTS_TOPIC)
                    .key(&record.key)
                    .payload(&record.value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    // And a second impression, not closed yet, three times in one producer batch: the copies
    // are stored in the join state together (once: ON CONFLICT cannot touch a row twice).
    let burst = format!("burst-{}", Uuid::now_v7().simple());
    let registry = feedloop_core::registry_client::RegistryClient::new(
        &fx.stack.url("registry"),
        Some((
            "feedloop".into(),
            feedloop_core::config::Secret::new(fx.stack.token.clone()),
        )),
        "",
        Duration::from_secs(10),
    )
    .expect("registry client");
    let schemas = feedloop_integration_tests::labeler::event_schemas(&registry, EVENTS_TOPIC).await;
    let scenario = feedloop_integration_tests::labeler::Scenario {
        events: vec![feedloop_integration_tests::labeler::Ev::Impression(
            feedloop_integration_tests::labeler::Imp {
                event_id: Uuid::now_v7(),
                match_id: Uuid::now_v7(),
                viewer: burst.clone(),
                candidate: "c-burst".into(),
                time: now_ms() - 1000,
            },
        )],
        rows: Vec::new(),
        impressions: Vec::new(),
    };
    let (key, value) = feedloop_integration_tests::labeler::encoded(&scenario, &schemas)
        .pop()
        .expect("encoded");
    let batching: FutureProducer = fx
        .stack
        .kafka()
        .client_config("battery-burst")
        .set("linger.ms", "200")
        .create()
        .expect("producer");
    let sends: Vec<_> = (0..3)
        .map(|_| {
            batching
                .send_result(FutureRecord::to(EVENTS_TOPIC).key(&key).payload(&value))
                .unwrap_or_else(|(e, _)| panic!("enqueue: {e}"))
        })
        .collect();
    for s in sends {
        s.await
            .expect("delivered")
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    b.rows.push((
        "the same impression record three times in the log (once through the collector and twice after its example was emitted; another, still open, three times in one batch)".into(),
        "one row; the open one stored once in the join state".into(),
    ));
    b.probe("the same impression three times").await;

    // Unauthenticated large bodies on every route that takes a body.
    let body = vec![b'{'; 4 << 20];
    let routes = [
        ("collector", "POST", "/v1/events"),
        ("collector", "POST", "/v1/batch"),
        ("collector", "POST", "/v1/b"),
        ("collector", "POST", "/v1/import"),
        ("collector", "POST", "/v1/track"),
        ("collector", "POST", "/v1/identify"),
        ("collector", "POST", "/v1/page"),
        ("collector", "POST", "/v1/screen"),
        ("registry", "POST", "/subjects/x-value/versions"),
        ("registry", "POST", "/subjects/x-value"),
        ("registry", "PUT", "/config"),
        ("registry", "PUT", "/config/x-value"),
        ("registry", "PUT", "/mode"),
        (
            "registry",
            "POST",
            "/compatibility/subjects/x-value/versions/latest",
        ),
        ("eraser", "POST", "/v1/erasure-requests"),
        (
            "eraser",
            "POST",
            "/v1/erasure-requests/0193f5a0-0000-7000-8000-000000000001/retry",
        ),
    ];
    for (service, method, path) in routes {
        let started = std::time::Instant::now();
        let resp = fx
            .http
            .request(
                method.parse().expect("method"),
                format!("{}{path}", fx.stack.url(service)),
            )
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let status = resp.map(|r| r.status());
        assert!(
            matches!(status, Ok(StatusCode::UNAUTHORIZED | StatusCode::PAYLOAD_TOO_LARGE))
                // A server may answer 401 before the body is sent and close the connection.
                || status.as_ref().is_err_and(|e| e.is_request() || e.is_body()),
            "{service} {method} {path} without credentials: {status:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{service} {path} was slow"
        );
    }
    for service in [
        "registry",
        "collector",
        "cdc",
        "labeler",
        "eraser",
        "trigger",
    ] {
        assert!(
            fx.stack.ready(&fx.http, service).await,
            "{service} not ready after the unauthenticated bodies"
        );
    }
    b.rows.push((
        "4 MiB body without credentials, on every route that takes a body (16 routes of 3 services)"
            .into(),
        "401 (or 413), each in under 10 s; every service still ready".into(),
    ));
    b.probe("the unauthenticated bodies").await;

    // An oversized product row in cdc.
    sqlx::query(
        "INSERT INTO app.users (id, email, display_name, bio)
         SELECT 'battery-huge', 'h@example.com', 'H', string_agg(md5(random()::text), '')
         FROM generate_series(1, 40000)",
    )
    .execute(&fx.product)
    .await
    .expect("huge row");
    sqlx::query(
        "INSERT INTO app.users (id, email, display_name) VALUES ('battery-after', 'a@example.com', 'A')",
    )
    .execute(&fx.product)
    .await
    .expect("next row");
    let flowed = within(Duration::from_secs(60), || async {
        read_all(&bootstrap, "product.app.users")
            .await
            .iter()
            .any(|r| String::from_utf8_lossy(&r.key).contains("battery-after"))
    })
    .await;
    assert!(
        flowed,
        "the change after the oversized row did not reach Kafka"
    );
    let dead_lettered = read_all(&bootstrap, DEADLETTER_TOPIC)
        .await
        .iter()
        .any(|r| String::from_utf8_lossy(&r.value).contains("product.app.users"));
    assert!(dead_lettered, "the oversized row was not dead-lettered");
    b.rows.push((
        "a 1.3 MB product row (bio) in cdc".into(),
        "dead-lettered (first 64 KiB, size, SHA-256); the next change flows".into(),
    ));
    b.probe("the oversized product row").await;

    // The impression sent three times is one row.
    let data = feedloop_integration_tests::labeler::read_dataset(&fx.stack.datasets_root, DATASET);
    let rows = data["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["viewer_id"] == triple.as_str())
        .count();
    assert_eq!(rows, 1, "the impression three times in the log is one row");
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM labeler.impressions WHERE dataset = $1 AND $2 = ANY(users)",
    )
    .bind(DATASET)
    .bind(&burst)
    .fetch_one(&fx.control)
    .await
    .expect("join state");
    assert_eq!(
        stored, 1,
        "the impression three times in one batch is stored once"
    );

    let services_exited = fx.stack.exits.clone();
    assert!(
        services_exited.is_empty(),
        "services exited: {services_exited:?}"
    );
    println!("\n| input | answer |\n|---|---|");
    for (input, answer) in &b.rows {
        println!("| {input} | {answer} |");
    }
    println!(
        "\n{} probes: after each input, a normal batch was acked and the labeler committed its example.",
        b.probes
    );
}
