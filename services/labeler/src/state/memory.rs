//! In-memory `StateStore`, for unit tests and benchmarks of the pure logic.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{CloseCursor, Emitted, StateError, StateStore, StoredImpression};
use crate::window::Outcome;

#[derive(Debug, Default)]
struct Dataset {
    impressions: HashMap<Uuid, StoredImpression>,
    by_close: BTreeMap<CloseCursor, ()>,
    outcomes: BTreeMap<(String, String, String), Outcome>,
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
        f(all.entry(dataset.to_owned()).or_default())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn put_impressions(
        &self,
        dataset: &str,
        items: &[StoredImpression],
    ) -> Result<(), StateError> {
        self.with(dataset, |d| {
            for i in items {
                let mut new = i.clone();
                // The impression is upserted; what was emitted for it stays.
                if let Some(old) = d.impressions.get(&i.example_id) {
                    new.emitted = old.emitted.or(new.emitted);
                }
                if let Some(old) = d.impressions.insert(i.example_id, new) {
                    d.by_close.remove(&CloseCursor {
                        close_ms: old.close_ms,
                        example_id: old.example_id,
                    });
                }
                d.by_close.insert(
                    CloseCursor {
                        close_ms: i.close_ms,
                        example_id: i.example_id,
                    },
                    (),
                );
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

    async fn put_outcomes(&self, dataset: &str, items: &[Outcome]) -> Result<(), StateError> {
        self.with(dataset, |d| {
            for o in items {
                d.outcomes.insert(
                    (o.join_key.clone(), o.name.clone(), o.id.clone()),
                    o.clone(),
                );
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
                .take_while(|(c, _)| c.close_ms <= upto_ms)
                .take(limit)
                .filter_map(|(c, _)| d.impressions.get(&c.example_id).cloned())
                .collect()
        }))
    }

    async fn impressions_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<StoredImpression>, StateError> {
        Ok(self.with(dataset, |d| {
            let mut found: Vec<StoredImpression> = d
                .impressions
                .values()
                .filter(|i| i.impression.keys().iter().any(|k| keys.contains(k)))
                .cloned()
                .collect();
            found.sort_by_key(|i| i.example_id);
            found
        }))
    }

    async fn outcomes_by_keys(
        &self,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<Outcome>, StateError> {
        Ok(self.with(dataset, |d| {
            keys.iter()
                .flat_map(|k| {
                    d.outcomes
                        .range((k.clone(), String::new(), String::new())..)
                        .take_while(move |((key, _, _), _)| key == k)
                        .map(|(_, o)| o.clone())
                })
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
                .map(|(c, _)| *c)
                .collect();
            for c in &gone {
                d.by_close.remove(c);
                d.impressions.remove(&c.example_id);
            }
            let before = d.outcomes.len();
            d.outcomes.retain(|_, o| o.time_ms >= outcomes_before);
            (gone.len() + before - d.outcomes.len()) as u64
        }))
    }

    async fn purge_users(&self, users: &[String]) -> Result<u64, StateError> {
        let mut all = self
            .datasets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut n = 0u64;
        for d in all.values_mut() {
            let gone: Vec<StoredImpression> = d
                .impressions
                .values()
                .filter(|i| i.impression.users().iter().any(|u| users.contains(u)))
                .cloned()
                .collect();
            for i in gone {
                d.impressions.remove(&i.example_id);
                d.by_close.remove(&CloseCursor {
                    close_ms: i.close_ms,
                    example_id: i.example_id,
                });
                n += 1;
            }
            let before = d.outcomes.len();
            d.outcomes
                .retain(|_, o| !o.users.iter().any(|u| users.contains(u)));
            n += (before - d.outcomes.len()) as u64;
        }
        Ok(n)
    }
}
