//! The command line: its arguments, and what each command does. `main.rs` only calls
//! [`main`]: the commands' code is compiled once, here, rather than again in the binary (which
//! would instantiate every async function it awaits, and everything those await, a second time:
//! most of a cold build's tail, docs/benchmarks.md#build).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::{
    dev::{Stack, StackOptions, stack::PID_FILE},
    schemas,
};
use feedloop_core::{
    avro::compat::CompatibilityLevel, catalogue::Catalogue, config::Secret,
    registry_client::RegistryClient, shutdown, telemetry,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "feedloop: user feedback in, labeled training data out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole loop on this machine: Postgres, an embedded broker, every service, and
    /// simulated phones and backend; then print a summary whose counters must reconcile.
    Demo {
        /// Simulated users.
        #[arg(long, default_value_t = 2_000)]
        users: usize,
        /// Approximate number of events the phones send.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// The same seed gives the same events, rows and labels.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Datasets, summary.json and the services' log (demo.log) go here.
        #[arg(long, default_value = "feedloop-demo")]
        out: PathBuf,
        /// A Kafka cluster's bootstrap servers instead of the embedded broker.
        #[arg(long)]
        kafka: Option<String>,
        /// A Postgres server (wal_level=logical) instead of a throwaway cluster.
        #[arg(long)]
        postgres: Option<String>,
        /// Longest wait for one stage to catch up, in seconds.
        #[arg(long, default_value_t = 180)]
        stage_timeout: u64,
        /// No live progress bars.
        #[arg(long)]
        quiet: bool,
    },
    /// Run the built-in Kafka-compatible broker (tansu) in this process until SIGTERM or
    /// Ctrl-C: what `dev up`, the benchmarks and the tests start; nothing to install.
    Broker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long, default_value_t = 9092)]
        port: u16,
        /// `host:port` clients are told to connect to once bootstrapped (default: the listen
        /// address).
        #[arg(long)]
        advertised: Option<String>,
        /// `memory` (lost when the broker stops) or `sqlite` (DIR/broker.db, survives kill -9).
        #[arg(long, default_value = "memory")]
        storage: crate::dev::Storage,
        /// Directory of the SQLite database.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// File of SASL SCRAM users (SCRAM-SHA-256 and -512), one `name:password` a line;
        /// given, every client must authenticate. Needs sqlite storage.
        #[arg(long)]
        users: Option<PathBuf>,
        /// Seconds between storage maintenance: with sqlite storage, when compacted topics are
        /// compacted (memory storage never compacts).
        #[arg(long, default_value_t = 600)]
        maintenance_interval_s: u64,
    },
    /// Run a local stack (Postgres, broker, services) for development.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Measure feedloop against its peers and limits, side by side.
    Bench {
        #[command(subcommand)]
        scenario: BenchScenario,
    },
    /// Work with the event catalogue in schemas/.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Erase users everywhere feedloop holds them, or show a request's status.
    #[command(args_conflicts_with_subcommands = true)]
    Erase {
        /// The eraser's base URL (`eraser_url` in the dev endpoints file).
        #[arg(long, env = "FEEDLOOP_ERASER_URL", global = true)]
        eraser: Option<String>,
        /// The admin token.
        #[arg(
            long,
            env = "FEEDLOOP_ADMIN_TOKEN",
            hide_env_values = true,
            global = true
        )]
        token: Option<String>,
        /// A user to erase (repeat for several).
        #[arg(long)]
        user: Vec<String>,
        #[arg(long, default_value = "erasure requested from the command line")]
        reason: String,
        #[arg(long, default_value = "feedloop-cli")]
        requested_by: String,
        /// Makes a repeated command a no-op.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the request completes or partially fails.
        #[arg(long)]
        wait: bool,
        #[command(subcommand)]
        command: Option<EraseCommand>,
    },
    /// List and inspect the datasets the labeler committed.
    Datasets {
        /// The labeler's control database.
        #[arg(
            long,
            env = "FEEDLOOP_CONTROL_URL",
            hide_env_values = true,
            global = true
        )]
        control: Option<String>,
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// Read `feedloop.deadletter`, each letter's original opened with its data key while that
    /// key lives (the user's until they are erased; the day's unattributed key for
    /// `erasure.unattributed_retention_days`).
    Deadletters {
        /// A running dev stack's directory: its endpoints.json gives every setting not given.
        #[arg(long, global = true)]
        dev: Option<PathBuf>,
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BOOTSTRAP", global = true)]
        kafka: Option<String>,
        /// The schema registry's URL.
        #[arg(long, env = "FEEDLOOP_REGISTRY_URL", global = true)]
        registry: Option<String>,
        #[arg(long, env = "FEEDLOOP_REGISTRY_USER", global = true)]
        registry_user: Option<String>,
        #[arg(
            long,
            env = "FEEDLOOP_REGISTRY_PASSWORD",
            hide_env_values = true,
            global = true
        )]
        registry_password: Option<String>,
        /// The control database holding the data keys (`keys.store = "postgres"`).
        #[arg(
            long,
            env = "FEEDLOOP_CONTROL_URL",
            hide_env_values = true,
            global = true
        )]
        control: Option<String>,
        /// The key ring (`keys.kek`).
        #[arg(
            long,
            env = "FEEDLOOP_KEYS__KEK",
            hide_env_values = true,
            global = true
        )]
        kek: Option<String>,
        #[command(subcommand)]
        command: DeadlettersCommand,
    },
    /// Key-encryption keys (the `[keys]` key ring that wraps every data key).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Rebuild a dataset from the log into a new root (nothing is published).
    Replay {
        /// The labeler's configuration file (specs, inputs, Kafka, registry, control database).
        #[arg(long)]
        config: PathBuf,
        /// The dataset (label spec name) to rebuild.
        #[arg(long)]
        dataset: String,
        /// Where to start reading; only `earliest` (the whole retained log).
        #[arg(long, default_value = "earliest")]
        from: String,
        /// The new dataset root (a path, file:// or s3:// URL).
        #[arg(long)]
        root: String,
        /// Bookkeeping database of the rebuild (default: a fresh database next to the
        /// labeler's control database).
        #[arg(long)]
        control: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DeadlettersCommand {
    /// Print dead letters as JSON lines, oldest first, each `original` opened: `clear` (with
    /// `text`, or `base64` when not UTF-8), `erased` (its key is destroyed), `invalid`, or
    /// `unsealed` (written before dead letters were sealed).
    Show {
        /// Only those of this service (collector, cdc, labeler, eraser, trigger).
        #[arg(long)]
        service: Option<String>,
        /// Only this dead letter.
        #[arg(long)]
        id: Option<String>,
        /// The most recent this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Print a new random KEK as a key-ring entry, `ID=BASE64KEY`, for `keys.kek` (or
    /// FEEDLOOP_KEYS__KEK, or a line of `keys.kek_file`). To rotate, put it first in the ring
    /// of every service and keep the old entry until the eraser has re-wrapped the keys.
    GenerateKek {
        /// The KEK's id, recorded with every key it wraps (e.g. the month: 2026-12).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum EraseCommand {
    /// A request's overall and per-target status.
    Status { id: String },
    /// Scan independently for a request's users: every topic's raw bytes, every dataset file
    /// under the current manifests (and the replaced ones, which must be gone), feedloop's
    /// tables and the key store. Prints a pass/fail table; exits 1 if anything is found.
    Verify {
        id: String,
        /// A running dev stack's directory: its endpoints.json gives every setting not given.
        #[arg(long)]
        dev: Option<PathBuf>,
        /// The control database (the eraser's, the labeler's manifests, the key store).
        #[arg(long, env = "FEEDLOOP_CONTROL_URL", hide_env_values = true)]
        control: Option<String>,
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BOOTSTRAP")]
        kafka: Option<String>,
        /// The dataset root (a path, file:// or s3:// URL).
        #[arg(long, env = "FEEDLOOP_DATASETS_ROOT")]
        datasets_root: Option<String>,
        /// The key ring (`keys.kek`), to open the values the request recorded.
        #[arg(long, env = "FEEDLOOP_KEYS__KEK", hide_env_values = true)]
        kek: Option<String>,
        /// A personal value to look for as well (repeat).
        #[arg(long)]
        value: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DatasetsCommand {
    /// Every dataset: partitions, rows, bytes, last commit.
    Ls {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The current version of each partition of a dataset.
    Show {
        dataset: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Start the stack, write DIR/endpoints.json, and run until SIGTERM or `dev down`.
    Up {
        /// Directory for the endpoints and pid files.
        #[arg(long)]
        dir: PathBuf,
        /// Use this Postgres instead of a throwaway cluster.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// Stop the stack started with `dev up --dir DIR`.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BenchScenario {
    /// The collector through HTTP to acked Kafka, against a bare producer and a FastAPI peer.
    Collector {
        /// Seconds per load step.
        #[arg(long, default_value_t = 5)]
        step_seconds: u64,
        /// Repetitions of each headline measurement.
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        /// Where to write the JSON report.
        #[arg(long, default_value = "bench-results/collector.json")]
        out: PathBuf,
        /// Skip the FastAPI peer.
        #[arg(long)]
        no_peer: bool,
    },
    /// The labeler from the log to committed Parquet, against a DuckDB batch query computing
    /// the same labels; Parquet write rows/s on one core.
    Labeler {
        /// Approximate number of events to label.
        #[arg(long, default_value_t = 400_000)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        /// Rows per Parquet-write repetition.
        #[arg(long, default_value_t = 1_000_000)]
        parquet_rows: usize,
        /// Join-state stores to measure (postgres, local).
        #[arg(long, value_delimiter = ',', default_value = "postgres,local")]
        stores: Vec<String>,
        #[arg(long, default_value = "bench-results/labeler.json")]
        out: PathBuf,
    },
    /// Erasing one user from ~10M dataset rows in hourly partitions, against DuckDB rewriting
    /// every file.
    Eraser {
        #[arg(long, default_value_t = 10_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 240)]
        hours: usize,
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        #[arg(long, default_value = "bench-results/eraser.json")]
        out: PathBuf,
    },
    /// The collector's hot path (parse, validate, Avro-encode) on one core, against
    /// serde_json parsing the same bytes; and with the device id sealed.
    Codec {
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        /// Seconds per repetition of each measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value = "bench-results/codec.json")]
        out: PathBuf,
    },
    /// cdc from committed WAL to acked Kafka, against pg_recvlogical; lag at fixed rates.
    Cdc {
        /// Changes per throughput repetition.
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        /// Change rates of the lag measurement.
        #[arg(long, value_delimiter = ',', default_value = "5000,20000")]
        rates: Vec<u64>,
        #[arg(long, default_value_t = 10)]
        lag_seconds: u64,
        #[arg(long, default_value = "bench-results/cdc.json")]
        out: PathBuf,
        /// Publish `app.reports.comment` in the clear instead of sealing it (to measure what
        /// crypto-shredding costs).
        #[arg(long)]
        without_pii: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Register every catalogue record with a schema registry.
    Register {
        /// Registry base URL.
        #[arg(long)]
        registry: String,
        /// HTTP Basic user.
        #[arg(long, env = "FEEDLOOP_REGISTRY_USER")]
        user: Option<String>,
        /// HTTP Basic password.
        #[arg(long, env = "FEEDLOOP_REGISTRY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// PEM file of the CA of an https:// registry that the system does not trust.
        #[arg(long, env = "FEEDLOOP_REGISTRY_CA", default_value = "")]
        ca: String,
    },
    /// Fail if any .avsc breaks compatibility with its previous committed version.
    Check {
        /// Repository root (default: the git repository holding the current directory).
        #[arg(long)]
        repo: Option<PathBuf>,
        /// Compatibility level to enforce.
        #[arg(long, default_value = "FULL")]
        compatibility: CompatibilityLevel,
    },
}

impl Command {
    /// Makes every path argument absolute against the working directory, so that relative
    /// paths work and the summary, logs and manifests name them absolutely.
    fn absolute_paths(&mut self) -> std::io::Result<()> {
        let abs = |p: &mut PathBuf| -> std::io::Result<()> {
            *p = std::path::absolute(&*p)?;
            Ok(())
        };
        match self {
            Self::Demo { out, .. } => abs(out),
            Self::Broker { dir, users, .. } => {
                abs(dir)?;
                users.as_mut().map_or(Ok(()), abs)
            }
            Self::Dev {
                command: DevCommand::Up { dir, .. } | DevCommand::Down { dir },
            } => abs(dir),
            Self::Bench { scenario } => match scenario {
                BenchScenario::Collector { out, .. }
                | BenchScenario::Labeler { out, .. }
                | BenchScenario::Eraser { out, .. }
                | BenchScenario::Codec { out, .. }
                | BenchScenario::Cdc { out, .. } => abs(out),
            },
            Self::Replay { config, .. } => abs(config),
            Self::Schemas {
                command:
                    SchemasCommand::Check {
                        repo: Some(repo), ..
                    },
            } => abs(repo),
            Self::Schemas { .. }
            | Self::Erase { .. }
            | Self::Datasets { .. }
            | Self::Keys { .. } => Ok(()),
            Self::Deadletters { dev, .. } => dev.as_mut().map_or(Ok(()), abs),
        }
    }
}

/// Parses the command line, runs the command, and says how it ended.
pub fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Err(e) = cli.command.absolute_paths() {
        eprintln!("feedloop: cannot resolve a path argument: {e}");
        return ExitCode::FAILURE;
    }
    if let Command::Demo { out, .. } = &cli.command {
        match crate::demo::prepare_out(out) {
            Ok(true) => eprintln!(
                "feedloop: replacing the previous demo run in {}",
                out.display()
            ),
            Ok(false) => {}
            Err(e) => {
                eprintln!("feedloop: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        // The terminal shows progress and the summary; the services log to a file.
        let log = std::fs::File::create(out.join("demo.log"));
        match log {
            // tansu's storage logs every metadata lookup at info.
            Ok(file) => telemetry::init_tracing_to_file(file, "info,tansu_storage=warn"),
            Err(e) => {
                eprintln!(
                    "feedloop: cannot write {}: {e}",
                    out.join("demo.log").display()
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        telemetry::init_tracing(false);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("feedloop: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("feedloop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo {
            users,
            events,
            seed,
            out,
            kafka,
            postgres,
            stage_timeout,
            quiet,
        } => {
            telemetry::prometheus();
            let opts = crate::demo::DemoOptions {
                users,
                events,
                seed,
                out: out.clone(),
                kafka,
                postgres,
                stage_timeout: Duration::from_secs(stage_timeout),
                progress: !quiet,
            };
            let summary = crate::demo::run(&opts).await?;
            std::fs::write(
                out.join("summary.json"),
                serde_json::to_vec_pretty(&summary)?,
            )?;
            print!(
                "{}",
                crate::demo::report::render(&summary, &out.display().to_string())
            );
            Ok(if summary.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Broker {
            host,
            port,
            advertised,
            storage,
            dir,
            users,
            maintenance_interval_s,
        } => {
            let users = match users {
                Some(path) => feedloop_broker::read_users(&path)?,
                None => Vec::new(),
            };
            let spec = feedloop_broker::BrokerSpec {
                listen: std::net::SocketAddr::new(host, port),
                advertised,
                storage,
                dir,
                users,
                maintenance_interval: std::time::Duration::from_secs(maintenance_interval_s.max(1)),
            };
            tracing::info!(
                listen = %spec.listen,
                storage = ?spec.storage,
                dir = %spec.dir.display(),
                authentication = !spec.users.is_empty(),
                "Broker starting"
            );
            feedloop_broker::serve(spec, shutdown::on_signal()).await?;
            tracing::info!("Broker stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev { command } => match command {
            DevCommand::Up { dir, postgres } => dev_up(dir, postgres).await,
            DevCommand::Down { dir } => dev_down(dir).await,
        },
        Command::Bench { scenario } => match scenario {
            BenchScenario::Cdc {
                rows,
                repetitions,
                rates,
                lag_seconds,
                out,
                without_pii,
            } => {
                telemetry::prometheus();
                crate::bench::cdc::run(crate::bench::cdc::Options {
                    rows,
                    repetitions,
                    rates,
                    lag_seconds,
                    out,
                    seal: !without_pii,
                })
                .await?;
                Ok(ExitCode::SUCCESS)
            }
            BenchScenario::Codec {
                repetitions,
                seconds,
                out,
            } => {
                crate::bench::codec::run(crate::bench::codec::Options {
                    repetitions,
                    seconds,
                    out,
                })?;
                Ok(ExitCode::SUCCESS)
            }
            BenchScenario::Eraser {
                rows,
                hours,
                repetitions,
                out,
            } => {
                crate::bench::eraser::run(crate::bench::eraser::Options {
                    rows,
                    hours,
                    repetitions,
                    out,
                })
                .await?;
                Ok(ExitCode::SUCCESS)
            }
            BenchScenario::Labeler {
                events,
                repetitions,
                parquet_rows,
                stores,
                out,
            } => {
                let stores = stores
                    .iter()
                    .map(|s| match s.as_str() {
                        "postgres" => Ok(feedloop_labeler::config::StoreKind::Postgres),
                        "local" | "memory" => Ok(feedloop_labeler::config::StoreKind::Local),
                        other => Err(anyhow::anyhow!(
                            "--stores: unknown store {other} (postgres, local)"
                        )),
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                crate::bench::labeler::run(crate::bench::labeler::Options {
                    events,
                    repetitions,
                    parquet_rows,
                    stores,
                    out,
                })
                .await?;
                Ok(ExitCode::SUCCESS)
            }
            BenchScenario::Collector {
                step_seconds,
                repetitions,
                out,
                no_peer,
            } => {
                crate::bench::collector::run(crate::bench::collector::Options {
                    step_seconds,
                    repetitions,
                    out,
                    no_peer,
                })
                .await?;
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Erase {
            eraser,
            token,
            user,
            reason,
            requested_by,
            idempotency_key,
            wait,
            command,
        } => {
            if let Some(EraseCommand::Verify {
                id,
                dev,
                control,
                kafka,
                datasets_root,
                kek,
                value,
            }) = command
            {
                let passed = crate::erase::verify(crate::erase::VerifyOptions {
                    id,
                    dev,
                    control,
                    kafka,
                    datasets_root,
                    kek,
                    values: value,
                })
                .await?;
                return Ok(if passed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            let client = crate::erase::Eraser {
                url: eraser
                    .context("--eraser (or FEEDLOOP_ERASER_URL) is required: `feedloop dev up` writes it as eraser_url")?
                    .trim_end_matches('/')
                    .to_owned(),
                token: token.context("--token (or FEEDLOOP_ADMIN_TOKEN) is required")?,
            };
            let id = match command {
                Some(EraseCommand::Verify { .. }) => bail!("handled above"),
                Some(EraseCommand::Status { id }) => id,
                None => {
                    if user.is_empty() {
                        bail!("give at least one --user, or `erase status ID`");
                    }
                    let id = client
                        .request(&user, &reason, &requested_by, idempotency_key.as_deref())
                        .await?;
                    println!("erasure request {id} accepted");
                    if !wait {
                        return Ok(ExitCode::SUCCESS);
                    }
                    loop {
                        let s = client.status(&id).await?;
                        if matches!(s["status"].as_str(), Some("completed" | "partially_failed")) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    id
                }
            };
            let status = client.status(&id).await?;
            print!("{}", crate::erase::describe(&status));
            Ok(if status["status"] == "partially_failed" {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Datasets { control, command } => {
            let url = control.context("--control (or FEEDLOOP_CONTROL_URL) is required: the labeler's control database; `feedloop dev up` writes it to endpoints.json as postgres_url")?;
            let pool = sqlx::PgPool::connect(&url)
                .await
                .context("connecting to the control database")?;
            match command {
                DatasetsCommand::Ls { json } => {
                    let all = crate::datasets::list(&pool).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                    } else {
                        println!(
                            "{:<28} {:>10} {:>12} {:>12}  LAST COMMIT",
                            "DATASET", "PARTITIONS", "ROWS", "BYTES"
                        );
                        for d in &all {
                            println!(
                                "{:<28} {:>10} {:>12} {:>12}  {}",
                                d.dataset, d.partitions, d.rows, d.bytes, d.last_commit
                            );
                        }
                    }
                }
                DatasetsCommand::Show { dataset, json } => {
                    let parts = crate::datasets::show(&pool, &dataset).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&parts)?);
                    } else {
                        println!(
                            "{:<26} {:>7} {:>10} {:>12} {:>5} {:>6}  MANIFEST",
                            "PARTITION", "VERSION", "ROWS", "BYTES", "FILES", "EPOCH"
                        );
                        for p in &parts {
                            println!(
                                "{:<26} {:>7} {:>10} {:>12} {:>5} {:>6}  {}",
                                p.partition,
                                p.version,
                                p.rows,
                                p.bytes,
                                p.files,
                                p.erasure_epoch,
                                p.manifest_uri
                            );
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            dataset,
            from,
            root,
            control,
        } => {
            if from != "earliest" {
                bail!("--from {from}: only `earliest` is supported (the whole retained log)");
            }
            let config = feedloop_labeler::Config::load(Some(&config))?;
            let summary = crate::datasets::replay(crate::datasets::ReplayOptions {
                config,
                dataset,
                root,
                control,
                progress: true,
            })
            .await?;
            println!(
                "replayed {}: {} records read, {} rows in {} partitions under {}",
                summary.dataset, summary.records, summary.rows, summary.partitions, summary.root
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Deadletters {
            dev,
            kafka,
            registry,
            registry_user,
            registry_password,
            control,
            kek,
            command: DeadlettersCommand::Show { service, id, limit },
        } => {
            let shown = crate::deadletters::show(
                crate::deadletters::Connection {
                    dev,
                    kafka,
                    registry,
                    registry_user,
                    registry_password,
                    control,
                    kek,
                },
                crate::deadletters::Filter { service, id, limit },
            )
            .await?;
            eprintln!("{shown} dead letter(s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::GenerateKek { id },
        } => {
            let entry = feedloop_core::crypto::KeyRing::generate_entry(&id);
            // Checked like the services will check it (the id's characters).
            feedloop_core::crypto::KeyRing::parse(&entry)?;
            println!("{entry}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Schemas { command } => match command {
            SchemasCommand::Register {
                registry,
                user,
                password,
                ca,
            } => register(&registry, user, password, &ca).await,
            SchemasCommand::Check {
                repo,
                compatibility,
            } => check(repo, compatibility),
        },
    }
}

async fn dev_up(dir: PathBuf, postgres: Option<String>) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown::on_signal();
    let stack = Stack::up(StackOptions {
        postgres_url: postgres,
        datasets_root: Some(dir.join("datasets")),
        ..StackOptions::default()
    })
    .await
    .context("starting the dev stack")?;
    let path = stack.write_endpoints(&dir)?;
    let endpoints = stack.endpoints();
    println!("feedloop dev stack is up");
    println!("  postgres  {}", endpoints.postgres_url);
    println!("  kafka     {}", endpoints.kafka_bootstrap);
    println!(
        "  registry  {} (user {})",
        endpoints.registry_url, endpoints.registry_user
    );
    println!("  datasets  {}", endpoints.datasets_root);
    println!("  endpoints {}", path.display());
    println!("Stop with: feedloop dev down --dir {}", dir.display());
    shutdown.cancelled().await;
    stack.down().await;
    let _ = std::fs::remove_file(dir.join(crate::dev::stack::ENDPOINTS_FILE));
    let _ = std::fs::remove_file(dir.join(PID_FILE));
    println!("feedloop dev stack stopped");
    Ok(ExitCode::SUCCESS)
}

async fn dev_down(dir: PathBuf) -> anyhow::Result<ExitCode> {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    let pid_path = dir.join(PID_FILE);
    let text = std::fs::read_to_string(&pid_path).with_context(|| {
        format!(
            "no stack is running from {} ({} missing)",
            dir.display(),
            pid_path.display()
        )
    })?;
    let pid = Pid::from_raw(text.trim().parse().context("malformed pid file")?);
    if kill(pid, Signal::SIGTERM).is_err() {
        let _ = std::fs::remove_file(&pid_path);
        bail!("the stack (pid {pid}) is not running; removed its stale pid file");
    }
    // Done when the stack removed its pid file on the way out (or is gone altogether).
    for _ in 0..600 {
        if !pid_path.exists() || kill(pid, None).is_err() {
            println!("feedloop dev stack stopped");
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the stack (pid {pid}) did not stop within 30 s")
}

async fn register(
    url: &str,
    user: Option<String>,
    password: Option<String>,
    ca: &str,
) -> anyhow::Result<ExitCode> {
    let auth = user.map(|u| (u, Secret::new(password.unwrap_or_default())));
    let client = RegistryClient::new(url, auth, ca, Duration::from_secs(30))?;
    let catalogue = Catalogue::embedded()?;
    for (subject, schema) in catalogue.subjects()? {
        let id = client
            .register(&subject, &schema)
            .await
            .with_context(|| format!("registering {subject}"))?;
        println!("{id:>6}  {subject}");
    }
    Ok(ExitCode::SUCCESS)
}

fn check(repo: Option<PathBuf>, level: CompatibilityLevel) -> anyhow::Result<ExitCode> {
    let repo = match repo {
        Some(r) => r,
        None => {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--show-toplevel"])
                .output()
                .context("running git")?;
            if !out.status.success() {
                bail!("not inside a git repository; pass --repo");
            }
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let outcomes = schemas::check(&repo, level)?;
    let mut broken = 0;
    for o in &outcomes {
        match (&o.previous, o.violations.is_empty()) {
            (None, _) => println!("new        {}", o.record),
            (Some(c), true) => println!("ok         {} (vs {c})", o.record),
            (Some(c), false) => {
                broken += 1;
                println!("BREAKING   {} (vs {c}, {level})", o.record);
                for v in &o.violations {
                    println!("           {v}");
                }
            }
        }
    }
    if broken > 0 {
        eprintln!(
            "feedloop: {broken} schema(s) break {level} compatibility with their previous committed version"
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "{} schemas checked under {level}: no breaking change",
        outcomes.len()
    );
    Ok(ExitCode::SUCCESS)
}
