//! `feedloop bench cdc`: changes/s from committed WAL to acknowledged Kafka records, against
//! `pg_recvlogical` decoding the same WAL with the same plugin (pgoutput); and commit→Kafka
//! lag percentiles at fixed change rates.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use feedloop_core::{
    catalogue::TOPICS,
    config::Secret,
    kafka::{KafkaConfig, QuietEof, ensure_topics},
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::Headers,
};
use serde::Serialize;
use sqlx::{Executor, PgPool};
use tokio_util::sync::CancellationToken;

use super::{Machine, Row, Stat, machine, print_table};
use crate::dev::{Broker, PgCluster, Storage, postgres::bindir, stack::create_product_database};

#[derive(Debug, Clone)]
pub struct Options {
    /// Changes per throughput repetition.
    pub rows: u64,
    pub repetitions: usize,
    /// Change rates (per second) of the lag measurement.
    pub rates: Vec<u64>,
    pub lag_seconds: u64,
    pub out: PathBuf,
    /// Seal the personal column (`app.reports.comment`) as the default config does.
    pub seal: bool,
}

#[derive(Debug, Serialize)]
struct LagStep {
    rate: u64,
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    machine: Machine,
    rows: Vec<Row>,
    lag: Vec<LagStep>,
}

struct Setup {
    product: String,
    pool: PgPool,
    kafka: KafkaConfig,
    registry: String,
    password: String,
    control: String,
    seal: bool,
    /// The key ring of this run (made for it).
    kek: String,
}

fn cdc_config(s: &Setup, slot: &str, prefix: &str) -> anyhow::Result<feedloop_cdc::Config> {
    let mut c = feedloop_cdc::Config::from_defaults()?;
    c.source.url = Secret::new(s.product.clone());
    c.source.slot = slot.to_owned();
    c.source.publication = "bench".into();
    c.source.tables = vec!["app.reports".into()];
    c.source.snapshot = feedloop_cdc::config::SnapshotMode::Never;
    c.outbox.table = String::new();
    c.users.table = String::new();
    c.topics.prefix = prefix.to_owned();
    c.kafka = s.kafka.clone();
    c.registry = feedloop_cdc::config::RegistryConfig::new(
        s.registry.clone(),
        "feedloop",
        Secret::new(s.password.clone()),
    );
    c.control.url = Secret::new(s.control.clone());
    c.keys.kek = Secret::new(s.kek.clone());
    c.http.listen = "127.0.0.1:0".into();
    if !s.seal {
        c.pii.tables.clear();
    }
    c.validate()?;
    Ok(c)
}

/// Starts cdc in this process and waits until it streams.
async fn start_cdc(
    config: feedloop_cdc::Config,
) -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let stop = CancellationToken::new();
    let running = feedloop_cdc::start(config, stop.clone()).await?;
    let ready = format!("http://{}/readyz", running.addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(&ready)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("cdc did not start streaming");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((stop, running.task))
}

async fn confirmed(pool: &PgPool, slot: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1")
        .bind(slot)
        .fetch_one(pool)
        .await?)
}

/// Writes `rows` changes in transactions of 1000 rows; returns the WAL end after them.
async fn write_changes(pool: &PgPool, rows: u64) -> anyhow::Result<(String, i64)> {
    let mut left = rows;
    while left > 0 {
        let n = left.min(1000);
        sqlx::query("INSERT INTO app.reports (reporter_id, reported_id, reason, comment) SELECT 'u' || g, 'v' || g, 'spam', 'bench row ' || g FROM generate_series(1, $1) g")
            .bind(i64::try_from(n).unwrap_or(1000))
            .execute(pool)
            .await?;
        left -= n;
    }
    let row: (String, i64) =
        sqlx::query_as("SELECT pg_current_wal_lsn()::text, (pg_current_wal_lsn() - '0/0')::bigint")
            .fetch_one(pool)
            .await?;
    Ok(row)
}

/// One throughput repetition: (cdc changes/s, pg_recvlogical changes/s).
async fn throughput(s: &Setup, rep: usize, rows: u64) -> anyhow::Result<(f64, f64)> {
    let cdc_slot = format!("bench_cdc_{rep}");
    let peer_slot = format!("bench_peer_{rep}");
    let config = cdc_config(s, &cdc_slot, &format!("bench{rep}"))?;
    // Let cdc create its slot and topic, then stop it so that the WAL piles up.
    let (stop, task) = start_cdc(config.clone()).await?;
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&peer_slot)
        .execute(&s.pool)
        .await?;
    write_changes(&s.pool, 1).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let _ = task.await;
    let (end, end_lsn) = write_changes(&s.pool, rows).await?;

    let recvlogical = bindir()?.join("pg_recvlogical");
    let started = Instant::now();
    let status = tokio::process::Command::new(&recvlogical)
        .args([
            "-d",
            &s.product,
            "--slot",
            &peer_slot,
            "--start",
            "--no-loop",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench",
            "-f",
            "/dev/null",
        ])
        .arg(format!("--endpos={end}"))
        .status()
        .await
        .context("running pg_recvlogical")?;
    let peer = rows as f64 / started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }

    let started = Instant::now();
    let (stop, task) = start_cdc(config).await?;
    while confirmed(&s.pool, &cdc_slot).await? < end_lsn {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("cdc did not catch up in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ours = rows as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = task.await;
    for slot in [&cdc_slot, &peer_slot] {
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(&s.pool)
            .await?;
    }
    Ok((ours, peer))
}

/// Commit→consumer lag at a fixed change rate, read from the `feedloop.commit_ts_ms` header.
async fn lag(s: &Setup, topic: &str, rate: u64, seconds: u64) -> anyhow::Result<LagStep> {
    let consumer: BaseConsumer<QuietEof> = s
        .kafka
        .client_config("feedloop-bench-lag")
        .set("group.id", "feedloop-bench-lag")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create_with_context(QuietEof)?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            // From the beginning (tansu's end offsets are unreliable); older records are skipped
            // by their commit time.
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_stop = stop.clone();
    let from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let reader = tokio::task::spawn_blocking(move || {
        let mut h = hdrhistogram::Histogram::<u64>::new(3)
            .expect("3 significant digits is a valid precision");
        while !reader_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                let commit = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "feedloop.commit_ts_ms")
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.parse::<i64>().ok())
                });
                if let Some(c) = commit.filter(|c| *c >= from) {
                    let _ = h.record(u64::try_from((now - c).max(1)).unwrap_or(1));
                }
            }
        }
        h
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // 100 transactions a second, rate/100 rows each.
    let per_txn = (rate / 100).max(1);
    let started = Instant::now();
    let mut written = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        sqlx::query("INSERT INTO app.reports (reporter_id, reported_id, reason) SELECT 'u' || g, 'v' || g, 'spam' FROM generate_series(1, $1) g")
            .bind(i64::try_from(per_txn).unwrap_or(1))
            .execute(&s.pool)
            .await?;
        written += per_txn;
    }
    let achieved = written as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let h = reader.await?;
    Ok(LagStep {
        rate,
        achieved,
        p50_ms: h.value_at_quantile(0.5) as f64,
        p99_ms: h.value_at_quantile(0.99) as f64,
        p999_ms: h.value_at_quantile(0.999) as f64,
    })
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    println!("Starting Postgres, the broker and the registry…");
    let pg = PgCluster::start().await?;
    let broker = Broker::start(Storage::Memory).await?;
    let kafka = KafkaConfig::new(broker.bootstrap());
    ensure_topics(&kafka, TOPICS).await?;
    let shutdown = CancellationToken::new();
    let (registry, password) = super::registry(&pg.url(), &shutdown).await?;
    let product = create_product_database(&pg.url()).await?;
    let pool = PgPool::connect(&product).await?;
    pool.execute("ALTER TABLE app.reports SET (autovacuum_enabled = false)")
        .await?;
    let setup = Setup {
        product,
        pool,
        kafka,
        registry,
        password,
        control: pg.url(),
        seal: opts.seal,
        kek: super::bench_kek(),
    };

    println!(
        "Throughput: {} changes per repetition, {} repetitions…",
        opts.rows, opts.repetitions
    );
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for rep in 0..opts.repetitions {
        let (o, p) = throughput(&setup, rep, opts.rows).await?;
        println!("  cdc {o:>9.0} changes/s   pg_recvlogical {p:>9.0} changes/s");
        ours.push(o);
        peer.push(p);
    }
    let (ours, peer) = (Stat::of(ours), Stat::of(peer));

    println!("Lag at fixed rates, {} s each…", opts.lag_seconds);
    let config = cdc_config(&setup, "bench_lag", "benchlag")?;
    let (stop, task) = start_cdc(config).await?;
    // The first change creates the topic; the lag reader needs its partitions.
    write_changes(&setup.pool, 1).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while confirmed(&setup.pool, "bench_lag").await? < write_changes(&setup.pool, 0).await?.1 {
        if Instant::now() > deadline {
            bail!("cdc did not stream the first change");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut steps = Vec::new();
    for &rate in &opts.rates {
        let step = lag(&setup, "benchlag.app.reports", rate, opts.lag_seconds).await?;
        println!(
            "  {:>6} changes/s offered ({:>6.0} written): commit→consumer p50 {:.0} ms, p99 {:.0} ms, p99.9 {:.0} ms",
            step.rate, step.achieved, step.p50_ms, step.p99_ms, step.p999_ms
        );
        steps.push(step);
    }
    stop.cancel();
    let _ = task.await;

    let mut rows = vec![Row {
        measurement: if opts.seal {
            "cdc, committed WAL → acked Kafka (comment sealed)".into()
        } else {
            "cdc, committed WAL → acked Kafka (no sealing)".into()
        },
        unit: "changes/s".into(),
        ratio: Some(ours.median / peer.median),
        feedloop: ours.clone(),
        against: "pg_recvlogical (pgoutput)".into(),
        peer: Some(peer),
        goal: "≥ 50k/s and ≥ 0.25× pg_recvlogical".into(),
    }];
    for s in &steps {
        rows.push(Row {
            measurement: format!("commit → consumer lag p99 at {} changes/s", s.rate),
            unit: "ms".into(),
            feedloop: Stat::of(vec![s.p99_ms]),
            against: "limit".into(),
            peer: None,
            ratio: None,
            goal: if s.rate == 20_000 {
                "< 50 ms".into()
            } else {
                "—".into()
            },
        });
    }
    rows.push(super::peak_rss_row("cdc, registry client, lag consumer"));
    print_table("feedloop bench cdc", &machine, &rows);
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &opts.out,
        serde_json::to_vec_pretty(&Report {
            scenario: "cdc",
            machine,
            rows,
            lag: steps,
        })?,
    )?;
    println!("\nWrote {}", opts.out.display());
    shutdown.cancel();
    drop((broker, pg));
    Ok(())
}
