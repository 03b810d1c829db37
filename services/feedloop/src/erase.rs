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
