//! Reading a partition on from an offset, without silent gaps.
//!
//! The first record a fetch returns must be the one asked for. Two things break that:
//! - a broker that skips the rest of a record batch when a fetch starts inside it (tansu 0.6,
//!   the embedded broker): the first record comes from the next batch;
//! - records that are gone (retention, a truncated log): the first record is the log's next.
//!
//! [`Resume`] tells them apart. When a record comes after the offset needed, the read starts
//! again further back (twice as far each time), records before the needed offset are skipped,
//! and only when the read starts at the log's beginning and still misses the offset is it a
//! real gap, to report. On a broker without the defect, a read starts where asked and nothing
//! is re-read; with it, a restart re-reads at most twice the batch it landed in.
//!
//! For non-compacted topics only: compaction leaves gaps by design.

use std::time::{Duration, Instant};

/// How long a read that started gets, without records or an end-of-partition event, before it
/// is deemed to have started inside the last batch of its partition.
pub const STALL: Duration = Duration::from_secs(2);

/// What to do with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The record needed next: handle it.
    Take,
    /// Read already (a read started further back): skip it.
    Skip,
    /// Records were skipped: seek the partition to this offset and read on.
    Rewind(i64),
    /// Records `expected..got` are not in the log: report, then handle this one.
    Gap { expected: i64, got: i64 },
    /// The record is before where the read started: the log was lost and started again.
    Reset { expected: i64, got: i64 },
}

/// The reading position of one partition.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    /// The next offset needed.
    next: i64,
    /// Where the current read started.
    start: i64,
    /// A record came since the current read started.
    seen: bool,
    /// When the current read started.
    started: Instant,
}

impl Resume {
    /// A read that needs `next` and starts there.
    pub fn at(next: i64) -> Self {
        Self {
            next,
            start: next,
            seen: false,
            started: Instant::now(),
        }
    }

    /// The next offset needed.
    pub fn next(&self) -> i64 {
        self.next
    }

    /// The read reached the end of the partition before any record came. Either the
    /// partition ends where the read started, or the read started inside the last batch and
    /// the broker skipped it: [`Step::Rewind`] to find out (the record before the one needed
    /// comes back when nothing was skipped), while there is further back to go.
    pub fn ended(&mut self) -> Option<Step> {
        if self.seen || self.start <= 0 {
            return None;
        }
        Some(self.rewind())
    }

    /// Nothing came for `after` since the read started: on the embedded broker, a read that
    /// starts inside the last batch of a partition gets neither records nor an end-of-partition
    /// event. Treated as [`ended`](Self::ended).
    pub fn stalled(&mut self, after: Duration) -> Option<Step> {
        if self.started.elapsed() < after {
            return None;
        }
        self.ended()
    }

    fn rewind(&mut self) -> Step {
        let back = (self.next - self.start).max(1).saturating_mul(2);
        self.start = self.next.saturating_sub(back).max(0);
        self.seen = false;
        self.started = Instant::now();
        Step::Rewind(self.start)
    }

    /// What to do with the record at `offset`; [`Step::Take`] and [`Step::Gap`] move the
    /// position past it.
    pub fn step(&mut self, offset: i64) -> Step {
        self.seen = true;
        if offset == self.next {
            self.next += 1;
            self.start = self.next;
            return Step::Take;
        }
        if offset < self.start {
            let expected = self.next;
            *self = Self::at(offset + 1);
            return Step::Reset {
                expected,
                got: offset,
            };
        }
        if offset < self.next {
            return Step::Skip;
        }
        // After the offset needed.
        if self.start <= 0 {
            let expected = self.next;
            *self = Self::at(offset + 1);
            return Step::Gap {
                expected,
                got: offset,
            };
        }
        self.rewind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of batches `[first, last]`, read from `from` the way tansu 0.6 does: a fetch
    /// inside a batch starts at the next one.
    fn tansu(batches: &[(i64, i64)], from: i64) -> Vec<i64> {
        batches
            .iter()
            .filter(|(first, _)| *first >= from)
            .flat_map(|(first, last)| *first..=*last)
            .collect()
    }

    /// Reads with `Resume` from `next` to the end; returns what was taken and the gaps.
    fn read(batches: &[(i64, i64)], next: i64) -> (Vec<i64>, Vec<(i64, i64)>, usize) {
        let mut r = Resume::at(next);
        let mut taken = Vec::new();
        let mut gaps = Vec::new();
        let mut rewinds = 0;
        let mut from = next;
        'fetch: loop {
            for o in tansu(batches, from) {
                match r.step(o) {
                    Step::Take => taken.push(o),
                    Step::Skip => {}
                    Step::Rewind(to) => {
                        rewinds += 1;
                        assert!(rewinds < 64, "rewinds must end");
                        from = to;
                        continue 'fetch;
                    }
                    Step::Gap { expected, got } => {
                        gaps.push((expected, got));
                        taken.push(o);
                    }
                    Step::Reset { .. } => panic!("no reset here"),
                }
            }
            return (taken, gaps, rewinds);
        }
    }

    #[test]
    fn a_read_inside_a_batch_rewinds_and_takes_the_rest_of_it() {
        let batches = [(0, 99), (100, 199), (200, 200)];
        let (taken, gaps, rewinds) = read(&batches, 50);
        assert_eq!(taken, (50..=200).collect::<Vec<_>>());
        assert!(gaps.is_empty());
        assert!(rewinds <= 7, "{rewinds}");
        let (taken, gaps, _) = read(&batches, 150);
        assert_eq!(taken, (150..=200).collect::<Vec<_>>());
        assert!(gaps.is_empty());
    }

    #[test]
    fn a_read_at_a_batch_start_reads_nothing_twice() {
        let batches = [(0, 99), (100, 199)];
        let (taken, gaps, rewinds) = read(&batches, 100);
        assert_eq!(taken, (100..=199).collect::<Vec<_>>());
        assert!(gaps.is_empty());
        assert_eq!(rewinds, 0);
    }

    #[test]
    fn records_that_are_gone_are_one_reported_gap() {
        // Retention removed 0..=149: the log starts at 150.
        let batches = [(150, 199), (200, 249)];
        let (taken, gaps, _) = read(&batches, 120);
        assert_eq!(gaps, [(120, 150)]);
        assert_eq!(taken, (150..=249).collect::<Vec<_>>());
    }

    #[test]
    fn a_read_that_ends_before_any_record_rewinds_until_one_comes() {
        let mut r = Resume::at(3);
        assert_eq!(r.ended(), Some(Step::Rewind(1)));
        assert_eq!(r.ended(), Some(Step::Rewind(0)));
        assert_eq!(r.ended(), None);
        // The end of the log: the record before the one needed comes back, and that is all.
        let mut r = Resume::at(3);
        assert_eq!(r.ended(), Some(Step::Rewind(1)));
        assert_eq!(r.step(1), Step::Skip);
        assert_eq!(r.step(2), Step::Skip);
        assert_eq!(r.ended(), None);
        assert_eq!(r.next(), 3);
    }

    #[test]
    fn a_read_inside_the_last_batch_finds_its_records_after_the_end() {
        // tansu: a read from 150, inside the last batch (100..=199), returns nothing.
        let batches = [(0, 99), (100, 199)];
        let mut r = Resume::at(150);
        let mut from = 150;
        let mut taken = Vec::new();
        loop {
            let mut rewound = false;
            for o in tansu(&batches, from) {
                match r.step(o) {
                    Step::Take => taken.push(o),
                    Step::Skip => {}
                    other => panic!("{other:?}"),
                }
            }
            if let Some(Step::Rewind(to)) = r.ended() {
                from = to;
                rewound = true;
            }
            if !rewound {
                break;
            }
        }
        assert_eq!(taken, (150..=199).collect::<Vec<_>>());
    }

    #[test]
    fn a_read_that_gets_nothing_is_stalled_only_after_the_wait() {
        let mut r = Resume::at(8);
        assert_eq!(r.stalled(Duration::from_secs(60)), None);
        assert_eq!(r.stalled(Duration::ZERO), Some(Step::Rewind(6)));
        assert_eq!(r.step(6), Step::Skip);
        assert_eq!(r.stalled(Duration::ZERO), None, "records came");
    }

    #[test]
    fn a_record_before_the_start_is_a_reset_log() {
        let mut r = Resume::at(500);
        assert_eq!(
            r.step(3),
            Step::Reset {
                expected: 500,
                got: 3
            }
        );
        assert_eq!(r.step(4), Step::Take);
        assert_eq!(r.next(), 5);
    }

    #[test]
    fn a_jump_in_the_middle_of_a_read_rewinds_too() {
        let mut r = Resume::at(10);
        assert_eq!(r.step(10), Step::Take);
        assert_eq!(r.step(11), Step::Take);
        assert_eq!(r.step(40), Step::Rewind(10));
        assert_eq!(r.step(10), Step::Skip);
        assert_eq!(r.step(11), Step::Skip);
        assert_eq!(r.step(12), Step::Take);
        assert_eq!(
            r.step(11),
            Step::Reset {
                expected: 13,
                got: 11
            }
        );
    }
}
