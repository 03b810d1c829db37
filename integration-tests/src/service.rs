//! Service binaries run as child processes, for the tests that kill them.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

/// A service binary next to the test binary (`cargo test --workspace` builds them all).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name);
    assert!(
        bin.is_file(),
        "{} missing: run `cargo test --workspace` (or `cargo build --bins`)",
        bin.display()
    );
    bin
}

/// A running service binary, its output in a log file. Killed when dropped; when dropped by a
/// failing test, the end of its log goes to the test's output.
pub struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `name --config <config>`, logging to `<log_dir>/<name>.<n>.log`.
    pub fn spawn(name: &str, config: &Path, log_dir: &Path) -> Self {
        let mut n = 0;
        let log = loop {
            let path = log_dir.join(format!("{name}.{n}.log"));
            if !path.exists() {
                break path;
            }
            n += 1;
        };
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(binary(name))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| {
                    "info,feedloop_labeler::engine=debug,feedloop_trigger=debug".into()
                }),
            )
            .arg("--config")
            .arg(config)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        Self { child, log }
    }

    /// SIGKILL, without warning, and waits for the process to be gone.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the service's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.log.display(),
                self.log_tail(200)
            );
        }
    }
}
