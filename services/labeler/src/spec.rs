//! The declarative label spec: which impression starts an example, which outcomes join it
//! within which windows, and the rules that turn them into a label. Parsed from TOML and
//! validated before anything runs; its hash goes into every example and manifest.
//!
//! ```toml
//! name = "match_outcomes"
//! impression = "match_impression"
//! allowed_lateness = "30s"
//! late_outcomes = "correct"          # or "drop"
//! correction_horizon = "24h"
//! default_label = "unknown"
//!
//! [[outcome]]
//! name = "accepted"
//! type = "boolean"
//! window = "10m"
//! aggregate = "first"
//! from = [{ event = "match_decision", join = "match_viewer", field = "decision", equals = "accept" }]
//!
//! [[rule]]
//! label = "positive"
//! when = { accepted = true, chat_seconds = { gte = 30 } }
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a spec is unusable. Each names the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("label spec {origin}: not valid TOML or wrong shape: {message}")]
    Parse { origin: String, message: String },
    #[error("label spec {spec}: `{key}`: {message}")]
    Invalid {
        spec: String,
        key: String,
        message: String,
    },
}

/// The final label of an example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    Positive,
    Negative,
    Unknown,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Positive => "positive",
            Label::Negative => "negative",
            Label::Unknown => "unknown",
        }
    }
}

/// What happens to an outcome that arrives after its example was emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Counted in `feedloop_labeler_late_outcomes_total` and otherwise ignored.
    Drop,
    /// A correction row with the next version is emitted, with every outcome known so far.
    Correct,
}

/// The value type of an outcome column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Boolean,
    Long,
    Double,
    String,
}

/// How the outcomes that joined one example fold into one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// True if any joined outcome's value is true (or present, without a value).
    Any,
    /// The value of the earliest outcome (event time, then id).
    First,
    /// The value of the latest outcome.
    Last,
    Max,
    Min,
    Sum,
    /// How many distinct outcomes joined.
    Count,
}

/// How an outcome record finds the impressions it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Join {
    /// Same match id: every impression of the match (both sides see one).
    Match,
    /// Same match id, and the outcome's acting user is the impression's viewer.
    MatchViewer,
    /// The same two users, in either role (reports and blocks between them).
    Pair,
}

/// The record kinds the labeler understands as outcome sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    MatchDecision,
    ChatEnded,
    ReportSubmitted,
    UserBlocked,
}

impl EventKind {
    /// The fields a spec may read from this record (besides the envelope's).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            EventKind::MatchDecision => &["decision", "decision_latency_ms"],
            EventKind::ChatEnded => &["duration_ms", "ended_by"],
            EventKind::ReportSubmitted => &["reason", "reported_user_id"],
            EventKind::UserBlocked => &["blocked_user_id"],
        }
    }

    /// Which joins the record supports (the data it carries).
    pub fn joins(self) -> &'static [Join] {
        match self {
            EventKind::MatchDecision | EventKind::ChatEnded => &[Join::Match, Join::MatchViewer],
            EventKind::ReportSubmitted | EventKind::UserBlocked => {
                &[Join::Match, Join::MatchViewer, Join::Pair]
            }
        }
    }
}

/// Where one outcome's records come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// An interaction event type (`match_decision`, `chat_ended`, `report_submitted`,
    /// `user_blocked`)…
    #[serde(default)]
    pub event: Option<EventKind>,
    /// …or a table captured by cdc, as `schema.table` (rows inserted or snapshotted).
    #[serde(default)]
    pub cdc: Option<String>,
    pub join: Join,
    /// cdc only: the two user columns (actor first) for `pair` and `match_viewer` joins.
    #[serde(default)]
    pub users: Vec<String>,
    /// cdc only: the match id column for `match` joins.
    #[serde(default)]
    pub match_column: Option<String>,
    /// cdc only: the event-time column (timestamp); the commit time when absent.
    #[serde(default)]
    pub time_column: Option<String>,
    /// The field whose value the outcome takes; without it the value is `true` (presence).
    #[serde(default)]
    pub field: Option<String>,
    /// With `field`: the value is whether the field equals this string.
    #[serde(default)]
    pub equals: Option<String>,
    /// With `field`: the numeric value is multiplied by this (e.g. 0.001 for ms → s).
    #[serde(default)]
    pub scale: Option<f64>,
}

/// One outcome column of the example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub value_type: ValueType,
    /// Outcomes count when their event time is in `[impression, impression + window)`.
    #[serde(with = "duration")]
    pub window: Duration,
    pub aggregate: Aggregate,
    /// Value when nothing joined: null when absent.
    #[serde(default)]
    pub default: Option<toml::Value>,
    pub from: Vec<SourceSpec>,
}

/// A condition on one outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Condition {
    Bool(bool),
    Number(f64),
    Text(String),
    Compare(Compare),
}

/// Comparisons; all given must hold. `missing = true` holds when the outcome is null.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    #[serde(default)]
    pub gte: Option<f64>,
    #[serde(default)]
    pub gt: Option<f64>,
    #[serde(default)]
    pub lte: Option<f64>,
    #[serde(default)]
    pub lt: Option<f64>,
    #[serde(default)]
    pub missing: Option<bool>,
}

/// The first rule whose conditions all hold gives the label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub label: Label,
    pub when: BTreeMap<String, Condition>,
}

/// A validated label spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// Dataset name: `[a-z0-9_]+`, not starting with `_`; the labels topic is
    /// `feedloop.labels.<name>`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The impression record that starts an example (only `match_impression` today).
    pub impression: String,
    /// How long after the longest window the example waits for stragglers.
    #[serde(with = "duration", default)]
    pub allowed_lateness: Duration,
    pub late_outcomes: LatePolicy,
    /// How long after its close an example can still be corrected (with `correct`).
    #[serde(with = "duration", default)]
    pub correction_horizon: Duration,
    pub default_label: Label,
    #[serde(rename = "outcome")]
    pub outcomes: Vec<OutcomeSpec>,
    #[serde(rename = "rule", default)]
    pub rules: Vec<Rule>,
}

/// Outcome names that map onto the typed columns of `LabeledExample`, with the type they need.
pub const TYPED_OUTCOMES: &[(&str, ValueType)] = &[
    ("accepted", ValueType::Boolean),
    ("chat_seconds", ValueType::Double),
    ("reported", ValueType::Boolean),
    ("blocked", ValueType::Boolean),
];

impl LabelSpec {
    /// Parses and validates a spec; `origin` names it in errors (a file path).
    pub fn parse(origin: &str, text: &str) -> Result<Self, SpecError> {
        let spec: LabelSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    fn invalid(&self, key: impl Into<String>, message: impl fmt::Display) -> SpecError {
        SpecError::Invalid {
            spec: self.name.clone(),
            key: key.into(),
            message: message.to_string(),
        }
    }

    fn validate(&self) -> Result<(), SpecError> {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(self.invalid("name", "must be non-empty [a-z0-9_]"));
        }
        if self.name.starts_with('_') {
            // Hive-style readers skip `_` directories, and `_state/` holds join-state
            // checkpoints.
            return Err(self.invalid("name", "must not start with _"));
        }
        if self.impression != "match_impression" {
            return Err(self.invalid(
                "impression",
                format!(
                    "`{}` is not an impression record (match_impression)",
                    self.impression
                ),
            ));
        }
        if self.outcomes.is_empty() {
            return Err(self.invalid("outcome", "at least one outcome is needed"));
        }
        let mut names = HashSet::new();
        for (i, o) in self.outcomes.iter().enumerate() {
            let key = |k: &str| format!("outcome[{i}].{k}");
            if o.name.is_empty()
                || !o
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(self.invalid(key("name"), "must be non-empty [a-z0-9_]"));
            }
            if RESERVED_COLUMNS.contains(&o.name.as_str()) {
                return Err(self.invalid(key("name"), format!("`{}` is a reserved column", o.name)));
            }
            if !names.insert(o.name.as_str()) {
                return Err(self.invalid(key("name"), format!("`{}` is defined twice", o.name)));
            }
            if let Some((_, t)) = TYPED_OUTCOMES.iter().find(|(n, _)| *n == o.name)
                && *t != o.value_type
            {
                return Err(self.invalid(
                    key("type"),
                    format!(
                        "`{}` is a typed column of LabeledExample and must be {t:?}",
                        o.name
                    ),
                ));
            }
            if o.window.is_zero() {
                return Err(self.invalid(key("window"), "must be longer than zero"));
            }
            let expected = match o.aggregate {
                Aggregate::Any => Some(ValueType::Boolean),
                Aggregate::Count => Some(ValueType::Long),
                _ => None,
            };
            if let Some(t) = expected
                && t != o.value_type
            {
                return Err(self.invalid(
                    key("type"),
                    format!("aggregate {:?} yields {t:?}", o.aggregate),
                ));
            }
            if matches!(
                o.aggregate,
                Aggregate::Max | Aggregate::Min | Aggregate::Sum
            ) && !matches!(o.value_type, ValueType::Long | ValueType::Double)
            {
                return Err(self.invalid(key("aggregate"), "max/min/sum need a numeric type"));
            }
            if let Some(d) = &o.default {
                let ok = matches!(
                    (o.value_type, d),
                    (ValueType::Boolean, toml::Value::Boolean(_))
                        | (ValueType::Long, toml::Value::Integer(_))
                        | (
                            ValueType::Double,
                            toml::Value::Float(_) | toml::Value::Integer(_)
                        )
                        | (ValueType::String, toml::Value::String(_))
                );
                if !ok {
                    return Err(self.invalid(key("default"), "does not match the outcome's type"));
                }
            }
            if o.from.is_empty() {
                return Err(self.invalid(key("from"), "at least one source is needed"));
            }
            for (j, s) in o.from.iter().enumerate() {
                let key = |k: &str| format!("outcome[{i}].from[{j}].{k}");
                match (&s.event, &s.cdc) {
                    (Some(kind), None) => {
                        if !kind.joins().contains(&s.join) {
                            return Err(self.invalid(
                                key("join"),
                                format!("{kind:?} records cannot join by {:?}", s.join),
                            ));
                        }
                        if let Some(f) = &s.field
                            && !kind.fields().contains(&f.as_str())
                        {
                            return Err(self.invalid(
                                key("field"),
                                format!("{kind:?} has no field `{f}` (has {:?})", kind.fields()),
                            ));
                        }
                        if !s.users.is_empty()
                            || s.match_column.is_some()
                            || s.time_column.is_some()
                        {
                            return Err(self.invalid(
                                key("users"),
                                "users, match_column and time_column are for cdc sources",
                            ));
                        }
                    }
                    (None, Some(table)) => {
                        if table.split('.').count() != 2 {
                            return Err(self.invalid(key("cdc"), "must be schema.table"));
                        }
                        let needs_users = matches!(s.join, Join::Pair | Join::MatchViewer);
                        if needs_users && s.users.len() != 2 {
                            return Err(self.invalid(
                                key("users"),
                                "pair and match_viewer joins need the two user columns, actor first",
                            ));
                        }
                        if matches!(s.join, Join::Match | Join::MatchViewer)
                            && s.match_column.is_none()
                        {
                            return Err(self.invalid(
                                key("match_column"),
                                "match joins need the match id column",
                            ));
                        }
                    }
                    _ => {
                        return Err(self.invalid(key("event"), "give exactly one of event or cdc"));
                    }
                }
                if (s.equals.is_some() || s.scale.is_some()) && s.field.is_none() {
                    return Err(self.invalid(key("field"), "equals and scale apply to a field"));
                }
                if s.equals.is_some() && s.scale.is_some() {
                    return Err(self.invalid(key("equals"), "give equals or scale, not both"));
                }
                let source_type = if s.field.is_none() || s.equals.is_some() {
                    ValueType::Boolean
                } else if s.scale.is_some() {
                    ValueType::Double
                } else {
                    o.value_type
                };
                let fits = o.aggregate == Aggregate::Count
                    || source_type == o.value_type
                    || (source_type == ValueType::Long && o.value_type == ValueType::Double)
                    || (source_type == ValueType::Double && o.value_type == ValueType::Long);
                if !fits {
                    return Err(self.invalid(
                        key("field"),
                        format!(
                            "yields {source_type:?} but the outcome is {:?}",
                            o.value_type
                        ),
                    ));
                }
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.when.is_empty() {
                return Err(self.invalid(format!("rule[{i}].when"), "needs a condition"));
            }
            for (name, cond) in &r.when {
                let Some(o) = self.outcomes.iter().find(|o| &o.name == name) else {
                    return Err(
                        self.invalid(format!("rule[{i}].when.{name}"), "no outcome has this name")
                    );
                };
                let ok = match cond {
                    Condition::Bool(_) => o.value_type == ValueType::Boolean,
                    Condition::Number(_) => {
                        matches!(o.value_type, ValueType::Long | ValueType::Double)
                    }
                    Condition::Text(_) => o.value_type == ValueType::String,
                    Condition::Compare(c) => {
                        let numeric =
                            c.gte.is_some() || c.gt.is_some() || c.lte.is_some() || c.lt.is_some();
                        !numeric || matches!(o.value_type, ValueType::Long | ValueType::Double)
                    }
                };
                if !ok {
                    return Err(self.invalid(
                        format!("rule[{i}].when.{name}"),
                        format!(
                            "condition does not fit the outcome's type {:?}",
                            o.value_type
                        ),
                    ));
                }
            }
        }
        if self.late_outcomes == LatePolicy::Correct && self.correction_horizon.is_zero() {
            return Err(self.invalid(
                "correction_horizon",
                "late_outcomes = \"correct\" needs a correction_horizon",
            ));
        }
        Ok(())
    }

    /// The longest outcome window.
    pub fn longest_window(&self) -> Duration {
        self.outcomes
            .iter()
            .map(|o| o.window)
            .max()
            .unwrap_or_default()
    }

    /// Milliseconds from the impression to the example's close: longest window + lateness.
    pub fn close_after_ms(&self) -> i64 {
        millis(self.longest_window() + self.allowed_lateness)
    }

    /// How long join state is kept after an example's close.
    pub fn retention_after_close_ms(&self) -> i64 {
        match self.late_outcomes {
            LatePolicy::Drop => 0,
            LatePolicy::Correct => millis(self.correction_horizon),
        }
    }

    /// SHA-256 (hex) of the spec's canonical JSON: equal specs hash equal whatever their
    /// TOML formatting.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// cdc tables any outcome reads.
    pub fn cdc_tables(&self) -> Vec<String> {
        let mut tables: Vec<String> = self
            .outcomes
            .iter()
            .flat_map(|o| o.from.iter().filter_map(|s| s.cdc.clone()))
            .collect();
        tables.sort();
        tables.dedup();
        tables
    }
}

/// Columns of the dataset that outcome names may not take.
pub const RESERVED_COLUMNS: &[&str] = &[
    "example_id",
    "dataset",
    "label_spec_hash",
    "version",
    "impression_event_id",
    "match_id",
    "viewer_id",
    "candidate_id",
    "impression_time",
    "request_id",
    "model_version",
    "experiment_id",
    "experiment_arm",
    "rank",
    "score",
    "features",
    "label",
    "extra_labels",
    "window_closed_at",
    "source_topic",
    "source_partition",
    "source_offset",
    "dt",
    "hour",
];

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Durations as `500ms`, `30s`, `10m`, `24h`, `7d`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{text}` has no unit (ms, s, m, h, d)"))?;
        let (n, unit) = text.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("`{text}` does not start with a number"))?;
        let ms = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("`{text}`: unknown unit `{unit}` (ms, s, m, h, d)")),
        };
        n.checked_mul(ms)
            .map(Duration::from_millis)
            .ok_or_else(|| format!("`{text}` is too long"))
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The spec the README documents, and the demo and tests use.
pub const EXAMPLE_SPEC: &str = include_str!("../specs/match_outcomes.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_spec_is_valid() {
        let spec = LabelSpec::parse("example", EXAMPLE_SPEC).unwrap();
        assert_eq!(spec.name, "match_outcomes");
        assert_eq!(spec.longest_window(), Duration::from_secs(24 * 3600));
        assert_eq!(spec.cdc_tables(), vec!["app.blocks", "app.reports"]);
        assert_eq!(spec.hash().len(), 64);
    }

    #[test]
    fn the_hash_ignores_formatting_but_not_content() {
        let a = LabelSpec::parse("a", EXAMPLE_SPEC).unwrap();
        let reformatted = EXAMPLE_SPEC.replace(" = ", "=").replace("# ", "#  ");
        let b = LabelSpec::parse("b", &reformatted).unwrap();
        assert_eq!(a.hash(), b.hash());
        let changed = EXAMPLE_SPEC.replace("window = \"10m\"", "window = \"11m\"");
        let c = LabelSpec::parse("c", &changed).unwrap();
        assert_ne!(a.hash(), c.hash());
    }

    fn err(text: &str) -> String {
        LabelSpec::parse("t", text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let bad_window = EXAMPLE_SPEC.replace("window = \"10m\"", "window = \"10 minutes\"");
        assert!(
            err(&bad_window).contains("unknown unit"),
            "{}",
            err(&bad_window)
        );
        let bad_type = EXAMPLE_SPEC.replacen("type = \"boolean\"", "type = \"double\"", 1);
        assert!(
            err(&bad_type).contains("outcome[0].type"),
            "{}",
            err(&bad_type)
        );
        let bad_rule = EXAMPLE_SPEC.replace("reported = true", "reportd = true");
        assert!(
            err(&bad_rule).contains("when.reportd"),
            "{}",
            err(&bad_rule)
        );
        let bad_field = EXAMPLE_SPEC.replace("field = \"decision\"", "field = \"choice\"");
        assert!(
            err(&bad_field).contains("has no field `choice`"),
            "{}",
            err(&bad_field)
        );
        let hidden = EXAMPLE_SPEC.replace("name = \"match_outcomes\"", "name = \"_state\"");
        assert!(
            err(&hidden).contains("must not start with _"),
            "{}",
            err(&hidden)
        );
        let unknown_key = format!("{EXAMPLE_SPEC}\nsurprise = 1\n");
        assert!(
            err(&unknown_key).contains("surprise"),
            "{}",
            err(&unknown_key)
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            duration::parse("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(duration::parse("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(
            duration::parse("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(duration::parse("10").is_err());
        assert!(duration::parse("m").is_err());
    }
}
