//! Deliveries: every decision goes to `feedloop.retrain` (the `kafka` sink) and to each
//! configured HTTP sink that wants its dataset, retried with backoff and carrying the decision
//! id as the idempotency key. Deliveries are leased in Postgres, so a restarted (or second)
//! instance takes over what a stopped one left; a delivery that keeps failing ends `failed`
//! with its last error.

use std::{sync::Arc, time::Duration};

use feedloop_core::{
    avro::CompiledSchema,
    catalogue::RETRAIN_TOPIC,
    kafka::HealingProducer,
    retry::{Attempt, RetryPolicy, retry},
};
use hmac::{Hmac, Mac};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, SinkConfig, SinkKind, WebhookMode},
    event::Trigger,
    observability,
    store::{self, Claimed},
};

/// The sink every decision goes to: the retrain topic.
pub const KAFKA_SINK: &str = "kafka";

/// Deliveries attempted at once.
const IN_FLIGHT: usize = 16;

pub struct Deliverer {
    pub cfg: Arc<Config>,
    pub control: PgPool,
    pub producer: Arc<HealingProducer>,
    pub schema: Arc<CompiledSchema>,
    pub http: reqwest::Client,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer").finish_non_exhaustive()
    }
}

/// The sinks a decision on `dataset` goes to.
pub fn sinks_for(cfg: &Config, dataset: &str) -> Vec<String> {
    std::iter::once(KAFKA_SINK.to_owned())
        .chain(
            cfg.sinks
                .iter()
                .filter(|s| s.wants(dataset))
                .map(|s| s.name.clone()),
        )
        .collect()
}

fn render(template: &str, dataset: &str) -> String {
    template.replace("{dataset}", dataset)
}

/// Sorts an HTTP answer: 2xx done; 408, 429 and 5xx worth retrying; any other a failure that
/// retrying will not fix (wrong URL, auth, payload).
async fn judge(resp: Result<reqwest::Response, reqwest::Error>) -> Result<(), Attempt<String>> {
    let resp = resp.map_err(|e| Attempt::Retry(format!("request failed: {e}")))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    let message = format!("HTTP {status}: {body}");
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Err(Attempt::Retry(message))
    } else {
        Err(Attempt::Fail(message))
    }
}

impl Deliverer {
    /// Claims due deliveries and runs them until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.cfg.trigger.deliver_interval_ms);
        let lease = i64::try_from(self.cfg.trigger.delivery_lease_ms).unwrap_or(i64::MAX);
        let mut running: JoinSet<()> = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            while running.try_join_next().is_some() {}
            let room = IN_FLIGHT.saturating_sub(running.len());
            if room == 0 {
                continue;
            }
            match store::claim(&self.control, lease, room as i64).await {
                Ok(claims) => {
                    for c in claims {
                        let this = self.clone();
                        let stop = shutdown.clone();
                        running.spawn(async move { this.deliver(c, stop).await });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Cannot claim deliveries"),
            }
        }
        // Attempts in flight stop with the process; their leases expire and they run again.
        running.abort_all();
    }

    /// One delivery, retried with backoff until it succeeds, fails for good, or time is up.
    async fn deliver(&self, c: Claimed, shutdown: CancellationToken) {
        let trigger: Trigger = match serde_json::from_str(&c.event) {
            Ok(t) => t,
            Err(e) => {
                self.record(&c, Err((&format!("stored event unreadable: {e}"), true)))
                    .await;
                return;
            }
        };
        let lease = i64::try_from(self.cfg.trigger.delivery_lease_ms).unwrap_or(i64::MAX);
        let policy = RetryPolicy::within(Duration::from_millis(
            self.cfg.trigger.delivery_max_elapsed_ms,
        ));
        let outcome = retry(policy, || async {
            if shutdown.is_cancelled() {
                return Err(Attempt::Fail("shutting down".to_owned()));
            }
            match self.attempt(&c.sink, &trigger).await {
                Ok(()) => Ok(()),
                Err(Attempt::Retry(e)) => {
                    observability::delivery(&c.sink, "retry");
                    tracing::warn!(sink = %c.sink, decision = %c.decision_id, error = %e, "Delivery failed; retrying");
                    self.record(&c, Err((&e, false))).await;
                    let _ = store::renew(&self.control, c.decision_id, &c.sink, lease).await;
                    Err(Attempt::Retry(e))
                }
                Err(Attempt::Fail(e)) => Err(Attempt::Fail(e)),
            }
        })
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        match outcome {
            Ok(()) => {
                observability::delivery(&c.sink, "delivered");
                tracing::info!(sink = %c.sink, decision = %c.decision_id, "Trigger delivered");
                self.record(&c, Ok(())).await;
            }
            Err(e) => {
                observability::delivery(&c.sink, "failed");
                tracing::error!(sink = %c.sink, decision = %c.decision_id, error = %e, "Delivery failed for good");
                self.record(&c, Err((&e, true))).await;
            }
        }
    }

    async fn record(&self, c: &Claimed, outcome: Result<(), (&str, bool)>) {
        if let Err(e) = store::attempted(&self.control, c.decision_id, &c.sink, outcome).await {
            tracing::warn!(error = %e, "Cannot record a delivery attempt");
        }
    }

    async fn attempt(&self, sink: &str, t: &Trigger) -> Result<(), Attempt<String>> {
        if sink == KAFKA_SINK {
            return self.publish(t).await;
        }
        let Some(s) = self.cfg.sinks.iter().find(|s| s.name == sink) else {
            return Err(Attempt::Fail(format!(
                "sink {sink} is no longer configured"
            )));
        };
        match s.kind {
            SinkKind::Airflow if s.airflow_version == 3 => self.airflow3(s, t).await,
            SinkKind::Airflow => {
                let body = json!({
                    "dataset_uri": render(&s.dataset_uri, &t.data.dataset),
                    "extra": t.extra(),
                });
                judge(
                    self.post(s, "/api/v1/datasets/events", &t.id)
                        .json(&body)
                        .send()
                        .await,
                )
                .await
            }
            SinkKind::Dagster => {
                for p in &t.data.partitions {
                    let mut metadata = t.extra();
                    if let Some(m) = metadata.as_object_mut() {
                        m.insert("manifest_uri".into(), json!(p.manifest_uri));
                        m.insert("manifest_version".into(), json!(p.version));
                        m.insert("partition_row_count".into(), json!(p.row_count));
                    }
                    let body = json!({
                        "asset_key": render(&s.asset_key, &t.data.dataset),
                        "partition": p.partition,
                        "data_version": format!("{}@v{}", p.partition, p.version),
                        "description": t.data.reason,
                        "metadata": metadata,
                    });
                    let key = format!("{}:{}", t.id, p.partition);
                    judge(
                        self.post(s, "/report_asset_materialization/", &key)
                            .json(&body)
                            .send()
                            .await,
                    )
                    .await?;
                }
                Ok(())
            }
            SinkKind::Webhook => {
                let (body, content_type, headers) = match s.mode {
                    WebhookMode::Structured => (
                        t.to_cloudevent(),
                        "application/cloudevents+json",
                        Vec::new(),
                    ),
                    WebhookMode::Binary => (
                        serde_json::to_value(&t.data).unwrap_or(Value::Null),
                        "application/json",
                        t.ce_headers(),
                    ),
                };
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                let mut req = self.post(s, "", &t.id).header("content-type", content_type);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                if let Some(secret) = &s.hmac_secret {
                    req = req.header("x-feedloop-signature", signature(secret.expose(), &bytes));
                }
                judge(req.body(bytes).send().await).await
            }
        }
    }

    /// A POST to `path` under the sink's URL, with its auth and the idempotency key.
    fn post(&self, s: &SinkConfig, path: &str, idempotency_key: &str) -> RequestBuilder {
        let url = format!("{}{path}", s.url.trim_end_matches('/'));
        let mut req = self
            .http
            .post(url)
            .timeout(s.timeout())
            .header("idempotency-key", idempotency_key);
        if let Some(token) = &s.bearer_token {
            req = req.bearer_auth(token.expose());
        } else if let Some(user) = &s.user {
            req = req.basic_auth(user, s.password.as_ref().map(|p| p.expose()));
        }
        req
    }

    /// Airflow 3: a JWT from `POST /auth/token`, then `POST /api/v2/assets/events`.
    async fn airflow3(&self, s: &SinkConfig, t: &Trigger) -> Result<(), Attempt<String>> {
        let base = s.url.trim_end_matches('/');
        let token: Value = {
            let resp = self
                .http
                .post(format!("{base}/auth/token"))
                .timeout(s.timeout())
                .json(&json!({
                    "username": s.user.clone().unwrap_or_default(),
                    "password": s.password.as_ref().map(|p| p.expose()).unwrap_or_default(),
                }))
                .send()
                .await;
            let resp = resp.map_err(|e| Attempt::Retry(format!("token request failed: {e}")))?;
            let status = resp.status();
            if !status.is_success() {
                let e = format!("token: HTTP {status}");
                return Err(if status.is_server_error() {
                    Attempt::Retry(e)
                } else {
                    Attempt::Fail(e)
                });
            }
            resp.json()
                .await
                .map_err(|e| Attempt::Retry(format!("token answer: {e}")))?
        };
        let Some(jwt) = token["access_token"].as_str() else {
            return Err(Attempt::Fail("token answer without access_token".into()));
        };
        let body = json!({"asset_id": s.asset_id, "extra": t.extra()});
        let resp = self
            .http
            .post(format!("{base}/api/v2/assets/events"))
            .timeout(s.timeout())
            .bearer_auth(jwt)
            .header("idempotency-key", &t.id)
            .json(&body)
            .send()
            .await;
        judge(resp).await
    }

    /// Publishes the trigger on `feedloop.retrain`, keyed by dataset, and waits for the ack.
    async fn publish(&self, t: &Trigger) -> Result<(), Attempt<String>> {
        let mut value = Vec::new();
        self.schema
            .encode(t, &mut value)
            .map_err(|e| Attempt::Fail(format!("encoding: {e}")))?;
        let record = FutureRecord::to(RETRAIN_TOPIC)
            .key(&t.data.dataset)
            .payload(&value)
            .headers(OwnedHeaders::new().insert(Header {
                key: "event_id",
                value: Some(t.id.as_str()),
            }));
        let sent = self
            .producer
            .get()
            .send(record, Duration::from_secs(30))
            .await;
        self.producer
            .observe(sent)
            .await
            .map(|_| ())
            .map_err(|(e, _)| Attempt::Retry(format!("Kafka: {e}")))
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
