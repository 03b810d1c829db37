//! An independent completeness scan of an erasure (`feedloop erase verify`, and the eraser's
//! last target): it looks for the users where feedloop could still hold them, without the code
//! paths that erased them — topics through a plain consumer over raw bytes, dataset files with
//! the parquet crate, the control database through SQL over whole rows.
//!
//! What counts as a failure:
//! - a personal value of the users (the plaintext their sealed fields held, recorded before
//!   their keys were destroyed, and any given) in the raw bytes of any record of any topic, any
//!   dataset row, or any row of feedloop's tables;
//! - a live record of theirs on a compacted topic (the latest record of its key: what the
//!   topic holds once compacted) — a row of a table they own (cdc's owner header), an example
//!   of theirs on a labels topic, a record keyed by their id; a user id in a dataset row under a
//!   current manifest, or in feedloop's tables other than those that must name them (the
//!   suppression list, the destroyed key's marker, the erasure records);
//! - a file a rewrite replaced, still readable; a data key of theirs still stored.
//!
//! What it reports without failing: records of append-only topics (the event log, dead
//! letters) that still name a user id — pseudonymous, their personal fields sealed — until the
//! topic's retention removes them; a compacted topic's earlier records awaiting compaction; and
//! live rows of tables no single user owns (a match names both its users), which the topic
//! keeps as long as the product database keeps the row.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray};
use feedloop_core::{
    crypto::KeyStore,
    kafka::{KafkaConfig, LogRecord},
};
use feedloop_labeler::dataset::{Manifest, Root};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("control database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("datasets: {0}")]
    Datasets(String),
    #[error("key store: {0}")]
    Keys(#[from] feedloop_core::crypto::CryptoError),
}

/// One line of the pass/fail table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was scanned: `topic <name>`, `datasets`, `replaced files`, `join-state
    /// checkpoints`, `table <schema.name>`, `key store`.
    pub check: String,
    /// `pass`, `fail`, or `info` (noted, not a failure).
    pub status: String,
    pub detail: String,
}

impl Check {
    fn new(check: impl Into<String>, failed: bool, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: if failed { "fail" } else { "pass" }.into(),
            detail: detail.into(),
        }
    }

    fn info(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: "info".into(),
            detail: detail.into(),
        }
    }
}

/// Whether every check passed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.status != "fail")
}

/// The table, for a terminal.
pub fn render(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!("{:<width$}  {:<6}  detail\n", "check", "result");
    for c in checks {
        out.push_str(&format!(
            "{:<width$}  {:<6}  {}\n",
            c.check, c.status, c.detail
        ));
    }
    out
}

/// Where to look.
#[derive(Debug, Clone)]
pub struct Places {
    pub kafka: KafkaConfig,
    pub control: PgPool,
    pub datasets: Root,
}

/// Who and what to look for.
#[derive(Debug, Clone, Default)]
pub struct Needles {
    pub users: Vec<String>,
    /// Plaintext personal values (never printed: hits are counted).
    pub values: Vec<String>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

fn record_has(r: &LogRecord, needle: &[u8]) -> bool {
    contains(&r.key, needle)
        || r.value.as_deref().is_some_and(|v| contains(v, needle))
        || r.headers.iter().any(|(_, v)| contains(v, needle))
}

/// Runs every check.
pub async fn verify(
    places: &Places,
    keys: &dyn KeyStore,
    needles: &Needles,
) -> Result<Vec<Check>, VerifyError> {
    let mut checks = topics(&places.kafka, needles).await?;
    checks.extend(datasets(&places.control, &places.datasets, needles).await?);
    checks.push(state_checkpoints(&places.datasets, needles).await?);
    checks.extend(tables(&places.control, needles).await?);
    let mut live = 0;
    for u in &needles.users {
        if keys.get(u).await?.is_some() {
            live += 1;
        }
    }
    let wrapped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keys.user_keys
         WHERE user_id = ANY($1) AND (wrapped IS NOT NULL OR key IS NOT NULL)",
    )
    .bind(&needles.users)
    .fetch_one(&places.control)
    .await?;
    checks.push(Check::new(
        "key store",
        live > 0 || wrapped > 0,
        format!("{live} data keys readable, {wrapped} stored (wrapped or not)"),
    ));
    Ok(checks)
}

/// Every topic of the cluster, read raw.
async fn topics(kafka: &KafkaConfig, needles: &Needles) -> Result<Vec<Check>, VerifyError> {
    let k = kafka.clone();
    let names = tokio::task::spawn_blocking(move || topic_names(&k))
        .await
        .map_err(|e| VerifyError::Kafka(e.to_string()))??;
    let compacted = compacted_topics(kafka, &names).await?;
    let kafka = kafka.clone();
    let needles = needles.clone();
    tokio::task::spawn_blocking(move || topics_blocking(&kafka, &names, &compacted, &needles))
        .await
        .map_err(|e| VerifyError::Kafka(e.to_string()))?
}

fn topic_names(kafka: &KafkaConfig) -> Result<Vec<String>, VerifyError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka
        .client_config("feedloop-verify")
        .create()
        .map_err(|e| VerifyError::Kafka(e.to_string()))?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| VerifyError::Kafka(e.to_string()))?;
    let mut names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|t| !t.starts_with("__"))
        .collect();
    names.sort();
    Ok(names)
}

/// The topics among `names` whose `cleanup.policy` compacts.
async fn compacted_topics(
    kafka: &KafkaConfig,
    names: &[String],
) -> Result<HashSet<String>, VerifyError> {
    use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
    if names.is_empty() {
        return Ok(HashSet::new());
    }
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = kafka
        .client_config("feedloop-verify-admin")
        .create()
        .map_err(|e| VerifyError::Kafka(e.to_string()))?;
    let specs: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .describe_configs(&specs, &opts)
        .await
        .map_err(|e| VerifyError::Kafka(e.to_string()))?;
    let mut out = HashSet::new();
    for r in results.into_iter().flatten() {
        let compacted = r
            .get("cleanup.policy")
            .and_then(|e| e.value.as_deref())
            .is_some_and(|v| v.contains("compact"));
        if compacted && let OwnedResourceSpecifier::Topic(name) = r.specifier {
            out.insert(name);
        }
    }
    Ok(out)
}

fn topics_blocking(
    kafka: &KafkaConfig,
    names: &[String],
    compacted: &HashSet<String>,
    needles: &Needles,
) -> Result<Vec<Check>, VerifyError> {
    let users: Vec<&[u8]> = needles.users.iter().map(|u| u.as_bytes()).collect();
    let values: Vec<&[u8]> = needles.values.iter().map(|v| v.as_bytes()).collect();
    let mut checks = Vec::new();
    for name in names {
        let records = feedloop_core::kafka::read_to_end(kafka, name, Duration::from_secs(600))
            .map_err(|e| VerifyError::Kafka(e.to_string()))?;
        let plaintext = records
            .iter()
            .filter(|r| values.iter().any(|v| record_has(r, v)))
            .count();
        let naming = records
            .iter()
            .filter(|r| users.iter().any(|u| record_has(r, u)))
            .count();
        let check = format!("topic {name}");
        if compacted.contains(name) {
            // What the topic holds once compacted: the latest record of each key. A live one
            // the erasure had to remove fails: a row of theirs (cdc's owner header), an example
            // of theirs (a labels topic), a record keyed by their id. Rows of tables no single
            // user owns (a match names two) stay as the product database keeps them: noted.
            let labels = name.starts_with("feedloop.labels.");
            let mut latest: HashMap<(i32, &[u8]), &LogRecord> = HashMap::new();
            for r in &records {
                if !r.key.is_empty() {
                    latest.insert((r.partition, r.key.as_slice()), r);
                }
            }
            let (mut live_theirs, mut live_other) = (0, 0);
            for r in latest.values().filter(|r| r.value.is_some()) {
                let owner = r.header(feedloop_core::catalogue::OWNER_HEADER);
                let theirs = owner.is_some_and(|o| users.contains(&o))
                    || users.contains(&r.key.as_slice())
                    || (labels && users.iter().any(|u| record_has(r, u)));
                if theirs {
                    live_theirs += 1;
                } else if users.iter().any(|u| record_has(r, u)) {
                    live_other += 1;
                }
            }
            let detail = format!(
                "compacted; {} records; personal values in {plaintext}; live records of theirs \
                 {live_theirs}; {} earlier records naming them await compaction{}",
                records.len(),
                naming.saturating_sub(live_theirs + live_other),
                if live_other > 0 {
                    format!(
                        "; {live_other} live rows of tables no single user owns name them \
                         (pseudonymous ids, kept as the product database keeps the rows)"
                    )
                } else {
                    String::new()
                }
            );
            checks.push(if plaintext > 0 || live_theirs > 0 {
                Check::new(check, true, detail)
            } else if live_other > 0 {
                Check::info(check, detail)
            } else {
                Check::new(check, false, detail)
            });
        } else if plaintext > 0 {
            checks.push(Check::new(
                check,
                true,
                format!("{} records; personal values in {plaintext}", records.len()),
            ));
        } else if naming > 0 {
            checks.push(Check::info(
                check,
                format!(
                    "{} records; no personal value; {naming} name a user id (pseudonymous, \
                     personal fields sealed) until the topic's retention.ms removes them",
                    records.len()
                ),
            ));
        } else {
            checks.push(Check::new(
                check,
                false,
                format!("{} records; nothing of the users", records.len()),
            ));
        }
    }
    Ok(checks)
}

fn batch_hits(batch: &RecordBatch, needles: &[&str]) -> usize {
    let mut hits = 0;
    for col in batch.columns() {
        let texts: Box<dyn Iterator<Item = Option<&str>>> =
            if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
                Box::new(a.iter())
            } else if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
                Box::new(a.iter())
            } else {
                continue;
            };
        hits += texts
            .flatten()
            .filter(|t| needles.iter().any(|n| !n.is_empty() && t.contains(n)))
            .count();
    }
    hits
}

/// Every file under the current manifests, read with the parquet crate; and every file the
/// older versions listed but the current ones do not, which must be gone.
async fn datasets(
    control: &PgPool,
    root: &Root,
    needles: &Needles,
) -> Result<Vec<Check>, VerifyError> {
    let rows: Vec<(String, String, i32, String)> = sqlx::query_as(
        "SELECT dataset, partition, version, manifest FROM labeler.partitions
         ORDER BY dataset, partition, version",
    )
    .fetch_all(control)
    .await?;
    let mut by_partition: BTreeMap<(String, String), Vec<Manifest>> = BTreeMap::new();
    for (dataset, partition, _, text) in rows {
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| VerifyError::Datasets(e.to_string()))?;
        by_partition
            .entry((dataset, partition))
            .or_default()
            .push(m);
    }
    let all: Vec<&str> = needles
        .users
        .iter()
        .chain(&needles.values)
        .map(String::as_str)
        .collect();
    let (mut files, mut rows_hit, mut replaced, mut replaced_left) = (0, 0, 0, 0);
    for versions in by_partition.values() {
        let Some(current) = versions.last() else {
            continue;
        };
        let current_uris: HashSet<&str> = current.files.iter().map(|f| f.uri.as_str()).collect();
        for f in &current.files {
            let rel = root
                .rel_of(&f.uri)
                .ok_or_else(|| VerifyError::Datasets(format!("{} is outside the root", f.uri)))?;
            let bytes = root
                .get(&rel)
                .await
                .map_err(|e| VerifyError::Datasets(e.to_string()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .map_err(|e| VerifyError::Datasets(format!("{}: {e}", f.uri)))?;
            for batch in reader {
                let batch = batch.map_err(|e| VerifyError::Datasets(e.to_string()))?;
                rows_hit += batch_hits(&batch, &all);
            }
            files += 1;
        }
        for old in &versions[..versions.len() - 1] {
            for f in &old.files {
                if current_uris.contains(f.uri.as_str()) {
                    continue;
                }
                replaced += 1;
                if let Some(rel) = root.rel_of(&f.uri)
                    && root.get(&rel).await.is_ok()
                {
                    replaced_left += 1;
                }
            }
        }
    }
    Ok(vec![
        Check::new(
            "datasets",
            rows_hit > 0,
            format!(
                "{files} current files read; {rows_hit} values name the users or hold their personal data"
            ),
        ),
        Check::new(
            "replaced files",
            replaced_left > 0,
            format!("{replaced} files of superseded versions; {replaced_left} still readable"),
        ),
    ])
}

/// Every file under the root's join-state checkpoints (`_state/`: local join state), listed by
/// a checkpoint or left over, read raw.
pub async fn state_checkpoints(root: &Root, needles: &Needles) -> Result<Check, VerifyError> {
    let files = root
        .list(feedloop_labeler::state::checkpoint::STATE_DIR)
        .await
        .map_err(|e| VerifyError::Datasets(e.to_string()))?;
    let mut hits = 0;
    for rel in &files {
        let bytes = root
            .get(rel)
            .await
            .map_err(|e| VerifyError::Datasets(e.to_string()))?;
        if needles
            .users
            .iter()
            .chain(&needles.values)
            .any(|n| contains(&bytes, n.as_bytes()))
        {
            hits += 1;
        }
    }
    Ok(Check::new(
        "join-state checkpoints",
        hits > 0,
        format!(
            "{} segment files read; {hits} name the users or hold their personal data",
            files.len()
        ),
    ))
}

/// Tables that name a user by design while they are erased, and why.
const BY_DESIGN: &[(&str, &str)] = &[
    (
        "collector.suppressed_users",
        "the suppression list must name them",
    ),
    (
        "keys.user_keys",
        "the destroyed key's marker (checked under key store)",
    ),
    ("eraser.requests", "the erasure record"),
    ("eraser.targets", "the erasure record"),
    ("eraser.transitions", "the erasure record"),
];

/// Every row of feedloop's tables, as text (bytea columns as hex), for the needles.
async fn tables(control: &PgPool, needles: &Needles) -> Result<Vec<Check>, VerifyError> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables
         WHERE table_schema IN ('collector', 'cdc', 'registry', 'labeler', 'trigger', 'keys', 'eraser')
           AND table_type = 'BASE TABLE'
         ORDER BY 1, 2",
    )
    .fetch_all(control)
    .await?;
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let mut checks = Vec::new();
    for (schema, table) in tables {
        let name = format!("{schema}.{table}");
        let count = |needles: Vec<String>| {
            let name = name.clone();
            async move {
                if needles.is_empty() {
                    return Ok::<i64, sqlx::Error>(0);
                }
                let hexed: Vec<String> = needles.iter().map(|n| hex(n)).collect();
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM {name} t WHERE EXISTS (
                       SELECT 1 FROM unnest($1::text[], $2::text[]) AS n(plain, hexed)
                       WHERE strpos(t::text, n.plain) > 0 OR strpos(t::text, n.hexed) > 0)"
                )))
                .bind(&needles)
                .bind(&hexed)
                .fetch_one(control)
                .await
            }
        };
        let with_values = count(needles.values.clone()).await?;
        let with_users = count(needles.users.clone()).await?;
        let check = format!("table {name}");
        match BY_DESIGN.iter().find(|(t, _)| *t == name) {
            Some((_, why)) => checks.push(if with_values > 0 {
                Check::new(
                    check,
                    true,
                    format!("{with_values} rows hold personal values"),
                )
            } else {
                Check::info(check, format!("{with_users} rows name the users: {why}"))
            }),
            None => checks.push(Check::new(
                check,
                with_values + with_users > 0,
                format!("{with_users} rows name the users; {with_values} hold personal values"),
            )),
        }
    }
    Ok(checks)
}

/// Shortest personal value searched for (shorter ones would match unrelated bytes).
pub const MIN_VALUE_LEN: usize = 4;

/// The sealed fields (`fl1:` tokens) in a record's bytes, each as the longest run of base64url
/// characters after the prefix: in binary encodings (Avro) the byte after a field can itself
/// look like base64url, so a token may carry a few characters too many ([`open_token`]).
fn sealed_tokens(bytes: &[u8]) -> Vec<&str> {
    let prefix = feedloop_core::crypto::SEALED_PREFIX.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + prefix.len() <= bytes.len() {
        if &bytes[i..i + prefix.len()] != prefix {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i + prefix.len();
        while end < bytes.len()
            && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'-' || bytes[end] == b'_')
        {
            end += 1;
        }
        if let Ok(token) = std::str::from_utf8(&bytes[start..end]) {
            out.push(token);
        }
        i = end;
    }
    out
}

/// Opens a token from [`sealed_tokens`] with `user`'s key, dropping trailing characters until
/// it authenticates (a wrong length never does).
fn open_token(key: &feedloop_core::crypto::DataKey, user: &str, token: &str) -> Option<String> {
    // nonce + tag, in base64url, after the prefix: the shortest sealed value.
    let shortest = feedloop_core::crypto::SEALED_PREFIX.len() + (24 + 16) * 4 / 3;
    let mut end = token.len();
    while end >= shortest {
        if let feedloop_core::crypto::Opened::Clear(text) =
            feedloop_core::crypto::open(Some(key), user, &token[..end])
        {
            return Some(text);
        }
        end -= 1;
    }
    None
}

/// The personal values the log holds for `users`, in the clear: every sealed field of the
/// records of cdc's topics (`<cdc_prefix>.*`) their rows own and of the event log's records
/// naming them, opened with their data keys. Call it before the keys are destroyed.
pub async fn inventory(
    kafka: &KafkaConfig,
    cdc_prefix: &str,
    keys: &dyn KeyStore,
    users: &[String],
) -> Result<Vec<String>, VerifyError> {
    let mut user_keys = Vec::new();
    for u in users {
        if let Some(k) = keys.get(u).await? {
            user_keys.push((u.clone(), k));
        }
    }
    if user_keys.is_empty() {
        return Ok(Vec::new());
    }
    let kafka = kafka.clone();
    let prefix = format!("{cdc_prefix}.");
    tokio::task::spawn_blocking(move || {
        let mut topics: Vec<String> = topic_names(&kafka)?
            .into_iter()
            .filter(|t| t.starts_with(&prefix))
            .collect();
        topics.push(feedloop_core::catalogue::EVENTS_TOPIC.to_owned());
        let mut values = std::collections::BTreeSet::new();
        for topic in topics {
            let records =
                feedloop_core::kafka::read_to_end(&kafka, &topic, Duration::from_secs(600))
                    .map_err(|e| VerifyError::Kafka(e.to_string()))?;
            for r in &records {
                let Some(value) = &r.value else { continue };
                let owner = r
                    .header(feedloop_core::catalogue::OWNER_HEADER)
                    .and_then(|o| std::str::from_utf8(o).ok());
                for (user, key) in &user_keys {
                    let theirs = match owner {
                        Some(o) => o == user,
                        None => contains(value, user.as_bytes()),
                    };
                    if !theirs {
                        continue;
                    }
                    for token in sealed_tokens(value) {
                        if let Some(text) = open_token(key, user, token)
                            && text.chars().count() >= MIN_VALUE_LEN
                        {
                            values.insert(text);
                        }
                    }
                }
            }
        }
        Ok(values.into_iter().collect())
    })
    .await
    .map_err(|e| VerifyError::Kafka(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_sealed_token_in_raw_bytes() {
        let key = feedloop_core::crypto::DataKey::generate();
        let a = feedloop_core::crypto::seal(&key, "u1", "a@example.com").expect("seal");
        let b = feedloop_core::crypto::seal(&key, "u1", "+33 6 12").expect("seal");
        let mut bytes = vec![0u8, 12, 200];
        bytes.extend_from_slice(a.as_bytes());
        bytes.push(0x1a);
        bytes.extend_from_slice(b.as_bytes());
        // An Avro length prefix that looks like base64url ('B': a 33-byte string follows).
        bytes.extend_from_slice(b"Bnext\x00");
        bytes.extend_from_slice(b"fl1:");
        let tokens = sealed_tokens(&bytes);
        assert_eq!(tokens.len(), 3);
        assert_eq!(tokens[0], a.as_str());
        assert_eq!(
            open_token(&key, "u1", tokens[0]).as_deref(),
            Some("a@example.com")
        );
        assert_eq!(
            open_token(&key, "u1", tokens[1]).as_deref(),
            Some("+33 6 12")
        );
        assert_eq!(open_token(&key, "u2", tokens[1]), None, "bound to the user");
        assert_eq!(open_token(&key, "u1", tokens[2]), None);
        assert!(contains(b"xx-user-1-yy", b"user-1"));
        assert!(!contains(b"xx", b""));
    }

    #[test]
    fn the_table_shows_every_check_and_fails_on_any_failure() {
        let checks = vec![
            Check::new("topic a", false, "ok"),
            Check::info("topic b", "noted"),
        ];
        assert!(passed(&checks));
        let text = render(&checks);
        assert!(text.contains("topic a") && text.contains("info"));
        let mut failing = checks;
        failing.push(Check::new("datasets", true, "1 row"));
        assert!(!passed(&failing));
    }
}
