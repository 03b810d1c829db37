//! The label window logic, pure: join keys, which outcomes count for an impression, how they
//! fold into values and a label, when a late record still changes an example, and
//! per-partition watermarks. No IO here; the engine feeds it records and the state store holds
//! what it needs between them.
//!
//! Time: an outcome counts for an impression when its event time is in
//! `[impression, impression + window)`. An example *closes* at
//! `impression + longest window + allowed_lateness` and is emitted once the dataset's watermark
//! reaches its close. Each input partition's watermark is the highest event time read from it;
//! the dataset's watermark is the lowest over the partitions that still have records to read.
//!
//! Lateness has one rule, whatever partition a record lives in: an outcome read after an
//! example it joins was emitted corrects that example (the next version, at the next commit),
//! as long as the dataset's watermark has not passed the example's close plus the correction
//! horizon; past the horizon it is counted, not applied. Every version holds every outcome
//! known when it was committed, so the latest version of an example does not depend on when
//! its outcomes arrived, only on whether they arrived within the horizon.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use feedloop_core::model::FeatureValue;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::{Aggregate, Compare, Condition, Join, Label, LabelSpec, ValueType, millis};

/// A scalar outcome value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "snake_case")]
pub enum Scalar {
    Null,
    Bool(bool),
    Long(i64),
    Double(f64),
    Text(String),
}

impl Scalar {
    fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Long(v) => Some(*v as f64),
            Scalar::Double(v) => Some(*v),
            _ => None,
        }
    }

    fn truthy(&self) -> bool {
        matches!(self, Scalar::Bool(true))
    }

    /// Converts to the outcome's declared type (numbers between long and double).
    fn coerce(self, to: ValueType) -> Scalar {
        match (to, self) {
            (ValueType::Double, Scalar::Long(v)) => Scalar::Double(v as f64),
            (ValueType::Long, Scalar::Double(v)) => Scalar::Long(v.round() as i64),
            (_, v) => v,
        }
    }
}

/// Where a record was read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// An impression as the join state keeps it: what the example row needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Impression {
    pub event_id: Uuid,
    pub match_id: Uuid,
    pub viewer_id: String,
    pub candidate_id: String,
    pub time_ms: i64,
    pub request_id: String,
    pub model_version: String,
    pub experiment_id: Option<String>,
    pub experiment_arm: Option<String>,
    pub rank: i32,
    pub score: f64,
    pub features: BTreeMap<String, Option<FeatureValue>>,
    pub source: SourceRef,
}

/// One outcome value for one outcome column, keyed for the join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The outcome column (spec `outcome.name`).
    pub name: String,
    /// Identity of the source record (event id, or table and primary key): duplicates of the
    /// same record count once.
    pub id: String,
    pub join_key: String,
    pub time_ms: i64,
    pub value: Scalar,
    /// Users the record is about (for erasure).
    pub users: Vec<String>,
    /// Where the record was read (`topic/partition/offset`): a replay of the same record has
    /// the same origin, a client's duplicate another.
    pub origin: String,
}

/// The join keys of a match for a viewer: every join an outcome may use.
pub fn match_key(match_id: &Uuid) -> String {
    format!("m:{match_id}")
}

pub fn match_viewer_key(match_id: &Uuid, user: &str) -> String {
    format!("v:{match_id}:{user}")
}

pub fn pair_key(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("p:{lo}\u{1f}{hi}")
}

/// The key an outcome from a source with `join` uses.
pub fn outcome_key(
    join: Join,
    match_id: Option<&Uuid>,
    actor: &str,
    other: Option<&str>,
) -> Option<String> {
    match join {
        Join::Match => match_id.map(match_key),
        Join::MatchViewer => match_id.map(|m| match_viewer_key(m, actor)),
        Join::Pair => other.map(|o| pair_key(actor, o)),
    }
}

impl Impression {
    pub fn keys(&self) -> Vec<String> {
        vec![
            match_key(&self.match_id),
            match_viewer_key(&self.match_id, &self.viewer_id),
            pair_key(&self.viewer_id, &self.candidate_id),
        ]
    }

    pub fn users(&self) -> Vec<String> {
        vec![self.viewer_id.clone(), self.candidate_id.clone()]
    }
}

/// A spec with what the hot path needs precomputed.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub spec: LabelSpec,
    pub hash: String,
    pub close_after_ms: i64,
    pub retention_after_close_ms: i64,
    windows: HashMap<String, i64>,
}

impl Compiled {
    pub fn new(spec: LabelSpec) -> Self {
        let windows = spec
            .outcomes
            .iter()
            .map(|o| (o.name.clone(), millis(o.window)))
            .collect();
        Self {
            hash: spec.hash(),
            close_after_ms: spec.close_after_ms(),
            retention_after_close_ms: spec.retention_after_close_ms(),
            windows,
            spec,
        }
    }

    pub fn close_ms(&self, impression: &Impression) -> i64 {
        impression.time_ms.saturating_add(self.close_after_ms)
    }

    /// The deterministic example id: the same impression under the same spec, always.
    pub fn example_id(&self, impression: &Impression) -> Uuid {
        let name = format!("{}/{}/{}", self.spec.name, self.hash, impression.event_id);
        Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
    }

    /// Whether `outcome` joins `impression`: same key, and in the outcome's window.
    pub fn joins(&self, impression: &Impression, keys: &[String], outcome: &Outcome) -> bool {
        let Some(window) = self.windows.get(&outcome.name) else {
            return false;
        };
        keys.contains(&outcome.join_key)
            && outcome.time_ms >= impression.time_ms
            && outcome.time_ms < impression.time_ms.saturating_add(*window)
    }

    /// The earliest close of any example `outcome` can join: impressions at most one window
    /// before it.
    fn earliest_close(&self, outcome: &Outcome) -> i64 {
        let window = self.windows.get(&outcome.name).copied().unwrap_or(0);
        outcome
            .time_ms
            .saturating_sub(window)
            .saturating_add(1)
            .saturating_add(self.close_after_ms)
    }

    /// The latest close of any example `outcome` can join: an impression at its own time.
    fn latest_close(&self, outcome: &Outcome) -> i64 {
        outcome.time_ms.saturating_add(self.close_after_ms)
    }

    /// Whether `outcome` may join an example already emitted, when examples closing up to
    /// `emitted_ms` were: only then is the join state consulted for a correction.
    pub fn may_join_emitted(&self, outcome: &Outcome, emitted_ms: i64) -> bool {
        self.earliest_close(outcome) <= emitted_ms
    }

    /// Whether every example `outcome` can join is past the correction horizon when the
    /// dataset's examples are emitted up to `emitted_ms` (their join state is gone): the
    /// outcome is counted, and changes nothing.
    pub fn beyond_horizon(&self, outcome: &Outcome, emitted_ms: i64) -> bool {
        self.latest_close(outcome)
            .saturating_add(self.retention_after_close_ms)
            < emitted_ms
    }

    /// Whether the example of an impression closing at `close_ms` can still be corrected when
    /// examples are emitted up to `emitted_ms`.
    pub fn correctable(&self, close_ms: i64, emitted_ms: i64) -> bool {
        self.spec.late_outcomes == crate::spec::LatePolicy::Correct
            && close_ms.saturating_add(self.retention_after_close_ms) >= emitted_ms
    }

    /// The example for `impression` from the joined `outcomes` (any order, duplicates allowed):
    /// every outcome that joins it counts.
    pub fn label(&self, impression: &Impression, outcomes: &[Outcome]) -> Labeled {
        self.label_keyed(impression, &impression.keys(), outcomes)
    }

    /// [`label`](Self::label), with the impression's [`keys`](Impression::keys) at hand.
    pub fn label_keyed<'a>(
        &self,
        impression: &Impression,
        keys: &[String],
        outcomes: impl IntoIterator<Item = &'a Outcome>,
    ) -> Labeled {
        let close = self.close_ms(impression);
        let mut joined: BTreeMap<(&str, i64, &str), &Outcome> = BTreeMap::new();
        for o in outcomes {
            if self.joins(impression, keys, o) {
                joined
                    .entry((o.name.as_str(), o.time_ms, o.id.as_str()))
                    .or_insert(o);
            }
        }
        let mut values = Vec::with_capacity(self.spec.outcomes.len());
        for spec in &self.spec.outcomes {
            let mine: Vec<&Outcome> = joined
                .range((spec.name.as_str(), i64::MIN, "")..)
                .take_while(|((n, _, _), _)| *n == spec.name)
                .map(|(_, o)| *o)
                .collect();
            let value = aggregate(spec.aggregate, spec.value_type, &mine)
                .unwrap_or_else(|| default_value(spec.default.as_ref(), spec.value_type));
            values.push((spec.name.clone(), value));
        }
        let label = self
            .spec
            .rules
            .iter()
            .find(|r| {
                r.when.iter().all(|(name, cond)| {
                    values
                        .iter()
                        .find(|(n, _)| n == name)
                        .is_some_and(|(_, v)| holds(cond, v))
                })
            })
            .map_or(self.spec.default_label, |r| r.label);
        Labeled {
            values,
            label,
            close_ms: close,
            origins: joined.values().map(|o| o.origin.clone()).collect(),
        }
    }
}

/// An example's computed outcome values and label.
#[derive(Debug, Clone, PartialEq)]
pub struct Labeled {
    /// One value per spec outcome, in spec order.
    pub values: Vec<(String, Scalar)>,
    pub label: Label,
    pub close_ms: i64,
    /// Where the joined outcomes were read (`topic/partition/offset`), for lineage.
    pub origins: Vec<String>,
}

impl Labeled {
    pub fn value(&self, name: &str) -> Option<&Scalar> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// What a version of the example says (its values and label), as 63 bits of SHA-256: a
    /// correction that says the same creates no version.
    pub fn digest(&self) -> i64 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.label.as_str().as_bytes());
        for (name, value) in &self.values {
            h.update([0]);
            h.update(name.as_bytes());
            h.update([0]);
            h.update(serde_json::to_vec(value).unwrap_or_default());
        }
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        i64::from_be_bytes(first) & i64::MAX
    }
}

fn default_value(default: Option<&toml::Value>, to: ValueType) -> Scalar {
    match default {
        Some(toml::Value::Boolean(b)) => Scalar::Bool(*b),
        Some(toml::Value::Integer(i)) => Scalar::Long(*i).coerce(to),
        Some(toml::Value::Float(f)) => Scalar::Double(*f),
        Some(toml::Value::String(s)) => Scalar::Text(s.clone()),
        _ => Scalar::Null,
    }
}

/// Folds outcomes sorted by (time, id); `None` when nothing joined.
fn aggregate(agg: Aggregate, to: ValueType, outcomes: &[&Outcome]) -> Option<Scalar> {
    if outcomes.is_empty() {
        return (agg == Aggregate::Count).then_some(Scalar::Long(0));
    }
    let values = outcomes.iter().map(|o| o.value.clone().coerce(to));
    Some(match agg {
        Aggregate::Any => Scalar::Bool(outcomes.iter().any(|o| o.value.truthy())),
        Aggregate::Count => Scalar::Long(outcomes.len() as i64),
        Aggregate::First => values.into_iter().next().unwrap_or(Scalar::Null),
        Aggregate::Last => values.into_iter().next_back().unwrap_or(Scalar::Null),
        Aggregate::Max | Aggregate::Min | Aggregate::Sum => {
            let nums = outcomes.iter().filter_map(|o| o.value.as_f64());
            let folded = match agg {
                Aggregate::Max => {
                    nums.fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                }
                Aggregate::Min => {
                    nums.fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))))
                }
                _ => Some(nums.sum()),
            };
            match folded {
                Some(v) => Scalar::Double(v).coerce(to),
                None => Scalar::Null,
            }
        }
    })
}

fn holds(cond: &Condition, value: &Scalar) -> bool {
    match cond {
        Condition::Bool(b) => value == &Scalar::Bool(*b),
        Condition::Number(n) => value.as_f64() == Some(*n),
        Condition::Text(t) => matches!(value, Scalar::Text(v) if v == t),
        Condition::Compare(Compare {
            gte,
            gt,
            lte,
            lt,
            missing,
        }) => {
            if let Some(m) = missing
                && (*value == Scalar::Null) != *m
            {
                return false;
            }
            let numeric = [gte, gt, lte, lt].iter().any(|c| c.is_some());
            if !numeric {
                return true;
            }
            let Some(v) = value.as_f64() else {
                return false;
            };
            gte.is_none_or(|x| v >= x)
                && gt.is_none_or(|x| v > x)
                && lte.is_none_or(|x| v <= x)
                && lt.is_none_or(|x| v < x)
        }
    }
}

/// Per-partition watermarks of the input.
///
/// A partition read to its end stops holding the global watermark back only once it has
/// stayed there for the idle timeout. An end-of-partition event says only that nothing was
/// there when the broker answered: a source whose records arrive a moment later (a collector
/// draining its spool, a fetch that came back empty) is still behind in event time, and
/// letting a faster source drive the watermark meanwhile would close its examples early and
/// turn its on-time outcomes into late ones (beyond the correction horizon when the faster
/// source is far enough ahead). This is Flink's `withIdleness`, with the end of the partition
/// as the sign of a quiet source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Watermarks {
    /// (topic, partition) → highest event time read; absent until a record is read.
    partitions: BTreeMap<String, i64>,
    /// Assigned partitions → since when they have been at their end (nothing more to read
    /// right now); `None` while records are coming.
    #[serde(skip)]
    at_end: BTreeMap<String, Option<Instant>>,
}

/// `topic/partition`, the key of per-partition maps.
pub fn tp(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

impl Watermarks {
    /// Declares an assigned partition: it holds the global watermark back until it has been
    /// read to its end and stayed there for the idle timeout.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        self.at_end.insert(tp(topic, partition), None);
    }

    /// The partition's watermark before a record at `time_ms`; then advances it.
    pub fn observe(&mut self, topic: &str, partition: i32, time_ms: i64) -> i64 {
        self.observe_tp(&tp(topic, partition), time_ms)
    }

    /// [`observe`](Self::observe) by [`tp`] key.
    pub fn observe_tp(&mut self, key: &str, time_ms: i64) -> i64 {
        match self.at_end.get_mut(key) {
            Some(since) => *since = None,
            None => {
                self.at_end.insert(key.to_owned(), None);
            }
        }
        if !self.partitions.contains_key(key) {
            self.partitions.insert(key.to_owned(), i64::MIN);
        }
        let Some(wm) = self.partitions.get_mut(key) else {
            return i64::MIN;
        };
        let before = *wm;
        *wm = (*wm).max(time_ms);
        before
    }

    /// The partition has nothing more to read for now (since `now`, unless it already had
    /// nothing since earlier).
    pub fn reached_end(&mut self, topic: &str, partition: i32, now: Instant) {
        self.at_end
            .entry(tp(topic, partition))
            .or_default()
            .get_or_insert(now);
    }

    /// The per-partition watermarks, to commit with the offsets.
    pub fn snapshot(&self) -> BTreeMap<String, i64> {
        self.partitions.clone()
    }

    /// Restores committed watermarks.
    pub fn restore(&mut self, partitions: BTreeMap<String, i64>) {
        self.partitions = partitions;
    }

    pub fn partition(&self, topic: &str, partition: i32) -> i64 {
        self.partitions
            .get(&tp(topic, partition))
            .copied()
            .unwrap_or(i64::MIN)
    }

    /// The partition has been read to its end (and nothing was read since).
    pub fn at_end(&self, topic: &str, partition: i32) -> bool {
        self.at_end
            .get(&tp(topic, partition))
            .is_some_and(Option::is_some)
    }

    /// Every assigned partition has been read to its end.
    pub fn all_at_end(&self) -> bool {
        !self.at_end.is_empty() && self.at_end.values().all(Option::is_some)
    }

    /// The lowest watermark among partitions that are not idle (records left to read, or at
    /// their end for less than `idle_after`); when every partition is idle, the highest event
    /// time read anywhere.
    pub fn global(&self, now: Instant, idle_after: Duration) -> i64 {
        let busy = self
            .at_end
            .iter()
            .filter(|(_, since)| {
                since.is_none_or(|t| now.saturating_duration_since(t) < idle_after)
            })
            .map(|(k, _)| self.partitions.get(k).copied().unwrap_or(i64::MIN))
            .min();
        busy.unwrap_or_else(|| self.partitions.values().copied().max().unwrap_or(i64::MIN))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::spec::EXAMPLE_SPEC;

    const T0: i64 = 1_795_000_000_000;
    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;

    fn compiled() -> Compiled {
        Compiled::new(LabelSpec::parse("example", EXAMPLE_SPEC).unwrap())
    }

    fn impression(viewer: &str, candidate: &str, match_id: Uuid) -> Impression {
        Impression {
            event_id: Uuid::new_v4(),
            match_id,
            viewer_id: viewer.into(),
            candidate_id: candidate.into(),
            time_ms: T0,
            request_id: "r".into(),
            model_version: "m1".into(),
            experiment_id: None,
            experiment_arm: Some("b".into()),
            rank: 1,
            score: 0.5,
            features: BTreeMap::new(),
            source: SourceRef {
                topic: "feedloop.events".into(),
                partition: 0,
                offset: 0,
            },
        }
    }

    fn outcome(name: &str, id: &str, key: String, dt: i64, value: Scalar) -> Outcome {
        Outcome {
            name: name.into(),
            id: id.into(),
            join_key: key,
            time_ms: T0 + dt,
            value,
            users: vec![],
            origin: String::new(),
        }
    }

    fn decision(imp: &Impression, id: &str, dt: i64, accept: bool) -> Outcome {
        let key = match_viewer_key(&imp.match_id, &imp.viewer_id);
        outcome("accepted", id, key, dt, Scalar::Bool(accept))
    }

    fn chat(imp: &Impression, id: &str, dt: i64, seconds: f64) -> Outcome {
        outcome(
            "chat_seconds",
            id,
            match_key(&imp.match_id),
            dt,
            Scalar::Double(seconds),
        )
    }

    fn report(imp: &Impression, id: &str, dt: i64) -> Outcome {
        let key = pair_key(&imp.candidate_id, &imp.viewer_id);
        outcome("reported", id, key, dt, Scalar::Bool(true))
    }

    #[test]
    fn accepted_and_long_chat_is_positive() {
        let c = compiled();
        let imp = impression("a", "b", Uuid::new_v4());
        let l = c.label(
            &imp,
            &[
                decision(&imp, "d", MIN, true),
                chat(&imp, "c", 20 * MIN, 45.0),
            ],
        );
        assert_eq!(l.label, Label::Positive);
        assert_eq!(l.value("accepted"), Some(&Scalar::Bool(true)));
        assert_eq!(l.value("chat_seconds"), Some(&Scalar::Double(45.0)));
        assert_eq!(l.value("reported"), Some(&Scalar::Bool(false)));
    }

    #[test]
    fn window_boundaries_are_half_open() {
        let c = compiled();
        let imp = impression("a", "b", Uuid::new_v4());
        // Exactly at the impression: counts.
        let at_start = c.label(&imp, &[decision(&imp, "d", 0, false)]);
        assert_eq!(at_start.value("accepted"), Some(&Scalar::Bool(false)));
        // One ms before the end of the 10-minute window: counts; at the end: does not.
        let inside = c.label(&imp, &[decision(&imp, "d", 10 * MIN - 1, true)]);
        assert_eq!(inside.value("accepted"), Some(&Scalar::Bool(true)));
        let at_end = c.label(&imp, &[decision(&imp, "d", 10 * MIN, true)]);
        assert_eq!(at_end.value("accepted"), Some(&Scalar::Null));
        assert_eq!(at_end.label, Label::Unknown);
        // Before the impression: does not count.
        let before = c.label(&imp, &[decision(&imp, "d", -1, true)]);
        assert_eq!(before.value("accepted"), Some(&Scalar::Null));
        // A report at 24 h - 1 ms counts, at 24 h not.
        let r = c.label(&imp, &[report(&imp, "r", 24 * HOUR - 1)]);
        assert_eq!(r.label, Label::Negative);
        let r = c.label(&imp, &[report(&imp, "r", 24 * HOUR)]);
        assert_eq!(r.value("reported"), Some(&Scalar::Bool(false)));
    }

    #[test]
    fn a_report_either_way_round_and_only_between_the_pair() {
        let c = compiled();
        let imp = impression("a", "b", Uuid::new_v4());
        let other = outcome(
            "reported",
            "r",
            pair_key("a", "z"),
            HOUR,
            Scalar::Bool(true),
        );
        assert_eq!(
            c.label(&imp, &[other]).value("reported"),
            Some(&Scalar::Bool(false))
        );
        let theirs = outcome(
            "reported",
            "r",
            pair_key("b", "a"),
            HOUR,
            Scalar::Bool(true),
        );
        assert_eq!(c.label(&imp, &[theirs]).label, Label::Negative);
    }

    #[test]
    fn the_other_sides_decision_does_not_count() {
        let c = compiled();
        let m = Uuid::new_v4();
        let a_sees_b = impression("a", "b", m);
        let b_sees_a = impression("b", "a", m);
        let b_skips = decision(&b_sees_a, "d", MIN, false);
        let a_accepts = decision(&a_sees_b, "e", MIN, true);
        let chat = chat(&a_sees_b, "c", 5 * MIN, 10.0);
        let outcomes = [b_skips, a_accepts, chat];
        let a = c.label(&a_sees_b, &outcomes);
        let b = c.label(&b_sees_a, &outcomes);
        assert_eq!(a.value("accepted"), Some(&Scalar::Bool(true)));
        assert_eq!(b.value("accepted"), Some(&Scalar::Bool(false)));
        // Both impressions of the match see the chat.
        assert_eq!(a.value("chat_seconds"), Some(&Scalar::Double(10.0)));
        assert_eq!(b.value("chat_seconds"), Some(&Scalar::Double(10.0)));
        assert_eq!(a.label, Label::Negative, "accepted but chatted 10 s < 30 s");
        assert_eq!(b.label, Label::Negative);
    }

    #[test]
    fn first_decision_wins_and_duplicates_count_once() {
        let c = compiled();
        let imp = impression("a", "b", Uuid::new_v4());
        let first = decision(&imp, "d1", MIN, true);
        let second = decision(&imp, "d2", 2 * MIN, false);
        let l = c.label(&imp, &[second.clone(), first.clone(), first.clone()]);
        assert_eq!(l.value("accepted"), Some(&Scalar::Bool(true)));
        let spec_count = EXAMPLE_SPEC
            .replace("aggregate = \"max\"", "aggregate = \"count\"")
            .replace(
                "name = \"chat_seconds\"\ntype = \"double\"",
                "name = \"chats\"\ntype = \"long\"",
            )
            .replace("chat_seconds = { gte = 30 }", "chats = { gte = 1 }")
            .replace("chat_seconds = { lt = 30 }", "chats = { lt = 1 }");
        let c2 = Compiled::new(LabelSpec::parse("count", &spec_count).unwrap());
        let mk = |id: &str| {
            outcome(
                "chats",
                id,
                match_key(&imp.match_id),
                MIN,
                Scalar::Double(1.0),
            )
        };
        let l = c2.label(&imp, &[mk("x"), mk("x"), mk("y")]);
        assert_eq!(l.value("chats"), Some(&Scalar::Long(2)));
    }

    #[test]
    fn no_outcome_gives_defaults_and_the_default_label() {
        let c = compiled();
        let imp = impression("a", "b", Uuid::new_v4());
        let l = c.label(&imp, &[]);
        assert_eq!(l.label, Label::Unknown);
        assert_eq!(l.value("accepted"), Some(&Scalar::Null));
        assert_eq!(l.value("reported"), Some(&Scalar::Bool(false)));
    }

    #[test]
    fn corrections_and_the_horizon() {
        let c = compiled();
        let imp = impression("a", "b", Uuid::new_v4());
        let close = c.close_ms(&imp);
        let horizon = c.retention_after_close_ms;
        let r = report(&imp, "r", HOUR);
        // Examples closing up to the report's earliest possible close: none it joins yet.
        assert!(!c.may_join_emitted(&r, close - 23 * HOUR - 1));
        assert!(c.may_join_emitted(&r, close));
        assert!(!c.beyond_horizon(&r, close + horizon));
        // Every impression it can join (at most at its own time) is past close + horizon.
        assert!(c.beyond_horizon(&r, c.close_after_ms + r.time_ms + horizon + 1));
        assert!(c.correctable(close, close + horizon));
        assert!(!c.correctable(close, close + horizon + 1));
        // The label counts every outcome that joins, whenever it arrived.
        let outcomes = [
            decision(&imp, "d", MIN, true),
            chat(&imp, "c", 2 * MIN, 60.0),
            r,
        ];
        assert_eq!(c.label(&imp, &outcomes[..2]).label, Label::Positive);
        let corrected = c.label(&imp, &outcomes);
        assert_eq!(corrected.label, Label::Negative);
        assert_ne!(corrected.digest(), c.label(&imp, &outcomes[..2]).digest());
        assert_eq!(corrected.digest(), c.label(&imp, &outcomes).digest());
        assert!(corrected.digest() >= 0);
    }

    #[test]
    fn watermarks_are_the_minimum_of_partitions_that_are_not_idle() {
        let idle = Duration::from_secs(10);
        let t = Instant::now();
        let at = |s: u64| t + Duration::from_secs(s);
        let mut w = Watermarks::default();
        w.assign("e", 0);
        w.assign("e", 1);
        assert_eq!(w.global(t, idle), i64::MIN);
        assert_eq!(w.observe("e", 0, 100), i64::MIN);
        assert_eq!(w.observe("e", 0, 90), 100, "out of order keeps the highest");
        assert_eq!(w.partition("e", 0), 100);
        assert_eq!(w.global(t, idle), i64::MIN, "partition 1 has not been read");
        w.observe("e", 1, 50);
        assert_eq!(w.global(t, idle), 50);
        w.reached_end("e", 1, at(0));
        assert!(w.at_end("e", 1));
        assert_eq!(
            w.global(at(9), idle),
            50,
            "a partition at its end for less than the idle timeout still holds the others back"
        );
        w.reached_end("e", 1, at(5));
        assert_eq!(
            w.global(at(10), idle),
            100,
            "an idle partition does not hold the others back (idle since its first end)"
        );
        w.reached_end("e", 0, at(10));
        w.observe("e", 1, 60);
        assert!(!w.at_end("e", 1) && !w.all_at_end());
        assert_eq!(w.global(at(21), idle), 60);
        w.reached_end("e", 1, at(21));
        assert!(w.all_at_end());
        assert_eq!(
            w.global(at(22), idle),
            60,
            "every partition at its end, one of them only just: it still counts"
        );
        assert_eq!(w.global(at(31), idle), 100, "all idle: the highest");
    }

    fn arb_outcomes(imp: Impression) -> impl Strategy<Value = Vec<Outcome>> {
        let kinds = prop_oneof![Just(0u8), Just(1), Just(2)];
        proptest::collection::vec(
            (
                kinds,
                -HOUR..26 * HOUR,
                any::<bool>(),
                0.0f64..300.0,
                0u8..20,
            ),
            0..12,
        )
        .prop_map(move |v| {
            v.into_iter()
                .map(|(kind, dt, b, secs, id)| {
                    let id = format!("o{id}");
                    match kind {
                        0 => decision(&imp, &id, dt, b),
                        1 => chat(&imp, &id, dt, secs.floor()),
                        _ => report(&imp, &id, dt),
                    }
                })
                .collect()
        })
    }

    proptest! {
        /// Arrival order and duplicates do not change an example; the label agrees with an
        /// independent reading of the spec.
        #[test]
        fn order_and_duplicates_do_not_change_the_example(
            outcomes in arb_outcomes(impression("a", "b", Uuid::from_u128(7))),
            seed in any::<u64>(),
        ) {
            let c = compiled();
            let imp = impression("a", "b", Uuid::from_u128(7));
            let base = c.label(&imp, &outcomes);
            let mut shuffled = outcomes.clone();
            shuffled.extend(outcomes.iter().take(3).cloned());
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed as usize).wrapping_mul(i + 1) % n.max(1);
                shuffled.swap(i, j);
            }
            let again = c.label(&imp, &shuffled);
            prop_assert_eq!(&base.values, &again.values);
            prop_assert_eq!(base.label, again.label);
            prop_assert_eq!(base.digest(), again.digest());
            let all = &outcomes;

            // Independent oracle for the example spec.
            let inwin = |o: &&Outcome, w: i64| o.time_ms >= T0 && o.time_ms < T0 + w;
            let mut decisions: Vec<&Outcome> = all.iter().filter(|o| o.name == "accepted").filter(|o| inwin(o, 10 * MIN)).collect();
            decisions.sort_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)));
            let accepted = decisions.first().map(|o| o.value == Scalar::Bool(true));
            let chat = all.iter().filter(|o| o.name == "chat_seconds").filter(|o| inwin(o, 2 * HOUR))
                .filter_map(|o| o.value.as_f64()).fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            let reported = all.iter().filter(|o| o.name == "reported").any(|o| inwin(&o, 24 * HOUR));
            let expected = if reported || accepted == Some(false) {
                Label::Negative
            } else if accepted == Some(true) && chat.is_some_and(|c| c >= 30.0) {
                Label::Positive
            } else if accepted == Some(true) && chat.is_some_and(|c| c < 30.0) {
                Label::Negative
            } else {
                Label::Unknown
            };
            prop_assert_eq!(base.label, expected);
        }
    }
}
