//! Turning client bytes into catalogue events: pure functions, no IO.
//!
//! [`native`] reads feedloop's own batch format, [`segment`] reads Segment's. Both end here:
//! an envelope plus event properties become a typed [`Event`], or a [`Reject`] that says why,
//! where, and keeps the original bytes for the dead-letter topic.

pub mod native;
pub mod segment;
pub mod time;

use std::{borrow::Cow, collections::BTreeMap};

use feedloop_core::model::{
    ChatEnded, ChatEndedBy, DeadLetterReason, Decision, Envelope, Event, EventType, FeatureValue,
    MatchDecision, MatchImpression, Platform, ReportReason, ReportSubmitted, UserBlocked,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::config::{FuturePolicy, TimeConfig};

/// Longest identifier (user, device, session, request ids) accepted.
pub const MAX_ID_LEN: usize = 256;

/// What the collector knows about a request, independent of its events.
#[derive(Debug, Clone)]
pub struct Context<'c> {
    pub app_id: &'c str,
    /// Receive time, epoch ms.
    pub received_at: i64,
    pub max_event_bytes: usize,
    pub time: &'c TimeConfig,
}

/// An event that will not be accepted, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: DeadLetterReason,
    pub detail: String,
    /// JSON pointer of the offending value, when known.
    pub path: Option<String>,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
    pub original: Vec<u8>,
}

impl Reject {
    pub fn new(reason: DeadLetterReason, detail: impl Into<String>, original: &[u8]) -> Self {
        Self {
            reason,
            detail: detail.into(),
            path: None,
            event_type: None,
            event_id: None,
            original: original.to_vec(),
        }
    }

    pub fn at(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
}

/// One element of a batch after parsing.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Event(Box<Event>),
    Reject(Box<Reject>),
}

/// Envelope fields common to every format, before clock correction.
#[derive(Debug, Clone)]
pub struct RawEnvelope {
    pub event_id: Uuid,
    pub user_id: String,
    pub anonymous_id: Option<String>,
    pub device_id: Option<String>,
    pub session_id: Option<String>,
    /// Client clock, epoch ms.
    pub client_timestamp: i64,
    /// Client clock at send, epoch ms.
    pub sent_at: Option<i64>,
    pub platform: Platform,
    pub app_version: String,
    pub os_version: Option<String>,
}

/// Converts a serde_path_to_error path (`properties.rank`, `batch[3]`) to a JSON pointer.
pub fn pointer(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        use serde_path_to_error::Segment;
        match segment {
            Segment::Seq { index } => {
                out.push('/');
                out.push_str(&index.to_string());
            }
            Segment::Map { key } => {
                out.push('/');
                out.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            Segment::Enum { variant } => {
                out.push('/');
                out.push_str(variant);
            }
            Segment::Unknown => out.push_str("/?"),
        }
    }
    if out.is_empty() { "/".into() } else { out }
}

/// Deserializes `raw` as `T`, turning failures into a schema violation at the failing path,
/// prefixed with `prefix` (e.g. `/properties`).
pub fn parse_at<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    prefix: &str,
    original: &[u8],
) -> Result<T, Reject> {
    // The fast path parses without tracking where it is; only a failure pays for a second,
    // path-tracking parse that says where the problem lies.
    if let Ok(value) = serde_json::from_str(raw.get()) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let inner = pointer(e.path());
        let path = if inner == "/" {
            prefix.to_owned()
        } else {
            format!("{prefix}{inner}")
        };
        let path = if path.is_empty() {
            "/".to_owned()
        } else {
            path
        };
        Reject::new(
            DeadLetterReason::SchemaViolation,
            e.inner().to_string(),
            original,
        )
        .at(path)
    })
}

/// The user an input says it is about, if it says so readably: `user_id` (native), else
/// `userId` or `anonymousId` (Segment), when that is an id the collector would accept. Its dead
/// letter is sealed with that user's key, so that erasing them reaches it; `None`: the day's
/// unattributed key. (Whoever sends the input chooses this: naming someone else only makes the
/// letter theirs to erase.)
pub fn owner_of(original: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Ids {
        user_id: Option<serde_json::Value>,
        #[serde(rename = "userId")]
        segment_user: Option<serde_json::Value>,
        #[serde(rename = "anonymousId")]
        anonymous: Option<serde_json::Value>,
    }
    let ids: Ids = serde_json::from_slice(original).ok()?;
    [ids.user_id, ids.segment_user, ids.anonymous]
        .into_iter()
        .find_map(|v| match v {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .filter(|id| check_id(id, "", b"").is_ok())
}

fn check_id(value: &str, path: &str, original: &[u8]) -> Result<(), Reject> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(Reject::new(
            DeadLetterReason::SchemaViolation,
            format!("must be 1 to {MAX_ID_LEN} characters"),
            original,
        )
        .at(path));
    }
    // Ids are keys downstream (Postgres text holds no NUL; logs and file names no controls).
    if value.chars().any(char::is_control) {
        return Err(Reject::new(
            DeadLetterReason::SchemaViolation,
            "must not contain control characters (U+0000 to U+001F, U+007F to U+009F)",
            original,
        )
        .at(path));
    }
    Ok(())
}

fn check_opt_id(value: &Option<String>, path: &str, original: &[u8]) -> Result<(), Reject> {
    value
        .as_deref()
        .map_or(Ok(()), |v| check_id(v, path, original))
}

/// Builds the envelope: validates ids and applies clock-skew correction.
pub fn envelope(
    raw: RawEnvelope,
    event_type: EventType,
    ctx: &Context<'_>,
    original: &[u8],
) -> Result<Envelope, Reject> {
    check_id(&raw.user_id, "/user_id", original)?;
    check_opt_id(&raw.anonymous_id, "/anonymous_id", original)?;
    check_opt_id(&raw.device_id, "/device_id", original)?;
    check_opt_id(&raw.session_id, "/session_id", original)?;
    check_id(&raw.app_version, "/app_version", original)?;
    check_opt_id(&raw.os_version, "/os_version", original)?;
    let corrected = time::correct(raw.client_timestamp, raw.sent_at, ctx.received_at);
    let (timestamp, flagged) = match time::judge(corrected, ctx.received_at, ctx.time) {
        time::Verdict::Ok => (corrected, false),
        time::Verdict::Future if ctx.time.future == FuturePolicy::Flag => (ctx.received_at, true),
        time::Verdict::Future => {
            return Err(Reject::new(
                DeadLetterReason::SchemaViolation,
                format!(
                    "timestamp is {} ms ahead of the receive time even after clock-skew correction",
                    corrected - ctx.received_at
                ),
                original,
            )
            .at("/timestamp"));
        }
        time::Verdict::TooOld => {
            return Err(Reject::new(
                DeadLetterReason::SchemaViolation,
                format!(
                    "timestamp is older than the accepted {} ms",
                    ctx.time.max_age_ms
                ),
                original,
            )
            .at("/timestamp"));
        }
    };
    Ok(Envelope {
        event_id: raw.event_id,
        event_type: event_type.name().to_owned(),
        user_id: raw.user_id,
        anonymous_id: raw.anonymous_id,
        device_id: raw.device_id,
        session_id: raw.session_id,
        timestamp,
        client_timestamp: raw.client_timestamp,
        sent_at: raw.sent_at,
        received_at: ctx.received_at,
        app_id: ctx.app_id.to_owned(),
        platform: raw.platform,
        app_version: raw.app_version,
        os_version: raw.os_version,
        clock_skew_flagged: flagged,
    })
}

/// Properties of `match_impression`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImpressionProps {
    match_id: Uuid,
    candidate_id: String,
    request_id: String,
    model_version: String,
    #[serde(default)]
    experiment_id: Option<String>,
    #[serde(default)]
    experiment_arm: Option<String>,
    rank: i32,
    score: f64,
    #[serde(default)]
    features: BTreeMap<String, Option<FeatureValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionProps {
    match_id: Uuid,
    decision: DecisionValue,
    #[serde(default)]
    decision_latency_ms: Option<i64>,
}

/// Client spelling of a decision; anything else is a schema violation, not `unknown`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DecisionValue {
    Accept,
    Skip,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatEndedProps {
    match_id: Uuid,
    duration_ms: i64,
    #[serde(default)]
    ended_by: Option<EndedByValue>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EndedByValue {
    #[serde(rename = "self")]
    Myself,
    Peer,
    Network,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportProps {
    #[serde(default)]
    match_id: Option<Uuid>,
    reported_user_id: String,
    reason: ReasonValue,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ReasonValue {
    Spam,
    Harassment,
    Nudity,
    Underage,
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockProps {
    #[serde(default)]
    match_id: Option<Uuid>,
    blocked_user_id: String,
}

/// Longest free-text comment kept, in bytes.
pub const MAX_COMMENT_LEN: usize = 4096;
/// Most features logged with one impression.
pub const MAX_FEATURES: usize = 512;

fn violation(detail: impl Into<String>, path: &str, original: &[u8]) -> Reject {
    Reject::new(DeadLetterReason::SchemaViolation, detail, original).at(path)
}

/// Builds an interaction event of `event_type` from its envelope and properties.
pub fn interaction(
    event_type: EventType,
    envelope: Envelope,
    props: Option<&RawValue>,
    original: &[u8],
) -> Result<Event, Reject> {
    const P: &str = "/properties";
    let empty: &RawValue =
        serde_json::from_str("{}").map_err(|e| violation(e.to_string(), P, original))?;
    let props = props.unwrap_or(empty);
    let event = match event_type {
        EventType::MatchImpression => {
            let p: ImpressionProps = parse_at(props, P, original)?;
            check_id(&p.candidate_id, "/properties/candidate_id", original)?;
            check_id(&p.request_id, "/properties/request_id", original)?;
            check_id(&p.model_version, "/properties/model_version", original)?;
            check_opt_id(&p.experiment_id, "/properties/experiment_id", original)?;
            check_opt_id(&p.experiment_arm, "/properties/experiment_arm", original)?;
            if p.rank < 0 {
                return Err(violation(
                    "must not be negative",
                    "/properties/rank",
                    original,
                ));
            }
            if !p.score.is_finite() {
                return Err(violation(
                    "must be a finite number",
                    "/properties/score",
                    original,
                ));
            }
            if p.features.len() > MAX_FEATURES {
                return Err(violation(
                    format!("at most {MAX_FEATURES} features"),
                    "/properties/features",
                    original,
                ));
            }
            Event::MatchImpression(MatchImpression {
                envelope,
                match_id: p.match_id,
                candidate_id: p.candidate_id,
                request_id: p.request_id,
                model_version: p.model_version,
                experiment_id: p.experiment_id,
                experiment_arm: p.experiment_arm,
                rank: p.rank,
                score: p.score,
                features: p.features,
            })
        }
        EventType::MatchDecision => {
            let p: DecisionProps = parse_at(props, P, original)?;
            if p.decision_latency_ms.is_some_and(|l| l < 0) {
                return Err(violation(
                    "must not be negative",
                    "/properties/decision_latency_ms",
                    original,
                ));
            }
            Event::MatchDecision(MatchDecision {
                envelope,
                match_id: p.match_id,
                decision: match p.decision {
                    DecisionValue::Accept => Decision::Accept,
                    DecisionValue::Skip => Decision::Skip,
                },
                decision_latency_ms: p.decision_latency_ms,
            })
        }
        EventType::ChatEnded => {
            let p: ChatEndedProps = parse_at(props, P, original)?;
            if p.duration_ms < 0 {
                return Err(violation(
                    "must not be negative",
                    "/properties/duration_ms",
                    original,
                ));
            }
            Event::ChatEnded(ChatEnded {
                envelope,
                match_id: p.match_id,
                duration_ms: p.duration_ms,
                ended_by: match p.ended_by {
                    Some(EndedByValue::Myself) => ChatEndedBy::Myself,
                    Some(EndedByValue::Peer) => ChatEndedBy::Peer,
                    Some(EndedByValue::Network) => ChatEndedBy::Network,
                    None => ChatEndedBy::Unknown,
                },
            })
        }
        EventType::ReportSubmitted => {
            let p: ReportProps = parse_at(props, P, original)?;
            check_id(
                &p.reported_user_id,
                "/properties/reported_user_id",
                original,
            )?;
            if p.comment
                .as_ref()
                .is_some_and(|c| c.len() > MAX_COMMENT_LEN)
            {
                return Err(violation(
                    format!("at most {MAX_COMMENT_LEN} bytes"),
                    "/properties/comment",
                    original,
                ));
            }
            Event::ReportSubmitted(ReportSubmitted {
                envelope,
                match_id: p.match_id,
                reported_user_id: p.reported_user_id,
                reason: match p.reason {
                    ReasonValue::Spam => ReportReason::Spam,
                    ReasonValue::Harassment => ReportReason::Harassment,
                    ReasonValue::Nudity => ReportReason::Nudity,
                    ReasonValue::Underage => ReportReason::Underage,
                    ReasonValue::Other => ReportReason::Other,
                },
                comment: p.comment,
            })
        }
        EventType::UserBlocked => {
            let p: BlockProps = parse_at(props, P, original)?;
            check_id(&p.blocked_user_id, "/properties/blocked_user_id", original)?;
            Event::UserBlocked(UserBlocked {
                envelope,
                match_id: p.match_id,
                blocked_user_id: p.blocked_user_id,
            })
        }
        EventType::ScreenViewed | EventType::UserIdentified => {
            return Err(Reject::new(
                DeadLetterReason::UnknownEventType,
                format!("{} is not an interaction event", event_type.name()),
                original,
            )
            .at("/event_type"));
        }
    };
    Ok(event)
}

/// The interaction event types clients may send by name.
pub fn interaction_type(name: &str) -> Option<EventType> {
    EventType::from_name(name)
        .filter(|t| !matches!(t, EventType::ScreenViewed | EventType::UserIdentified))
}

/// A platform from its usual spellings.
pub fn platform(name: &str) -> Platform {
    match name.to_ascii_lowercase().as_str() {
        "ios" | "ipados" | "iphone os" => Platform::Ios,
        "android" => Platform::Android,
        "web" | "browser" => Platform::Web,
        _ => Platform::Other,
    }
}

/// Borrowed-or-owned string from JSON.
pub type Str<'a> = Cow<'a, str>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_an_input_is_its_readable_valid_user_id() {
        assert_eq!(
            owner_of(br#"{"user_id":"u-1","x":1}"#).as_deref(),
            Some("u-1")
        );
        assert_eq!(owner_of(br#"{"userId":42}"#).as_deref(), Some("42"));
        assert_eq!(
            owner_of(br#"{"anonymousId":"a-1"}"#).as_deref(),
            Some("a-1")
        );
        assert_eq!(
            owner_of(br#"{"userId":"","anonymousId":"a-1"}"#).as_deref(),
            Some("a-1")
        );
        for unreadable in [
            &br#"{"user_id":"u-1""#[..],
            br#"[{"user_id":"u-1"}]"#,
            br#"{"user_id":{"id":"u-1"}}"#,
            br#"{"user_id":"bad\u0000id"}"#,
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(owner_of(unreadable), None, "{unreadable:?}");
        }
        let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(MAX_ID_LEN + 1));
        assert_eq!(owner_of(long.as_bytes()), None);
    }

    fn tc() -> TimeConfig {
        TimeConfig {
            max_future_ms: 300_000,
            future: FuturePolicy::Flag,
            max_age_ms: 7 * 86_400_000,
        }
    }

    fn raw(client: i64, sent: Option<i64>) -> RawEnvelope {
        RawEnvelope {
            event_id: Uuid::now_v7(),
            user_id: "u".into(),
            anonymous_id: None,
            device_id: None,
            session_id: None,
            client_timestamp: client,
            sent_at: sent,
            platform: Platform::Ios,
            app_version: "1".into(),
            os_version: None,
        }
    }

    #[test]
    fn skew_is_corrected_and_raw_values_kept() {
        let time = tc();
        let ctx = Context {
            app_id: "a",
            received_at: 1_000_000,
            max_event_bytes: 1000,
            time: &time,
        };
        // The client clock runs 60 s fast: event 5 s before send.
        let env = envelope(
            raw(1_055_000, Some(1_060_000)),
            EventType::ChatEnded,
            &ctx,
            b"{}",
        )
        .expect("valid");
        assert_eq!(env.timestamp, 995_000);
        assert_eq!(env.client_timestamp, 1_055_000);
        assert_eq!(env.sent_at, Some(1_060_000));
        assert!(!env.clock_skew_flagged);
    }

    #[test]
    fn far_future_is_flagged_or_rejected() {
        let mut time = tc();
        let ctx = Context {
            app_id: "a",
            received_at: 1_000_000,
            max_event_bytes: 1000,
            time: &time,
        };
        let env =
            envelope(raw(2_000_000, None), EventType::ChatEnded, &ctx, b"{}").expect("flagged");
        assert!(env.clock_skew_flagged);
        assert_eq!(env.timestamp, 1_000_000);
        time.future = FuturePolicy::Reject;
        let ctx = Context {
            app_id: "a",
            received_at: 1_000_000,
            max_event_bytes: 1000,
            time: &time,
        };
        let err = envelope(raw(2_000_000, None), EventType::ChatEnded, &ctx, b"{}")
            .expect_err("rejected");
        assert_eq!(err.path.as_deref(), Some("/timestamp"));
    }

    #[test]
    fn ids_with_control_characters_are_rejected_and_other_unicode_is_not() {
        for (id, ok) in [
            ("u\u{0}x", false),
            ("u\nx", false),
            ("u\u{7f}", false),
            ("\u{202e}lve", true),
            ("😀👩\u{200d}👩", true),
        ] {
            assert_eq!(check_id(id, "/user_id", b"").is_ok(), ok, "{id:?}");
        }
    }

    #[test]
    fn property_errors_point_at_the_field() {
        let env = {
            let time = tc();
            let ctx = Context {
                app_id: "a",
                received_at: 1_000_000,
                max_event_bytes: 1000,
                time: &time,
            };
            envelope(raw(999_000, None), EventType::MatchImpression, &ctx, b"{}").expect("valid")
        };
        let props = serde_json::value::to_raw_value(&serde_json::json!({
            "match_id": Uuid::now_v7(), "candidate_id": "c", "request_id": "r",
            "model_version": "m", "rank": "first", "score": 0.5
        }))
        .expect("raw");
        let err = interaction(EventType::MatchImpression, env, Some(&props), b"orig")
            .expect_err("bad rank");
        assert_eq!(err.reason, DeadLetterReason::SchemaViolation);
        assert_eq!(err.path.as_deref(), Some("/properties/rank"));
        assert_eq!(err.original, b"orig");
    }
}
