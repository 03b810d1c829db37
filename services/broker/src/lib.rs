//! feedloop's built-in Kafka-compatible broker: tansu (the tansu-broker crate) with memory or
//! SQLite storage and SASL SCRAM users, as `feedloop broker` runs it in a process of its own and
//! the demo inside its own. Development and tests only: production runs on Kafka.

use std::{
    fs,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    time::Duration,
};

use feedloop_core::config::Secret;
use tokio_util::sync::CancellationToken;
use url::Url;

/// Why the broker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("broker users: {0}")]
    Users(String),
    #[error("broker: {0}")]
    Broker(String),
}

impl BrokerError {
    fn io(what: &'static str, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }
}

/// How a broker stores its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// In memory: fastest; lost when the broker stops.
    Memory,
    /// SQLite (`broker.db` in the broker's directory): survives kill -9 and restart.
    Sqlite,
}

impl std::str::FromStr for Storage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "memory" => Ok(Self::Memory),
            "sqlite" => Ok(Self::Sqlite),
            other => Err(format!("unknown storage {other:?}: memory or sqlite")),
        }
    }
}

impl Storage {
    /// The name `FromStr` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
        }
    }
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
    /// How often the broker maintains its storage: with SQLite, that is when compacted topics
    /// are compacted (tansu keeps each key's last record) and retention applies. Memory
    /// storage never compacts.
    pub maintenance_interval: std::time::Duration,
}

/// tansu's default maintenance interval.
pub const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

impl BrokerSpec {
    fn urls(&self) -> Result<(Url, Url, Url), BrokerError> {
        let parse = |what: &str, text: String| {
            Url::parse(&text).map_err(|e| BrokerError::Config(format!("broker {what} {text}: {e}")))
        };
        let listener = parse("listener", format!("tcp://{}", self.listen))?;
        let advertised = match &self.advertised {
            Some(a) => parse("advertised listener", format!("tcp://{a}"))?,
            None if self.listen.ip().is_unspecified() => {
                return Err(BrokerError::Config(format!(
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
            Storage::Sqlite => parse(
                "storage",
                format!(
                    "sqlite://{SQLITE_FILE}?maintenance_interval={}ms",
                    self.maintenance_interval.as_millis().max(1)
                ),
            )?,
        };
        Ok((listener, advertised, storage))
    }
}

/// Serves `spec` until `stop` is cancelled or the broker fails. With SQLite storage this process's
/// working directory becomes `spec.dir` (tansu opens the database relative to it): call it only
/// in a process of its own (`feedloop broker`).
///
/// Boxed, so that tansu's broker (generic over its storage and coordinator, a third of a cold
/// build's code) is compiled once, in this crate, which builds beside the services' crates
/// instead of inside the `feedloop` CLI at the end.
pub fn serve(spec: BrokerSpec, stop: CancellationToken) -> Serving {
    Box::pin(serve_until(spec, stop))
}

/// The broker serving: ends when stopped or failed.
pub type Serving = Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send>>;

async fn serve_until(spec: BrokerSpec, stop: CancellationToken) -> Result<(), BrokerError> {
    let (listener, advertised, storage) = spec.urls()?;
    if spec.storage == Storage::Sqlite {
        fs::create_dir_all(&spec.dir)
            .map_err(|e| BrokerError::io("creating the broker directory", e))?;
        std::env::set_current_dir(&spec.dir)
            .map_err(|e| BrokerError::io("entering the broker directory", e))?;
    } else if !spec.users.is_empty() {
        return Err(BrokerError::Config(
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
    .map_err(|e| BrokerError::Broker(e.to_string()))?;
    let mut broker = built;
    tokio::select! {
        served = broker.serve(tokio::time::Instant::now()) => served.map_err(|e| BrokerError::Broker(e.to_string())),
        () = stop.cancelled() => Ok(()),
    }
}

/// Stores SCRAM-SHA-256 and SCRAM-SHA-512 credentials of `users` in the broker's storage, as
/// Kafka's `AlterUserScramCredentials` would (the broker then authenticates against them).
async fn create_users(
    storage_url: &Url,
    advertised: &Url,
    users: &[(String, Secret)],
) -> Result<(), BrokerError> {
    use tansu_sans_io::ScramMechanism;
    use tansu_storage::Storage as _;
    let fail = |e: tansu_storage::Error| BrokerError::Users(e.to_string());
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
                    Ok(None) => Err(BrokerError::Users(format!(
                        "the broker did not keep the credentials of {name}"
                    ))),
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
            return Err(BrokerError::Users(format!(
                "{SQLITE_FILE} was still in use 10 s after storing the users"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A SCRAM credential (RFC 5802) of `password` with a random salt.
fn scram_credential(
    mechanism: tansu_sans_io::ScramMechanism,
    password: &str,
) -> Result<tansu_storage::ScramCredential, BrokerError> {
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
) -> Result<(Vec<u8>, Vec<u8>), BrokerError>
where
    D: sha2::Digest + hmac::digest::core_api::BlockSizeUser + Clone + Sync,
{
    use hmac::{Mac, SimpleHmac};
    let failed = |e: hmac::digest::InvalidLength| BrokerError::Config(format!("SCRAM keys: {e}"));
    let mut salted = vec![0u8; <D as sha2::Digest>::output_size()];
    pbkdf2::pbkdf2::<SimpleHmac<D>>(password.as_bytes(), salt, iterations, &mut salted)
        .map_err(failed)?;
    let hmac = |message: &[u8]| -> Result<Vec<u8>, BrokerError> {
        let mut mac = <SimpleHmac<D> as Mac>::new_from_slice(&salted).map_err(failed)?;
        mac.update(message);
        Ok(mac.finalize().into_bytes().to_vec())
    };
    let client_key = hmac(b"Client Key")?;
    Ok((D::digest(&client_key).to_vec(), hmac(b"Server Key")?))
}

/// A SCRAM user name this file format can carry: not empty, no `:`, no white space.
pub fn valid_user(name: &str) -> bool {
    !name.is_empty() && !name.contains(':') && !name.contains(char::is_whitespace)
}

/// Reads a users file: one `name:password` a line, the password verbatim to the end of the line
/// (spaces included); blank lines and lines starting with `#` are skipped.
pub fn read_users(path: &Path) -> Result<Vec<(String, Secret)>, BrokerError> {
    let text =
        fs::read_to_string(path).map_err(|e| BrokerError::io("reading the broker's users", e))?;
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
                return Err(BrokerError::Config(format!(
                    "{} line {}: expected `name:password` (a name without spaces or `:`)",
                    path.display(),
                    n + 1
                )));
            }
        }
    }
    if users.is_empty() {
        return Err(BrokerError::Config(format!(
            "{}: no users in it",
            path.display()
        )));
    }
    Ok(users)
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
