//! `feedloop bench collector`: the collector through HTTP to an acknowledged broker, against a
//! bare rdkafka producer of the same messages (the limit) and a FastAPI collector doing the
//! same work (the peer), all on the same broker in one run.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use feedloop_collector::{
    config::{FuturePolicy, TimeConfig},
    ingest::{self, Parsed},
    pipeline::Codecs,
};
use feedloop_core::{
    catalogue::{EVENTS_TOPIC, TOPICS},
    kafka::{KafkaConfig, ensure_topics},
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use super::{
    Machine, Proc, Row, Stat, cpu_seconds, goal_row, load, machine, peak_rss_mib, print_table,
};
use crate::dev::{Broker, PgCluster, Storage, process::free_port};

/// Options of the scenario.
#[derive(Debug, Clone)]
pub struct Options {
    pub step_seconds: u64,
    pub repetitions: usize,
    pub out: PathBuf,
    /// Skip the FastAPI peer (it needs Python and PyPI).
    pub no_peer: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    machine: Machine,
    rows: Vec<Row>,
    sweep: Vec<load::StepResult>,
    null_sink_sweep: Vec<load::StepResult>,
    peer_sweep: Vec<load::StepResult>,
    producer_config: BTreeMap<String, String>,
}

/// The collector binary beside this one (build both in release).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().map(|d| d.join(name)).unwrap_or_default();
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p feedloop -p feedloop-collector`",
            bin.display()
        );
    }
    Ok(bin)
}

/// The messages the collector would publish for a template batch, pre-encoded.
fn encoded_messages(template: &load::Template) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let codecs = Codecs::local()?;
    let body = template.fresh();
    let (events, sent_at) =
        ingest::native::split(&body, 1000).map_err(|e| anyhow::anyhow!("{e}"))?;
    let time = TimeConfig {
        max_future_ms: 300_000,
        future: FuturePolicy::Flag,
        max_age_ms: 604_800_000,
    };
    let ctx = ingest::Context {
        app_id: "bench",
        received_at: crate::bench::collector::now_ms(),
        max_event_bytes: 32 * 1024,
        time: &time,
    };
    let mut out = Vec::new();
    for raw in events {
        if let Parsed::Event(e) = ingest::native::parse_event(raw, sent_at, &ctx) {
            let mut value = Vec::new();
            codecs.encode_event(&e, &mut value)?;
            let key = e
                .match_id()
                .map(|m| m.to_string())
                .unwrap_or_default()
                .into_bytes();
            out.push((key, value));
        }
    }
    Ok(out)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The limit: a bare idempotent rdkafka producer sending the same pre-encoded messages, with
/// the collector's producer settings, as fast as acks allow. Messages per second.
async fn bare_producer(
    kafka: &KafkaConfig,
    producer_props: &BTreeMap<String, String>,
    messages: &[(Vec<u8>, Vec<u8>)],
    total: usize,
) -> anyhow::Result<f64> {
    let producer: FutureProducer =
        kafka.producer(feedloop_collector::durable::CLIENT_ID, producer_props)?;
    let start = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..total {
        let (key, value) = &messages[i % messages.len()];
        loop {
            match producer.send_result(FutureRecord::to(EVENTS_TOPIC).key(key).payload(value)) {
                Ok(f) => {
                    in_flight.push_back(f);
                    break;
                }
                Err(_) => {
                    // Queue full: wait for the oldest acknowledgement.
                    if let Some(f) = in_flight.pop_front() {
                        let _ = f.await;
                    }
                }
            }
        }
        if in_flight.len() > 100_000
            && let Some(f) = in_flight.pop_front()
        {
            let _ = f.await;
        }
    }
    let mut failed = 0;
    for f in in_flight {
        if !matches!(f.await, Ok(Ok(_))) {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} bare produces failed");
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

#[allow(clippy::too_many_arguments)]
fn collector_config(
    dir: &Path,
    port: u16,
    kafka: &KafkaConfig,
    registry: &str,
    password: &str,
    postgres: &str,
    write_key: &str,
    sink: &str,
) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:{port}"
[kafka]
bootstrap = "{bootstrap}"
[registry]
url = "{registry}"
user = "feedloop"
password = "{password}"
[postgres]
url = "{postgres}"
[auth.apps.bench]
keys = ["{write_key}"]
[limits]
events_per_second = 100000000
burst = 100000000
[spool]
dir = "{spool}"
[sink]
kind = "{sink}"
[keys]
kek = "{kek}"
[log]
json = true
"#,
        kek = super::bench_kek(),
        bootstrap = kafka.bootstrap,
        spool = dir.join("spool").display(),
    )
}

/// Raises the rate until the server falls behind; returns the sweep.
async fn sweep(
    client: &reqwest::Client,
    url: &str,
    auth: (&str, &str),
    template: &load::Template,
    step: Duration,
) -> Vec<load::StepResult> {
    let mut out = Vec::new();
    let mut rate = 5_000.0;
    loop {
        let r = load::step(client, url, auth, template, rate, step).await;
        println!(
            "  {:>8.0} ev/s offered → {:>8.0} ev/s acknowledged, p50 {:>7.1} ms, p99 {:>7.1} ms, {} failed",
            r.target_events_per_s, r.achieved_events_per_s, r.p50_ms, r.p99_ms, r.failed_requests
        );
        let behind =
            r.achieved_events_per_s < 0.9 * rate || r.p99_ms > 2_000.0 || r.failed_requests > 0;
        out.push(r);
        if behind || rate >= 1_000_000.0 {
            return out;
        }
        rate *= 1.5;
    }
}

/// The highest rate the server kept up with; if it never did, the most it acknowledged.
fn max_sustained(sweep: &[load::StepResult]) -> f64 {
    let kept_up = sweep
        .iter()
        .filter(|r| {
            r.failed_requests == 0 && r.achieved_events_per_s >= 0.9 * r.target_events_per_s
        })
        .map(|r| r.achieved_events_per_s)
        .fold(0.0, f64::max);
    if kept_up > 0.0 {
        kept_up
    } else {
        sweep
            .iter()
            .map(|r| r.achieved_events_per_s)
            .fold(1.0, f64::max)
    }
}

/// Runs the scenario.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    let step = Duration::from_secs(opts.step_seconds);
    let collector_bin = sibling("collector")?;
    println!("Starting Postgres, the broker and the registry…");
    let pg = PgCluster::start().await?;
    let broker = Broker::start(Storage::Memory).await?;
    let kafka = KafkaConfig::new(broker.bootstrap());
    let producer_props = feedloop_collector::Config::from_defaults()?.producer;
    ensure_topics(&kafka, TOPICS).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (registry_url, password) = super::registry(&pg.url(), &shutdown).await?;
    let template = load::Template::new();
    let messages = encoded_messages(&template)?;
    let avg_bytes = messages.iter().map(|(_, v)| v.len()).sum::<usize>() / messages.len().max(1);

    println!(
        "Limit: bare rdkafka producer, {} messages of ~{avg_bytes} B, {} repetitions…",
        200_000, opts.repetitions
    );
    let mut limit = Vec::new();
    for _ in 0..opts.repetitions {
        limit.push(bare_producer(&kafka, &producer_props, &messages, 200_000).await?);
    }
    let limit = Stat::of(limit);
    println!("  median {:.0} msgs/s", limit.median);

    let work = tempfile::tempdir()?;
    let write_key = format!("wk-bench-{}", uuid::Uuid::new_v4().simple());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(30))
        .build()?;
    let start_collector = |sink: &'static str| -> anyhow::Result<(Proc, String)> {
        let dir = work.path().join(sink);
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let config_path = dir.join("collector.toml");
        std::fs::write(
            &config_path,
            collector_config(
                &dir,
                port,
                &kafka,
                &registry_url,
                &password,
                &pg.url(),
                &write_key,
                sink,
            ),
        )?;
        let collector = Proc::spawn(
            Command::new(&collector_bin)
                .arg("--config")
                .arg(&config_path)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        )
        .context("starting the collector")?;
        Ok((collector, format!("http://127.0.0.1:{port}")))
    };
    let (collector, url) = start_collector("kafka")?;
    wait_acked(&client, &url, (&write_key, "")).await?;

    println!(
        "feedloop collector: open-loop sweep, {}-second steps…",
        opts.step_seconds
    );
    let _ = load::step(
        &client,
        &url,
        (&write_key, ""),
        &template,
        5_000.0,
        Duration::from_secs(2),
    )
    .await;
    let sweep_results = sweep(&client, &url, (&write_key, ""), &template, step).await;
    let max = max_sustained(&sweep_results);
    println!("Repetitions at the sustained maximum ({max:.0} ev/s) and at 70% of it…");
    let mut at_max = Vec::new();
    let mut p99_at_70 = Vec::new();
    let mut p50_at_70 = Vec::new();
    for _ in 0..opts.repetitions {
        at_max.push(
            load::step(&client, &url, (&write_key, ""), &template, max, step)
                .await
                .achieved_events_per_s,
        );
        let r = load::step(&client, &url, (&write_key, ""), &template, 0.7 * max, step).await;
        p99_at_70.push(r.p99_ms);
        p50_at_70.push(r.p50_ms);
    }
    let rss = peak_rss_mib(collector.0.id()).unwrap_or(0.0);
    // Where the time goes: the broker's acknowledgement latency as the collector saw it.
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let quantile = |q: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "feedloop_collector_produce_latency_seconds{{quantile=\"{q}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |s| s * 1000.0)
    };
    let ack_p50 = quantile("0.5");
    let ack_p99 = quantile("0.99");
    println!(
        "  broker acknowledgement inside the collector: p50 {ack_p50:.1} ms, p99 {ack_p99:.1} ms"
    );
    drop(collector);

    // The collector's own cost: the same requests, every event parsed, validated, sealed and
    // encoded, then dropped by the null sink instead of published.
    let (collector, null_url) = start_collector("null")?;
    wait_acked(&client, &null_url, (&write_key, "")).await?;
    println!("feedloop collector with the null sink: open-loop sweep…");
    let null_sweep = sweep(&client, &null_url, (&write_key, ""), &template, step).await;
    let null_max = max_sustained(&null_sweep);
    let mut null_reps = Vec::new();
    let mut null_per_core = Vec::new();
    for _ in 0..opts.repetitions {
        let cpu_before = cpu_seconds(collector.0.id()).unwrap_or(0.0);
        let r = load::step(
            &client,
            &null_url,
            (&write_key, ""),
            &template,
            null_max,
            step,
        )
        .await;
        let cpu = cpu_seconds(collector.0.id()).unwrap_or(0.0) - cpu_before;
        null_reps.push(r.achieved_events_per_s);
        if cpu > 0.0 {
            null_per_core.push(r.ok_requests as f64 * load::BATCH as f64 / cpu);
        }
    }
    let null_rss = peak_rss_mib(collector.0.id()).unwrap_or(0.0);
    drop(collector);

    let mut peer_sweep = Vec::new();
    let mut peer_max = None;
    if !opts.no_peer {
        match super::collector::fastapi_peer(&kafka, &registry_url, &password, &write_key).await {
            Ok(peer) => {
                let peer_url = peer.url.clone();
                wait_acked(&client, &peer_url, (&write_key, "")).await?;
                println!(
                    "Peer: FastAPI + confluent-kafka + fastavro, uvicorn with {} workers…",
                    machine.cores
                );
                peer_sweep = sweep(&client, &peer_url, (&write_key, ""), &template, step).await;
                let m = max_sustained(&peer_sweep);
                let mut reps = Vec::new();
                for _ in 0..opts.repetitions {
                    reps.push(
                        load::step(&client, &peer_url, (&write_key, ""), &template, m, step)
                            .await
                            .achieved_events_per_s,
                    );
                }
                peer_max = Some(Stat::of(reps));
            }
            Err(e) => println!("FastAPI peer skipped: {e:#}"),
        }
    }

    let at_max = Stat::of(at_max);
    let rows = vec![
        Row {
            measurement: "collector → acked Kafka, batches of 50".into(),
            unit: "ev/s".into(),
            ratio: Some(at_max.median / limit.median),
            feedloop: at_max.clone(),
            against: "bare rdkafka producer".into(),
            peer: Some(limit.clone()),
            goal: "≥ 0.7× the bare producer".into(),
        },
        Row {
            measurement: "collector vs FastAPI collector".into(),
            unit: "ev/s".into(),
            ratio: peer_max.as_ref().map(|p| at_max.median / p.median),
            feedloop: at_max.clone(),
            against: "FastAPI + confluent-kafka".into(),
            peer: peer_max.clone(),
            goal: "≥ 2.5× FastAPI".into(),
        },
        goal_row(
            "collector with the null sink (its own cost), batches of 50",
            "ev/s",
            null_reps,
            500_000.0,
            "≥ 500k events/s",
        ),
        goal_row(
            "… per CPU-second of the collector process (load generator excluded)",
            "ev/s",
            null_per_core,
            500_000.0,
            "≥ 500k events/s",
        ),
        Row {
            measurement: "collector p99 latency at 70% of its max".into(),
            unit: "ms".into(),
            feedloop: Stat::of(p99_at_70),
            against: "limit".into(),
            peer: None,
            ratio: None,
            goal: "< 10 ms".into(),
        },
        Row {
            measurement: "collector p50 latency at 70% of its max".into(),
            unit: "ms".into(),
            feedloop: Stat::of(p50_at_70),
            against: "limit".into(),
            peer: None,
            ratio: None,
            goal: "—".into(),
        },
        Row {
            measurement: "broker ack latency seen by the collector (p50 | p99)".into(),
            unit: "ms".into(),
            feedloop: Stat::of(vec![ack_p50, ack_p99]),
            against: "limit".into(),
            peer: None,
            ratio: None,
            goal: "diagnostic".into(),
        },
        Row {
            measurement: "collector peak RSS".into(),
            unit: "MiB".into(),
            feedloop: Stat::of(vec![rss]),
            against: "limit".into(),
            peer: None,
            ratio: None,
            goal: "< 150 MB".into(),
        },
        Row {
            measurement: "collector peak RSS, null sink".into(),
            unit: "MiB".into(),
            feedloop: Stat::of(vec![null_rss]),
            against: "limit".into(),
            peer: None,
            ratio: None,
            goal: "diagnostic".into(),
        },
    ];
    print_table("feedloop bench collector", &machine, &rows);
    let report = Report {
        scenario: "collector",
        machine,
        rows,
        sweep: sweep_results,
        null_sink_sweep: null_sweep,
        peer_sweep,
        producer_config: producer_props.clone(),
    };
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&report)?)?;
    println!("\nWrote {}", opts.out.display());
    shutdown.cancel();
    drop((broker, pg));
    Ok(())
}

async fn wait_acked(client: &reqwest::Client, url: &str, auth: (&str, &str)) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let resp = client
            .post(format!("{url}/v1/events"))
            .basic_auth(auth.0, Some(auth.1))
            .header("content-type", "application/json")
            .body("[]")
            .send()
            .await;
        if let Ok(r) = resp
            && r.status().is_success()
            && let Ok(body) = r.json::<serde_json::Value>().await
            && body["durability"] != "spooled"
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running FastAPI peer.
pub struct Peer {
    pub url: String,
    _process: Proc,
}

/// Installs (once, in `target/bench-venv`) and starts the FastAPI peer collector.
pub async fn fastapi_peer(
    kafka: &KafkaConfig,
    registry: &str,
    password: &str,
    write_key: &str,
) -> anyhow::Result<Peer> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let app_dir = root.join("integration-tests/peers/fastapi_collector");
    let venv = root.join("target/bench-venv");
    let requirements = app_dir.join("requirements.txt");
    super::ensure_venv(
        &venv,
        "import fastapi, uvicorn, confluent_kafka, fastavro, orjson",
        &["-r", &requirements.display().to_string()],
    )?;
    let port = free_port()?;
    let workers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .to_string();
    let process = Proc::spawn(
        Command::new(venv.join("bin/uvicorn"))
            .args([
                "app:app",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                &workers,
                "--no-access-log",
                "--log-level",
                "warning",
            ])
            .current_dir(&app_dir)
            .env("KAFKA_BOOTSTRAP", &kafka.bootstrap)
            .env("REGISTRY_URL", registry)
            .env("REGISTRY_AUTH", format!("feedloop:{password}"))
            .env("WRITE_KEY", write_key)
            .env("SCHEMAS_DIR", root.join("schemas"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .context("starting uvicorn")?;
    Ok(Peer {
        url: format!("http://127.0.0.1:{port}"),
        _process: process,
    })
}
