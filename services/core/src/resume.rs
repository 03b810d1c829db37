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
//! real gap, to report. The first step back is as long as the run of records the broker
//! skipped, which is about one batch. On a broker without the defect, a read starts where
//! asked and nothing is re-read; with it, a restart re-reads at most about twice the batch it
//! landed in.
//!
//! Records of the reads a rewind replaced can still come after it (fetches already under way).
//! For [`REREAD_WINDOW`] after a rewind, a record at or after the lowest offset a read started
//! from is one read already and is skipped; only a record before it means the log was lost.
//!
//! For non-compacted topics only: compaction leaves gaps by design.

use std::time::{Duration, Instant};

/// How long a read that started gets, without records or an end-of-partition event, before it
/// is deemed to have started inside the last batch of its partition.
pub const STALL: Duration = Duration::from_secs(2);

/// How long after a rewind records of the reads it replaced may still come.
pub const REREAD_WINDOW: Duration = Duration::from_secs(30);

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
    /// The lowest offset a read started from since the first of the latest rewinds, and when
    /// the latest rewind was.
    rewound: Option<(i64, Instant)>,
}

impl Resume {
    /// A read that needs `next` and starts there.
    pub fn at(next: i64) -> Self {
        Self {
            next,
            start: next,
            seen: false,
            started: Instant::now(),
            rewound: None,
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
        Some(self.rewind(0))
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

    /// Starts the read again further back: twice as far as the last time, and at least
    /// `skipped` records (the run the broker just skipped, about the size of its batches).
    fn rewind(&mut self, skipped: i64) -> Step {
        let back = (self.next - self.start)
            .max(1)
            .saturating_mul(2)
            .max(skipped);
        self.start = self.next.saturating_sub(back).max(0);
        self.seen = false;
        let now = Instant::now();
        self.started = now;
        let floor = match self.rewound {
            Some((floor, at)) if at.elapsed() < REREAD_WINDOW => floor.min(self.start),
            _ => self.start,
        };
        self.rewound = Some((floor, now));
        Step::Rewind(self.start)
    }

    /// Whether the record at `offset`, before the one needed, was read already by this read
    /// or by one a recent rewind replaced.
    fn read_already(&self, offset: i64) -> bool {
        offset >= self.start
            || self
                .rewound
                .is_some_and(|(floor, at)| offset >= floor && at.elapsed() < REREAD_WINDOW)
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
        if offset < self.next {
            if self.read_already(offset) {
                return Step::Skip;
            }
            let expected = self.next;
            *self = Self::at(offset + 1);
            return Step::Reset {
                expected,
                got: offset,
            };
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
        self.rewind(offset - self.next)
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
        // The first step back is the 50 records skipped: it reaches the batch's start.
        assert_eq!(rewinds, 1);
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
    fn a_jump_in_the_middle_of_a_read_rewinds_by_the_records_skipped() {
        let mut r = Resume::at(100);
        assert_eq!(r.step(100), Step::Take);
        assert_eq!(r.step(101), Step::Take);
        assert_eq!(r.step(140), Step::Rewind(64));
        assert_eq!(r.step(64), Step::Skip);
        assert_eq!(r.step(101), Step::Skip);
        assert_eq!(r.step(102), Step::Take);
    }

    #[test]
    fn records_of_reads_a_rewind_replaced_are_skipped_not_taken_for_a_lost_log() {
        // A restart needs 198 of batches (180, 239), (240, 299). Each stale record of the read
        // before a seek asks for another rewind, and every one of those reads delivers the
        // batch from 180 again, also after the records were taken.
        let mut r = Resume::at(198);
        assert_eq!(r.step(240), Step::Rewind(156));
        assert_eq!(r.step(241), Step::Rewind(114));
        for o in 180..198 {
            assert_eq!(r.step(o), Step::Skip);
        }
        for o in 198..240 {
            assert_eq!(r.step(o), Step::Take);
        }
        for o in 180..240 {
            assert_eq!(r.step(o), Step::Skip, "offset {o} again");
        }
        assert_eq!(r.step(240), Step::Take);
        // A record before any read started: the log was lost and started again.
        assert_eq!(
            r.step(3),
            Step::Reset {
                expected: 241,
                got: 3
            }
        );
        assert_eq!(r.step(4), Step::Take);
    }
}
