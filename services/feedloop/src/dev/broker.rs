//! The Kafka-compatible broker of the dev stack: `$KAFKA_BOOTSTRAP` if set, otherwise a tansu
//! broker in its own process.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use feedloop_core::{
    config::Secret,
    kafka::{KafkaConfig, KafkaSasl, wait_ready},
};
use nix::sys::signal::Signal;

use super::{
    DevError,
    process::{Guarded, free_port, tail},
};

/// The install command DESIGN.md and the test script use.
pub const TANSU_INSTALL: &str =
    "cargo install tansu --locked --version 0.6.0 --features dynostore,libsql";

/// How a tansu broker stores its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// In memory: fastest; lost when the broker stops.
    Memory,
    /// SQLite in the broker's directory: survives kill -9 and restart.
    Sqlite,
}

/// A broker the stack talks to.
#[derive(Debug)]
pub enum Broker {
    /// A cluster someone else runs (`KAFKA_BOOTSTRAP`).
    External { bootstrap: String },
    /// A tansu broker this stack started.
    Tansu(TansuBroker),
    /// tansu's broker inside this process (the demo's: nothing to install).
    Embedded(EmbeddedBroker),
}

#[derive(Debug)]
pub struct TansuBroker {
    dir: tempfile::TempDir,
    port: u16,
    storage: Storage,
    process: Option<Guarded>,
    /// Where clients are told to connect (a TLS proxy in front of it, say); unset: its port.
    advertised: Option<String>,
    /// Clients must authenticate (SASL SCRAM-SHA-512); the user and password it checks its
    /// own readiness with.
    authentication: Option<(String, String)>,
}

/// Finds the tansu binary: `$TANSU_BIN`, `PATH`, or `~/.cargo/bin`.
pub fn tansu_bin() -> Result<PathBuf, DevError> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(Path::new(&home).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/tansu"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        DevError::Prerequisite(format!(
            "the tansu broker is not installed: run `{TANSU_INSTALL}`, or point KAFKA_BOOTSTRAP at a Kafka cluster"
        ))
    })
}

impl Broker {
    /// `$KAFKA_BOOTSTRAP` if set, else a fresh tansu broker.
    pub async fn start(storage: Storage) -> Result<Self, DevError> {
        match std::env::var("KAFKA_BOOTSTRAP") {
            Ok(bootstrap) if !bootstrap.trim().is_empty() => {
                let broker = Self::External { bootstrap };
                broker.wait_ready().await?;
                Ok(broker)
            }
            _ => Ok(Self::Tansu(TansuBroker::start(storage).await?)),
        }
    }

    /// `bootstrap` if given, else an embedded tansu broker with memory storage.
    pub async fn external_or_embedded(bootstrap: Option<String>) -> Result<Self, DevError> {
        let broker = match bootstrap {
            Some(bootstrap) => Self::External { bootstrap },
            None => Self::Embedded(EmbeddedBroker::start()?),
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Self::External { bootstrap } => bootstrap.clone(),
            Self::Tansu(t) => t.bootstrap(),
            Self::Embedded(e) => e.bootstrap(),
        }
    }

    async fn wait_ready(&self) -> Result<(), DevError> {
        wait_ready(&KafkaConfig::new(self.bootstrap()), Duration::from_secs(30))
            .await
            .map_err(|e| DevError::Start {
                what: "kafka",
                detail: e.to_string(),
            })
    }

    /// The tansu process, when this stack runs one (for fault injection).
    pub fn tansu(&mut self) -> Option<&mut TansuBroker> {
        match self {
            Self::Tansu(t) => Some(t),
            Self::External { .. } | Self::Embedded(_) => None,
        }
    }
}

impl TansuBroker {
    pub async fn start(storage: Storage) -> Result<Self, DevError> {
        let dir = tempfile::Builder::new()
            .prefix("feedloop-tansu-")
            .tempdir()
            .map_err(|e| DevError::io("creating the broker directory", e))?;
        let port = free_port().map_err(|e| DevError::io("finding a free port", e))?;
        let mut broker = Self {
            dir,
            port,
            storage,
            process: None,
            advertised: None,
            authentication: None,
        };
        broker.launch().await?;
        Ok(broker)
    }

    /// A broker (SQLite storage) that authenticates clients with SASL SCRAM-SHA-512 against
    /// `users` (name, password), and tells them to connect to `advertised` (`host:port`) once
    /// bootstrapped. tansu only lets authenticated clients create users, so they are created
    /// first, with authentication off, and the broker then starts again with it on.
    pub async fn start_authenticated(
        users: &[(&str, &str)],
        advertised: &str,
    ) -> Result<Self, DevError> {
        let Some((first, password)) = users.first() else {
            return Err(DevError::Config(
                "an authenticated broker needs a user".into(),
            ));
        };
        let mut broker = Self::start(Storage::Sqlite).await?;
        for (name, password) in users {
            let out = Command::new(tansu_bin()?)
                .args(["user", "create", "--mechanism", "scram512", "--broker"])
                .arg(format!("tcp://{}", broker.bootstrap()))
                .args([name, password])
                .output()
                .map_err(|e| DevError::io("creating a tansu user", e))?;
            if !out.status.success() {
                return Err(DevError::Start {
                    what: "tansu user create",
                    detail: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        broker.stop();
        broker.advertised = Some(advertised.to_owned());
        broker.authentication = Some(((*first).to_owned(), (*password).to_owned()));
        broker.launch().await?;
        Ok(broker)
    }

    /// The broker's own log (its `TANSU_LOG` level, `warn` unless set).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    async fn launch(&mut self) -> Result<(), DevError> {
        let bin = tansu_bin()?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = self
            .advertised
            .as_ref()
            .map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
        // tansu resolves the SQLite path against its working directory, the broker's.
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/",
            Storage::Sqlite => "sqlite://broker.db",
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| DevError::io("opening the broker log", e))?;
        let err_log = log
            .try_clone()
            .map_err(|e| DevError::io("opening the broker log", e))?;
        let mut cmd = Command::new(bin);
        cmd.arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", storage])
            .current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        if self.authentication.is_some() {
            cmd.arg("--authentication");
        }
        let process = Guarded::spawn("tansu", &mut cmd, Some(self.dir.path()))
            .map_err(|e| DevError::io("starting tansu", e))?;
        self.process = Some(process);
        let mut kafka = KafkaConfig::new(self.bootstrap());
        if let Some((user, password)) = &self.authentication {
            kafka.sasl = KafkaSasl {
                mechanism: "SCRAM-SHA-512".into(),
                user: user.clone(),
                password: Secret::new(password.clone()),
            };
        }
        let ready = wait_ready(&kafka, Duration::from_secs(30)).await;
        let running = self.process.as_mut().is_some_and(Guarded::is_running);
        match ready {
            Ok(()) if running => Ok(()),
            other => Err(DevError::Start {
                what: "tansu",
                detail: format!(
                    "{}\n{}",
                    other.err().map(|e| e.to_string()).unwrap_or_default(),
                    tail(&self.log_path(), 20)
                ),
            }),
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Guarded::pid)
    }

    /// Sends a signal to the broker (SIGSTOP / SIGCONT simulate an outage).
    pub fn signal(&self, signal: Signal) -> Result<(), DevError> {
        self.process
            .as_ref()
            .ok_or(DevError::NotRunning("tansu"))?
            .signal(signal)
            .map_err(|e| DevError::io("signalling tansu", e.into()))
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop_with(Signal::SIGTERM, Duration::from_secs(10));
        }
    }

    /// Stops and starts the broker again on the same port (memory storage starts empty).
    pub async fn restart(&mut self) -> Result<(), DevError> {
        self.stop();
        self.launch().await
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// tansu's broker (the tansu-broker crate) with memory storage, served by its own runtime on
/// its own thread so that the load the demo drives cannot starve it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    pub fn start() -> Result<Self, DevError> {
        let port = free_port().map_err(|e| DevError::io("finding a free port", e))?;
        let url = url::Url::parse(&format!("tcp://127.0.0.1:{port}"))
            .map_err(|e| DevError::Config(e.to_string()))?;
        let storage =
            url::Url::parse("memory://tansu/").map_err(|e| DevError::Config(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tansu")
            .enable_all()
            .build()
            .map_err(|e| DevError::io("starting the embedded broker's runtime", e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tansu".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let built = tansu_broker::broker::Broker::<
                        tansu_broker::coordinator::group::administrator::Controller<
                            tansu_storage::StorageContainer,
                        >,
                        tansu_storage::StorageContainer,
                    >::builder()
                    .node_id(tansu_broker::NODE_ID)
                    .cluster_id("feedloop")
                    .incarnation_id(uuid::Uuid::new_v4())
                    .advertised_listener(url.clone())
                    .storage(storage)
                    .listener(url)
                    .silent(true)
                    .build()
                    .await;
                    let mut broker = match built {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(error = %e, "the embedded broker did not start");
                            return;
                        }
                    };
                    tokio::select! {
                        served = broker.serve(tokio::time::Instant::now()) => {
                            if let Err(e) = served {
                                tracing::error!(error = %e, "the embedded broker stopped");
                            }
                        }
                        _ = stopped => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| DevError::io("starting the embedded broker's thread", e))?;
        Ok(Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
