//! The idempotency window: which event ids were accepted recently.
//!
//! Ids live in time buckets; buckets older than the window are dropped, and past
//! `max_entries` the oldest bucket goes early. An id is *claimed* while its request is in
//! flight and *committed* once its event is durable, so that a failed request can be retried
//! without its events being mistaken for duplicates. The window is rebuilt at start from the
//! event log (see `durable::scan`), so a restart does not forget it.

use std::{collections::VecDeque, sync::Mutex};

use rustc_hash::FxHashSet;

/// Buckets per window.
const BUCKETS: i64 = 10;

/// The verdict on one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not seen: now claimed by the caller.
    New,
    /// Accepted within the window.
    Duplicate,
    /// Claimed by a request still in flight.
    InFlight,
}

#[derive(Debug)]
pub struct Dedup {
    window_ms: i64,
    bucket_ms: i64,
    max_entries: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (bucket start, ids), oldest first.
    buckets: VecDeque<(i64, FxHashSet<u128>)>,
    pending: FxHashSet<u128>,
    total: usize,
    evicted: u64,
}

impl Inner {
    fn contains(&self, id: u128) -> bool {
        self.buckets.iter().any(|(_, b)| b.contains(&id))
    }
}

impl Dedup {
    pub fn new(window_ms: u64, max_entries: usize) -> Self {
        let window_ms = i64::try_from(window_ms).unwrap_or(i64::MAX).max(BUCKETS);
        Self {
            window_ms,
            bucket_ms: window_ms / BUCKETS,
            max_entries,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the sets consistent enough to keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims each id (one verdict per id, in order). Repeats within `ids` are `InFlight`.
    pub fn claim(&self, ids: &[u128]) -> Vec<Claim> {
        let mut inner = self.lock();
        ids.iter()
            .map(|&id| {
                if inner.contains(id) {
                    Claim::Duplicate
                } else if !inner.pending.insert(id) {
                    Claim::InFlight
                } else {
                    Claim::New
                }
            })
            .collect()
    }

    /// The claimed ids are durable: remember them for the window.
    pub fn commit(&self, ids: &[u128], now_ms: i64) {
        let mut inner = self.lock();
        for id in ids {
            inner.pending.remove(id);
        }
        self.insert(&mut inner, ids.iter().copied(), now_ms);
    }

    /// The claimed ids were not made durable: forget the claims.
    pub fn release(&self, ids: &[u128]) {
        let mut inner = self.lock();
        for id in ids {
            inner.pending.remove(id);
        }
    }

    /// Remembers ids found in the log (at their append time).
    pub fn remember(&self, ids: impl IntoIterator<Item = (u128, i64)>, now_ms: i64) {
        let mut inner = self.lock();
        for (id, at) in ids {
            if at >= now_ms - self.window_ms {
                self.insert(&mut inner, std::iter::once(id), at.min(now_ms));
            }
        }
    }

    fn insert(&self, inner: &mut Inner, ids: impl Iterator<Item = u128>, at_ms: i64) {
        let start = at_ms - at_ms.rem_euclid(self.bucket_ms);
        let idx = match inner.buckets.iter().position(|(s, _)| *s == start) {
            Some(i) => i,
            None => {
                // Keep buckets ordered by start; log scans may add older ones.
                let pos = inner
                    .buckets
                    .iter()
                    .position(|(s, _)| *s > start)
                    .unwrap_or(inner.buckets.len());
                inner.buckets.insert(pos, (start, FxHashSet::default()));
                pos
            }
        };
        let mut added = 0;
        if let Some((_, bucket)) = inner.buckets.get_mut(idx) {
            for id in ids {
                if bucket.insert(id) {
                    added += 1;
                }
            }
        }
        inner.total += added;
        self.evict(inner, at_ms);
    }

    fn evict(&self, inner: &mut Inner, now_ms: i64) {
        let horizon = now_ms - self.window_ms - self.bucket_ms;
        while let Some((start, bucket)) = inner.buckets.front() {
            let expired = *start < horizon;
            let over = inner.total > self.max_entries && inner.buckets.len() > 1;
            if !(expired || over) {
                break;
            }
            let n = bucket.len();
            inner.total -= n;
            if over && !expired {
                inner.evicted += n as u64;
            }
            inner.buckets.pop_front();
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids dropped before their window ended because of `max_entries`.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_commits_and_releases() {
        let d = Dedup::new(60_000, 1000);
        assert_eq!(
            d.claim(&[1, 2, 1]),
            vec![Claim::New, Claim::New, Claim::InFlight]
        );
        assert_eq!(d.claim(&[1]), vec![Claim::InFlight]);
        d.commit(&[1], 1_000);
        d.release(&[2]);
        assert_eq!(d.claim(&[1, 2]), vec![Claim::Duplicate, Claim::New]);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn forgets_after_the_window() {
        let d = Dedup::new(60_000, 1000);
        d.claim(&[7]);
        d.commit(&[7], 0);
        d.claim(&[8]);
        d.commit(&[8], 200_000);
        assert_eq!(d.claim(&[7]), vec![Claim::New]);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn caps_memory_by_dropping_oldest_buckets() {
        let d = Dedup::new(60_000, 10);
        for i in 0..30u128 {
            d.claim(&[i]);
            d.commit(&[i], i64::try_from(i).unwrap_or(0) * 6_000);
        }
        assert!(d.len() <= 10, "{}", d.len());
        assert!(d.evicted() > 0);
        assert_eq!(d.claim(&[29]), vec![Claim::Duplicate]);
    }

    #[test]
    fn remembers_ids_from_the_log_within_the_window() {
        let d = Dedup::new(60_000, 1000);
        d.remember([(1, 100_000), (2, 10_000)], 100_500);
        assert_eq!(d.claim(&[1, 2]), vec![Claim::Duplicate, Claim::New]);
    }
}
