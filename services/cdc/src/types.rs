//! PostgreSQL types as Avro: which Avro type a column gets, and how its text representation
//! (what pgoutput and `::text` produce, with `TimeZone=UTC` and `DateStyle=ISO`) becomes an
//! Avro value.

use serde::{Serialize, Serializer};
use serde_json::{Value as Json, json};

/// How a column is represented in Avro.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Bytes,
    Uuid,
    /// Days since the epoch.
    Date,
    /// Microseconds since the epoch (timestamp and timestamptz).
    TimestampMicros,
    /// Microseconds after midnight.
    TimeMicros,
}

/// The Avro representation of a PostgreSQL type OID. Types without a better mapping (numeric,
/// json, arrays, intervals, enums…) are their text representation, as Debezium's string modes.
pub fn kind(type_oid: u32) -> Kind {
    match type_oid {
        16 => Kind::Boolean,
        17 => Kind::Bytes,
        21 | 23 => Kind::Int,
        20 | 26 => Kind::Long,
        700 => Kind::Float,
        701 => Kind::Double,
        1082 => Kind::Date,
        1083 => Kind::TimeMicros,
        1114 | 1184 => Kind::TimestampMicros,
        2950 => Kind::Uuid,
        _ => Kind::String,
    }
}

impl Kind {
    /// The Avro type, not nullable.
    pub fn avro(self) -> Json {
        match self {
            Kind::Boolean => json!("boolean"),
            Kind::Int => json!("int"),
            Kind::Long => json!("long"),
            Kind::Float => json!("float"),
            Kind::Double => json!("double"),
            Kind::String => json!("string"),
            Kind::Bytes => json!("bytes"),
            Kind::Uuid => json!({"type": "string", "logicalType": "uuid"}),
            Kind::Date => json!({"type": "int", "logicalType": "date"}),
            Kind::TimestampMicros => json!({"type": "long", "logicalType": "timestamp-micros"}),
            Kind::TimeMicros => json!({"type": "long", "logicalType": "time-micros"}),
        }
    }

    /// Whether a TOASTed value of this kind can be replaced by the unchanged-value placeholder.
    pub fn holds_placeholder(self) -> bool {
        matches!(self, Kind::String | Kind::Bytes)
    }
}

/// An Avro value of a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    Boolean(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    String(String),
    Bytes(Vec<u8>),
}

impl Serialize for Datum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Datum::Null => s.serialize_none(),
            Datum::Boolean(v) => s.serialize_bool(*v),
            Datum::Int(v) => s.serialize_i32(*v),
            Datum::Long(v) => s.serialize_i64(*v),
            Datum::Float(v) => s.serialize_f32(*v),
            Datum::Double(v) => s.serialize_f64(*v),
            Datum::String(v) => s.serialize_str(v),
            Datum::Bytes(v) => s.serialize_bytes(v),
        }
    }
}

impl Datum {
    /// A JSON rendering, for dead letters and erasure requests.
    pub fn to_json(&self) -> Json {
        match self {
            Datum::Null => Json::Null,
            Datum::Boolean(v) => json!(v),
            Datum::Int(v) => json!(v),
            Datum::Long(v) => json!(v),
            Datum::Float(v) => json!(v),
            Datum::Double(v) => json!(v),
            Datum::String(v) => json!(v),
            Datum::Bytes(v) => json!(v.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Datum::String(s) => Some(s),
            _ => None,
        }
    }
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Latest year of PostgreSQL's `date` (its earliest is 4713 BC).
const MAX_YEAR: i64 = 5_874_897;

fn parse_date(s: &str) -> Option<i64> {
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let mut parts = s.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    // Outside PostgreSQL's own ranges the stream is corrupt (and the arithmetic could overflow).
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1..=MAX_YEAR).contains(&y) {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d))
}

/// `HH:MM:SS[.ffffff]` as microseconds.
fn parse_time(s: &str) -> Option<i64> {
    let mut parts = s.splitn(3, ':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let sec = parts.next()?;
    let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let s: i64 = whole.parse().ok()?;
    // PostgreSQL's `time` runs from 00:00:00 to 24:00:00 (60 for a leap second).
    if !(0..=24).contains(&h) || !(0..=59).contains(&m) || !(0..=60).contains(&s) {
        return None;
    }
    let mut micros: i64 = 0;
    for (i, c) in frac.chars().take(6).enumerate() {
        micros += i64::from(c.to_digit(10)?) * 10i64.pow(5 - i as u32);
    }
    let total = ((h * 60 + m) * 60 + s) * 1_000_000 + micros;
    (total <= MICROS_PER_DAY).then_some(total)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM]]` (ISO DateStyle) as microseconds since the epoch.
fn parse_timestamp(s: &str) -> Option<i64> {
    match s {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (date, rest) = s.split_once(' ')?;
    let (rest, bc) = match rest.strip_suffix(" BC") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    // Offset: the last '+' or '-' after the time.
    let (time, offset_secs) = match rest.rfind(['+', '-']) {
        Some(i) if i > 0 => {
            let (t, o) = rest.split_at(i);
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let mut parts = o[1..].split(':');
            let h: i64 = parts.next()?.parse().ok()?;
            let m: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
            let sec: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
            // PostgreSQL's UTC offsets stay within ±15:59:59.
            if !(0..=15).contains(&h) || !(0..=59).contains(&m) || !(0..=59).contains(&sec) {
                return None;
            }
            (t, sign * (h * 3600 + m * 60 + sec))
        }
        _ => (rest, 0),
    };
    let date = if bc {
        format!("{date} BC")
    } else {
        date.to_owned()
    };
    let days = parse_date(&date)?;
    let micros = parse_time(time)?;
    days.checked_mul(MICROS_PER_DAY)?
        .checked_add(micros)?
        .checked_sub(offset_secs * 1_000_000)
}

fn parse_bytea(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Converts a text value of `kind` to a datum.
pub fn parse(kind: Kind, text: &[u8]) -> Result<Datum, String> {
    let s = std::str::from_utf8(text).map_err(|_| "value is not UTF-8".to_owned())?;
    // The value itself stays out of the message: it is logged, and dead-lettered unsealed.
    let bad = || format!("cannot read a {}-byte value as {kind:?}", s.len());
    Ok(match kind {
        Kind::Boolean => match s {
            "t" | "true" => Datum::Boolean(true),
            "f" | "false" => Datum::Boolean(false),
            _ => return Err(bad()),
        },
        Kind::Int => Datum::Int(s.parse().map_err(|_| bad())?),
        Kind::Long => Datum::Long(s.parse().map_err(|_| bad())?),
        Kind::Float => Datum::Float(match s {
            "Infinity" => f32::INFINITY,
            "-Infinity" => f32::NEG_INFINITY,
            "NaN" => f32::NAN,
            _ => s.parse().map_err(|_| bad())?,
        }),
        Kind::Double => Datum::Double(match s {
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => s.parse().map_err(|_| bad())?,
        }),
        Kind::String | Kind::Uuid => Datum::String(s.to_owned()),
        Kind::Bytes => Datum::Bytes(parse_bytea(s).ok_or_else(bad)?),
        Kind::Date => Datum::Int(match s {
            "infinity" => i32::MAX,
            "-infinity" => i32::MIN,
            _ => i32::try_from(parse_date(s).ok_or_else(bad)?).map_err(|_| bad())?,
        }),
        Kind::TimestampMicros => Datum::Long(parse_timestamp(s).ok_or_else(bad)?),
        Kind::TimeMicros => Datum::Long(parse_time(s).ok_or_else(bad)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_postgres_text_output() {
        assert_eq!(parse(Kind::Boolean, b"t"), Ok(Datum::Boolean(true)));
        assert_eq!(parse(Kind::Long, b"-42"), Ok(Datum::Long(-42)));
        assert_eq!(
            parse(Kind::Bytes, b"\\x00ff10"),
            Ok(Datum::Bytes(vec![0, 255, 16]))
        );
        assert_eq!(parse(Kind::Date, b"1970-01-02"), Ok(Datum::Int(1)));
        assert_eq!(parse(Kind::Date, b"2026-11-28"), Ok(Datum::Int(20_785)));
        assert_eq!(
            parse(Kind::TimestampMicros, b"2026-11-28 17:00:00.25+00"),
            Ok(Datum::Long(1_795_885_200_250_000))
        );
        assert_eq!(
            parse(Kind::TimestampMicros, b"2026-11-28 19:00:00.25+02"),
            Ok(Datum::Long(1_795_885_200_250_000))
        );
        assert_eq!(
            parse(Kind::TimestampMicros, b"2026-11-28 17:00:00.25"),
            Ok(Datum::Long(1_795_885_200_250_000))
        );
        assert_eq!(
            parse(Kind::TimestampMicros, b"infinity"),
            Ok(Datum::Long(i64::MAX))
        );
        assert_eq!(
            parse(Kind::TimeMicros, b"01:00:00.5"),
            Ok(Datum::Long(3_600_500_000))
        );
        assert!(parse(Kind::Int, b"x").is_err());
        assert!(parse(Kind::TimestampMicros, b"yesterday").is_err());
    }

    /// Found by the pgoutput fuzz target: fields outside PostgreSQL's ranges overflowed the
    /// arithmetic (a panic in debug builds, a wrong value in release). They are errors now.
    #[test]
    fn out_of_range_fields_are_errors_not_overflows() {
        for (kind, text) in [
            (Kind::TimeMicros, "205:05:-000800000000000000516"),
            (Kind::TimeMicros, "9223372036854775807:00:00"),
            (Kind::TimeMicros, "24:00:01"),
            (Kind::Date, "9223372036854775807-01-01"),
            (Kind::Date, "5874898-01-01"),
            (
                Kind::TimestampMicros,
                "2026-01-01 00:00:00+9223372036854775807",
            ),
            (Kind::TimestampMicros, "2026-01-01 00:00:00+16"),
            (Kind::TimestampMicros, "294277-01-01 00:00:00"),
        ] {
            assert!(parse(kind, text.as_bytes()).is_err(), "{kind:?} {text}");
        }
        assert_eq!(
            parse(Kind::TimeMicros, b"24:00:00"),
            Ok(Datum::Long(MICROS_PER_DAY))
        );
        assert_eq!(
            parse(Kind::TimestampMicros, b"2026-01-01 00:00:00-15:59:59"),
            Ok(Datum::Long(1_767_283_199_000_000))
        );
    }
}
