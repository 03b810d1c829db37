//! Off-the-shelf Confluent clients (Python confluent-kafka with fastavro) against feedloop's
//! registry and the broker, in both directions.

use std::{path::PathBuf, time::Duration};

use feedloop_core::{
    catalogue::Catalogue,
    kafka::{KafkaConfig, create_missing},
    model::{Decision, Envelope, MatchDecision, Platform},
};
use feedloop_integration_tests::python;
use feedloop_integration_tests::{TestRegistry, infra};
use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;

fn decision(i: i64) -> MatchDecision {
    MatchDecision {
        envelope: Envelope {
            event_id: uuid::Uuid::now_v7(),
            event_type: "match_decision".into(),
            user_id: format!("user-{i}"),
            anonymous_id: None,
            device_id: Some(format!("device-{i}")),
            session_id: None,
            timestamp: 1_764_000_000_000 + i,
            client_timestamp: 1_764_000_000_000 + i,
            sent_at: Some(1_764_000_000_500),
            received_at: 1_764_000_000_600,
            app_id: "app".into(),
            platform: Platform::Web,
            app_version: "2.0".into(),
            os_version: None,
            clock_skew_flagged: false,
        },
        match_id: uuid::Uuid::now_v7(),
        decision: if i % 2 == 0 {
            Decision::Accept
        } else {
            Decision::Skip
        },
        decision_latency_ms: Some(100 * i),
    }
}

#[tokio::test]
async fn confluent_python_clients_round_trip_through_registry_and_broker() {
    let python = python();
    let infra = infra();
    let reg = TestRegistry::start().await;
    let client = reg.client();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let rust_topic = format!("it.rust.{run}");
    let py_topic = format!("it.py.{run}");

    create_missing(
        &KafkaConfig::new(infra.kafka_bootstrap.clone()),
        &[
            (rust_topic.as_str(), 1, false),
            (py_topic.as_str(), 1, false),
        ],
    )
    .await
    .expect("create topics");

    // Rust produces catalogue records, framed with the registry's id.
    let schema = Catalogue::embedded()
        .expect("catalogue")
        .composed("io.feedloop.events.MatchDecision")
        .expect("composes");
    let compiled = client
        .register_compiled(&format!("{rust_topic}-value"), &schema)
        .await
        .expect("register");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &infra.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    let sent: Vec<MatchDecision> = (0..4).map(decision).collect();
    for event in &sent {
        let mut frame = Vec::new();
        compiled.encode(event, &mut frame).expect("encode");
        let key = event.match_id.to_string();
        producer
            .send(
                FutureRecord::to(&rust_topic).key(&key).payload(&frame),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/confluent_roundtrip.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env("REGISTRY_URL", &reg.url)
        .env("REGISTRY_AUTH", format!("{}:{}", reg.user, reg.password))
        .env("KAFKA_BOOTSTRAP", &infra.kafka_bootstrap)
        .env("RUST_TOPIC", &rust_topic)
        .env("PY_TOPIC", &py_topic)
        .env("RUST_COUNT", sent.len().to_string())
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("python prints JSON");

    // Python decoded what Rust wrote, field for field.
    let rust_records = report["rust_records"].as_array().expect("records");
    assert_eq!(rust_records.len(), sent.len());
    for (got, want) in rust_records.iter().zip(&sent) {
        assert_eq!(got["match_id"], want.match_id.to_string());
        assert_eq!(
            got["decision"],
            if want.decision == Decision::Accept {
                "accept"
            } else {
                "skip"
            }
        );
        assert_eq!(got["envelope"]["user_id"], want.envelope.user_id);
        assert_eq!(
            got["envelope"]["device_id"],
            want.envelope.device_id.clone().unwrap_or_default()
        );
        assert_eq!(
            got["decision_latency_ms"],
            want.decision_latency_ms.unwrap_or_default()
        );
    }
    // Python's own round trip, and its registry calls.
    assert_eq!(report["py_back"], report["py_sent"]);
    assert_eq!(report["latest_version"], 1);
    assert_eq!(report["lookup_id"], report["latest_id"]);
    assert_eq!(report["reregister_id"], report["latest_id"]);
    assert_eq!(report["fetched_type"], "AVRO");

    // Rust decodes what Python wrote, fetching Python's schema by id.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &infra.kafka_bootstrap)
        .set("group.id", format!("it-{run}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&py_topic]).expect("subscribe");
    let fresh = reg.client();
    let mut decoded = Vec::new();
    while decoded.len() < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("python records arrive")
            .expect("consume");
        let value: Value = fresh
            .decode(msg.payload().unwrap_or_default())
            .await
            .expect("decode python record");
        decoded.push(value);
    }
    let py_sent = report["py_sent"].as_array().expect("sent");
    for (got, want) in decoded.iter().zip(py_sent) {
        assert_eq!(got["id"], want["id"]);
        assert_eq!(got["n"], want["n"]);
        assert_eq!(got["tags"], want["tags"]);
    }
}
