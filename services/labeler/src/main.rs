//! `labeler`: label windows over the event log into Parquet datasets.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

use feedloop_core::{shutdown, telemetry};
use feedloop_labeler::Config;

/// mimalloc: the services allocate per event and per change; glibc's malloc cost a quarter of
/// the collector's CPU under load and fragmented its memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Joins impressions with their outcomes and writes labeled, exactly-once datasets.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file (see services/labeler/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labeler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    telemetry::init_tracing(config.log.json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = shutdown::on_signal();
        let running = feedloop_labeler::start(config, shutdown).await?;
        running.task.await?;
        anyhow::Ok(())
    })
}
