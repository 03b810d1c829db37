//! `feedloop demo`: the whole loop on one machine. A throwaway Postgres, tansu's broker in this
//! process (or `--kafka` / `--postgres`), every service, and simulated phones and backend
//! driving them; then a summary whose counters must reconcile.

pub mod load;
pub mod report;
pub mod sim;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use sqlx::PgPool;

use crate::{
    dev::{BrokerChoice, Stack, StackOptions},
    erase::Eraser,
};
use feedloop_core::catalogue::{DEADLETTER_TOPIC, EVENTS_TOPIC};
use load::{Answers, Phones, drive, insert_users};
use report::{Erasure, Summary, Trigger};
use sim::{SimOptions, World};

/// The example spec's dataset, which the demo fills.
pub const DATASET: &str = "match_outcomes";

/// What `feedloop demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub users: usize,
    pub events: usize,
    pub seed: u64,
    /// Datasets, the summary and the services' log go here.
    pub out: PathBuf,
    /// A Kafka cluster instead of the embedded broker.
    pub kafka: Option<String>,
    /// A Postgres server (wal_level=logical) instead of a throwaway cluster.
    pub postgres: Option<String>,
    /// Longest wait for a stage to catch up before the demo reports it as stuck.
    pub stage_timeout: Duration,
    /// Live bars on the terminal.
    pub progress: bool,
}

struct Bars {
    events: ProgressBar,
    labels: ProgressBar,
    stage: ProgressBar,
}

impl Bars {
    fn new(enabled: bool, events: u64) -> (MultiProgress, Self) {
        let multi = MultiProgress::with_draw_target(if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let style = |template: &str| {
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
        };
        let events_bar = multi.add(ProgressBar::new(events));
        events_bar.set_style(style(
            "events  [{bar:30}] {pos:>7}/{len:7} {per_sec:>10} {msg}",
        ));
        let labels = multi.add(ProgressBar::new(0));
        labels.set_style(style("labels  [{bar:30}] {pos:>7}/{len:7} {msg}"));
        let stage = multi.add(ProgressBar::new_spinner());
        stage.set_style(style("{spinner} {msg}"));
        stage.enable_steady_tick(Duration::from_millis(200));
        (
            multi,
            Self {
                events: events_bar,
                labels,
                stage,
            },
        )
    }
}

/// Marks a directory as the demo's output, which a later run may replace.
const OUT_MARKER: &str = ".feedloop-demo";

/// What the demo writes into `--out`, and removes again before a new run there.
const OUT_ENTRIES: [&str; 3] = ["datasets", "summary.json", "demo.log"];

/// Makes `out` ready for a run: created if missing; a previous demo run's output in it (the
/// README's command run twice) is replaced; any other non-empty directory is refused, so that
/// the demo never deletes what it did not write. Returns whether a previous run was replaced.
pub fn prepare_out(out: &std::path::Path) -> anyhow::Result<bool> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let marker = out.join(OUT_MARKER);
    let empty = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .next()
        .is_none();
    let replaced = if empty {
        false
    } else if marker.is_file() {
        for entry in OUT_ENTRIES {
            let path = out.join(entry);
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        true
    } else {
        bail!(
            "{} is not empty and holds no earlier demo run: give the demo a new or empty --out",
            out.display()
        );
    };
    std::fs::write(
        &marker,
        "the output of `feedloop demo`; a new run replaces it\n",
    )
    .with_context(|| format!("writing {}", marker.display()))?;
    Ok(replaced)
}

/// Runs the demo end to end and returns its summary (with any reconciliation problem in it).
/// `opts.out` must have been prepared ([`prepare_out`]).
pub async fn run(opts: &DemoOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let datasets_root = opts.out.join("datasets");
    std::fs::create_dir_all(&datasets_root)?;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let world = sim::generate(SimOptions {
        users: opts.users,
        events: opts.events,
        seed: opts.seed,
        t0,
    });
    let (_multi, bars) = Bars::new(opts.progress, world.events_sent() as u64);
    bars.stage
        .set_message("starting Postgres, the broker and the services…");
    let stack = Stack::up(StackOptions {
        postgres_url: opts.postgres.clone(),
        broker: match &opts.kafka {
            Some(b) => BrokerChoice::External(b.clone()),
            None => BrokerChoice::Embedded,
        },
        datasets_root: Some(datasets_root.clone()),
        trigger_policy: Some(feedloop_trigger::policy::Policy {
            min_new_rows: (opts.events as i64 / 20).max(500),
            max_staleness_s: 0,
            psi_threshold: 0.2,
            psi_min_rows: 500,
            cooldown_s: 5,
        }),
    })
    .await
    .context("starting the stack")?;
    let control = PgPool::connect(&stack.postgres.url())
        .await
        .context("connecting to the control database")?;
    let product = PgPool::connect(&stack.product_url)
        .await
        .context("connecting to the product database")?;

    let mut summary = Summary {
        seed: opts.seed,
        users: world.users.len(),
        dataset_path: datasets_root.join(DATASET).display().to_string(),
        ..Summary::default()
    };

    bars.stage.set_message("phones and backend at work…");
    let mut rows_changed = insert_users(&product, &world).await?;
    let answers = Arc::new(Answers::default());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let phones = Arc::new(Phones {
        http: http.clone(),
        url: stack.collector_url.clone(),
        write_key: stack.write_key().to_owned(),
        answers: answers.clone(),
        bar: bars.events.clone(),
    });
    rows_changed += drive(&world, &phones, &product, Duration::ZERO).await?;
    summary.events_sent = world.events_sent() as u64;
    summary.malformed_sent = world.malformed_sent() as u64;

    // Every example of the run is in the dataset once the labeler has caught up, but those of
    // the users who deleted their account (cdc turned that into an erasure).
    let deleted: BTreeSet<String> = world.deleted.iter().cloned().collect();
    let all = world.expected_examples(&deleted);
    bars.labels.set_length(all.len() as u64);
    bars.stage
        .set_message("waiting for the labeler to label every impression…");
    if let Err(e) =
        wait_for_rows(&control, all.len() as i64, &bars.labels, opts.stage_timeout).await
    {
        summary
            .problems
            .push(format!("the labeler did not catch up: {e:#}"));
    }

    bars.stage.set_message("erasing users…");
    let eraser = Eraser {
        url: stack.eraser_url.clone(),
        token: stack.admin_token().to_owned(),
    };
    summary.erasures = erase(&eraser, &world, opts).await?;
    let erased: BTreeSet<String> = world.erase.iter().chain(&world.deleted).cloned().collect();
    // The erased users' phones keep sending for a while: the collector must suppress it all.
    for batch in &world.after_erasure {
        phones.send(batch).await;
    }
    summary.events_sent += world
        .after_erasure
        .iter()
        .map(|b| b.events.len() as u64)
        .sum::<u64>();

    let expected = world.expected_labels(&erased);
    bars.labels.set_length(expected.len() as u64);
    bars.stage
        .set_message("waiting for the erased users' rows to leave the dataset…");
    if let Err(e) = wait_for_rows(
        &control,
        expected.len() as i64,
        &bars.labels,
        opts.stage_timeout,
    )
    .await
    {
        summary.problems.push(format!(
            "the dataset did not reach its size after erasure: {e:#}"
        ));
    }

    bars.stage.set_message("waiting for cdc and the triggers…");
    summary.rows_changed = rows_changed;
    summary.triggers = wait_for_triggers(&http, &stack, opts.stage_timeout).await?;
    wait_for_metric(
        "feedloop_cdc_changes_total",
        rows_changed as f64,
        opts.stage_timeout,
    )
    .await;

    bars.stage.set_message("reconciling…");
    let metrics = feedloop_core::telemetry::render_metrics();
    summary.answers = report::Counts {
        accepted: answers.accepted.load(Relaxed),
        duplicates: answers.duplicates.load(Relaxed),
        suppressed: answers.suppressed.load(Relaxed),
        rejected: answers.rejected.load(Relaxed),
        unanswered: answers.unanswered.load(Relaxed),
    };
    summary.retried_requests = answers.retried.load(Relaxed);
    summary.rejections = answers
        .rejections
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    summary.collector = report::Counts {
        accepted: report::metric_sum(&metrics, "feedloop_collector_events_accepted_total") as u64,
        duplicates: report::metric_sum(&metrics, "feedloop_collector_events_duplicate_total")
            as u64,
        suppressed: report::metric_sum(&metrics, "feedloop_collector_events_suppressed_total")
            as u64,
        rejected: report::metric_sum(&metrics, "feedloop_collector_events_rejected_total") as u64,
        unanswered: 0,
    };
    summary.cdc_changes = report::metric_sum(&metrics, "feedloop_cdc_changes_total") as u64;
    summary.cdc_tombstones = report::metric_sum(&metrics, "feedloop_cdc_tombstones_total") as u64;
    let kafka = stack.kafka_config();
    let events = report::record_ids(&kafka, EVENTS_TOPIC, t0, &["event_id"]).await?;
    summary.events_in_log = (events.records, events.ids.len() as u64);
    let dead_letters = report::record_ids(&kafka, DEADLETTER_TOPIC, t0, &["event_id"]).await?;
    summary.dead_letters_in_log = (dead_letters.records, dead_letters.ids.len() as u64);
    summary.dataset = report::read_dataset(&control, &stack.datasets_root, DATASET).await?;
    summary.expected_examples = expected.len() as u64;
    summary.labeler = report::LabelerCounts {
        records: report::metric_sum(&metrics, "feedloop_labeler_records_total") as u64,
        examples: report::metric_sum(&metrics, "feedloop_labeler_examples_total") as u64,
        late_impressions: report::metric_sum(&metrics, "feedloop_labeler_late_impressions_total")
            as u64,
        late_outcomes: report::metric_sum(&metrics, "feedloop_labeler_late_outcomes_total") as u64,
        dead_letters: report::metric_sum(&metrics, "feedloop_labeler_dead_letters_total") as u64,
    };
    let problems = report::reconcile(&summary, &expected, &erased);
    summary.problems.extend(problems);
    summary.seconds = started.elapsed().as_secs_f64();
    bars.stage.finish_and_clear();
    bars.events.finish();
    bars.labels.finish();
    stack.down().await;
    Ok(summary)
}

/// Examples in the current versions of the demo dataset's partitions.
pub async fn dataset_rows(control: &PgPool) -> anyhow::Result<i64> {
    // Examples, not rows: corrections add rows.
    let rows: Option<i64> = sqlx::query_scalar(
        "SELECT SUM(examples)::bigint FROM (
            SELECT DISTINCT ON (partition)
                   COALESCE((manifest::jsonb ->> 'examples')::bigint, row_count) AS examples
            FROM labeler.partitions
            WHERE dataset = $1 ORDER BY partition, version DESC) v",
    )
    .bind(DATASET)
    .fetch_one(control)
    .await
    .unwrap_or(None);
    Ok(rows.unwrap_or(0))
}

/// Waits until the dataset holds `want` rows (and stays there across two looks).
async fn wait_for_rows(
    control: &PgPool,
    want: i64,
    bar: &ProgressBar,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = -1;
    loop {
        let rows = dataset_rows(control).await?;
        bar.set_position(rows.max(0) as u64);
        if rows == want && last == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the dataset has {rows} rows after {timeout:?}; expected {want}");
        }
        last = rows;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (at most `timeout`) until a counter's sum reaches `want`.
async fn wait_for_metric(name: &str, want: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while report::metric_sum(&feedloop_core::telemetry::render_metrics(), name) < want
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The users who asked to be forgotten, in one erasure request through the eraser's API (as a
/// privacy team batches its tickets: each request scans the log once); then waits for every
/// request the eraser has (those cdc made of account deletions too) to finish, and fetches
/// certificates.
async fn erase(eraser: &Eraser, world: &World, opts: &DemoOptions) -> anyhow::Result<Vec<Erasure>> {
    if !world.erase.is_empty() {
        let key = format!("demo-{}", opts.seed);
        eraser
            .request(
                &world.erase,
                "the users asked to be forgotten (demo)",
                "feedloop-demo",
                Some(&key),
            )
            .await?;
    }
    let want = usize::from(!world.erase.is_empty()) + world.deleted.len();
    let deadline = Instant::now() + opts.stage_timeout;
    let requests = loop {
        let list = eraser.list().await?;
        let finished = list
            .iter()
            .filter(|r| matches!(r["status"].as_str(), Some("completed" | "partially_failed")))
            .count();
        if (list.len() >= want && finished == list.len()) || Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut out = Vec::new();
    for r in requests {
        let id = r["id"].as_str().unwrap_or_default().to_owned();
        let certificate = eraser.certificate(&id).await.ok();
        out.push(Erasure {
            request_id: id,
            origin: r["origin"].as_str().unwrap_or_default().to_owned(),
            status: r["status"].as_str().unwrap_or_default().to_owned(),
            certificate_id: certificate
                .as_ref()
                .and_then(|c| c["certificate_id"].as_str())
                .map(str::to_owned),
        });
    }
    if out.len() < want {
        bail!(
            "the eraser has {} requests; {want} were expected (one through the API for {} users, {} account deletions)",
            out.len(),
            world.erase.len(),
            world.deleted.len()
        );
    }
    Ok(out)
}

/// Waits until the trigger has decided at least once; returns its decisions.
async fn wait_for_triggers(
    http: &reqwest::Client,
    stack: &Stack,
    timeout: Duration,
) -> anyhow::Result<Vec<Trigger>> {
    let deadline = Instant::now() + timeout;
    loop {
        let body: Value = http
            .get(format!("{}/v1/triggers?limit=100", stack.trigger_url))
            .bearer_auth(stack.admin_token())
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let list: Vec<Trigger> = body["triggers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| Trigger {
                dataset: t["dataset"].as_str().unwrap_or_default().to_owned(),
                rule: t["rule"].as_str().unwrap_or_default().to_owned(),
                reason: t["reason"].as_str().unwrap_or_default().to_owned(),
                deliveries: t["deliveries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        format!(
                            "{}: {}",
                            d["sink"].as_str().unwrap_or("?"),
                            d["status"].as_str().unwrap_or("?")
                        )
                    })
                    .collect(),
            })
            .collect();
        let delivered = !list.is_empty()
            && list
                .iter()
                .all(|t| t.deliveries.iter().all(|d| d.ends_with("delivered")));
        if delivered || Instant::now() > deadline {
            return Ok(list);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_is_created_replaced_after_a_demo_and_refused_otherwise() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let out = tmp.path().join("feedloop-demo");
        assert!(!prepare_out(&out).expect("a new directory"));
        std::fs::create_dir_all(out.join("datasets/match_outcomes")).expect("mkdir");
        std::fs::write(out.join("summary.json"), "{}").expect("write");
        assert!(prepare_out(&out).expect("an earlier run"), "replaced");
        assert!(!out.join("datasets").exists() && !out.join("summary.json").exists());

        let foreign = tmp.path().join("mine");
        std::fs::create_dir_all(&foreign).expect("mkdir");
        std::fs::write(foreign.join("notes.txt"), "keep me").expect("write");
        let refused = prepare_out(&foreign).expect_err("not the demo's");
        assert!(refused.to_string().contains("not empty"), "{refused}");
        assert_eq!(
            std::fs::read_to_string(foreign.join("notes.txt")).expect("kept"),
            "keep me"
        );
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).expect("mkdir");
        assert!(!prepare_out(&empty).expect("an empty directory"));
    }
}
