//! The labeler killed with SIGKILL mid-run and restarted writes exactly the dataset an
//! uninterrupted run writes: same rows, no duplicates, no gaps, no stray files.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use feedloop_integration_tests::{
    cdc::TestCdc,
    infra,
    labeler::{self, Scenario},
    log::read_all,
    service::Service,
};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The dataset's rows by impression, without the example id (it depends on the dataset name).
fn rows_by_impression(data: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for row in data["rows"].as_array().expect("rows") {
        let id = row["impression_event_id"].as_str().expect("id").to_owned();
        let mut row = row.clone();
        if let Some(o) = row.as_object_mut() {
            o.remove("example_id");
        }
        assert!(
            out.insert(id.clone(), row).is_none(),
            "impression {id} labeled twice"
        );
    }
    out
}

fn parquet_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                n += 1;
            }
        }
    }
    n
}

async fn prepared(seed: u64, matches: usize) -> (Scenario, TestCdc, String) {
    let scenario = labeler::scenario(seed, matches);
    // cdc and the events batch as in production: the restarted labeler resumes inside
    // record batches (see `labeler::publish_events`).
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    labeler::insert_rows(&cdc.source, &scenario).await;
    let events_topic = format!("{}.events", cdc.config.topics.prefix);
    labeler::publish_events(&cdc.registry.client(), &events_topic, &scenario).await;
    let deadline = Instant::now() + Duration::from_secs(60);
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
        assert!(Instant::now() < deadline, "cdc streamed {landed} rows");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (scenario, cdc, events_topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeler_killed_mid_run_writes_the_same_dataset_as_an_uninterrupted_run() {
    killed_mid_run("postgres", "postgres").await;
}

/// The same with local join state: the restarted labeler has nothing but its checkpoint
/// (segments written with each commit, snapshots among them) and the log after its offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labeler_with_local_state_killed_mid_run_restores_its_checkpoint() {
    killed_mid_run("local", "local").await;
}

/// A dataset whose state is in the Postgres store (the default before local state) continues
/// on local state after a restart: its state moves into memory, and the first checkpoint's
/// commit deletes it from Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_on_the_postgres_store_moves_to_local_state_at_a_restart() {
    killed_mid_run("postgres", "local").await;
}

/// Kills a labeler on `first` state store after its first commits, restarts it on `second`,
/// and compares the dataset with an uninterrupted run's.
async fn killed_mid_run(first: &str, second: &str) {
    let (scenario, cdc, events_topic) = prepared(11, 1200).await;
    let total = scenario.impressions.len() as i64;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = cdc.config.topics.prefix.clone();

    // Uninterrupted, in-process.
    let clean = format!("clean_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let clean_root = dir.path().join("clean");
    let spec = labeler::spec_file(dir.path(), &clean);
    let cfg = labeler::config(&cdc.registry, &spec, &events_topic, &prefix, &clean_root).await;
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(cfg, shutdown.clone())
        .await
        .expect("start");
    labeler::wait_rows(&control, &clean, total, Duration::from_secs(120)).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    let expected = rows_by_impression(&labeler::read_dataset(&clean_root, &clean));
    assert_eq!(expected.len() as i64, total);

    // The labeler binary, committing often, killed without warning after its first commits.
    let killed = format!("killed_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let killed_root = dir.path().join("killed");
    let spec = labeler::spec_file(dir.path(), &killed);
    let cfg = labeler::config(&cdc.registry, &spec, &events_topic, &prefix, &killed_root).await;
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    let config_file = |store: &str| {
        let file = dir.path().join(format!("labeler-{store}.toml"));
        std::fs::write(
        &file,
        format!(
            "[specs]\nfiles = [\"{spec}\"]\n[inputs]\nevents_topic = \"{events_topic}\"\ncdc_prefix = \"{prefix}\"\n\
             [datasets]\nroot = \"{root}\"\ncommit_interval_ms = 50\ncommit_max_rows = 100\n\
             [state]\nstore = \"{store}\"\n[kafka]\nbootstrap = \"{bootstrap}\"\n\
             [registry]\nurl = \"{registry}\"\nuser = \"{user}\"\npassword = \"{password}\"\n\
             [control]\nurl = \"{control}\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            root = killed_root.display(),
            bootstrap = infra().kafka_bootstrap,
            registry = cdc.registry.url,
            user = cdc.registry.user,
            password = cdc.registry.password,
            control = cfg.control.url.expose(),
        ),
    )
    .expect("config");
        file
    };
    let spawn = |store: &str| Service::spawn("labeler", &config_file(store), dir.path());
    let mut labeler = spawn(first);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = labeler::committed_rows(&control, &killed).await;
        if n > 0 {
            assert!(
                n < total,
                "the run finished before it could be killed ({n} rows)"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the labeler never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    labeler.kill();
    let _second = spawn(second);
    labeler::wait_rows(&control, &killed, total, Duration::from_secs(120)).await;
    let checkpoint: Option<String> =
        sqlx::query_scalar("SELECT checkpoint FROM labeler.positions WHERE dataset = $1")
            .bind(&killed)
            .fetch_one(&control)
            .await
            .expect("position");
    if second == "local" {
        let checkpoint: Value =
            serde_json::from_str(&checkpoint.expect("a checkpoint")).expect("checkpoint JSON");
        let segments = checkpoint["segments"].as_array().expect("segments");
        assert!(!segments.is_empty(), "{checkpoint}");
        for s in segments {
            let path = killed_root.join(s["path"].as_str().expect("path"));
            assert!(
                path.exists(),
                "checkpoint segment {} is missing",
                path.display()
            );
        }
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM labeler.impressions WHERE dataset = $1)
                  + (SELECT count(*) FROM labeler.outcomes WHERE dataset = $1)",
        )
        .bind(&killed)
        .fetch_one(&control)
        .await
        .expect("postgres state");
        assert_eq!(
            left, 0,
            "the state left the Postgres store once checkpointed"
        );
    } else {
        assert_eq!(checkpoint, None, "a shared store writes no checkpoint");
    }
    let got = rows_by_impression(&labeler::read_dataset(&killed_root, &killed));
    assert_eq!(got.len(), expected.len(), "no gaps, no duplicates");
    for (id, row) in &expected {
        let mut other = got
            .get(id)
            .cloned()
            .unwrap_or_else(|| panic!("impression {id} missing after the kill"));
        let mut mine = row.clone();
        // Partition placement and lineage offsets are the same; only file layout differs.
        for r in [&mut other, &mut mine] {
            if let Some(o) = r.as_object_mut() {
                o.remove("_partition");
            }
        }
        assert_eq!(other, mine, "row of impression {id} differs after the kill");
    }
    // Files of the interrupted commit were cleaned up: every Parquet file is in a manifest.
    let data = labeler::read_dataset(&killed_root, &killed);
    let listed: usize = data["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["files"].as_u64().unwrap_or(0) as usize)
        .sum();
    assert_eq!(
        parquet_files(&killed_root),
        listed,
        "stray files left by the killed run"
    );
    cdc.cleanup().await;
}

/// The reply to the COMMIT of a dataset commit is lost (a proxy lets the COMMIT reach Postgres
/// and drops the answer): the commit went through, so its files must stay. The labeler looks
/// the position up before deleting anything; without that it deleted the files the committed
/// manifest lists, and the dataset became unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_is_lost_keeps_its_files() {
    use feedloop_integration_tests::{
        TestRegistry, kafka, labeler::T0, pg_proxy::CommitReplyDropper,
    };
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
    let producer: FutureProducer = kafka()
        .client_config("ambiguous-commit-test")
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
            for (key, value) in labeler::encoded(&scenario, &schemas) {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            }
        }
    };
    let example = |viewer: &str, time: i64| {
        vec![
            labeler::Ev::Impression(labeler::Imp {
                event_id: uuid::Uuid::new_v4(),
                match_id: uuid::Uuid::new_v4(),
                viewer: viewer.into(),
                candidate: "bob".into(),
                time,
            }),
            labeler::Ev::Clock {
                id: uuid::Uuid::new_v4(),
                time: time + 2 * 86_400_000,
            },
        ]
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("a_{}", &id[8..16]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let mut cfg = labeler::config(&registry, &spec, &events_topic, &prefix, &root).await;
    let direct = cfg.control.url.expose().to_owned();
    let upstream = {
        let u = url::Url::parse(&direct).expect("url");
        tokio::net::lookup_host((u.host_str().expect("host"), u.port().unwrap_or(5432)))
            .await
            .expect("resolve")
            .next()
            .expect("address")
    };
    let proxy = CommitReplyDropper::start(upstream).await;
    cfg.control.url = feedloop_core::config::Secret::new(proxy.url(&direct));
    let control = PgPool::connect(&direct).await.expect("control");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(cfg, shutdown.clone())
        .await
        .expect("start");

    publish(example("ann", T0)).await;
    labeler::wait_rows(&control, &dataset, 1, Duration::from_secs(60)).await;
    proxy.arm();
    publish(example("cy", T0 + 3 * 86_400_000)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.dropped() == 0 {
        assert!(Instant::now() < deadline, "no COMMIT reply was dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    labeler::wait_rows(&control, &dataset, 2, Duration::from_secs(60)).await;
    // Whatever the labeler does after the lost reply (a restart included) has time to happen.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let data = labeler::read_dataset(&root, &dataset);
    let mut viewers: Vec<&str> = data["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["viewer_id"].as_str())
        .collect();
    viewers.sort_unstable();
    assert_eq!(viewers, ["ann", "cy"], "{data}");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

/// A labeler whose committed position is inside a record batch (a restart after a commit
/// made mid-batch): the embedded broker answers a fetch from there with the batches after it,
/// so without reading again from further back the rest of the batch is never read and its
/// examples never written. Reading again must not be taken for a lost log either: records of
/// the read a rewind replaced can come after it, and the labeler once reported those as "the
/// broker lost its log" and read their batch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labeler_resuming_inside_a_record_batch_reads_the_rest_of_it() {
    use feedloop_integration_tests::{TestRegistry, kafka, labeler::T0};
    use feedloop_labeler::{spec::LabelSpec, window::Compiled};
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
    let mut events: Vec<labeler::Ev> = (0..12)
        .map(|i| {
            labeler::Ev::Impression(labeler::Imp {
                event_id: uuid::Uuid::new_v4(),
                match_id: uuid::Uuid::new_v4(),
                viewer: format!("v{i}"),
                candidate: "bob".into(),
                time: T0 + i * 1_000,
            })
        })
        .collect();
    events.push(labeler::Ev::Clock {
        id: uuid::Uuid::new_v4(),
        time: T0 + 2 * 86_400_000,
    });
    let scenario = Scenario {
        events,
        rows: Vec::new(),
        impressions: Vec::new(),
    };
    // Three batches: six impressions, six more, and the clock.
    let producer: FutureProducer = kafka()
        .client_config("mid-batch-test")
        .set("linger.ms", "500")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    let encoded = labeler::encoded(&scenario, &schemas);
    for batch in encoded.chunks(6) {
        let mut sends = Vec::new();
        for (_, value) in batch {
            sends.push(
                producer
                    .send_result(FutureRecord::to(&events_topic).key("k").payload(value))
                    .unwrap_or_else(|(e, _)| panic!("enqueue: {e}")),
            );
        }
        for s in sends {
            s.await
                .expect("delivered")
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        }
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("m_{}", &id[8..16]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let mut cfg = labeler::config(&registry, &spec, &events_topic, &prefix, &root).await;
    // The refusal is a trigger on the Postgres state's table.
    cfg.state.store = feedloop_labeler::config::StoreKind::Postgres;
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    feedloop_core::postgres::migrate(&control)
        .await
        .expect("migrate");
    // As a run that committed after the first three records left it.
    let hash = Compiled::new(
        LabelSpec::parse(&spec, &std::fs::read_to_string(&spec).expect("spec")).expect("parse"),
    )
    .hash;
    sqlx::query(
        "INSERT INTO labeler.positions (dataset, spec_hash, seq, offsets, starts, watermarks,
                                        emitted_through_ms, emitted_through_id)
         VALUES ($1, $2, 0, $3, '{}', '{}', $4, 'ffffffff-ffff-ffff-ffff-ffffffffffff')",
    )
    .bind(&dataset)
    .bind(&hash)
    .bind(format!("{{\"{events_topic}/0\": 3}}"))
    .bind(i64::MIN)
    .execute(&control)
    .await
    .expect("position");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(cfg, shutdown.clone())
        .await
        .expect("start");
    labeler::wait_rows(&control, &dataset, 9, Duration::from_secs(60)).await;
    let data = labeler::read_dataset(&root, &dataset);
    let mut viewers: Vec<&str> = data["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["viewer_id"].as_str())
        .collect();
    viewers.sort_unstable();
    assert_eq!(
        viewers,
        ["v10", "v11", "v3", "v4", "v5", "v6", "v7", "v8", "v9"],
        "{data}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", running.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    // Other tests' labelers report to the same recorder: this dataset's series only.
    let label = format!("dataset=\"{dataset}\"");
    let mine: Vec<&str> = metrics.lines().filter(|l| l.contains(&label)).collect();
    let of_dataset = |name: &str| feedloop::demo::report::metric_sum(&mine.join("\n"), name);
    assert!(
        of_dataset("feedloop_labeler_offset_rewinds_total") > 0.0,
        "the read started inside the batch and was not read again: {metrics}"
    );
    assert_eq!(
        of_dataset("feedloop_labeler_log_resets_total"),
        0.0,
        "reading the batch again was reported as a lost log"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

/// The join state refuses one impression (a trigger raises SQLSTATE 22023 for its user), which
/// fails every flush of the batch it is in: no single record is to blame, so the labeler used to
/// restart from the last commit forever. After two such failures it flushes after every record,
/// pins the failure on that impression, dead-letters it after three strikes, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_join_state_refuses_is_found_and_dead_lettered() {
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
    let mut events: Vec<labeler::Ev> = ["a", "refused-user", "b"]
        .iter()
        .enumerate()
        .map(|(i, viewer)| {
            labeler::Ev::Impression(labeler::Imp {
                event_id: uuid::Uuid::new_v4(),
                match_id: uuid::Uuid::new_v4(),
                viewer: (*viewer).into(),
                candidate: "bob".into(),
                time: T0 + i as i64 * 1_000,
            })
        })
        .collect();
    events.push(labeler::Ev::Clock {
        id: uuid::Uuid::new_v4(),
        time: T0 + 2 * 86_400_000,
    });
    let scenario = Scenario {
        events,
        rows: Vec::new(),
        impressions: Vec::new(),
    };
    let producer: FutureProducer = kafka()
        .client_config("refused-test")
        .create()
        .expect("producer");
    for (_, value) in labeler::encoded(&scenario, &schemas) {
        producer
            .send(
                FutureRecord::to(&events_topic).key("k").payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = format!("r_{}", &id[8..16]);
    let spec = labeler::spec_file(dir.path(), &dataset);
    let root = dir.path().join("datasets");
    let mut cfg = labeler::config(&registry, &spec, &events_topic, &prefix, &root).await;
    // The refusal is a trigger on the Postgres state's table.
    cfg.state.store = feedloop_labeler::config::StoreKind::Postgres;
    let control = PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    feedloop_core::postgres::migrate(&control)
        .await
        .expect("migrate");
    sqlx::raw_sql(
        "CREATE FUNCTION labeler.refuse_one() RETURNS trigger AS $$
         BEGIN
           IF 'refused-user' = ANY(NEW.users) THEN
             RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023';
           END IF;
           RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse_one BEFORE INSERT OR UPDATE ON labeler.impressions
           FOR EACH ROW EXECUTE FUNCTION labeler.refuse_one();",
    )
    .execute(&control)
    .await
    .expect("trigger");
    let shutdown = CancellationToken::new();
    let running = feedloop_labeler::start(cfg, shutdown.clone())
        .await
        .expect("start");
    labeler::wait_rows(&control, &dataset, 2, Duration::from_secs(90)).await;
    let data = labeler::read_dataset(&root, &dataset);
    let mut viewers: Vec<&str> = data["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["viewer_id"].as_str())
        .collect();
    viewers.sort_unstable();
    assert_eq!(viewers, ["a", "b"], "{data}");
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
    assert_eq!(
        letters.len(),
        1,
        "the refused impression, dead-lettered once"
    );
    assert_eq!(letters[0].source_offset, Some(1));
    assert!(
        letters[0].detail.contains("refused by the test"),
        "{}",
        letters[0].detail
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}
