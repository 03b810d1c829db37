//! A throwaway PostgreSQL cluster: initdb in a fresh temp dir, `wal_level=logical`, a free port,
//! its socket in its own directory. As root, it runs as the `postgres` system user, because
//! initdb refuses to run as root.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::Signal,
    unistd::{Gid, Uid, User, chown},
};
use sqlx::Connection;

use super::{
    DevError,
    process::{Guarded, free_port, tail},
};

/// A running throwaway cluster. Stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    root: tempfile::TempDir,
    port: u16,
    bindir: PathBuf,
    owner: Option<(Uid, Gid)>,
    process: Option<Guarded>,
    /// Serves TLS only, over TCP (`hostssl`); plaintext TCP is refused.
    tls: bool,
}

/// Where the server binaries are: `$PG_BINDIR`, `pg_config --bindir`, or the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn bindir() -> Result<PathBuf, DevError> {
    let has_initdb = |p: &Path| p.join("initdb").is_file() && p.join("postgres").is_file();
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, p)| has_initdb(p))
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| DevError::Prerequisite(
            "PostgreSQL server binaries (initdb, postgres) not found: install them (Debian: postgresql) or set PG_BINDIR".into(),
        ))
}

impl PgCluster {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub async fn start() -> Result<Self, DevError> {
        Self::start_with(None).await
    }

    /// [`start`](Self::start) with a server that takes TCP connections over TLS only, with
    /// this certificate chain and key (PEM files, copied into the cluster).
    pub async fn start_tls(cert: &Path, key: &Path) -> Result<Self, DevError> {
        Self::start_with(Some((cert, key))).await
    }

    async fn start_with(tls: Option<(&Path, &Path)>) -> Result<Self, DevError> {
        let bindir = bindir()?;
        let root = tempfile::Builder::new()
            .prefix("feedloop-pg-")
            .tempdir()
            .map_err(|e| DevError::io("creating the Postgres directory", e))?;
        let owner = if Uid::effective().is_root() {
            let user = User::from_name("postgres").ok().flatten().ok_or_else(|| {
                DevError::Prerequisite(
                    "running as root needs a `postgres` system user to own the throwaway cluster"
                        .into(),
                )
            })?;
            chown(root.path(), Some(user.uid), Some(user.gid)).map_err(|e| {
                DevError::io("handing the Postgres directory to postgres", e.into())
            })?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        let mut cluster = Self {
            root,
            port: 0,
            bindir,
            owner,
            process: None,
            tls: tls.is_some(),
        };
        cluster.initdb()?;
        if let Some((cert, key)) = tls {
            cluster.require_tls(cert, key)?;
        }
        cluster.launch().await?;
        Ok(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd.current_dir(self.root.path());
        cmd
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("postgres.log")
    }

    fn initdb(&self) -> Result<(), DevError> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(|e| DevError::io("running initdb", e))?;
        if !out.status.success() {
            return Err(DevError::Start {
                what: "initdb",
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// Installs the certificate and key as `server.crt` and `server.key` (owned by the server's
    /// user, the key readable by it alone, as Postgres insists) and lets TCP clients in over
    /// TLS only.
    fn require_tls(&self, cert: &Path, key: &Path) -> Result<(), DevError> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data_dir();
        for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
            let to = data.join(name);
            fs::copy(from, &to).map_err(|e| DevError::io("installing the TLS files", e))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(mode))
                .map_err(|e| DevError::io("installing the TLS files", e))?;
            if let Some((uid, gid)) = self.owner {
                chown(&to, Some(uid), Some(gid))
                    .map_err(|e| DevError::io("installing the TLS files", e.into()))?;
            }
        }
        let hba = "local all all trust\n\
                   hostssl all all 127.0.0.1/32 trust\n\
                   hostssl replication all 127.0.0.1/32 trust\n\
                   hostssl all all ::1/128 trust\n\
                   hostssl replication all ::1/128 trust\n";
        fs::write(data.join("pg_hba.conf"), hba).map_err(|e| DevError::io("writing pg_hba.conf", e))
    }

    /// Starts the server on a free port (the same port again on restart).
    async fn launch(&mut self) -> Result<(), DevError> {
        if self.port == 0 {
            self.port = free_port().map_err(|e| DevError::io("finding a free port", e))?;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| DevError::io("opening the Postgres log", e))?;
        if let Some((uid, gid)) = self.owner {
            let _ = chown(&self.log_path(), Some(uid), Some(gid));
        }
        let err_log = log
            .try_clone()
            .map_err(|e| DevError::io("opening the Postgres log", e))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.root.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "wal_level=logical",
                "-c",
                "max_wal_senders=20",
                "-c",
                "max_replication_slots=20",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=128MB",
                "-c",
                if self.tls { "ssl=on" } else { "ssl=off" },
            ])
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        let process = Guarded::spawn("postgres", &mut cmd, Some(self.root.path()))
            .map_err(|e| DevError::io("starting postgres", e))?;
        self.process = Some(process);
        self.wait_ready(Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), DevError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(conn) = sqlx::PgConnection::connect(&self.url()).await {
                let _ = conn.close().await;
                return Ok(());
            }
            let running = self.process.as_mut().is_some_and(Guarded::is_running);
            if !running || Instant::now() > deadline {
                return Err(DevError::Start {
                    what: "postgres",
                    detail: tail(&self.log_path(), 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Guarded::pid)
    }

    /// Fast shutdown (SIGINT), then immediate (SIGQUIT) if it takes long: a walsender waiting
    /// for its client to confirm the shutdown checkpoint can hold a fast shutdown for a minute.
    /// The data stays; an immediate shutdown only means crash recovery at the next start.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.signal(Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while p.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            p.stop_with(Signal::SIGQUIT, Duration::from_secs(15));
        }
    }

    /// Stops and starts the server again, on the same port with the same data.
    pub async fn restart(&mut self) -> Result<(), DevError> {
        self.stop();
        self.launch().await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
