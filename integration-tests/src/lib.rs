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
/// (a missing tansu install, say): a test that needs it must fail, not skip.
pub fn infra() -> Infra {
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
