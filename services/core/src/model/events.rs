//! Interaction events reported by mobile clients (`feedloop.events`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    avro::{CodecError, CompiledSchema},
    crypto::{self, CryptoError, DataKey, Opened},
};

/// `io.feedloop.events.Platform`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Ios,
    Android,
    Web,
    #[serde(other)]
    Other,
}

/// `io.feedloop.events.Envelope`: what every event carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: Uuid,
    pub event_type: String,
    pub user_id: String,
    #[serde(default)]
    pub anonymous_id: Option<String>,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Skew-corrected event time, epoch milliseconds.
    pub timestamp: i64,
    /// Event time by the client's clock, epoch milliseconds.
    pub client_timestamp: i64,
    #[serde(default)]
    pub sent_at: Option<i64>,
    pub received_at: i64,
    pub app_id: String,
    pub platform: Platform,
    pub app_version: String,
    #[serde(default)]
    pub os_version: Option<String>,
    #[serde(default)]
    pub clock_skew_flagged: bool,
}

/// A logged feature value (a branch of the `features` map's union; null is `None`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FeatureValue {
    Bool(bool),
    Long(i64),
    Double(f64),
    String(String),
}

/// Read from whatever scalar the input holds, without trying each variant in turn (serde's
/// untagged enums build an error per failed variant, which dominated the collector's hot path).
impl<'de> Deserialize<'de> for FeatureValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FeatureValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a boolean, number or string")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Bool(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Long(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FeatureValue, E> {
                Ok(i64::try_from(v).map_or(FeatureValue::Double(v as f64), FeatureValue::Long))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Double(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FeatureValue, E> {
                Ok(FeatureValue::String(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<FeatureValue, E> {
                Ok(FeatureValue::String(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// `io.feedloop.events.MatchImpression`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchImpression {
    pub envelope: Envelope,
    pub match_id: Uuid,
    pub candidate_id: String,
    pub request_id: String,
    pub model_version: String,
    #[serde(default)]
    pub experiment_id: Option<String>,
    #[serde(default)]
    pub experiment_arm: Option<String>,
    pub rank: i32,
    pub score: f64,
    #[serde(default)]
    pub features: BTreeMap<String, Option<FeatureValue>>,
}

/// `io.feedloop.events.Decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Accept,
    Skip,
    #[serde(other)]
    Unknown,
}

/// `io.feedloop.events.MatchDecision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchDecision {
    pub envelope: Envelope,
    pub match_id: Uuid,
    pub decision: Decision,
    #[serde(default)]
    pub decision_latency_ms: Option<i64>,
}

/// `io.feedloop.events.ChatEndedBy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatEndedBy {
    #[serde(rename = "self")]
    Myself,
    Peer,
    Network,
    #[serde(other)]
    Unknown,
}

/// `io.feedloop.events.ChatEnded`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatEnded {
    pub envelope: Envelope,
    pub match_id: Uuid,
    pub duration_ms: i64,
    pub ended_by: ChatEndedBy,
}

/// `io.feedloop.events.ReportReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportReason {
    Spam,
    Harassment,
    Nudity,
    Underage,
    #[serde(other)]
    Other,
}

/// `io.feedloop.events.ReportSubmitted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSubmitted {
    pub envelope: Envelope,
    #[serde(default)]
    pub match_id: Option<Uuid>,
    pub reported_user_id: String,
    pub reason: ReportReason,
    #[serde(default)]
    pub comment: Option<String>,
}

/// `io.feedloop.events.UserBlocked`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserBlocked {
    pub envelope: Envelope,
    #[serde(default)]
    pub match_id: Option<Uuid>,
    pub blocked_user_id: String,
}

/// `io.feedloop.events.ScreenViewed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenViewed {
    pub envelope: Envelope,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, Option<FeatureValue>>,
}

/// `io.feedloop.events.UserIdentified`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserIdentified {
    pub envelope: Envelope,
    #[serde(default)]
    pub trait_names: Vec<String>,
}

/// The event types of the catalogue, with their names on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    MatchImpression,
    MatchDecision,
    ChatEnded,
    ReportSubmitted,
    UserBlocked,
    ScreenViewed,
    UserIdentified,
}

impl EventType {
    pub const ALL: [Self; 7] = [
        Self::MatchImpression,
        Self::MatchDecision,
        Self::ChatEnded,
        Self::ReportSubmitted,
        Self::UserBlocked,
        Self::ScreenViewed,
        Self::UserIdentified,
    ];

    /// The `event_type` clients send, e.g. `match_impression`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MatchImpression => "match_impression",
            Self::MatchDecision => "match_decision",
            Self::ChatEnded => "chat_ended",
            Self::ReportSubmitted => "report_submitted",
            Self::UserBlocked => "user_blocked",
            Self::ScreenViewed => "screen_viewed",
            Self::UserIdentified => "user_identified",
        }
    }

    /// Full Avro record name.
    pub fn record(self) -> &'static str {
        match self {
            Self::MatchImpression => "io.feedloop.events.MatchImpression",
            Self::MatchDecision => "io.feedloop.events.MatchDecision",
            Self::ChatEnded => "io.feedloop.events.ChatEnded",
            Self::ReportSubmitted => "io.feedloop.events.ReportSubmitted",
            Self::UserBlocked => "io.feedloop.events.UserBlocked",
            Self::ScreenViewed => "io.feedloop.events.ScreenViewed",
            Self::UserIdentified => "io.feedloop.events.UserIdentified",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Why a record is not a decodable event.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("record `{0}` is not a catalogue event")]
    NotAnEvent(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Any interaction event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    MatchImpression(MatchImpression),
    MatchDecision(MatchDecision),
    ChatEnded(ChatEnded),
    ReportSubmitted(ReportSubmitted),
    UserBlocked(UserBlocked),
    ScreenViewed(ScreenViewed),
    UserIdentified(UserIdentified),
}

impl Event {
    /// Decodes an Avro body written with `schema`, whichever catalogue event it is (the
    /// schema's record name says which).
    pub fn decode(schema: &CompiledSchema, body: &[u8]) -> Result<Self, EventDecodeError> {
        let name = schema.full_name().unwrap_or_default();
        let kind = EventType::ALL
            .into_iter()
            .find(|t| t.record() == name)
            .ok_or_else(|| EventDecodeError::NotAnEvent(name.to_owned()))?;
        Ok(match kind {
            EventType::MatchImpression => Self::MatchImpression(schema.decode_body(body)?),
            EventType::MatchDecision => Self::MatchDecision(schema.decode_body(body)?),
            EventType::ChatEnded => Self::ChatEnded(schema.decode_body(body)?),
            EventType::ReportSubmitted => Self::ReportSubmitted(schema.decode_body(body)?),
            EventType::UserBlocked => Self::UserBlocked(schema.decode_body(body)?),
            EventType::ScreenViewed => Self::ScreenViewed(schema.decode_body(body)?),
            EventType::UserIdentified => Self::UserIdentified(schema.decode_body(body)?),
        })
    }

    /// The personal fields (crypto-shredded): the device id, and a report's comment.
    fn personal_fields(&mut self) -> impl Iterator<Item = &mut Option<String>> {
        let (envelope, comment) = match self {
            Self::MatchImpression(e) => (&mut e.envelope, None),
            Self::MatchDecision(e) => (&mut e.envelope, None),
            Self::ChatEnded(e) => (&mut e.envelope, None),
            Self::ReportSubmitted(e) => (&mut e.envelope, Some(&mut e.comment)),
            Self::UserBlocked(e) => (&mut e.envelope, None),
            Self::ScreenViewed(e) => (&mut e.envelope, None),
            Self::UserIdentified(e) => (&mut e.envelope, None),
        };
        std::iter::once(&mut envelope.device_id).chain(comment)
    }

    /// Whether the event carries a personal value to seal.
    pub fn has_personal(&self) -> bool {
        self.envelope().device_id.is_some()
            || matches!(self, Self::ReportSubmitted(r) if r.comment.is_some())
    }

    /// Seals the personal fields under the acting user's key (`None`: the user is erased).
    pub fn seal_personal(&mut self, key: Option<&DataKey>) -> Result<(), CryptoError> {
        let user = self.envelope().user_id.clone();
        for v in self.personal_fields().flatten() {
            *v = crypto::seal_for(key, &user, v)?;
        }
        Ok(())
    }

    /// Opens sealed personal fields for a consumer that needs the plaintext: a field whose key
    /// was destroyed reads as [`crypto::ERASED`], one that does not open as `None`.
    pub fn open_personal(&mut self, key: Option<&DataKey>) {
        let user = self.envelope().user_id.clone();
        for field in self.personal_fields() {
            if let Some(v) = field {
                *field = match crypto::open(key, &user, v) {
                    Opened::Plain(p) | Opened::Clear(p) => Some(p),
                    Opened::Erased => Some(crypto::ERASED.to_owned()),
                    Opened::Invalid => None,
                };
            }
        }
    }

    pub fn envelope(&self) -> &Envelope {
        match self {
            Self::MatchImpression(e) => &e.envelope,
            Self::MatchDecision(e) => &e.envelope,
            Self::ChatEnded(e) => &e.envelope,
            Self::ReportSubmitted(e) => &e.envelope,
            Self::UserBlocked(e) => &e.envelope,
            Self::ScreenViewed(e) => &e.envelope,
            Self::UserIdentified(e) => &e.envelope,
        }
    }

    pub fn event_type(&self) -> EventType {
        match self {
            Self::MatchImpression(_) => EventType::MatchImpression,
            Self::MatchDecision(_) => EventType::MatchDecision,
            Self::ChatEnded(_) => EventType::ChatEnded,
            Self::ReportSubmitted(_) => EventType::ReportSubmitted,
            Self::UserBlocked(_) => EventType::UserBlocked,
            Self::ScreenViewed(_) => EventType::ScreenViewed,
            Self::UserIdentified(_) => EventType::UserIdentified,
        }
    }

    /// The match the event is about, if any: the Kafka key that keeps one match on one
    /// partition.
    pub fn match_id(&self) -> Option<Uuid> {
        match self {
            Self::MatchImpression(e) => Some(e.match_id),
            Self::MatchDecision(e) => Some(e.match_id),
            Self::ChatEnded(e) => Some(e.match_id),
            Self::ReportSubmitted(e) => e.match_id,
            Self::UserBlocked(e) => e.match_id,
            Self::ScreenViewed(_) | Self::UserIdentified(_) => None,
        }
    }
}
