//! The labeler against a real broker, registry, cdc and Postgres: every label of a generated
//! scenario, read back from Parquet with pyarrow, matches labels computed independently.

use std::{collections::HashSet, time::Duration};

use feedloop_integration_tests::{
    cdc::TestCdc,
    infra,
    labeler::{self, Scenario},
    log::read_all,
};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn check_rows(scenario: &Scenario, data: &Value) {
    let expected = scenario.expected();
    let rows = data["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), expected.len(), "one example per impression");
    let ids: HashSet<&str> = rows
        .iter()
        .filter_map(|r| r["example_id"].as_str())
        .collect();
    assert_eq!(ids.len(), rows.len(), "no duplicate example ids");
    let mut labels = std::collections::BTreeMap::new();
    for row in rows {
        let id: uuid::Uuid = row["impression_event_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("impression id");
        let want = expected
            .get(&id)
            .unwrap_or_else(|| panic!("unexpected example for impression {id}"));
        let got_chat = row["chat_seconds"].as_f64();
        assert_eq!(row["accepted"].as_bool(), want.accepted, "accepted of {id}");
        assert!(
            match (got_chat, want.chat_seconds) {
                (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                (None, None) => true,
                _ => false,
            },
            "chat_seconds of {id}: {got_chat:?} vs {:?}",
            want.chat_seconds
        );
        assert_eq!(
            row["reported"].as_bool(),
            Some(want.reported),
            "reported of {id}"
        );
        assert_eq!(
            row["blocked"].as_bool(),
            Some(want.blocked),
            "blocked of {id}"
        );
        assert_eq!(row["label"].as_str(), Some(want.label), "label of {id}");
        assert_eq!(row["version"].as_i64(), Some(1));
        *labels.entry(want.label).or_insert(0) += 1;
    }
    // The scenario exercises every label.
    for l in ["positive", "negative", "unknown"] {
        assert!(
            labels.get(l).copied().unwrap_or(0) > 10,
            "too few {l} examples: {labels:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_label_in_the_parquet_dataset_matches_an_independent_computation() {
    let scenario = labeler::scenario(7, 900);
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    labeler::insert_rows(&cdc.source, &scenario).await;
    let events_topic = format!("{}.events", cdc.config.topics.prefix);
    labeler::publish_events(&cdc.registry.client(), &events_topic, &scenario).await;
    // cdc has streamed every product row before the labeler starts reading.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut landed = 0;
        for t in ["app.reports", "app.blocks"] {
            landed += read_all(&infra().kafka_bootstrap, &cdc.topic(t))
                .await
                .iter()
                .filter(|r| !r.tombstone)
                .count();
        }
        if landed >= scenario.rows.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cdc streamed {landed} of {} rows",
            scenario.rows.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("it_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let cfg = labeler::config(
        &cdc.registry,
        &spec,
        &events_topic,
        &cdc.config.topics.prefix,
        &root,
    )
    .await;
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(cfg.clone(), shutdown.clone())
        .await
        .expect("labeler starts");
    labeler::wait_rows(
        &control,
        &dataset,
        scenario.impressions.len() as i64,
        Duration::from_secs(120),
    )
    .await;

    let data = labeler::read_dataset(&root, &dataset);
    check_rows(&scenario, &data);
    // Typed columns: timestamps as timestamps, experiment arm and model version kept.
    let schema = &data["schema"];
    assert_eq!(schema["impression_time"], "timestamp[ms, tz=UTC]");
    assert_eq!(schema["window_closed_at"], "timestamp[ms, tz=UTC]");
    assert_eq!(schema["accepted"], "bool");
    assert_eq!(schema["chat_seconds"], "double");
    assert_eq!(schema["experiment_arm"], "string");
    assert_eq!(schema["model_version"], "string");
    let arms: HashSet<&str> = data["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["experiment_arm"].as_str())
        .collect();
    assert_eq!(arms, HashSet::from(["control", "treatment"]));
    // Lineage: source offsets cover the events topic.
    for p in data["partitions"].as_array().expect("partitions") {
        assert!(
            p["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["topic"] == events_topic.as_str()),
            "manifest of {} names its source ranges: {p}",
            p["partition"]
        );
    }
    // Each row is also on the labels topic, and each partition version was announced.
    let labels = read_all(
        &infra().kafka_bootstrap,
        &format!("feedloop.labels.{dataset}"),
    )
    .await;
    let on_topic: HashSet<String> = labels
        .iter()
        .filter_map(|r| r.header("example_id").map(str::to_owned))
        .collect();
    assert!(
        labels
            .iter()
            .all(|r| r.header("example_id").map(str::as_bytes) == Some(r.key.as_slice())),
        "the labels topic is keyed by example id"
    );
    assert_eq!(on_topic.len(), scenario.impressions.len());
    let versions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM labeler.partitions WHERE dataset = $1 AND published_at IS NOT NULL",
    )
    .bind(&dataset)
    .fetch_one(&control)
    .await
    .expect("count");
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM labeler.partitions WHERE dataset = $1")
        .bind(&dataset)
        .fetch_one(&control)
        .await
        .expect("count");
    assert_eq!(
        versions, all,
        "every committed partition version is announced"
    );
    // The per-user index names the partitions each viewer appears in.
    let indexed: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT user_id) FROM labeler.partition_users WHERE dataset = $1",
    )
    .bind(&dataset)
    .fetch_one(&control)
    .await
    .expect("count");
    let users: HashSet<&str> = scenario
        .impressions
        .iter()
        .flat_map(|i| [i.viewer.as_str(), i.candidate.as_str()])
        .collect();
    assert_eq!(indexed as usize, users.len());

    // Erasure hook: rewriting every partition that holds a user removes exactly their rows.
    let before = data["rows"].as_array().expect("rows").clone();
    let user = scenario.impressions[0].viewer.clone();
    let names = |r: &Value| r["viewer_id"] == user.as_str() || r["candidate_id"] == user.as_str();
    let theirs = before.iter().filter(|r| names(r)).count() as i64;
    assert!(theirs > 0);
    let root_handle =
        feedloop_labeler::dataset::Root::open(&root.display().to_string(), &Default::default())
            .expect("root");
    let parts =
        feedloop_labeler::erasure::partitions_with_users(&control, std::slice::from_ref(&user))
            .await
            .expect("index");
    assert!(!parts.is_empty() && parts.iter().all(|(d, _)| *d == dataset));
    let mut removed = 0;
    let request = uuid::Uuid::now_v7();
    for (d, p) in &parts {
        let rw = feedloop_labeler::erasure::rewrite_partition(
            &control,
            &root_handle,
            d,
            p,
            std::slice::from_ref(&user),
            request,
        )
        .await
        .expect("rewrite");
        let after = rw.after.expect("a new version");
        assert_eq!(after.version, rw.before.version + 1);
        assert_eq!(after.supersedes_version, Some(rw.before.version));
        assert!(after.erasure_epoch > rw.before.erasure_epoch);
        assert_eq!(after.row_count, rw.before.row_count - rw.rows_removed);
        for f in &rw.before.files {
            if !after.files.contains(f) {
                let path = f.uri.trim_start_matches("file://");
                assert!(
                    !std::path::Path::new(path).exists(),
                    "replaced file {path} was not deleted"
                );
            }
        }
        removed += rw.rows_removed;
    }
    assert_eq!(removed, theirs);
    // The removed examples are recorded under the request, for their labels-topic tombstones.
    let want: HashSet<String> = before
        .iter()
        .filter(|r| names(r))
        .filter_map(|r| r["example_id"].as_str().map(str::to_owned))
        .collect();
    let recorded = feedloop_labeler::erasure::erased_examples(&control, request)
        .await
        .expect("erased examples");
    let got: HashSet<String> = recorded
        .get(&dataset)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(got, want);
    let rewritten = labeler::read_dataset(&root, &dataset);
    let after_rows = rewritten["rows"].as_array().expect("rows");
    assert_eq!(after_rows.len() as i64, before.len() as i64 - theirs);
    assert!(
        !after_rows.iter().any(names),
        "a row still names the erased user"
    );
    let left =
        feedloop_labeler::erasure::partitions_with_users(&control, std::slice::from_ref(&user))
            .await
            .expect("index");
    assert!(left.is_empty(), "the per-user index still lists {left:?}");

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    cdc.cleanup().await;
}

#[tokio::test]
async fn postgres_state_store_passes_the_contract() {
    let pool =
        feedloop_core::postgres::connect(&feedloop_integration_tests::fresh_database().await, 4)
            .await
            .expect("connect");
    feedloop_core::postgres::migrate(&pool)
        .await
        .expect("migrate");
    let store = feedloop_labeler::state::postgres::PostgresStore::new(pool);
    feedloop_labeler::state::contract::run_all(&store)
        .await
        .expect("contract");
}

#[tokio::test]
#[ignore = "needs ScyllaDB, which cannot run here: start deploy/compose.scylla.yaml (or any cluster), set SCYLLA_NODES=host:9042 and run with --ignored; integration-tests/run does when SCYLLA_NODES is set"]
async fn scylla_state_store_passes_the_contract() {
    let nodes: Vec<String> = std::env::var("SCYLLA_NODES")
        .expect("SCYLLA_NODES is not set")
        .split(',')
        .map(str::to_owned)
        .collect();
    let keyspace = format!(
        "contract_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let store = feedloop_labeler::state::scylla::ScyllaStore::connect(&nodes, &keyspace, 1)
        .await
        .expect("connect to ScyllaDB");
    feedloop_labeler::state::contract::run_all(&store)
        .await
        .expect("contract");
}

/// Two specs side by side on the same log, differing only in their late policy: a report read
/// after its example was emitted corrects it (version 2) under `correct` and is only counted
/// under `drop`. Records that are not Avro go to the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_outcomes_follow_the_policy_and_poison_records_are_dead_lettered() {
    use feedloop_integration_tests::{TestRegistry, kafka, labeler::T0};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let registry = TestRegistry::start().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("l{}", &id[..8]);
    let events_topic = format!("{prefix}.events");
    feedloop_core::kafka::create_missing(
        &kafka(),
        &[
            (events_topic.as_str(), 3, false),
            (&format!("{prefix}.app.reports"), 1, true),
            (&format!("{prefix}.app.blocks"), 1, true),
        ],
    )
    .await
    .expect("topics");
    let schemas = labeler::event_schemas(&registry.client(), &events_topic).await;
    let m = uuid::Uuid::new_v4();
    let imp = labeler::Imp {
        event_id: uuid::Uuid::new_v4(),
        match_id: m,
        viewer: "ann".into(),
        candidate: "bob".into(),
        time: T0,
    };
    let scenario = Scenario {
        events: vec![
            labeler::Ev::Impression(imp.clone()),
            labeler::Ev::Decision {
                id: uuid::Uuid::new_v4(),
                match_id: m,
                user: "ann".into(),
                time: T0 + 60_000,
                accept: true,
            },
            labeler::Ev::Chat {
                id: uuid::Uuid::new_v4(),
                match_id: m,
                user: "bob".into(),
                time: T0 + 300_000,
                ms: 90_000,
            },
            labeler::Ev::Clock {
                id: uuid::Uuid::new_v4(),
                time: T0 + 2 * 86_400_000,
            },
        ],
        rows: Vec::new(),
        impressions: vec![imp.clone()],
    };
    let producer: FutureProducer = kafka()
        .client_config("late-test")
        .create()
        .expect("producer");
    let key = m.to_string();
    let mut records = labeler::encoded(&scenario, &schemas);
    records.insert(2, (key.clone(), b"not avro at all".to_vec()));
    records.insert(
        3,
        (key.clone(), [0u8, 0, 0x0f, 0x42, 0x3f, 1, 2, 3].to_vec()),
    );
    for (_, value) in &records {
        producer
            .send(
                FutureRecord::to(&events_topic).key(&key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let correct = format!("c_{}", &id[8..16]);
    let drop = format!("d_{}", &id[8..16]);
    let correct_spec = labeler::spec_file(dir.path(), &correct);
    let drop_spec = dir.path().join(format!("{drop}.toml"));
    std::fs::write(
        &drop_spec,
        std::fs::read_to_string(&correct_spec)
            .expect("spec")
            .replace(
                &format!("name = \"{correct}\""),
                &format!("name = \"{drop}\""),
            )
            .replace("late_outcomes = \"correct\"", "late_outcomes = \"drop\""),
    )
    .expect("spec");
    let root = dir.path().join("datasets");
    let mut cfg = labeler::config(&registry, &correct_spec, &events_topic, &prefix, &root).await;
    cfg.specs.files.push(drop_spec.display().to_string());
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(cfg, shutdown.clone())
        .await
        .expect("start");
    labeler::wait_rows(&control, &correct, 1, Duration::from_secs(60)).await;
    labeler::wait_rows(&control, &drop, 1, Duration::from_secs(60)).await;
    // Two hours after the impression: inside the 24 h window, but read once the example was
    // emitted and committed.
    let report = Scenario {
        events: vec![labeler::Ev::Report {
            id: uuid::Uuid::new_v4(),
            match_id: m,
            user: "bob".into(),
            other: "ann".into(),
            time: T0 + 7_200_000,
        }],
        rows: Vec::new(),
        impressions: Vec::new(),
    };
    for (_, value) in labeler::encoded(&report, &schemas) {
        producer
            .send(
                FutureRecord::to(&events_topic).key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    labeler::wait_rows(&control, &correct, 2, Duration::from_secs(60)).await;
    let late = |dataset: String| {
        let control = control.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let late: String =
                    sqlx::query_scalar("SELECT late FROM labeler.positions WHERE dataset = $1")
                        .bind(&dataset)
                        .fetch_one(&control)
                        .await
                        .expect("position");
                let late: Value = serde_json::from_str(&late).expect("json");
                if late.as_object().is_some_and(|m| !m.is_empty())
                    || std::time::Instant::now() > deadline
                {
                    return late;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(
        late(correct.clone()).await,
        serde_json::json!({"corrected": 1})
    );
    assert_eq!(late(drop.clone()).await, serde_json::json!({"dropped": 1}));

    let rows = |data: &Value| -> Vec<(i64, String, bool)> {
        let mut v: Vec<(i64, String, bool)> = data["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                (
                    r["version"].as_i64().unwrap_or(0),
                    r["label"].as_str().unwrap_or("").to_owned(),
                    r["reported"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        v.sort();
        v
    };
    let corrected = labeler::read_dataset(&root, &correct);
    assert_eq!(
        rows(&corrected),
        vec![(1, "positive".into(), false), (2, "negative".into(), true)]
    );
    let ids: HashSet<&str> = corrected["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["example_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1, "a correction keeps the example id");
    let dropped = labeler::read_dataset(&root, &drop);
    assert_eq!(rows(&dropped), vec![(1, "positive".into(), false)]);

    // Both poison records reached the dead-letter topic, once per dataset, with their origin.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let client = registry.client();
        let mut mine = 0;
        for r in read_all(
            &infra().kafka_bootstrap,
            feedloop_core::catalogue::DEADLETTER_TOPIC,
        )
        .await
        {
            if let Ok(dl) = client
                .decode::<feedloop_core::model::DeadLetter>(&r.value)
                .await
                && dl.service == "labeler"
                && dl.source_topic.as_deref() == Some(events_topic.as_str())
            {
                mine += 1;
            }
        }
        if mine == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{mine} of 4 dead letters"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

/// The same impression three times in the log (twice in one flush, once after its example
/// was committed) yields one row, and an impression whose user id holds a NUL (which
/// Postgres text refuses) is dead-lettered: neither stops the dataset, whose next example
/// commits. Without the fixes the repeated pair fails every flush (ON CONFLICT cannot touch a
/// row twice), the NUL fails every flush, and the late copy is emitted a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_impression_is_labeled_once_and_a_nul_id_is_dead_lettered() {
    use feedloop_integration_tests::{TestRegistry, kafka, labeler::T0};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let registry = TestRegistry::start().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("l{}", &id[..8]);
    let events_topic = format!("{prefix}.events");
    feedloop_core::kafka::create_missing(
        &kafka(),
        &[
            (events_topic.as_str(), 1, false),
            (&format!("{prefix}.app.reports"), 1, true),
            (&format!("{prefix}.app.blocks"), 1, true),
        ],
    )
    .await
    .expect("topics");
    let schemas = labeler::event_schemas(&registry.client(), &events_topic).await;
    let imp = |viewer: &str, time: i64| labeler::Imp {
        event_id: uuid::Uuid::new_v4(),
        match_id: uuid::Uuid::new_v4(),
        viewer: viewer.into(),
        candidate: "bob".into(),
        time,
    };
    let first = imp("ann", T0);
    let nul = imp("ann\0evil", T0 + 1_000);
    let probe = imp("cy", T0 + 2 * 86_400_000 + 1_000);
    let clock = |time| labeler::Ev::Clock {
        id: uuid::Uuid::new_v4(),
        time,
    };
    let producer: FutureProducer = kafka()
        .client_config("dup-test")
        .create()
        .expect("producer");
    let publish = |events: Vec<labeler::Ev>| {
        let producer = producer.clone();
        let schemas = schemas.clone();
        let topic = events_topic.clone();
        async move {
            let scenario = Scenario {
                events,
                rows: Vec::new(),
                impressions: Vec::new(),
            };
            for (_, value) in labeler::encoded(&scenario, &schemas) {
                producer
                    .send(
                        FutureRecord::to(&topic).key("k").payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            }
        }
    };
    publish(vec![
        labeler::Ev::Impression(first.clone()),
        labeler::Ev::Impression(first.clone()),
        labeler::Ev::Impression(nul.clone()),
        clock(T0 + 2 * 86_400_000),
    ])
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("u_{}", &id[8..16]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let cfg = labeler::config(&registry, &spec, &events_topic, &prefix, &root).await;
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(cfg, shutdown.clone())
        .await
        .expect("start");
    labeler::wait_rows(&control, &dataset, 1, Duration::from_secs(60)).await;
    // The third copy arrives once its example was emitted and committed: late.
    publish(vec![
        labeler::Ev::Impression(first.clone()),
        labeler::Ev::Impression(probe.clone()),
        clock(T0 + 4 * 86_400_000),
    ])
    .await;
    labeler::wait_rows(&control, &dataset, 2, Duration::from_secs(60)).await;
    // Room for a second copy to be committed, were it emitted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let data = labeler::read_dataset(&root, &dataset);
    let mut rows: Vec<(String, i64)> = data["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["viewer_id"].as_str().unwrap_or("").to_owned(),
                r["version"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(rows, vec![("ann".into(), 1), ("cy".into(), 1)], "{data}");

    let client = registry.client();
    let mut letters = Vec::new();
    for r in read_all(
        &infra().kafka_bootstrap,
        feedloop_core::catalogue::DEADLETTER_TOPIC,
    )
    .await
    {
        if let Ok(dl) = client
            .decode::<feedloop_core::model::DeadLetter>(&r.value)
            .await
            && dl.service == "labeler"
            && dl.source_topic.as_deref() == Some(events_topic.as_str())
        {
            letters.push(dl);
        }
    }
    assert_eq!(letters.len(), 1, "the NUL impression, dead-lettered once");
    assert_eq!(letters[0].source_offset, Some(2));
    assert!(letters[0].detail.contains("NUL"), "{}", letters[0].detail);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

/// A stack for the lateness tests: an events topic of three partitions and the cdc topics,
/// the registered event schemas, a producer that sends a group of events to one partition in
/// one record batch, and a labeler configuration (`idle_timeout_ms` as given).
struct Lateness {
    /// Serves the schemas while the test runs.
    _registry: feedloop_integration_tests::TestRegistry,
    events_topic: String,
    schemas: std::collections::HashMap<
        &'static str,
        std::sync::Arc<feedloop_core::avro::CompiledSchema>,
    >,
    producer: rdkafka::producer::FutureProducer,
    dataset: String,
    cfg: feedloop_labeler::Config,
    root: tempfile::TempDir,
}

impl Lateness {
    async fn new(idle_timeout_ms: u64) -> Self {
        use feedloop_integration_tests::{TestRegistry, kafka};
        let registry = TestRegistry::start().await;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("w{}", &id[..8]);
        let events_topic = format!("{prefix}.events");
        feedloop_core::kafka::create_missing(
            &kafka(),
            &[
                (events_topic.as_str(), 3, false),
                (&format!("{prefix}.app.reports"), 1, true),
                (&format!("{prefix}.app.blocks"), 1, true),
            ],
        )
        .await
        .expect("topics");
        let schemas = labeler::event_schemas(&registry.client(), &events_topic).await;
        let producer = kafka()
            .client_config("lateness-test")
            .set("linger.ms", "50")
            .create()
            .expect("producer");
        let root = tempfile::tempdir().expect("tempdir");
        let dataset = format!("w_{}", &id[8..16]);
        let spec = labeler::spec_file(root.path(), &dataset);
        let mut cfg = labeler::config(
            &registry,
            &spec,
            &events_topic,
            &prefix,
            &root.path().join("datasets"),
        )
        .await;
        cfg.inputs.idle_timeout_ms = idle_timeout_ms;
        Self {
            _registry: registry,
            events_topic,
            schemas,
            producer,
            dataset,
            cfg,
            root,
        }
    }

    /// Sends `events` to `partition`, in one batch, and waits for the broker's answer.
    async fn send(&self, partition: i32, events: Vec<labeler::Ev>) {
        use rdkafka::producer::FutureRecord;
        let scenario = Scenario {
            events,
            rows: Vec::new(),
            impressions: Vec::new(),
        };
        let mut pending = Vec::new();
        for (key, value) in labeler::encoded(&scenario, &self.schemas) {
            pending.push(
                self.producer
                    .send_result(
                        FutureRecord::to(&self.events_topic)
                            .partition(partition)
                            .key(&key)
                            .payload(&value),
                    )
                    .unwrap_or_else(|(e, _)| panic!("enqueue: {e}")),
            );
        }
        for f in pending {
            f.await
                .expect("delivered")
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        }
    }

    /// (version, label, chat_seconds) of every committed row, by version.
    fn rows(&self) -> Vec<(i64, String, Option<f64>)> {
        let data = labeler::read_dataset(&self.root.path().join("datasets"), &self.dataset);
        let mut v: Vec<(i64, String, Option<f64>)> = data["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                (
                    r["version"].as_i64().unwrap_or(0),
                    r["label"].as_str().unwrap_or("").to_owned(),
                    r["chat_seconds"].as_f64(),
                )
            })
            .collect();
        v.sort_by_key(|r| r.0);
        v
    }
}

/// One match seen by ann: her impression and accept, and a 90 s chat.
fn accepted_match(m: uuid::Uuid) -> (labeler::Ev, labeler::Ev, labeler::Ev) {
    use feedloop_integration_tests::labeler::T0;
    (
        labeler::Ev::Impression(labeler::Imp {
            event_id: uuid::Uuid::new_v4(),
            match_id: m,
            viewer: "ann".into(),
            candidate: "bob".into(),
            time: T0,
        }),
        labeler::Ev::Decision {
            id: uuid::Uuid::new_v4(),
            match_id: m,
            user: "ann".into(),
            time: T0 + 60_000,
            accept: true,
        },
        labeler::Ev::Chat {
            id: uuid::Uuid::new_v4(),
            match_id: m,
            user: "bob".into(),
            time: T0 + 300_000,
            ms: 90_000,
        },
    )
}

fn clock(time: i64) -> labeler::Ev {
    labeler::Ev::Clock {
        id: uuid::Uuid::new_v4(),
        time,
    }
}

/// A partition read to its end that gets its next records a moment later (a collector
/// draining its spool, a fetch that came back empty) is still behind in event time: another
/// partition three days ahead must not close its examples meanwhile. Before the idle timeout,
/// the first end-of-partition event let the other partition drive the watermark: the example
/// was emitted `unknown` within a second, and the chat, sent 3 s later and three days behind
/// the watermark, was counted beyond the correction horizon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_briefly_at_its_end_holds_the_watermark_until_it_is_idle() {
    use feedloop_integration_tests::labeler::T0;
    const DAY: i64 = 86_400_000;
    let t = Lateness::new(15_000).await;
    let (impression, decision, chat) = accepted_match(uuid::Uuid::new_v4());
    t.send(0, vec![impression, decision]).await;
    t.send(1, vec![clock(T0 + 3 * DAY)]).await;
    let control = PgPool::connect(t.cfg.control.url.expose())
        .await
        .expect("control");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(t.cfg.clone(), shutdown.clone())
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.send(0, vec![chat]).await;
    labeler::wait_rows(&control, &t.dataset, 1, Duration::from_secs(90)).await;
    // Give a wrong first version the time to be corrected, were it to be.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(t.rows(), vec![(1, "positive".to_owned(), Some(90.0))]);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

/// A late outcome read while its example can still be corrected corrects it, however far the
/// watermark moves before the next commit (the records read in the same fetch, a long
/// catch-up). Before the fix the horizon was judged at the commit, against the watermark of
/// the record after the chat (49 h after the impression): the chat was counted beyond the
/// horizon and the example stayed `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_outcome_is_judged_by_the_horizon_when_it_was_read() {
    use feedloop_integration_tests::labeler::T0;
    const HOUR: i64 = 3_600_000;
    let t = Lateness::new(1_000).await;
    let (impression, decision, chat) = accepted_match(uuid::Uuid::new_v4());
    // Version 1: the accept, no chat yet (the example closes 24 h 30 s after the impression).
    t.send(0, vec![impression, decision, clock(T0 + 25 * HOUR)])
        .await;
    let control = PgPool::connect(t.cfg.control.url.expose())
        .await
        .expect("control");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(t.cfg.clone(), shutdown.clone())
        .await
        .expect("start");
    labeler::wait_rows(&control, &t.dataset, 1, Duration::from_secs(60)).await;
    assert_eq!(t.rows(), vec![(1, "unknown".to_owned(), None)]);
    // The chat, read when the example can be corrected (until 48 h 30 s), and in the same
    // batch a record 49 h after the impression: both are read before the next commit.
    t.send(0, vec![chat, clock(T0 + 49 * HOUR)]).await;
    labeler::wait_rows(&control, &t.dataset, 2, Duration::from_secs(60)).await;
    assert_eq!(
        t.rows(),
        vec![
            (1, "unknown".to_owned(), None),
            (2, "positive".to_owned(), Some(90.0))
        ]
    );
    let late: String = sqlx::query_scalar("SELECT late FROM labeler.positions WHERE dataset = $1")
        .bind(&t.dataset)
        .fetch_one(&control)
        .await
        .expect("position");
    assert_eq!(
        serde_json::from_str::<Value>(&late).expect("json"),
        serde_json::json!({"corrected": 1})
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

/// An erasure that suppresses a user while a labeler commit holding the user's examples is in
/// flight leaves none of them on the labels topic. The test holds the eraser's suppression
/// step open (its exclusive lock taken, the user inserted, not yet committed) from before the
/// labeler labels, and lets it finish once the commit waits for the lock. Before the fix the
/// commit published the examples first and found the erasure after, in its transaction: it
/// started again without the user, but the published examples stayed on the labels topic,
/// named by no committed row, so no tombstone ever reached them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_racing_a_commit_leaves_none_of_the_users_examples_on_the_labels_topic() {
    use feedloop_integration_tests::labeler::T0;
    const DAY: i64 = 86_400_000;
    // Partitions idle at their end at once, and no commit on a timer: the first commit is
    // the one that holds the examples.
    let mut t = Lateness::new(0).await;
    t.cfg.datasets.commit_interval_ms = 600_000;
    let control = PgPool::connect(t.cfg.control.url.expose())
        .await
        .expect("control");
    // The labeler's migrations make the suppression list; run them first.
    feedloop_core::postgres::migrate(&control)
        .await
        .expect("migrate");
    // The eraser's suppression step, held open: bob is suppressed once it commits.
    let mut erasure = control.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(feedloop_labeler::erasure::SUPPRESSION_LOCK)
        .execute(&mut *erasure)
        .await
        .expect("lock");
    sqlx::query("INSERT INTO collector.suppressed_users (user_id) VALUES ('bob')")
        .execute(&mut *erasure)
        .await
        .expect("suppress");

    // ann's example names bob; carl's does not.
    let (impression, decision, chat) = accepted_match(uuid::Uuid::new_v4());
    let other = uuid::Uuid::new_v4();
    let carl = labeler::Ev::Impression(labeler::Imp {
        event_id: uuid::Uuid::new_v4(),
        match_id: other,
        viewer: "carl".into(),
        candidate: "dora".into(),
        time: T0,
    });
    t.send(
        0,
        vec![impression, decision, chat, carl, clock(T0 + 2 * DAY)],
    )
    .await;
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(t.cfg.clone(), shutdown.clone())
        .await
        .expect("start");
    // The commit waits for the lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&control)
        .await
        .expect("pg_locks");
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no labeler commit waited for the suppression lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    erasure.commit().await.expect("erasure commits");
    labeler::wait_rows(&control, &t.dataset, 1, Duration::from_secs(60)).await;
    assert_eq!(
        t.rows(),
        vec![(1, "unknown".to_owned(), None)],
        "carl's only"
    );
    let labels = read_all(
        &infra().kafka_bootstrap,
        &feedloop_core::catalogue::labels_topic(&t.dataset),
    )
    .await;
    assert_eq!(labels.len(), 1, "carl's example alone was published");
    assert!(
        labels
            .iter()
            .all(|r| !r.value.windows(3).any(|w| w == b"bob")),
        "an example naming the erased user is on the labels topic"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

/// The eraser's scan of the root's join-state checkpoints for `user`: whether any file names
/// them, and what it read.
async fn checkpoints_name(root: &std::path::Path, user: &str) -> (bool, String) {
    let root =
        feedloop_labeler::dataset::Root::open(&root.display().to_string(), &Default::default())
            .expect("root");
    let check = feedloop_eraser::verify::state_checkpoints(
        &root,
        &feedloop_eraser::verify::Needles {
            users: vec![user.to_owned()],
            values: Vec::new(),
        },
    )
    .await
    .expect("scan");
    (check.status == "fail", check.detail)
}

/// Records of `topic` the dataset's committed position is past (the sum of its next offsets).
async fn events_committed(control: &PgPool, dataset: &str, topic: &str) -> i64 {
    let offsets: Option<String> =
        sqlx::query_scalar("SELECT offsets FROM labeler.positions WHERE dataset = $1")
            .bind(dataset)
            .fetch_optional(control)
            .await
            .expect("position");
    let offsets: std::collections::BTreeMap<String, i64> =
        serde_json::from_str(&offsets.unwrap_or_else(|| "{}".into())).expect("offsets");
    offsets
        .iter()
        .filter(|(tp, _)| tp.rsplit_once('/').is_some_and(|(t, _)| t == topic))
        .map(|(_, next)| next)
        .sum()
}

/// Local join state labels like every store, and erasure reaches it: once a user is on the
/// suppression list, the labeler purges them from its memory and commits a snapshot that
/// supersedes every segment naming them (the eraser's `join_state` target waits for exactly
/// this), the user's records still in the log never get back in, and a restart restores a
/// state without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_user_leaves_the_local_join_state_and_every_checkpoint() {
    let scenario = labeler::scenario(29, 300);
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    labeler::insert_rows(&cdc.source, &scenario).await;
    let events_topic = format!("{}.events", cdc.config.topics.prefix);
    labeler::publish_events(&cdc.registry.client(), &events_topic, &scenario).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("local_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let mut cfg = labeler::config(
        &cdc.registry,
        &spec,
        &events_topic,
        &cdc.config.topics.prefix,
        &root,
    )
    .await;
    cfg.state.store = feedloop_labeler::config::StoreKind::Local;
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    let total = scenario.impressions.len() as i64;
    let stop = CancellationToken::new();
    let running = feedloop_labeler::start(cfg.clone(), stop.clone())
        .await
        .expect("labeler");
    labeler::wait_rows(&control, &dataset, total, Duration::from_secs(120)).await;
    check_rows(&scenario, &labeler::read_dataset(&root, &dataset));
    // Operators see how big the state and its checkpoint are.
    let metrics = reqwest::get(format!("http://{}/metrics", running.addr))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("metrics body");
    let series = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("dataset=\"{dataset}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} series for the dataset"))
    };
    // Entries may be none by now: every window closed and expired.
    assert!(series("feedloop_labeler_state_entries{") >= 0.0);
    assert!(series("feedloop_labeler_checkpoint_bytes{") > 0.0);

    let user = scenario.impressions[0].viewer.clone();
    let (named, detail) = checkpoints_name(&root, &user).await;
    assert!(
        named,
        "the checkpoint holds the user's join state before the erasure: {detail}"
    );
    feedloop_labeler::erasure::suppress(&control, std::slice::from_ref(&user))
        .await
        .expect("suppress");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let behind =
            feedloop_labeler::erasure::local_state_behind(&control, std::slice::from_ref(&user))
                .await
                .expect("behind")
                .expect("the user is suppressed");
        if behind.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint without the user: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The superseded segments go right after the commit that recorded the snapshot.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (named, detail) = checkpoints_name(&root, &user).await;
        if !named {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "segments still name the erased user: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The user's impressions read again (a producer's retry, a replay): they stay out.
    let again = Scenario {
        events: scenario
            .events
            .iter()
            .filter(|e| matches!(e, labeler::Ev::Impression(i) if i.viewer == user))
            .cloned()
            .collect(),
        rows: Vec::new(),
        impressions: Vec::new(),
    };
    assert!(!again.events.is_empty());
    labeler::publish_events(&cdc.registry.client(), &events_topic, &again).await;
    let published = (scenario.events.len() + again.events.len()) as i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while events_committed(&control, &dataset, &events_topic).await < published {
        assert!(
            std::time::Instant::now() < deadline,
            "the labeler did not commit the records read again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (named, detail) = checkpoints_name(&root, &user).await;
    assert!(!named, "{detail}");

    // A restart restores the checkpoint, which does not name the user.
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    let stop = CancellationToken::new();
    let running = feedloop_labeler::start(cfg.clone(), stop.clone())
        .await
        .expect("labeler");
    labeler::wait_rows(&control, &dataset, total, Duration::from_secs(60)).await;
    let (named, detail) = checkpoints_name(&root, &user).await;
    assert!(!named, "{detail}");

    // A user with an open example (still in the state), erased while the labeler is down: the
    // eraser purges the checkpoint itself, under the dataset's lock, which a running labeler
    // holds (the eraser then leaves the purge to it).
    let latecomer = format!("open-{}", uuid::Uuid::new_v4().simple());
    let clock = scenario
        .events
        .last()
        .map(labeler::Ev::time)
        .expect("clock");
    let open = Scenario {
        events: vec![labeler::Ev::Impression(labeler::Imp {
            event_id: uuid::Uuid::new_v4(),
            match_id: uuid::Uuid::new_v4(),
            viewer: latecomer.clone(),
            // Not a scenario user: any of them may be the one erased above.
            candidate: format!("open-candidate-{}", uuid::Uuid::new_v4().simple()),
            time: clock,
        })],
        rows: Vec::new(),
        impressions: Vec::new(),
    };
    labeler::publish_events(&cdc.registry.client(), &events_topic, &open).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while events_committed(&control, &dataset, &events_topic).await < published + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the labeler did not commit the open impression"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (named, detail) = checkpoints_name(&root, &latecomer).await;
    assert!(
        named,
        "the open example's impression is in the checkpoint: {detail}"
    );
    let root_store =
        feedloop_labeler::dataset::Root::open(&root.display().to_string(), &Default::default())
            .expect("root");
    assert_eq!(
        feedloop_labeler::erasure::purge_idle_checkpoint(&control, &root_store, &dataset)
            .await
            .expect("purge"),
        None,
        "the running labeler holds the dataset"
    );
    // The labeler crashes (no final commit), then the user is erased.
    running.task.abort();
    let _ = running.task.await;
    stop.cancel();
    feedloop_labeler::erasure::suppress(&control, std::slice::from_ref(&latecomer))
        .await
        .expect("suppress");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let purged = loop {
        // The aborted labeler's lock goes with its connection, a moment later.
        if let Some(n) =
            feedloop_labeler::erasure::purge_idle_checkpoint(&control, &root_store, &dataset)
                .await
                .expect("purge")
        {
            break n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the crashed labeler's lock was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(purged >= 1, "the open impression was purged ({purged})");
    let (named, detail) = checkpoints_name(&root, &latecomer).await;
    assert!(!named, "{detail} ({purged} entries purged)");
    assert_eq!(
        feedloop_labeler::erasure::local_state_behind(&control, std::slice::from_ref(&latecomer))
            .await
            .expect("behind"),
        Some(Vec::new())
    );
    cdc.cleanup().await;
}
