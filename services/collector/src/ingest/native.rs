//! feedloop's native batch format (`POST /v1/events`): a JSON array of events, or
//! `{"batch": [...], "sent_at": ...}`.
//!
//! ```json
//! {"event_id": "0192…", "event_type": "match_decision", "user_id": "u-1",
//!  "timestamp": "2026-11-28T17:00:00Z", "platform": "ios", "app_version": "5.2.0",
//!  "properties": {"match_id": "0192…", "decision": "accept"}}
//! ```

use feedloop_core::model::{DeadLetterReason, EventType};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{
    Context, Parsed, RawEnvelope, Reject, envelope, interaction, interaction_type, parse_at,
    platform, time::Millis,
};

/// Why a whole request body is unusable (answered 400, kept as one dead letter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is not a JSON array of events or an object with a `batch` array: {0}")]
    Malformed(String),
    #[error("batch holds {len} events; the limit is {max}")]
    TooLong { len: usize, max: usize },
}

#[derive(Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(default)]
    sent_at: Option<Millis>,
}

/// Splits a body into its events' raw JSON and the batch-level `sent_at`.
pub fn split(body: &[u8], max_len: usize) -> Result<(Vec<&RawValue>, Option<i64>), BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let (events, sent_at) = match first {
        Some(b'[') => (
            serde_json::from_slice::<Vec<&RawValue>>(body)
                .map_err(|e| BodyError::Malformed(e.to_string()))?,
            None,
        ),
        Some(b'{') => {
            let w: Wrapped<'_> =
                serde_json::from_slice(body).map_err(|e| BodyError::Malformed(e.to_string()))?;
            (w.batch, w.sent_at.map(|m| m.0))
        }
        _ => return Err(BodyError::Malformed("expected `[` or `{`".into())),
    };
    if events.len() > max_len {
        return Err(BodyError::TooLong {
            len: events.len(),
            max: max_len,
        });
    }
    Ok((events, sent_at))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeEvent<'a> {
    event_id: Uuid,
    event_type: String,
    user_id: String,
    #[serde(default)]
    anonymous_id: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
    timestamp: Millis,
    #[serde(default)]
    sent_at: Option<Millis>,
    platform: String,
    app_version: String,
    #[serde(default)]
    os_version: Option<String>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
}

/// Just enough of an event to label a reject.
#[derive(Deserialize)]
struct Labels {
    #[serde(default)]
    event_id: Option<serde_json::Value>,
    #[serde(default)]
    event_type: Option<serde_json::Value>,
}

fn labelled(mut reject: Reject, raw: &RawValue) -> Reject {
    if let Ok(l) = serde_json::from_str::<Labels>(raw.get()) {
        reject.event_id = l.event_id.and_then(|v| v.as_str().map(str::to_owned));
        reject.event_type = l.event_type.and_then(|v| v.as_str().map(str::to_owned));
    }
    reject
}

/// Parses one event of a native batch.
pub fn parse_event(raw: &RawValue, batch_sent_at: Option<i64>, ctx: &Context<'_>) -> Parsed {
    match parse_inner(raw, batch_sent_at, ctx) {
        Ok(event) => Parsed::Event(Box::new(event)),
        Err(reject) => Parsed::Reject(Box::new(labelled(reject, raw))),
    }
}

fn parse_inner(
    raw: &RawValue,
    batch_sent_at: Option<i64>,
    ctx: &Context<'_>,
) -> Result<feedloop_core::model::Event, Reject> {
    let original = raw.get().as_bytes();
    if original.len() > ctx.max_event_bytes {
        return Err(Reject::new(
            DeadLetterReason::SizeViolation,
            format!(
                "event is {} bytes; the limit is {}",
                original.len(),
                ctx.max_event_bytes
            ),
            original,
        ));
    }
    let event: NativeEvent<'_> = parse_at(raw, "", original)?;
    let event_type = interaction_type(&event.event_type).ok_or_else(|| {
        Reject::new(
            DeadLetterReason::UnknownEventType,
            format!("event_type {:?} is not in the catalogue", event.event_type),
            original,
        )
        .at("/event_type")
    })?;
    let env = envelope(
        RawEnvelope {
            event_id: event.event_id,
            user_id: event.user_id,
            anonymous_id: event.anonymous_id,
            device_id: event.device_id,
            session_id: event.session_id,
            client_timestamp: event.timestamp.0,
            sent_at: event.sent_at.map(|m| m.0).or(batch_sent_at),
            platform: platform(&event.platform),
            app_version: event.app_version,
            os_version: event.os_version,
        },
        event_type,
        ctx,
        original,
    )?;
    interaction(event_type, env, event.properties, original)
}

/// The event types a native client can send.
pub fn accepted_types() -> impl Iterator<Item = EventType> {
    EventType::ALL
        .into_iter()
        .filter(|t| interaction_type(t.name()).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FuturePolicy, TimeConfig};
    use feedloop_core::model::Event;

    fn ctx(time: &TimeConfig) -> Context<'_> {
        Context {
            app_id: "app",
            received_at: 1_795_885_260_000,
            max_event_bytes: 4096,
            time,
        }
    }

    fn time() -> TimeConfig {
        TimeConfig {
            max_future_ms: 300_000,
            future: FuturePolicy::Flag,
            max_age_ms: 86_400_000,
        }
    }

    const GOOD: &str = r#"{"event_id":"0192f2b4-7c1e-7000-8000-000000000001","event_type":"match_decision",
        "user_id":"u-1","timestamp":"2026-11-28T17:00:00Z","platform":"android","app_version":"5.2.0",
        "properties":{"match_id":"0192f2b4-7c1e-7000-8000-0000000000aa","decision":"accept"}}"#;

    #[test]
    fn parses_a_wrapped_batch_with_sent_at() {
        let body = format!(r#"{{"sent_at":"2026-11-28T17:00:30Z","batch":[{GOOD}]}}"#);
        let (events, sent_at) = split(body.as_bytes(), 10).expect("splits");
        assert_eq!(events.len(), 1);
        assert_eq!(sent_at, Some(1_795_885_230_000));
        let t = time();
        match parse_event(events[0], sent_at, &ctx(&t)) {
            Parsed::Event(e) => {
                let Event::MatchDecision(d) = *e else {
                    panic!("wrong type")
                };
                // Sent 30 s after the event, received 60 s after it by the server's clock.
                assert_eq!(d.envelope.timestamp, 1_795_885_230_000);
                assert_eq!(d.envelope.app_id, "app");
            }
            Parsed::Reject(r) => panic!("rejected: {r:?}"),
        }
    }

    #[test]
    fn rejects_carry_reason_path_and_labels() {
        let t = time();
        let cases = [
            (
                GOOD.replace("match_decision", "match_declined"),
                DeadLetterReason::UnknownEventType,
                "/event_type",
            ),
            (
                GOOD.replace("\"accept\"", "\"maybe\""),
                DeadLetterReason::SchemaViolation,
                "/properties/decision",
            ),
            (
                GOOD.replace("\"user_id\":\"u-1\",", ""),
                DeadLetterReason::SchemaViolation,
                "/",
            ),
            (
                GOOD.replace("5.2.0\"", "5.2.0\",\"extra\":1"),
                DeadLetterReason::SchemaViolation,
                "/extra",
            ),
        ];
        for (json, reason, path) in cases {
            let raw: &RawValue = serde_json::from_str(&json).expect("json");
            match parse_event(raw, None, &ctx(&t)) {
                Parsed::Reject(r) => {
                    assert_eq!(r.reason, reason, "{json}");
                    assert_eq!(r.path.as_deref(), Some(path), "{json}: {}", r.detail);
                    assert_eq!(r.original, json.as_bytes());
                    assert_eq!(
                        r.event_id.as_deref(),
                        Some("0192f2b4-7c1e-7000-8000-000000000001")
                    );
                }
                Parsed::Event(_) => panic!("accepted {json}"),
            }
        }
    }

    #[test]
    fn oversized_event_is_a_size_violation() {
        let t = time();
        let mut c = ctx(&t);
        c.max_event_bytes = 10;
        let raw: &RawValue = serde_json::from_str(GOOD).expect("json");
        match parse_event(raw, None, &c) {
            Parsed::Reject(r) => assert_eq!(r.reason, DeadLetterReason::SizeViolation),
            Parsed::Event(_) => panic!("accepted"),
        }
    }

    #[test]
    fn body_shape_errors() {
        assert!(matches!(split(b"nope", 10), Err(BodyError::Malformed(_))));
        assert!(matches!(
            split(b"{\"events\":[]}", 10),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            split(b"[1,2,3]", 2),
            Err(BodyError::TooLong { len: 3, max: 2 })
        ));
    }
}
