//! `feedloop erase`: a client of the eraser's admin API.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Where the eraser is and its admin token.
#[derive(Debug, Clone)]
pub struct Eraser {
    pub url: String,
    pub token: String,
}

impl Eraser {
    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("reaching the eraser at {}", self.url))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "the eraser answered {status}: {}",
                body["message"].as_str().unwrap_or("no message")
            );
        }
        Ok(body)
    }

    /// Requests the erasure of `users`; returns the request id.
    pub async fn request(
        &self,
        users: &[String],
        reason: &str,
        requested_by: &str,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<String> {
        let http = reqwest::Client::new();
        let body = json!({
            "user_ids": users,
            "reason": reason,
            "requested_by": requested_by,
            "idempotency_key": idempotency_key,
        });
        let created = self
            .call(
                http.post(format!("{}/v1/erasure-requests", self.url))
                    .json(&body),
            )
            .await?;
        created["id"]
            .as_str()
            .map(str::to_owned)
            .context("the eraser answered without a request id")
    }

    /// The most recent requests (at most 1000).
    pub async fn list(&self) -> anyhow::Result<Vec<Value>> {
        let http = reqwest::Client::new();
        let body = self
            .call(http.get(format!("{}/v1/erasure-requests?limit=1000", self.url)))
            .await?;
        Ok(body["requests"].as_array().cloned().unwrap_or_default())
    }

    /// The certificate of a completed request.
    pub async fn certificate(&self, id: &str) -> anyhow::Result<Value> {
        let http = reqwest::Client::new();
        self.call(http.get(format!("{}/v1/erasure-requests/{id}/certificate", self.url)))
            .await
    }

    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        let http = reqwest::Client::new();
        self.call(http.get(format!("{}/v1/erasure-requests/{id}", self.url)))
            .await
    }
}

/// One line per target.
pub fn describe(status: &Value) -> String {
    let mut out = format!(
        "request {}: {}\n",
        status["id"].as_str().unwrap_or("?"),
        status["status"].as_str().unwrap_or("?")
    );
    for t in status["targets"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<12} {:<10} affected {:>8}{}\n",
            t["target"].as_str().unwrap_or("?"),
            t["status"].as_str().unwrap_or("?"),
            t["affected"].as_i64().unwrap_or(0),
            t["error"]
                .as_str()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        ));
    }
    out
}

/// What `feedloop erase verify` looks at.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub id: String,
    pub dev: Option<std::path::PathBuf>,
    pub control: Option<String>,
    pub kafka: Option<String>,
    pub datasets_root: Option<String>,
    pub kek: Option<String>,
    /// Personal values to look for besides those the request recorded.
    pub values: Vec<String>,
}

/// Runs the independent scan of a request and prints its table; returns whether it passed.
pub async fn verify(o: VerifyOptions) -> anyhow::Result<bool> {
    use feedloop_core::crypto::{KeyRing, PostgresKeyStore};
    let dev = o
        .dev
        .as_deref()
        .map(crate::dev::Endpoints::read)
        .transpose()?;
    let pick = |given: Option<String>, from_dev: Option<String>, what: &str| {
        given
            .or(from_dev.filter(|v| !v.is_empty()))
            .with_context(|| format!("{what} is required (or --dev DIR of a running dev stack)"))
    };
    let d = dev.as_ref();
    let control = pick(o.control, d.map(|e| e.postgres_url.clone()), "--control")?;
    let kafka = pick(o.kafka, d.map(|e| e.kafka_bootstrap.clone()), "--kafka")?;
    let root = pick(
        o.datasets_root,
        d.map(|e| e.datasets_root.clone()),
        "--datasets-root",
    )?;
    let kek = pick(o.kek, d.map(|e| e.keys_kek.clone()), "--kek")?;
    let id: uuid::Uuid = o.id.parse().context("the request id is not a UUID")?;
    let pool = sqlx::PgPool::connect(&control)
        .await
        .context("connecting to the control database")?;
    let keys = PostgresKeyStore::new(pool.clone(), KeyRing::parse(&kek)?);
    let users = feedloop_eraser::store::users(&pool, id)
        .await
        .with_context(|| format!("erasure request {id}"))?;
    let mut values = feedloop_eraser::worker::recorded_values(&pool, &keys, id)
        .await
        .map_err(anyhow::Error::msg)?;
    let recorded = values.len();
    values.extend(o.values);
    let places = feedloop_eraser::verify::Places {
        kafka: feedloop_core::kafka::KafkaConfig::new(kafka),
        control: pool.clone(),
        datasets: feedloop_labeler::dataset::Root::open(&root, &Default::default())?,
    };
    let needles = feedloop_eraser::verify::Needles {
        users: users.clone(),
        values,
    };
    let checks = feedloop_eraser::verify::verify(&places, &keys, &needles).await?;
    println!(
        "erasure request {id}: {} users, {recorded} recorded personal values (+{} given)",
        users.len(),
        needles.values.len() - recorded
    );
    print!("{}", feedloop_eraser::verify::render(&checks));
    let passed = feedloop_eraser::verify::passed(&checks);
    println!("{}", if passed { "PASS" } else { "FAIL" });
    pool.close().await;
    Ok(passed)
}
