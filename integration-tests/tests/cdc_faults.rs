//! cdc loses nothing when it is killed mid-stream, or when Postgres restarts under it.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use feedloop::dev::PgCluster;
use feedloop_integration_tests::{TestRegistry, cdc, infra, log::read_all, service::Service};
use sqlx::{Executor, PgPool};

/// Row ids of app.reports that landed, with the (commit_lsn, ordinal) of every copy.
async fn landed_reports(
    registry: &TestRegistry,
    topic: &str,
) -> HashMap<i64, Vec<(String, String)>> {
    let client = registry.client();
    let mut out: HashMap<i64, Vec<(String, String)>> = HashMap::new();
    for r in read_all(&infra().kafka_bootstrap, topic).await {
        if r.tombstone {
            continue;
        }
        let v: serde_json::Value = client.decode(&r.value).await.expect("decodes");
        if let Some(id) = v["after"]["id"].as_i64() {
            let pos = (
                r.header("feedloop.commit_lsn")
                    .unwrap_or_default()
                    .to_owned(),
                r.header("feedloop.ordinal").unwrap_or_default().to_owned(),
            );
            out.entry(id).or_default().push(pos);
        }
    }
    out
}

async fn wait_all(
    registry: &TestRegistry,
    topic: &str,
    expected: &[i64],
    within: Duration,
) -> HashMap<i64, Vec<(String, String)>> {
    let deadline = Instant::now() + within;
    loop {
        let landed = landed_reports(registry, topic).await;
        let missing = expected
            .iter()
            .filter(|id| !landed.contains_key(id))
            .count();
        if missing == 0 {
            return landed;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} committed rows never arrived",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Inserts `n` reports one transaction each, returning their ids.
async fn write_reports(db: PgPool, n: usize, pause: Duration) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (id,): (i64,) = sqlx::query_as("INSERT INTO app.reports (reporter_id, reported_id, reason) VALUES ($1, 'x', 'spam') RETURNING id")
            .bind(format!("r{i}"))
            .fetch_one(&db)
            .await
            .expect("insert");
        ids.push(id);
        tokio::time::sleep(pause).await;
    }
    ids
}

#[tokio::test]
async fn cdc_killed_mid_stream_and_restarted_loses_nothing() {
    let registry = TestRegistry::start().await;
    let (url, db) = cdc::product_database().await;
    let config = cdc::config(&url, &registry, &infra().kafka_bootstrap).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("cdc.toml");
    std::fs::write(
        &file,
        format!(
            "[source]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"{publication}\"\nheartbeat_interval_ms = 1000\n\
             [topics]\nprefix = \"{prefix}\"\n[kafka]\nbootstrap = \"{bootstrap}\"\n\
             [registry]\nurl = \"{registry}\"\nuser = \"{user}\"\npassword = \"{password}\"\n\
             [control]\nurl = \"{control}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [keys]\nkek = \"{kek}\"\n",
            kek = config.keys.kek.expose(),
            slot = config.source.slot,
            publication = config.source.publication,
            prefix = config.topics.prefix,
            bootstrap = infra().kafka_bootstrap,
            registry = registry.url,
            user = registry.user,
            password = registry.password,
            control = config.control.url.expose(),
        ),
    )
    .expect("config");
    let spawn = || Service::spawn("cdc", &file, dir.path());
    let topic = format!("{}.app.reports", config.topics.prefix);
    let mut first = spawn();
    let writer = tokio::spawn(write_reports(db.clone(), 600, Duration::from_millis(5)));
    // Let it stream a while, then kill it without warning.
    let deadline = Instant::now() + Duration::from_secs(60);
    while landed_reports(&registry, &topic).await.len() < 100 {
        assert!(Instant::now() < deadline, "cdc never streamed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _second = spawn();
    let ids = writer.await.expect("writer");
    let landed = wait_all(&registry, &topic, &ids, Duration::from_secs(120)).await;
    // At-least-once: a copy can repeat, and then it carries the same commit position, so
    // consumers can tell.
    for (id, copies) in &landed {
        assert!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "row {id} copies differ in position: {copies:?}"
        );
    }
    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&config.source.slot)
        .execute(&db)
        .await;
}

#[tokio::test]
async fn cdc_resumes_from_its_slot_after_postgres_restarts() {
    let mut cluster = PgCluster::start().await.expect("own cluster");
    let registry = TestRegistry::start().await;
    let admin = PgPool::connect(&cluster.url()).await.expect("connect");
    admin.execute("CREATE DATABASE product").await.expect("db");
    admin.close().await;
    let url = format!(
        "{}/product",
        cluster
            .url()
            .rsplit_once('/')
            .map(|(base, _)| base)
            .unwrap_or_default()
    );
    let db = PgPool::connect(&url).await.expect("connect product");
    db.execute(cdc::PRODUCT_SCHEMA).await.expect("schema");
    let mut config = cdc::config(&url, &registry, &infra().kafka_bootstrap).await;
    config.source.snapshot = feedloop_cdc::config::SnapshotMode::Never;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = feedloop_cdc::start(config.clone(), shutdown.clone())
        .await
        .expect("cdc");
    let ready = format!("http://{}/readyz", running.addr);
    let wait_ready = || async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(&ready)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "cdc not streaming");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_ready().await;
    let topic = format!("{}.app.reports", config.topics.prefix);
    let mut ids = write_reports(db.clone(), 50, Duration::ZERO).await;
    db.close().await;
    cluster.restart().await.expect("restart");
    let db = PgPool::connect(&url).await.expect("reconnect");
    ids.extend(write_reports(db.clone(), 50, Duration::ZERO).await);
    wait_all(&registry, &topic, &ids, Duration::from_secs(120)).await;
    shutdown.cancel();
    let _ = running.task.await;
}
