//! Shared fixtures of the integration tests.
//!
//! One throwaway Postgres cluster and one broker serve the whole test binary; they live on a
//! runtime of their own (tests each have theirs) and die with the process. Each test gets a
//! fresh database, and the services it needs start inside the test.

use std::{
    collections::BTreeMap,
    sync::{OnceLock, mpsc},
    time::Duration,
};

use feedloop::dev::{Broker, PgCluster, Storage};
use feedloop_core::{config::Secret, registry_client::RegistryClient};
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

/// Endpoints of the shared Postgres cluster and broker.
#[derive(Debug, Clone)]
pub struct Infra {
    pub postgres_url: String,
    pub kafka_bootstrap: String,
}

static INFRA: OnceLock<Result<Infra, String>> = OnceLock::new();

/// The shared infrastructure, started on first use. Panics with the reason if it cannot start
/// (no PostgreSQL binaries, or no `feedloop` binary to run the broker, say): a test that needs
/// it must fail, not skip.
pub fn infra() -> Infra {
    feedloop_core::telemetry::init_tracing(false);
    let result = INFRA.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                let started = async {
                    let pg = PgCluster::start().await.map_err(|e| e.to_string())?;
                    let broker = Broker::start(Storage::Memory)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((pg, broker))
                }
                .await;
                match started {
                    Ok((pg, broker)) => {
                        let _ = tx.send(Ok(Infra {
                            postgres_url: pg.url(),
                            kafka_bootstrap: broker.bootstrap(),
                        }));
                        // Keep both alive for the life of the process; their watchdogs clean up
                        // when it exits.
                        std::future::pending::<()>().await;
                        drop((pg, broker));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        });
        rx.recv()
            .unwrap_or_else(|_| Err("infrastructure thread died".into()))
    });
    match result {
        Ok(infra) => infra.clone(),
        Err(e) => panic!("test infrastructure unavailable: {e}"),
    }
}

/// A fresh, empty database on the shared cluster; returns its URL.
pub async fn fresh_database() -> String {
    let base = infra().postgres_url;
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("connect {base}: {e}"));
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap_or_else(|e| panic!("create database: {e}"));
    let _ = conn.close().await;
    match base.rsplit_once('/') {
        Some((prefix, _)) => format!("{prefix}/{name}"),
        None => panic!("unexpected postgres url {base}"),
    }
}

/// A registry started for one test, on a fresh database.
#[derive(Debug)]
pub struct TestRegistry {
    pub url: String,
    pub user: String,
    pub password: String,
    shutdown: CancellationToken,
}

impl TestRegistry {
    pub async fn start() -> Self {
        let password = uuid::Uuid::new_v4().simple().to_string();
        let config = feedloop_registry::Config {
            http: feedloop_registry::config::HttpConfig {
                listen: "127.0.0.1:0".into(),
                max_body_bytes: 64 * 1024,
                request_timeout_ms: 10_000,
                tls: Default::default(),
            },
            postgres: feedloop_registry::config::PostgresConfig {
                url: Secret::new(fresh_database().await),
                max_connections: 4,
            },
            auth: feedloop_registry::config::AuthConfig {
                users: BTreeMap::from([("tester".to_owned(), Secret::new(password.clone()))]),
            },
            log: feedloop_registry::config::LogConfig { json: false },
        };
        let shutdown = CancellationToken::new();
        let running = feedloop_registry::start(config, shutdown.clone())
            .await
            .unwrap_or_else(|e| panic!("registry did not start: {e}"));
        Self {
            url: format!("http://{}", running.addr),
            user: "tester".into(),
            password,
            shutdown,
        }
    }

    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(
            &self.url,
            Some((self.user.clone(), Secret::new(self.password.clone()))),
            "",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("client: {e}"))
    }

    /// An HTTP request with the test credentials.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.password))
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The venv python `integration-tests/run` prepared (`FEEDLOOP_PYTHON` overrides).
pub fn python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("FEEDLOOP_PYTHON") {
        return std::path::PathBuf::from(p);
    }
    let venv = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: run integration-tests/run (it creates the venv with confluent-kafka, fastavro and pyarrow), or set FEEDLOOP_PYTHON",
        venv.display()
    );
    venv
}

/// Kafka configuration of the shared broker.
pub fn kafka() -> feedloop_core::kafka::KafkaConfig {
    feedloop_core::kafka::KafkaConfig::new(infra().kafka_bootstrap)
}

/// A collector configuration for tests: a fresh database and spool, the given registry and
/// broker, and one application `test-app` with write key [`WRITE_KEY`].
pub async fn collector_config(
    registry: &TestRegistry,
    bootstrap: &str,
    spool_dir: &std::path::Path,
) -> feedloop_collector::Config {
    let mut cfg =
        feedloop_collector::Config::from_defaults().unwrap_or_else(|e| panic!("defaults: {e}"));
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.kafka.bootstrap = bootstrap.to_owned();
    cfg.registry.url = registry.url.clone();
    cfg.registry.user = registry.user.clone();
    cfg.registry.password = Secret::new(registry.password.clone());
    cfg.postgres.url = Secret::new(fresh_database().await);
    cfg.keys.kek = test_kek();
    cfg.auth.apps.insert(
        "test-app".into(),
        feedloop_collector::config::AppConfig {
            keys: vec![Secret::new(WRITE_KEY)],
        },
    );
    cfg.spool.dir = spool_dir.to_owned();
    cfg.spool.ack_timeout_ms = 1000;
    cfg.log.json = false;
    cfg.validate().unwrap_or_else(|e| panic!("config: {e}"));
    cfg
}

/// A sealed personal field as a consumer with access to the key store (in the control database
/// at `control_url`) reads it. Panics if `text` is not sealed.
pub async fn open_sealed(
    control_url: &str,
    user: &str,
    text: &str,
) -> feedloop_core::crypto::Opened {
    use feedloop_core::crypto::{KeyStore, SEALED_PREFIX, open};
    assert!(text.starts_with(SEALED_PREFIX), "not sealed: {text}");
    let pool = sqlx::PgPool::connect(control_url)
        .await
        .expect("control database");
    let key = test_key_store(pool.clone())
        .get(user)
        .await
        .expect("key store");
    pool.close().await;
    open(key.as_ref(), user, text)
}

/// The key ring (one KEK, made once per test process) that every service a test starts wraps
/// its data keys with.
pub fn test_kek() -> Secret {
    static KEK: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    Secret::new(
        KEK.get_or_init(|| feedloop_core::crypto::KeyRing::generate_entry("test"))
            .clone(),
    )
}

/// The Postgres key store on `pool`, under [`test_kek`].
pub fn test_key_store(pool: sqlx::PgPool) -> feedloop_core::crypto::PostgresKeyStore {
    let ring = feedloop_core::crypto::KeyRing::parse(test_kek().expose()).expect("test KEK");
    feedloop_core::crypto::PostgresKeyStore::new(pool, ring)
}

/// A dead letter's original, opened with the data key it names in the key store of the
/// control database at `control_url`. Panics if the letter is not sealed.
pub async fn unseal(
    control_url: &str,
    dl: &feedloop_core::model::DeadLetter,
) -> feedloop_core::model::OpenedOriginal {
    use feedloop_core::crypto::KeyStore;
    let owner = dl
        .sealed_by
        .as_deref()
        .unwrap_or_else(|| panic!("dead letter {} is not sealed", dl.dead_letter_id));
    let pool = sqlx::PgPool::connect(control_url)
        .await
        .expect("control database");
    let key = test_key_store(pool.clone())
        .get(owner)
        .await
        .expect("key store");
    pool.close().await;
    dl.open(key.as_ref())
}

/// [`unseal`], expecting the original readable.
pub async fn unsealed(control_url: &str, dl: &feedloop_core::model::DeadLetter) -> Vec<u8> {
    match unseal(control_url, dl).await {
        feedloop_core::model::OpenedOriginal::Clear(bytes) => bytes,
        other => panic!("dead letter {} does not open: {other:?}", dl.dead_letter_id),
    }
}

/// The write key of `test-app` in [`collector_config`].
pub const WRITE_KEY: &str = "wk-test-app-0123456789";

/// A collector running inside the test, with its own registry, database and spool.
#[derive(Debug)]
pub struct TestCollector {
    pub url: String,
    pub registry: TestRegistry,
    pub config: feedloop_collector::Config,
    pub spool: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), feedloop_collector::StartError>>>,
}

impl TestCollector {
    /// Starts on the shared broker; `tweak` adjusts the configuration first.
    pub async fn start(tweak: impl FnOnce(&mut feedloop_collector::Config)) -> Self {
        let registry = TestRegistry::start().await;
        let spool = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut config = collector_config(&registry, &infra().kafka_bootstrap, spool.path()).await;
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let running = feedloop_collector::start(config.clone(), shutdown.clone())
            .await
            .unwrap_or_else(|e| panic!("collector did not start: {e}"));
        let collector = Self {
            url: format!("http://{}", running.addr),
            registry,
            config,
            spool,
            shutdown,
            task: Some(running.task),
        };
        collector.wait_direct().await;
        collector
    }

    /// Waits until the collector rebuilt its idempotency window and publishes directly.
    pub async fn wait_direct(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let metrics = reqwest::get(format!("{}/metrics", self.url)).await.ok();
            if let Some(m) = metrics
                && let Ok(text) = m.text().await
                && !text.is_empty()
            {
                // Ready once a probe batch is acknowledged by the broker, not the spool.
                let probe = self.post_native(&serde_json::json!([])).await;
                if probe.0 == reqwest::StatusCode::OK && probe.1["durability"] == "acked" {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "collector never switched to direct publishing"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Posts a native batch with the write key; returns status and JSON body.
    pub async fn post_native(
        &self,
        body: &serde_json::Value,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/events", self.url))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("post: {e}"));
        let status = resp.status();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Stops gracefully and waits until flushed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestCollector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Builds native events for tests and load.
pub mod events {
    use serde_json::{Value, json};
    use uuid::Uuid;

    /// Epoch ms now.
    pub fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn envelope(event_type: &str, user: &str) -> Value {
        json!({
            "event_id": Uuid::now_v7(),
            "event_type": event_type,
            "user_id": user,
            "device_id": format!("dev-{user}"),
            "timestamp": now_ms() - 1000,
            "sent_at": now_ms(),
            "platform": "android",
            "app_version": "5.2.0",
        })
    }

    fn with(mut env: Value, props: Value) -> Value {
        if let Some(o) = env.as_object_mut() {
            o.insert("properties".into(), props);
        }
        env
    }

    pub fn impression(user: &str, match_id: Uuid) -> Value {
        with(
            envelope("match_impression", user),
            json!({
                "match_id": match_id, "candidate_id": format!("cand-{match_id}"), "request_id": "req-1",
                "model_version": "ranker-7", "experiment_id": "exp-1", "experiment_arm": "treatment",
                "rank": 3, "score": 0.77, "features": {"age_gap": 2, "affinity": 0.4, "same_lang": true}
            }),
        )
    }

    pub fn decision(user: &str, match_id: Uuid, accept: bool) -> Value {
        with(
            envelope("match_decision", user),
            json!({
                "match_id": match_id, "decision": if accept { "accept" } else { "skip" }, "decision_latency_ms": 850
            }),
        )
    }

    pub fn chat_ended(user: &str, match_id: Uuid, duration_ms: i64) -> Value {
        with(
            envelope("chat_ended", user),
            json!({"match_id": match_id, "duration_ms": duration_ms, "ended_by": "peer"}),
        )
    }

    /// The event id of a built event.
    pub fn id(event: &Value) -> Uuid {
        event["event_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .unwrap_or_else(|| panic!("event without id: {event}"))
    }
}

pub mod labeler;
pub mod pg_proxy;
pub mod service;
pub mod tls;

/// Reading back what landed on a topic.
pub mod log {
    use std::time::Duration;

    /// A record as read back: event id header, key, value.
    #[derive(Debug, Clone)]
    pub struct Landed {
        pub event_id: Option<uuid::Uuid>,
        pub key: Vec<u8>,
        pub value: Vec<u8>,
        /// A record without a value (a tombstone).
        pub tombstone: bool,
        pub partition: i32,
        pub offset: i64,
        pub headers: Vec<(String, String)>,
    }

    impl Landed {
        pub fn header(&self, key: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    /// Every record of `topic` from the beginning to the current end.
    pub async fn read_all(bootstrap: &str, topic: &str) -> Vec<Landed> {
        read_all_with(&feedloop_core::kafka::KafkaConfig::new(bootstrap), topic).await
    }

    /// [`read_all`] from the brokers of `kafka`, with its TLS and SASL settings.
    pub async fn read_all_with(
        kafka: &feedloop_core::kafka::KafkaConfig,
        topic: &str,
    ) -> Vec<Landed> {
        let kafka = kafka.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || read_blocking(&kafka, &topic))
            .await
            .unwrap_or_else(|e| panic!("read: {e}"))
    }

    fn read_blocking(kafka: &feedloop_core::kafka::KafkaConfig, topic: &str) -> Vec<Landed> {
        feedloop_core::kafka::read_to_end(kafka, topic, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("read {topic}: {e}"))
            .into_iter()
            .map(|r| {
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                Landed {
                    event_id: r
                        .header("event_id")
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|s| uuid::Uuid::parse_str(s).ok()),
                    key: r.key,
                    tombstone: r.value.is_none(),
                    value: r.value.unwrap_or_default(),
                    partition: r.partition,
                    offset: r.offset,
                    headers,
                }
            })
            .collect()
    }
}

/// A product database (the demo schema) on the shared cluster, with a cdc capturing it.
pub mod cdc {
    use std::time::Duration;

    use feedloop_core::config::Secret;
    use sqlx::{Executor, PgPool};
    use tokio_util::sync::CancellationToken;

    use super::{TestRegistry, fresh_database, infra};

    /// The demo product schema (sql/product/schema.sql).
    pub const PRODUCT_SCHEMA: &str = include_str!("../../sql/product/schema.sql");

    /// A fresh product database with the demo schema; returns its URL and a pool.
    pub async fn product_database() -> (String, PgPool) {
        let url = fresh_database().await;
        let pool = PgPool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        pool.execute(PRODUCT_SCHEMA)
            .await
            .unwrap_or_else(|e| panic!("product schema: {e}"));
        (url, pool)
    }

    /// A cdc configuration for tests: unique slot, publication and topic prefix.
    pub async fn config(
        source_url: &str,
        registry: &TestRegistry,
        bootstrap: &str,
    ) -> feedloop_cdc::Config {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut cfg =
            feedloop_cdc::Config::from_defaults().unwrap_or_else(|e| panic!("defaults: {e}"));
        cfg.source.url = Secret::new(source_url);
        cfg.source.slot = format!("s_{}", &id[..12]);
        cfg.source.publication = format!("p_{}", &id[..12]);
        cfg.source.heartbeat_interval_ms = 1000;
        cfg.source.snapshot_chunk_rows = 100;
        cfg.topics.prefix = format!("t{}", &id[..8]);
        // Its own requests topic: tests share the broker, and an eraser of another test must
        // not take this one's account deletions.
        cfg.users.erasure_requests_topic = format!("{}.erasure.requests", cfg.topics.prefix);
        cfg.kafka.bootstrap = bootstrap.to_owned();
        cfg.registry.url = registry.url.clone();
        cfg.registry.user = registry.user.clone();
        cfg.registry.password = Secret::new(registry.password.clone());
        cfg.control.url = Secret::new(fresh_database().await);
        cfg.keys.kek = crate::test_kek();
        cfg.http.listen = "127.0.0.1:0".into();
        cfg.log.json = false;
        cfg.validate().unwrap_or_else(|e| panic!("config: {e}"));
        cfg
    }

    /// cdc running inside the test.
    #[derive(Debug)]
    pub struct TestCdc {
        pub config: feedloop_cdc::Config,
        pub registry: TestRegistry,
        pub source: PgPool,
        pub source_url: String,
        ready_url: String,
        shutdown: CancellationToken,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl TestCdc {
        /// A personal column as a consumer with access to the key store reads it: sealed in
        /// the log, opened with `user`'s data key.
        pub async fn open(
            &self,
            user: &str,
            field: &serde_json::Value,
        ) -> feedloop_core::crypto::Opened {
            let text = field
                .as_str()
                .unwrap_or_else(|| panic!("not a string: {field}"));
            crate::open_sealed(self.config.control.url.expose(), user, text).await
        }

        /// A fresh product database; `prepare` runs on it before cdc starts.
        pub async fn start_with<F, Fut>(
            prepare: F,
            tweak: impl FnOnce(&mut feedloop_cdc::Config),
        ) -> Self
        where
            F: FnOnce(PgPool) -> Fut,
            Fut: std::future::Future<Output = ()>,
        {
            let registry = TestRegistry::start().await;
            let (source_url, source) = product_database().await;
            prepare(source.clone()).await;
            let mut config = config(&source_url, &registry, &infra().kafka_bootstrap).await;
            tweak(&mut config);
            let mut cdc = Self {
                config,
                registry,
                source,
                source_url,
                ready_url: String::new(),
                shutdown: CancellationToken::new(),
                task: None,
            };
            cdc.run().await;
            cdc
        }

        /// Starts (again) with the same configuration.
        pub async fn run(&mut self) {
            self.shutdown = CancellationToken::new();
            let running = feedloop_cdc::start(self.config.clone(), self.shutdown.clone())
                .await
                .unwrap_or_else(|e| panic!("cdc did not start: {e}"));
            self.task = Some(running.task);
            self.ready_url = format!("http://{}/readyz", running.addr);
            self.wait_streaming().await;
        }

        /// Waits until cdc streams (its snapshot, if any, is done).
        pub async fn wait_streaming(&self) {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                if let Ok(r) = reqwest::get(&self.ready_url).await
                    && r.status().is_success()
                {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "cdc never started streaming"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        pub async fn stop(&mut self) {
            self.shutdown.cancel();
            if let Some(t) = self.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
            }
        }

        /// The change topic of a table.
        pub fn topic(&self, table: &str) -> String {
            format!("{}.{table}", self.config.topics.prefix)
        }

        /// Drops the slot (slots outlive databases on the shared cluster).
        pub async fn cleanup(mut self) {
            self.stop().await;
            let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.config.source.slot)
                .execute(&self.source)
                .await;
        }
    }

    impl Drop for TestCdc {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }
}
