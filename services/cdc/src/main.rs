//! `cdc`: Postgres logical replication into Kafka.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

use feedloop_cdc::Config;
use feedloop_core::{shutdown, telemetry};

/// mimalloc: the services allocate per event and per change; glibc's malloc cost a quarter of
/// the collector's CPU under load and fragmented its memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streams the product database's changes into Kafka as Debezium-compatible Avro events.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file (see services/cdc/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cdc: {e:#}");
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
        let running = feedloop_cdc::start(config, shutdown).await?;
        running.task.await?;
        anyhow::Ok(())
    })
}
