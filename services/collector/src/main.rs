//! `collector`: the ingestion API for mobile clients.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use feedloop_collector::Config;
use feedloop_core::{shutdown, telemetry};

/// mimalloc: the request path allocates per event, and glibc's malloc spent a quarter of the
/// collector's CPU (and fragmented memory) under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ingestion API for mobile clients: validates event batches and makes them durable in Kafka.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file (see services/collector/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("collector: {e:#}");
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
        let running = feedloop_collector::start(config, shutdown).await?;
        running.task.await??;
        anyhow::Ok(())
    })
}
