//! The demo's load: simulated phones posting batches to the collector (as a mobile SDK would)
//! and a simulated backend writing the product database, played from a [`World`]. The demo
//! and the fault suite (integration-tests/faults) both drive the pipeline with it.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use indicatif::ProgressBar;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::sim::{self, Batch, ProductWrite, Step, World};

/// Requests in flight at once (phones sending at the same time).
const CONCURRENCY: usize = 16;

/// What the phones were told, summed over every answer.
#[derive(Debug, Default)]
pub struct Answers {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub suppressed: AtomicU64,
    pub rejected: AtomicU64,
    /// Events of requests that never got a 200 (the demo reports them as lost).
    pub unanswered: AtomicU64,
    /// 429 and 503 answers the phones waited out and retried.
    pub retried: AtomicU64,
    /// Rejections by reason and detail.
    pub rejections: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Ids of the events answered `accepted` or `duplicate`: the collector vouches that
    /// each is in the log.
    pub acknowledged: std::sync::Mutex<HashSet<String>>,
}

/// The simulated phones: POST batches to the collector, as a mobile SDK would.
pub struct Phones {
    pub http: reqwest::Client,
    pub url: String,
    pub write_key: String,
    pub answers: Arc<Answers>,
    pub bar: ProgressBar,
}

impl Phones {
    /// Sends one batch until every event in it is answered: 429 and 503 are waited out, and
    /// events the collector calls retryable (in flight in another request) are sent again.
    pub async fn send(&self, batch: &Batch) {
        let (url, sent_at_key) = match batch.api {
            sim::Api::Native => (format!("{}/v1/events", self.url), "sent_at"),
            sim::Api::Segment => (format!("{}/v1/batch", self.url), "sentAt"),
        };
        let mut events = batch.events.clone();
        for _ in 0..600 {
            let sent_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let body = json!({sent_at_key: sent_at + batch.skew_ms, "batch": events});
            let resp = self
                .http
                .post(&url)
                .basic_auth(&self.write_key, Some(""))
                .json(&body)
                .send()
                .await;
            let wait = match resp {
                Ok(r) if r.status().is_success() => {
                    let answer: Value = r.json().await.unwrap_or(Value::Null);
                    let mut retry = Vec::new();
                    for r in answer["results"].as_array().into_iter().flatten() {
                        let index = r["index"].as_u64().unwrap_or(u64::MAX) as usize;
                        if r["retryable"] == true
                            && let Some(e) = events.get(index)
                        {
                            retry.push(e.clone());
                            continue;
                        }
                        self.count(r);
                    }
                    let answered = (events.len() - retry.len()) as u64;
                    self.bar.inc(answered);
                    let a = &self.answers;
                    self.bar.set_message(format!(
                        "accepted {} · rejected {} · duplicates {}",
                        a.accepted.load(Relaxed),
                        a.rejected.load(Relaxed),
                        a.duplicates.load(Relaxed)
                    ));
                    if retry.is_empty() {
                        return;
                    }
                    events = retry;
                    Duration::from_millis(200)
                }
                Ok(r) if matches!(r.status().as_u16(), 429 | 503) => {
                    self.answers.retried.fetch_add(1, Relaxed);
                    r.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map_or(Duration::from_millis(100), |s| {
                            Duration::from_secs(s).min(Duration::from_secs(2))
                        })
                }
                Ok(r) => {
                    tracing::warn!(status = %r.status(), "the collector refused a batch");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a batch did not reach the collector");
                    Duration::from_millis(200)
                }
            };
            tokio::time::sleep(wait).await;
        }
        let n = events.len() as u64;
        self.answers.unanswered.fetch_add(n, Relaxed);
        self.bar.inc(n);
    }

    /// Counts one event's answer.
    fn count(&self, result: &Value) {
        let a = &self.answers;
        let status = result["status"].as_str();
        if matches!(status, Some("accepted" | "duplicate"))
            && let Some(id) = result["event_id"].as_str()
            && let Ok(mut acked) = a.acknowledged.lock()
        {
            acked.insert(id.to_owned());
        }
        let counter = match status {
            Some("accepted") => &a.accepted,
            Some("duplicate") => &a.duplicates,
            Some("suppressed") => &a.suppressed,
            Some("rejected") => {
                let why = format!(
                    "{}: {}",
                    result["reason"].as_str().unwrap_or("?"),
                    result["path"].as_str().unwrap_or("")
                );
                if let Ok(mut m) = a.rejections.lock() {
                    *m.entry(why).or_default() += 1;
                }
                &a.rejected
            }
            _ => &a.unanswered,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Inserts the population into `app.users`; returns the rows inserted.
pub async fn insert_users(product: &PgPool, world: &World) -> anyhow::Result<u64> {
    let mut inserted = 0;
    for chunk in world.users.chunks(1_000) {
        let col = |f: fn(&sim::User) -> String| chunk.iter().map(f).collect::<Vec<_>>();
        inserted += sqlx::query(
            "INSERT INTO app.users (id, email, phone, display_name, country, bio)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::text[])",
        )
        .bind(col(|u| u.id.clone()))
        .bind(col(|u| u.email.clone()))
        .bind(col(|u| u.phone.clone()))
        .bind(col(|u| u.display_name.clone()))
        .bind(col(|u| u.country.to_owned()))
        .bind(col(|u| u.bio.clone()))
        .execute(product)
        .await
        .context("inserting users")?
        .rows_affected();
    }
    Ok(inserted)
}

/// Plays the world's steps: batches go to the collector (several at once, one at least `pace`
/// after the other: zero sends as fast as the collector answers), product writes to Postgres in
/// order (grouped into transactions). Returns the product rows changed.
pub async fn drive(
    world: &World,
    phones: &Arc<Phones>,
    product: &PgPool,
    pace: Duration,
) -> anyhow::Result<u64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ProductWrite>(4_096);
    let pool = product.clone();
    let writer = tokio::spawn(async move {
        let mut changed = 0u64;
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < 200 {
                match rx.try_recv() {
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            changed += write_group(&pool, &group).await?;
        }
        anyhow::Ok(changed)
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut inflight = tokio::task::JoinSet::new();
    let mut next = Instant::now();
    for step in &world.steps {
        match step {
            Step::Send(batch) => {
                if !pace.is_zero() {
                    tokio::time::sleep_until(next.into()).await;
                    next += pace;
                }
                let permit = permits.clone().acquire_owned().await?;
                let (phones, batch) = (phones.clone(), batch.clone());
                inflight.spawn(async move {
                    phones.send(&batch).await;
                    drop(permit);
                });
                while inflight.try_join_next().is_some() {}
            }
            Step::Write(w) => {
                if tx.send(w.clone()).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    while inflight.join_next().await.is_some() {}
    writer.await.context("the product writer")?
}

/// Writes `group` in one transaction. A failed attempt (the database restarting, say) is
/// retried for up to a minute: a backend whose database blinks keeps its writes.
async fn write_group(pool: &PgPool, group: &[ProductWrite]) -> anyhow::Result<u64> {
    let attempt = || async {
        let mut txn = pool.begin().await?;
        let mut changed = 0;
        for w in group {
            changed += apply(&mut txn, w).await?;
        }
        txn.commit().await?;
        anyhow::Ok(changed)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match attempt().await {
            Ok(changed) => return Ok(changed),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "a product write failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context("writing to the product database")),
        }
    }
}

async fn apply(txn: &mut sqlx::PgConnection, w: &ProductWrite) -> anyhow::Result<u64> {
    let ts = |ms: i64| ms as f64 / 1000.0;
    let q = match w {
        ProductWrite::Match { id, a, b, score, at } => sqlx::query(
            "INSERT INTO app.matches (id, user_a, user_b, score, created_at)
             VALUES ($1::uuid, $2, $3, $4, to_timestamp($5))",
        )
        .bind(id.to_string())
        .bind(a)
        .bind(b)
        .bind(score)
        .bind(ts(*at)),
        ProductWrite::MatchStatus { id, status } => {
            sqlx::query("UPDATE app.matches SET status = $2 WHERE id = $1::uuid")
                .bind(id.to_string())
                .bind(*status)
        }
        ProductWrite::Report {
            reporter,
            reported,
            match_id,
            reason,
            comment,
            at,
        } => sqlx::query(
            "INSERT INTO app.reports (reporter_id, reported_id, match_id, reason, comment, created_at)
             VALUES ($1, $2, $3::uuid, $4, $5, to_timestamp($6))",
        )
        .bind(reporter)
        .bind(reported)
        .bind(match_id.to_string())
        .bind(*reason)
        .bind(comment)
        .bind(ts(*at)),
        ProductWrite::Block {
            blocker,
            blocked,
            match_id,
            at,
        } => sqlx::query(
            "INSERT INTO app.blocks (blocker_id, blocked_id, match_id, created_at)
             VALUES ($1, $2, $3::uuid, to_timestamp($4))",
        )
        .bind(blocker)
        .bind(blocked)
        .bind(match_id.to_string())
        .bind(ts(*at)),
        ProductWrite::Bio { user, bio } => {
            sqlx::query("UPDATE app.users SET bio = $2, updated_at = now() WHERE id = $1")
                .bind(user)
                .bind(bio)
        }
        ProductWrite::DeleteUser { user } => {
            sqlx::query("DELETE FROM app.users WHERE id = $1").bind(user)
        }
    };
    Ok(q.execute(&mut *txn).await?.rows_affected())
}
