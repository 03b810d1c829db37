//! Child processes the dev stack owns (postgres, the broker), each paired with a watchdog that kills
//! it and removes its directory if this process dies without cleaning up, even by SIGKILL.
//! On a normal stop the owner removes the directory itself.

use std::{
    io,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Waits on its stdin. `exited` means the owner stopped the child and cleans up itself; end of
/// input without it means the owner died: kill the child, remove its directory.
const WATCHDOG: &str = r#"IFS= read -r said; if [ "$said" != exited ]; then kill -9 "$0" 2>/dev/null; if [ -n "$1" ]; then sleep 0.2; rm -rf "$1"; fi; fi"#;

/// A running child and its watchdog.
#[derive(Debug)]
pub struct Guarded {
    name: &'static str,
    child: Child,
    /// Holds the watchdog's stdin: when this end closes (we stopped it, or this process died),
    /// the watchdog kills the child and removes its directory.
    watchdog: Option<Child>,
}

impl Guarded {
    /// Spawns `cmd`, and a watchdog that removes `cleanup_dir` once the child is gone.
    pub fn spawn(
        name: &'static str,
        cmd: &mut Command,
        cleanup_dir: Option<&Path>,
    ) -> io::Result<Self> {
        let child = cmd.stdin(Stdio::null()).spawn()?;
        let dir = cleanup_dir
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(child.id().to_string())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match watchdog {
            Ok(watchdog) => Ok(Self {
                name,
                child,
                watchdog: Some(watchdog),
            }),
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (SIGSTOP and SIGCONT simulate an outage).
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        let pid = i32::try_from(self.child.id()).map_err(|_| nix::Error::EINVAL)?;
        kill(Pid::from_raw(pid), signal)
    }

    /// Whether the child still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal`, waits up to `grace` for the child to exit, then kills it.
    pub fn stop_with(&mut self, signal: Signal, grace: Duration) {
        if self.is_running() {
            let _ = self.signal(signal);
            let deadline = Instant::now() + grace;
            while self.is_running() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if self.is_running() {
                tracing::warn!(process = self.name, "Did not stop in time; killing");
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        self.release_watchdog();
    }

    fn release_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            if let Some(mut stdin) = w.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(b"exited\n");
            }
            let _ = w.wait();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop_with(Signal::SIGTERM, Duration::from_secs(5));
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
