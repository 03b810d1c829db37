//! What the labeler reads: interaction events (`feedloop.events`) and cdc change events of the
//! tables a spec names, turned into impressions and outcomes for one spec.

use std::collections::BTreeMap;

use feedloop_core::{
    avro::CompiledSchema,
    model::{Event, EventDecodeError},
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    spec::{EventKind, Join, SourceSpec},
    window::{Compiled, Impression, Outcome, Scalar, SourceRef, outcome_key},
};

/// What one record means to a spec.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Impression(Box<Impression>),
    /// Outcome values (none when the record feeds no outcome of the spec).
    Outcomes(Vec<Outcome>),
}

/// A record the spec can read, with its event time (for the watermark).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub time_ms: i64,
    pub input: Input,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(transparent)]
    Event(#[from] EventDecodeError),
    #[error("cdc change event: {0}")]
    Change(String),
    #[error("a {0} contains a NUL character, which the join state cannot store")]
    Nul(&'static str),
}

impl Decoded {
    /// Refuses text the join state keys on but cannot store (Postgres text holds no NUL): such
    /// a record is dead-lettered here rather than failing every commit after it.
    pub fn checked(self) -> Result<Self, InputError> {
        let nul = |s: &String| s.contains('\0');
        match &self.input {
            Input::Impression(i) => {
                if i.keys().iter().any(nul) || i.users().iter().any(nul) {
                    return Err(InputError::Nul("user or match id"));
                }
            }
            Input::Outcomes(outcomes) => {
                for o in outcomes {
                    if nul(&o.join_key) || nul(&o.id) || o.users.iter().any(nul) {
                        return Err(InputError::Nul("join key, outcome id or user id"));
                    }
                }
            }
        }
        Ok(self)
    }
}

/// A cdc change event, read loosely: only what outcomes need.
#[derive(Debug, Deserialize)]
struct Change {
    after: Option<BTreeMap<String, serde_json::Value>>,
    source: ChangeSource,
    op: String,
}

#[derive(Debug, Deserialize)]
struct ChangeSource {
    ts_ms: i64,
}

fn text(v: impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn event_field(event: &Event, field: &str) -> Scalar {
    match (event, field) {
        (Event::MatchDecision(e), "decision") => Scalar::Text(text(e.decision)),
        (Event::MatchDecision(e), "decision_latency_ms") => {
            e.decision_latency_ms.map_or(Scalar::Null, Scalar::Long)
        }
        (Event::ChatEnded(e), "duration_ms") => Scalar::Long(e.duration_ms),
        (Event::ChatEnded(e), "ended_by") => Scalar::Text(text(e.ended_by)),
        (Event::ReportSubmitted(e), "reason") => Scalar::Text(text(e.reason)),
        (Event::ReportSubmitted(e), "reported_user_id") => Scalar::Text(e.reported_user_id.clone()),
        (Event::UserBlocked(e), "blocked_user_id") => Scalar::Text(e.blocked_user_id.clone()),
        _ => Scalar::Null,
    }
}

fn json_scalar(v: Option<&serde_json::Value>) -> Scalar {
    match v {
        Some(serde_json::Value::Bool(b)) => Scalar::Bool(*b),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Scalar::Long)
            .or_else(|| n.as_f64().map(Scalar::Double))
            .unwrap_or(Scalar::Null),
        Some(serde_json::Value::String(s)) => Scalar::Text(s.clone()),
        _ => Scalar::Null,
    }
}

/// The value a source gives an outcome from one record.
fn value_of(source: &SourceSpec, field: impl Fn(&str) -> Scalar) -> Scalar {
    let Some(name) = &source.field else {
        return Scalar::Bool(true);
    };
    let raw = field(name);
    if let Some(equals) = &source.equals {
        return Scalar::Bool(matches!(&raw, Scalar::Text(t) if t == equals));
    }
    if let Some(scale) = source.scale {
        return match raw {
            Scalar::Long(v) => Scalar::Double(v as f64 * scale),
            Scalar::Double(v) => Scalar::Double(v * scale),
            _ => Scalar::Null,
        };
    }
    raw
}

fn event_kind(event: &Event) -> Option<EventKind> {
    Some(match event {
        Event::MatchDecision(_) => EventKind::MatchDecision,
        Event::ChatEnded(_) => EventKind::ChatEnded,
        Event::ReportSubmitted(_) => EventKind::ReportSubmitted,
        Event::UserBlocked(_) => EventKind::UserBlocked,
        _ => return None,
    })
}

/// Reads an event record for `spec`.
pub fn event(
    spec: &Compiled,
    schema: &CompiledSchema,
    body: &[u8],
    source: SourceRef,
) -> Result<Decoded, InputError> {
    let event = Event::decode(schema, body)?;
    let event = match event {
        Event::MatchImpression(i) => {
            let time_ms = i.envelope.timestamp;
            return Ok(Decoded {
                time_ms,
                input: Input::Impression(Box::new(Impression {
                    event_id: i.envelope.event_id,
                    match_id: i.match_id,
                    viewer_id: i.envelope.user_id,
                    candidate_id: i.candidate_id,
                    time_ms,
                    request_id: i.request_id,
                    model_version: i.model_version,
                    experiment_id: i.experiment_id,
                    experiment_arm: i.experiment_arm,
                    rank: i.rank,
                    score: i.score,
                    features: i.features,
                    source,
                })),
            });
        }
        other => other,
    };
    let origin = format!("{}/{}/{}", source.topic, source.partition, source.offset);
    let env = event.envelope();
    let time_ms = env.timestamp;
    let Some(kind) = event_kind(&event) else {
        return Ok(Decoded {
            time_ms,
            input: Input::Outcomes(Vec::new()),
        });
    };
    let other = match &event {
        Event::ReportSubmitted(e) => Some(e.reported_user_id.as_str()),
        Event::UserBlocked(e) => Some(e.blocked_user_id.as_str()),
        _ => None,
    };
    let match_id = event.match_id();
    let mut users = vec![env.user_id.clone()];
    users.extend(other.map(str::to_owned));
    let id = env.event_id.to_string();
    let mut outcomes = Vec::new();
    for o in &spec.spec.outcomes {
        for s in o.from.iter().filter(|s| s.event == Some(kind)) {
            let Some(join_key) = outcome_key(s.join, match_id.as_ref(), &env.user_id, other) else {
                continue;
            };
            outcomes.push(Outcome {
                name: o.name.clone(),
                id: id.clone(),
                join_key,
                time_ms,
                value: value_of(s, |f| event_field(&event, f)),
                users: users.clone(),
                origin: origin.clone(),
            });
        }
    }
    Ok(Decoded {
        time_ms,
        input: Input::Outcomes(outcomes),
    })
}

/// Reads a cdc change event of `table` for `spec`: inserted and snapshotted rows are outcomes;
/// updates, deletes and tombstones only move the watermark (commit time).
pub fn change(
    spec: &Compiled,
    table: &str,
    schema: &CompiledSchema,
    key: Option<&[u8]>,
    body: &[u8],
    origin: &str,
) -> Result<Decoded, InputError> {
    let change: Change = schema
        .decode_body(body)
        .map_err(|e| InputError::Change(e.to_string()))?;
    let commit_ms = change.source.ts_ms;
    let row = match (&change.after, change.op.as_str()) {
        (Some(row), "c" | "r") => row,
        _ => {
            return Ok(Decoded {
                time_ms: commit_ms,
                input: Input::Outcomes(Vec::new()),
            });
        }
    };
    // The row's identity: its primary key as cdc keyed it.
    let pk: String = key
        .map(|k| k.iter().skip(5).map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default();
    let id = format!("cdc:{table}:{pk}");
    let mut outcomes = Vec::new();
    let mut time_ms = commit_ms;
    for o in &spec.spec.outcomes {
        for s in o.from.iter().filter(|s| s.cdc.as_deref() == Some(table)) {
            let t = match &s.time_column {
                // timestamp columns are timestamp-micros.
                Some(c) => match row.get(c).and_then(serde_json::Value::as_i64) {
                    Some(micros) => micros.div_euclid(1000),
                    None => {
                        return Err(InputError::Change(format!(
                            "{table}: time column `{c}` is missing or not a timestamp"
                        )));
                    }
                },
                None => commit_ms,
            };
            time_ms = t;
            let users: Vec<String> = s
                .users
                .iter()
                .filter_map(|c| row.get(c).and_then(|v| v.as_str()).map(str::to_owned))
                .collect();
            let match_id = s
                .match_column
                .as_ref()
                .and_then(|c| row.get(c))
                .and_then(|v| v.as_str())
                .and_then(|v| Uuid::parse_str(v).ok());
            let needs_users = matches!(s.join, Join::Pair | Join::MatchViewer);
            if needs_users && users.len() != 2 {
                continue;
            }
            let actor = users.first().map_or("", String::as_str);
            let other = users.get(1).map(String::as_str);
            let Some(join_key) = outcome_key(s.join, match_id.as_ref(), actor, other) else {
                continue;
            };
            outcomes.push(Outcome {
                name: o.name.clone(),
                id: id.clone(),
                join_key,
                time_ms: t,
                value: value_of(s, |f| json_scalar(row.get(f))),
                users,
                origin: origin.to_owned(),
            });
        }
    }
    Ok(Decoded {
        time_ms,
        input: Input::Outcomes(outcomes),
    })
}
