//! The label spec's rules, one designed example each, with the label the README's spec gives
//! it written out by hand. The same table runs twice on a fresh stack (broker, registry, cdc,
//! product database, labeler):
//! - **fresh**: the examples' events are in the log before live traffic moves the partitions
//!   ("now" on every events partition and a row in each cdc table): nothing is late;
//! - **after live traffic**: live traffic first, then the examples, whose event times are a
//!   day or more in the past (phones that were offline): every impression is late.
//!
//! In both, outcomes marked `After` are sent once the first version of every example is
//! committed: they are late whatever their partition (events or cdc rows). The latest version
//! of every example must be the table's, versions must be consecutive, an offline phone's batch
//! must be in version 1, and `feedloop replay` of the log must give the same latest rows (the
//! examples a beyond-horizon outcome reaches excepted: a replay reads it in one pass, before
//! the example closes). The latest rows are also read with the README's DuckDB view and pandas
//! recipe.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use feedloop_integration_tests::{
    cdc::TestCdc,
    infra, kafka,
    labeler::{self, DbRow, Ev, Imp, Scenario},
    log::read_all,
    python,
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SEC: i64 = 1_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const EVENT_PARTITIONS: i32 = 3;

/// When an outcome reaches the log.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// With its impression (one client batch, or the product database on its own schedule).
    With,
    /// After the first version of every example was committed.
    After,
}

/// Who does something: the viewer of the case's first impression (`A`) or its candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    A,
    B,
}

/// One thing that happens in a case, at `dt` after the impression.
#[derive(Debug, Clone)]
enum Item {
    /// The impression of `Side` (A's is always there; B's when the case has both sides).
    Impression(Side),
    Decision(Side, i64, bool),
    /// A chat of the match that lasted `ms`, reported by a phone.
    Chat(i64, i64),
    /// `Side` reports the other, in the app.
    Report(Side, i64),
    Block(Side, i64),
    /// `Side` reports or blocks the other, as a product-database row (cdc).
    ReportRow(Side, i64),
    BlockRow(Side, i64),
}

#[derive(Debug, Clone, PartialEq)]
struct Want {
    accepted: Option<bool>,
    chat_seconds: Option<f64>,
    reported: bool,
    blocked: bool,
    label: &'static str,
}

fn want(
    accepted: Option<bool>,
    chat_seconds: Option<f64>,
    reported: bool,
    blocked: bool,
    label: &'static str,
) -> Want {
    Want {
        accepted,
        chat_seconds,
        reported,
        blocked,
        label,
    }
}

struct Case {
    name: &'static str,
    /// The impression's time, relative to "now".
    at: i64,
    items: Vec<(Phase, Item)>,
    /// The latest version of A's example, and of B's when B has an impression.
    a: Want,
    b: Option<Want>,
    /// The most versions A's example may have (1: everything in the first version).
    max_versions: i32,
    /// An outcome of the case arrives past the correction horizon.
    beyond_horizon: bool,
}

use Item::*;
use Phase::*;
use Side::*;

fn accept_and_chat(secs: i64) -> Vec<(Phase, Item)> {
    vec![
        (With, Impression(A)),
        (With, Decision(A, MIN, true)),
        (With, Chat(5 * MIN, secs * SEC)),
    ]
}

fn with(mut base: Vec<(Phase, Item)>, more: Vec<(Phase, Item)>) -> Vec<(Phase, Item)> {
    base.extend(more);
    base
}

/// The table: every rule of the README's label section.
fn cases() -> Vec<Case> {
    let case = |name, at, items, a, max_versions| Case {
        name,
        at,
        items,
        a,
        b: None,
        max_versions,
        beyond_horizon: false,
    };
    let positive = |chat: f64| want(Some(true), Some(chat), false, false, "positive");
    vec![
        case(
            "a decision at 9 min 59.999 s counts",
            -30 * HOUR,
            vec![
                (With, Impression(A)),
                (With, Decision(A, 10 * MIN - 1, true)),
                (With, Chat(15 * MIN, 60 * SEC)),
            ],
            positive(60.0),
            1,
        ),
        case(
            "a decision at exactly 10 min does not",
            -30 * HOUR,
            vec![
                (With, Impression(A)),
                (With, Decision(A, 10 * MIN, true)),
                (With, Chat(15 * MIN, 60 * SEC)),
            ],
            want(None, Some(60.0), false, false, "unknown"),
            1,
        ),
        case(
            "the first decision wins",
            -30 * HOUR,
            vec![
                (With, Impression(A)),
                (With, Decision(A, MIN, false)),
                (With, Decision(A, 2 * MIN, true)),
                (With, Chat(5 * MIN, 60 * SEC)),
            ],
            want(Some(false), Some(60.0), false, false, "negative"),
            1,
        ),
        case(
            "the longest of two chats",
            -30 * HOUR,
            with(accept_and_chat(20), vec![(With, Chat(20 * MIN, 45 * SEC))]),
            positive(45.0),
            1,
        ),
        case(
            "a chat of exactly 30 s is long enough",
            -30 * HOUR,
            accept_and_chat(30),
            positive(30.0),
            1,
        ),
        case(
            "a chat of 29.999 s is not",
            -30 * HOUR,
            vec![
                (With, Impression(A)),
                (With, Decision(A, MIN, true)),
                (With, Chat(5 * MIN, 29_999)),
            ],
            want(Some(true), Some(29.999), false, false, "negative"),
            1,
        ),
        case(
            "a chat after its 2 h window does not count",
            -30 * HOUR,
            vec![
                (With, Impression(A)),
                (With, Decision(A, MIN, true)),
                (With, Chat(2 * HOUR, 60 * SEC)),
            ],
            want(Some(true), None, false, false, "unknown"),
            1,
        ),
        case(
            "the candidate reports the viewer in the app",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(With, Report(B, 3 * HOUR))]),
            want(Some(true), Some(60.0), true, false, "negative"),
            1,
        ),
        case(
            "the viewer blocks the candidate in the app",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(With, Block(A, 3 * HOUR))]),
            want(Some(true), Some(60.0), false, true, "negative"),
            1,
        ),
        case(
            "a report at exactly 24 h does not count",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(With, Report(B, DAY))]),
            positive(60.0),
            1,
        ),
        case(
            "a report row in the product database (cdc)",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(With, ReportRow(A, HOUR))]),
            want(Some(true), Some(60.0), true, false, "negative"),
            2,
        ),
        case(
            "a block row in the product database (cdc), the other way round",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(With, BlockRow(B, 5 * HOUR))]),
            want(Some(true), Some(60.0), false, true, "negative"),
            2,
        ),
        case(
            "outcomes sent before their impression",
            -30 * HOUR,
            vec![
                (With, Decision(A, MIN, true)),
                (With, Chat(5 * MIN, 50 * SEC)),
                (With, Impression(A)),
            ],
            positive(50.0),
            1,
        ),
        Case {
            b: Some(want(Some(false), Some(40.0), false, false, "negative")),
            ..case(
                "both sides of a match",
                -30 * HOUR,
                vec![
                    (With, Impression(A)),
                    (With, Impression(B)),
                    (With, Decision(A, MIN, true)),
                    (With, Decision(B, MIN, false)),
                    (With, Chat(5 * MIN, 40 * SEC)),
                ],
                positive(40.0),
                1,
            )
        },
        case(
            "a late report in the app corrects the example",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(After, Report(B, 2 * HOUR))]),
            want(Some(true), Some(60.0), true, false, "negative"),
            2,
        ),
        case(
            "a late report row (cdc) corrects the example",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(After, ReportRow(B, HOUR))]),
            want(Some(true), Some(60.0), true, false, "negative"),
            2,
        ),
        case(
            "a late block row (cdc) corrects the example",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(After, BlockRow(A, 6 * HOUR))]),
            want(Some(true), Some(60.0), false, true, "negative"),
            2,
        ),
        case(
            "a late outcome that changes nothing creates no version",
            -30 * HOUR,
            with(accept_and_chat(60), vec![(After, Chat(30 * MIN, 20 * SEC))]),
            positive(60.0),
            1,
        ),
        case(
            "late outcomes read together make one correction",
            -30 * HOUR,
            with(
                accept_and_chat(20),
                vec![
                    (After, Chat(40 * MIN, 90 * SEC)),
                    (After, Report(A, 3 * HOUR)),
                    (After, Block(B, 4 * HOUR)),
                ],
            ),
            want(Some(true), Some(90.0), true, true, "negative"),
            2,
        ),
        case(
            "a phone offline for 30 hours: impression, accept and a 50 s chat in one batch",
            -30 * HOUR,
            accept_and_chat(50),
            positive(50.0),
            1,
        ),
        case(
            "a phone offline for 4 days: impression, accept and a 50 s chat in one batch",
            -4 * DAY,
            accept_and_chat(50),
            positive(50.0),
            1,
        ),
        Case {
            beyond_horizon: true,
            ..case(
                "a report after the correction horizon is counted, not applied",
                -4 * DAY,
                with(accept_and_chat(60), vec![(After, Report(B, 2 * HOUR))]),
                positive(60.0),
                1,
            )
        },
    ]
}

/// A case made concrete: its users, match, impressions and events.
struct Built {
    name: &'static str,
    a: Imp,
    b: Option<Imp>,
    events: Vec<(Phase, Ev)>,
    rows: Vec<(Phase, DbRow)>,
}

fn build(n: usize, case: &Case, now: i64) -> Built {
    let (ua, ub) = (format!("c{n}-a"), format!("c{n}-b"));
    let match_id = Uuid::new_v4();
    let t = now + case.at;
    let imp = |viewer: &str, candidate: &str| Imp {
        event_id: Uuid::new_v4(),
        match_id,
        viewer: viewer.into(),
        candidate: candidate.into(),
        time: t,
    };
    let a = imp(&ua, &ub);
    let b = imp(&ub, &ua);
    let user = |s: Side| match s {
        A => (ua.clone(), ub.clone()),
        B => (ub.clone(), ua.clone()),
    };
    let mut built = Built {
        name: case.name,
        a: a.clone(),
        b: None,
        events: Vec::new(),
        rows: Vec::new(),
    };
    for (phase, item) in &case.items {
        let phase = *phase;
        let id = Uuid::new_v4();
        let ev = match item {
            Impression(A) => Ev::Impression(a.clone()),
            Impression(B) => {
                built.b = Some(b.clone());
                Ev::Impression(b.clone())
            }
            Decision(s, dt, accept) => Ev::Decision {
                id,
                match_id,
                user: user(*s).0,
                time: t + dt,
                accept: *accept,
            },
            Chat(dt, ms) => Ev::Chat {
                id,
                match_id,
                user: ua.clone(),
                time: t + dt,
                ms: *ms,
            },
            Report(s, dt) => Ev::Report {
                id,
                match_id,
                user: user(*s).0,
                other: user(*s).1,
                time: t + dt,
            },
            Block(s, dt) => Ev::Block {
                id,
                match_id,
                user: user(*s).0,
                other: user(*s).1,
                time: t + dt,
            },
            ReportRow(s, dt) | BlockRow(s, dt) => {
                built.rows.push((
                    phase,
                    DbRow {
                        table: if matches!(item, ReportRow(..)) {
                            "app.reports"
                        } else {
                            "app.blocks"
                        },
                        actor: user(*s).0,
                        other: user(*s).1,
                        match_id,
                        time: t + dt,
                    },
                ));
                continue;
            }
        };
        built.events.push((phase, ev));
    }
    built
}

/// A fresh stack: cdc (product database, registry) with its topics, an events topic, and a
/// labeler on the example spec.
struct Stack {
    cdc: TestCdc,
    events_topic: String,
    producer: FutureProducer,
    schemas: HashMap<&'static str, std::sync::Arc<feedloop_core::avro::CompiledSchema>>,
    dir: tempfile::TempDir,
    dataset: String,
    cfg: Option<feedloop_labeler::Config>,
    control: Option<PgPool>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    addr: Option<std::net::SocketAddr>,
}

impl Stack {
    async fn new() -> Self {
        let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
        let events_topic = format!("{}.events", cdc.config.topics.prefix);
        feedloop_core::kafka::create_missing(
            &kafka(),
            &[(events_topic.as_str(), EVENT_PARTITIONS, false)],
        )
        .await
        .expect("events topic");
        let schemas = labeler::event_schemas(&cdc.registry.client(), &events_topic).await;
        let producer: FutureProducer = kafka()
            .client_config("label-semantics")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let dataset = format!("ls_{}", &Uuid::new_v4().simple().to_string()[..10]);
        Self {
            cdc,
            events_topic,
            producer,
            schemas,
            dir: tempfile::tempdir().expect("tempdir"),
            dataset,
            cfg: None,
            control: None,
            shutdown: CancellationToken::new(),
            task: None,
            addr: None,
        }
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("datasets")
    }

    async fn start_labeler(&mut self) {
        let spec = labeler::spec_file(self.dir.path(), &self.dataset);
        let root = self.root();
        let mut cfg = labeler::config(
            &self.cdc.registry,
            &spec,
            &self.events_topic,
            &self.cdc.config.topics.prefix,
            &root,
        )
        .await;
        cfg.datasets.commit_interval_ms = 1_000;
        let control = PgPool::connect(cfg.control.url.expose())
            .await
            .expect("control");
        let running = feedloop_labeler::start(cfg.clone(), self.shutdown.clone())
            .await
            .expect("labeler starts");
        self.task = Some(running.task);
        self.addr = Some(running.addr);
        self.cfg = Some(cfg);
        self.control = Some(control);
    }

    fn control(&self) -> &PgPool {
        self.control.as_ref().expect("labeler started")
    }

    /// Publishes events, in order, and waits for the broker's acknowledgements.
    async fn publish(&self, events: Vec<Ev>) {
        let scenario = Scenario {
            events,
            rows: Vec::new(),
            impressions: Vec::new(),
        };
        let mut pending = Vec::new();
        for (key, value) in labeler::encoded(&scenario, &self.schemas) {
            let f = self
                .producer
                .send_result(
                    FutureRecord::to(&self.events_topic)
                        .key(&key)
                        .payload(&value),
                )
                .unwrap_or_else(|(e, _)| panic!("enqueue: {e}"));
            pending.push(f);
        }
        for f in pending {
            f.await
                .expect("delivered")
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        }
    }

    /// Live traffic stamped `now`: a screen view on every events partition and a row in each
    /// cdc table, between users of no case.
    async fn live_traffic(&self, now: i64) {
        let scenario = Scenario {
            events: (0..EVENT_PARTITIONS)
                .map(|_| Ev::Clock {
                    id: Uuid::new_v4(),
                    time: now,
                })
                .collect(),
            rows: Vec::new(),
            impressions: Vec::new(),
        };
        for (p, (_, value)) in labeler::encoded(&scenario, &self.schemas)
            .into_iter()
            .enumerate()
        {
            self.producer
                .send(
                    FutureRecord::to(&self.events_topic)
                        .key("live")
                        .partition(p as i32)
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        }
        let rows = ["app.reports", "app.blocks"]
            .into_iter()
            .map(|table| DbRow {
                table,
                actor: "live-x".into(),
                other: "live-y".into(),
                match_id: Uuid::new_v4(),
                time: now,
            })
            .collect();
        self.insert_rows(rows).await;
    }

    /// Inserts product rows and waits until cdc has published them.
    async fn insert_rows(&self, rows: Vec<DbRow>) {
        if rows.is_empty() {
            return;
        }
        let count = |table| rows.iter().filter(|r| r.table == table).count();
        let mut expected = BTreeMap::new();
        for t in ["app.reports", "app.blocks"] {
            expected.insert(t, self.published(t).await + count(t));
        }
        labeler::insert_rows(
            &self.cdc.source,
            &Scenario {
                events: Vec::new(),
                rows,
                impressions: Vec::new(),
            },
        )
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for (t, n) in expected {
            loop {
                let landed = self.published(t).await;
                if landed >= n {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "cdc published {landed} of {n} rows of {t}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Rows cdc has published for `table`.
    async fn published(&self, table: &str) -> usize {
        read_all(&infra().kafka_bootstrap, &self.cdc.topic(table))
            .await
            .iter()
            .filter(|r| !r.tombstone)
            .count()
    }

    /// The latest version of each example, and every version number written for it.
    fn latest(&self) -> (BTreeMap<Uuid, Value>, BTreeMap<Uuid, Vec<i64>>) {
        latest_rows(&labeler::read_dataset(&self.root(), &self.dataset))
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        self.cdc.cleanup().await;
    }
}

/// By impression event id: the latest row, and the versions written.
fn latest_rows(data: &Value) -> (BTreeMap<Uuid, Value>, BTreeMap<Uuid, Vec<i64>>) {
    let mut latest: BTreeMap<Uuid, Value> = BTreeMap::new();
    let mut versions: BTreeMap<Uuid, Vec<i64>> = BTreeMap::new();
    for row in data["rows"].as_array().expect("rows") {
        let id: Uuid = row["impression_event_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("impression id");
        let v = row["version"].as_i64().unwrap_or(0);
        versions.entry(id).or_default().push(v);
        if latest
            .get(&id)
            .is_none_or(|r| r["version"].as_i64().unwrap_or(0) < v)
        {
            latest.insert(id, row.clone());
        }
    }
    for v in versions.values_mut() {
        v.sort_unstable();
    }
    (latest, versions)
}

fn matches(row: &Value, want: &Want) -> bool {
    let chat_ok = match (row["chat_seconds"].as_f64(), want.chat_seconds) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-9,
        (None, None) => true,
        _ => false,
    };
    row["accepted"].as_bool() == want.accepted
        && chat_ok
        && row["reported"].as_bool() == Some(want.reported)
        && row["blocked"].as_bool() == Some(want.blocked)
        && row["label"].as_str() == Some(want.label)
}

/// Every expected example, by impression id: (case name, what its latest version says).
fn expectations(cases: &[Case], built: &[Built]) -> Vec<(Uuid, &'static str, Want)> {
    let mut out = Vec::new();
    for (c, b) in cases.iter().zip(built) {
        out.push((b.a.event_id, b.name, c.a.clone()));
        if let (Some(imp), Some(w)) = (&b.b, &c.b) {
            out.push((imp.event_id, b.name, w.clone()));
        }
    }
    out
}

/// Waits until every example's latest version is the expected one; returns what is wrong
/// when `within` runs out.
async fn settle(
    stack: &Stack,
    expected: &[(Uuid, &'static str, Want)],
    within: Duration,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (latest, _) = stack.latest();
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(id, name, want)| match latest.get(id) {
                Some(row) if matches(row, want) => None,
                Some(row) => Some(format!(
                    "{name}: latest version {} says accepted={} chat_seconds={} reported={} blocked={} label={}, want {want:?}",
                    row["version"], row["accepted"], row["chat_seconds"], row["reported"], row["blocked"], row["label"]
                )),
                None => Some(format!("{name}: no row")),
            })
            .collect();
        if wrong.is_empty() || std::time::Instant::now() > deadline {
            return wrong;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the table on a fresh stack; `live_first` sends live traffic before the examples.
async fn run(live_first: bool) {
    let condition = if live_first {
        "after live traffic"
    } else {
        "fresh"
    };
    let now = feedloop_integration_tests::events::now_ms();
    let cases = cases();
    let built: Vec<Built> = cases
        .iter()
        .enumerate()
        .map(|(n, c)| build(n, c, now))
        .collect();
    let expected = expectations(&cases, &built);
    let mut stack = Stack::new().await;

    let mut first: Vec<Ev> = built
        .iter()
        .flat_map(|b| {
            b.events
                .iter()
                .filter(|(p, _)| *p == With)
                .map(|(_, e)| e.clone())
        })
        .collect();
    let first_rows: Vec<DbRow> = built
        .iter()
        .flat_map(|b| {
            b.rows
                .iter()
                .filter(|(p, _)| *p == With)
                .map(|(_, r)| r.clone())
        })
        .collect();
    if live_first {
        stack.start_labeler().await;
        stack.live_traffic(now).await;
        // The labeler has read the live traffic: every events partition's watermark is now.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let marks: Option<String> =
                sqlx::query_scalar("SELECT watermarks FROM labeler.positions WHERE dataset = $1")
                    .bind(&stack.dataset)
                    .fetch_optional(stack.control())
                    .await
                    .expect("position");
            let marks: BTreeMap<String, i64> = marks
                .and_then(|m| serde_json::from_str(&m).ok())
                .unwrap_or_default();
            let at_now = (0..EVENT_PARTITIONS)
                .filter(|p| marks.get(&format!("{}/{p}", stack.events_topic)) == Some(&now))
                .count();
            if at_now == EVENT_PARTITIONS as usize {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the labeler did not read the live traffic: {marks:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stack.publish(first).await;
        stack.insert_rows(first_rows).await;
    } else {
        // Oldest first, as phones that were online would have sent them.
        first.sort_by_key(Ev::time);
        stack.publish(first).await;
        stack.insert_rows(first_rows).await;
        stack.start_labeler().await;
        stack.live_traffic(now).await;
    }
    // Every example has its first version.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (latest, _) = stack.latest();
        if expected.iter().all(|(id, _, _)| latest.contains_key(id)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{condition}: {} of {} examples emitted",
            latest.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Late outcomes, from the app and from the product database.
    let later: Vec<Ev> = built
        .iter()
        .flat_map(|b| {
            b.events
                .iter()
                .filter(|(p, _)| *p == After)
                .map(|(_, e)| e.clone())
        })
        .collect();
    let later_rows: Vec<DbRow> = built
        .iter()
        .flat_map(|b| {
            b.rows
                .iter()
                .filter(|(p, _)| *p == After)
                .map(|(_, r)| r.clone())
        })
        .collect();
    stack.publish(later).await;
    stack.insert_rows(later_rows).await;
    let wrong = settle(&stack, &expected, Duration::from_secs(60)).await;
    assert!(wrong.is_empty(), "{condition}:\n{}", wrong.join("\n"));
    // Nothing more comes: no extra versions after a quiet while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (latest, versions) = stack.latest();
    let mut problems = Vec::new();
    for (case, b) in cases.iter().zip(&built) {
        for imp in std::iter::once(&b.a).chain(b.b.as_ref()) {
            let v = versions.get(&imp.event_id).cloned().unwrap_or_default();
            let consecutive: Vec<i64> = (1..=v.len() as i64).collect();
            if v != consecutive {
                problems.push(format!("{}: versions {v:?} are not 1, 2, …", b.name));
            }
            if v.len() as i32 > case.max_versions {
                problems.push(format!(
                    "{}: {} versions, at most {} expected",
                    b.name,
                    v.len(),
                    case.max_versions
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{condition}:\n{}", problems.join("\n"));

    // Late data is counted: in the position, on /metrics (by reason), and in the manifests.
    let late: String = sqlx::query_scalar("SELECT late FROM labeler.positions WHERE dataset = $1")
        .bind(&stack.dataset)
        .fetch_one(stack.control())
        .await
        .expect("position");
    let late: BTreeMap<String, i64> = serde_json::from_str(&late).expect("late counts");
    let beyond = cases.iter().filter(|c| c.beyond_horizon).count() as i64;
    assert!(
        late.get("beyond_horizon").copied().unwrap_or(0) >= beyond,
        "{condition}: late counts {late:?}"
    );
    assert!(
        late.get("corrected").copied().unwrap_or(0) >= 3,
        "{condition}: {late:?}"
    );
    assert!(
        late.get("unchanged").copied().unwrap_or(0) >= 1,
        "{condition}: {late:?}"
    );
    if live_first {
        assert!(
            late.get("late_impressions").copied().unwrap_or(0) >= built.len() as i64,
            "{condition}: every impression was late: {late:?}"
        );
    }
    let addr = stack.addr.expect("labeler started");
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("metrics body");
    for series in [
        "feedloop_labeler_late_outcomes_total{",
        "reason=\"beyond_horizon\"",
        "reason=\"corrected\"",
        "reason=\"unchanged\"",
        "feedloop_labeler_held_impressions{",
        "feedloop_labeler_examples_total{",
        "kind=\"correction\"",
    ] {
        assert!(
            metrics.contains(series),
            "{condition}: /metrics lacks {series}:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("feedloop_labeler_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    if live_first {
        assert!(
            metrics.contains("feedloop_labeler_late_impressions_total{"),
            "{condition}: /metrics counts late impressions"
        );
    }
    let manifest: String = sqlx::query_scalar(
        "SELECT manifest FROM labeler.partitions WHERE dataset = $1 ORDER BY committed_at DESC, version DESC LIMIT 1",
    )
    .bind(&stack.dataset)
    .fetch_one(stack.control())
    .await
    .expect("manifest");
    let manifest: Value = serde_json::from_str(&manifest).expect("manifest JSON");
    assert!(
        manifest["late_data"]["dataset_late_outcomes"]["beyond_horizon"]
            .as_i64()
            .unwrap_or(0)
            >= beyond,
        "{condition}: the manifest counts late outcomes: {}",
        manifest["late_data"]
    );

    // The trainer's view: DuckDB and pandas give the latest version of every example.
    let out = std::process::Command::new(python())
        .arg(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/latest_view.py"))
        .arg(stack.root())
        .arg(&stack.dataset)
        .output()
        .expect("run latest_view.py");
    assert!(
        out.status.success(),
        "latest_view.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let viewed = view["duckdb"].as_array().expect("rows");
    assert_eq!(
        viewed.len(),
        latest.len(),
        "{condition}: one row per example"
    );
    for row in viewed {
        let id = row["example_id"].as_str().unwrap_or_default();
        let mine = latest
            .values()
            .find(|r| r["example_id"].as_str() == Some(id))
            .unwrap_or_else(|| panic!("{condition}: the view has an unknown example {id}"));
        assert_eq!(row["version"], mine["version"], "{condition}: {id}");
        assert_eq!(row["label"], mine["label"], "{condition}: {id}");
    }

    // A replay of the log rebuilds the same latest rows.
    let replay_root = stack.dir.path().join("replay");
    // As `feedloop replay` does: the same configuration, a fresh bookkeeping database and
    // root, nothing published (the suppression list it copies is empty here).
    let mut config = stack.cfg.clone().expect("config");
    let control_url =
        feedloop::datasets::fresh_control_database(config.control.url.expose(), &stack.dataset)
            .await
            .expect("a database for the replay");
    config.control.url = feedloop_core::config::Secret::new(control_url);
    config.datasets.root = replay_root.display().to_string();
    feedloop_labeler::replay(
        config,
        &stack.dataset,
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    )
    .await
    .expect("replay");
    let (replayed, _) = latest_rows(&labeler::read_dataset(&replay_root, &stack.dataset));
    let mut differ = Vec::new();
    for (case, b) in cases.iter().zip(&built) {
        if case.beyond_horizon {
            continue;
        }
        for imp in std::iter::once(&b.a).chain(b.b.as_ref()) {
            let fields = [
                "example_id",
                "label",
                "accepted",
                "chat_seconds",
                "reported",
                "blocked",
            ];
            let pick = |r: Option<&Value>| -> Vec<Value> {
                fields
                    .iter()
                    .map(|f| r.map_or(Value::Null, |r| r[*f].clone()))
                    .collect()
            };
            let (live, again) = (
                pick(latest.get(&imp.event_id)),
                pick(replayed.get(&imp.event_id)),
            );
            if live != again {
                differ.push(format!("{}: live {live:?}, replay {again:?}", b.name));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "{condition}: replay differs:\n{}",
        differ.join("\n")
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_label_rule_holds_on_a_fresh_stack() {
    run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_label_rule_holds_after_live_traffic_advanced_every_partition() {
    run(true).await;
}
