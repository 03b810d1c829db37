//! Every connection feedloop makes or takes can be encrypted and authenticated: the registry
//! and the collector serve HTTPS; Postgres takes TLS connections only (cdc's replication
//! stream included, verified with `sslmode=verify-full`); Kafka is reached over SASL_SSL
//! (SCRAM-SHA-512, through a TLS proxy in front of tansu, which does not serve TLS itself).
//! Each is also shown to refuse what it should: plaintext, an untrusted CA, a wrong password.

use std::{collections::BTreeMap, time::Duration};

use feedloop::dev::{BrokerProcess, PgCluster, process::free_port};
use feedloop_core::{
    config::{RegistryConfig, Secret},
    kafka::{KafkaConfig, KafkaSasl, KafkaTls, wait_ready},
};
use feedloop_integration_tests::{
    WRITE_KEY,
    cdc::PRODUCT_SCHEMA,
    events,
    log::read_all_with,
    tls::{TestPki, TlsProxy},
};
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

const KAFKA_USER: &str = "feedloop";
const KAFKA_PASSWORD: &str = "kafka-secret-1";

/// An HTTPS client that trusts `ca`.
fn https_client(ca: &std::path::Path) -> reqwest::Client {
    feedloop_core::tls::client_builder([ca.to_str().unwrap_or_default()])
        .expect("CA")
        .build()
        .expect("client")
}

fn secured_kafka(bootstrap: &str, ca: &str, password: &str) -> KafkaConfig {
    let mut kafka = KafkaConfig::new(bootstrap);
    kafka.tls = KafkaTls {
        enabled: true,
        ca: ca.to_owned(),
        ..KafkaTls::default()
    };
    kafka.sasl = KafkaSasl {
        mechanism: "SCRAM-SHA-512".into(),
        user: KAFKA_USER.into(),
        password: Secret::new(password),
    };
    kafka
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_can_be_encrypted_and_authenticated() {
    let pki = TestPki::new();
    let ca = pki.ca().display().to_string();
    let other_ca = pki.other_ca().display().to_string();

    // Postgres: TLS only, verified against the CA and the host name.
    let pg = PgCluster::start_tls(&pki.server_cert(), &pki.server_key())
        .await
        .expect("Postgres with TLS");
    let url = |db: &str, root: &str| {
        format!(
            "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={root}",
            pg.port()
        )
    };
    let mut admin = sqlx::PgConnection::connect(&url("postgres", &ca))
        .await
        .expect("a verify-full connection with the right CA");
    for db in ["registry", "collector", "product", "cdc"] {
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .await
            .expect("create database");
    }
    let product = sqlx::PgPool::connect(&url("product", &ca))
        .await
        .expect("product pool");
    product.execute(PRODUCT_SCHEMA).await.expect("schema");
    let plain = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let refused = sqlx::PgConnection::connect(&plain)
        .await
        .expect_err("a plaintext connection must be refused");
    assert!(
        refused.to_string().contains("no encryption"),
        "plaintext refused for another reason: {refused}"
    );
    sqlx::PgConnection::connect(&url("postgres", &other_ca))
        .await
        .expect_err("a server certificate from an untrusted CA must be refused");

    // Kafka: SCRAM users on tansu, clients connect through the TLS proxy.
    let proxy_port = free_port().expect("free port");
    let broker = BrokerProcess::start_authenticated(
        &[(KAFKA_USER, KAFKA_PASSWORD)],
        &format!("localhost:{proxy_port}"),
    )
    .await
    .expect("tansu with authentication");
    let upstream = broker.bootstrap().parse().expect("broker address");
    let _proxy = TlsProxy::start(&pki, proxy_port, upstream).await;
    let bootstrap = format!("localhost:{proxy_port}");
    let kafka = secured_kafka(&bootstrap, &ca, KAFKA_PASSWORD);
    wait_ready(&kafka, Duration::from_secs(20))
        .await
        .expect("SASL_SSL with the right password and CA");
    let short = Duration::from_secs(3);
    wait_ready(&secured_kafka(&bootstrap, &ca, "wrong-password"), short)
        .await
        .expect_err("a wrong SASL password must be refused");
    wait_ready(&secured_kafka(&bootstrap, &other_ca, KAFKA_PASSWORD), short)
        .await
        .expect_err("a broker certificate from an untrusted CA must be refused");
    let mut no_sasl = kafka.clone();
    no_sasl.sasl = KafkaSasl::default();
    wait_ready(&no_sasl, short)
        .await
        .expect_err("a client without credentials must be refused");

    // The registry serves HTTPS, its database over TLS.
    let shutdown = CancellationToken::new();
    let registry_password = "registry-secret";
    let registry = feedloop_registry::start(
        feedloop_registry::Config {
            http: feedloop_registry::config::HttpConfig {
                listen: "127.0.0.1:0".into(),
                max_body_bytes: 64 * 1024,
                request_timeout_ms: 10_000,
                tls: pki.server_tls(),
            },
            postgres: feedloop_registry::config::PostgresConfig {
                url: Secret::new(url("registry", &ca)),
                max_connections: 4,
            },
            auth: feedloop_registry::config::AuthConfig {
                users: BTreeMap::from([("tester".to_owned(), Secret::new(registry_password))]),
            },
            log: feedloop_registry::config::LogConfig { json: false },
        },
        shutdown.clone(),
    )
    .await
    .expect("registry over HTTPS");
    let registry_url = format!("https://localhost:{}", registry.addr.port());
    let trusted = https_client(&pki.ca());
    let subjects = trusted
        .get(format!("{registry_url}/subjects"))
        .basic_auth("tester", Some(registry_password))
        .send()
        .await
        .expect("HTTPS with the CA");
    assert_eq!(subjects.status(), reqwest::StatusCode::OK);
    reqwest::Client::new()
        .get(format!("{registry_url}/subjects"))
        .send()
        .await
        .expect_err("a client that does not trust the CA must not connect");
    reqwest::Client::new()
        .get(format!("http://localhost:{}/healthz", registry.addr.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect_err("plaintext HTTP to an HTTPS port must fail");
    let mut registry_config =
        RegistryConfig::new(&registry_url, "tester", Secret::new(registry_password));
    registry_config.ca = ca.clone();

    // The collector: HTTPS in; the registry over HTTPS, Kafka over SASL_SSL, Postgres over TLS.
    let spool = tempfile::tempdir().expect("spool");
    let mut collector = feedloop_collector::Config::from_defaults().expect("defaults");
    collector.http.listen = "127.0.0.1:0".into();
    collector.http.tls = pki.server_tls();
    collector.kafka = kafka.clone();
    collector.registry = registry_config.clone();
    collector.postgres.url = Secret::new(url("collector", &ca));
    collector.keys.kek = feedloop_integration_tests::test_kek();
    collector.auth.apps.insert(
        "test-app".into(),
        feedloop_collector::config::AppConfig {
            keys: vec![Secret::new(WRITE_KEY)],
        },
    );
    collector.spool.dir = spool.path().to_owned();
    collector.log.json = false;
    collector.validate().expect("collector config");
    let running = feedloop_collector::start(collector, shutdown.clone())
        .await
        .expect("collector");
    let collector_url = format!("https://localhost:{}", running.addr.port());
    let post = |body: serde_json::Value| {
        let request = trusted
            .post(format!("{collector_url}/v1/events"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&body);
        async move {
            let resp = request.send().await.expect("post over HTTPS");
            assert_eq!(resp.status(), reqwest::StatusCode::OK);
            resp.json::<serde_json::Value>().await.expect("answer")
        }
    };
    // Once an empty probe is acknowledged by the broker (not only spooled), the collector's
    // SASL_SSL producer works.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while post(serde_json::json!([])).await["durability"] != "acked" {
        assert!(
            std::time::Instant::now() < deadline,
            "the collector never published to the broker over SASL_SSL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let event = events::impression("tls-user", uuid::Uuid::now_v7());
    let body = post(serde_json::json!([event])).await;
    assert_eq!(body["accepted"], 1, "{body}");
    assert_eq!(body["durability"], "acked", "{body}");
    let landed = read_all_with(&kafka, feedloop_core::catalogue::EVENTS_TOPIC).await;
    assert!(
        landed
            .iter()
            .any(|r| r.event_id == Some(events::id(&event))),
        "the event is not in the log read over SASL_SSL"
    );

    // cdc: the replication stream over TLS (verify-full), out over SASL_SSL.
    let mut cdc = feedloop_cdc::Config::from_defaults().expect("defaults");
    cdc.source.url = Secret::new(url("product", &ca));
    cdc.source.heartbeat_interval_ms = 1000;
    cdc.topics.prefix = "tls".into();
    cdc.kafka = kafka.clone();
    cdc.registry = registry_config;
    cdc.control.url = Secret::new(url("cdc", &ca));
    cdc.keys.kek = feedloop_integration_tests::test_kek();
    cdc.http.listen = "127.0.0.1:0".into();
    cdc.http.tls = pki.server_tls();
    cdc.log.json = false;
    cdc.validate().expect("cdc config");
    let cdc_running = feedloop_cdc::start(cdc, shutdown.clone())
        .await
        .expect("cdc");
    sqlx::query(
        "INSERT INTO app.users (id, email, display_name) VALUES ('tls-1', 'tls@example.com', 'T')",
    )
    .execute(&product)
    .await
    .expect("insert");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let users = read_all_with(&kafka, "tls.app.users").await;
        if users
            .iter()
            .any(|r| String::from_utf8_lossy(&r.key).contains("tls-1"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cdc never published the change over TLS replication and SASL_SSL"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ready = trusted
        .get(format!(
            "https://localhost:{}/readyz",
            cdc_running.addr.port()
        ))
        .send()
        .await
        .expect("cdc's HTTPS ops port");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), cdc_running.task).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    let _ = sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
        .execute(&product)
        .await;
}
