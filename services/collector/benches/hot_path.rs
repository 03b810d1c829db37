//! The collector's hot path — parse, validate and Avro-encode a batch of 50 realistic events —
//! against serde_json parsing the same bytes alone (DESIGN.md §Performance: ≥1M events/s per
//! core, within 3× of serde_json).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use feedloop_collector::{
    config::{FuturePolicy, TimeConfig},
    ingest::{Context, Parsed, native},
    pipeline::Codecs,
};
use serde_json::{Value, json};
use uuid::Uuid;

const BATCH: usize = 50;

fn batch(now: i64) -> Vec<u8> {
    let events: Vec<Value> = (0..BATCH)
        .map(|i| {
            let m = Uuid::now_v7();
            let env = |t: &str| {
                json!({"event_id": Uuid::now_v7(), "event_type": t, "user_id": format!("user-{i:06}"),
                       "device_id": "d3f1c2a4-7b1e-4a0e-9c55-0123456789ab", "session_id": "s-8812",
                       "timestamp": now - 5_000, "platform": "android", "app_version": "5.2.0", "os_version": "14"})
            };
            let (mut e, props) = match i % 3 {
                0 => (env("match_impression"), json!({"match_id": m, "candidate_id": format!("user-{:06}", i + 1),
                      "request_id": "r-77c1", "model_version": "ranker-2026-11-20", "experiment_id": "exp-42",
                      "experiment_arm": "treatment", "rank": i, "score": 0.8125,
                      "features": {"age_gap": 3, "affinity": 0.41, "same_lang": true, "dist_km": 12.5}})),
                1 => (env("match_decision"), json!({"match_id": m, "decision": "accept", "decision_latency_ms": 1300})),
                _ => (env("chat_ended"), json!({"match_id": m, "duration_ms": 95_000, "ended_by": "peer"})),
            };
            e["properties"] = props;
            e
        })
        .collect();
    serde_json::to_vec(&json!({"sent_at": now, "batch": events})).unwrap_or_default()
}

fn hot_path(c: &mut Criterion) {
    let now = 1_795_885_200_000;
    let body = batch(now);
    let codecs = Codecs::local().unwrap_or_else(|e| panic!("{e}"));
    let time = TimeConfig {
        max_future_ms: 300_000,
        future: FuturePolicy::Flag,
        max_age_ms: 604_800_000,
    };
    eprintln!("batch: {} events, {} bytes", BATCH, body.len());
    let mut group = c.benchmark_group("collector");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("serde_json_parse_only", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_slice(std::hint::black_box(&body)).unwrap_or_default();
            v
        })
    });
    group.bench_function("serde_json_skip_only", |b| {
        b.iter(|| {
            let v: serde::de::IgnoredAny = serde_json::from_slice(std::hint::black_box(&body))
                .unwrap_or(serde::de::IgnoredAny);
            v
        })
    });
    group.bench_function("parse_validate_encode", |b| {
        let mut out = Vec::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            let (events, sent_at) =
                native::split(std::hint::black_box(&body), 1000).unwrap_or_default();
            let ctx = Context {
                app_id: "bench",
                received_at: now,
                max_event_bytes: 32 * 1024,
                time: &time,
            };
            for raw in events {
                if let Parsed::Event(e) = native::parse_event(raw, sent_at, &ctx) {
                    let _ = codecs.encode_event(&e, &mut out);
                }
            }
            out.len()
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
