//! The whole pipeline with every service in a process of its own (so that each can be killed),
//! on a Postgres cluster and a tansu broker of its own (so that they can be paused and
//! restarted), configured through files as an operator would.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use feedloop::dev::{BrokerProcess, PgCluster, Storage, stack::create_product_database};
use feedloop_core::{
    catalogue::{Catalogue, TOPICS},
    config::Secret,
    kafka::{KafkaConfig, ensure_topics},
    registry_client::RegistryClient,
};
use feedloop_integration_tests::service::Service;
use serde_json::{Value, json};

/// The services, in the order they start.
pub const SERVICES: [&str; 6] = [
    "registry",
    "collector",
    "cdc",
    "labeler",
    "eraser",
    "trigger",
];
/// The dataset of the labeler's example spec, which the simulated world fills.
pub use feedloop::demo::DATASET;
/// Bytes the collector may spool while the broker is away: small enough that a 30 s pause
/// under the suite's load fills it (the phones are then told 503 and retry).
pub const SPOOL_MAX_BYTES: u64 = 512 << 10;

pub struct ProcessStack {
    /// First, so that the services stop (and print their logs' ends, in a failing test) before
    /// the directory with those logs goes.
    running: BTreeMap<&'static str, Service>,
    pub pg: PgCluster,
    pub broker: BrokerProcess,
    pub dir: tempfile::TempDir,
    pub token: String,
    pub write_key: String,
    pub product_url: String,
    pub datasets_root: PathBuf,
    ports: BTreeMap<&'static str, u16>,
    configs: BTreeMap<&'static str, PathBuf>,
    /// Services that exited without being killed, and how: [`recovery`](Self::recovery)
    /// starts them again, as a supervisor (Kubernetes, systemd) would.
    pub exits: Vec<(&'static str, String)>,
}

impl Drop for ProcessStack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test keeps the logs, datasets and spool to look at.
            self.dir.disable_cleanup(true);
            eprintln!(
                "fault suite: work directory kept in {}",
                self.dir.path().display()
            );
        }
    }
}

fn port() -> u16 {
    feedloop::dev::process::free_port().expect("a free port")
}

impl ProcessStack {
    /// Starts Postgres, the broker (with the catalogue's topics) and every service, the
    /// trigger delivering to the webhook at `hook_url`; returns once all are ready.
    pub async fn up(hook_url: &str) -> Self {
        let pg = PgCluster::start().await.expect("postgres");
        let broker = BrokerProcess::start(Storage::Memory).await.expect("tansu");
        ensure_topics(&KafkaConfig::new(broker.bootstrap()), TOPICS)
            .await
            .expect("topics");
        let product_url = create_product_database(&pg.url())
            .await
            .expect("product database");
        let dir = tempfile::Builder::new()
            .prefix("feedloop-faults-")
            .tempdir()
            .expect("work dir");
        let ports: BTreeMap<&'static str, u16> = SERVICES.iter().map(|s| (*s, port())).collect();
        let mut stack = Self {
            token: format!("admin-{}", uuid::Uuid::new_v4().simple()),
            write_key: format!("wk-faults-{}", uuid::Uuid::new_v4().simple()),
            datasets_root: dir.path().join("datasets"),
            product_url,
            ports,
            configs: BTreeMap::new(),
            running: BTreeMap::new(),
            exits: Vec::new(),
            pg,
            broker,
            dir,
        };
        for service in SERVICES {
            let text = stack.config(service, hook_url);
            let path = stack.dir.path().join(format!("{service}.toml"));
            std::fs::write(&path, text).expect("config file");
            stack.configs.insert(service, path);
        }
        for service in SERVICES {
            stack.start(service);
            stack.wait_ready(service, Duration::from_secs(120)).await;
            if service == "registry" {
                stack.register_catalogue().await;
            }
        }
        stack
    }

    fn config(&self, service: &str, hook_url: &str) -> String {
        let listen = format!("127.0.0.1:{}", self.ports[service]);
        let pg = self.pg.url();
        let bootstrap = self.broker.bootstrap();
        let registry = format!(
            "[registry]\nurl = \"{}\"\nuser = \"feedloop\"\npassword = \"{}\"\n",
            self.url("registry"),
            self.token
        );
        // A stable instance id: the eraser's and the trigger's consumer groups take a restarted
        // replica back at once (static membership).
        let kafka = format!("[kafka]\nbootstrap = \"{bootstrap}\"\ninstance_id = \"faults\"\n");
        // The services' own batching (linger, batch size, lz4): consumers restarted at their
        // committed offsets land inside record batches, which the embedded broker answers by
        // skipping the rest of the batch; they must notice (docs/reliability.md).
        // A 10 s delivery timeout: a broker that lost its state is noticed sooner.
        let producer = "[producer]\n\"message.timeout.ms\" = \"10000\"\n";
        let log = "[log]\njson = true\n";
        let datasets = self.datasets_root.display();
        // The key ring, from a file, as an operator would mount it.
        let kek_file = self.dir.path().join("kek");
        if !kek_file.exists() {
            std::fs::write(&kek_file, feedloop_integration_tests::test_kek().expose())
                .expect("KEK file");
        }
        let keys = format!("[keys]\nkek_file = \"{}\"\n", kek_file.display());
        match service {
            "registry" => format!(
                "[http]\nlisten = \"{listen}\"\n[postgres]\nurl = \"{pg}\"\n\
                 [auth.users]\nfeedloop = \"{}\"\n{log}",
                self.token
            ),
            "collector" => format!(
                "[http]\nlisten = \"{listen}\"\n{kafka}{producer}{registry}[postgres]\nurl = \"{pg}\"\n\
                 [auth.apps.dev]\nkeys = [\"{key}\"]\n\
                 [spool]\ndir = \"{spool}\"\nmax_bytes = {SPOOL_MAX_BYTES}\nsegment_bytes = 65536\n\
                 ack_timeout_ms = 1000\n[suppression]\nrefresh_ms = 1000\n{keys}{log}",
                key = self.write_key,
                spool = self.dir.path().join("spool").display(),
            ),
            "cdc" => format!(
                "[http]\nlisten = \"{listen}\"\n[source]\nurl = \"{product}\"\n\
                 status_interval_ms = 500\nheartbeat_interval_ms = 1000\n\
                 {kafka}{producer}{registry}{keys}[control]\nurl = \"{pg}\"\n{log}",
                product = self.product_url,
            ),
            // Postgres join state: the bad-input battery counts stored impressions in it.
            "labeler" => format!(
                "[http]\nlisten = \"{listen}\"\n[datasets]\nroot = \"{datasets}\"\n\
                 commit_interval_ms = 2000\n[state]\nstore = \"postgres\"\n\
                 {kafka}{producer}{registry}[control]\nurl = \"{pg}\"\n{log}"
            ),
            "eraser" => format!(
                "[http]\nlisten = \"{listen}\"\n[auth]\nadmin_token = \"{token}\"\n\
                 [erasure]\nhash_key = \"hash-key-of-the-fault-suite-0123\"\npoll_interval_ms = 200\n\
                 [datasets]\nroot = \"{datasets}\"\n\
                 {kafka}{producer}{registry}{keys}[control]\nurl = \"{pg}\"\n{log}",
                token = self.token,
            ),
            "trigger" => format!(
                "[[sinks]]\nname = \"airflow\"\nkind = \"webhook\"\nurl = \"{hook_url}\"\n\
                 timeout_ms = 2000\n\
                 [http]\nlisten = \"{listen}\"\n[auth]\ntoken = \"{token}\"\n\
                 [trigger]\nevaluate_interval_ms = 500\n\
                 [policies.\"*\"]\nmin_new_rows = 300\nmax_staleness_s = 0\n\
                 psi_threshold = 0.2\npsi_min_rows = 500\ncooldown_s = 3\n\
                 {kafka}{producer}{registry}[control]\nurl = \"{pg}\"\n{log}",
                token = self.token,
            ),
            other => panic!("no service {other}"),
        }
    }

    async fn register_catalogue(&self) {
        let client = RegistryClient::new(
            &self.url("registry"),
            Some(("feedloop".into(), Secret::new(self.token.clone()))),
            "",
            Duration::from_secs(10),
        )
        .expect("registry client");
        let catalogue = Catalogue::embedded().expect("catalogue");
        for (subject, schema) in catalogue.subjects().expect("subjects") {
            client
                .register(&subject, &schema)
                .await
                .unwrap_or_else(|e| panic!("registering {subject}: {e}"));
        }
    }

    pub fn url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.ports[service])
    }

    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig::new(self.broker.bootstrap())
    }

    /// The configuration file `service` runs with.
    pub fn config_path(&self, service: &str) -> &std::path::Path {
        &self.configs[service]
    }

    /// Starts `service` (again), logging to `<dir>/<service>.<n>.log`.
    pub fn start(&mut self, service: &'static str) {
        let spawned = Service::spawn(service, &self.configs[service], self.dir.path());
        self.running.insert(service, spawned);
    }

    /// SIGKILL: no warning, no shutdown.
    pub fn kill(&mut self, service: &'static str) {
        if let Some(mut s) = self.running.remove(service) {
            s.kill();
        }
    }

    /// Starts again every service that exited on its own, as a supervisor would, and records
    /// how it ended in [`exits`](Self::exits).
    pub fn restart_exited(&mut self) {
        let exited: Vec<(&'static str, String)> = self
            .running
            .iter_mut()
            .filter_map(|(name, s)| s.exited().map(|status| (*name, status.to_string())))
            .collect();
        for (name, status) in exited {
            eprintln!("fault suite: {name} exited ({status}); starting it again");
            if let Some(s) = self.running.get(name) {
                eprintln!("--- last lines of its log ---\n{}", s.log_tail(20));
            }
            self.exits.push((name, status));
            self.start(name);
        }
    }

    /// Whether `service` answers its readiness probe.
    pub async fn ready(&self, http: &reqwest::Client, service: &str) -> bool {
        http.get(format!("{}/readyz", self.url(service)))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    pub async fn wait_ready(&self, service: &str, within: Duration) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + within;
        while !self.ready(&http, service).await {
            assert!(
                Instant::now() < deadline,
                "{service} not ready after {within:?}; its logs are in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the whole pipeline is back: every service ready, and the collector publishing
    /// straight to the broker (an empty probe batch is answered `acked`) with an empty spool.
    pub async fn healthy(&self, http: &reqwest::Client) -> bool {
        for s in SERVICES {
            if !self.ready(http, s).await {
                return false;
            }
        }
        let probe = http
            .post(format!("{}/v1/events", self.url("collector")))
            .basic_auth(&self.write_key, Some(""))
            .timeout(Duration::from_secs(2))
            .json(&json!([]))
            .send()
            .await;
        let acked = match probe {
            Ok(r) => r
                .json::<Value>()
                .await
                .is_ok_and(|b| b["durability"] == "acked"),
            Err(_) => false,
        };
        acked
            && self
                .metric("collector", "feedloop_collector_spool_depth_records")
                .await
                == Some(0.0)
    }

    /// The value of a metric series without labels on `service`'s `/metrics`.
    pub async fn metric(&self, service: &str, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url(service)))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until the pipeline is [healthy](Self::healthy), starting again what exited;
    /// returns how long that took.
    pub async fn recovery(&mut self, within: Duration) -> Duration {
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            self.restart_exited();
            if self.healthy(&http).await {
                break;
            }
            if started.elapsed() > within {
                let mut not_ready = Vec::new();
                for s in SERVICES {
                    if !self.ready(&http, s).await {
                        not_ready.push(s);
                    }
                }
                let spool = self
                    .metric("collector", "feedloop_collector_spool_depth_records")
                    .await;
                panic!(
                    "the pipeline did not recover within {within:?}: not ready {not_ready:?}, \
                     collector spool depth {spool:?}; logs in {}",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    }
}
