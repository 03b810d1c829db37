//! `feedloop bench codec`: the collector's hot path on one core — split a batch of 50 realistic
//! events, parse and validate each, Avro-encode it — against serde_json parsing the same bytes
//! into a `Value` alone; and the same path with the device id sealed (crypto-shredding).

use std::{path::PathBuf, time::Instant};

use feedloop_collector::{
    config::{FuturePolicy, TimeConfig},
    ingest::{Context, Parsed, native},
    pipeline::Codecs,
};
use feedloop_core::crypto::DataKey;
use serde::Serialize;
use serde_json::Value;

use super::{Machine, Row, Stat, load::Template, machine, print_table};

#[derive(Debug, Clone)]
pub struct Options {
    pub repetitions: usize,
    /// Seconds per repetition of each measurement.
    pub seconds: f64,
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    machine: Machine,
    batch_events: usize,
    batch_bytes: usize,
    rows: Vec<Row>,
    peak_rss_mib: Option<f64>,
}

/// Events per second of `step` (one batch per call) over `seconds`.
fn rate(seconds: f64, events_per_call: usize, mut step: impl FnMut()) -> f64 {
    // Warm up, then time whole calls.
    for _ in 0..50 {
        step();
    }
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..20 {
            step();
        }
        calls += 20;
    }
    (calls as f64 * events_per_call as f64) / started.elapsed().as_secs_f64()
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    let body = Template::new().fresh();
    let codecs = Codecs::local()?;
    let time = TimeConfig {
        max_future_ms: 300_000,
        future: FuturePolicy::Flag,
        max_age_ms: 604_800_000,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let ctx = Context {
        app_id: "bench",
        received_at: now,
        max_event_bytes: 32 * 1024,
        time: &time,
    };
    let key = DataKey::generate();
    let events = super::load::BATCH;
    // One batch through the hot path; `seal` seals the personal fields first, as the collector
    // does. Counts the events encoded, so that a broken path cannot look fast.
    let path = |seal: bool, out: &mut Vec<u8>| -> usize {
        out.clear();
        let Ok((raws, sent_at)) = native::split(std::hint::black_box(&body), 1000) else {
            return 0;
        };
        let mut n = 0;
        for raw in raws {
            if let Parsed::Event(mut e) = native::parse_event(raw, sent_at, &ctx) {
                if seal && e.seal_personal(Some(&key)).is_err() {
                    continue;
                }
                if codecs.encode_event(&e, out).is_ok() {
                    n += 1;
                }
            }
        }
        n
    };
    let mut out = Vec::with_capacity(64 * 1024);
    anyhow::ensure!(
        path(false, &mut out) == events && path(true, &mut out) == events,
        "the hot path did not encode every event of the batch"
    );
    println!(
        "Codec: a batch of {events} events ({} bytes), {} repetitions of {:.1} s, one core…",
        body.len(),
        opts.repetitions,
        opts.seconds
    );
    let (mut plain, mut sealed, mut json) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..opts.repetitions {
        let p = rate(opts.seconds, events, || {
            std::hint::black_box(path(false, &mut out));
        });
        let s = rate(opts.seconds, events, || {
            std::hint::black_box(path(true, &mut out));
        });
        let j = rate(opts.seconds, events, || {
            let v: Value = serde_json::from_slice(std::hint::black_box(&body)).unwrap_or_default();
            std::hint::black_box(v);
        });
        println!(
            "  rep {}: parse+validate+encode {p:.0} ev/s, with sealing {s:.0} ev/s, serde_json Value {j:.0} ev/s",
            rep + 1
        );
        plain.push(p);
        sealed.push(s);
        json.push(j);
    }
    let (plain, sealed, json) = (Stat::of(plain), Stat::of(sealed), Stat::of(json));
    let rows = vec![
        Row {
            measurement: "parse + validate + Avro-encode, one core".into(),
            unit: "events/s".into(),
            ratio: Some(plain.median / json.median.max(1e-9)),
            feedloop: plain,
            against: "serde_json into a Value, same bytes".into(),
            peer: Some(json.clone()),
            goal: "≥ 1M events/s/core; within 3× of serde_json (ratio ≥ 0.33)".into(),
        },
        Row {
            measurement: "… with the device id sealed (XChaCha20-Poly1305)".into(),
            unit: "events/s".into(),
            ratio: Some(sealed.median / json.median.max(1e-9)),
            feedloop: sealed,
            against: "serde_json into a Value, same bytes".into(),
            peer: Some(json),
            goal: "what crypto-shredding costs on the hot path".into(),
        },
    ];
    print_table("feedloop bench codec", &machine, &rows);
    let report = Report {
        scenario: "codec",
        machine,
        batch_events: events,
        batch_bytes: body.len(),
        rows,
        peak_rss_mib: super::peak_rss_mib(std::process::id()),
    };
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&report)?)?;
    println!("Report written to {}", opts.out.display());
    Ok(())
}
