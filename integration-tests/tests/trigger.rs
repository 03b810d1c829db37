//! The trigger against stand-ins for Airflow, Dagster and a webhook (a local HTTP server that
//! records every request and answers as scripted): nothing fires while the policy is unmet;
//! once it is met, one decision reaches `feedloop.retrain` and every sink in the exact request
//! shapes, through 500s and timeouts; the pull API pages by cursor while partitions are being
//! committed; and a trigger killed mid-delivery delivers once after a restart.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, StatusCode, Uri},
};
use feedloop_core::{
    avro::CompiledSchema,
    catalogue::{Catalogue, PARTITIONS_TOPIC, RETRAIN_TOPIC},
    config::Secret,
};
use feedloop_integration_tests::{
    TestRegistry, fresh_database, infra, kafka, log::read_all, service::Service,
};
use feedloop_labeler::dataset::Manifest;
use feedloop_trigger::{
    config::{SinkConfig, SinkKind, WebhookMode},
    policy::Policy,
};
use hmac::{Hmac, Mac};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "trigger-token-for-tests-0123456789";
const HMAC_SECRET: &str = "webhook-secret-0123456789";

/// How the stand-in answers the next request to a path.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Waits this long, then answers 200 (longer than the sink's timeout: a timeout).
    Slow(Duration),
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// A scheduler stand-in: records requests, answers from a script per path (200 when the
/// script is empty), and, like an idempotent receiver, accepts each idempotency key once.
#[derive(Debug, Clone, Default)]
struct StandIn {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<HashMap<String, VecDeque<Answer>>>>,
    accepted: Arc<Mutex<Vec<String>>>,
}

impl StandIn {
    async fn start() -> (Self, SocketAddr) {
        let me = Self::default();
        let state = me.clone();
        let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move { state.answer(uri, headers, body).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (me, addr)
    }

    fn script(&self, path: &str, answers: &[Answer]) {
        self.script
            .lock()
            .expect("lock")
            .insert(path.to_owned(), answers.iter().copied().collect());
    }

    async fn answer(&self, uri: Uri, headers: HeaderMap, body: Bytes) -> axum::response::Response {
        use axum::response::IntoResponse;
        let path = uri.path().to_owned();
        let seen = Seen {
            path: path.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: body.to_vec(),
        };
        let key = seen.header("idempotency-key").to_owned();
        self.seen.lock().expect("lock").push(seen);
        let next = self
            .script
            .lock()
            .expect("lock")
            .get_mut(&path)
            .and_then(VecDeque::pop_front);
        match next {
            Some(Answer::Status(code)) => {
                return StatusCode::from_u16(code)
                    .unwrap_or(StatusCode::OK)
                    .into_response();
            }
            Some(Answer::Slow(d)) => tokio::time::sleep(d).await,
            None => {}
        }
        // Airflow 3 hands out a JWT.
        if path.ends_with("/auth/token") {
            return axum::Json(serde_json::json!({"access_token": "jwt-from-airflow"}))
                .into_response();
        }
        let mut accepted = self.accepted.lock().expect("lock");
        if !accepted.contains(&key) {
            accepted.push(key);
        }
        StatusCode::OK.into_response()
    }

    fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

struct Partitions {
    schema: Arc<CompiledSchema>,
    producer: FutureProducer,
}

impl Partitions {
    async fn new(registry: &TestRegistry) -> Self {
        let client = registry.client();
        let catalogue = Catalogue::embedded().expect("catalogue");
        let schema = client
            .register_compiled(
                &format!("{PARTITIONS_TOPIC}-value"),
                &catalogue
                    .composed("io.feedloop.datasets.DatasetPartition")
                    .expect("schema"),
            )
            .await
            .expect("register");
        let producer = kafka()
            .client_config("trigger-test")
            .create()
            .expect("producer");
        Self { schema, producer }
    }

    /// Publishes a committed partition version, as the labeler announces it.
    async fn commit(&self, dataset: &str, partition: &str, version: i32, rows: i64) -> Manifest {
        let positive = rows / 4;
        let m = Manifest {
            dataset: dataset.to_owned(),
            partition: partition.to_owned(),
            version,
            manifest_uri: format!("file:///data/{dataset}/{partition}/_manifest.v{version}.json"),
            files: vec![],
            schema_id: 1,
            row_count: rows,
            byte_size: rows * 100,
            event_time_min: 1_795_000_000_000,
            event_time_max: 1_795_000_000_000,
            sources: vec![],
            label_spec_hash: "h".into(),
            label_counts: BTreeMap::from([
                ("positive".to_owned(), positive),
                ("negative".to_owned(), rows - positive),
            ]),
            examples: rows,
            late_data: Default::default(),
            erasure_epoch: 0,
            supersedes_version: (version > 1).then_some(version - 1),
            committed_at: feedloop_integration_tests::events::now_ms(),
        };
        let mut value = Vec::new();
        self.schema.encode(&m, &mut value).expect("encode");
        self.producer
            .send(
                FutureRecord::to(PARTITIONS_TOPIC)
                    .key(dataset)
                    .payload(&value),
                Duration::from_secs(30),
            )
            .await
            .expect("published");
        m
    }
}

fn sink(name: &str, kind: SinkKind, url: String) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind,
        url,
        datasets: vec!["*".into()],
        timeout_ms: 1000,
        user: None,
        password: None,
        bearer_token: None,
        airflow_version: 2,
        dataset_uri: "feedloop://datasets/{dataset}".into(),
        asset_id: None,
        asset_key: "feedloop/{dataset}".into(),
        mode: WebhookMode::Structured,
        hmac_secret: None,
        ca: String::new(),
    }
}

async fn config(
    registry: &TestRegistry,
    dataset: &str,
    sinks: Vec<SinkConfig>,
) -> feedloop_trigger::Config {
    let mut cfg = feedloop_trigger::Config::from_defaults().expect("defaults");
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.auth.token = Secret::new(TOKEN);
    cfg.trigger.consumer_group = format!("trigger-test-{}", uuid::Uuid::new_v4().simple());
    cfg.trigger.evaluate_interval_ms = 200;
    cfg.trigger.deliver_interval_ms = 100;
    cfg.trigger.delivery_max_elapsed_ms = 60_000;
    cfg.trigger.delivery_lease_ms = 3000;
    // Only this test's dataset has a policy: other tests' partitions share the topic.
    cfg.policies = BTreeMap::from([(
        dataset.to_owned(),
        Policy {
            min_new_rows: 100,
            max_staleness_s: 0,
            psi_threshold: 0.0,
            psi_min_rows: 0,
            cooldown_s: 0,
        },
    )]);
    cfg.sinks = sinks;
    cfg.kafka.bootstrap = infra().kafka_bootstrap;
    cfg.registry.url = registry.url.clone();
    cfg.registry.user = registry.user.clone();
    cfg.registry.password = Secret::new(registry.password.clone());
    cfg.control.url = Secret::new(fresh_database().await);
    cfg.log.json = false;
    cfg.validate().expect("config");
    cfg
}

async fn get(url: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

/// Waits until `check` holds on the dataset's triggers.
async fn wait_triggers(
    base: &str,
    dataset: &str,
    within: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let t = get(&format!("{base}/v1/triggers?dataset={dataset}")).await;
        if check(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "triggers never satisfied the check: {t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every delivery of every trigger is over: delivered, or failed for good.
fn all_settled(t: &Value) -> bool {
    t["triggers"].as_array().is_some_and(|list| {
        !list.is_empty()
            && list.iter().all(|x| {
                x["deliveries"].as_array().is_some_and(|d| {
                    d.iter()
                        .all(|d| d["status"] == "delivered" || d["status"] == "failed")
                })
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_fire_once_the_policy_is_met_and_reach_every_sink_through_failures() {
    let registry = TestRegistry::start().await;
    let (stand_in, addr) = StandIn::start().await;
    let dataset = format!("tr_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut airflow = sink(
        "airflow",
        SinkKind::Airflow,
        format!("http://{addr}/airflow"),
    );
    airflow.user = Some("admin".into());
    airflow.password = Some(Secret::new("pw"));
    let mut dagster = sink(
        "dagster",
        SinkKind::Dagster,
        format!("http://{addr}/dagster"),
    );
    dagster.bearer_token = Some(Secret::new("dagster-token"));
    let mut webhook = sink("hook", SinkKind::Webhook, format!("http://{addr}/hook"));
    webhook.mode = WebhookMode::Binary;
    webhook.hmac_secret = Some(Secret::new(HMAC_SECRET));
    let mut structured = sink("hook2", SinkKind::Webhook, format!("http://{addr}/hook2"));
    structured.datasets = vec![dataset.clone()];
    let mut airflow3 = sink("airflow3", SinkKind::Airflow, format!("http://{addr}/af3"));
    airflow3.airflow_version = 3;
    airflow3.asset_id = Some(42);
    airflow3.user = Some("admin".into());
    airflow3.password = Some(Secret::new("pw3"));
    // A sink that refuses the request (wrong URL): failed at once, with the error visible.
    let broken = sink("broken", SinkKind::Webhook, format!("http://{addr}/gone"));
    let mut elsewhere = sink(
        "elsewhere",
        SinkKind::Webhook,
        format!("http://{addr}/other"),
    );
    elsewhere.datasets = vec!["another_dataset".into()];
    let cfg = config(
        &registry,
        &dataset,
        vec![
            airflow, dagster, webhook, structured, airflow3, broken, elsewhere,
        ],
    )
    .await;
    stand_in.script("/gone", &[Answer::Status(404)]);
    // Airflow fails twice with 500, Dagster's first answer comes after the sink's timeout.
    stand_in.script(
        "/airflow/api/v1/datasets/events",
        &[Answer::Status(500), Answer::Status(503)],
    );
    stand_in.script(
        "/dagster/report_asset_materialization/",
        &[Answer::Slow(Duration::from_secs(3))],
    );
    let shutdown = CancellationToken::new();
    let running = feedloop_trigger::start(cfg, shutdown.clone())
        .await
        .expect("trigger starts");
    let base = format!("http://{}", running.addr);
    let parts = Partitions::new(&registry).await;

    // 60 rows: under min_new_rows = 100, nothing fires.
    parts.commit(&dataset, "dt=2026-11-28/hour=10", 1, 60).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ds = get(&format!("{base}/v1/datasets")).await;
        if ds["datasets"]
            .as_array()
            .is_some_and(|l| l.iter().any(|d| d["name"] == dataset.as_str()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the partition never reached the catalogue"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let none = get(&format!("{base}/v1/triggers?dataset={dataset}")).await;
    assert_eq!(none["triggers"], serde_json::json!([]), "fired while unmet");
    assert!(stand_in.seen.lock().expect("lock").is_empty());

    // Another partition adds 10 rows (70 new: still unmet), then a new version of the first
    // one adds 70 (130 in all), which meets the policy with 140. In the other order the
    // trigger may decide on 130 before the 10 arrive (it did once in a full run).
    let other = parts.commit(&dataset, "dt=2026-11-28/hour=11", 1, 10).await;
    let v2 = parts
        .commit(&dataset, "dt=2026-11-28/hour=10", 2, 130)
        .await;
    let triggers = wait_triggers(&base, &dataset, Duration::from_secs(90), all_settled).await;
    let list = triggers["triggers"].as_array().expect("list");
    assert_eq!(list.len(), 1, "one decision: {triggers}");
    let t = &list[0];
    let id = t["id"].as_str().expect("id").to_owned();
    assert_eq!(t["rule"], "min_new_rows");
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|r| r.contains("140 new rows")),
        "{t}"
    );
    let deliveries: BTreeMap<String, Value> = t["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| (d["sink"].as_str().unwrap_or_default().to_owned(), d.clone()))
        .collect();
    assert_eq!(
        deliveries.keys().cloned().collect::<Vec<_>>(),
        [
            "airflow", "airflow3", "broken", "dagster", "hook", "hook2", "kafka"
        ],
        "every sink that wants the dataset, and only those"
    );
    for (sink, d) in &deliveries {
        if sink == "broken" {
            assert_eq!(d["status"], "failed", "{d}");
            assert_eq!(d["attempts"], 1, "a 404 is not retried: {d}");
            assert!(
                d["last_error"].as_str().is_some_and(|e| e.contains("404")),
                "{d}"
            );
        } else {
            assert_eq!(d["status"], "delivered", "{sink}: {d}");
        }
    }
    assert_eq!(
        deliveries["airflow"]["attempts"], 3,
        "two 500s, then delivered"
    );
    assert!(
        deliveries["dagster"]["attempts"].as_i64() >= Some(2),
        "a timeout, then delivered"
    );

    // Airflow 2: POST /api/v1/datasets/events {dataset_uri, extra}, basic auth, idempotency key.
    let af = stand_in.requests("/airflow/api/v1/datasets/events");
    assert_eq!(af.len(), 3);
    let body = af[2].json();
    assert_eq!(
        body["dataset_uri"],
        format!("feedloop://datasets/{dataset}")
    );
    assert_eq!(body["extra"]["feedloop_decision_id"], id.as_str());
    assert_eq!(
        body["extra"]["manifest_uris"],
        serde_json::json!([v2.manifest_uri, other.manifest_uri])
    );
    assert_eq!(body["extra"]["row_count"], 140);
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(2),
        "only dataset_uri and extra: {body}"
    );
    assert!(af[2].header("authorization").starts_with("Basic "));
    assert!(af.iter().all(|r| r.header("idempotency-key") == id));

    // Airflow 3: a JWT from /auth/token, then POST /api/v2/assets/events {asset_id, extra}.
    let token = stand_in.requests("/af3/auth/token");
    assert_eq!(
        token[0].json(),
        serde_json::json!({"username": "admin", "password": "pw3"})
    );
    let af3 = stand_in.requests("/af3/api/v2/assets/events");
    assert_eq!(af3.len(), 1);
    assert_eq!(af3[0].json()["asset_id"], 42);
    assert_eq!(af3[0].json()["extra"]["feedloop_decision_id"], id.as_str());
    assert_eq!(af3[0].header("authorization"), "Bearer jwt-from-airflow");
    assert!(stand_in.requests("/other").is_empty());

    // Dagster: one report per partition, with the asset key, partition and metadata.
    let dg = stand_in.requests("/dagster/report_asset_materialization/");
    let reported: HashSet<String> = dg
        .iter()
        .map(|r| {
            r.json()["partition"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        reported,
        HashSet::from([
            "dt=2026-11-28/hour=10".to_owned(),
            "dt=2026-11-28/hour=11".to_owned()
        ])
    );
    let last = dg.last().expect("dagster").json();
    assert_eq!(last["asset_key"], format!("feedloop/{dataset}"));
    assert!(
        last["metadata"]["manifest_uri"]
            .as_str()
            .is_some_and(|u| u.ends_with(".json"))
    );
    assert_eq!(last["metadata"]["feedloop_decision_id"], id.as_str());
    assert_eq!(dg[0].header("authorization"), "Bearer dagster-token");

    // Webhook, binary mode: ce-* headers, the data as the body, signed.
    let hook = stand_in.requests("/hook");
    assert_eq!(hook.len(), 1);
    let h = &hook[0];
    assert_eq!(h.header("ce-id"), id);
    assert_eq!(h.header("ce-specversion"), "1.0");
    assert_eq!(h.header("ce-type"), "io.feedloop.retrain.requested");
    assert_eq!(h.header("ce-source"), "/feedloop/trigger");
    assert_eq!(h.header("ce-subject"), dataset);
    assert_eq!(h.json()["dataset"], dataset.as_str());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).expect("mac");
    mac.update(&h.body);
    assert_eq!(
        h.header("x-feedloop-signature"),
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    // Webhook, structured mode: the whole CloudEvent.
    let hook2 = stand_in.requests("/hook2");
    assert_eq!(hook2.len(), 1);
    assert!(
        hook2[0]
            .header("content-type")
            .starts_with("application/cloudevents+json")
    );
    let ce = hook2[0].json();
    assert_eq!(ce["id"], id.as_str());
    assert_eq!(ce["specversion"], "1.0");
    assert!(ce["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(ce["data"]["rule"], "min_new_rows");

    // feedloop.retrain: the same event, in Avro.
    let records = read_all(&infra().kafka_bootstrap, RETRAIN_TOPIC).await;
    let mine: Vec<_> = records
        .iter()
        .filter(|r| r.header("event_id") == Some(id.as_str()))
        .collect();
    assert_eq!(mine.len(), 1);
    let decoded: Value = registry
        .client()
        .decode(&mine[0].value)
        .await
        .expect("avro");
    assert_eq!(decoded["data"]["dataset"], dataset.as_str());
    assert_eq!(
        decoded["data"]["partitions"].as_array().map(Vec::len),
        Some(2)
    );

    // Nothing more is pending: no second trigger.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = get(&format!("{base}/v1/triggers?dataset={dataset}")).await;
    assert_eq!(again["triggers"].as_array().map(Vec::len), Some(1));

    // The pull API pages by cursor while partitions are being committed.
    let writer = {
        let dataset = dataset.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                parts
                    .commit(&dataset, &format!("dt=2026-11-29/hour={i:02}"), 1, 5)
                    .await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 23 {
        let page = get(&format!(
            "{base}/v1/datasets/{dataset}/partitions?limit=3&after={cursor}"
        ))
        .await;
        let items = page["partitions"].as_array().expect("page").clone();
        assert!(items.len() <= 3);
        for it in &items {
            seen.push((
                it["cursor"]
                    .as_str()
                    .unwrap_or_default()
                    .parse::<i64>()
                    .unwrap_or(-1),
                it["partition"].as_str().unwrap_or_default().to_owned(),
                it["version"].as_i64().unwrap_or(0),
            ));
        }
        cursor = page["next_cursor"].as_str().expect("cursor").to_owned();
        assert!(Instant::now() < deadline, "paged {} of 23", seen.len());
        if items.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    writer.await.expect("writer");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "cursors increase");
    let distinct: HashSet<_> = seen.iter().map(|s| (s.1.clone(), s.2)).collect();
    assert_eq!(distinct.len(), 23, "no duplicate, no gap");
    assert!(
        distinct.contains(&("dt=2026-11-28/hour=10".to_owned(), 2)),
        "versions show"
    );

    // Auth and validation.
    let anonymous = reqwest::get(format!("{base}/v1/datasets"))
        .await
        .expect("send");
    assert_eq!(anonymous.status(), 401);
    for bad in [
        "limit=0",
        "limit=100000",
        "after=-1",
        "after=abc",
        "surprise=1",
    ] {
        let r = reqwest::Client::new()
            .get(format!("{base}/v1/datasets/{dataset}/partitions?{bad}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{bad}");
    }
    let unknown = reqwest::Client::new()
        .get(format!("{base}/v1/datasets/nope_{dataset}/partitions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(unknown.status(), 404);

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_killed_mid_delivery_delivers_once_after_a_restart() {
    let registry = TestRegistry::start().await;
    let (stand_in, addr) = StandIn::start().await;
    let dataset = format!("tk_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut hook = sink("hook", SinkKind::Webhook, format!("http://{addr}/hook"));
    hook.timeout_ms = 20_000;
    let cfg = config(&registry, &dataset, vec![hook]).await;
    // The first delivery hangs until the trigger is killed.
    stand_in.script("/hook", &[Answer::Slow(Duration::from_secs(15))]);
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("trigger.toml");
    std::fs::write(
        &file,
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\ntoken = \"{TOKEN}\"\n\
             [trigger]\nconsumer_group = \"{group}\"\nevaluate_interval_ms = 200\ndeliver_interval_ms = 100\ndelivery_lease_ms = 2000\n\
             [policies]\n\"*\" = {{ min_new_rows = 1000000000 }}\n\"{dataset}\" = {{ min_new_rows = 10 }}\n\
             [[sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"http://{addr}/hook\"\ntimeout_ms = 20000\n\
             [kafka]\nbootstrap = \"{bootstrap}\"\n\
             [registry]\nurl = \"{registry}\"\nuser = \"{user}\"\npassword = \"{password}\"\n\
             [control]\nurl = \"{control}\"\n[log]\njson = false\n",
            group = cfg.trigger.consumer_group,
            bootstrap = infra().kafka_bootstrap,
            registry = registry.url,
            user = registry.user,
            password = registry.password,
            control = cfg.control.url.expose(),
        ),
    )
    .expect("config");
    let parts = Partitions::new(&registry).await;
    parts.commit(&dataset, "dt=2026-11-28/hour=01", 1, 50).await;
    let mut first = Service::spawn("trigger", &file, dir.path());
    let deadline = Instant::now() + Duration::from_secs(90);
    while stand_in.requests("/hook").is_empty() {
        assert!(Instant::now() < deadline, "the delivery never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill();
    let _second = Service::spawn("trigger", &file, dir.path());
    let control = sqlx::PgPool::connect(cfg.control.url.expose())
        .await
        .expect("control");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM trigger.deliveries WHERE sink = 'hook'")
                .fetch_optional(&control)
                .await
                .expect("status");
        if status.as_deref() == Some("delivered") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never delivered after the restart: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let decisions: i64 = sqlx::query_scalar("SELECT count(*) FROM trigger.decisions")
        .fetch_one(&control)
        .await
        .expect("count");
    assert_eq!(decisions, 1, "the restart decided nothing twice");
    let requests = stand_in.requests("/hook");
    let ids: HashSet<String> = requests
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one decision id in every request");
    assert!(
        requests.len() >= 2,
        "the interrupted delivery was made again"
    );
    assert_eq!(
        stand_in.accepted.lock().expect("lock").len(),
        1,
        "one delivery per decision at an idempotent receiver"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.header("idempotency-key") == ids.iter().next().map_or("", String::as_str))
    );
}
