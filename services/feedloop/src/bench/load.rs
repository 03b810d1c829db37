//! An open-loop HTTP load generator: requests leave at a fixed rate whatever the server does,
//! and latency counts from the scheduled send time, so queueing is not hidden (no coordinated
//! omission).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// Events per request.
pub const BATCH: usize = 50;

/// A batch body with the byte offsets of every id to refresh per request.
#[derive(Debug, Clone)]
pub struct Template {
    body: Vec<u8>,
    event_ids: Vec<usize>,
    match_ids: Vec<usize>,
}

fn placeholder(kind: u8, i: usize) -> Uuid {
    Uuid::from_u128((u128::from(kind) << 120) | i as u128)
}

impl Template {
    /// 50 realistic events (impressions, decisions, chats) by 50 users.
    pub fn new() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let events: Vec<Value> = (0..BATCH)
            .map(|i| {
                let m = placeholder(2, i);
                let mut e = json!({"event_id": placeholder(1, i), "user_id": format!("user-{i:06}"),
                    "device_id": "d3f1c2a4-7b1e-4a0e-9c55-0123456789ab", "session_id": "s-8812",
                    "timestamp": now - 5_000, "platform": "android", "app_version": "5.2.0", "os_version": "14"});
                let (t, props) = match i % 3 {
                    0 => ("match_impression", json!({"match_id": m, "candidate_id": format!("user-{:06}", i + 1),
                        "request_id": "r-77c1", "model_version": "ranker-2026-11-20", "experiment_id": "exp-42",
                        "experiment_arm": "treatment", "rank": i, "score": 0.8125,
                        "features": {"age_gap": 3, "affinity": 0.41, "same_lang": true, "dist_km": 12.5}})),
                    1 => ("match_decision", json!({"match_id": m, "decision": "accept", "decision_latency_ms": 1300})),
                    _ => ("chat_ended", json!({"match_id": m, "duration_ms": 95_000, "ended_by": "peer"})),
                };
                e["event_type"] = json!(t);
                e["properties"] = props;
                e
            })
            .collect();
        let body =
            serde_json::to_vec(&json!({"sent_at": now, "batch": events})).unwrap_or_default();
        let find = |kind: u8| -> Vec<usize> {
            (0..BATCH)
                .filter_map(|i| {
                    let needle = placeholder(kind, i).to_string();
                    body.windows(needle.len())
                        .position(|w| w == needle.as_bytes())
                })
                .collect()
        };
        let event_ids = find(1);
        let match_ids = find(2);
        Self {
            body,
            event_ids,
            match_ids,
        }
    }

    /// A fresh body: new event ids (UUIDv7) and match ids.
    pub fn fresh(&self) -> Vec<u8> {
        let mut body = self.body.clone();
        let mut buf = [0u8; 36];
        for &at in &self.event_ids {
            body[at..at + 36].copy_from_slice(
                Uuid::now_v7()
                    .hyphenated()
                    .encode_lower(&mut buf)
                    .as_bytes(),
            );
        }
        for &at in &self.match_ids {
            body[at..at + 36].copy_from_slice(
                Uuid::new_v4()
                    .hyphenated()
                    .encode_lower(&mut buf)
                    .as_bytes(),
            );
        }
        body
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }
}

impl Default for Template {
    fn default() -> Self {
        Self::new()
    }
}

/// What one load step measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub target_events_per_s: f64,
    pub achieved_events_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub ok_requests: u64,
    pub failed_requests: u64,
}

fn new_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new(3).expect("3 significant digits is a valid precision")
}

/// Sends `rate` events/s (in batches of 50) to `url` for `duration`.
pub async fn step(
    client: &reqwest::Client,
    url: &str,
    auth: (&str, &str),
    template: &Template,
    rate: f64,
    duration: Duration,
) -> StepResult {
    let interval = Duration::from_secs_f64(BATCH as f64 / rate);
    let hist = Arc::new(Mutex::new(new_histogram()));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut n: u32 = 0;
    loop {
        let scheduled = start + interval * n;
        if scheduled >= start + duration {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        n += 1;
        let body = template.fresh();
        let req = client
            .post(format!("{url}/v1/events"))
            .basic_auth(auth.0, Some(auth.1))
            .header("content-type", "application/json")
            .body(body);
        let (hist, failed, ok) = (hist.clone(), failed.clone(), ok.clone());
        tasks.spawn(async move {
            let good = matches!(req.send().await, Ok(r) if r.status().is_success());
            let micros = scheduled.elapsed().as_micros() as u64;
            if good {
                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(mut h) = hist.lock() {
                    let _ = h.record(micros.max(1));
                }
            } else {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let ok = ok.load(std::sync::atomic::Ordering::Relaxed);
    let h = hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| new_histogram());
    StepResult {
        target_events_per_s: rate,
        achieved_events_per_s: (ok as f64 * BATCH as f64) / elapsed,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
        ok_requests: ok,
        failed_requests: failed.load(std::sync::atomic::Ordering::Relaxed),
    }
}
