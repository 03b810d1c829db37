//! The Kafka-compatible broker of the dev stack: `$KAFKA_BOOTSTRAP` if set, otherwise tansu's
//! broker (the tansu-broker crate, built into this binary), either in its own process
//! (`feedloop broker`: the dev stack, the benchmarks and the tests, which pause, kill and
//! restart it) or inside this process (the demo).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use feedloop_core::{
    config::Secret,
    kafka::{KafkaConfig, KafkaSasl, wait_ready},
};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::{
    DevError,
    process::{Guarded, free_port, tail},
};

/// How a broker stores its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    /// In memory: fastest; lost when the broker stops.
    Memory,
    /// SQLite (`broker.db` in the broker's directory): survives kill -9 and restart.
    Sqlite,
}

/// Name of the SQLite database in a broker's directory.
pub const SQLITE_FILE: &str = "broker.db";

/// The cluster id the built-in broker reports.
const CLUSTER_ID: &str = "feedloop";

/// PBKDF2 iterations of the SCRAM credentials `feedloop broker --users` creates (Kafka's
/// default for `kafka-configs --add-config SCRAM-SHA-512=[...]`).
const SCRAM_ITERATIONS: u32 = 4096;

/// What one tansu broker serves.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    /// Address to listen on.
    pub listen: std::net::SocketAddr,
    /// `host:port` clients are told to connect to once bootstrapped (a TLS proxy in front of
    /// the broker, say); unset: the listen address.
    pub advertised: Option<String>,
    pub storage: Storage,
    /// Holds the SQLite database (sqlite storage); must be absolute.
    pub dir: PathBuf,
    /// SASL SCRAM users (name, password); clients must authenticate when there are any.
    pub users: Vec<(String, Secret)>,
}

impl BrokerSpec {
    fn urls(&self) -> Result<(Url, Url, Url), DevError> {
        let parse = |what: &str, text: String| {
            Url::parse(&text).map_err(|e| DevError::Config(format!("broker {what} {text}: {e}")))
        };
        let listener = parse("listener", format!("tcp://{}", self.listen))?;
        let advertised = match &self.advertised {
            Some(a) => parse("advertised listener", format!("tcp://{a}"))?,
            None if self.listen.ip().is_unspecified() => {
                return Err(DevError::Config(format!(
                    "listening on {} needs --advertised HOST:PORT: clients cannot connect to an \
                     unspecified address",
                    self.listen
                )));
            }
            None => listener.clone(),
        };
        let storage = match self.storage {
            Storage::Memory => parse("storage", "memory://tansu/".into())?,
            // tansu resolves a SQLite URL's path against the working directory (see `serve`).
            Storage::Sqlite => parse("storage", format!("sqlite://{SQLITE_FILE}"))?,
        };
        Ok((listener, advertised, storage))
    }
}

/// Serves `spec` until `stop` is cancelled or the broker fails. With SQLite storage this process's
/// working directory becomes `spec.dir` (tansu opens the database relative to it): call it only
/// in a process of its own (`feedloop broker`).
pub async fn serve(spec: BrokerSpec, stop: CancellationToken) -> Result<(), DevError> {
    let (listener, advertised, storage) = spec.urls()?;
    if spec.storage == Storage::Sqlite {
        fs::create_dir_all(&spec.dir)
            .map_err(|e| DevError::io("creating the broker directory", e))?;
        std::env::set_current_dir(&spec.dir)
            .map_err(|e| DevError::io("entering the broker directory", e))?;
    } else if !spec.users.is_empty() {
        return Err(DevError::Config(
            "broker users need sqlite storage (memory storage starts empty)".into(),
        ));
    }
    if !spec.users.is_empty() {
        create_users(&storage, &advertised, &spec.users).await?;
    }
    let built = tansu_broker::broker::Broker::<
        tansu_broker::coordinator::group::administrator::Controller<
            tansu_storage::StorageContainer,
        >,
        tansu_storage::StorageContainer,
    >::builder()
    .node_id(tansu_broker::NODE_ID)
    .cluster_id(CLUSTER_ID)
    .incarnation_id(uuid::Uuid::new_v4())
    .advertised_listener(advertised)
    .storage(storage)
    .listener(listener)
    .authentication(!spec.users.is_empty())
    .silent(true)
    .build()
    .await
    .map_err(|e| DevError::Start {
        what: "broker",
        detail: e.to_string(),
    })?;
    let mut broker = built;
    tokio::select! {
        served = broker.serve(tokio::time::Instant::now()) => served.map_err(|e| DevError::Start {
            what: "broker",
            detail: e.to_string(),
        }),
        () = stop.cancelled() => Ok(()),
    }
}

/// Stores SCRAM-SHA-256 and SCRAM-SHA-512 credentials of `users` in the broker's storage, as
/// Kafka's `AlterUserScramCredentials` would (the broker then authenticates against them).
async fn create_users(
    storage_url: &Url,
    advertised: &Url,
    users: &[(String, Secret)],
) -> Result<(), DevError> {
    use tansu_sans_io::ScramMechanism;
    use tansu_storage::Storage as _;
    let fail = |e: tansu_storage::Error| DevError::Start {
        what: "broker users",
        detail: e.to_string(),
    };
    // Its own storage handle on the broker's database, closed before the broker opens it (a
    // second open connection would leave the broker's writes "database is locked").
    let closed = CancellationToken::new();
    let storage = tansu_storage::StorageContainer::builder()
        .node_id(tansu_broker::NODE_ID)
        .cluster_id(CLUSTER_ID)
        .advertised_listener(advertised.clone())
        .storage(storage_url.clone())
        .cancellation(closed.clone())
        .silent(true)
        .build()
        .await
        .map_err(fail)?;
    // Credentials belong to a registered cluster (until then, storing one stores nothing).
    let mut stored = storage
        .register_broker(tansu_storage::BrokerRegistrationRequest {
            broker_id: tansu_broker::NODE_ID,
            cluster_id: CLUSTER_ID.into(),
            incarnation_id: uuid::Uuid::new_v4(),
            rack: None,
        })
        .await
        .map_err(fail);
    'users: for (name, password) in users {
        if stored.is_err() {
            break;
        }
        for mechanism in [ScramMechanism::Scram256, ScramMechanism::Scram512] {
            let credential = scram_credential(mechanism, password.expose())?;
            stored = match storage
                .upsert_user_scram_credential(name, mechanism, credential)
                .await
            {
                Ok(()) => match storage.user_scram_credential(name, mechanism).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(DevError::Start {
                        what: "broker users",
                        detail: format!("the broker did not keep the credentials of {name}"),
                    }),
                    Err(e) => Err(fail(e)),
                },
                Err(e) => Err(fail(e)),
            };
            if stored.is_err() {
                break 'users;
            }
        }
    }
    closed.cancel();
    drop(storage);
    stored?;
    // SQLite checkpoints and removes the write-ahead log when the last connection closes; until
    // then the broker's own connection would find the database locked.
    let wal = PathBuf::from(format!("{SQLITE_FILE}-wal"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while wal.exists() {
        if std::time::Instant::now() >= deadline {
            return Err(DevError::Start {
                what: "broker users",
                detail: format!("{SQLITE_FILE} was still in use 10 s after storing the users"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A SCRAM credential (RFC 5802) of `password` with a random salt.
fn scram_credential(
    mechanism: tansu_sans_io::ScramMechanism,
    password: &str,
) -> Result<tansu_storage::ScramCredential, DevError> {
    let salt: [u8; 16] = rand::random();
    let (stored_key, server_key) = match mechanism {
        tansu_sans_io::ScramMechanism::Scram256 => {
            scram_keys::<sha2::Sha256>(password, &salt, SCRAM_ITERATIONS)?
        }
        tansu_sans_io::ScramMechanism::Scram512 => {
            scram_keys::<sha2::Sha512>(password, &salt, SCRAM_ITERATIONS)?
        }
    };
    Ok(tansu_storage::ScramCredential {
        salt: bytes::Bytes::copy_from_slice(&salt),
        iterations: i32::try_from(SCRAM_ITERATIONS).unwrap_or(i32::MAX),
        stored_key: stored_key.into(),
        server_key: server_key.into(),
    })
}

/// RFC 5802's StoredKey and ServerKey: SaltedPassword = PBKDF2(password, salt, iterations),
/// StoredKey = H(HMAC(SaltedPassword, "Client Key")), ServerKey = HMAC(SaltedPassword,
/// "Server Key").
fn scram_keys<D>(
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<(Vec<u8>, Vec<u8>), DevError>
where
    D: sha2::Digest + hmac::digest::core_api::BlockSizeUser + Clone + Sync,
{
    use hmac::{Mac, SimpleHmac};
    let failed = |e: hmac::digest::InvalidLength| DevError::Config(format!("SCRAM keys: {e}"));
    let mut salted = vec![0u8; <D as sha2::Digest>::output_size()];
    pbkdf2::pbkdf2::<SimpleHmac<D>>(password.as_bytes(), salt, iterations, &mut salted)
        .map_err(failed)?;
    let hmac = |message: &[u8]| -> Result<Vec<u8>, DevError> {
        let mut mac = <SimpleHmac<D> as Mac>::new_from_slice(&salted).map_err(failed)?;
        mac.update(message);
        Ok(mac.finalize().into_bytes().to_vec())
    };
    let client_key = hmac(b"Client Key")?;
    Ok((D::digest(&client_key).to_vec(), hmac(b"Server Key")?))
}

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
}

/// Name of the users file in an authenticated broker's directory.
const USERS_FILE: &str = "users";

impl BrokerProcess {
    pub async fn start(storage: Storage) -> Result<Self, DevError> {
        let dir = tempfile::Builder::new()
            .prefix("feedloop-broker-")
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
        let dir = tempfile::Builder::new()
            .prefix("feedloop-broker-")
            .tempdir()
            .map_err(|e| DevError::io("creating the broker directory", e))?;
        write_users(&dir.path().join(USERS_FILE), users)?;
        let port = free_port().map_err(|e| DevError::io("finding a free port", e))?;
        let mut broker = Self {
            dir,
            port,
            storage: Storage::Sqlite,
            process: None,
            advertised: Some(advertised.to_owned()),
            authentication: Some(((*first).to_owned(), (*password).to_owned())),
        };
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
            .args([
                "--storage",
                match self.storage {
                    Storage::Memory => "memory",
                    Storage::Sqlite => "sqlite",
                },
            ])
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

/// A SCRAM user name this file format can carry: not empty, no `:`, no white space.
fn valid_user(name: &str) -> bool {
    !name.is_empty() && !name.contains(':') && !name.contains(char::is_whitespace)
}

/// Reads a users file: one `name:password` a line, the password verbatim to the end of the line
/// (spaces included); blank lines and lines starting with `#` are skipped.
pub fn read_users(path: &Path) -> Result<Vec<(String, Secret)>, DevError> {
    let text =
        fs::read_to_string(path).map_err(|e| DevError::io("reading the broker's users", e))?;
    let mut users = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((name, password)) if valid_user(name) && !password.is_empty() => {
                users.push((name.to_owned(), Secret::new(password)));
            }
            _ => {
                return Err(DevError::Config(format!(
                    "{} line {}: expected `name:password` (a name without spaces or `:`)",
                    path.display(),
                    n + 1
                )));
            }
        }
    }
    if users.is_empty() {
        return Err(DevError::Config(format!(
            "{}: no users in it",
            path.display()
        )));
    }
    Ok(users)
}

/// tansu's broker with memory storage, served by its own runtime on its own thread so that the
/// load the demo drives cannot starve it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    port: u16,
    stop: CancellationToken,
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
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tansu")
            .enable_all()
            .build()
            .map_err(|e| DevError::io("starting the embedded broker's runtime", e))?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tansu".into())
            .spawn(move || {
                runtime.block_on(async move {
                    if let Err(e) = serve(spec, stopped).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_files_are_name_colon_password_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("users");
        fs::write(&path, "# comment\n\nalice:s3cr:et\nbob: pw \r\n").expect("write");
        let users = read_users(&path).expect("users");
        let names: Vec<(&str, &str)> = users
            .iter()
            .map(|(n, p)| (n.as_str(), p.expose()))
            .collect();
        assert_eq!(names, [("alice", "s3cr:et"), ("bob", " pw ")]);
        fs::write(&path, " bob:pw\n").expect("write");
        assert!(read_users(&path).is_err(), "a name with a space");
        fs::write(&path, "alice\n").expect("write");
        assert!(read_users(&path).is_err());
        fs::write(&path, "# nobody\n").expect("write");
        assert!(read_users(&path).is_err());
    }

    /// RFC 7677's exchange (user "user", password "pencil"): the keys derived here verify its
    /// client proof and produce its server signature, as a SCRAM server computes them.
    #[test]
    fn scram_keys_verify_rfc_7677s_exchange() {
        use base64::Engine as _;
        use hmac::{Mac, SimpleHmac};
        use sha2::{Digest, Sha256};
        let b64 = |s: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .expect("base64")
        };
        let (stored_key, server_key) =
            scram_keys::<Sha256>("pencil", &b64("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096).expect("keys");
        let auth_message = b"n=user,r=rOprNGfwEbeRWgbNEkqO,\
            r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
            c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let hmac = |key: &[u8]| {
            let mut mac = <SimpleHmac<Sha256> as Mac>::new_from_slice(key).expect("key");
            mac.update(auth_message);
            mac.finalize().into_bytes().to_vec()
        };
        assert_eq!(
            hmac(&server_key),
            b64("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        );
        let client_key: Vec<u8> = b64("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .iter()
            .zip(hmac(&stored_key))
            .map(|(p, s)| p ^ s)
            .collect();
        assert_eq!(Sha256::digest(&client_key).to_vec(), stored_key);

        let credential = scram_credential(tansu_sans_io::ScramMechanism::Scram512, "pencil")
            .expect("credential");
        assert_eq!(credential.iterations, 4096);
        assert_eq!(
            (credential.stored_key.len(), credential.server_key.len()),
            (64, 64)
        );
    }
}
