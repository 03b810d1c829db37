//! Segment's batch format (`POST /v1/batch`), so Segment SDKs work by changing their host.
//!
//! `track` events whose name matches a catalogue interaction (`match_decision`, or spelled
//! `Match Decision`) become that record; unknown names are dead-lettered as
//! `unknown_event_type`. `screen` and `page` become `screen_viewed`, `identify` becomes
//! `user_identified` (trait names only: trait values are personal data). `alias` and `group`
//! are not in the catalogue.

use std::collections::BTreeMap;

use feedloop_core::model::{
    DeadLetterReason, Event, EventType, FeatureValue, Platform, ScreenViewed, UserIdentified,
};
use serde::Deserialize;
use serde_json::{Value, value::RawValue};
use uuid::Uuid;

use super::{
    Context, Parsed, RawEnvelope, Reject, envelope, interaction, interaction_type, parse_at,
    platform, time::Millis,
};

/// Namespace of event ids derived from Segment message ids that are not UUIDs.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f0c_1d5e_8a4b_4c3e_9b1f_2d7a_5e8c_0f41);

#[derive(Deserialize)]
pub struct SegmentBatch<'a> {
    #[serde(borrow)]
    pub batch: Vec<&'a RawValue>,
    #[serde(default, rename = "sentAt")]
    pub sent_at: Option<Millis>,
    /// Batch-level context, merged under each message's own.
    #[serde(default)]
    pub context: Option<Value>,
    /// Some SDKs put the write key in the body instead of the Authorization header.
    #[serde(default, rename = "writeKey")]
    pub write_key: Option<String>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, rename = "messageId")]
    message_id: Option<String>,
    #[serde(default, rename = "userId")]
    user_id: Option<Value>,
    #[serde(default, rename = "anonymousId")]
    anonymous_id: Option<Value>,
    #[serde(default)]
    timestamp: Option<Millis>,
    #[serde(default, rename = "originalTimestamp")]
    original_timestamp: Option<Millis>,
    #[serde(default, rename = "sentAt")]
    sent_at: Option<Millis>,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
    #[serde(default)]
    traits: Option<serde_json::Map<String, Value>>,
}

/// The event id of a message: its messageId if that is a UUID, else a UUIDv5 of the app and
/// messageId (stable, so retries deduplicate), else a fresh UUIDv7.
pub fn event_id(app_id: &str, message_id: Option<&str>) -> Uuid {
    match message_id {
        Some(m) => Uuid::parse_str(m).unwrap_or_else(|_| {
            Uuid::new_v5(&MESSAGE_ID_NAMESPACE, format!("{app_id}\0{m}").as_bytes())
        }),
        None => Uuid::now_v7(),
    }
}

/// `Match Decision`, `match-decision` and `match_decision` all name `match_decision`.
pub fn normalize_event_name(name: &str) -> String {
    name.trim()
        .chars()
        .map(|c| {
            if c == ' ' || c == '-' {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

fn id_string(v: &Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn ctx_str<'v>(ctx: &'v Value, path: &[&str]) -> Option<&'v str> {
    let mut cur = ctx;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn merged_context(batch: Option<&Value>, own: Option<Value>) -> Value {
    match (batch, own) {
        (Some(Value::Object(b)), Some(Value::Object(mut o))) => {
            for (k, v) in b {
                o.entry(k.clone()).or_insert_with(|| v.clone());
            }
            Value::Object(o)
        }
        (_, Some(o)) => o,
        (Some(b), None) => b.clone(),
        (None, None) => Value::Null,
    }
}

fn segment_platform(ctx: &Value) -> Platform {
    if let Some(os) = ctx_str(ctx, &["os", "name"]) {
        let p = platform(os);
        if p != Platform::Other {
            return p;
        }
    }
    if let Some(t) = ctx_str(ctx, &["device", "type"]) {
        let p = platform(t);
        if p != Platform::Other {
            return p;
        }
    }
    match ctx_str(ctx, &["library", "name"]) {
        Some(lib) if lib.contains("analytics.js") || lib.contains("analytics-next") => {
            Platform::Web
        }
        _ => Platform::Other,
    }
}

fn scalars(props: Option<&RawValue>) -> BTreeMap<String, Option<FeatureValue>> {
    let Some(map) =
        props.and_then(|p| serde_json::from_str::<serde_json::Map<String, Value>>(p.get()).ok())
    else {
        return BTreeMap::new();
    };
    map.into_iter()
        .filter_map(|(k, v)| {
            let value = match v {
                Value::Null => None,
                Value::Bool(b) => Some(FeatureValue::Bool(b)),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => Some(FeatureValue::Long(i)),
                    None => Some(FeatureValue::Double(n.as_f64()?)),
                },
                Value::String(s) => Some(FeatureValue::String(s)),
                Value::Array(_) | Value::Object(_) => return None,
            };
            Some((k, value))
        })
        .collect()
}

/// Parses one message of a Segment batch.
pub fn parse_message(raw: &RawValue, batch: &SegmentBatch<'_>, ctx: &Context<'_>) -> Parsed {
    let original = raw.get().as_bytes();
    let result = parse_inner(raw, batch, ctx, original);
    match result {
        Ok(e) => Parsed::Event(Box::new(e)),
        Err(mut r) => {
            if r.event_id.is_none()
                && let Ok(m) = serde_json::from_str::<serde_json::Map<String, Value>>(raw.get())
            {
                r.event_id = m
                    .get("messageId")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                r.event_type = m
                    .get("event")
                    .or_else(|| m.get("type"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
            Parsed::Reject(Box::new(r))
        }
    }
}

fn parse_inner(
    raw: &RawValue,
    batch: &SegmentBatch<'_>,
    ctx: &Context<'_>,
    original: &[u8],
) -> Result<Event, Reject> {
    if original.len() > ctx.max_event_bytes {
        return Err(Reject::new(
            DeadLetterReason::SizeViolation,
            format!(
                "message is {} bytes; the limit is {}",
                original.len(),
                ctx.max_event_bytes
            ),
            original,
        ));
    }
    let msg: Message<'_> = parse_at(raw, "", original)?;
    let event_type = match msg.kind.as_str() {
        "track" => {
            let name = msg.event.as_deref().ok_or_else(|| {
                Reject::new(
                    DeadLetterReason::SchemaViolation,
                    "track call without `event`",
                    original,
                )
                .at("/event")
            })?;
            interaction_type(&normalize_event_name(name)).ok_or_else(|| {
                Reject::new(
                    DeadLetterReason::UnknownEventType,
                    format!("track event {name:?} is not in the catalogue"),
                    original,
                )
                .at("/event")
            })?
        }
        "screen" | "page" => EventType::ScreenViewed,
        "identify" => EventType::UserIdentified,
        other => {
            return Err(Reject::new(
                DeadLetterReason::UnknownEventType,
                format!("Segment {other:?} calls are not in the catalogue"),
                original,
            )
            .at("/type"));
        }
    };
    let user_id = id_string(&msg.user_id);
    let anonymous_id = id_string(&msg.anonymous_id);
    let Some(acting) = user_id.clone().or_else(|| anonymous_id.clone()) else {
        return Err(Reject::new(
            DeadLetterReason::ProtocolViolation,
            "either userId or anonymousId is required",
            original,
        )
        .at("/userId"));
    };
    let context = merged_context(batch.context.as_ref(), msg.context);
    let client_timestamp = msg
        .original_timestamp
        .or(msg.timestamp)
        .map(|m| m.0)
        .ok_or_else(|| {
            Reject::new(
                DeadLetterReason::SchemaViolation,
                "timestamp is required",
                original,
            )
            .at("/timestamp")
        })?;
    let env = envelope(
        RawEnvelope {
            event_id: event_id(ctx.app_id, msg.message_id.as_deref()),
            user_id: acting,
            anonymous_id,
            device_id: ctx_str(&context, &["device", "id"]).map(str::to_owned),
            session_id: None,
            client_timestamp,
            sent_at: msg.sent_at.or(batch.sent_at).map(|m| m.0),
            platform: segment_platform(&context),
            app_version: ctx_str(&context, &["app", "version"])
                .unwrap_or("unknown")
                .to_owned(),
            os_version: ctx_str(&context, &["os", "version"]).map(str::to_owned),
        },
        event_type,
        ctx,
        original,
    )?;
    match event_type {
        EventType::ScreenViewed => Ok(Event::ScreenViewed(ScreenViewed {
            envelope: env,
            name: msg.name,
            category: msg.category,
            properties: scalars(msg.properties),
        })),
        EventType::UserIdentified => {
            if user_id.is_none() {
                return Err(Reject::new(
                    DeadLetterReason::ProtocolViolation,
                    "identify calls need a userId",
                    original,
                )
                .at("/userId"));
            }
            let mut trait_names: Vec<String> = msg
                .traits
                .map(|t| t.into_iter().map(|(k, _)| k).collect())
                .unwrap_or_default();
            trait_names.sort();
            Ok(Event::UserIdentified(UserIdentified {
                envelope: env,
                trait_names,
            }))
        }
        t => interaction(t, env, msg.properties, original),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FuturePolicy, TimeConfig};

    fn time() -> TimeConfig {
        TimeConfig {
            max_future_ms: 300_000,
            future: FuturePolicy::Flag,
            max_age_ms: 86_400_000,
        }
    }

    fn parse(body: &str) -> Vec<Parsed> {
        let t = time();
        let ctx = Context {
            app_id: "app",
            received_at: 1_795_885_260_000,
            max_event_bytes: 8192,
            time: &t,
        };
        let batch: SegmentBatch<'_> = serde_json::from_str(body).expect("batch");
        batch
            .batch
            .iter()
            .map(|m| parse_message(m, &batch, &ctx))
            .collect()
    }

    #[test]
    fn maps_track_screen_and_identify() {
        let body = r#"{"sentAt":"2026-11-28T17:00:10Z","context":{"library":{"name":"analytics-ios"}},"batch":[
          {"type":"track","event":"Match Decision","messageId":"ajs-1","userId":"u-1",
           "timestamp":"2026-11-28T17:00:00Z","context":{"os":{"name":"iOS","version":"17.1"},"app":{"version":"3.0"},"device":{"id":"d-1"}},
           "properties":{"match_id":"0192f2b4-7c1e-7000-8000-0000000000aa","decision":"skip"}},
          {"type":"screen","name":"Matches","anonymousId":"anon-1","timestamp":"2026-11-28T17:00:01Z","properties":{"tab":"new","n":3,"nested":{"x":1}}},
          {"type":"identify","userId":"u-1","anonymousId":"anon-1","timestamp":"2026-11-28T17:00:02Z","traits":{"email":"a@b.c","plan":"pro"}},
          {"type":"track","event":"Song Played","userId":"u-1","timestamp":"2026-11-28T17:00:03Z"},
          {"type":"alias","userId":"u-1","previousId":"x","timestamp":"2026-11-28T17:00:03Z"}
        ]}"#;
        let parsed = parse(body);
        let Parsed::Event(e) = &parsed[0] else {
            panic!("{:?}", parsed[0])
        };
        let Event::MatchDecision(d) = &**e else {
            panic!("wrong type")
        };
        assert_eq!(d.envelope.platform, Platform::Ios);
        assert_eq!(d.envelope.device_id.as_deref(), Some("d-1"));
        assert_eq!(d.envelope.app_version, "3.0");
        // Sent 10 s after the event; received at 17:01:00 server time.
        assert_eq!(d.envelope.timestamp, 1_795_885_250_000);
        assert_eq!(d.envelope.event_id, event_id("app", Some("ajs-1")));
        let Parsed::Event(e) = &parsed[1] else {
            panic!("{:?}", parsed[1])
        };
        let Event::ScreenViewed(s) = &**e else {
            panic!("wrong type")
        };
        assert_eq!(s.envelope.user_id, "anon-1");
        assert_eq!(s.properties.len(), 2, "nested values dropped");
        let Parsed::Event(e) = &parsed[2] else {
            panic!("{:?}", parsed[2])
        };
        let Event::UserIdentified(i) = &**e else {
            panic!("wrong type")
        };
        assert_eq!(i.trait_names, vec!["email", "plan"]);
        for (i, path) in [(3, "/event"), (4, "/type")] {
            let Parsed::Reject(r) = &parsed[i] else {
                panic!("{:?}", parsed[i])
            };
            assert_eq!(r.reason, DeadLetterReason::UnknownEventType);
            assert_eq!(r.path.as_deref(), Some(path));
        }
    }

    #[test]
    fn message_ids_map_to_stable_event_ids() {
        let uuid = "0192f2b4-7c1e-7000-8000-000000000001";
        assert_eq!(event_id("a", Some(uuid)).to_string(), uuid);
        assert_eq!(event_id("a", Some("m-1")), event_id("a", Some("m-1")));
        assert_ne!(event_id("a", Some("m-1")), event_id("b", Some("m-1")));
        assert_eq!(
            normalize_event_name(" Match Impression "),
            "match_impression"
        );
    }
}
