//! The Kafka-compatible broker of the dev stack: `$KAFKA_BOOTSTRAP` if set, otherwise the
//! built-in broker (`feedloop_broker`), either in its own process (`feedloop broker`: the dev
//! stack, the benchmarks and the tests, which pause, kill and restart it) or inside this
//! process (the demo).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use feedloop_broker::{BrokerSpec, Storage, valid_user};
use feedloop_core::{
    config::Secret,
    kafka::{KafkaConfig, KafkaSasl, wait_ready},
};
use nix::sys::signal::Signal;

use super::{
    DevError,
    process::{Guarded, free_port, tail},
};

/// A broker the stack talks to.
#[derive(Debug)]
pub enum Broker {
    /// A cluster someone else runs (`KAFKA_BOOTSTRAP`).
    External { bootstrap: String },
    /// `feedloop broker`, a process this stack started.
    Process(BrokerProcess),
    /// tansu's broker inside this process (the demo's).
    Embedded(EmbeddedBroker),
}

impl Broker {
    /// `$KAFKA_BOOTSTRAP` if set, else a fresh `feedloop broker` process.
    pub async fn start(storage: Storage) -> Result<Self, DevError> {
        match std::env::var("KAFKA_BOOTSTRAP") {
            Ok(bootstrap) if !bootstrap.trim().is_empty() => {
                let broker = Self::External { bootstrap };
                broker.wait_ready().await?;
                Ok(broker)
            }
            _ => Ok(Self::Process(BrokerProcess::start(storage).await?)),
        }
    }

    /// `bootstrap` if given, else an embedded broker with memory storage.
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
            Self::Process(p) => p.bootstrap(),
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

    /// The broker process, when this stack runs one (for fault injection).
    pub fn process(&mut self) -> Option<&mut BrokerProcess> {
        match self {
            Self::Process(p) => Some(p),
            Self::External { .. } | Self::Embedded(_) => None,
        }
    }
}

/// Finds the `feedloop` binary that runs brokers: `$FEEDLOOP_BIN`, this process when it is
/// `feedloop`, or a `feedloop` next to it (or next to its directory: a test binary in
/// `target/debug/deps` beside `target/debug/feedloop`).
pub fn feedloop_bin() -> Result<PathBuf, DevError> {
    if let Some(p) = std::env::var_os("FEEDLOOP_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| DevError::io("finding this executable", e))?;
    if exe.file_stem().is_some_and(|s| s == "feedloop") {
        return Ok(exe);
    }
    let dir = exe.parent();
    let candidates = [dir, dir.and_then(Path::parent)];
    candidates
        .into_iter()
        .flatten()
        .map(|d| d.join("feedloop"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DevError::Prerequisite(format!(
                "the feedloop binary, which runs the broker, is not next to {}: build it \
                 (`cargo build -p feedloop`), set FEEDLOOP_BIN to it, or point KAFKA_BOOTSTRAP \
                 at a Kafka cluster",
                exe.display()
            ))
        })
}

/// `feedloop broker` in a process of its own, with a watchdog that kills it if this process
/// dies.
#[derive(Debug)]
pub struct BrokerProcess {
    dir: tempfile::TempDir,
    port: u16,
    storage: Storage,
    process: Option<Guarded>,
    /// Where clients are told to connect (a TLS proxy in front of it, say); unset: its port.
    advertised: Option<String>,
    /// Clients must authenticate (SASL SCRAM); the user and password it checks its own
    /// readiness with.
    authentication: Option<(String, String)>,
    /// Seconds between storage maintenance (compaction, with SQLite); unset: the default.
    maintenance_interval_s: Option<u64>,
}

/// Name of the users file in an authenticated broker's directory.
const USERS_FILE: &str = "users";

impl BrokerProcess {
    /// A broker in a fresh directory on a free port, not yet launched.
    fn prepare(storage: Storage) -> Result<Self, DevError> {
        let dir = tempfile::Builder::new()
            .prefix("feedloop-broker-")
            .tempdir()
            .map_err(|e| DevError::io("creating the broker directory", e))?;
        let port = free_port().map_err(|e| DevError::io("finding a free port", e))?;
        Ok(Self {
            dir,
            port,
            storage,
            process: None,
            advertised: None,
            authentication: None,
            maintenance_interval_s: None,
        })
    }

    pub async fn start(storage: Storage) -> Result<Self, DevError> {
        let mut broker = Self::prepare(storage)?;
        broker.launch().await?;
        Ok(broker)
    }

    /// A broker on SQLite storage that compacts its compacted topics every `every_s` seconds
    /// (what a test of compaction needs; Kafka does it within `max.compaction.lag.ms`).
    pub async fn start_compacting(every_s: u64) -> Result<Self, DevError> {
        let mut broker = Self::prepare(Storage::Sqlite)?;
        broker.maintenance_interval_s = Some(every_s);
        broker.launch().await?;
        Ok(broker)
    }

    /// A broker (SQLite storage) that authenticates clients with SASL SCRAM (SHA-256 or
    /// SHA-512) against `users` (name, password), and tells them to connect to `advertised`
    /// (`host:port`) once bootstrapped.
    pub async fn start_authenticated(
        users: &[(&str, &str)],
        advertised: &str,
    ) -> Result<Self, DevError> {
        let Some((first, password)) = users.first() else {
            return Err(DevError::Config(
                "an authenticated broker needs a user".into(),
            ));
        };
        let mut broker = Self::prepare(Storage::Sqlite)?;
        write_users(&broker.dir.path().join(USERS_FILE), users)?;
        broker.advertised = Some(advertised.to_owned());
        broker.authentication = Some(((*first).to_owned(), (*password).to_owned()));
        broker.launch().await?;
        Ok(broker)
    }

    /// The broker's own log (its `BROKER_LOG` level, `warn` unless set).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    async fn launch(&mut self) -> Result<(), DevError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| DevError::io("opening the broker log", e))?;
        let err_log = log
            .try_clone()
            .map_err(|e| DevError::io("opening the broker log", e))?;
        let mut cmd = Command::new(feedloop_bin()?);
        cmd.arg("broker")
            .args(["--port", &self.port.to_string()])
            .args(["--storage", self.storage.as_str()])
            .arg("--dir")
            .arg(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        if let Some(advertised) = &self.advertised {
            cmd.args(["--advertised", advertised]);
        }
        if self.authentication.is_some() {
            cmd.arg("--users").arg(self.dir.path().join(USERS_FILE));
        }
        if let Some(s) = self.maintenance_interval_s {
            cmd.args(["--maintenance-interval-s", &s.to_string()]);
        }
        let process = Guarded::spawn("broker", &mut cmd, Some(self.dir.path()))
            .map_err(|e| DevError::io("starting the broker", e))?;
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
                what: "broker",
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
            .ok_or(DevError::NotRunning("broker"))?
            .signal(signal)
            .map_err(|e| DevError::io("signalling the broker", e.into()))
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

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a users file `feedloop broker --users` reads: one `name:password` a line, readable by
/// its owner only.
fn write_users(path: &Path, users: &[(&str, &str)]) -> Result<(), DevError> {
    use std::os::unix::fs::OpenOptionsExt;
    for (name, password) in users {
        if !valid_user(name) || password.is_empty() || password.contains(['\n', '\r']) {
            return Err(DevError::Config(format!(
                "broker user {name:?}: a name without spaces or `:`, and a one-line password"
            )));
        }
    }
    let mut file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DevError::io("writing the broker's users", e))?;
    for (name, password) in users {
        writeln!(file, "{name}:{password}")
            .map_err(|e| DevError::io("writing the broker's users", e))?;
    }
    Ok(())
}

/// tansu's broker with memory storage, served by its own runtime on its own thread so that the
/// load the demo drives cannot starve it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    port: u16,
    stop: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    pub fn start() -> Result<Self, DevError> {
        let port = free_port().map_err(|e| DevError::io("finding a free port", e))?;
        let spec = BrokerSpec {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            advertised: None,
            storage: Storage::Memory,
            dir: PathBuf::new(),
            users: Vec::new(),
            maintenance_interval: feedloop_broker::MAINTENANCE_INTERVAL,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tansu")
            .enable_all()
            .build()
            .map_err(|e| DevError::io("starting the embedded broker's runtime", e))?;
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tansu".into())
            .spawn(move || {
                runtime.block_on(async move {
                    if let Err(e) = feedloop_broker::serve(spec, stopped).await {
                        tracing::error!(error = %e, "The embedded broker stopped");
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| DevError::io("starting the embedded broker's thread", e))?;
        Ok(Self {
            port,
            stop,
            thread: Some(thread),
        })
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
