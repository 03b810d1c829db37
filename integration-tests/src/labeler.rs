//! Labeler fixtures: a generated scenario of matches with their outcomes (as events and as
//! product-database rows), the labels it must produce computed here independently of the
//! labeler's code, and a pyarrow reader of the dataset it wrote.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::Duration,
};

use feedloop_core::{
    avro::CompiledSchema,
    catalogue::Catalogue,
    config::Secret,
    kafka::create_missing,
    model::{
        ChatEnded, ChatEndedBy, Decision, Envelope, FeatureValue, MatchDecision, MatchImpression,
        Platform, ReportReason, ReportSubmitted, ScreenViewed, UserBlocked,
    },
    registry_client::RegistryClient,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{TestRegistry, fresh_database, infra, kafka, python};

/// 2026-11-20T00:00:00Z: the scenario's event times start here.
pub const T0: i64 = 1_795_132_800_000;
const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

/// What the example spec must label an impression with.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub accepted: Option<bool>,
    pub chat_seconds: Option<f64>,
    pub reported: bool,
    pub blocked: bool,
    pub label: &'static str,
}

#[derive(Debug, Clone)]
pub struct Imp {
    pub event_id: Uuid,
    pub match_id: Uuid,
    pub viewer: String,
    pub candidate: String,
    pub time: i64,
}

/// One event to publish, in publish order.
#[derive(Debug, Clone)]
pub enum Ev {
    Impression(Imp),
    Decision {
        id: Uuid,
        match_id: Uuid,
        user: String,
        time: i64,
        accept: bool,
    },
    Chat {
        id: Uuid,
        match_id: Uuid,
        user: String,
        time: i64,
        ms: i64,
    },
    Report {
        id: Uuid,
        match_id: Uuid,
        user: String,
        other: String,
        time: i64,
    },
    Block {
        id: Uuid,
        match_id: Uuid,
        user: String,
        other: String,
        time: i64,
    },
    Clock {
        id: Uuid,
        time: i64,
    },
}

impl Ev {
    pub fn time(&self) -> i64 {
        match self {
            Ev::Impression(i) => i.time,
            Ev::Decision { time, .. }
            | Ev::Chat { time, .. }
            | Ev::Report { time, .. }
            | Ev::Block { time, .. }
            | Ev::Clock { time, .. } => *time,
        }
    }
}

/// A product-database row (app.reports or app.blocks).
#[derive(Debug, Clone)]
pub struct DbRow {
    pub table: &'static str,
    pub actor: String,
    pub other: String,
    pub match_id: Uuid,
    pub time: i64,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub events: Vec<Ev>,
    pub rows: Vec<DbRow>,
    pub impressions: Vec<Imp>,
}

/// Generates `matches` matches between users of a pool, with decisions (some after the
/// window, some duplicated, some twice), chats, reports and blocks (as events and as rows),
/// published in event-time order with up to 20 s of disorder: outcomes overtake impressions.
pub fn scenario(seed: u64, matches: usize) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed);
    let users: Vec<String> = (0..(matches / 2).max(4))
        .map(|i| format!("user-{i:04}"))
        .collect();
    let mut events = Vec::new();
    let mut rows = Vec::new();
    let mut impressions = Vec::new();
    for _ in 0..matches {
        let match_id = Uuid::new_v4();
        let pair: Vec<&String> = users.choose_multiple(&mut rng, 2).collect();
        let (a, b) = (pair[0].clone(), pair[1].clone());
        let t = T0 + rng.random_range(0..6 * HOUR);
        for (viewer, candidate) in [(&a, &b), (&b, &a)] {
            if rng.random_bool(0.1) {
                continue;
            }
            let imp = Imp {
                event_id: Uuid::new_v4(),
                match_id,
                viewer: viewer.clone(),
                candidate: candidate.clone(),
                time: t + rng.random_range(0..5_000),
            };
            events.push(Ev::Impression(imp.clone()));
            impressions.push(imp.clone());
            let decisions = if rng.random_bool(0.1) {
                2
            } else {
                usize::from(rng.random_bool(0.8))
            };
            for _ in 0..decisions {
                // Mostly inside the 10-minute window, some after, some right at its edge.
                let dt = match rng.random_range(0..10) {
                    0 => 10 * MIN,
                    1 => 10 * MIN - 1,
                    2..=3 => rng.random_range(10 * MIN..20 * MIN),
                    _ => rng.random_range(0..10 * MIN),
                };
                let ev = Ev::Decision {
                    id: Uuid::new_v4(),
                    match_id,
                    user: viewer.clone(),
                    time: imp.time + dt,
                    accept: rng.random_bool(0.6),
                };
                if rng.random_bool(0.05) {
                    events.push(ev.clone()); // a client retry: the same event twice
                }
                events.push(ev);
            }
        }
        if rng.random_bool(0.6) {
            let dt = if rng.random_bool(0.1) {
                rng.random_range(2 * HOUR..3 * HOUR)
            } else {
                rng.random_range(MIN..2 * HOUR)
            };
            events.push(Ev::Chat {
                id: Uuid::new_v4(),
                match_id,
                user: if rng.random_bool(0.5) {
                    a.clone()
                } else {
                    b.clone()
                },
                time: t + dt,
                ms: rng.random_range(3_000..300_000),
            });
        }
        for kind in 0..4 {
            if !rng.random_bool(0.06) {
                continue;
            }
            let (actor, other) = if rng.random_bool(0.5) {
                (a.clone(), b.clone())
            } else {
                (b.clone(), a.clone())
            };
            let time = t + rng.random_range(0..30 * HOUR);
            match kind {
                0 => events.push(Ev::Report {
                    id: Uuid::new_v4(),
                    match_id,
                    user: actor,
                    other,
                    time,
                }),
                1 => events.push(Ev::Block {
                    id: Uuid::new_v4(),
                    match_id,
                    user: actor,
                    other,
                    time,
                }),
                2 => rows.push(DbRow {
                    table: "app.reports",
                    actor,
                    other,
                    match_id,
                    time,
                }),
                _ => rows.push(DbRow {
                    table: "app.blocks",
                    actor,
                    other,
                    match_id,
                    time,
                }),
            }
        }
    }
    // Publish order: event time plus up to 20 s of jitter (under the spec's 30 s lateness).
    let mut keyed: Vec<(i64, usize, Ev)> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| (e.time() + rng.random_range(0..20_000), i, e))
        .collect();
    keyed.sort_by_key(|(k, i, _)| (*k, *i));
    let mut events: Vec<Ev> = keyed.into_iter().map(|(_, _, e)| e).collect();
    // Moves every window past its close once read.
    events.push(Ev::Clock {
        id: Uuid::new_v4(),
        time: T0 + 4 * 24 * HOUR,
    });
    rows.sort_by_key(|r| r.time);
    Scenario {
        events,
        rows,
        impressions,
    }
}

impl Scenario {
    /// The example spec's labels, computed directly from the scenario.
    pub fn expected(&self) -> BTreeMap<Uuid, Expected> {
        // (match, viewer) → (time, id, accepted)
        type Decisions<'a> = HashMap<(Uuid, &'a str), Vec<(i64, Uuid, bool)>>;
        let mut decisions: Decisions<'_> = HashMap::new();
        let mut chats: HashMap<Uuid, Vec<(i64, i64)>> = HashMap::new();
        let mut reports: Vec<(&str, &str, i64)> = Vec::new();
        let mut blocks: Vec<(&str, &str, i64)> = Vec::new();
        for e in &self.events {
            match e {
                Ev::Decision {
                    id,
                    match_id,
                    user,
                    time,
                    accept,
                } => {
                    decisions
                        .entry((*match_id, user.as_str()))
                        .or_default()
                        .push((*time, *id, *accept));
                }
                Ev::Chat {
                    match_id, time, ms, ..
                } => chats.entry(*match_id).or_default().push((*time, *ms)),
                Ev::Report {
                    user, other, time, ..
                } => reports.push((user, other, *time)),
                Ev::Block {
                    user, other, time, ..
                } => blocks.push((user, other, *time)),
                _ => {}
            }
        }
        for r in &self.rows {
            let list = if r.table == "app.reports" {
                &mut reports
            } else {
                &mut blocks
            };
            list.push((&r.actor, &r.other, r.time));
        }
        let between = |list: &[(&str, &str, i64)], i: &Imp| {
            list.iter().any(|(x, y, t)| {
                ((*x == i.viewer && *y == i.candidate) || (*x == i.candidate && *y == i.viewer))
                    && *t >= i.time
                    && *t < i.time + 24 * HOUR
            })
        };
        self.impressions
            .iter()
            .map(|i| {
                let mut mine: Vec<(i64, Uuid, bool)> = decisions
                    .get(&(i.match_id, i.viewer.as_str()))
                    .map(|d| {
                        d.iter()
                            .filter(|(t, _, _)| *t >= i.time && *t < i.time + 10 * MIN)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                mine.sort_by_key(|a| (a.0, a.1.to_string()));
                let accepted = mine.first().map(|d| d.2);
                let chat_seconds = chats
                    .get(&i.match_id)
                    .into_iter()
                    .flatten()
                    .filter(|(t, _)| *t >= i.time && *t < i.time + 2 * HOUR)
                    .map(|(_, ms)| *ms as f64 * 0.001)
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
                let reported = between(&reports, i);
                let blocked = between(&blocks, i);
                let label = if reported || blocked || accepted == Some(false) {
                    "negative"
                } else if accepted == Some(true) && chat_seconds.is_some_and(|c| c >= 30.0) {
                    "positive"
                } else if accepted == Some(true) && chat_seconds.is_some() {
                    "negative"
                } else {
                    "unknown"
                };
                (
                    i.event_id,
                    Expected {
                        accepted,
                        chat_seconds,
                        reported,
                        blocked,
                        label,
                    },
                )
            })
            .collect()
    }
}

fn envelope(id: Uuid, event_type: &str, user: &str, time: i64) -> Envelope {
    Envelope {
        event_id: id,
        event_type: event_type.into(),
        user_id: user.into(),
        anonymous_id: None,
        // Written straight to Kafka, as no producer but the collector (which seals it) may:
        // no device id in the clear.
        device_id: None,
        session_id: None,
        timestamp: time,
        client_timestamp: time,
        sent_at: Some(time + 500),
        received_at: time + 700,
        app_id: "test-app".into(),
        platform: Platform::Android,
        app_version: "5.2.0".into(),
        os_version: None,
        clock_skew_flagged: false,
    }
}

/// Registers the catalogue's event schemas under `topic` and returns them by record name.
pub async fn event_schemas(
    client: &RegistryClient,
    topic: &str,
) -> HashMap<&'static str, std::sync::Arc<CompiledSchema>> {
    let catalogue = Catalogue::embedded().expect("catalogue");
    let mut out = HashMap::new();
    for record in [
        "io.feedloop.events.MatchImpression",
        "io.feedloop.events.MatchDecision",
        "io.feedloop.events.ChatEnded",
        "io.feedloop.events.ReportSubmitted",
        "io.feedloop.events.UserBlocked",
        "io.feedloop.events.ScreenViewed",
    ] {
        let schema = catalogue.composed(record).expect("composed");
        let compiled = client
            .register_compiled(&format!("{topic}-{record}"), &schema)
            .await
            .unwrap_or_else(|e| panic!("register {record}: {e}"));
        out.insert(record, compiled);
    }
    out
}

fn encode<T: Serialize>(
    schemas: &HashMap<&'static str, std::sync::Arc<CompiledSchema>>,
    record: &str,
    value: &T,
) -> Vec<u8> {
    let mut out = Vec::new();
    schemas[record]
        .encode(value, &mut out)
        .unwrap_or_else(|e| panic!("encode {record}: {e}"));
    out
}

/// The Avro bytes and key of each scenario event, in publish order. Events with a match are
/// keyed by it (as the collector does), the clock by a fixed key.
pub fn encoded(
    scenario: &Scenario,
    schemas: &HashMap<&'static str, std::sync::Arc<CompiledSchema>>,
) -> Vec<(String, Vec<u8>)> {
    scenario
        .events
        .iter()
        .map(|e| match e {
            Ev::Impression(i) => (
                i.match_id.to_string(),
                encode(
                    schemas,
                    "io.feedloop.events.MatchImpression",
                    &MatchImpression {
                        envelope: envelope(i.event_id, "match_impression", &i.viewer, i.time),
                        match_id: i.match_id,
                        candidate_id: i.candidate.clone(),
                        request_id: format!("req-{}", i.event_id.simple()),
                        model_version: "ranker-7".into(),
                        experiment_id: Some("exp-1".into()),
                        experiment_arm: Some(
                            if i.time % 2 == 0 {
                                "control"
                            } else {
                                "treatment"
                            }
                            .into(),
                        ),
                        rank: 2,
                        score: 0.5,
                        features: BTreeMap::from([
                            ("age_gap".to_owned(), Some(FeatureValue::Long(3))),
                            ("affinity".to_owned(), Some(FeatureValue::Double(0.25))),
                        ]),
                    },
                ),
            ),
            Ev::Decision {
                id,
                match_id,
                user,
                time,
                accept,
            } => (
                match_id.to_string(),
                encode(
                    schemas,
                    "io.feedloop.events.MatchDecision",
                    &MatchDecision {
                        envelope: envelope(*id, "match_decision", user, *time),
                        match_id: *match_id,
                        decision: if *accept {
                            Decision::Accept
                        } else {
                            Decision::Skip
                        },
                        decision_latency_ms: Some(900),
                    },
                ),
            ),
            Ev::Chat {
                id,
                match_id,
                user,
                time,
                ms,
            } => (
                match_id.to_string(),
                encode(
                    schemas,
                    "io.feedloop.events.ChatEnded",
                    &ChatEnded {
                        envelope: envelope(*id, "chat_ended", user, *time),
                        match_id: *match_id,
                        duration_ms: *ms,
                        ended_by: ChatEndedBy::Peer,
                    },
                ),
            ),
            Ev::Report {
                id,
                match_id,
                user,
                other,
                time,
            } => (
                match_id.to_string(),
                encode(
                    schemas,
                    "io.feedloop.events.ReportSubmitted",
                    &ReportSubmitted {
                        envelope: envelope(*id, "report_submitted", user, *time),
                        match_id: Some(*match_id),
                        reported_user_id: other.clone(),
                        reason: ReportReason::Spam,
                        comment: None,
                    },
                ),
            ),
            Ev::Block {
                id,
                match_id,
                user,
                other,
                time,
            } => (
                match_id.to_string(),
                encode(
                    schemas,
                    "io.feedloop.events.UserBlocked",
                    &UserBlocked {
                        envelope: envelope(*id, "user_blocked", user, *time),
                        match_id: Some(*match_id),
                        blocked_user_id: other.clone(),
                    },
                ),
            ),
            Ev::Clock { id, time } => (
                "clock".to_owned(),
                encode(
                    schemas,
                    "io.feedloop.events.ScreenViewed",
                    &ScreenViewed {
                        envelope: envelope(*id, "screen_viewed", "user-clock", *time),
                        name: Some("home".into()),
                        category: None,
                        properties: BTreeMap::new(),
                    },
                ),
            ),
        })
        .collect()
}

/// Creates `topic` (6 partitions) and publishes the scenario's events to it.
pub async fn publish_events(client: &RegistryClient, topic: &str, scenario: &Scenario) {
    publish_events_to(&kafka(), client, topic, scenario).await;
}

/// [`publish_events`] to the brokers of `kafka`.
pub async fn publish_events_to(
    kafka: &feedloop_core::kafka::KafkaConfig,
    client: &RegistryClient,
    topic: &str,
    scenario: &Scenario,
) {
    create_missing(kafka, &[(topic, 6, false)])
        .await
        .expect("create events topic");
    let schemas = event_schemas(client, topic).await;
    // Batched as the services batch (linger, lz4): a consumer restarted at a committed offset
    // lands inside a record batch, which the embedded broker answers by skipping the rest of
    // the batch; the labeler must notice and read again from further back.
    let producer: FutureProducer = kafka
        .client_config("labeler-test")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("batch.size", "1000000")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for (key, value) in encoded(scenario, &schemas) {
        let f = producer
            .send_result(FutureRecord::to(topic).key(&key).payload(&value))
            .unwrap_or_else(|(e, _)| panic!("enqueue: {e}"));
        pending.push(f);
    }
    for f in pending {
        f.await
            .expect("delivered")
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
}

/// Inserts the scenario's product rows, oldest first, one transaction each.
pub async fn insert_rows(pool: &PgPool, scenario: &Scenario) {
    for r in &scenario.rows {
        let (sql, a, b) = if r.table == "app.reports" {
            (
                "INSERT INTO app.reports (reporter_id, reported_id, match_id, reason, created_at) VALUES ($1, $2, $3::uuid, 'spam', to_timestamp($4::float8 / 1000))",
                &r.actor,
                &r.other,
            )
        } else {
            (
                "INSERT INTO app.blocks (blocker_id, blocked_id, match_id, created_at) VALUES ($1, $2, $3::uuid, to_timestamp($4::float8 / 1000))",
                &r.actor,
                &r.other,
            )
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(a)
            .bind(b)
            .bind(r.match_id.to_string())
            .bind(r.time)
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("insert {}: {e}", r.table));
    }
}

/// Writes the example spec under a new dataset name; returns the file path.
pub fn spec_file(dir: &Path, dataset: &str) -> String {
    let text = feedloop_labeler::spec::EXAMPLE_SPEC.replace(
        "name = \"match_outcomes\"",
        &format!("name = \"{dataset}\""),
    );
    let path = dir.join(format!("{dataset}.toml"));
    std::fs::write(&path, text).expect("write spec");
    path.display().to_string()
}

/// A labeler configuration for tests.
pub async fn config(
    registry: &TestRegistry,
    spec: &str,
    events_topic: &str,
    cdc_prefix: &str,
    root: &Path,
) -> feedloop_labeler::Config {
    let mut cfg = feedloop_labeler::Config::from_defaults().expect("defaults");
    cfg.specs.files = vec![spec.to_owned()];
    cfg.inputs.events_topic = events_topic.to_owned();
    cfg.inputs.cdc_prefix = cdc_prefix.to_owned();
    cfg.datasets.root = root.display().to_string();
    cfg.datasets.commit_interval_ms = 300;
    cfg.inputs.idle_timeout_ms = 1_000;
    cfg.kafka.bootstrap = infra().kafka_bootstrap;
    cfg.registry.url = registry.url.clone();
    cfg.registry.user = registry.user.clone();
    cfg.registry.password = Secret::new(registry.password.clone());
    cfg.control.url = Secret::new(fresh_database().await);
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.log.json = false;
    cfg.validate().unwrap_or_else(|e| panic!("config: {e}"));
    cfg
}

/// Committed rows of the dataset's current partition versions.
pub async fn committed_rows(control: &PgPool, dataset: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(row_count), 0)::bigint FROM (
           SELECT DISTINCT ON (partition) row_count FROM labeler.partitions
           WHERE dataset = $1 ORDER BY partition, version DESC) v",
    )
    .bind(dataset)
    .fetch_one(control)
    .await
    .unwrap_or(0)
}

/// Waits until the dataset holds `rows` committed rows.
pub async fn wait_rows(control: &PgPool, dataset: &str, rows: i64, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let n = committed_rows(control, dataset).await;
        if n >= rows {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dataset {dataset}: {n} of {rows} rows committed in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The dataset as pyarrow reads it (see `python/read_dataset.py`).
pub fn read_dataset(root: &Path, dataset: &str) -> Value {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/read_dataset.py");
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(root)
        .arg(dataset)
        .output()
        .expect("run read_dataset.py");
    assert!(
        out.status.success(),
        "read_dataset.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_dataset.py prints JSON")
}

/// Runs a labeler on `cfg` until `dataset` holds `rows` committed rows (within two minutes),
/// then stops it.
pub async fn label_until(
    cfg: &feedloop_labeler::Config,
    control: &PgPool,
    dataset: &str,
    rows: i64,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let running = feedloop_labeler::start(cfg.clone(), stop.clone())
        .await
        .expect("labeler");
    wait_rows(control, dataset, rows, Duration::from_secs(120)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}
