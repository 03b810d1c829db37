//! When to retrain: a policy per dataset, decided from what was committed since the last
//! trigger. Pure functions; the decision says which rule fired and with which numbers.
//!
//! Rules, checked in this order once at least one new partition version is pending:
//! - cooldown: nothing fires within `cooldown_s` of the previous trigger;
//! - `min_new_rows`: at least this many new rows;
//! - `label_drift`: the Population Stability Index of the label distribution of the new rows
//!   against the rows of the previous trigger is at least `psi_threshold` (with at least
//!   `psi_min_rows` new rows, so that a handful of rows cannot look like drift);
//! - `max_staleness`: the previous trigger (or, before the first one, the oldest pending
//!   partition) is older than `max_staleness_s`.
//!
//! A rule set to 0 is off.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[policies.<dataset>]` (or `[policies."*"]` for every other dataset).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub min_new_rows: i64,
    #[serde(default)]
    pub max_staleness_s: i64,
    #[serde(default)]
    pub psi_threshold: f64,
    #[serde(default = "default_psi_min_rows")]
    pub psi_min_rows: i64,
    #[serde(default)]
    pub cooldown_s: i64,
}

fn default_psi_min_rows() -> i64 {
    1000
}

impl Policy {
    pub fn validate(&self) -> Result<(), String> {
        if self.min_new_rows < 0
            || self.max_staleness_s < 0
            || self.psi_min_rows < 0
            || self.cooldown_s < 0
        {
            return Err("rows and durations cannot be negative".into());
        }
        if !(self.psi_threshold >= 0.0 && self.psi_threshold.is_finite()) {
            return Err("psi_threshold must be a finite number ≥ 0".into());
        }
        if self.min_new_rows == 0 && self.max_staleness_s == 0 && self.psi_threshold == 0.0 {
            return Err("no rule is on: set min_new_rows, max_staleness_s or psi_threshold".into());
        }
        Ok(())
    }
}

/// What was committed since the previous trigger.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pending {
    /// Partition versions.
    pub versions: usize,
    /// Rows added (a new version of a partition counts what it adds to the one it supersedes;
    /// an erasure rewrite counts negative).
    pub new_rows: i64,
    /// Rows per label value among the new rows.
    pub label_counts: BTreeMap<String, i64>,
    /// Commit time of the oldest pending version, epoch ms.
    pub oldest_ms: i64,
}

/// The previous trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct Previous {
    pub decided_ms: i64,
    pub label_counts: BTreeMap<String, i64>,
}

/// Which rule fired, why, and its numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub rule: &'static str,
    pub reason: String,
    pub metrics: BTreeMap<String, f64>,
}

/// Bins with no rows count as this share, so that PSI stays finite.
const PSI_EPSILON: f64 = 1e-4;

/// Population Stability Index of `actual` against `expected`, over the union of their bins:
/// Σ (a − e) · ln(a / e) on shares. 0 for identical distributions; ~0.1 is a moderate shift,
/// ≥ 0.2 a significant one. `None` when either side has no rows.
pub fn psi(expected: &BTreeMap<String, i64>, actual: &BTreeMap<String, i64>) -> Option<f64> {
    let total = |m: &BTreeMap<String, i64>| m.values().filter(|v| **v > 0).sum::<i64>();
    let (te, ta) = (total(expected), total(actual));
    if te == 0 || ta == 0 {
        return None;
    }
    let share = |m: &BTreeMap<String, i64>, k: &str, t: i64| {
        let n = m.get(k).copied().unwrap_or(0).max(0);
        ((n as f64) / (t as f64)).max(PSI_EPSILON)
    };
    let mut keys: Vec<&String> = expected.keys().chain(actual.keys()).collect();
    keys.sort();
    keys.dedup();
    Some(
        keys.into_iter()
            .map(|k| {
                let (e, a) = (share(expected, k, te), share(actual, k, ta));
                (a - e) * (a / e).ln()
            })
            .sum(),
    )
}

/// Decides whether `pending` fires a trigger under `policy` at `now_ms`.
pub fn decide(
    policy: &Policy,
    pending: &Pending,
    previous: Option<&Previous>,
    now_ms: i64,
) -> Option<Fired> {
    if pending.versions == 0 {
        return None;
    }
    let mut metrics = BTreeMap::from([
        ("new_rows".to_owned(), pending.new_rows as f64),
        ("partition_versions".to_owned(), pending.versions as f64),
    ]);
    if let Some(p) = previous {
        let since = (now_ms - p.decided_ms) / 1000;
        metrics.insert("seconds_since_last_trigger".into(), since as f64);
        if policy.cooldown_s > 0 && since < policy.cooldown_s {
            return None;
        }
    }
    if policy.min_new_rows > 0 && pending.new_rows >= policy.min_new_rows {
        return Some(Fired {
            rule: "min_new_rows",
            reason: format!(
                "{} new rows since the last trigger (min_new_rows = {})",
                pending.new_rows, policy.min_new_rows
            ),
            metrics,
        });
    }
    if policy.psi_threshold > 0.0
        && pending.new_rows >= policy.psi_min_rows
        && let Some(previous) = previous
        && let Some(value) = psi(&previous.label_counts, &pending.label_counts)
    {
        metrics.insert("psi".into(), value);
        if value >= policy.psi_threshold {
            return Some(Fired {
                rule: "label_drift",
                reason: format!(
                    "label distribution drifted: PSI {value:.4} ≥ {} over {} new rows",
                    policy.psi_threshold, pending.new_rows
                ),
                metrics,
            });
        }
    }
    if policy.max_staleness_s > 0 {
        let since_ms = previous.map_or(pending.oldest_ms, |p| p.decided_ms);
        let stale = (now_ms - since_ms) / 1000;
        metrics.insert("staleness_s".into(), stale as f64);
        if stale >= policy.max_staleness_s {
            return Some(Fired {
                rule: "max_staleness",
                reason: format!(
                    "{} s since {} (max_staleness_s = {}), {} new rows",
                    stale,
                    if previous.is_some() {
                        "the last trigger"
                    } else {
                        "the oldest untriggered partition"
                    },
                    policy.max_staleness_s,
                    pending.new_rows
                ),
                metrics,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn policy() -> Policy {
        Policy {
            min_new_rows: 1000,
            max_staleness_s: 3600,
            psi_threshold: 0.2,
            psi_min_rows: 100,
            cooldown_s: 600,
        }
    }

    fn pending(rows: i64, labels: &[(&str, i64)]) -> Pending {
        Pending {
            versions: 1,
            new_rows: rows,
            label_counts: counts(labels),
            oldest_ms: 0,
        }
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn psi_of_known_distributions() {
        let same = counts(&[("positive", 300), ("negative", 700)]);
        assert!(psi(&same, &same).unwrap().abs() < 1e-12);
        // 30/70 → 50/50: (0.5-0.3)·ln(0.5/0.3) + (0.5-0.7)·ln(0.5/0.7) = 0.1695...
        let shifted = counts(&[("positive", 5), ("negative", 5)]);
        let v = psi(&same, &shifted).unwrap();
        assert!((v - 0.169_48).abs() < 1e-4, "{v}");
        // Symmetric in this two-bin case.
        assert!((psi(&shifted, &same).unwrap() - v).abs() < 1e-12);
        // A label that appears: the empty bin counts as 1e-4.
        let new_bin = counts(&[("positive", 300), ("negative", 600), ("unknown", 100)]);
        let e = 1e-4_f64;
        let want = (0.3f64 - 0.3) * 1.0f64.ln()
            + (0.6 - 0.7) * (0.6f64 / 0.7).ln()
            + (0.1 - e) * (0.1 / e).ln();
        assert!((psi(&same, &new_bin).unwrap() - want).abs() < 1e-9);
        assert_eq!(psi(&BTreeMap::new(), &same), None);
        assert_eq!(psi(&same, &counts(&[("positive", 0)])), None);
    }

    #[test]
    fn nothing_pending_never_fires() {
        let p = Pending::default();
        assert_eq!(decide(&policy(), &p, None, NOW), None);
    }

    #[test]
    fn min_new_rows_fires_at_the_threshold_not_below() {
        let prev = Previous {
            decided_ms: NOW - 700_000,
            label_counts: counts(&[("positive", 1)]),
        };
        assert_eq!(
            decide(
                &policy(),
                &pending(999, &[("positive", 999)]),
                Some(&prev),
                NOW
            ),
            None
        );
        let f = decide(
            &policy(),
            &pending(1000, &[("positive", 1000)]),
            Some(&prev),
            NOW,
        )
        .expect("fires");
        assert_eq!(f.rule, "min_new_rows");
        assert_eq!(f.metrics["new_rows"], 1000.0);
        assert!(f.reason.contains("1000 new rows"), "{}", f.reason);
    }

    #[test]
    fn cooldown_holds_every_rule_until_it_has_passed() {
        let prev = Previous {
            decided_ms: NOW - 599_999,
            label_counts: counts(&[("positive", 100)]),
        };
        let big = pending(1_000_000, &[("negative", 1_000_000)]);
        assert_eq!(
            decide(&policy(), &big, Some(&prev), NOW),
            None,
            "in cooldown"
        );
        // Exactly at the end of the cooldown it may fire.
        let prev = Previous {
            decided_ms: NOW - 600_000,
            ..prev
        };
        assert!(decide(&policy(), &big, Some(&prev), NOW).is_some());
        // No previous trigger: no cooldown.
        assert!(decide(&policy(), &big, None, NOW).is_some());
    }

    #[test]
    fn drift_fires_on_a_shifted_label_rate_with_enough_rows() {
        let prev = Previous {
            decided_ms: NOW - 700_000,
            label_counts: counts(&[("positive", 300), ("negative", 700)]),
        };
        // 30% → 60% positive: PSI ≈ 0.36.
        let drifted = pending(500, &[("positive", 300), ("negative", 200)]);
        let f = decide(&policy(), &drifted, Some(&prev), NOW).expect("drift");
        assert_eq!(f.rule, "label_drift");
        assert!(f.metrics["psi"] > 0.2);
        // Same shift on too few rows: not drift.
        let few = pending(60, &[("positive", 36), ("negative", 24)]);
        assert_eq!(decide(&policy(), &few, Some(&prev), NOW), None);
        // Same rate: no drift.
        let steady = pending(500, &[("positive", 150), ("negative", 350)]);
        assert_eq!(decide(&policy(), &steady, Some(&prev), NOW), None);
    }

    #[test]
    fn staleness_counts_from_the_last_trigger_or_the_oldest_partition() {
        let prev = Previous {
            decided_ms: NOW - 3_600_000,
            label_counts: counts(&[("positive", 1)]),
        };
        let f = decide(&policy(), &pending(5, &[]), Some(&prev), NOW).expect("stale");
        assert_eq!(f.rule, "max_staleness");
        assert_eq!(f.metrics["staleness_s"], 3600.0);
        let fresh = Previous {
            decided_ms: NOW - 3_599_000,
            ..prev
        };
        assert_eq!(decide(&policy(), &pending(5, &[]), Some(&fresh), NOW), None);
        let mut first = pending(5, &[]);
        first.oldest_ms = NOW - 3_600_000;
        assert_eq!(
            decide(&policy(), &first, None, NOW).map(|f| f.rule),
            Some("max_staleness")
        );
        first.oldest_ms = NOW - 10_000;
        assert_eq!(decide(&policy(), &first, None, NOW), None);
    }

    #[test]
    fn a_policy_needs_a_rule() {
        let off = Policy {
            min_new_rows: 0,
            max_staleness_s: 0,
            psi_threshold: 0.0,
            psi_min_rows: 0,
            cooldown_s: 10,
        };
        assert!(off.validate().is_err());
        assert!(policy().validate().is_ok());
        let bad = Policy {
            psi_threshold: f64::NAN,
            ..policy()
        };
        assert!(bad.validate().is_err());
    }
}
