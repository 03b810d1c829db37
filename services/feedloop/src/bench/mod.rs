//! `feedloop bench`: feedloop measured side by side with its peers and limits, in one run, on
//! the same broker and database. Prints a table and writes JSON.

pub mod cdc;
pub mod codec;
pub mod collector;
pub mod eraser;
pub mod labeler;
pub mod load;

use std::{
    collections::BTreeMap,
    process::{Child, Command},
};

use feedloop_core::config::Secret;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
}

/// The key ring the services a benchmark starts share (one KEK, made once per run).
pub fn bench_kek() -> String {
    static KEK: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEK.get_or_init(|| feedloop_core::crypto::KeyRing::generate_entry("bench"))
        .clone()
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").map(|r| {
                r.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0);
    Machine {
        cores: std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1),
        cpu_model,
        memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    }
}

/// Repeated measurements of one quantity: median and spread.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let median = if samples.is_empty() {
            0.0
        } else if samples.len() % 2 == 1 {
            samples[samples.len() / 2]
        } else {
            (samples[samples.len() / 2 - 1] + samples[samples.len() / 2]) / 2.0
        };
        Self {
            median,
            min: samples.first().copied().unwrap_or(0.0),
            max: samples.last().copied().unwrap_or(0.0),
            samples,
        }
    }
}

/// One row: feedloop against a peer or limit, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub measurement: String,
    pub unit: String,
    pub feedloop: Stat,
    pub against: String,
    pub peer: Option<Stat>,
    /// feedloop / peer (for throughputs), peer / feedloop is not used: higher is better.
    pub ratio: Option<f64>,
    pub goal: String,
}

/// A throughput row measured against a fixed goal (`limit` per second) rather than a peer.
pub fn goal_row(measurement: &str, unit: &str, samples: Vec<f64>, limit: f64, goal: &str) -> Row {
    let feedloop = Stat::of(samples);
    Row {
        measurement: measurement.into(),
        unit: unit.into(),
        ratio: Some(feedloop.median / limit),
        feedloop,
        against: "goal".into(),
        peer: Some(Stat::of(vec![limit])),
        goal: goal.into(),
    }
}

/// A row with the peak resident memory of this process: the scenarios that run services
/// in-process (cdc, labeler, eraser) count the services and the harness together.
pub fn peak_rss_row(what: &str) -> Row {
    Row {
        measurement: format!("peak RSS of the bench process ({what}, in-process)"),
        unit: "MiB".into(),
        feedloop: Stat::of(vec![peak_rss_mib(std::process::id()).unwrap_or(0.0)]),
        against: "limit".into(),
        peer: None,
        ratio: None,
        goal: "diagnostic".into(),
    }
}

/// Peak resident memory of a process, from /proc (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
}

/// CPU seconds (user + system) that process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for its user-space ABI.
    Some(ticks / 100.0)
}

/// Prints rows as a table.
pub fn print_table(title: &str, machine: &Machine, rows: &[Row]) {
    println!("\n{title} — {} cores, {}", machine.cores, machine.cpu_model);
    println!(
        "{:<44} {:>22} {:>32} {:>8}  goal",
        "measurement", "feedloop (median, range)", "peer/limit (median)", "ratio"
    );
    for r in rows {
        let f = &r.feedloop;
        let feedloop = format!("{:.0} [{:.0}–{:.0}] {}", f.median, f.min, f.max, r.unit);
        let peer = r.peer.as_ref().map_or_else(
            || "—".to_owned(),
            |p| format!("{}: {:.0}", r.against, p.median),
        );
        let ratio = r
            .ratio
            .map_or_else(|| "—".to_owned(), |x| format!("{x:.2}×"));
        println!(
            "{:<44} {:>22} {:>32} {:>8}  {}",
            r.measurement, feedloop, peer, ratio, r.goal
        );
    }
}

/// A child process, in a process group of its own so that what it spawns (uvicorn's workers)
/// goes with it.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0).spawn().map(Proc)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}

/// Starts a registry on `postgres` for a bench run; returns its URL and the password of the
/// `feedloop` user.
pub async fn registry(
    postgres: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<(String, String)> {
    let password = uuid::Uuid::new_v4().simple().to_string();
    let running = feedloop_registry::start(
        feedloop_registry::Config {
            http: feedloop_registry::config::HttpConfig {
                listen: "127.0.0.1:0".into(),
                max_body_bytes: 1 << 20,
                request_timeout_ms: 30_000,
                tls: Default::default(),
            },
            postgres: feedloop_registry::config::PostgresConfig {
                url: Secret::new(postgres),
                max_connections: 4,
            },
            auth: feedloop_registry::config::AuthConfig {
                users: BTreeMap::from([("feedloop".to_owned(), Secret::new(password.clone()))]),
            },
            log: feedloop_registry::config::LogConfig { json: true },
        },
        shutdown.clone(),
    )
    .await?;
    Ok((format!("http://{}", running.addr), password))
}

/// Quantiles (in ms) of a summary the process-wide recorder rendered.
pub fn summary_ms(metric: &str, quantile: &str) -> Option<f64> {
    let text = feedloop_core::telemetry::render_metrics();
    let prefix = format!("{metric}{{quantile=\"{quantile}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| s * 1000.0)
}

/// Makes sure the Python venv at `venv` exists and `check` (Python code) runs in it; installs
/// `packages` (pip arguments) from PyPI when it does not.
pub fn ensure_venv(venv: &std::path::Path, check: &str, packages: &[&str]) -> anyhow::Result<()> {
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", check])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready() {
        return Ok(());
    }
    // Benchmarks (and their smoke tests) may run side by side: one installs at a time, the
    // others wait for it and then find what they need.
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let lock = std::fs::File::create(venv.with_extension("lock"))?;
    lock.lock()?;
    if ready() {
        return Ok(());
    }
    println!("Installing {packages:?} into {}…", venv.display());
    let ok = (python.is_file()
        || Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(venv)
            .status()?
            .success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages)
            .status()?
            .success();
    if !ok {
        anyhow::bail!("could not install {packages:?} into {}", venv.display());
    }
    Ok(())
}
