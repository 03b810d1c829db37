//! The whole dev stack, started in dependency order, and the endpoints file that describes it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use feedloop_core::{
    catalogue::{Catalogue, TOPICS},
    config::Secret,
    kafka::{KafkaConfig, ensure_topics},
    registry_client::RegistryClient,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{DevError, Storage, broker::Broker, postgres::PgCluster};

/// Name of the endpoints file in the stack's directory.
pub const ENDPOINTS_FILE: &str = "endpoints.json";
/// Name of the pid file `feedloop dev down` signals.
pub const PID_FILE: &str = "dev.pid";
/// The registry user the stack configures; its password is the admin token.
pub const REGISTRY_USER: &str = "feedloop";

/// What to start and what to reuse.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Use this Postgres instead of a throwaway cluster.
    pub postgres_url: Option<String>,
    /// The broker to use or start.
    pub broker: BrokerChoice,
    /// Where the labeler writes datasets (default: the stack's temporary working directory).
    pub datasets_root: Option<PathBuf>,
    /// The trigger's policy for every dataset (default: its configuration's defaults).
    pub trigger_policy: Option<feedloop_trigger::policy::Policy>,
}

/// Which broker the stack talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// `$KAFKA_BOOTSTRAP` if set, else a `feedloop broker` process with this storage (`dev up`,
    /// tests, benchmarks).
    Process(Storage),
    /// The built-in broker inside this process, memory storage (the demo).
    Embedded,
    /// A Kafka cluster at this bootstrap address.
    External(String),
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            postgres_url: None,
            broker: BrokerChoice::Process(Storage::Memory),
            datasets_root: None,
            trigger_policy: None,
        }
    }
}

/// How to reach everything the stack runs. Written to `DIR/endpoints.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub postgres_url: String,
    pub kafka_bootstrap: String,
    pub registry_url: String,
    pub registry_user: String,
    pub registry_password: String,
    pub admin_token: String,
    /// The key ring wrapping the data keys (`keys.kek`): `feedloop deadletters show` opens
    /// dead letters with it.
    #[serde(default)]
    pub keys_kek: String,
    pub collector_url: String,
    /// Write key of the `dev` application on the collector.
    pub write_key: String,
    /// The demo product database cdc captures.
    pub product_url: String,
    /// cdc's operational endpoints (`/readyz` once streaming, `/metrics`).
    pub cdc_url: String,
    /// Where the labeler writes its datasets (the example spec's `match_outcomes`).
    pub datasets_root: String,
    /// The labeler's operational endpoints.
    pub labeler_url: String,
    /// The eraser's admin API (bearer `admin_token`).
    pub eraser_url: String,
    /// The trigger's pull API (bearer `admin_token`).
    pub trigger_url: String,
    /// Pid of the process running the stack.
    pub pid: u32,
}

impl Endpoints {
    /// The endpoints a running stack wrote to `dir` (`feedloop dev up --dir DIR`).
    pub fn read(dir: &Path) -> Result<Self, DevError> {
        let path = dir.join(ENDPOINTS_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DevError::io("reading the stack's endpoints.json", e))?;
        serde_json::from_str(&text).map_err(|e| {
            DevError::io(
                "reading the stack's endpoints.json",
                std::io::Error::other(e),
            )
        })
    }
}

/// The demo product schema cdc captures.
pub const PRODUCT_SCHEMA: &str = include_str!("../../../../sql/product/schema.sql");

/// Creates the `product` database next to `url` (if missing) with the demo schema; returns its
/// URL.
pub async fn create_product_database(url: &str) -> Result<String, DevError> {
    use sqlx::{Connection, Executor};
    let fail = |e: sqlx::Error| DevError::Start {
        what: "product database",
        detail: e.to_string(),
    };
    let mut admin = sqlx::PgConnection::connect(url).await.map_err(fail)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'product')")
            .fetch_one(&mut admin)
            .await
            .map_err(fail)?;
    if !exists {
        admin
            .execute("CREATE DATABASE product")
            .await
            .map_err(fail)?;
    }
    let _ = admin.close().await;
    let base = url.split('?').next().unwrap_or(url);
    let product = format!("{}/product", base.rsplit_once('/').map_or(base, |(b, _)| b));
    let mut conn = sqlx::PgConnection::connect(&product).await.map_err(fail)?;
    conn.execute(PRODUCT_SCHEMA).await.map_err(fail)?;
    let _ = conn.close().await;
    Ok(product)
}

/// Postgres the stack owns or borrows.
#[derive(Debug)]
pub enum Postgres {
    Owned(PgCluster),
    External(String),
}

impl Postgres {
    pub fn url(&self) -> String {
        match self {
            Self::Owned(c) => c.url(),
            Self::External(url) => url.clone(),
        }
    }

    /// The throwaway cluster, if this stack owns one (for fault injection).
    pub fn cluster(&mut self) -> Option<&mut PgCluster> {
        match self {
            Self::Owned(c) => Some(c),
            Self::External(_) => None,
        }
    }
}

/// A running dev stack. Dropping it stops everything.
#[derive(Debug)]
pub struct Stack {
    pub postgres: Postgres,
    pub broker: Broker,
    pub registry_url: String,
    pub collector_url: String,
    pub product_url: String,
    pub cdc_url: String,
    pub datasets_root: String,
    pub labeler_url: String,
    pub eraser_url: String,
    pub trigger_url: String,
    admin_token: String,
    write_key: String,
    /// The key ring wrapping the data keys.
    kek: Secret,
    /// Working files of the services (the collector's spool).
    work: tempfile::TempDir,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stack {
    /// Starts Postgres, the broker and the registry; runs migrations, creates the topics and
    /// registers the catalogue.
    pub async fn up(options: StackOptions) -> Result<Self, DevError> {
        let postgres = match options.postgres_url {
            Some(url) => Postgres::External(url),
            None => Postgres::Owned(PgCluster::start().await?),
        };
        let broker = match options.broker {
            BrokerChoice::Process(storage) => Broker::start(storage).await?,
            BrokerChoice::Embedded => Broker::external_or_embedded(None).await?,
            BrokerChoice::External(bootstrap) => {
                Broker::external_or_embedded(Some(bootstrap)).await?
            }
        };
        let admin_token = uuid::Uuid::new_v4().simple().to_string();
        // The key ring that wraps data keys: the operator's (it must be theirs when the
        // database outlives the stack), or one made for this stack.
        let kek = Secret::new(
            std::env::var("FEEDLOOP_KEYS__KEK")
                .unwrap_or_else(|_| feedloop_core::crypto::KeyRing::generate_entry("dev")),
        );
        let shutdown = CancellationToken::new();

        let registry_config = feedloop_registry::Config {
            http: feedloop_registry::config::HttpConfig {
                listen: "127.0.0.1:0".into(),
                max_body_bytes: 1 << 20,
                request_timeout_ms: 30_000,
                tls: Default::default(),
            },
            postgres: feedloop_registry::config::PostgresConfig {
                url: Secret::new(postgres.url()),
                max_connections: 8,
            },
            auth: feedloop_registry::config::AuthConfig {
                users: BTreeMap::from([(
                    REGISTRY_USER.to_owned(),
                    Secret::new(admin_token.clone()),
                )]),
            },
            log: feedloop_registry::config::LogConfig { json: false },
        };
        let registry = feedloop_registry::start(registry_config, shutdown.child_token()).await?;
        let registry_url = format!("http://{}", registry.addr);
        let registry_task = tokio::spawn(async move {
            match registry.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "Registry stopped"),
                Err(e) => tracing::error!(error = %e, "Registry task failed"),
            }
        });

        let kafka = KafkaConfig::new(broker.bootstrap());
        ensure_topics(&kafka, TOPICS).await?;
        let work = tempfile::Builder::new()
            .prefix("feedloop-dev-")
            .tempdir()
            .map_err(|e| DevError::io("creating the stack's work directory", e))?;
        let write_key = format!("wk-dev-{}", uuid::Uuid::new_v4().simple());

        let mut collector = feedloop_collector::Config::from_defaults()
            .map_err(|e| DevError::Config(e.to_string()))?;
        collector.http.listen = "127.0.0.1:0".into();
        collector.kafka = kafka.clone();
        collector.registry = feedloop_collector::config::RegistryConfig::new(
            registry_url.clone(),
            REGISTRY_USER.to_owned(),
            Secret::new(admin_token.clone()),
        );
        collector.postgres.url = Secret::new(postgres.url());
        collector.auth.apps.insert(
            "dev".into(),
            feedloop_collector::config::AppConfig {
                keys: vec![Secret::new(write_key.clone())],
            },
        );
        collector.spool.dir = work.path().join("collector-spool");
        collector.keys.kek = kek.clone();
        collector.log.json = false;
        collector
            .validate()
            .map_err(|e| DevError::Config(e.to_string()))?;
        let running = feedloop_collector::start(collector, shutdown.child_token()).await?;
        let collector_url = format!("http://{}", running.addr);
        let collector_task = tokio::spawn(async move {
            match running.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "Collector stopped"),
                Err(e) => tracing::error!(error = %e, "Collector task failed"),
            }
        });

        let product_url = create_product_database(&postgres.url()).await?;
        let mut cdc =
            feedloop_cdc::Config::from_defaults().map_err(|e| DevError::Config(e.to_string()))?;
        cdc.source.url = Secret::new(product_url.clone());
        cdc.kafka = kafka.clone();
        cdc.registry = feedloop_cdc::config::RegistryConfig::new(
            registry_url.clone(),
            REGISTRY_USER.to_owned(),
            Secret::new(admin_token.clone()),
        );
        cdc.control.url = Secret::new(postgres.url());
        cdc.keys.kek = kek.clone();
        cdc.http.listen = "127.0.0.1:0".into();
        cdc.log.json = false;
        cdc.validate()
            .map_err(|e| DevError::Config(e.to_string()))?;
        let running = feedloop_cdc::start(cdc, shutdown.child_token()).await?;
        let cdc_url = format!("http://{}", running.addr);
        let cdc_task = tokio::spawn(async move {
            let _ = running.task.await;
        });

        let datasets_root = options
            .datasets_root
            .clone()
            .unwrap_or_else(|| work.path().join("datasets"));
        let mut labeler = feedloop_labeler::Config::from_defaults()
            .map_err(|e| DevError::Config(e.to_string()))?;
        labeler.datasets.root = datasets_root.display().to_string();
        labeler.kafka = kafka.clone();
        labeler.registry = feedloop_labeler::config::RegistryConfig::new(
            registry_url.clone(),
            REGISTRY_USER.to_owned(),
            Secret::new(admin_token.clone()),
        );
        labeler.control.url = Secret::new(postgres.url());
        labeler.http.listen = "127.0.0.1:0".into();
        labeler.log.json = false;
        labeler
            .validate()
            .map_err(|e| DevError::Config(e.to_string()))?;
        let running = feedloop_labeler::start(labeler, shutdown.child_token()).await?;
        let labeler_url = format!("http://{}", running.addr);
        let labeler_task = tokio::spawn(async move {
            let _ = running.task.await;
        });

        let mut eraser = feedloop_eraser::Config::from_defaults()
            .map_err(|e| DevError::Config(e.to_string()))?;
        eraser.http.listen = "127.0.0.1:0".into();
        eraser.auth.admin_token = Secret::new(admin_token.clone());
        eraser.erasure.hash_key = Secret::new(uuid::Uuid::new_v4().simple().to_string());
        eraser.datasets.root = datasets_root.display().to_string();
        eraser.kafka = kafka.clone();
        eraser.registry = feedloop_core::config::RegistryConfig::new(
            registry_url.clone(),
            REGISTRY_USER.to_owned(),
            Secret::new(admin_token.clone()),
        );
        eraser.control.url = Secret::new(postgres.url());
        eraser.keys.kek = kek.clone();
        eraser.log.json = false;
        eraser
            .validate()
            .map_err(|e| DevError::Config(e.to_string()))?;
        let running = feedloop_eraser::start(eraser, shutdown.child_token()).await?;
        let eraser_url = format!("http://{}", running.addr);
        let eraser_task = tokio::spawn(async move {
            let _ = running.task.await;
        });

        let mut trigger = feedloop_trigger::Config::from_defaults()
            .map_err(|e| DevError::Config(e.to_string()))?;
        trigger.http.listen = "127.0.0.1:0".into();
        trigger.auth.token = Secret::new(admin_token.clone());
        trigger.kafka = kafka.clone();
        trigger.registry = feedloop_core::config::RegistryConfig::new(
            registry_url.clone(),
            REGISTRY_USER.to_owned(),
            Secret::new(admin_token.clone()),
        );
        trigger.control.url = Secret::new(postgres.url());
        trigger.log.json = false;
        if let Some(policy) = options.trigger_policy {
            trigger.policies = BTreeMap::from([("*".to_owned(), policy)]);
        }
        trigger
            .validate()
            .map_err(|e| DevError::Config(e.to_string()))?;
        let running = feedloop_trigger::start(trigger, shutdown.child_token()).await?;
        let trigger_url = format!("http://{}", running.addr);
        let trigger_task = tokio::spawn(async move {
            let _ = running.task.await;
        });

        let stack = Self {
            postgres,
            broker,
            registry_url,
            collector_url,
            product_url,
            cdc_url,
            datasets_root: datasets_root.display().to_string(),
            labeler_url,
            eraser_url,
            trigger_url,
            admin_token,
            kek,
            write_key,
            work,
            shutdown,
            tasks: vec![
                trigger_task,
                eraser_task,
                labeler_task,
                cdc_task,
                collector_task,
                registry_task,
            ],
        };
        stack.register_catalogue().await?;
        Ok(stack)
    }

    /// A registry client with the stack's credentials.
    pub fn registry_client(&self) -> Result<RegistryClient, DevError> {
        RegistryClient::new(
            &self.registry_url,
            Some((
                REGISTRY_USER.to_owned(),
                Secret::new(self.admin_token.clone()),
            )),
            "",
            Duration::from_secs(10),
        )
        .map_err(|e| DevError::Schemas(e.to_string()))
    }

    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig::new(self.broker.bootstrap())
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn write_key(&self) -> &str {
        &self.write_key
    }

    /// The services' working directory.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    async fn register_catalogue(&self) -> Result<(), DevError> {
        let client = self.registry_client()?;
        let catalogue = Catalogue::embedded().map_err(|e| DevError::Schemas(e.to_string()))?;
        for (subject, schema) in catalogue
            .subjects()
            .map_err(|e| DevError::Schemas(e.to_string()))?
        {
            client
                .register(&subject, &schema)
                .await
                .map_err(|e| DevError::Schemas(format!("{subject}: {e}")))?;
        }
        Ok(())
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            postgres_url: self.postgres.url(),
            kafka_bootstrap: self.broker.bootstrap(),
            registry_url: self.registry_url.clone(),
            registry_user: REGISTRY_USER.to_owned(),
            registry_password: self.admin_token.clone(),
            admin_token: self.admin_token.clone(),
            keys_kek: self.kek.expose().to_owned(),
            collector_url: self.collector_url.clone(),
            write_key: self.write_key.clone(),
            product_url: self.product_url.clone(),
            cdc_url: self.cdc_url.clone(),
            datasets_root: self.datasets_root.clone(),
            labeler_url: self.labeler_url.clone(),
            eraser_url: self.eraser_url.clone(),
            trigger_url: self.trigger_url.clone(),
            pid: std::process::id(),
        }
    }

    /// Writes `dir/endpoints.json` atomically (and the pid file).
    pub fn write_endpoints(&self, dir: &Path) -> Result<PathBuf, DevError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| DevError::io("creating the stack directory", e))?;
        let path = dir.join(ENDPOINTS_FILE);
        let tmp = dir.join(format!(".{ENDPOINTS_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(&self.endpoints())
            .map_err(|e| DevError::io("encoding endpoints", std::io::Error::other(e)))?;
        // The pid file first: whoever sees endpoints.json can stop the stack at once.
        std::fs::write(dir.join(PID_FILE), std::process::id().to_string())
            .map_err(|e| DevError::io("writing the pid file", e))?;
        std::fs::write(&tmp, json).map_err(|e| DevError::io("writing endpoints", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| DevError::io("writing endpoints", e))?;
        Ok(path)
    }

    /// Stops the services, then the broker and Postgres.
    pub async fn down(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        // Broker and Postgres stop when dropped.
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
