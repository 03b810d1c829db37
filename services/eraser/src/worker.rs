//! Executes open requests: each target in turn, idempotently, retried with backoff; then the
//! overall status and, once completed, the audit certificate.
//!
//! A request interrupted by a crash is still `running` and is picked up again: every target is
//! safe to repeat (suppression and tombstones are idempotent, purges and rewrites find nothing
//! left to remove).

use std::{collections::HashMap, sync::Arc, time::Duration};

use feedloop_core::kafka::HealingProducer;
use feedloop_core::{
    avro::CompiledSchema,
    catalogue::ERASURE_AUDIT_TOPIC,
    retry::{Attempt, RetryPolicy, retry},
};
use feedloop_labeler::{dataset::Root, erasure, state::StateStore};
use hmac::{Hmac, Mac};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::Config,
    observability,
    store::{self, StoreError, TARGETS},
};

/// How long one attempt of the `join_state` target waits for labelers with local state to
/// commit a checkpoint without the users (they look at every commit interval).
const LOCAL_STATE_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Worker {
    pub cfg: Arc<Config>,
    pub control: PgPool,
    pub state: Arc<dyn StateStore>,
    pub keys: Arc<dyn feedloop_core::crypto::KeyStore>,
    pub root: Root,
    pub producer: Arc<HealingProducer>,
    pub partitions_schema: Arc<CompiledSchema>,
    pub audit_schema: Arc<CompiledSchema>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// Keys re-wrapped per statement batch.
const REWRAP_BATCH: usize = 1_000;
/// How often the worker looks for keys to re-wrap (after a KEK rotation).
const REWRAP_INTERVAL: Duration = Duration::from_secs(600);

/// What a target did: how many rows, keys, records or files it affected, and details.
type Done = (i64, serde_json::Value);

/// `s` as Avro encodes a string: its length (zig-zag varint), then its bytes.
fn avro_string(s: &str) -> Vec<u8> {
    let len = s.len() as i64;
    let mut n = ((len << 1) ^ (len >> 63)) as u64;
    let mut out = Vec::with_capacity(s.len() + 2);
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(s.as_bytes());
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Worker {
    /// Re-wraps every data key not under the current KEK (a rotation, or keys stored before
    /// envelope encryption), in batches; returns how many.
    pub async fn rewrap_keys(&self) -> Result<u64, feedloop_core::crypto::CryptoError> {
        let mut total = 0;
        loop {
            let n = self.keys.rewrap(REWRAP_BATCH).await?;
            total += n;
            observability::keys_rewrapped(n);
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Destroys the unattributed dead-letter keys past `erasure.unattributed_retention_days`.
    pub async fn expire_unattributed(
        &self,
        now_ms: i64,
    ) -> Result<u64, feedloop_core::crypto::CryptoError> {
        let n = feedloop_core::crypto::expire_unattributed(
            self.keys.as_ref(),
            self.cfg.erasure.unattributed_retention_days,
            now_ms,
        )
        .await?;
        if n > 0 {
            tracing::info!(
                keys = n,
                "Unattributed dead-letter keys past their retention destroyed"
            );
        }
        Ok(n)
    }

    /// Polls for open requests until `shutdown`; re-wraps keys and expires unattributed
    /// dead-letter keys at start and then every [`REWRAP_INTERVAL`].
    pub async fn run(self, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.cfg.erasure.poll_interval_ms);
        let mut rewrapped_at: Option<std::time::Instant> = None;
        loop {
            if rewrapped_at.is_none_or(|at| at.elapsed() >= REWRAP_INTERVAL) {
                match self.rewrap_keys().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(keys = n, "Data keys re-wrapped with the current KEK"),
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot re-wrap data keys; will try again")
                    }
                }
                if let Err(e) = self.expire_unattributed(now_ms()).await {
                    tracing::warn!(error = %e, "Cannot expire unattributed dead-letter keys; will try again");
                }
                rewrapped_at = Some(std::time::Instant::now());
            }
            match store::open(&self.control).await {
                Ok(ids) => {
                    for id in ids {
                        if shutdown.is_cancelled() {
                            return;
                        }
                        if let Err(e) = self.process(id).await {
                            tracing::warn!(request = %id, error = %e, "Erasure request interrupted; will resume");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Cannot read open erasure requests"),
            }
            observability::open_requests(&self.control).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// Runs every target of a request that is not completed, then settles its status.
    pub async fn process(&self, id: Uuid) -> Result<(), StoreError> {
        store::set_request_status(&self.control, id, "running", "worker picked it up").await?;
        let users = store::users(&self.control, id).await?;
        let states = store::targets(&self.control, id).await?;
        for target in TARGETS {
            let state = states.iter().find(|t| t.target == *target);
            if state.is_some_and(|t| t.status == "completed" || t.status == "failed") {
                continue;
            }
            let mut attempts = 0u32;
            let max = self.cfg.erasure.max_attempts;
            let result = retry(
                RetryPolicy {
                    initial: Duration::from_millis(200),
                    max_interval: Duration::from_secs(5),
                    max_elapsed: None,
                },
                || {
                    attempts += 1;
                    let attempt = attempts;
                    let users = users.clone();
                    async move {
                        let _ = store::set_target(&self.control, id, target, "running", 0, &json!({}), None).await;
                        match self.execute(id, target, &users).await {
                            Ok(done) => Ok(done),
                            Err(e) if attempt >= max => Err(Attempt::Fail(e)),
                            Err(e) => {
                                tracing::warn!(request = %id, target, attempt, error = %e, "Erasure target failed; retrying");
                                Err(Attempt::Retry(e))
                            }
                        }
                    }
                },
            )
            .await;
            match result {
                Ok((affected, details)) => {
                    store::set_target(
                        &self.control,
                        id,
                        target,
                        "completed",
                        affected,
                        &details,
                        None,
                    )
                    .await?;
                }
                Err(e) => {
                    observability::target_failed(target);
                    store::set_target(&self.control, id, target, "failed", 0, &json!({}), Some(&e))
                        .await?;
                }
            }
        }
        let states = store::targets(&self.control, id).await?;
        if states.iter().any(|t| t.status == "failed") {
            store::set_request_status(&self.control, id, "partially_failed", "a target failed")
                .await?;
        } else {
            let certificate = self.certificate(id, &users, &states);
            store::set_certificate(&self.control, id, &certificate).await?;
            // The removed examples' ids served their tombstones; nothing of them is kept.
            if let Err(e) = erasure::forget_erased_examples(&self.control, id).await {
                tracing::warn!(request = %id, error = %e, "Could not forget the erased examples' ids");
            }
            if let Err(e) = self.publish_audit(&certificate).await {
                tracing::warn!(request = %id, error = %e, "Could not publish the audit certificate; it is stored");
            }
            store::set_request_status(&self.control, id, "completed", "every target completed")
                .await?;
        }
        Ok(())
    }

    async fn execute(&self, id: Uuid, target: &str, users: &[String]) -> Result<Done, String> {
        match target {
            "inventory" => self.inventory(id, users).await,
            "suppression" => self.suppress(users).await.map_err(|e| e.to_string()),
            "crypto_keys" => {
                let n = self.keys.destroy(users).await.map_err(|e| e.to_string())?;
                // Done only once no writer can still seal with a destroyed key: the broadcast
                // has reached them (Postgres), or their cached copies have expired (ScyllaDB).
                let settle = self.keys.destruction_settles();
                tokio::time::sleep(settle).await;
                Ok((
                    n as i64,
                    json!({
                        "keys_destroyed": n,
                        "wrapped_keys_deleted": true,
                        "writers_settled_ms": settle.as_millis() as u64,
                    }),
                ))
            }
            "join_state" => self.purge_join_state(users).await,
            "datasets" => self.rewrite_datasets(id, users).await,
            "labels_topic" => self.tombstone_labels(id, users).await,
            "tombstones" => self.tombstones(users).await,
            "verify" => self.verify(id, users).await,
            other => Err(format!("unknown target {other}")),
        }
    }

    /// Records, sealed, the personal values the log holds for the users (their sealed fields
    /// opened while their keys live), for the verify target and `feedloop erase verify`.
    async fn inventory(&self, id: Uuid, users: &[String]) -> Result<Done, String> {
        let values = crate::verify::inventory(
            &self.cfg.kafka,
            &self.cfg.erasure.cdc_topic_prefix,
            self.keys.as_ref(),
            users,
        )
        .await
        .map_err(|e| e.to_string())?;
        let owner = feedloop_core::crypto::unattributed_owner(now_ms());
        let key = self
            .keys
            .get_or_create(&owner)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the day's unattributed key is destroyed")?;
        let plain = serde_json::to_vec(&values).map_err(|e| e.to_string())?;
        let sealed =
            feedloop_core::crypto::seal_bytes(&key, &owner, &plain).map_err(|e| e.to_string())?;
        store::set_scan_values(&self.control, id, &sealed, &owner)
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            values.len() as i64,
            json!({
                "values_recorded": values.len(),
                "sealed_until": format!(
                    "{} days after the day of {owner}",
                    self.cfg.erasure.unattributed_retention_days
                ),
            }),
        ))
    }

    /// The recorded personal values of a request, while their key lives.
    pub async fn recorded_values(&self, id: Uuid) -> Result<Vec<String>, String> {
        recorded_values(&self.control, self.keys.as_ref(), id).await
    }

    /// The independent completeness scan; fails (and is retried) while anything of the users
    /// is found.
    async fn verify(&self, id: Uuid, users: &[String]) -> Result<Done, String> {
        let needles = crate::verify::Needles {
            users: users.to_vec(),
            values: self.recorded_values(id).await?,
        };
        let places = crate::verify::Places {
            kafka: self.cfg.kafka.clone(),
            control: self.control.clone(),
            datasets: self.root.clone(),
        };
        let checks = crate::verify::verify(&places, self.keys.as_ref(), &needles)
            .await
            .map_err(|e| e.to_string())?;
        let failed: Vec<&crate::verify::Check> =
            checks.iter().filter(|c| c.status == "fail").collect();
        if !failed.is_empty() {
            return Err(format!(
                "the scan found the users: {}",
                failed
                    .iter()
                    .map(|c| format!("{} ({})", c.check, c.detail))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok((
            checks.len() as i64,
            json!({
                "passed": true,
                "values_searched": needles.values.len(),
                "checks": checks,
            }),
        ))
    }

    async fn suppress(&self, users: &[String]) -> Result<Done, sqlx::Error> {
        let n = erasure::suppress(&self.control, users).await?;
        Ok((users.len() as i64, json!({ "newly_suppressed": n })))
    }

    /// Purges the users from a shared join-state store, then waits until every dataset
    /// whose labeler keeps local state has a checkpoint without them: a running labeler purges
    /// the users above its checkpoint's suppression seq at its next commit, and the checkpoint
    /// of one that is not running is purged here.
    async fn purge_join_state(&self, users: &[String]) -> Result<Done, String> {
        let shared = if self.state.local().is_none() {
            self.state
                .purge_users(users)
                .await
                .map_err(|e| e.to_string())?
        } else {
            0
        };
        let deadline = tokio::time::Instant::now() + LOCAL_STATE_WAIT;
        let (mut idle, mut idle_datasets) = (0u64, 0u64);
        loop {
            let behind = erasure::local_state_behind(&self.control, users)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the users are not on the suppression list")?;
            if behind.is_empty() {
                return Ok((
                    (shared + idle) as i64,
                    json!({
                        "entries_removed": shared + idle,
                        "local_state_checkpoints": "purged",
                        "idle_checkpoints_purged": idle_datasets,
                    }),
                ));
            }
            // A dataset whose labeler is not running is purged here, under its lock.
            for dataset in &behind {
                if let Some(n) = erasure::purge_idle_checkpoint(&self.control, &self.root, dataset)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    idle += n;
                    idle_datasets += 1;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the local join state of dataset(s) {} has no checkpoint without the users yet: \
                     their running labeler purges them at its next commit",
                    behind.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn rewrite_datasets(&self, id: Uuid, users: &[String]) -> Result<Done, String> {
        let parts = erasure::partitions_with_users(&self.control, users)
            .await
            .map_err(|e| e.to_string())?;
        let mut manifests = Vec::new();
        let mut rows = 0i64;
        let mut files = 0usize;
        let mut datasets = std::collections::BTreeSet::new();
        for (dataset, partition) in &parts {
            let rw = erasure::rewrite_partition(
                &self.control,
                &self.root,
                dataset,
                partition,
                users,
                id,
            )
            .await
            .map_err(|e| e.to_string())?;
            let Some(after) = rw.after else { continue };
            let digest = |m: &feedloop_labeler::dataset::Manifest| {
                sha256_hex(&serde_json::to_vec(m).unwrap_or_default())
            };
            manifests.push(json!({
                "dataset": dataset,
                "partition": partition,
                "before_version": rw.before.version,
                "before_sha256": digest(&rw.before),
                "after_version": after.version,
                "after_sha256": digest(&after),
                "rows_removed": rw.rows_removed,
            }));
            rows += rw.rows_removed;
            files += rw.files_rewritten;
            datasets.insert(dataset.clone());
        }
        for d in &datasets {
            let announced = feedloop_labeler::engine::announce(
                &self.control,
                &self.producer.get(),
                &self.partitions_schema,
                Some(d),
                feedloop_core::kafka::delivery_limit(&self.cfg.producer),
            )
            .await;
            let kafka_failed = matches!(
                announced,
                Err(feedloop_labeler::engine::EngineError::Kafka(_))
            );
            self.producer.record(!kafka_failed).await;
            announced.map_err(|e| e.to_string())?;
        }
        Ok((
            rows,
            json!({ "rows_removed": rows, "files_rewritten": files, "partitions": manifests.len(), "manifests": manifests }),
        ))
    }

    /// Tombstones, on each `feedloop.labels.<dataset>` (compacted, keyed by example id), every
    /// example the datasets target removed for this request: compaction then drops every
    /// version of them.
    async fn tombstone_labels(&self, id: Uuid, users: &[String]) -> Result<Done, String> {
        let erased = erasure::erased_examples(&self.control, id)
            .await
            .map_err(|e| e.to_string())?;
        let mut targets = Vec::new();
        for (dataset, examples) in &erased {
            let topic = feedloop_core::catalogue::labels_topic(dataset);
            targets.extend(
                examples
                    .iter()
                    .map(|e| (topic.clone(), e.as_bytes().to_vec())),
            );
        }
        // Every live record naming them, found by reading the topics: the examples above,
        // and any a labeler published in a commit it never recorded.
        let found = self.live_examples_naming(users).await?;
        let found_n = found.len();
        targets.extend(found);
        targets.sort();
        targets.dedup();
        let per_topic = self.send_tombstones(&targets).await?;
        Ok((
            targets.len() as i64,
            json!({
                "tombstones_written": targets.len(),
                "found_by_scan": found_n,
                "topics": per_topic,
                "compaction": format!(
                    "the broker drops every earlier version of these keys within max.compaction.lag.ms ({} ms) of the tombstone",
                    feedloop_core::kafka::COMPACTION_MAX_LAG_MS
                ),
            }),
        ))
    }

    /// The keys of live records on the datasets' labels topics that name one of `users` (as
    /// an Avro string: the viewer or candidate of a labeled example). Besides the examples the
    /// dataset rewrite removed, they include any a labeler published in a commit it never
    /// recorded (it stopped between publishing and its transaction), which no committed row,
    /// and so no dataset rewrite, names.
    async fn live_examples_naming(
        &self,
        users: &[String],
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        let datasets: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT dataset FROM labeler.positions ORDER BY 1")
                .fetch_all(&self.control)
                .await
                .map_err(|e| e.to_string())?;
        let needles: Vec<Vec<u8>> = users.iter().map(|u| avro_string(u)).collect();
        let mut out = Vec::new();
        for dataset in datasets {
            let topic = feedloop_core::catalogue::labels_topic(&dataset);
            let kafka = self.cfg.kafka.clone();
            let t = topic.clone();
            let read = tokio::task::spawn_blocking(move || {
                feedloop_core::kafka::read_to_end(&kafka, &t, Duration::from_secs(120))
            })
            .await
            .map_err(|e| e.to_string())?;
            // An absent topic (a dataset whose labeler published nothing) reads as empty.
            let records = read.map_err(|e| format!("reading {topic}: {e}"))?;
            // The latest record of each key decides (a key lives in one partition, read in
            // offset order).
            let mut latest: HashMap<Vec<u8>, bool> = HashMap::new();
            for r in records {
                let names = r
                    .value
                    .as_deref()
                    .is_some_and(|v| needles.iter().any(|n| memchr::memmem::find(v, n).is_some()));
                latest.insert(r.key, names);
            }
            out.extend(
                latest
                    .into_iter()
                    .filter(|(_, names)| *names)
                    .map(|(key, _)| (topic.clone(), key)),
            );
        }
        Ok(out)
    }

    /// Writes a tombstone (a null value) under each (topic, key) and waits for every delivery,
    /// each bounded by the producer's delivery limit; returns how many went to each topic.
    async fn send_tombstones(
        &self,
        targets: &[(String, Vec<u8>)],
    ) -> Result<std::collections::BTreeMap<String, i64>, String> {
        let producer = self.producer.get();
        let mut futures = Vec::with_capacity(targets.len());
        let mut per_topic = std::collections::BTreeMap::new();
        for (topic, key) in targets {
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(key);
            futures.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e.to_string())?,
            );
            *per_topic.entry(topic.clone()).or_insert(0) += 1;
        }
        let limit = feedloop_core::kafka::delivery_limit(&self.cfg.producer);
        let mut delivered = Ok(());
        for f in futures {
            let outcome = match tokio::time::timeout(limit, f).await {
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err((e, _)))) => Err(e.to_string()),
                Ok(Err(_)) => Err("producer closed".to_owned()),
                Err(_) => Err(format!("no delivery report within {limit:?}")),
            };
            if delivered.is_ok() {
                delivered = outcome;
            }
        }
        self.producer.record(delivered.is_ok()).await;
        delivered.map(|()| per_topic)
    }

    /// The keys an erased user's rows had on cdc's topics (`<cdc_topic_prefix>.*`), found by
    /// the owner header cdc puts on every change of a table with `[pii]`: (topic, key bytes).
    async fn owned_keys(&self, users: &[String]) -> Result<Vec<(String, Vec<u8>)>, String> {
        let prefix = format!("{}.", self.cfg.erasure.cdc_topic_prefix);
        let kafka = self.cfg.kafka.clone();
        let users: std::collections::HashSet<String> = users.iter().cloned().collect();
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = kafka
                .client_config("feedloop-eraser-scan")
                .create()
                .map_err(|e| e.to_string())?;
            let md = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let mut topics: Vec<String> = md
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|t| t.starts_with(&prefix))
                .collect();
            topics.sort();
            let mut keys = std::collections::BTreeSet::new();
            for topic in topics {
                let records =
                    feedloop_core::kafka::read_to_end(&kafka, &topic, Duration::from_secs(300))
                        .map_err(|e| e.to_string())?;
                for r in records {
                    let owned = r
                        .header(feedloop_core::catalogue::OWNER_HEADER)
                        .and_then(|o| std::str::from_utf8(o).ok())
                        .is_some_and(|o| users.contains(o));
                    if owned && !r.key.is_empty() {
                        keys.insert((topic.clone(), r.key));
                    }
                }
            }
            Ok(keys.into_iter().collect())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Tombstones every key of the users' rows on cdc's topics, in the format cdc keys them,
    /// and the raw user id on the configured external topics.
    async fn tombstones(&self, users: &[String]) -> Result<Done, String> {
        let mut targets = self.owned_keys(users).await?;
        let cdc_keys = targets.len();
        for topic in &self.cfg.erasure.tombstone_topics {
            for u in users {
                targets.push((topic.clone(), u.as_bytes().to_vec()));
            }
        }
        let per_topic = self.send_tombstones(&targets).await?;
        let n = targets.len() as i64;
        Ok((
            n,
            json!({
                "tombstones_written": n,
                "cdc_row_keys": cdc_keys,
                "topics": per_topic,
                "user_keyed_topics": self.cfg.erasure.tombstone_topics,
            }),
        ))
    }

    /// A keyed hash stands for each user id: provable for someone holding the id and the key,
    /// meaningless to anyone else.
    fn hash_user(&self, user: &str) -> String {
        let key = self.cfg.erasure.hash_key.expose().as_bytes();
        match Hmac::<Sha256>::new_from_slice(key) {
            Ok(mut mac) => {
                mac.update(user.as_bytes());
                mac.finalize()
                    .into_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }
            Err(_) => String::new(),
        }
    }

    fn certificate(
        &self,
        id: Uuid,
        users: &[String],
        states: &[store::TargetState],
    ) -> serde_json::Value {
        let manifests = states
            .iter()
            .find(|t| t.target == "datasets")
            .and_then(|t| t.details.get("manifests").cloned())
            .unwrap_or_else(|| json!([]));
        json!({
            "certificate_id": Uuid::now_v7(),
            "request_id": id,
            "user_id_hashes": users.iter().map(|u| self.hash_user(u)).collect::<Vec<_>>(),
            "status": "completed",
            "targets": states.iter().map(|t| json!({
                "target": t.target,
                "status": t.status,
                "affected": t.affected,
                "detail": t.details.to_string(),
                "finished_at": now_ms(),
            })).collect::<Vec<_>>(),
            "manifests": manifests,
            "verification": states
                .iter()
                .find(|t| t.target == "verify")
                .map(|t| t.details.clone())
                .unwrap_or_else(|| json!({})),
            "completed_at": now_ms(),
            "remains": self.remains(),
        })
    }

    /// What this erasure leaves for retention to remove, stated in the certificate.
    fn remains(&self) -> Vec<String> {
        let keks = self
            .cfg
            .keys
            .key_ring()
            .map(|r| r.ids().join(", "))
            .unwrap_or_default();
        let history = match self.cfg.keys.store {
            feedloop_core::crypto::KeyStoreKind::Postgres => {
                "the control database's WAL and WAL archive, base backups, replicas and dead row versions until VACUUM"
            }
            feedloop_core::crypto::KeyStoreKind::Scylla => {
                "ScyllaDB's commit log, sstables until compaction, and snapshots"
            }
        };
        vec![
            format!(
                "Wrapped copies of the destroyed data keys remain in {history} until the \
                 operator's backup and archive retention expires; they open only with \
                 key-encryption key(s) {keks}, and are unusable as soon as those are retired \
                 (KEK rotation)."
            ),
            format!(
                "Dead letters of input that named no readable user are sealed with a key of \
                 their day, destroyed {} days after it; until then operators can read them \
                 (feedloop deadletters show).",
                self.cfg.erasure.unattributed_retention_days
            ),
        ]
    }

    async fn publish_audit(&self, certificate: &serde_json::Value) -> Result<(), String> {
        let audit: AuditRecord =
            serde_json::from_value(certificate.clone()).map_err(|e| e.to_string())?;
        let mut value = Vec::new();
        self.audit_schema
            .encode(&audit, &mut value)
            .map_err(|e| e.to_string())?;
        let key = audit.request_id.clone();
        let sent = self
            .producer
            .get()
            .send(
                FutureRecord::to(ERASURE_AUDIT_TOPIC)
                    .key(&key)
                    .payload(&value),
                Duration::from_secs(30),
            )
            .await;
        self.producer
            .observe(sent)
            .await
            .map_err(|(e, _)| e.to_string())?;
        Ok(())
    }
}

/// `io.feedloop.erasure.ErasureAudit`.
#[derive(Debug, Serialize, serde::Deserialize)]
struct AuditRecord {
    certificate_id: String,
    request_id: String,
    user_id_hashes: Vec<String>,
    status: String,
    targets: Vec<AuditTarget>,
    manifests: Vec<AuditManifest>,
    completed_at: i64,
    #[serde(default)]
    remains: Vec<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct AuditTarget {
    target: String,
    status: String,
    affected: i64,
    detail: Option<String>,
    finished_at: Option<i64>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct AuditManifest {
    dataset: String,
    partition: String,
    before_version: i32,
    before_sha256: String,
    after_version: i32,
    after_sha256: String,
    rows_removed: i64,
}

/// The personal values recorded for request `id`, opened with the key they are sealed with;
/// none once that key is destroyed.
pub async fn recorded_values(
    control: &PgPool,
    keys: &dyn feedloop_core::crypto::KeyStore,
    id: Uuid,
) -> Result<Vec<String>, String> {
    let Some((sealed, owner)) = store::scan_values(control, id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(Vec::new());
    };
    let Some(key) = keys.get(&owner).await.map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    let plain = feedloop_core::crypto::open_bytes(&key, &owner, &sealed)
        .ok_or("the recorded values do not open")?;
    serde_json::from_slice(&plain).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::avro_string;

    #[test]
    fn strings_are_encoded_as_avro_does() {
        assert_eq!(avro_string("bob"), [6, b'b', b'o', b'b']);
        assert_eq!(avro_string(""), [0]);
        let long = "x".repeat(64);
        assert_eq!(avro_string(&long)[..2], [0x80, 0x01]);
    }
}
