//! `registry`: the Confluent-compatible schema registry service.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use feedloop_core::{shutdown, telemetry};
use feedloop_registry::Config;

/// Confluent-compatible schema registry, stored in Postgres.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file (see services/registry/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry: {e:#}");
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
        let running = feedloop_registry::start(config, shutdown).await?;
        running.task.await??;
        anyhow::Ok(())
    })
}
