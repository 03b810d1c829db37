//! In-memory `StateStore`, for unit tests and benchmarks of the pure logic.
//!
//! Every read the engine makes is an index lookup: impressions by close order and by each of
//! their join keys, outcomes by join key. None of them scans the whole state, so a burst of
//! late data costs what it reads.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{CloseCursor, Emitted, StateError, StateStore, StoredImpression};
use crate::window::Outcome;

#[derive(Debug, Default)]
struct Dataset {
    impressions: HashMap<Uuid, StoredImpression>,
    by_close: BTreeSet<CloseCursor>,
    /// Impressions by each of their join keys.
    by_key: HashMap<String, Vec<Uuid>>,
    /// Outcomes by join key, each list ordered by (name, id).
    outcomes: HashMap<String, Vec<Outcome>>,
}

impl Dataset {
    fn remove_impression(&mut self, id: &Uuid) -> Option<StoredImpression> {
        let old = self.impressions.remove(id)?;
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
        self.impressions.insert(new.example_id, new);
    }

    fn retain_outcomes(&mut self, mut keep: impl FnMut(&Outcome) -> bool) -> usize {
        let mut gone = 0;
        self.outcomes.retain(|_, list| {
            let before = list.len();
            list.retain(&mut keep);
            gone += before - list.len();
            !list.is_empty()
        });
        gone
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
