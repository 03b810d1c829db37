//! The registry against a real Postgres, over HTTP, as Confluent clients use it.

use feedloop_integration_tests::TestRegistry;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn record(fields: &str) -> String {
    format!(r#"{{"type":"record","name":"R","namespace":"t","fields":[{fields}]}}"#)
}

async fn call(
    reg: &TestRegistry,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = reg.request(method, path);
    if let Some(body) = body {
        req = req
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string());
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

async fn register(reg: &TestRegistry, subject: &str, schema: &str) -> (StatusCode, Value) {
    call(
        reg,
        Method::POST,
        &format!("/subjects/{subject}/versions"),
        Some(json!({ "schema": schema })),
    )
    .await
}

async fn set_level(reg: &TestRegistry, subject: &str, level: &str) {
    let (status, body) = call(
        reg,
        Method::PUT,
        &format!("/config/{subject}"),
        Some(json!({ "compatibility": level })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["compatibility"], level);
}

/// Registers `old` then `new` under `level`; returns whether `new` was accepted, asserting
/// Confluent's 409 shape when not.
async fn evolves(
    reg: &TestRegistry,
    subject: &str,
    level: &str,
    history: &[&str],
    new: &str,
) -> bool {
    // The history itself is registered without checks; only the last step is judged.
    set_level(reg, subject, "NONE").await;
    for old in history {
        let (status, body) = register(reg, subject, old).await;
        assert_eq!(status, StatusCode::OK, "history must register: {body}");
    }
    set_level(reg, subject, level).await;
    let (status, body) = register(reg, subject, new).await;
    match status {
        StatusCode::OK => true,
        StatusCode::CONFLICT => {
            assert_eq!(body["error_code"], 409, "{body}");
            let msg = body["message"].as_str().unwrap_or_default();
            assert!(msg.contains("incompatible"), "{msg}");
            assert!(msg.contains(&format!("compatibility: '{level}'")), "{msg}");
            false
        }
        other => panic!("unexpected {other}: {body}"),
    }
}

#[tokio::test]
async fn adding_a_field_without_default_breaks_backward_only() {
    let reg = TestRegistry::start().await;
    let v1 = record(r#"{"name":"a","type":"int"}"#);
    let v2 = record(r#"{"name":"a","type":"int"},{"name":"b","type":"string"}"#);
    assert!(!evolves(&reg, "add-bw", "BACKWARD", &[&v1], &v2).await);
    assert!(evolves(&reg, "add-fw", "FORWARD", &[&v1], &v2).await);
    assert!(!evolves(&reg, "add-full", "FULL", &[&v1], &v2).await);
    assert!(evolves(&reg, "add-none", "NONE", &[&v1], &v2).await);
}

#[tokio::test]
async fn removing_a_field_without_default_breaks_forward_only() {
    let reg = TestRegistry::start().await;
    let v1 = record(r#"{"name":"a","type":"int"},{"name":"b","type":"string"}"#);
    let v2 = record(r#"{"name":"a","type":"int"}"#);
    assert!(evolves(&reg, "rm-bw", "BACKWARD", &[&v1], &v2).await);
    assert!(!evolves(&reg, "rm-fw", "FORWARD", &[&v1], &v2).await);
    assert!(!evolves(&reg, "rm-full", "FULL", &[&v1], &v2).await);
}

#[tokio::test]
async fn int_to_long_is_backward_but_long_to_int_breaks() {
    let reg = TestRegistry::start().await;
    let int = record(r#"{"name":"a","type":"int"}"#);
    let long = record(r#"{"name":"a","type":"long"}"#);
    assert!(evolves(&reg, "widen", "BACKWARD", &[&int], &long).await);
    assert!(!evolves(&reg, "narrow", "BACKWARD", &[&long], &int).await);
    // An old int reader cannot read longs: int->long is not FORWARD compatible.
    assert!(!evolves(&reg, "widen-fw", "FORWARD", &[&int], &long).await);
}

#[tokio::test]
async fn enum_symbol_addition() {
    let reg = TestRegistry::start().await;
    let e = |symbols: &str, default: &str| {
        record(&format!(
            r#"{{"name":"d","type":{{"type":"enum","name":"D","symbols":[{symbols}]{default}}}}}"#
        ))
    };
    let two = e(r#""A","B""#, "");
    let three = e(r#""A","B","C""#, "");
    assert!(evolves(&reg, "enum-bw", "BACKWARD", &[&two], &three).await);
    assert!(!evolves(&reg, "enum-fw", "FORWARD", &[&two], &three).await);
    // With an enum default, old readers map the new symbol to it: FULL holds.
    let two_d = e(r#""A","B""#, r#","default":"A""#);
    let three_d = e(r#""A","B","C""#, r#","default":"A""#);
    assert!(evolves(&reg, "enum-full", "FULL", &[&two_d], &three_d).await);
}

#[tokio::test]
async fn union_widening() {
    let reg = TestRegistry::start().await;
    let narrow = record(r#"{"name":"a","type":["null","int"],"default":null}"#);
    let wide = record(r#"{"name":"a","type":["null","int","string"],"default":null}"#);
    assert!(evolves(&reg, "union-bw", "BACKWARD", &[&narrow], &wide).await);
    assert!(!evolves(&reg, "union-fw", "FORWARD", &[&narrow], &wide).await);
    assert!(!evolves(&reg, "union-shrink", "BACKWARD", &[&wide], &narrow).await);
}

#[tokio::test]
async fn transitive_levels_check_every_version_not_just_the_latest() {
    let reg = TestRegistry::start().await;
    // v1 has a:int; v2 drops it; v3 brings a back as a string with a default. v3 reads v2 data
    // (a takes its default) but not v1 data (int is not a string).
    let v1 = record(r#"{"name":"a","type":"int"}"#);
    let v2 = record(r#"{"name":"b","type":"int","default":0}"#);
    let v3 = record(
        r#"{"name":"a","type":"string","default":""},{"name":"b","type":"int","default":0}"#,
    );
    let history = [v1.as_str(), v2.as_str()];
    assert!(evolves(&reg, "tr-bw", "BACKWARD", &history, &v3).await);
    assert!(!evolves(&reg, "tr-bwt", "BACKWARD_TRANSITIVE", &history, &v3).await);
    assert!(evolves(&reg, "tr-fw", "FORWARD", &history, &v3).await);
    assert!(!evolves(&reg, "tr-fwt", "FORWARD_TRANSITIVE", &history, &v3).await);
    assert!(!evolves(&reg, "tr-fullt", "FULL_TRANSITIVE", &history, &v3).await);
}

#[tokio::test]
async fn verbose_compatibility_says_why() {
    let reg = TestRegistry::start().await;
    let v1 = record(r#"{"name":"a","type":"int"}"#);
    assert_eq!(register(&reg, "verbose", &v1).await.0, StatusCode::OK);
    let v2 = record(r#"{"name":"a","type":"int"},{"name":"email","type":"string"}"#);
    let (status, body) = call(
        &reg,
        Method::POST,
        "/compatibility/subjects/verbose/versions/latest?verbose=true",
        Some(json!({ "schema": v2 })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["is_compatible"], false);
    let messages: Vec<&str> = body["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("READER_FIELD_MISSING_DEFAULT_VALUE")
                && m.contains("'email'")
                && m.contains("/fields/1")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("oldSchemaVersion: 1")),
        "{messages:?}"
    );
    // Without verbose, just the verdict.
    let (_, body) = call(
        &reg,
        Method::POST,
        "/compatibility/subjects/verbose/versions/1",
        Some(json!({ "schema": v2 })),
    )
    .await;
    assert_eq!(body, json!({"is_compatible": false}));
    // Against all versions, a compatible change.
    let v3 = record(r#"{"name":"a","type":"int"},{"name":"email","type":"string","default":""}"#);
    let (_, body) = call(
        &reg,
        Method::POST,
        "/compatibility/subjects/verbose/versions?verbose=true",
        Some(json!({ "schema": v3 })),
    )
    .await;
    assert_eq!(body["is_compatible"], true, "{body}");
}

#[tokio::test]
async fn registration_is_idempotent_and_ids_are_global() {
    let reg = TestRegistry::start().await;
    let schema = record(r#"{"name":"a","type":"int","doc":"an int"}"#);
    let (_, first) = register(&reg, "idem", &schema).await;
    let id = first["id"].as_i64().unwrap_or_default();
    assert!(id > 0, "{first}");
    // Same schema spelled differently: same id, no new version.
    let respelled = r#"{ "fields": [ {"doc": "an int", "type": {"type": "int"}, "name": "a"} ],
                          "namespace": "t", "name": "R", "type": "record" }"#;
    let (_, again) = register(&reg, "idem", respelled).await;
    assert_eq!(again["id"].as_i64(), Some(id));
    let (_, versions) = call(&reg, Method::GET, "/subjects/idem/versions", None).await;
    assert_eq!(versions, json!([1]));
    // The same schema under another subject keeps its id.
    let (_, other) = register(&reg, "idem-other", &schema).await;
    assert_eq!(other["id"].as_i64(), Some(id));
    let (_, by_id) = call(&reg, Method::GET, &format!("/schemas/ids/{id}"), None).await;
    assert!(
        by_id["schema"]
            .as_str()
            .unwrap_or_default()
            .contains("\"an int\""),
        "{by_id}"
    );
    let (_, usages) = call(
        &reg,
        Method::GET,
        &format!("/schemas/ids/{id}/versions"),
        None,
    )
    .await;
    assert_eq!(
        usages,
        json!([{"subject": "idem", "version": 1}, {"subject": "idem-other", "version": 1}])
    );
    // Lookup finds the version; an unknown schema is 40403.
    let (status, found) = call(
        &reg,
        Method::POST,
        "/subjects/idem",
        Some(json!({"schema": respelled})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found["version"], 1);
    assert_eq!(found["id"].as_i64(), Some(id));
    let (status, missing) = call(
        &reg,
        Method::POST,
        "/subjects/idem",
        Some(json!({"schema": record(r#"{"name":"z","type":"int"}"#)})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error_code"], 40403);
}

#[tokio::test]
async fn soft_and_permanent_delete() {
    let reg = TestRegistry::start().await;
    let v1 = record(r#"{"name":"a","type":"int"}"#);
    let v2 = record(r#"{"name":"a","type":"int"},{"name":"b","type":"int","default":1}"#);
    register(&reg, "del", &v1).await;
    register(&reg, "del", &v2).await;

    // Permanent delete before a soft delete is refused.
    let (status, body) = call(
        &reg,
        Method::DELETE,
        "/subjects/del/versions/1?permanent=true",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error_code"], 40407);
    let (status, body) = call(&reg, Method::DELETE, "/subjects/del?permanent=true", None).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (StatusCode::NOT_FOUND, json!(40405))
    );

    // Soft-delete version 1: hidden, but visible with deleted=true.
    let (status, body) = call(&reg, Method::DELETE, "/subjects/del/versions/1", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!(1)));
    let (_, body) = call(&reg, Method::DELETE, "/subjects/del/versions/1", None).await;
    assert_eq!(body["error_code"], 40406);
    assert_eq!(
        call(&reg, Method::GET, "/subjects/del/versions", None)
            .await
            .1,
        json!([2])
    );
    assert_eq!(
        call(
            &reg,
            Method::GET,
            "/subjects/del/versions?deleted=true",
            None
        )
        .await
        .1,
        json!([1, 2])
    );
    let (status, body) = call(&reg, Method::GET, "/subjects/del/versions/1", None).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (StatusCode::NOT_FOUND, json!(40402))
    );
    assert_eq!(
        call(
            &reg,
            Method::GET,
            "/subjects/del/versions/1?deleted=true",
            None
        )
        .await
        .1["version"],
        1
    );

    // Soft-delete the subject: gone from the list, kept with deleted=true.
    let (status, body) = call(&reg, Method::DELETE, "/subjects/del", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!([2])));
    let (_, body) = call(&reg, Method::DELETE, "/subjects/del", None).await;
    assert_eq!(body["error_code"], 40404);
    let (_, subjects) = call(&reg, Method::GET, "/subjects", None).await;
    assert!(
        !subjects
            .as_array()
            .is_some_and(|s| s.contains(&json!("del"))),
        "{subjects}"
    );
    let (_, subjects) = call(&reg, Method::GET, "/subjects?deleted=true", None).await;
    assert!(
        subjects
            .as_array()
            .is_some_and(|s| s.contains(&json!("del"))),
        "{subjects}"
    );
    let (status, body) = call(&reg, Method::GET, "/subjects/del/versions", None).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (StatusCode::NOT_FOUND, json!(40401))
    );

    // Ids survive a soft delete; a permanent delete removes the versions for good.
    let (_, first) = register(&reg, "keep", &v1).await;
    let (status, body) = call(&reg, Method::DELETE, "/subjects/del?permanent=true", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!([1, 2])));
    let (_, subjects) = call(&reg, Method::GET, "/subjects?deleted=true", None).await;
    assert_eq!(subjects, json!(["keep"]));
    let (status, _) = call(
        &reg,
        Method::GET,
        &format!("/schemas/ids/{}", first["id"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // Registering again after a delete starts a live history again.
    let (status, _) = register(&reg, "del", &v1).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        call(&reg, Method::GET, "/subjects/del/versions", None)
            .await
            .1,
        json!([1])
    );
}

#[tokio::test]
async fn errors_use_confluent_codes() {
    let reg = TestRegistry::start().await;
    let cases: Vec<(Method, &str, Option<Value>, StatusCode, i64)> = vec![
        (
            Method::GET,
            "/subjects/nope/versions",
            None,
            StatusCode::NOT_FOUND,
            40401,
        ),
        (
            Method::GET,
            "/subjects/nope/versions/latest",
            None,
            StatusCode::NOT_FOUND,
            40401,
        ),
        (
            Method::GET,
            "/schemas/ids/4242",
            None,
            StatusCode::NOT_FOUND,
            40403,
        ),
        (
            Method::GET,
            "/subjects/nope/versions/zero",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
        ),
        (
            Method::POST,
            "/subjects/x/versions",
            Some(json!({"schema": "{\"type\":\"record\"}"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
        ),
        (
            Method::POST,
            "/subjects/x/versions",
            Some(json!({"schema": "not json"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
        ),
        (
            Method::POST,
            "/subjects/x/versions",
            Some(json!({"nope": 1})),
            StatusCode::BAD_REQUEST,
            400,
        ),
        (
            Method::PUT,
            "/config",
            Some(json!({"compatibility": "SIDEWAYS"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
        ),
        (
            Method::GET,
            "/config/nope",
            None,
            StatusCode::NOT_FOUND,
            40408,
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = call(&reg, method.clone(), path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(
            answer["error_code"].as_i64(),
            Some(code),
            "{method} {path}: {answer}"
        );
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn api_requires_credentials_but_ops_routes_do_not() {
    let reg = TestRegistry::start().await;
    let http = reqwest::Client::new();
    let anonymous = http
        .get(format!("{}/subjects", reg.url))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = http
        .get(format!("{}/subjects", reg.url))
        .basic_auth(&reg.user, Some("wrong"))
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let body: Value = wrong.json().await.expect("json");
    assert_eq!(body["error_code"], 401);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let resp = http
            .get(format!("{}{path}", reg.url))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let metrics = http
        .get(format!("{}/metrics", reg.url))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("feedloop_registry_http_requests_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let reg = TestRegistry::start().await;
    let huge = "x".repeat(128 * 1024);
    let (status, _) = call(
        &reg,
        Method::POST,
        "/subjects/big/versions",
        Some(json!({"schema": huge})),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn config_per_subject_and_global() {
    let reg = TestRegistry::start().await;
    assert_eq!(
        call(&reg, Method::GET, "/config", None).await.1,
        json!({"compatibilityLevel": "BACKWARD"})
    );
    let (_, body) = call(&reg, Method::GET, "/config/s?defaultToGlobal=true", None).await;
    assert_eq!(body, json!({"compatibilityLevel": "BACKWARD"}));
    set_level(&reg, "s", "FULL_TRANSITIVE").await;
    assert_eq!(
        call(&reg, Method::GET, "/config/s", None).await.1,
        json!({"compatibilityLevel": "FULL_TRANSITIVE"})
    );
    let (status, body) = call(
        &reg,
        Method::PUT,
        "/config",
        Some(json!({"compatibility": "NONE"})),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"compatibility": "NONE"}))
    );
    // The global level now applies to subjects without their own.
    let v1 = record(r#"{"name":"a","type":"int"}"#);
    let v2 = record(r#"{"name":"a","type":"string"}"#);
    register(&reg, "g", &v1).await;
    assert_eq!(register(&reg, "g", &v2).await.0, StatusCode::OK);
    let (_, body) = call(&reg, Method::DELETE, "/config/s", None).await;
    assert_eq!(body, json!({"compatibilityLevel": "FULL_TRANSITIVE"}));
    assert_eq!(
        call(&reg, Method::GET, "/config/s", None).await.1["error_code"],
        40408
    );
}

#[tokio::test]
async fn rust_client_registers_encodes_and_decodes() {
    use feedloop_core::{
        catalogue::Catalogue,
        model::{Decision, Envelope, MatchDecision, Platform},
    };
    let reg = TestRegistry::start().await;
    let client = reg.client();
    let catalogue = Catalogue::embedded().expect("catalogue");
    let schema = catalogue
        .composed("io.feedloop.events.MatchDecision")
        .expect("composes");
    let compiled = client
        .register_compiled("feedloop.events-io.feedloop.events.MatchDecision", &schema)
        .await
        .expect("register");
    let event = MatchDecision {
        envelope: Envelope {
            event_id: uuid::Uuid::now_v7(),
            event_type: "match_decision".into(),
            user_id: "u1".into(),
            anonymous_id: None,
            device_id: None,
            session_id: None,
            timestamp: 1,
            client_timestamp: 1,
            sent_at: None,
            received_at: 2,
            app_id: "a".into(),
            platform: Platform::Ios,
            app_version: "1".into(),
            os_version: None,
            clock_skew_flagged: false,
        },
        match_id: uuid::Uuid::now_v7(),
        decision: Decision::Skip,
        decision_latency_ms: None,
    };
    let mut frame = Vec::new();
    compiled.encode(&event, &mut frame).expect("encode");
    // A second client starts with empty caches and must fetch the writer schema by id.
    let fresh = reg.client();
    let back: MatchDecision = fresh.decode(&frame).await.expect("decode");
    assert_eq!(back, event);
    // An id the registry never issued is a typed error.
    let mut unknown = frame.clone();
    unknown[1..5].copy_from_slice(&9999u32.to_be_bytes());
    let err = fresh
        .decode::<MatchDecision>(&unknown)
        .await
        .expect_err("unknown id");
    assert!(err.to_string().contains("unknown schema id 9999"), "{err}");
}
