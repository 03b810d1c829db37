//! In-memory `StateStore`: the `local` join state. It logs what changes between two of the
//! labeler's commits, which write it into a checkpoint segment ([`LocalState`]).
//!
//! Every read the engine makes is an index lookup: impressions by close order and by each of
//! their join keys, outcomes by join key. None of them scans the whole state, so a burst of
//! late data costs what it reads.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Mutex,
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    CloseCursor, Emitted, LocalState, StateError, StateStore, StoredImpression,
    checkpoint::{Segment, Taken, encode_parts, rows_of},
};
use crate::window::Outcome;

#[derive(Debug, Default)]
struct Dataset {
    impressions: HashMap<Uuid, StoredImpression>,
    by_close: BTreeSet<CloseCursor>,
    /// Impressions by each of their join keys.
    by_key: HashMap<String, Vec<Uuid>>,
    /// Outcomes by join key, each list ordered by (name, id).
    outcomes: HashMap<String, Vec<Outcome>>,
    /// Changes since the last [`LocalState::take`]: impressions inserted or replaced, and
    /// removed, and join keys whose outcomes changed.
    changed: HashSet<Uuid>,
    removed: HashSet<Uuid>,
    changed_keys: HashSet<String>,
}

impl Dataset {
    fn remove_impression(&mut self, id: &Uuid) -> Option<StoredImpression> {
        let old = self.impressions.remove(id)?;
        self.changed.remove(id);
        self.removed.insert(*id);
        self.by_close.remove(&CloseCursor {
            close_ms: old.close_ms,
            example_id: old.example_id,
        });
        for key in old.impression.keys() {
            if let Some(ids) = self.by_key.get_mut(&key) {
                ids.retain(|i| i != id);
                if ids.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
        Some(old)
    }

    fn insert_impression(&mut self, new: StoredImpression) {
        self.by_close.insert(CloseCursor {
            close_ms: new.close_ms,
            example_id: new.example_id,
        });
        for key in new.impression.keys() {
            self.by_key.entry(key).or_default().push(new.example_id);
        }
        self.removed.remove(&new.example_id);
        self.changed.insert(new.example_id);
        self.impressions.insert(new.example_id, new);
    }

    fn retain_outcomes(&mut self, mut keep: impl FnMut(&Outcome) -> bool) -> usize {
        let mut gone = 0;
        let changed = &mut self.changed_keys;
        self.outcomes.retain(|key, list| {
            let before = list.len();
            list.retain(&mut keep);
            if list.len() < before {
                gone += before - list.len();
                changed.insert(key.clone());
            }
            !list.is_empty()
        });
        gone
    }

    fn clear_changes(&mut self) {
        self.changed.clear();
        self.removed.clear();
        self.changed_keys.clear();
    }
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    datasets: Mutex<HashMap<String, Dataset>>,
}

impl MemoryStore {
    fn with<T>(&self, dataset: &str, f: impl FnOnce(&mut Dataset) -> T) -> T {
        let mut all = self
            .datasets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = all.get_mut(dataset) {
            return f(d);
        }
        f(all.entry(dataset.to_owned()).or_default())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn put_impressions(
        &self,
        dataset: &str,
        items: Vec<StoredImpression>,
    ) -> Result<(), StateError> {
        self.with(dataset, |d| {
            for mut new in items {
                // The impression is upserted; what was emitted for it stays.
                if let Some(old) = d.remove_impression(&new.example_id) {
                    new.emitted = old.emitted.or(new.emitted);
                }
                d.insert_impression(new);
            }
        });
        Ok(())
    }

    async fn put_emitted(&self, dataset: &str, items: &[Emitted]) -> Result<(), StateError> {
        self.with(dataset, |d| {
            for e in items {
                if let Some(i) = d.impressions.get_mut(&e.example_id) {
                    i.emitted = Some(e.emission);
                }
            }
        });
        Ok(())
    }

    async fn put_outcomes(&self, dataset: &str, items: Vec<Outcome>) -> Result<(), StateError> {
        self.with(dataset, |d| {
            for o in items {
                if !d.changed_keys.contains(&o.join_key) {
                    d.changed_keys.insert(o.join_key.clone());
                }
                let list = match d.outcomes.get_mut(&o.join_key) {
                    Some(list) => list,
                    None => d.outcomes.entry(o.join_key.clone()).or_default(),
                };
                match list.binary_search_by(|x| (&x.name, &x.id).cmp(&(&o.name, &o.id))) {
                    Ok(at) => list[at] = o,
                    Err(at) => list.insert(at, o),
                }
            }
        });
        Ok(())
    }

    async fn due_impressions(
        &self,
        dataset: &str,
        from: CloseCursor,
        upto_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredImpression>, StateError> {
        Ok(self.with(dataset, |d| {
            d.by_close
                .range((std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded))
                .take_while(|c| c.close_ms <= upto_ms)
                .take(limit)
                .filter_map(|c| d.impressions.get(&c.example_id).cloned())
                .collect()
        }))
    }

    async fn impressions_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<StoredImpression>, StateError> {
        Ok(self.with(dataset, |d| {
            let mut ids: Vec<Uuid> = keys
                .iter()
                .filter_map(|k| d.by_key.get(k))
                .flatten()
                .copied()
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.iter()
                .filter_map(|id| d.impressions.get(id).cloned())
                .collect()
        }))
    }

    async fn outcomes_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<Outcome>, StateError> {
        Ok(self.with(dataset, |d| {
            keys.iter()
                .filter_map(|k| d.outcomes.get(k))
                .flatten()
                .cloned()
                .collect()
        }))
    }

    async fn expire(
        &self,
        dataset: &str,
        impressions_closed_before: i64,
        outcomes_before: i64,
    ) -> Result<u64, StateError> {
        Ok(self.with(dataset, |d| {
            let gone: Vec<CloseCursor> = d
                .by_close
                .range(
                    ..CloseCursor {
                        close_ms: impressions_closed_before,
                        example_id: Uuid::nil(),
                    },
                )
                .copied()
                .collect();
            for c in &gone {
                d.remove_impression(&c.example_id);
            }
            let outcomes = d.retain_outcomes(|o| o.time_ms >= outcomes_before);
            (gone.len() + outcomes) as u64
        }))
    }

    fn local(&self) -> Option<&dyn LocalState> {
        Some(self)
    }

    async fn purge_users(&self, users: &[String]) -> Result<u64, StateError> {
        let mut all = self
            .datasets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut n = 0u64;
        for d in all.values_mut() {
            let gone: Vec<Uuid> = d
                .impressions
                .values()
                .filter(|i| i.impression.users().iter().any(|u| users.contains(u)))
                .map(|i| i.example_id)
                .collect();
            for id in &gone {
                d.remove_impression(id);
            }
            n += gone.len() as u64;
            n += d.retain_outcomes(|o| !o.users.iter().any(|u| users.contains(u))) as u64;
        }
        Ok(n)
    }
}

impl LocalState for MemoryStore {
    fn reset(&self, dataset: &str) {
        self.datasets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(dataset);
    }

    fn apply(&self, dataset: &str, segment: Segment) {
        self.with(dataset, |d| {
            if segment.full {
                *d = Dataset::default();
            }
            for new in segment.impressions {
                d.remove_impression(&new.example_id);
                d.insert_impression(new);
            }
            for id in &segment.removed_impressions {
                d.remove_impression(id);
            }
            for (key, list) in segment.outcomes {
                if list.is_empty() {
                    d.outcomes.remove(&key);
                } else {
                    d.outcomes.insert(key, list);
                }
            }
            for e in &segment.emitted {
                if let Some(i) = d.impressions.get_mut(&e.example_id) {
                    i.emitted = Some(e.emission);
                }
            }
            d.clear_changes();
        });
    }

    fn take(&self, dataset: &str, full: bool, emitted: &[Emitted]) -> Taken {
        self.with(dataset, |d| {
            let (impressions, removed, outcomes): (Vec<&StoredImpression>, Vec<Uuid>, _) = if full {
                let mut outcomes: Vec<(&str, &[Outcome])> = d
                    .outcomes
                    .iter()
                    .map(|(k, list)| (k.as_str(), list.as_slice()))
                    .collect();
                outcomes.sort_unstable_by(|a, b| a.0.cmp(b.0));
                (
                    d.by_close
                        .iter()
                        .filter_map(|c| d.impressions.get(&c.example_id))
                        .collect(),
                    Vec::new(),
                    outcomes,
                )
            } else {
                // In no particular order: a restore applies a delta's entries independently.
                let removed: Vec<Uuid> = d.removed.iter().copied().collect();
                let changed: Vec<&StoredImpression> = d
                    .changed
                    .iter()
                    .filter_map(|id| d.impressions.get(id))
                    .collect();
                let outcomes = d
                    .changed_keys
                    .iter()
                    .map(|k| (k.as_str(), d.outcomes.get(k).map_or(&[][..], Vec::as_slice)))
                    .collect();
                (changed, removed, outcomes)
            };
            let taken = Taken {
                bytes: encode_parts(full, &impressions, &removed, &outcomes, emitted),
                rows: rows_of(impressions.len(), removed.len(), &outcomes, emitted.len()),
                changes: full
                    || !impressions.is_empty()
                    || !removed.is_empty()
                    || !outcomes.is_empty(),
            };
            d.clear_changes();
            taken
        })
    }

    fn live(&self, dataset: &str) -> u64 {
        self.with(dataset, |d| {
            (d.impressions.len() + d.outcomes.values().map(Vec::len).sum::<usize>()) as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use proptest::prelude::*;

    use super::*;
    use crate::{
        spec::Label,
        state::{Emission, contract},
    };

    #[derive(Debug, Clone)]
    enum Op {
        Impression {
            n: u8,
            close: i64,
        },
        Outcome {
            key: u8,
            id: u8,
            time: i64,
            user: u8,
        },
        Expire {
            impressions: i64,
            outcomes: i64,
        },
        Purge {
            user: u8,
        },
        Commit {
            full: bool,
            emit: Vec<u8>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..24, 0i64..50).prop_map(|(n, close)| Op::Impression { n, close }),
            4 => (0u8..8, 0u8..4, 0i64..50, 0u8..6)
                .prop_map(|(key, id, time, user)| Op::Outcome { key, id, time, user }),
            1 => (0i64..50, 0i64..50).prop_map(|(impressions, outcomes)| Op::Expire { impressions, outcomes }),
            1 => (0u8..6).prop_map(|user| Op::Purge { user }),
            2 => (any::<bool>(), proptest::collection::vec(0u8..24, 0..6))
                .prop_map(|(full, emit)| Op::Commit { full, emit }),
        ]
    }

    fn now<T>(f: impl std::future::Future<Output = T>) -> T {
        f.now_or_never().expect("the memory store never waits")
    }

    /// Runs `ops` on a store, checkpointing as the labeler does at each `Commit`, and returns
    /// the store and the segments a restore reads.
    fn run(ops: &[Op]) -> (MemoryStore, Vec<Segment>) {
        let live = MemoryStore::default();
        let mut segments = Vec::new();
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Impression { n, close } => {
                    let mut i = contract::impression(
                        u128::from(*n),
                        &format!("u{}", n % 6),
                        &format!("u{}", (n + 1) % 6),
                        *close,
                    );
                    i.impression.rank = step as i32;
                    now(live.put_impressions("d", vec![i])).unwrap();
                }
                Op::Outcome {
                    key,
                    id,
                    time,
                    user,
                } => {
                    let o = contract::outcome(
                        format!("m:{key}"),
                        "chat",
                        &format!("e{id}"),
                        *time,
                        &[&format!("u{user}")],
                    );
                    now(live.put_outcomes("d", vec![o])).unwrap();
                }
                Op::Expire {
                    impressions,
                    outcomes,
                } => {
                    now(live.expire("d", *impressions, *outcomes)).unwrap();
                }
                Op::Purge { user } => {
                    now(live.purge_users(&[format!("u{user}")])).unwrap();
                }
                Op::Commit { full, emit } => {
                    let emitted: Vec<Emitted> = emit
                        .iter()
                        .map(|n| Emitted {
                            example_id: Uuid::from_u128(u128::from(*n)),
                            close_ms: 0,
                            emission: Emission {
                                version: step as i32,
                                digest: 7,
                                label: Label::Positive,
                            },
                        })
                        .collect();
                    let taken = live.take("d", *full, &emitted);
                    now(live.put_emitted("d", &emitted)).unwrap();
                    let segment = Segment::decode(&taken.bytes).unwrap();
                    assert_eq!(taken.rows, segment.rows());
                    assert_eq!(
                        taken.changes,
                        segment.full
                            || !segment.impressions.is_empty()
                            || !segment.removed_impressions.is_empty()
                            || !segment.outcomes.is_empty()
                    );
                    if segment.full {
                        segments.clear();
                    }
                    segments.push(segment);
                }
            }
        }
        (live, segments)
    }

    proptest! {
        /// Restoring the segments of the last commit gives the state the store had then, for
        /// any mix of writes, expiry, purges, deltas and snapshots.
        #[test]
        fn a_restore_from_the_checkpoint_equals_the_state_at_the_last_commit(
            ops in proptest::collection::vec(op(), 0..60)
        ) {
            let mut ops = ops;
            ops.push(Op::Commit { full: false, emit: Vec::new() });
            let (live, segments) = run(&ops);
            let restored = MemoryStore::default();
            restored.apply("d", Segment { full: true, ..Segment::default() });
            for s in segments {
                restored.apply("d", s);
            }
            prop_assert_eq!(restored.live("d"), live.live("d"));
            let snapshot = |s: &MemoryStore| Segment::decode(&s.take("d", true, &[]).bytes).unwrap();
            prop_assert_eq!(snapshot(&restored), snapshot(&live));
            // Nothing is logged by a restore: its next delta is empty.
            prop_assert!(!restored.take("d", false, &[]).changes);
        }
    }

    #[test]
    fn a_reset_forgets_one_dataset_only() {
        let store = MemoryStore::default();
        for d in ["a", "b"] {
            now(store.put_impressions(d, vec![contract::impression(1, "u1", "u2", 10)])).unwrap();
        }
        store.reset("a");
        assert_eq!(store.live("a"), 0);
        assert_eq!(store.live("b"), 1);
        let delta = Segment::decode(&store.take("b", false, &[]).bytes).unwrap();
        assert_eq!(delta.impressions.len(), 1);
        assert!(!store.take("b", false, &[]).changes);
    }
}
