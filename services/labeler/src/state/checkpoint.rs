//! Checkpoints of local join state (`state.store = "local"`): the state lives in the labeler's
//! memory and is made durable by segments written under `<root>/_state/<dataset>/` with each
//! commit. The commit's transaction records which segments make up the state, next to the
//! offsets they cover, so a restart restores exactly the committed state and replays the log
//! from those offsets (Flink's and Arroyo's design: state checkpointed with the input
//! positions, no database round trip per record).
//!
//! A segment holds the changes since the previous one, or the whole state (a snapshot, which
//! supersedes every earlier segment). Checkpoints are logical (rows, not a store's files), so
//! the format does not depend on how the state is held in memory.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Emitted, StateError, StoredImpression};
use crate::window::Outcome;

/// The first bytes of a segment: its format. Later formats get another tag.
const FORMAT_TAG: &[u8] = b"feedloop-state-segment/1\n";

/// A snapshot is written instead of another delta once this many segments make up the state.
const MAX_SEGMENTS: usize = 32;

/// What a segment holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// The whole state: earlier segments are superseded.
    pub full: bool,
    /// Impressions as they are now (inserted or changed since the previous segment).
    pub impressions: Vec<StoredImpression>,
    /// Impressions gone since the previous segment (expired or purged).
    pub removed_impressions: Vec<Uuid>,
    /// The outcomes of every join key whose outcomes changed, in full; an empty list removes
    /// the key.
    pub outcomes: Vec<(String, Vec<Outcome>)>,
    /// What the commit that wrote the segment emitted (applied last).
    pub emitted: Vec<Emitted>,
}

impl Segment {
    /// Entries the segment writes.
    pub fn rows(&self) -> u64 {
        (self.impressions.len()
            + self.removed_impressions.len()
            + self
                .outcomes
                .iter()
                .map(|(_, o)| o.len().max(1))
                .sum::<usize>()
            + self.emitted.len()) as u64
    }

    pub fn is_empty(&self) -> bool {
        !self.full
            && self.impressions.is_empty()
            && self.removed_impressions.is_empty()
            && self.outcomes.is_empty()
            && self.emitted.is_empty()
    }

    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let mut out = FORMAT_TAG.to_vec();
        serde_json::to_writer(&mut out, self)
            .map_err(|e| StateError::Corrupt(format!("state segment: {e}")))?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let body = bytes.strip_prefix(FORMAT_TAG).ok_or_else(|| {
            StateError::Corrupt(
                "state segment: unknown format (not written by this version)".into(),
            )
        })?;
        serde_json::from_slice(body).map_err(|e| StateError::Corrupt(format!("state segment: {e}")))
    }
}

/// A segment as the checkpoint lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    /// Relative to the dataset root.
    pub path: String,
    pub sha256: String,
    pub rows: u64,
}

/// The segments that make up a dataset's committed state, oldest first; the first one is a
/// snapshot, unless the state was empty when checkpoints began.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub segments: Vec<SegmentRef>,
}

impl Checkpoint {
    /// Whether the next segment should be a snapshot: too many segments to read at a restore,
    /// or they write more than twice what the state holds (`live` entries).
    pub fn wants_snapshot(&self, live: u64) -> bool {
        let written: u64 = self.segments.iter().map(|s| s.rows).sum();
        self.segments.len() >= MAX_SEGMENTS || written > 2 * live + 10_000
    }

    /// The checkpoint once `segment` is committed, and the segments that then go.
    pub fn with(&self, segment: SegmentRef, full: bool) -> (Checkpoint, Vec<SegmentRef>) {
        if full {
            (
                Checkpoint {
                    segments: vec![segment],
                },
                self.segments.clone(),
            )
        } else {
            let mut segments = self.segments.clone();
            segments.push(segment);
            (Checkpoint { segments }, Vec::new())
        }
    }
}

/// Where a dataset's segments live, relative to the root: outside the dataset's directory, so
/// readers of the dataset (`<root>/<dataset>/**/*.parquet`) never see them.
pub fn segments_dir(dataset: &str) -> String {
    format!("_state/{dataset}")
}

/// A new segment's path: its name carries a UUIDv7, so its age is known from the name alone.
pub fn segment_rel(dataset: &str, seq: i64) -> String {
    format!(
        "{}/seg-{seq:012}-{}.json",
        segments_dir(dataset),
        Uuid::now_v7()
    )
}

/// When a segment was written, from its name (see [`segment_rel`]).
pub fn segment_time_ms(file: &str) -> Option<i64> {
    let rest = file.strip_prefix("seg-")?.strip_suffix(".json")?;
    let (_, id) = rest.split_once('-')?;
    let (secs, nanos) = Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    Some(secs as i64 * 1000 + i64::from(nanos / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(rows: u64) -> SegmentRef {
        SegmentRef {
            path: format!("_state/d/seg-{rows}"),
            sha256: String::new(),
            rows,
        }
    }

    #[test]
    fn segments_round_trip_and_refuse_what_they_cannot_read() {
        let s = Segment {
            full: false,
            removed_impressions: vec![Uuid::from_u128(7)],
            outcomes: vec![("m:x".into(), Vec::new())],
            ..Segment::default()
        };
        let bytes = s.encode().unwrap();
        assert_eq!(Segment::decode(&bytes).unwrap(), s);
        assert_eq!(s.rows(), 2);
        assert!(Segment::decode(&bytes[FORMAT_TAG.len()..]).is_err());
        assert!(Segment::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Segment::default().is_empty());
        assert!(
            !Segment {
                full: true,
                ..Segment::default()
            }
            .is_empty()
        );
    }

    #[test]
    fn a_snapshot_replaces_every_segment_and_deltas_append() {
        let cp = Checkpoint {
            segments: vec![seg(5), seg(6)],
        };
        let (next, gone) = cp.with(seg(7), false);
        assert_eq!(next.segments, vec![seg(5), seg(6), seg(7)]);
        assert!(gone.is_empty());
        let (next, gone) = cp.with(seg(8), true);
        assert_eq!(next.segments, vec![seg(8)]);
        assert_eq!(gone, vec![seg(5), seg(6)]);
    }

    #[test]
    fn a_snapshot_is_wanted_when_segments_pile_up_or_outweigh_the_state() {
        let small = Checkpoint {
            segments: vec![seg(100); 3],
        };
        assert!(!small.wants_snapshot(0));
        let many = Checkpoint {
            segments: vec![seg(1); MAX_SEGMENTS],
        };
        assert!(many.wants_snapshot(1_000_000));
        let heavy = Checkpoint {
            segments: vec![seg(50_000); 2],
        };
        assert!(heavy.wants_snapshot(40_000));
        assert!(!heavy.wants_snapshot(60_000));
    }

    #[test]
    fn segment_names_carry_their_age() {
        let rel = segment_rel("clicks", 42);
        let (dir, file) = rel.rsplit_once('/').unwrap();
        assert_eq!(dir, "_state/clicks");
        let t = segment_time_ms(file).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((now - t).abs() < 60_000, "{t} vs {now}");
        assert_eq!(segment_time_ms("part-x.parquet"), None);
    }
}
