//! What happens to a parsed batch: suppression, deduplication, encoding, and durability.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use feedloop_core::{
    avro::{CodecError, CompiledSchema, SchemaSet},
    catalogue::{Catalogue, DEADLETTER_TOPIC, EVENTS_TOPIC, TOPICS},
    crypto::{CryptoError, DataKey, KeyCache},
    model::{DeadLetter, DeadLetterReason, Event, EventType},
    registry_client::{RegistryClient, RegistryClientError},
};
use serde::Serialize;

use crate::{
    dedup::{Claim, Dedup},
    durable::{Durability, Durable, DurableError, now_ms},
    ingest::{Parsed, Reject},
    observability,
    spool::Record,
    suppression::Suppression,
};

/// Compiled writer schemas of everything the collector publishes.
#[derive(Debug)]
pub struct Codecs {
    events: HashMap<EventType, Arc<CompiledSchema>>,
    deadletter: Arc<CompiledSchema>,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecsError {
    #[error("catalogue: {0}")]
    Catalogue(String),
    #[error("registering {subject}: {source}")]
    Register {
        subject: String,
        source: RegistryClientError,
    },
}

impl Codecs {
    /// Registers the catalogue records the collector writes and compiles their schemas.
    pub async fn register(client: &RegistryClient) -> Result<Self, CodecsError> {
        let catalogue = Catalogue::embedded().map_err(|e| CodecsError::Catalogue(e.to_string()))?;
        let subject_of = |topic: &str, record: &str| {
            TOPICS
                .iter()
                .find(|t| t.name == topic)
                .map(|t| t.subject(record))
                .ok_or_else(|| CodecsError::Catalogue(format!("no topic {topic}")))
        };
        let compile = |subject: String, record: &'static str| {
            let catalogue = &catalogue;
            async move {
                let schema = catalogue
                    .composed(record)
                    .map_err(|e| CodecsError::Catalogue(e.to_string()))?;
                client
                    .register_compiled(&subject, &schema)
                    .await
                    .map_err(|source| CodecsError::Register { subject, source })
            }
        };
        let mut events = HashMap::new();
        for t in EventType::ALL {
            events.insert(
                t,
                compile(subject_of(EVENTS_TOPIC, t.record())?, t.record()).await?,
            );
        }
        let dl = "io.feedloop.deadletter.DeadLetter";
        let deadletter = compile(subject_of(DEADLETTER_TOPIC, dl)?, dl).await?;
        Ok(Self { events, deadletter })
    }

    /// Compiles the catalogue locally under made-up schema ids, without a registry: for
    /// benchmarks and unit tests.
    pub fn local() -> Result<Self, CodecsError> {
        let catalogue = Catalogue::embedded().map_err(|e| CodecsError::Catalogue(e.to_string()))?;
        let compile = |id: u32, record: &str| -> Result<Arc<CompiledSchema>, CodecsError> {
            let text = catalogue
                .composed(record)
                .map_err(|e| CodecsError::Catalogue(e.to_string()))?;
            CompiledSchema::new(id, &text)
                .map(Arc::new)
                .map_err(|e| CodecsError::Catalogue(e.to_string()))
        };
        let mut events = HashMap::new();
        for (i, t) in EventType::ALL.into_iter().enumerate() {
            events.insert(t, compile(u32::try_from(i).unwrap_or(0) + 1, t.record())?);
        }
        let deadletter = compile(100, "io.feedloop.deadletter.DeadLetter")?;
        Ok(Self { events, deadletter })
    }

    /// The Confluent frame of an event.
    pub fn encode_event(&self, event: &Event, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let schema = self
            .events
            .get(&event.event_type())
            .ok_or(CodecError::UnknownSchemaId(0))?;
        match event {
            Event::MatchImpression(e) => schema.encode(e, out),
            Event::MatchDecision(e) => schema.encode(e, out),
            Event::ChatEnded(e) => schema.encode(e, out),
            Event::ReportSubmitted(e) => schema.encode(e, out),
            Event::UserBlocked(e) => schema.encode(e, out),
            Event::ScreenViewed(e) => schema.encode(e, out),
            Event::UserIdentified(e) => schema.encode(e, out),
        }
    }

    /// The dead-letter schema.
    pub fn deadletter(&self) -> Arc<CompiledSchema> {
        self.deadletter.clone()
    }

    pub fn encode_dead_letter(&self, dl: &DeadLetter, out: &mut Vec<u8>) -> Result<(), CodecError> {
        self.deadletter.encode(dl, out)
    }

    /// Every schema this writes with, by id: to read its frames back (tests, fuzzing).
    pub fn schema_set(&self) -> SchemaSet {
        let mut set = SchemaSet::default();
        for schema in self.events.values().chain([&self.deadletter]) {
            set.insert(schema.clone());
        }
        set
    }
}

/// The outcome of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Accepted,
    Duplicate,
    Suppressed,
    Rejected,
}

/// One line of the per-event answer.
#[derive(Debug, Clone, Serialize)]
pub struct EventResult {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Set when retrying the same event later will work (it was in flight in another request).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
}

/// The answer to a batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub suppressed: usize,
    pub rejected: usize,
    /// `acked` by the broker, or `spooled` locally while the broker is unreachable.
    pub durability: &'static str,
    pub results: Vec<EventResult>,
}

/// Why a batch could not be taken; nothing of it was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Durable(#[from] DurableError),
    /// Personal fields cannot be sealed: the batch is refused rather than logged in the clear.
    #[error("data keys unavailable: {0}")]
    Keys(#[from] CryptoError),
    /// A dead letter does not fit its schema (a bug).
    #[error("cannot encode a dead letter: {0}")]
    Encode(#[from] CodecError),
}

/// Everything the request path needs.
#[derive(Debug)]
pub struct Pipeline {
    pub dedup: Arc<Dedup>,
    pub durable: Arc<Durable>,
    pub suppression: Arc<Suppression>,
    pub codecs: Codecs,
    /// Data keys that seal personal fields (device ids, report comments) before they are logged.
    pub keys: Arc<KeyCache>,
}

impl Pipeline {
    /// A dead-letter record for `reject`, its original sealed with the key of the user it
    /// names (or the day's unattributed key).
    pub async fn dead_letter(
        &self,
        app_id: &str,
        reject: &Reject,
        received_at: i64,
    ) -> Result<Record, IngestError> {
        let owner = crate::ingest::owner_of(&reject.original);
        let dl = DeadLetter {
            path: reject.path.clone(),
            event_type: reject.event_type.clone(),
            event_id: reject.event_id.clone(),
            app_id: Some(app_id.to_owned()),
            ..DeadLetter::new(
                "collector",
                reject.reason,
                reject.detail.clone(),
                &reject.original,
                received_at,
            )
        }
        .seal(&self.keys, owner.as_deref(), now_ms())
        .await?;
        let mut value = Vec::with_capacity(64 + dl.original.len());
        self.codecs.encode_dead_letter(&dl, &mut value)?;
        observability::rejected(reject.reason.as_str());
        Ok(Record {
            id: dl.dead_letter_id.as_u128(),
            topic: DEADLETTER_TOPIC.into(),
            key: app_id.as_bytes().to_vec(),
            value,
            event_type: "dead_letter".into(),
            at_ms: received_at,
        })
    }

    /// Makes the batch durable and says what happened to each event.
    pub async fn ingest(
        self: &Arc<Self>,
        app_id: &str,
        parsed: Vec<Parsed>,
        received_at: i64,
    ) -> Result<BatchResponse, IngestError> {
        // Decide suppression once per event: the list may change while the batch is handled.
        let dropped: Vec<bool> = parsed
            .iter()
            .map(|p| matches!(p, Parsed::Event(e) if self.suppression.contains(&e.envelope().user_id)))
            .collect();
        // The data keys of users whose events carry personal fields (one store round trip for
        // those not cached), before anything is claimed.
        let owners: HashSet<String> = parsed
            .iter()
            .zip(&dropped)
            .filter_map(|(p, dropped)| match p {
                Parsed::Event(e) if !dropped && e.has_personal() => {
                    Some(e.envelope().user_id.clone())
                }
                _ => None,
            })
            .collect();
        let mut keys: HashMap<String, Option<DataKey>> = HashMap::with_capacity(owners.len());
        if !owners.is_empty() {
            self.keys.prefetch(owners.iter().cloned()).await?;
            for user in owners {
                let key = self.keys.sealing_key(&user).await?;
                keys.insert(user, key);
            }
        }
        // Dead letters of the rejected events, sealed before anything is claimed: without their
        // keys the batch is refused (503) rather than losing them.
        let mut letters: HashMap<usize, Record> = HashMap::new();
        for (index, p) in parsed.iter().enumerate() {
            if let Parsed::Reject(r) = p {
                letters.insert(index, self.dead_letter(app_id, r, received_at).await?);
            }
        }
        let ids: Vec<u128> = parsed
            .iter()
            .zip(&dropped)
            .filter_map(|(p, dropped)| match p {
                Parsed::Event(e) if !dropped => Some(e.envelope().event_id.as_u128()),
                _ => None,
            })
            .collect();
        let mut claims = self.dedup.claim(&ids).into_iter();
        let mut claimed: Vec<u128> = Vec::with_capacity(ids.len());
        let mut records: Vec<Record> = Vec::with_capacity(parsed.len());
        let mut results = Vec::with_capacity(parsed.len());
        let mut accepted_types: Vec<&'static str> = Vec::new();
        let (mut dups, mut suppressed) = (0, 0);
        for (index, p) in parsed.into_iter().enumerate() {
            match p {
                Parsed::Event(mut e) => {
                    let env = e.envelope();
                    let event_id = Some(env.event_id.to_string());
                    if dropped[index] {
                        suppressed += 1;
                        results.push(EventResult {
                            index,
                            event_id,
                            status: Status::Suppressed,
                            reason: None,
                            path: None,
                            detail: None,
                            retryable: false,
                        });
                        continue;
                    }
                    match claims.next() {
                        Some(Claim::New) => {}
                        Some(Claim::Duplicate) => {
                            dups += 1;
                            results.push(EventResult {
                                index,
                                event_id,
                                status: Status::Duplicate,
                                reason: None,
                                path: None,
                                detail: None,
                                retryable: false,
                            });
                            continue;
                        }
                        _ => {
                            results.push(EventResult {
                                index,
                                event_id,
                                status: Status::Rejected,
                                reason: Some("in_flight"),
                                path: None,
                                detail: Some(
                                    "the same event_id is being accepted by another request; retry"
                                        .into(),
                                ),
                                retryable: true,
                            });
                            continue;
                        }
                    }
                    let id = env.event_id.as_u128();
                    let key = match e.match_id() {
                        Some(m) => m.to_string().into_bytes(),
                        None => env.user_id.as_bytes().to_vec(),
                    };
                    let mut value = Vec::with_capacity(256);
                    let sealed = if e.has_personal() {
                        let key = keys.get(&e.envelope().user_id).cloned().flatten();
                        e.seal_personal(key.as_ref()).map_err(|x| x.to_string())
                    } else {
                        Ok(())
                    };
                    match sealed.and_then(|()| {
                        self.codecs
                            .encode_event(&e, &mut value)
                            .map_err(|x| x.to_string())
                    }) {
                        Ok(()) => {
                            claimed.push(id);
                            let event_type = e.event_type().name();
                            accepted_types.push(event_type);
                            records.push(Record {
                                id,
                                topic: EVENTS_TOPIC.into(),
                                key,
                                value,
                                event_type: event_type.into(),
                                at_ms: received_at,
                            });
                            results.push(EventResult {
                                index,
                                event_id,
                                status: Status::Accepted,
                                reason: None,
                                path: None,
                                detail: None,
                                retryable: false,
                            });
                        }
                        Err(err) => {
                            // A parsed event that does not fit its schema is a bug; keep it.
                            tracing::error!(error = %err, "Accepted event could not be sealed or encoded");
                            self.dedup.release(&[id]);
                            let original =
                                serde_json::to_vec(&format!("{e:?}")).unwrap_or_default();
                            let reject = Reject::new(
                                DeadLetterReason::ProcessingFailure,
                                err.clone(),
                                &original,
                            );
                            match self.dead_letter(app_id, &reject, received_at).await {
                                Ok(r) => records.push(r),
                                Err(e) => {
                                    tracing::error!(error = %e, "Could not keep the event as a dead letter");
                                }
                            }
                            results.push(EventResult {
                                index,
                                event_id,
                                status: Status::Rejected,
                                reason: Some("processing_failure"),
                                path: None,
                                detail: Some(err),
                                retryable: false,
                            });
                        }
                    }
                }
                Parsed::Reject(r) => {
                    records.extend(letters.remove(&index));
                    results.push(EventResult {
                        index,
                        event_id: r.event_id.clone(),
                        status: Status::Rejected,
                        reason: Some(r.reason.as_str()),
                        path: r.path.clone(),
                        detail: Some(r.detail.clone()),
                        retryable: false,
                    });
                }
            }
        }
        // Durability runs to completion even if the client gives up: a cancelled write must
        // not leave claims behind or acknowledge half a batch.
        // The write runs in its own task so that a panic in it still releases the claims.
        let this = self.clone();
        let outcome = tokio::spawn(async move {
            let durable = this.durable.clone();
            let r = tokio::spawn(async move { durable.write(records).await })
                .await
                .unwrap_or_else(|e| Err(DurableError::Crashed(e.to_string())));
            match &r {
                Ok(_) => this.dedup.commit(&claimed, now_ms()),
                Err(_) => this.dedup.release(&claimed),
            }
            r
        })
        .await
        .unwrap_or_else(|e| Err(DurableError::Crashed(e.to_string())))
        .map_err(IngestError::Durable)?;
        for t in &accepted_types {
            observability::accepted(t, 1);
        }
        observability::duplicates(dups as u64);
        observability::suppressed(suppressed as u64);
        let count = |s: Status| results.iter().filter(|r| r.status == s).count();
        Ok(BatchResponse {
            accepted: count(Status::Accepted),
            duplicates: dups,
            suppressed,
            rejected: count(Status::Rejected),
            durability: match outcome {
                Durability::Acked => "acked",
                Durability::Spooled => "spooled",
                Durability::Discarded => "discarded",
            },
            results,
        })
    }
}
