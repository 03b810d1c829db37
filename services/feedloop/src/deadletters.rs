//! `feedloop deadletters show`: reads `feedloop.deadletter` and opens each letter's original
//! bytes with the data key it is sealed with, while that key lives.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use base64::Engine;
use feedloop_core::{
    catalogue::DEADLETTER_TOPIC,
    config::Secret,
    crypto::{KeyRing, KeyStore, PostgresKeyStore},
    kafka::KafkaConfig,
    model::{DeadLetter, OpenedOriginal},
    registry_client::RegistryClient,
};
use serde_json::json;

/// Where the dead letters and their keys are.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// A dev stack's directory: its `endpoints.json` gives whatever is not set explicitly.
    pub dev: Option<PathBuf>,
    pub kafka: Option<String>,
    pub registry: Option<String>,
    pub registry_user: Option<String>,
    pub registry_password: Option<String>,
    /// The control database holding `keys.user_keys`.
    pub control: Option<String>,
    /// The key ring (`keys.kek`).
    pub kek: Option<String>,
}

/// Which letters to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub service: Option<String>,
    pub id: Option<String>,
    /// The most recent this many (after the other filters).
    pub limit: usize,
}

struct Resolved {
    kafka: String,
    registry: String,
    registry_user: String,
    registry_password: String,
    control: String,
    kek: String,
}

fn resolve(c: Connection) -> anyhow::Result<Resolved> {
    let dev = c
        .dev
        .as_deref()
        .map(crate::dev::Endpoints::read)
        .transpose()?;
    let pick = |explicit: Option<String>, from_dev: Option<String>, what: &str| {
        explicit
            .or(from_dev.filter(|v| !v.is_empty()))
            .with_context(|| format!("{what} is required (or --dev DIR of a running dev stack)"))
    };
    let d = dev.as_ref();
    Ok(Resolved {
        kafka: pick(
            c.kafka,
            d.map(|e| e.kafka_bootstrap.clone()),
            "--kafka (or KAFKA_BOOTSTRAP)",
        )?,
        registry: pick(
            c.registry,
            d.map(|e| e.registry_url.clone()),
            "--registry (or FEEDLOOP_REGISTRY_URL)",
        )?,
        registry_user: c
            .registry_user
            .or(d.map(|e| e.registry_user.clone()))
            .unwrap_or_else(|| "feedloop".into()),
        registry_password: c
            .registry_password
            .or(d.map(|e| e.registry_password.clone()))
            .unwrap_or_default(),
        control: pick(
            c.control,
            d.map(|e| e.postgres_url.clone()),
            "--control (or FEEDLOOP_CONTROL_URL)",
        )?,
        kek: pick(
            c.kek,
            d.map(|e| e.keys_kek.clone()),
            "--kek (or FEEDLOOP_KEYS__KEK)",
        )?,
    })
}

/// Prints the matching dead letters as JSON lines (see [`read`]); returns how many.
pub async fn show(connection: Connection, filter: Filter) -> anyhow::Result<usize> {
    let letters = read(connection, filter).await?;
    for l in &letters {
        println!("{l}");
    }
    Ok(letters.len())
}

/// The matching dead letters, oldest first, each original opened (`state`: `clear` with its
/// text or base64, `erased` once its key is destroyed, `invalid`, or `unsealed` for letters
/// written before sealing).
pub async fn read(
    connection: Connection,
    filter: Filter,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let c = resolve(connection)?;
    let ring = KeyRing::parse(&c.kek).context("the key ring")?;
    let registry = RegistryClient::new(
        &c.registry,
        Some((
            c.registry_user.clone(),
            Secret::new(c.registry_password.clone()),
        )),
        "",
        Duration::from_secs(10),
    )?;
    let pool = sqlx::PgPool::connect(&c.control)
        .await
        .context("connecting to the control database")?;
    let keys = PostgresKeyStore::new(pool.clone(), ring);
    let kafka = KafkaConfig::new(c.kafka.clone());
    let records = tokio::task::spawn_blocking(move || {
        feedloop_core::kafka::read_to_end(&kafka, DEADLETTER_TOPIC, Duration::from_secs(120))
    })
    .await??;
    let mut letters = Vec::new();
    for r in records {
        let Some(value) = r.value else { continue };
        let dl: DeadLetter = match registry.decode(&value).await {
            Ok(dl) => dl,
            Err(e) => {
                eprintln!(
                    "partition {} offset {}: not a dead letter ({e})",
                    r.partition, r.offset
                );
                continue;
            }
        };
        if filter.service.as_ref().is_some_and(|s| *s != dl.service)
            || filter
                .id
                .as_ref()
                .is_some_and(|id| *id != dl.dead_letter_id.to_string())
        {
            continue;
        }
        letters.push((r.partition, r.offset, dl));
    }
    letters.sort_by_key(|(_, _, dl)| (dl.received_at, dl.dead_letter_id));
    let skip = letters.len().saturating_sub(filter.limit);
    let mut out = Vec::with_capacity(letters.len() - skip);
    for (partition, offset, dl) in letters.into_iter().skip(skip) {
        let key = match &dl.sealed_by {
            Some(owner) => keys
                .get(owner)
                .await
                .with_context(|| format!("the key of dead letter {}", dl.dead_letter_id))?,
            None => None,
        };
        let original = match (dl.sealed_by.is_some(), dl.open(key.as_ref())) {
            (false, OpenedOriginal::Clear(bytes)) => original_json("unsealed", &bytes),
            (true, OpenedOriginal::Clear(bytes)) => original_json("clear", &bytes),
            (_, OpenedOriginal::Erased) => json!({"state": "erased"}),
            (_, OpenedOriginal::Invalid) => json!({"state": "invalid"}),
        };
        out.push(json!({
                "dead_letter_id": dl.dead_letter_id,
                "service": dl.service,
                "reason": dl.reason.as_str(),
                "detail": dl.detail,
                "received_at": dl.received_at,
                "path": dl.path,
                "event_type": dl.event_type,
                "event_id": dl.event_id,
                "app_id": dl.app_id,
                "source_topic": dl.source_topic,
                "source_partition": dl.source_partition,
                "source_offset": dl.source_offset,
                "original_size": dl.original_size,
                "original_sha256": dl.original_sha256,
                "sealed_by": dl.sealed_by,
                "original": original,
                "topic_partition": partition,
                "topic_offset": offset,
        }));
    }
    pool.close().await;
    Ok(out)
}

fn original_json(state: &str, bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!({"state": state, "text": text}),
        Err(_) => json!({
            "state": state,
            "base64": base64::engine::general_purpose::STANDARD.encode(bytes),
        }),
    }
}
