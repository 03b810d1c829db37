//! The collector loses no acknowledged event: with the broker frozen under load, and with the
//! collector killed mid-load and restarted.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use feedloop::dev::{BrokerProcess, Storage};
use feedloop_core::{
    catalogue::{EVENTS_TOPIC, TOPICS},
    kafka::{KafkaConfig, ensure_topics},
};
use feedloop_integration_tests::{
    TestRegistry, WRITE_KEY, collector_config, events, log::read_all, service::Service,
};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Event ids the load generator got a 2xx for, and how many batches it sent.
#[derive(Debug, Default)]
struct Ledger {
    acked: HashSet<Uuid>,
    spooled_batches: usize,
    batches: usize,
}

/// Posts batches of 10 events in a loop until `stop`; a batch that fails (connection refused,
/// 5xx) is retried unchanged until it gets a 2xx, as a mobile client would.
async fn load(url: String, user: String, ledger: Arc<Mutex<Ledger>>, stop: CancellationToken) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    while !stop.is_cancelled() {
        let mut batch: Vec<Value> = (0..10)
            .map(|i| {
                let m = Uuid::now_v7();
                if i % 2 == 0 {
                    events::impression(&user, m)
                } else {
                    events::decision(&user, m, i % 3 == 0)
                }
            })
            .collect();
        loop {
            let sent = http
                .post(format!("{url}/v1/events"))
                .basic_auth(WRITE_KEY, Some(""))
                .json(&json!(batch))
                .send()
                .await;
            if let Ok(resp) = sent
                && resp.status() == StatusCode::OK
                && let Ok(body) = resp.json::<Value>().await
            {
                let mut l = ledger.lock().expect("ledger");
                l.batches += 1;
                if body["durability"] == "spooled" {
                    l.spooled_batches += 1;
                }
                let mut retry = Vec::new();
                for (e, r) in batch
                    .iter()
                    .zip(body["results"].as_array().into_iter().flatten())
                {
                    match r["status"].as_str() {
                        Some("accepted" | "duplicate") => {
                            l.acked.insert(events::id(e));
                        }
                        // Claimed by a request still in flight: ask again later.
                        _ if r["retryable"] == true => retry.push(e.clone()),
                        _ => panic!("unexpected result {r}"),
                    }
                }
                if retry.is_empty() {
                    break;
                }
                batch = retry;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the collector at `url` has an empty spool and publishes directly again.
async fn wait_drained(url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let http = reqwest::Client::new();
    loop {
        let probe = http
            .post(format!("{url}/v1/events"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!([]))
            .send()
            .await;
        let metrics = http.get(format!("{url}/metrics")).send().await;
        if let (Ok(probe), Ok(metrics)) = (probe, metrics) {
            let acked = probe
                .json::<Value>()
                .await
                .is_ok_and(|b| b["durability"] == "acked");
            let text = metrics.text().await.unwrap_or_default();
            let empty = text
                .lines()
                .any(|l| l == "feedloop_collector_spool_depth_records 0");
            if acked && empty {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the spool did not drain in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts every acknowledged id is in the topic exactly once.
async fn assert_exactly_once(bootstrap: &str, ledger: &Ledger) {
    let mut count: HashMap<Uuid, usize> = HashMap::new();
    for r in read_all(bootstrap, EVENTS_TOPIC).await {
        if let Some(id) = r.event_id {
            *count.entry(id).or_default() += 1;
        }
    }
    let missing: Vec<&Uuid> = ledger
        .acked
        .iter()
        .filter(|id| !count.contains_key(id))
        .collect();
    let doubled: Vec<(&Uuid, &usize)> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events missing",
        missing.len(),
        ledger.acked.len()
    );
    assert!(
        doubled.is_empty(),
        "{} events published more than once",
        doubled.len()
    );
}

async fn own_broker() -> BrokerProcess {
    let broker = BrokerProcess::start(Storage::Memory).await.expect("tansu");
    ensure_topics(&KafkaConfig::new(broker.bootstrap()), TOPICS)
        .await
        .expect("topics");
    broker
}

#[tokio::test]
async fn broker_frozen_for_20s_under_load_loses_nothing() {
    let broker = own_broker().await;
    let registry = TestRegistry::start().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let config = collector_config(&registry, &broker.bootstrap(), spool.path()).await;
    let shutdown = CancellationToken::new();
    let running = feedloop_collector::start(config, shutdown.clone())
        .await
        .expect("collector");
    let url = format!("http://{}", running.addr);
    wait_drained(&url, Duration::from_secs(60)).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let loaders: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(load(
                url.clone(),
                format!("pause-{i}"),
                ledger.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.signal(Signal::SIGSTOP).expect("SIGSTOP");
    tokio::time::sleep(Duration::from_secs(20)).await;
    broker.signal(Signal::SIGCONT).expect("SIGCONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    for l in loaders {
        l.await.expect("load task");
    }
    wait_drained(&url, Duration::from_secs(90)).await;
    let ledger = std::mem::take(&mut *ledger.lock().expect("ledger"));
    assert!(
        ledger.spooled_batches > 0,
        "the pause should have sent batches to the spool"
    );
    assert!(
        ledger.acked.len() > 200,
        "too little load: {}",
        ledger.acked.len()
    );
    assert_exactly_once(&broker.bootstrap(), &ledger).await;
    shutdown.cancel();
    let _ = running.task.await;
}

#[tokio::test]
async fn collector_killed_mid_load_and_restarted_keeps_every_acknowledged_event_once() {
    let broker = own_broker().await;
    let registry = TestRegistry::start().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let port = feedloop::dev::process::free_port().expect("port");
    let mut config = collector_config(&registry, &broker.bootstrap(), spool.path()).await;
    config.http.listen = format!("127.0.0.1:{port}");
    let url = format!("http://127.0.0.1:{port}");
    let file = spool.path().join("collector.toml");
    std::fs::write(
        &file,
        format!(
            r#"[http]
listen = "{listen}"
[kafka]
bootstrap = "{bootstrap}"
[registry]
url = "{registry}"
user = "{user}"
password = "{password}"
[postgres]
url = "{postgres}"
[auth.apps.test-app]
keys = ["{key}"]
[spool]
dir = "{spool}"
ack_timeout_ms = 1000
[keys]
kek = "{kek}"
[log]
json = true
"#,
            kek = config.keys.kek.expose(),
            listen = config.http.listen,
            bootstrap = config.kafka.bootstrap,
            registry = registry.url,
            user = registry.user,
            password = registry.password,
            postgres = config.postgres.url.expose(),
            key = WRITE_KEY,
            spool = spool.path().join("data").display(),
        ),
    )
    .expect("config file");
    let spawn = || Service::spawn("collector", &file, spool.path());
    let mut first = spawn();
    wait_drained(&url, Duration::from_secs(60)).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let loaders: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(load(
                url.clone(),
                format!("kill-{i}"),
                ledger.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Freeze the broker so that the spool fills, then kill the collector mid-load.
    broker.signal(Signal::SIGSTOP).expect("SIGSTOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    first.kill();
    broker.signal(Signal::SIGCONT).expect("SIGCONT");
    let _second = spawn();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.cancel();
    for l in loaders {
        l.await.expect("load task");
    }
    wait_drained(&url, Duration::from_secs(90)).await;
    let ledger = std::mem::take(&mut *ledger.lock().expect("ledger"));
    assert!(
        ledger.spooled_batches > 0,
        "the frozen broker should have sent batches to the spool"
    );
    assert_exactly_once(&broker.bootstrap(), &ledger).await;
}

#[tokio::test]
async fn a_full_spool_answers_503_with_retry_after_and_is_not_ready() {
    let broker = own_broker().await;
    let registry = TestRegistry::start().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let mut config = collector_config(&registry, &broker.bootstrap(), spool.path()).await;
    config.spool.max_bytes = 64 * 1024;
    config.spool.ack_timeout_ms = 300;
    let shutdown = CancellationToken::new();
    let running = feedloop_collector::start(config, shutdown.clone())
        .await
        .expect("collector");
    let url = format!("http://{}", running.addr);
    wait_drained(&url, Duration::from_secs(60)).await;
    broker.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let http = reqwest::Client::new();
    let mut acked = Ledger::default();
    let mut refused = None;
    for _ in 0..200 {
        let batch: Vec<Value> = (0..10)
            .map(|_| events::impression("full", Uuid::now_v7()))
            .collect();
        let resp = http
            .post(format!("{url}/v1/events"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!(batch))
            .send()
            .await
            .expect("answered");
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        acked.acked.extend(batch.iter().map(events::id));
    }
    let refused = refused.expect("the spool filled up");
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "spool_full");
    let ready = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Back online: everything acknowledged before the refusal lands, once.
    broker.signal(Signal::SIGCONT).expect("SIGCONT");
    wait_drained(&url, Duration::from_secs(90)).await;
    assert_exactly_once(&broker.bootstrap(), &acked).await;
    shutdown.cancel();
    let _ = running.task.await;
}
