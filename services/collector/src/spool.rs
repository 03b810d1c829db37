//! The local disk spool: an append-only log of records that could not be acknowledged by the
//! broker in time. Appends are group-committed (one fdatasync for everything queued), reads
//! drain in order from a persisted cursor, and a restart picks up where the last run stopped.
//!
//! Segment files `seg-<seq>.spool` hold frames `[len u32][crc32 u32][payload]`; a torn frame
//! at the end of the last segment (a crash mid-write) is cut off when the spool opens.
//!
//! Acknowledged records are never given up for a neighbour's damage:
//! - a corrupt frame inside a segment (a flipped bit on disk) is skipped by scanning for the
//!   next frame whose header and CRC are valid, and the frames after it are read and drained;
//!   a copy of the segment goes to `quarantine/` for inspection, counted in
//!   `feedloop_collector_spool_quarantined_segments_total` (alerted on);
//! - a read that fails for another reason (EIO) fails the open or the drain: nothing is cut;
//! - a write that fails (ENOSPC, a short write) truncates the segment back to its last durable
//!   length before the client hears the error, so later frames are never written after garbage.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
};

/// One spooled Kafka record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Event id (the dedup key).
    pub id: u128,
    pub topic: Cow<'static, str>,
    pub key: Vec<u8>,
    /// Confluent-framed Avro value.
    pub value: Vec<u8>,
    pub event_type: Cow<'static, str>,
    /// When the record was accepted, epoch ms.
    pub at_ms: i64,
}

/// Position of a record: the segment and the byte offset just past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({used} of {max} bytes used)")]
    Full { used: u64, max: u64 },
    #[error("spool I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("spool writer stopped")]
    Stopped,
}

const FORMAT_VERSION: u8 = 1;
const FRAME_HEADER: u64 = 8;
/// Frames larger than this are corruption, not records.
const MAX_FRAME: u32 = 64 << 20;

fn encode(r: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&r.id.to_le_bytes());
    out.extend_from_slice(&r.at_ms.to_le_bytes());
    for field in [
        r.topic.as_bytes(),
        r.event_type.as_bytes(),
        &r.key,
        &r.value,
    ] {
        out.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(field);
    }
    let payload = &out[start + 8..];
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
}

fn decode(payload: &[u8]) -> Option<Record> {
    let (&version, rest) = payload.split_first()?;
    if version != FORMAT_VERSION {
        return None;
    }
    let id = u128::from_le_bytes(rest.get(..16)?.try_into().ok()?);
    let at_ms = i64::from_le_bytes(rest.get(16..24)?.try_into().ok()?);
    let mut rest = rest.get(24..)?;
    let mut fields: Vec<Vec<u8>> = Vec::with_capacity(4);
    for _ in 0..4 {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        fields.push(rest.get(4..4 + len)?.to_vec());
        rest = rest.get(4 + len..)?;
    }
    let value = fields.pop()?;
    let key = fields.pop()?;
    let event_type = Cow::Owned(String::from_utf8(fields.pop()?).ok()?);
    let topic = Cow::Owned(String::from_utf8(fields.pop()?).ok()?);
    Some(Record {
        id,
        topic,
        key,
        value,
        event_type,
        at_ms,
    })
}

/// The file operations of the spool's writer: a port, so that tests can make them fail.
pub trait SegmentIo: Send + Sync + std::fmt::Debug {
    fn write_all(&self, f: &mut File, buf: &[u8]) -> io::Result<()> {
        f.write_all(buf)
    }

    fn sync(&self, f: &File) -> io::Result<()> {
        f.sync_data()
    }
}

/// The real disk.
#[derive(Debug)]
pub struct Disk;

impl SegmentIo for Disk {}

/// Records read from the spool, and how far the read got.
#[derive(Debug)]
pub struct Batch {
    /// Records, each with the position just past it.
    pub records: Vec<(Position, Record)>,
    /// Just past the last record, or past a corrupt stretch that ends the spool.
    pub end: Position,
    /// A corrupt stretch was skipped.
    pub skipped: bool,
}

/// Whether a read error means the bytes are damaged (rather than the device failing).
fn damaged(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

/// The offset of the first valid frame in `bytes` after position 0 (a frame whose header
/// fits, whose CRC matches and whose payload decodes), or `None`.
fn next_valid_frame(bytes: &[u8]) -> Option<usize> {
    (1..bytes.len().saturating_sub(FRAME_HEADER as usize - 1)).find(|&at| {
        let mut r = &bytes[at..];
        matches!(read_frame(&mut r), Ok(Some(_)))
    })
}

/// Copies segment `seq` into `dir/quarantine/` (once per segment and run) and counts it.
fn quarantine(dir: &Path, seq: u64, at: u64, skipped: u64) {
    let target = dir.join("quarantine");
    let name = format!(
        "seg-{seq:020}-{}.spool",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let copied = fs::create_dir_all(&target)
        .and_then(|()| fs::copy(segment_path(dir, seq), target.join(&name)));
    match copied {
        Ok(_) => tracing::error!(
            segment = seq,
            offset = at,
            skipped_bytes = skipped,
            copy = %target.join(&name).display(),
            "Corrupt spool frame skipped; the segment was copied to quarantine"
        ),
        Err(e) => tracing::error!(
            segment = seq,
            offset = at,
            skipped_bytes = skipped,
            error = %e,
            "Corrupt spool frame skipped; the segment could not be copied to quarantine"
        ),
    }
    crate::observability::spool_quarantined(skipped);
}

/// Reads the frame at the reader's position: `Ok(None)` at a clean end, `Err` on a torn or
/// corrupt frame.
fn read_frame(r: &mut impl Read) -> io::Result<Option<(Record, u64)>> {
    let mut header = [0u8; 8];
    match r.read_exact(&mut header[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut header[1..])?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame length out of range",
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame checksum mismatch",
        ));
    }
    let record = decode(&payload)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "undecodable frame"))?;
    Ok(Some((record, FRAME_HEADER + u64::from(len))))
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.spool"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[derive(Debug)]
struct State {
    /// Durable length of every segment not yet fully drained.
    segments: BTreeMap<u64, u64>,
    cursor: Position,
    /// Records between the cursor and the durable end.
    records: u64,
}

impl State {
    fn used(&self) -> u64 {
        let total: u64 = self.segments.values().sum();
        total.saturating_sub(if self.segments.contains_key(&self.cursor.segment) {
            self.cursor.offset
        } else {
            0
        })
    }
}

type Job = (
    Vec<Record>,
    tokio::sync::oneshot::Sender<Result<(), SpoolError>>,
);

/// A disk spool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    io: Arc<dyn SegmentIo>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering from a crash if needed. Returns the
    /// spool and the records still waiting to be drained.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Vec<Record>), SpoolError> {
        Self::open_with(dir, max_bytes, segment_bytes, Arc::new(Disk))
    }

    /// [`open`](Self::open), writing through `io`.
    pub fn open_with(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
        io: Arc<dyn SegmentIo>,
    ) -> Result<(Self, Vec<Record>), SpoolError> {
        fs::create_dir_all(dir)?;
        let cursor = read_cursor(dir)?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("seg-")?
                    .strip_suffix(".spool")?
                    .parse()
                    .ok()
            })
            .collect();
        seqs.sort_unstable();
        let mut segments = BTreeMap::new();
        let mut pending = Vec::new();
        for seq in seqs {
            let path = segment_path(dir, seq);
            if seq < cursor.segment {
                fs::remove_file(&path)?;
                continue;
            }
            let mut reader = BufReader::new(File::open(&path)?);
            let mut offset = 0u64;
            loop {
                match read_frame(&mut reader) {
                    Ok(Some((record, len))) => {
                        offset += len;
                        if seq > cursor.segment || offset > cursor.offset {
                            pending.push(record);
                        }
                    }
                    Ok(None) => break,
                    // The device failed, not the bytes: cutting would drop acknowledged records.
                    Err(e) if !damaged(&e) => return Err(e.into()),
                    Err(e) => {
                        let rest = {
                            let mut f = File::open(&path)?;
                            f.seek(SeekFrom::Start(offset))?;
                            let mut rest = Vec::new();
                            f.read_to_end(&mut rest)?;
                            rest
                        };
                        if let Some(next) = next_valid_frame(&rest) {
                            // Damage inside the segment: skip it, keep what follows.
                            quarantine(dir, seq, offset, next as u64);
                            offset += next as u64;
                            reader.seek(SeekFrom::Start(offset))?;
                            continue;
                        }
                        if e.kind() == io::ErrorKind::InvalidData {
                            quarantine(dir, seq, offset, rest.len() as u64);
                        }
                        tracing::warn!(segment = seq, offset, error = %e, "Cutting a torn spool frame");
                        let f = OpenOptions::new().write(true).open(&path)?;
                        f.set_len(offset)?;
                        f.sync_all()?;
                        break;
                    }
                }
            }
            segments.insert(seq, offset);
        }
        let first = segments
            .keys()
            .next()
            .copied()
            .unwrap_or(cursor.segment.max(1));
        let last = segments.keys().next_back().copied().unwrap_or(first);
        segments.entry(last).or_insert(0);
        let state = State {
            segments,
            // Without a cursor file nothing was drained yet: start at the first segment.
            cursor: if cursor.segment == 0 {
                Position {
                    segment: first,
                    offset: 0,
                }
            } else {
                cursor
            },
            records: pending.len() as u64,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let spool = Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                max_bytes,
                state: Mutex::new(state),
                jobs: Mutex::new(Some(tx)),
                io,
            }),
        };
        let writer = spool.clone();
        thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.write_loop(rx, last, segment_bytes))?;
        Ok((spool, pending))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends records durably (group-committed with concurrent appends).
    pub async fn append(&self, records: Vec<Record>) -> Result<(), SpoolError> {
        let incoming: u64 = records
            .iter()
            .map(|r| {
                // header, version, id, time, four length prefixes, the fields
                FRAME_HEADER
                    + 1
                    + 16
                    + 8
                    + 16
                    + (r.topic.len() + r.event_type.len() + r.key.len() + r.value.len()) as u64
            })
            .sum();
        {
            let state = self.state();
            let used = state.used();
            if used + incoming > self.inner.max_bytes {
                return Err(SpoolError::Full {
                    used,
                    max: self.inner.max_bytes,
                });
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sender = self
            .inner
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(SpoolError::Stopped)?;
        sender
            .send((records, tx))
            .map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }

    fn write_loop(&self, rx: mpsc::Receiver<Job>, mut seq: u64, segment_bytes: u64) {
        let mut file: Option<File> = None;
        let mut buf = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while let Ok(more) = rx.try_recv() {
                jobs.push(more);
            }
            let result = self.write_group(&mut file, &mut seq, segment_bytes, &jobs, &mut buf);
            for (_, done) in jobs {
                let _ = done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(SpoolError::Io(io::Error::new(e.kind(), e.to_string()))),
                });
            }
        }
    }

    /// Writes a group of appends durably; on failure nothing of it stays on disk.
    fn write_group(
        &self,
        file: &mut Option<File>,
        seq: &mut u64,
        segment_bytes: u64,
        jobs: &[Job],
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let (first, durable) = (*seq, self.state().segments.get(seq).copied().unwrap_or(0));
        let result = self.write_frames(file, seq, segment_bytes, jobs, buf);
        if let Err(e) = &result {
            // Back to the last durable length (and no new segment), so that the frames
            // written after this failure are not preceded by a torn one.
            *file = None;
            for s in first + 1..=*seq {
                let _ = fs::remove_file(segment_path(&self.inner.dir, s));
            }
            *seq = first;
            let undone = OpenOptions::new()
                .write(true)
                .open(segment_path(&self.inner.dir, first))
                .and_then(|f| {
                    f.set_len(durable)?;
                    f.sync_all()
                });
            match undone {
                Ok(()) => {
                    tracing::warn!(segment = first, error = %e, "Spool write failed; truncated back to its durable length")
                }
                Err(u) => {
                    tracing::error!(segment = first, error = %e, truncate = %u, "Spool write failed and could not be undone; the next open skips what it left")
                }
            }
        }
        result
    }

    fn write_frames(
        &self,
        file: &mut Option<File>,
        seq: &mut u64,
        segment_bytes: u64,
        jobs: &[Job],
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let mut len = self.state().segments.get(seq).copied().unwrap_or(0);
        let mut count = 0u64;
        // Lengths become visible to readers only once durable.
        let mut durable: Vec<(u64, u64)> = Vec::new();
        for (records, _) in jobs {
            for r in records {
                buf.clear();
                encode(r, buf);
                if len > 0 && len + buf.len() as u64 > segment_bytes {
                    if let Some(f) = file.as_mut() {
                        self.inner.io.sync(f)?;
                    }
                    durable.push((*seq, len));
                    *seq += 1;
                    *file = None;
                    len = 0;
                }
                if file.is_none() {
                    let path = segment_path(&self.inner.dir, *seq);
                    let f = OpenOptions::new().create(true).append(true).open(&path)?;
                    sync_dir(&self.inner.dir)?;
                    *file = Some(f);
                }
                if let Some(f) = file.as_mut() {
                    self.inner.io.write_all(f, buf)?;
                }
                len += buf.len() as u64;
                count += 1;
            }
        }
        if let Some(f) = file.as_mut() {
            self.inner.io.sync(f)?;
        }
        durable.push((*seq, len));
        let mut st = self.state();
        for (segment, len) in durable {
            st.segments.insert(segment, len);
        }
        st.records += count;
        Ok(())
    }

    /// Reads up to `max` records starting after `from` (the committed cursor when `None`),
    /// skipping corrupt stretches of the durable part (see the module's documentation).
    pub fn read(&self, from: Option<Position>, max: usize) -> Result<Batch, SpoolError> {
        let (start, segments) = {
            let st = self.state();
            (from.unwrap_or(st.cursor), st.segments.clone())
        };
        let mut batch = Batch {
            records: Vec::new(),
            end: start,
            skipped: false,
        };
        for (&seq, &durable) in segments.range(start.segment..) {
            let mut offset = if seq == start.segment {
                start.offset
            } else {
                0
            };
            if offset >= durable {
                continue;
            }
            let path = segment_path(&self.inner.dir, seq);
            let mut f = File::open(&path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut reader = BufReader::new(f.take(durable - offset));
            while batch.records.len() < max {
                match read_frame(&mut reader) {
                    Ok(Some((record, len))) => {
                        offset += len;
                        let pos = Position {
                            segment: seq,
                            offset,
                        };
                        batch.end = pos;
                        batch.records.push((pos, record));
                    }
                    Ok(None) => break,
                    Err(e) if !damaged(&e) => return Err(e.into()),
                    Err(_) => {
                        // Durable bytes that do not read back: skip to the next valid frame.
                        let mut rest = Vec::new();
                        let mut f = File::open(&path)?;
                        f.seek(SeekFrom::Start(offset))?;
                        f.take(durable - offset).read_to_end(&mut rest)?;
                        let skip = next_valid_frame(&rest).unwrap_or(rest.len()) as u64;
                        quarantine(&self.inner.dir, seq, offset, skip);
                        offset += skip;
                        batch.skipped = true;
                        batch.end = Position {
                            segment: seq,
                            offset,
                        };
                        let mut f = File::open(&path)?;
                        f.seek(SeekFrom::Start(offset))?;
                        reader = BufReader::new(f.take(durable - offset));
                    }
                }
            }
            if batch.records.len() >= max {
                break;
            }
        }
        Ok(batch)
    }

    /// Marks everything up to `pos` drained (durably), deleting finished segments.
    pub fn commit(&self, pos: Position, drained: u64) -> Result<(), SpoolError> {
        write_cursor(&self.inner.dir, pos)?;
        let mut st = self.state();
        st.cursor = pos;
        st.records = st.records.saturating_sub(drained);
        let last = st
            .segments
            .keys()
            .next_back()
            .copied()
            .unwrap_or(pos.segment);
        let finished: Vec<u64> = st
            .segments
            .iter()
            .filter(|(seq, len)| {
                **seq < pos.segment || (**seq == pos.segment && **len == pos.offset && **seq < last)
            })
            .map(|(seq, _)| *seq)
            .collect();
        for seq in finished {
            st.segments.remove(&seq);
            let _ = fs::remove_file(segment_path(&self.inner.dir, seq));
        }
        // Records lost to a skipped corrupt stretch were never drained: once the cursor is at
        // the durable end, nothing waits.
        if st.used() == 0 {
            st.records = 0;
        }
        Ok(())
    }

    /// Records waiting to be drained.
    pub fn depth(&self) -> u64 {
        self.state().records
    }

    pub fn is_empty(&self) -> bool {
        self.depth() == 0
    }

    /// Bytes waiting to be drained.
    pub fn used_bytes(&self) -> u64 {
        self.state().used()
    }

    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// Stops the writer thread once queued appends are written.
    pub fn close(&self) {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

const CURSOR_FILE: &str = "cursor";

fn read_cursor(dir: &Path) -> io::Result<Position> {
    match fs::read(dir.join(CURSOR_FILE)) {
        Ok(bytes) if bytes.len() == 16 => Ok(Position {
            segment: u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default()),
            offset: u64::from_le_bytes(bytes[8..].try_into().unwrap_or_default()),
        }),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "corrupt spool cursor",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Position {
            segment: 0,
            offset: 0,
        }),
        Err(e) => Err(e),
    }
}

fn write_cursor(dir: &Path, pos: Position) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&pos.segment.to_le_bytes())?;
    f.write_all(&pos.offset.to_le_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(CURSOR_FILE))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u128) -> Record {
        Record {
            id: i,
            topic: Cow::Owned("feedloop.events".into()),
            key: format!("k{i}").into_bytes(),
            value: vec![0, 0, 0, 0, 1, i as u8],
            event_type: Cow::Owned("chat_ended".into()),
            at_ms: 1000 + i as i64,
        }
    }

    #[tokio::test]
    async fn appends_reads_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, pending) = Spool::open(dir.path(), 1 << 20, 200).expect("open");
        assert!(pending.is_empty());
        spool
            .append((0..5).map(record).collect())
            .await
            .expect("append");
        spool
            .append((5..10).map(record).collect())
            .await
            .expect("append");
        assert_eq!(spool.depth(), 10);
        let first = spool.read(None, 4).expect("read").records;
        assert_eq!(
            first.iter().map(|(_, r)| r.id).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        spool.commit(first[3].0, 4).expect("commit");
        spool.close();
        drop(spool);

        let (spool, pending) = Spool::open(dir.path(), 1 << 20, 200).expect("reopen");
        assert_eq!(
            pending.iter().map(|r| r.id).collect::<Vec<_>>(),
            (4..10).collect::<Vec<_>>()
        );
        let rest = spool.read(None, 100).expect("read").records;
        assert_eq!(
            rest.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            (4..10).map(record).collect::<Vec<_>>()
        );
        spool.commit(rest[rest.len() - 1].0, 6).expect("commit");
        assert!(spool.is_empty());
        // Drained segments are gone except the one being written.
        let files = fs::read_dir(dir.path())
            .expect("ls")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            })
            .count();
        assert_eq!(files, 1);
    }

    #[tokio::test]
    async fn torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        spool
            .append((0..3).map(record).collect())
            .await
            .expect("append");
        spool.close();
        drop(spool);
        let seg = fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .expect("segment")
            .path();
        let mut f = OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("open seg");
        f.write_all(&[42, 0, 0, 0, 1, 2]).expect("garbage");
        drop(f);
        let (spool, pending) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(pending.len(), 3);
        spool
            .append(vec![record(3)])
            .await
            .expect("append after repair");
        assert_eq!(spool.read(None, 10).expect("read").records.len(), 4);
    }

    #[tokio::test]
    async fn refuses_appends_past_capacity() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, _) = Spool::open(dir.path(), 300, 1 << 20).expect("open");
        spool.append(vec![record(0)]).await.expect("fits");
        let err = spool
            .append((1..10).map(record).collect())
            .await
            .expect_err("full");
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    }

    fn segment(dir: &Path) -> PathBuf {
        fs::read_dir(dir)
            .expect("ls")
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .expect("segment")
            .path()
    }

    fn quarantined(dir: &Path) -> usize {
        fs::read_dir(dir.join("quarantine")).map_or(0, Iterator::count)
    }

    /// Flips one byte of the second of three one-record frames.
    async fn three_frames_second_corrupt(spool: &Spool, dir: &Path) {
        for i in 0..3 {
            spool.append(vec![record(i)]).await.expect("append");
        }
        let mut frame = Vec::new();
        encode(&record(0), &mut frame);
        let path = segment(dir);
        let mut bytes = fs::read(&path).expect("read");
        bytes[frame.len() + 20] ^= 0x40;
        fs::write(&path, bytes).expect("write");
    }

    #[tokio::test]
    async fn a_corrupt_frame_mid_segment_is_quarantined_and_the_frames_after_it_open() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        three_frames_second_corrupt(&spool, dir.path()).await;
        spool.close();
        drop(spool);
        let (spool, pending) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(pending.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(quarantined(dir.path()), 1);
        let batch = spool.read(None, 10).expect("read");
        assert_eq!(
            batch.records.iter().map(|(_, r)| r.id).collect::<Vec<_>>(),
            [0, 2]
        );
        spool.commit(batch.end, 2).expect("commit");
        assert!(spool.is_empty());
    }

    #[tokio::test]
    async fn a_frame_corrupted_while_running_is_skipped_by_the_drain() {
        let dir = tempfile::tempdir().expect("dir");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        three_frames_second_corrupt(&spool, dir.path()).await;
        let batch = spool.read(None, 10).expect("read");
        assert!(batch.skipped);
        assert_eq!(
            batch.records.iter().map(|(_, r)| r.id).collect::<Vec<_>>(),
            [0, 2]
        );
        assert_eq!(quarantined(dir.path()), 1);
        spool.commit(batch.end, 2).expect("commit");
        assert!(spool.is_empty(), "the lost record does not hold the spool");
    }

    /// Writes at most `budget` more bytes, then fails like a full disk (a short write).
    #[derive(Debug)]
    struct FullDisk {
        budget: std::sync::atomic::AtomicUsize,
    }

    impl SegmentIo for FullDisk {
        fn write_all(&self, f: &mut File, buf: &[u8]) -> io::Result<()> {
            use std::sync::atomic::Ordering;
            let budget = self.budget.load(Ordering::Acquire);
            if buf.len() <= budget {
                self.budget.fetch_sub(buf.len(), Ordering::AcqRel);
                return f.write_all(buf);
            }
            f.write_all(&buf[..budget])?;
            self.budget.store(0, Ordering::Release);
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "No space left on device",
            ))
        }
    }

    #[tokio::test]
    async fn a_failed_write_is_truncated_back_before_the_error_is_returned() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Arc::new(FullDisk {
            budget: std::sync::atomic::AtomicUsize::new(1 << 20),
        });
        let (spool, _) =
            Spool::open_with(dir.path(), 1 << 20, 1 << 20, disk.clone()).expect("open");
        spool.append(vec![record(0)]).await.expect("append");
        let durable = fs::metadata(segment(dir.path())).expect("stat").len();
        disk.budget.store(10, std::sync::atomic::Ordering::Release);
        let err = spool
            .append(vec![record(1), record(2)])
            .await
            .expect_err("the disk is full");
        assert!(matches!(err, SpoolError::Io(_)), "{err}");
        assert_eq!(
            fs::metadata(segment(dir.path())).expect("stat").len(),
            durable,
            "the short write was truncated away"
        );
        assert_eq!(spool.depth(), 1);
        disk.budget
            .store(1 << 20, std::sync::atomic::Ordering::Release);
        spool.append(vec![record(3)]).await.expect("append after");
        spool.close();
        drop(spool);
        let (_, pending) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(pending.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 3]);
        assert_eq!(
            quarantined(dir.path()),
            0,
            "nothing corrupt was left behind"
        );
    }
}
