//! Event time: parsing client timestamps and correcting client clock skew.

use serde::{Deserialize, Deserializer, de};

use crate::config::TimeConfig;

/// `received_at - (sent_at - client_timestamp)`: the client's clock offset, measured at send
/// time, removed from the event time. Without `sent_at` the client time is taken as is.
pub fn correct(client_timestamp: i64, sent_at: Option<i64>, received_at: i64) -> i64 {
    match sent_at {
        Some(sent) => received_at.saturating_sub(sent.saturating_sub(client_timestamp)),
        None => client_timestamp,
    }
}

/// Whether a corrected time is plausible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Future,
    TooOld,
}

pub fn judge(corrected: i64, received_at: i64, cfg: &TimeConfig) -> Verdict {
    if corrected > received_at.saturating_add(cfg.max_future_ms) {
        Verdict::Future
    } else if corrected < received_at.saturating_sub(cfg.max_age_ms) {
        Verdict::TooOld
    } else {
        Verdict::Ok
    }
}

/// Parses an RFC 3339 timestamp to epoch milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// A client timestamp: an RFC 3339 string or integer epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub i64);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 timestamp or epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Millis, E> {
                parse_rfc3339(s)
                    .map(Millis)
                    .ok_or_else(|| E::custom(format!("not an RFC 3339 timestamp: {s:?}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                Ok(Millis(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millis, E> {
                i64::try_from(v)
                    .map(Millis)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correction_removes_clock_offset() {
        assert_eq!(correct(100, Some(200), 1_000), 900);
        assert_eq!(correct(100, None, 1_000), 100);
    }

    #[test]
    fn parses_both_spellings() {
        let m: Millis = serde_json::from_str("\"2026-11-28T17:00:00.250Z\"").expect("rfc3339");
        assert_eq!(m.0, 1_795_885_200_250);
        let m: Millis = serde_json::from_str("1795885200250").expect("millis");
        assert_eq!(m.0, 1_795_885_200_250);
        assert!(serde_json::from_str::<Millis>("\"yesterday\"").is_err());
        assert!(serde_json::from_str::<Millis>("true").is_err());
    }
}
