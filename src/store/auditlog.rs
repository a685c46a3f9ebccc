//! The audit trail's append-only segment files.
//!
//! Audit entries are written once and read in order, so they live in files of their own
//! beside sled's (in `audit/` of the store's directory) rather than as sled keys: appending a
//! group of entries is one `pwrite` and one `fdatasync`, and opening the store costs the same
//! whether the trail holds a thousand entries or ten million.
//!
//! The trail is a sequence of segments, each named by the position (audit sequence number) of
//! its first entry: `00000000000000000001.log`. A segment is a run of frames:
//!
//! ```text
//! len: u32 LE | crc32: u32 LE | position: u64 LE | flags: u8 | payload_len: u32 LE
//!     | payload: payload_len bytes | redo: the rest of len
//! ```
//!
//! where `len` counts the bytes after the CRC and the CRC covers them, the payload is the
//! stored audit record (see `codec::encode`) and `redo`, where the flags say so, the record
//! changes of the entry's transaction (see `SledStore`'s recovery). Positions increase along the trail; a gap is an entry that is
//! missing (only ever made by the tamper tests). The writer appends to the last segment (the
//! active one) and starts a new one once it holds [`DEFAULT_SEGMENT_BYTES`]; the segment it
//! leaves is sealed on a thread of its own (`seal_in_background`: tens of milliseconds that
//! the commits waiting for the next append need not wait for): fsynced, with an index file
//! (`.idx`: one u64 LE offset per position, `u64::MAX` where there is no entry) and its
//! audit index (`.ndx`) written beside it and renamed into place. Until then readers use
//! the in-memory forms; a seal cut short by a crash is redone at open. The active
//! segment's index is kept in memory and rebuilt at open by reading the segment, which also
//! cuts off a frame torn by a crash. Readers never see past the position the writer last
//! published, nor before the first position kept after a prune.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::auditindex::{self, Indexer, SegmentIndex};
use super::files::{open_file, write_file_synced};
use super::{StoreError, TrailDamage};

/// A segment is sealed once it holds this many bytes.
pub const DEFAULT_SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Flag of an entry whose transaction also changed records in sled: recovery keeps such an
/// entry only if sled holds its changes (see `SledStore::open`).
pub const STATE_BEARING: u8 = 1;
/// Flag of an entry whose frame carries its transaction's record changes (`redo`), so that
/// recovery can apply them again if sled lost them.
pub const REPLAYABLE: u8 = 2;
/// Frame header: length, CRC, then position, flags and payload length (covered by the CRC).
const HEADER: usize = 4 + 4 + 8 + 1 + 4;
/// No entry at this position.
const NONE: u64 = u64::MAX;
/// A frame claiming a longer payload is torn or corrupt (audit records are a few hundred bytes).
const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes read at a time when reading frames.
const READ_CHUNK: usize = 256 * 1024;

/// One stored entry: its position in the trail, flags, the record's bytes and its redo part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub position: u64,
    pub flags: u8,
    pub payload: Vec<u8>,
    pub redo: Vec<u8>,
}

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub struct NewFrame<'a> {
    pub position: u64,
    pub flags: u8,
    pub payload: &'a [u8],
    pub redo: &'a [u8],
    /// Its index keys, if the caller has them (otherwise the log's indexer reads the payload).
    pub keys: Option<&'a [Vec<u8>]>,
}

/// Where a segment's offsets are: on disk once sealed, in memory while active.
enum Offsets {
    Sealed { file: File, count: u64 },
    Active(Vec<u64>),
}

impl Offsets {
    fn count(&self) -> u64 {
        match self {
            Offsets::Sealed { count, .. } => *count,
            Offsets::Active(v) => v.len() as u64,
        }
    }

    /// Offsets of positions `first + from ..` up to `n` of them.
    fn read(&self, from: u64, n: u64) -> Result<Vec<u64>, StoreError> {
        let end = self.count().min(from.saturating_add(n));
        if from >= end {
            return Ok(Vec::new());
        }
        match self {
            Offsets::Active(v) => Ok(v[from as usize..end as usize].to_vec()),
            Offsets::Sealed { file, .. } => {
                let mut buf = vec![0u8; ((end - from) * 8) as usize];
                file.read_exact_at(&mut buf, from * 8).map_err(io)?;
                Ok(buf
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])))
                    .collect())
            }
        }
    }
}

struct Segment {
    first: u64,
    path: PathBuf,
    file: File,
    offsets: RwLock<Offsets>,
    index: RwLock<SegmentIndex>,
}

impl Segment {
    fn count(&self) -> u64 {
        self.offsets.read().map_or(0, |o| o.count())
    }
}

/// What a reader could not read: a frame (at `position`) or an index block of `segment`.
struct Unreadable {
    segment: Arc<Segment>,
    position: u64,
    why: String,
}

/// A read's result, or what it could not read.
type Attempt<T> = Result<T, Unreadable>;

/// The writer's end of the trail.
struct Tail {
    /// Bytes in the active segment.
    len: u64,
    /// Segments appended to since the last sync.
    unsynced: Vec<Arc<Segment>>,
}

/// The audit trail's segment files (see the module documentation).
pub struct AuditLog {
    dir: PathBuf,
    indexer: Indexer,
    segment_bytes: u64,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    tail: Mutex<Tail>,
    /// Seals running on their own threads (see `seal_in_background`); joined on drop.
    sealers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Highest position readers may see (0: none).
    visible: AtomicU64,
    /// Lowest position readers may see: after the prune anchor.
    start: AtomicU64,
    /// Damage found since open (by a reader or the scrub): appends are refused.
    damage: Mutex<Option<TrailDamage>>,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("audit log: {e}"))
}

fn corrupt(segment: &Segment, reason: String) -> StoreError {
    StoreError::Corrupt {
        key: format!("audit segment {}", segment.first),
        reason,
    }
}

fn index_error(why: String) -> StoreError {
    StoreError::Engine(format!("audit index: {why}"))
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Engine("audit log lock poisoned".into())
}

fn segment_path(dir: &Path, first: u64, ext: &str) -> PathBuf {
    dir.join(format!("{first:020}.{ext}"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Appends one frame to `out`.
fn encode_frame(out: &mut Vec<u8>, frame: NewFrame<'_>) {
    let len = HEADER - 8 + frame.payload.len() + frame.redo.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body = out.len();
    out.extend_from_slice(&frame.position.to_le_bytes());
    out.push(frame.flags);
    out.extend_from_slice(&(frame.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(frame.payload);
    out.extend_from_slice(frame.redo);
    let crc = crc32fast::hash(&out[body..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The frame at the start of `buf`: `Ok(None)` if `buf` is too short to hold it, `Err` if
/// the bytes are not a valid frame. Returns the frame and its length.
fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    let Some(header) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let word = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let len = word(header, 0) as usize;
    if !(HEADER - 8..=MAX_PAYLOAD).contains(&len) {
        return Err(format!("frame length {len} out of range"));
    }
    let Some(body) = buf.get(8..8 + len) else {
        return Ok(None);
    };
    if crc32fast::hash(body) != word(header, 4) {
        return Err("checksum mismatch".into());
    }
    let mut position = [0u8; 8];
    position.copy_from_slice(&body[..8]);
    let payload_len = word(body, 9) as usize;
    let Some((payload, redo)) = body[13..].split_at_checked(payload_len) else {
        return Err(format!("payload length {payload_len} out of range"));
    };
    Ok(Some((
        Frame {
            position: u64::from_le_bytes(position),
            flags: body[8],
            payload: payload.to_vec(),
            redo: redo.to_vec(),
        },
        8 + len,
    )))
}

/// Reads frames at increasing offsets of one file through a buffer that grows (up to
/// [`READ_CHUNK`] a read) as a reader keeps going.
struct FrameReader<'a> {
    file: &'a File,
    buf: Vec<u8>,
    at: u64,
    chunk: usize,
}

impl<'a> FrameReader<'a> {
    fn new(file: &'a File) -> Self {
        Self {
            file,
            buf: Vec::new(),
            at: 0,
            chunk: 4096,
        }
    }

    /// The frame at `offset`, `Ok(None)` at the end of the file, `Err(reason)` where the bytes
    /// are not a frame (or the file ends inside one).
    fn frame_at(&mut self, offset: u64) -> Result<Option<(Frame, usize)>, String> {
        let mut need = HEADER;
        for _ in 0..3 {
            if offset >= self.at && offset - self.at <= self.buf.len() as u64 {
                let held = &self.buf[(offset - self.at) as usize..];
                if let Some(found) = decode_frame(held)? {
                    return Ok(Some(found));
                }
                if held.len() >= HEADER {
                    let len = u32::from_le_bytes([held[0], held[1], held[2], held[3]]) as usize;
                    need = 8 + len;
                }
            }
            let want = need.max(self.chunk);
            self.chunk = (self.chunk * 2).min(READ_CHUNK);
            self.fill(offset, want)?;
            if self.buf.len() < want {
                // The file ends within this read: what is there is all there is.
                return match decode_frame(&self.buf)? {
                    Some(found) => Ok(Some(found)),
                    None if self.buf.is_empty() => Ok(None),
                    None => Err("the file ends inside a frame".into()),
                };
            }
        }
        Err("unreadable frame".into())
    }

    fn fill(&mut self, offset: u64, len: usize) -> Result<(), String> {
        self.buf.resize(len, 0);
        let mut filled = 0;
        while filled < self.buf.len() {
            match self
                .file
                .read_at(&mut self.buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        self.buf.truncate(filled);
        self.at = offset;
        Ok(())
    }
}

/// What reading a segment from its start found.
struct Scan {
    /// Offsets by position (from the segment's first), [`NONE`] where there is no entry.
    offsets: Vec<u64>,
    /// Length of the valid prefix.
    valid: u64,
    /// The segment's index (when asked for).
    index: SegmentIndex,
    /// Where the valid prefix ends short of the end of the file, and why.
    bad: Option<BadFrame>,
}

/// Bytes that are not the next frame.
struct BadFrame {
    offset: u64,
    reason: String,
    /// A valid frame, but out of order: never the result of a torn write.
    out_of_order: bool,
}

/// Reads every valid frame of a segment from its start, up to the end of the file or the
/// first bytes that are not the next frame. With `indexer`, also builds the segment's index.
fn scan(file: &File, first: u64, indexer: Option<&Indexer>) -> Scan {
    let mut reader = FrameReader::new(file);
    let mut offsets = Vec::new();
    let mut index = SegmentIndex::new();
    let mut at = 0u64;
    let bad = loop {
        match reader.frame_at(at) {
            Ok(None) => break None,
            Err(reason) => {
                break Some(BadFrame {
                    offset: at,
                    reason,
                    out_of_order: false,
                });
            }
            Ok(Some((frame, len))) => {
                let expected = first + offsets.len() as u64;
                if frame.position < expected {
                    break Some(BadFrame {
                        offset: at,
                        reason: format!(
                            "entry {} where entry {expected} or later belongs",
                            frame.position
                        ),
                        out_of_order: true,
                    });
                }
                while first + (offsets.len() as u64) < frame.position {
                    offsets.push(NONE);
                }
                if let Some(indexer) = indexer {
                    index.add(offsets.len() as u32, &indexer(&frame.payload));
                }
                offsets.push(at);
                at += len as u64;
            }
        }
    };
    Scan {
        offsets,
        valid: at,
        index,
        bad,
    }
}

/// The offset of a valid frame of position `expected` or later that starts after `offset`,
/// if any. A bad frame with valid frames after it is damage; without, it is the last write,
/// torn by a crash.
fn frame_after(file: &File, offset: u64, expected: u64) -> Result<Option<u64>, StoreError> {
    const CHUNK: usize = 1 << 20;
    let end = file.metadata().map_err(io)?.len();
    let mut reader = FrameReader::new(file);
    let mut buf = vec![0u8; CHUNK];
    let mut at = offset + 1;
    while at + HEADER as u64 <= end {
        let want = ((end - at) as usize).min(CHUNK);
        file.read_exact_at(&mut buf[..want], at).map_err(io)?;
        let candidates = want + 1 - HEADER;
        for i in 0..candidates {
            let header = &buf[i..i + HEADER];
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if !(HEADER - 8..=MAX_PAYLOAD).contains(&len) {
                continue;
            }
            let mut position = [0u8; 8];
            position.copy_from_slice(&header[8..16]);
            let position = u64::from_le_bytes(position);
            // Positions of one write are consecutive: anything far off is not a frame.
            if position < expected || position - expected > 1 << 32 {
                continue;
            }
            let candidate = at + i as u64;
            if let Ok(Some((frame, _))) = reader.frame_at(candidate)
                && frame.position == position
            {
                return Ok(Some(candidate));
            }
        }
        at += candidates as u64;
    }
    Ok(None)
}

/// The damage at `offset` of segment `first`.
fn damage(dir: &Path, first: u64, offset: u64, reason: String, first_lost: u64) -> StoreError {
    StoreError::TrailDamaged(Box::new(TrailDamage {
        location: format!(
            "{} at offset {offset}",
            segment_path(dir, first, "log").display()
        ),
        reason,
        first_lost,
    }))
}

/// The damage of a segment whose valid frames end at `offset` after its entry `last`
/// while the next segment starts at `next`.
fn gap(dir: &Path, first: u64, offset: u64, last: u64, next: u64) -> StoreError {
    let reason = if next > last + 1 {
        format!(
            "the segment ends with entry {last} but the next one starts at entry {next}: entries {}..={} are missing",
            last + 1,
            next - 1
        )
    } else {
        format!("the segment holds entries up to {last} but the next one starts at entry {next}")
    };
    damage(dir, first, offset, reason, (last + 1).min(next))
}

fn write_index(dir: &Path, first: u64, offsets: &[u64]) -> Result<File, StoreError> {
    let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    let file = write_file_synced(&segment_path(dir, first, "idx"), &bytes).map_err(io)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Syncs a segment that takes no more entries and writes its index files. The files are
/// written under read locks (the segment no longer changes) and swapped in after, so that
/// readers are not held up meanwhile.
fn seal(dir: &Path, segment: &Segment) -> Result<(), StoreError> {
    segment.file.sync_all().map_err(io)?;
    let offsets = match &*segment.offsets.read().map_err(poisoned)? {
        Offsets::Active(v) => Some((write_index(dir, segment.first, v)?, v.len() as u64)),
        Offsets::Sealed { .. } => None,
    };
    if let Some((file, count)) = offsets {
        *segment.offsets.write().map_err(poisoned)? = Offsets::Sealed { file, count };
    }
    let index = match &*segment.index.read().map_err(poisoned)? {
        index @ SegmentIndex::Active(_) => {
            let path = segment_path(dir, segment.first, "ndx");
            Some(index.seal(&path).map_err(index_error)?)
        }
        SegmentIndex::Sealed { .. } => None,
    };
    if let Some(index) = index {
        sync_dir(dir)?;
        *segment.index.write().map_err(poisoned)? = index;
    }
    Ok(())
}

/// The first positions of the segments in `dir`, in order. Removes the `.tmp` files a seal
/// that did not finish left (the seal is redone).
fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = name
            .strip_suffix(".log")
            .and_then(|f| f.parse::<u64>().ok())
        {
            firsts.push(first);
        } else if name.ends_with(".tmp") {
            std::fs::remove_file(dir.join(&*name)).map_err(io)?;
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Reads the active segment at open (its index files were never written). A bad frame with
/// nothing valid after it, past every acknowledged entry, is the last write torn by a crash:
/// it is cut off. Anything else is damage.
fn open_active(
    dir: &Path,
    file: &File,
    first: u64,
    indexer: &Indexer,
    acknowledged: u64,
) -> Result<Scan, StoreError> {
    let _ = std::fs::remove_file(segment_path(dir, first, "idx"));
    let _ = std::fs::remove_file(segment_path(dir, first, "ndx"));
    let scan = scan(file, first, Some(indexer));
    let Some(bad) = &scan.bad else {
        return Ok(scan);
    };
    if let Some(damage) = active_damage(dir, file, first, &scan, acknowledged)? {
        return Err(damage);
    }
    let len = file.metadata().map_err(io)?.len();
    tracing::warn!(
        segment = first,
        offset = bad.offset,
        bytes = len - bad.offset,
        reason = %bad.reason,
        "cut off the audit trail's last write, torn by a crash (it was never acknowledged)"
    );
    file.set_len(scan.valid).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(scan)
}

/// The damage of the active segment `first` whose scan ended at a bad frame, or `None` if
/// that is the last write, torn by a crash: nothing valid after it, past every acknowledged
/// entry.
fn active_damage(
    dir: &Path,
    file: &File,
    first: u64,
    scan: &Scan,
    acknowledged: u64,
) -> Result<Option<StoreError>, StoreError> {
    let Some(bad) = &scan.bad else {
        return Ok(None);
    };
    let expected = first + scan.offsets.len() as u64;
    let why = if bad.out_of_order {
        Some(String::new())
    } else if expected <= acknowledged {
        Some(format!(
            "; entry {expected} was acknowledged (the records reflect entries through {acknowledged})"
        ))
    } else {
        frame_after(file, bad.offset, expected)?.map(|at| {
            format!(", and a valid entry follows at offset {at} (not a write torn by a crash)")
        })
    };
    Ok(why.map(|why| {
        damage(
            dir,
            first,
            bad.offset,
            format!("{}{why}", bad.reason),
            expected,
        )
    }))
}

/// The offsets of a sealed segment whose successor starts at `next`. The offset file is
/// derived from the segment: if it is missing or does not fit the segment, it is written
/// again from a scan. The segment itself must be complete: valid frames from its first
/// entry to the one before `next`, up to the end of the file.
fn sealed_offsets(dir: &Path, file: &File, first: u64, next: u64) -> Result<Offsets, StoreError> {
    let expected = next.saturating_sub(first);
    match open_file(&segment_path(dir, first, "idx"), false) {
        Ok(idx) => {
            if offsets_fit(&idx, file, first, expected)? {
                return Ok(Offsets::Sealed {
                    file: idx,
                    count: expected,
                });
            }
            tracing::warn!(
                segment = first,
                "the audit offset file does not fit its segment; checking the segment and rewriting it"
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let offsets = complete_offsets(dir, file, first, next)?;
    let idx = write_index(dir, first, &offsets)?;
    Ok(Offsets::Sealed {
        file: idx,
        count: expected,
    })
}

/// Scans a sealed segment that its successor follows at `next`: its offsets (padded with
/// [`NONE`] up to `next`), or the damage that makes it incomplete.
fn complete_offsets(
    dir: &Path,
    file: &File,
    first: u64,
    next: u64,
) -> Result<Vec<u64>, StoreError> {
    let Scan {
        mut offsets,
        valid,
        bad,
        ..
    } = scan(file, first, None);
    if let Some(bad) = bad {
        return Err(damage(
            dir,
            first,
            bad.offset,
            bad.reason,
            first + offsets.len() as u64,
        ));
    }
    let end = first + offsets.len() as u64;
    if offsets.is_empty() || end != next {
        return Err(gap(dir, first, valid, end - 1, next));
    }
    offsets.resize(next.saturating_sub(first) as usize, NONE);
    Ok(offsets)
}

/// Whether an offset file fits its segment: one offset per position up to the next
/// segment, and the last entry ends where the segment file ends. (Cheap: a damaged middle
/// is found when it is read, or by the scrub.)
fn offsets_fit(idx: &File, file: &File, first: u64, expected: u64) -> Result<bool, StoreError> {
    let len = idx.metadata().map_err(io)?.len();
    if len % 8 != 0 || len / 8 != expected {
        return Ok(false);
    }
    let offsets = Offsets::Sealed {
        file: idx.try_clone().map_err(io)?,
        count: expected,
    };
    let mut i = expected;
    while i > 0 {
        let from = i.saturating_sub(1024);
        let chunk = offsets.read(from, i - from)?;
        if let Some(k) = chunk.iter().rposition(|&o| o != NONE) {
            let position = first + from + k as u64;
            let end = file.metadata().map_err(io)?.len();
            return Ok(match FrameReader::new(file).frame_at(chunk[k]) {
                Ok(Some((frame, len))) => {
                    frame.position == position && chunk[k] + len as u64 == end
                }
                _ => false,
            });
        }
        i = from;
    }
    Ok(false)
}

/// A sealed segment's audit index: its file, or rebuilt from the segment if missing or
/// damaged (it is derived from the segment).
fn sealed_index(
    dir: &Path,
    file: &File,
    first: u64,
    indexer: &Indexer,
) -> Result<SegmentIndex, StoreError> {
    let ndx_path = segment_path(dir, first, "ndx");
    match auditindex::load(&ndx_path) {
        Ok(index) => Ok(index),
        Err(why) => {
            if ndx_path.exists() {
                tracing::warn!(segment = first, why, "rebuilding a damaged audit index");
            }
            let scan = scan(file, first, Some(indexer));
            let sealed = scan.index.seal(&ndx_path).map_err(index_error)?;
            sync_dir(dir)?;
            Ok(sealed)
        }
    }
}

impl AuditLog {
    /// Opens (or creates) the trail in `dir`, cutting off a torn tail; `indexer` gives the
    /// index keys of a stored record.
    pub fn open(dir: &Path, segment_bytes: u64, indexer: Indexer) -> Result<Self, StoreError> {
        Self::open_acknowledged(dir, segment_bytes, indexer, 0)
    }

    /// [`AuditLog::open`] for a trail whose entries up to `acknowledged` are known to have
    /// been made durable (the records reflect them): a bad frame among those is damage, never
    /// a torn write. Fails with [`StoreError::TrailDamaged`] where the trail is not a valid,
    /// complete, contiguous run of frames; only the last write, torn by a crash, is cut off.
    pub fn open_acknowledged(
        dir: &Path,
        segment_bytes: u64,
        indexer: Indexer,
        acknowledged: u64,
    ) -> Result<Self, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let firsts = list_segments(dir)?;
        let mut segments = BTreeMap::new();
        let mut tail_len = 0;
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(dir, first, "log");
            let file = open_file(&path, false).map_err(io)?;
            let (offsets, index) = match firsts.get(i + 1) {
                None => {
                    let scan = open_active(dir, &file, first, &indexer, acknowledged)?;
                    tail_len = scan.valid;
                    (Offsets::Active(scan.offsets), scan.index)
                }
                Some(&next) => (
                    sealed_offsets(dir, &file, first, next)?,
                    sealed_index(dir, &file, first, &indexer)?,
                ),
            };
            segments.insert(
                first,
                Arc::new(Segment {
                    first,
                    path,
                    file,
                    offsets: RwLock::new(offsets),
                    index: RwLock::new(index),
                }),
            );
        }
        let log = Self {
            dir: dir.to_path_buf(),
            indexer,
            segment_bytes: segment_bytes.max(1),
            segments: RwLock::new(segments),
            tail: Mutex::new(Tail {
                len: tail_len,
                unsynced: Vec::new(),
            }),
            sealers: Mutex::new(Vec::new()),
            visible: AtomicU64::new(0),
            start: AtomicU64::new(0),
            damage: Mutex::new(None),
        };
        log.visible
            .store(log.last_position()?.unwrap_or(0), Ordering::Release);
        Ok(log)
    }

    /// The trail's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first position of the first segment, if there is one.
    pub fn first_position(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .segments
            .read()
            .map_err(poisoned)?
            .keys()
            .next()
            .copied())
    }

    /// The damage found since open, if any: appends are refused while there is some.
    pub fn damage(&self) -> Option<TrailDamage> {
        self.damage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records damage found while the store runs: from now on appends are refused.
    fn mark_damaged(&self, found: TrailDamage) {
        let mut damage = self.damage.lock().unwrap_or_else(|p| p.into_inner());
        if damage.is_none() {
            tracing::error!(
                damage = %found,
                "the audit trail is damaged; refusing every write until an operator restores \
                 the data directory from a backup or runs `byokd audit repair`"
            );
            *damage = Some(found);
        }
    }

    /// Reads a segment whole and checks it against its offsets: damage is an error; offsets
    /// that do not fit a sound sealed segment are written again (they are derived from it):
    /// `Ok(true)` then.
    fn examine(&self, segment: &Arc<Segment>) -> Result<bool, StoreError> {
        let next = self
            .segments
            .read()
            .map_err(poisoned)?
            .range(segment.first + 1..)
            .next()
            .map(|(&first, _)| first);
        let Some(next) = next else {
            // The active segment: its offsets come from a scan at open and the appends since;
            // the file must still say the same.
            let _tail = self.tail.lock().map_err(poisoned)?;
            let found = scan(&segment.file, segment.first, None);
            let held = segment
                .offsets
                .read()
                .map_err(poisoned)?
                .read(0, u64::MAX)?;
            if let Some(bad) = found.bad {
                return Err(damage(
                    &self.dir,
                    segment.first,
                    bad.offset,
                    bad.reason,
                    segment.first + found.offsets.len() as u64,
                ));
            }
            if found.offsets != held {
                let at = found.offsets.iter().zip(&held).position(|(a, b)| a != b);
                let k = at.unwrap_or(found.offsets.len().min(held.len()));
                return Err(damage(
                    &self.dir,
                    segment.first,
                    found.valid,
                    "the segment changed under the running server".into(),
                    segment.first + k as u64,
                ));
            }
            return Ok(false);
        };
        let offsets = complete_offsets(&self.dir, &segment.file, segment.first, next)?;
        let mut held = segment.offsets.write().map_err(poisoned)?;
        if held.read(0, u64::MAX)? == offsets {
            return Ok(false);
        }
        tracing::warn!(
            segment = segment.first,
            "the audit offset file does not fit its segment; writing it again"
        );
        let file = write_index(&self.dir, segment.first, &offsets)?;
        *held = Offsets::Sealed {
            file,
            count: offsets.len() as u64,
        };
        Ok(true)
    }

    /// Builds a segment's audit index again from the segment (after a damaged index block).
    fn reindex(&self, segment: &Arc<Segment>) -> Result<(), StoreError> {
        let sealed = self
            .segments
            .read()
            .map_err(poisoned)?
            .range(segment.first + 1..)
            .next()
            .is_some();
        let found = scan(&segment.file, segment.first, Some(&self.indexer));
        let index = if sealed {
            let path = segment_path(&self.dir, segment.first, "ndx");
            let index = found.index.seal(&path).map_err(index_error)?;
            sync_dir(&self.dir)?;
            index
        } else {
            found.index
        };
        *segment.index.write().map_err(poisoned)? = index;
        Ok(())
    }

    /// Reads every sealed segment whole (open only checks their ends): damage found makes
    /// the trail refuse appends; offset files that do not fit are written again. Returns the
    /// damage found, if any.
    pub fn scrub(&self, stop: &AtomicBool) -> Result<Option<TrailDamage>, StoreError> {
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .map_err(poisoned)?
            .values()
            .cloned()
            .collect();
        let Some((_, sealed)) = segments.split_last() else {
            return Ok(None);
        };
        for segment in sealed {
            if stop.load(Ordering::Acquire) {
                break;
            }
            match self.examine(segment) {
                Ok(_) => {}
                Err(StoreError::TrailDamaged(found)) => {
                    self.mark_damaged((*found).clone());
                    return Ok(Some(*found));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// For `byokd audit repair`, on a trail nobody has open: reads every segment whole and
    /// returns the first damage. `expected_first`: the entry the trail must start with (after
    /// the prune anchor); `acknowledged`: the last entry the records reflect.
    pub fn find_damage(
        dir: &Path,
        expected_first: u64,
        acknowledged: u64,
    ) -> Result<Option<TrailDamage>, StoreError> {
        let damaged = |e: StoreError| match e {
            StoreError::TrailDamaged(found) => Ok(Some(*found)),
            other => Err(other),
        };
        if !dir.exists() {
            return Ok((acknowledged >= expected_first).then(|| TrailDamage {
                location: dir.display().to_string(),
                reason: format!(
                    "the trail is gone, but the records reflect entries through {acknowledged}"
                ),
                first_lost: expected_first,
            }));
        }
        let firsts = list_segments(dir)?;
        if let Some(&first) = firsts.first()
            && first > expected_first
        {
            return Ok(Some(TrailDamage {
                location: segment_path(dir, first, "log").display().to_string(),
                reason: format!(
                    "the trail starts at entry {first}, but entries from {expected_first} on were never pruned (a segment is missing)"
                ),
                first_lost: expected_first,
            }));
        }
        let mut end = expected_first;
        for (i, &first) in firsts.iter().enumerate() {
            let file = open_file(&segment_path(dir, first, "log"), false).map_err(io)?;
            match firsts.get(i + 1) {
                Some(&next) => {
                    if let Err(e) = complete_offsets(dir, &file, first, next) {
                        return damaged(e);
                    }
                }
                None => {
                    let found = scan(&file, first, None);
                    if let Some(e) = active_damage(dir, &file, first, &found, acknowledged)? {
                        return damaged(e);
                    }
                    end = first + found.offsets.len() as u64;
                }
            }
        }
        if end <= acknowledged {
            return Ok(Some(TrailDamage {
                location: format!("{} (its end)", dir.display()),
                reason: format!(
                    "the trail ends before entry {end}, but the records reflect entries through {acknowledged}"
                ),
                first_lost: end,
            }));
        }
        Ok(None)
    }

    /// For `byokd audit repair`, on a trail nobody has open: copies every segment holding
    /// entries from `first_lost` on into `quarantine`, then cuts the trail before
    /// `first_lost` (those segments' files go; the one it falls in keeps its entries before
    /// it and becomes the active segment). Returns the files copied.
    pub fn cut_before(
        dir: &Path,
        first_lost: u64,
        quarantine: &Path,
    ) -> Result<Vec<PathBuf>, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(quarantine)
            .map_err(io)?;
        let firsts = list_segments(dir)?;
        let mut copied = Vec::new();
        for (i, &first) in firsts.iter().enumerate() {
            if firsts.get(i + 1).is_some_and(|&next| next <= first_lost) {
                continue;
            }
            for ext in ["log", "idx", "ndx"] {
                let from = segment_path(dir, first, ext);
                if from.exists() {
                    let to = quarantine.join(from.file_name().unwrap_or_default());
                    std::fs::copy(&from, &to).map_err(io)?;
                    copied.push(to);
                }
            }
            let path = segment_path(dir, first, "log");
            if first >= first_lost {
                std::fs::remove_file(&path).map_err(io)?;
            } else {
                let file = open_file(&path, false).map_err(io)?;
                let found = scan(&file, first, None);
                let keep = (first_lost - first) as usize;
                let cut = found
                    .offsets
                    .get(keep..)
                    .and_then(|rest| rest.iter().find(|&&o| o != NONE))
                    .copied()
                    .unwrap_or(found.valid);
                file.set_len(cut).map_err(io)?;
                file.sync_all().map_err(io)?;
            }
            let _ = std::fs::remove_file(segment_path(dir, first, "idx"));
            let _ = std::fs::remove_file(segment_path(dir, first, "ndx"));
        }
        sync_dir(dir)?;
        Ok(copied)
    }

    /// The position after the last one written (1 for an empty trail).
    pub fn next_position(&self) -> Result<u64, StoreError> {
        let segments = self.segments.read().map_err(poisoned)?;
        Ok(segments
            .values()
            .next_back()
            .map_or(1, |s| s.first + s.count()))
    }

    /// The last position holding an entry, whether published or not.
    pub fn last_position(&self) -> Result<Option<u64>, StoreError> {
        let segments = self.segments.read().map_err(poisoned)?;
        for segment in segments.values().rev() {
            let offsets = segment.offsets.read().map_err(poisoned)?;
            let count = offsets.count();
            let mut i = count;
            while i > 0 {
                let chunk_start = i.saturating_sub(1024);
                let chunk = offsets.read(chunk_start, i - chunk_start)?;
                if let Some(k) = chunk.iter().rposition(|&o| o != NONE) {
                    return Ok(Some(segment.first + chunk_start + k as u64));
                }
                i = chunk_start;
            }
        }
        Ok(None)
    }

    /// Appends frames (positions increasing, after every position written) without syncing;
    /// readers see them only once published.
    pub fn append(&self, frames: &[NewFrame<'_>]) -> Result<(), StoreError> {
        let Some(first_position) = frames.first().map(|f| f.position) else {
            return Ok(());
        };
        if let Some(damage) = self.damage() {
            return Err(StoreError::TrailDamaged(Box::new(damage)));
        }
        let mut tail = self.tail.lock().map_err(poisoned)?;
        let next = self.next_position()?;
        if first_position < next {
            return Err(StoreError::Engine(format!(
                "audit log: position {first_position} is not after {}",
                next - 1
            )));
        }
        let active = self
            .segments
            .read()
            .map_err(poisoned)?
            .values()
            .next_back()
            .cloned();
        let active = match active {
            Some(segment) if tail.len < self.segment_bytes => segment,
            previous => {
                // The new segment first: if it cannot be created (no file descriptor left,
                // say), nothing changed and the next append tries again.
                let segment = self.create_segment(first_position)?;
                tail.len = 0;
                if let Some(previous) = previous {
                    // If frames of it are not synced yet it stays in `unsynced`: the next
                    // `sync` covers them, whether or not the seal has got that far.
                    self.seal_in_background(previous);
                }
                segment
            }
        };
        let mut buf = Vec::with_capacity(
            frames
                .iter()
                .map(|f| HEADER + f.payload.len() + f.redo.len())
                .sum(),
        );
        let mut offsets = Vec::with_capacity(frames.len());
        let mut expected = active.first + active.count();
        for &frame in frames {
            let position = frame.position;
            if position < expected || HEADER + frame.payload.len() + frame.redo.len() > MAX_PAYLOAD
            {
                return Err(StoreError::Engine(format!(
                    "audit log: cannot append position {position}"
                )));
            }
            while expected < position {
                offsets.push(NONE);
                expected += 1;
            }
            offsets.push(tail.len + buf.len() as u64);
            expected += 1;
            encode_frame(&mut buf, frame);
        }
        if let Err(e) = active.file.write_all_at(&buf, tail.len) {
            // None of it counts: offsets and index are untouched, and whatever reached the
            // file goes, so that the next append starts at the same place.
            return match active.file.set_len(tail.len) {
                Ok(()) => Err(StoreError::Transient(format!("audit log: {e}"))),
                Err(_) => Err(io(e)),
            };
        }
        tail.len += buf.len() as u64;
        {
            let mut index = active.index.write().map_err(poisoned)?;
            for frame in frames {
                let relative = (frame.position - active.first) as u32;
                match frame.keys {
                    Some(keys) => index.add(relative, keys),
                    None => index.add(relative, &(self.indexer)(frame.payload)),
                }
            }
        }
        match &mut *active.offsets.write().map_err(poisoned)? {
            Offsets::Active(v) => v.extend_from_slice(&offsets),
            Offsets::Sealed { .. } => {
                return Err(StoreError::Engine(
                    "audit log: active segment is sealed".into(),
                ));
            }
        }
        if !tail.unsynced.iter().any(|s| Arc::ptr_eq(s, &active)) {
            tail.unsynced.push(active);
        }
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut tail = self.tail.lock().map_err(poisoned)?;
        for segment in tail.unsynced.drain(..) {
            segment.file.sync_data().map_err(io)?;
        }
        Ok(())
    }

    /// Lets readers see positions up to `position`.
    pub fn publish(&self, position: u64) {
        self.visible.fetch_max(position, Ordering::AcqRel);
    }

    /// Hides positions before `position` from readers (after a prune).
    pub fn set_start(&self, position: u64) {
        self.start.fetch_max(position, Ordering::AcqRel);
    }

    /// Starts the segment `first`. Fails with [`StoreError::Transient`] if the file cannot
    /// be made: the trail is as it was.
    fn create_segment(&self, first: u64) -> Result<Arc<Segment>, StoreError> {
        let transient = |e: std::io::Error| {
            StoreError::Transient(format!("audit log: cannot start segment {first}: {e}"))
        };
        let path = segment_path(&self.dir, first, "log");
        let file = open_file(&path, true).map_err(transient)?;
        file.set_len(0).map_err(transient)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(transient)?;
        let segment = Arc::new(Segment {
            first,
            path,
            file,
            offsets: RwLock::new(Offsets::Active(Vec::new())),
            index: RwLock::new(SegmentIndex::new()),
        });
        self.segments
            .write()
            .map_err(poisoned)?
            .insert(first, segment.clone());
        Ok(segment)
    }

    /// Seals `segment`, which takes no more entries, on a thread of its own: writing its
    /// index files takes tens of milliseconds that appends (and the commits waiting for them)
    /// need not wait for. Until it is done, readers use the in-memory offsets and index; if
    /// it fails or the process dies first, the next open writes them again.
    fn seal_in_background(&self, segment: Arc<Segment>) {
        let dir = self.dir.clone();
        let mut sealers = self.sealers.lock().unwrap_or_else(|p| p.into_inner());
        sealers.retain(|h| !h.is_finished());
        let spawned = std::thread::Builder::new()
            .name("byokd-audit-seal".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                match seal(&dir, &segment) {
                    Ok(()) => tracing::info!(
                        segment = segment.first,
                        entries = segment.count(),
                        ms = started.elapsed().as_millis() as u64,
                        "sealed audit segment"
                    ),
                    Err(e) => tracing::error!(
                        segment = segment.first,
                        error = %e,
                        "could not seal an audit segment; its index stays in memory until the next open rebuilds it"
                    ),
                }
            });
        match spawned {
            Ok(handle) => sealers.push(handle),
            // Readers keep the in-memory forms; the next open seals it.
            Err(e) => tracing::error!(error = %e, "could not start an audit segment's seal"),
        }
    }

    /// Returns once every seal started so far is done (holding the list meanwhile, so that
    /// a concurrent caller waits for the same seals).
    pub fn wait_for_seals(&self) {
        let Ok(mut sealers) = self.sealers.lock() else {
            return;
        };
        for sealer in sealers.drain(..) {
            if sealer.join().is_err() {
                tracing::error!("an audit segment's seal panicked");
            }
        }
    }

    /// Up to `limit` positions `>= from` of the entries readers may see that carry the index
    /// key `key`, in order.
    pub fn lookup(&self, key: &[u8], from: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut rebuilt = std::collections::HashSet::new();
        loop {
            match self.lookup_once(key, from, limit)? {
                Ok(found) => return Ok(found),
                // The index is derived from the segment: build it again and look once more
                // (each damaged segment's once).
                Err(Unreadable { segment, why, .. }) => {
                    if !rebuilt.insert(segment.first) {
                        return Err(corrupt(&segment, format!("index: {why}")));
                    }
                    tracing::warn!(
                        segment = segment.first,
                        why,
                        "rebuilding a damaged audit index"
                    );
                    self.reindex(&segment)?;
                }
            }
        }
    }

    /// [`AuditLog::lookup`], or the segment whose index could not be read and why.
    fn lookup_once(
        &self,
        key: &[u8],
        from: u64,
        limit: usize,
    ) -> Result<Attempt<Vec<u64>>, StoreError> {
        let from = from.max(self.start.load(Ordering::Acquire)).max(1);
        let last = self.visible.load(Ordering::Acquire);
        let segments: Vec<Arc<Segment>> = {
            let map = self.segments.read().map_err(poisoned)?;
            let begin = map.range(..=from).next_back().map_or(from, |(&k, _)| k);
            map.range(begin..).map(|(_, s)| s.clone()).collect()
        };
        let mut out = Vec::new();
        for segment in segments {
            if out.len() >= limit || segment.first > last {
                break;
            }
            let relative = u32::try_from(from.saturating_sub(segment.first)).unwrap_or(u32::MAX);
            let found = match segment.index.read().map_err(poisoned)?.lookup(
                key,
                relative,
                limit - out.len(),
            ) {
                Ok(found) => found,
                Err(why) => {
                    return Ok(Err(Unreadable {
                        segment: segment.clone(),
                        position: 0,
                        why,
                    }));
                }
            };
            for relative in found {
                let position = segment.first + u64::from(relative);
                if position > last || out.len() >= limit {
                    break;
                }
                out.push(position);
            }
        }
        Ok(Ok(out))
    }

    /// Up to `limit` frames at positions `>= from`, in order, among those readers may see
    /// (`unpublished`: the writer's view, everything appended).
    /// A frame that does not read back makes the trail damaged (appends stop), unless it was
    /// the offset file that was wrong: that is derived, so it is written again.
    pub fn read(
        &self,
        from: u64,
        limit: usize,
        unpublished: bool,
    ) -> Result<Vec<Frame>, StoreError> {
        let mut rewritten = false;
        loop {
            match self.read_once(from, limit, unpublished)? {
                Ok(frames) => return Ok(frames),
                Err(Unreadable {
                    segment,
                    position,
                    why,
                }) => {
                    if !rewritten {
                        match self.examine(&segment) {
                            Ok(true) => {
                                rewritten = true;
                                continue;
                            }
                            Ok(false) => {}
                            Err(StoreError::TrailDamaged(damage)) => self.mark_damaged(*damage),
                            Err(e) => return Err(e),
                        }
                    }
                    return Err(corrupt(&segment, format!("entry {position}: {why}")));
                }
            }
        }
    }

    /// [`AuditLog::read`], or the segment, position and reason of a frame that did not read.
    fn read_once(
        &self,
        from: u64,
        limit: usize,
        unpublished: bool,
    ) -> Result<Attempt<Vec<Frame>>, StoreError> {
        let from = from.max(self.start.load(Ordering::Acquire)).max(1);
        let last = if unpublished {
            u64::MAX
        } else {
            self.visible.load(Ordering::Acquire)
        };
        let segments: Vec<Arc<Segment>> = {
            let map = self.segments.read().map_err(poisoned)?;
            let begin = map.range(..=from).next_back().map_or(from, |(&k, _)| k);
            map.range(begin..).map(|(_, s)| s.clone()).collect()
        };
        let mut out = Vec::new();
        for segment in segments {
            if out.len() >= limit {
                break;
            }
            let mut position = from.max(segment.first);
            let mut reader = FrameReader::new(&segment.file);
            loop {
                if out.len() >= limit || position > last {
                    return Ok(Ok(out));
                }
                let want = (limit - out.len()).min(4096) as u64;
                let offsets = segment
                    .offsets
                    .read()
                    .map_err(poisoned)?
                    .read(position - segment.first, want)?;
                if offsets.is_empty() {
                    break;
                }
                for offset in offsets {
                    if out.len() >= limit || position > last {
                        return Ok(Ok(out));
                    }
                    if offset != NONE {
                        let why = match reader.frame_at(offset) {
                            Ok(Some((frame, _))) if frame.position == position => {
                                out.push(frame);
                                position += 1;
                                continue;
                            }
                            Ok(Some((frame, _))) => {
                                format!("stored as entry {} at offset {offset}", frame.position)
                            }
                            Ok(None) => format!("missing at offset {offset}"),
                            Err(why) => format!("{why} at offset {offset}"),
                        };
                        return Ok(Err(Unreadable {
                            segment: segment.clone(),
                            position,
                            why,
                        }));
                    }
                    position += 1;
                }
            }
        }
        Ok(Ok(out))
    }

    /// The last entry readers may see.
    pub fn head(&self) -> Result<Option<Frame>, StoreError> {
        let visible = self.visible.load(Ordering::Acquire);
        let start = self.start.load(Ordering::Acquire).max(1);
        if visible < start {
            return Ok(None);
        }
        if let Some(last) = self.read(visible, 1, false)?.pop() {
            return Ok(Some(last));
        }
        // Only the tamper tests leave gaps: step back over them a chunk at a time.
        let mut to = visible;
        while to >= start {
            let from = to.saturating_sub(255).max(start);
            if let Some(last) = self
                .read(from, usize::MAX, false)?
                .into_iter()
                .rfind(|f| f.position <= to)
            {
                return Ok(Some(last));
            }
            if from == start {
                break;
            }
            to = from - 1;
        }
        Ok(None)
    }

    /// Removes every entry after `position` (recovery only: nothing after it was acknowledged).
    pub fn truncate_after(&self, position: u64) -> Result<(), StoreError> {
        self.wait_for_seals();
        let mut tail = self.tail.lock().map_err(poisoned)?;
        let mut segments = self.segments.write().map_err(poisoned)?;
        let later: Vec<u64> = segments
            .range(position.saturating_add(1)..)
            .map(|(&k, _)| k)
            .collect();
        for first in later {
            if let Some(segment) = segments.remove(&first) {
                std::fs::remove_file(&segment.path).map_err(io)?;
                let _ = std::fs::remove_file(segment_path(&self.dir, first, "idx"));
                let _ = std::fs::remove_file(segment_path(&self.dir, first, "ndx"));
            }
        }
        if let Some(segment) = segments.values().next_back() {
            let mut offsets = scan(&segment.file, segment.first, None).offsets;
            let keep = (position + 1).saturating_sub(segment.first) as usize;
            let cut = offsets
                .get(keep..)
                .and_then(|rest| rest.iter().find(|&&o| o != NONE))
                .copied();
            offsets.truncate(keep);
            while offsets.last() == Some(&NONE) {
                offsets.pop();
            }
            let len = match cut {
                Some(offset) => offset,
                None => segment.file.metadata().map_err(io)?.len(),
            };
            segment.file.set_len(len).map_err(io)?;
            segment.file.sync_all().map_err(io)?;
            let _ = std::fs::remove_file(segment_path(&self.dir, segment.first, "idx"));
            let _ = std::fs::remove_file(segment_path(&self.dir, segment.first, "ndx"));
            let index = scan(&segment.file, segment.first, Some(&self.indexer)).index;
            *segment.offsets.write().map_err(poisoned)? = Offsets::Active(offsets);
            *segment.index.write().map_err(poisoned)? = index;
            tail.len = len;
        }
        sync_dir(&self.dir)?;
        tail.unsynced.clear();
        drop(segments);
        self.visible
            .store(self.last_position()?.unwrap_or(0), Ordering::Release);
        Ok(())
    }

    /// Deletes the segments whose every position is at or before `position` (pruned); the
    /// active segment stays.
    pub fn delete_through(&self, position: u64) -> Result<(), StoreError> {
        // A seal in progress would write index files for a segment deleted under it.
        self.wait_for_seals();
        let mut segments = self.segments.write().map_err(poisoned)?;
        let firsts: Vec<u64> = segments.keys().copied().collect();
        let mut deleted = false;
        for pair in firsts.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            if next - 1 > position {
                break;
            }
            if let Some(segment) = segments.remove(&first) {
                std::fs::remove_file(&segment.path).map_err(io)?;
                let _ = std::fs::remove_file(segment_path(&self.dir, first, "idx"));
                let _ = std::fs::remove_file(segment_path(&self.dir, first, "ndx"));
                deleted = true;
            }
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Bytes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            total += entry.map_err(io)?.metadata().map_err(io)?.len();
        }
        Ok(total)
    }

    /// Replaces the entry at `position` with `payload`, or removes it (`None`), rewriting its
    /// segment. Only for tests that tamper with a stopped server's trail.
    pub fn rewrite(&self, position: u64, payload: Option<&[u8]>) -> Result<(), StoreError> {
        self.wait_for_seals();
        let mut tail = self.tail.lock().map_err(poisoned)?;
        let segments = self.segments.read().map_err(poisoned)?;
        let Some((_, segment)) = segments.range(..=position).next_back() else {
            return Ok(());
        };
        let active = Arc::ptr_eq(segment, segments.values().next_back().unwrap_or(segment));
        let count = segment.count();
        let mut frames = Vec::new();
        let mut reader = FrameReader::new(&segment.file);
        for (i, offset) in segment
            .offsets
            .read()
            .map_err(poisoned)?
            .read(0, count)?
            .into_iter()
            .enumerate()
        {
            if offset == NONE {
                continue;
            }
            match reader.frame_at(offset) {
                Ok(Some((frame, _))) => frames.push(frame),
                _ => {
                    return Err(corrupt(
                        segment,
                        format!("entry {}", segment.first + i as u64),
                    ));
                }
            }
        }
        frames.retain(|f| f.position != position);
        if let Some(payload) = payload {
            frames.push(Frame {
                position,
                flags: 0,
                payload: payload.to_vec(),
                redo: Vec::new(),
            });
            frames.sort_by_key(|f| f.position);
        }
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        for frame in &frames {
            while segment.first + (offsets.len() as u64) < frame.position {
                offsets.push(NONE);
            }
            offsets.push(buf.len() as u64);
            encode_frame(
                &mut buf,
                NewFrame {
                    position: frame.position,
                    flags: frame.flags,
                    payload: &frame.payload,
                    redo: &frame.redo,
                    keys: None,
                },
            );
        }
        let mut index = SegmentIndex::new();
        for frame in &frames {
            index.add(
                (frame.position - segment.first) as u32,
                &(self.indexer)(&frame.payload),
            );
        }
        if !active {
            // A sealed segment keeps its positions.
            offsets.resize(count as usize, NONE);
        }
        segment.file.set_len(0).map_err(io)?;
        segment.file.write_all_at(&buf, 0).map_err(io)?;
        segment.file.sync_all().map_err(io)?;
        let mut held = segment.offsets.write().map_err(poisoned)?;
        if active {
            tail.len = buf.len() as u64;
            *held = Offsets::Active(offsets);
        } else {
            let count = offsets.len() as u64;
            let file = write_index(&self.dir, segment.first, &offsets)?;
            *held = Offsets::Sealed { file, count };
            let path = segment_path(&self.dir, segment.first, "ndx");
            index = index.seal(&path).map_err(index_error)?;
        }
        drop(held);
        *segment.index.write().map_err(poisoned)? = index;
        drop(segments);
        self.visible
            .store(self.last_position()?.unwrap_or(0), Ordering::Release);
        Ok(())
    }
}

impl Drop for AuditLog {
    /// A seal in progress finishes before the trail is closed: a store reopened in the same
    /// process must not find its files half written.
    fn drop(&mut self) {
        self.wait_for_seals();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn payload(position: u64) -> Vec<u8> {
        format!("entry {position} {}", "x".repeat((position % 50) as usize)).into_bytes()
    }

    /// Even positions carry a redo part.
    fn redo(position: u64) -> Vec<u8> {
        if position.is_multiple_of(2) {
            position.to_be_bytes().to_vec()
        } else {
            Vec::new()
        }
    }

    fn frame<'a>(position: u64, payload: &'a [u8], redo: &'a [u8]) -> NewFrame<'a> {
        NewFrame {
            position,
            flags: (position % 2) as u8,
            payload,
            redo,
            keys: None,
        }
    }

    /// Index keys from a test payload: its position modulo 3 and modulo 7.
    fn keys_of(position: u64) -> Vec<Vec<u8>> {
        vec![
            format!("m3-{}", position % 3).into_bytes(),
            format!("m7-{}", position % 7).into_bytes(),
        ]
    }

    fn test_indexer() -> Indexer {
        Arc::new(|payload: &[u8]| {
            let text = String::from_utf8_lossy(payload);
            match text.split(' ').nth(1).and_then(|p| p.parse::<u64>().ok()) {
                Some(position) => keys_of(position),
                None => Vec::new(),
            }
        })
    }

    /// Every index key of the test payloads, looked up from `from`, against the entries read.
    fn check_lookups(log: &AuditLog, from: u64) {
        let read = positions(log, from);
        for key in (0..3)
            .map(|i| format!("m3-{i}"))
            .chain((0..7).map(|i| format!("m7-{i}")))
        {
            let expected: Vec<u64> = read
                .iter()
                .copied()
                .filter(|&p| keys_of(p).contains(&key.clone().into_bytes()))
                .collect();
            assert_eq!(
                log.lookup(key.as_bytes(), from, usize::MAX).unwrap(),
                expected,
                "{key} from {from}"
            );
            let two = log.lookup(key.as_bytes(), from, 2).unwrap();
            assert_eq!(two, expected[..expected.len().min(2)], "{key} from {from}");
        }
    }

    fn append(log: &AuditLog, positions: std::ops::Range<u64>) {
        let payloads: Vec<(u64, Vec<u8>, Vec<u8>)> =
            positions.map(|p| (p, payload(p), redo(p))).collect();
        let frames: Vec<NewFrame<'_>> = payloads.iter().map(|(p, b, r)| frame(*p, b, r)).collect();
        log.append(&frames).unwrap();
        log.sync().unwrap();
        log.publish(payloads.last().unwrap().0);
    }

    /// Appends `positions` in groups of `group` (a segment is full only between appends, so
    /// groups let small segments fill and seal).
    fn append_in_groups(log: &AuditLog, positions: std::ops::Range<u64>, group: u64) {
        let end = positions.end;
        for first in positions.step_by(group as usize) {
            append(log, first..(first + group).min(end));
        }
    }

    fn positions(log: &AuditLog, from: u64) -> Vec<u64> {
        log.read(from, usize::MAX, false)
            .unwrap()
            .into_iter()
            .map(|f| {
                assert_eq!(f.payload, payload(f.position));
                assert_eq!(f.redo, redo(f.position));
                assert_eq!(f.flags, (f.position % 2) as u8);
                f.position
            })
            .collect()
    }

    #[test]
    fn entries_read_back_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 1000, test_indexer()).unwrap();
        assert_eq!(log.next_position().unwrap(), 1);
        assert_eq!(log.head().unwrap(), None);
        for chunk in 0..20 {
            append(&log, 1 + chunk * 10..11 + chunk * 10);
        }
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("log".as_ref()))
            .count();
        assert!(segments > 3, "{segments} segments");
        assert_eq!(positions(&log, 0), (1..=200).collect::<Vec<_>>());
        assert_eq!(positions(&log, 137), (137..=200).collect::<Vec<_>>());
        for from in [0, 1, 55, 137, 200, 201] {
            check_lookups(&log, from);
        }
        assert_eq!(log.read(50, 3, false).unwrap().len(), 3);
        // Unpublished entries are the writer's only.
        log.append(&[frame(201, &payload(201), &[])]).unwrap();
        assert_eq!(log.head().unwrap().unwrap().position, 200);
        assert_eq!(log.read(201, 1, true).unwrap()[0].position, 201);
        drop(log);
        let log = AuditLog::open(dir.path(), 1000, test_indexer()).unwrap();
        assert_eq!(log.next_position().unwrap(), 202);
        check_lookups(&log, 0);
        assert_eq!(positions(&log, 190), (190..=201).collect::<Vec<_>>());
        append(&log, 202..205);
        assert_eq!(log.head().unwrap().unwrap().position, 204);
    }

    #[test]
    fn a_torn_tail_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
        append(&log, 1..6);
        drop(log);
        let path = segment_path(dir.path(), 1, "log");
        let full = std::fs::metadata(&path).unwrap().len();
        // Half a frame, as a kill in the middle of a write leaves it.
        let mut torn = Vec::new();
        let (body, extra) = (payload(6), redo(6));
        encode_frame(&mut torn, frame(6, &body, &extra));
        let file = open_file(&path, false).unwrap();
        file.write_all_at(&torn[..torn.len() / 2], full).unwrap();
        let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
        assert_eq!(positions(&log, 0), (1..6).collect::<Vec<_>>());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full);
        append(&log, 6..8);
        assert_eq!(positions(&log, 0), (1..8).collect::<Vec<_>>());
        // A flipped byte in the last frame: it is not a frame.
        drop(log);
        let len = std::fs::metadata(&path).unwrap().len();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, len - 2).unwrap();
        file.write_all_at(&[byte[0] ^ 1], len - 2).unwrap();
        let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
        assert_eq!(positions(&log, 0), (1..7).collect::<Vec<_>>());
    }

    /// The files of the segments in `dir`, in order.
    pub(crate) fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension() == Some("log".as_ref()))
            .collect();
        logs.sort();
        logs
    }

    fn flip(path: &Path, at: u64) {
        let file = open_file(path, false).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    }

    fn damage_of(result: Result<AuditLog, StoreError>) -> TrailDamage {
        match result {
            Err(StoreError::TrailDamaged(damage)) => *damage,
            Err(e) => panic!("expected damage, got {e}"),
            Ok(_) => panic!("expected damage, the trail opened"),
        }
    }

    #[test]
    fn a_bad_frame_with_valid_frames_after_it_is_damage_not_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
        append_in_groups(&log, 1..31, 3);
        drop(log);
        let path = segment_path(dir.path(), 1, "log");
        let len = std::fs::metadata(&path).unwrap().len();
        flip(&path, len / 3);
        let damage = damage_of(AuditLog::open(dir.path(), 1 << 20, test_indexer()));
        assert!(
            damage
                .location
                .contains("00000000000000000001.log at offset"),
            "{damage}"
        );
        assert!(damage.reason.contains("a valid entry follows"), "{damage}");
        assert!((5..15).contains(&damage.first_lost), "{damage}");
        // Nothing was cut: the evidence stays for the operator.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(
            AuditLog::find_damage(dir.path(), 1, 0).unwrap(),
            Some(damage.clone())
        );

        // A repair keeps the entries before the damage and copies the files aside.
        let quarantine = dir.path().join("q");
        let copied = AuditLog::cut_before(dir.path(), damage.first_lost, &quarantine).unwrap();
        assert_eq!(copied, vec![quarantine.join("00000000000000000001.log")]);
        assert_eq!(std::fs::metadata(&copied[0]).unwrap().len(), len);
        let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
        assert_eq!(
            positions(&log, 0),
            (1..damage.first_lost).collect::<Vec<_>>()
        );
        assert_eq!(AuditLog::find_damage(dir.path(), 1, 0).unwrap(), None);
    }

    #[test]
    fn a_bad_last_frame_the_records_reflect_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
        append(&log, 1..6);
        drop(log);
        let path = segment_path(dir.path(), 1, "log");
        let len = std::fs::metadata(&path).unwrap().len();
        flip(&path, len - 2);
        let damage = damage_of(AuditLog::open_acknowledged(
            dir.path(),
            1 << 20,
            test_indexer(),
            5,
        ));
        assert_eq!(damage.first_lost, 5, "{damage}");
        assert!(damage.reason.contains("acknowledged"), "{damage}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        // Not acknowledged: a torn write, cut.
        let log = AuditLog::open_acknowledged(dir.path(), 1 << 20, test_indexer(), 4).unwrap();
        assert_eq!(positions(&log, 0), (1..5).collect::<Vec<_>>());
    }

    #[test]
    fn a_truncated_or_missing_sealed_segment_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        append_in_groups(&log, 1..80, 4);
        drop(log);
        let logs = segment_files(dir.path());
        assert!(logs.len() >= 4, "{logs:?}");
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }

        // Cut short by a few bytes (inside its last frame).
        let len = std::fs::metadata(&logs[1]).unwrap().len();
        open_file(&logs[1], false)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let damage = damage_of(AuditLog::open(dir.path(), 300, test_indexer()));
        assert!(
            damage.location.starts_with(&*logs[1].to_string_lossy()),
            "{damage}"
        );

        // A middle segment deleted.
        let dir = copy;
        let logs = segment_files(dir.path());
        std::fs::remove_file(&logs[2]).unwrap();
        let damage = damage_of(AuditLog::open(dir.path(), 300, test_indexer()));
        assert!(damage.reason.contains("are missing"), "{damage}");
        let second: u64 = logs[2]
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .parse()
            .unwrap();
        assert_eq!(damage.first_lost, second);
        assert_eq!(
            AuditLog::find_damage(dir.path(), 1, 0)
                .unwrap()
                .map(|d| d.first_lost),
            Some(second)
        );
        // The first segment gone: the trail starts late.
        std::fs::remove_file(&logs[0]).unwrap();
        let found = AuditLog::find_damage(dir.path(), 1, 0).unwrap().unwrap();
        assert_eq!(found.first_lost, 1, "{found}");
    }

    #[test]
    fn damage_inside_a_sealed_segment_stops_appends_once_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        append_in_groups(&log, 1..60, 4);
        drop(log);
        let logs = segment_files(dir.path());
        let len = std::fs::metadata(&logs[1]).unwrap().len();
        flip(&logs[1], len / 2);
        // Open checks only the ends of sealed segments.
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        log.publish(59);
        assert_eq!(log.damage(), None);
        // A reader finds it...
        assert!(matches!(
            log.read(0, usize::MAX, false),
            Err(StoreError::Corrupt { .. })
        ));
        let found = log.damage().expect("marked damaged");
        assert!(
            found.location.starts_with(&*logs[1].to_string_lossy()),
            "{found}"
        );
        // ... and appends stop.
        let (p, r) = (payload(60), redo(60));
        assert!(matches!(
            log.append(&[frame(60, &p, &r)]),
            Err(StoreError::TrailDamaged(_))
        ));
        // So does the scrub, without a reader.
        drop(log);
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        let scrubbed = log.scrub(&AtomicBool::new(false)).unwrap();
        assert_eq!(scrubbed, Some(found));
        assert!(log.damage().is_some());
    }

    #[test]
    fn a_damaged_offset_file_is_written_again_from_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        append_in_groups(&log, 1..60, 4);
        drop(log);
        let idx = segment_path(dir.path(), 1, "idx");
        // An offset in the middle: open does not see it, a reader does.
        flip(&idx, 8 * 3);
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        log.publish(59);
        assert_eq!(positions(&log, 0), (1..60).collect::<Vec<_>>());
        assert_eq!(log.damage(), None);
        // Its length: open sees it.
        drop(log);
        open_file(&idx, false).unwrap().set_len(8).unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        log.publish(59);
        assert_eq!(positions(&log, 0), (1..60).collect::<Vec<_>>());
        assert_eq!(log.scrub(&AtomicBool::new(false)).unwrap(), None);
    }

    #[test]
    fn a_segment_that_cannot_be_started_fails_the_append_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        append_in_groups(&log, 1..20, 4);
        let next = log.next_position().unwrap();
        let mut p = next;
        // Fill the active segment, then make its successor's file impossible to create.
        while log.tail.lock().unwrap().len < 300 {
            append(&log, p..p + 1);
            p += 1;
        }
        let blocker = segment_path(dir.path(), p, "log");
        std::fs::create_dir(&blocker).unwrap();
        let (body, extra) = (payload(p), redo(p));
        assert!(matches!(
            log.append(&[frame(p, &body, &extra)]),
            Err(StoreError::Transient(_))
        ));
        assert_eq!(log.next_position().unwrap(), p);
        std::fs::remove_dir(&blocker).unwrap();
        append(&log, p..p + 3);
        assert_eq!(positions(&log, 0), (1..p + 3).collect::<Vec<_>>());
        drop(log);
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        log.publish(p + 2);
        assert_eq!(positions(&log, 0), (1..p + 3).collect::<Vec<_>>());
    }

    #[test]
    fn truncation_and_deletion_keep_the_rest_readable() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 500, test_indexer()).unwrap();
        append_in_groups(&log, 1..60, 5);
        log.truncate_after(45).unwrap();
        assert_eq!(log.next_position().unwrap(), 46);
        assert_eq!(positions(&log, 0), (1..46).collect::<Vec<_>>());
        check_lookups(&log, 0);
        append(&log, 46..50);
        log.delete_through(30).unwrap();
        log.set_start(31);
        assert_eq!(positions(&log, 0), (31..50).collect::<Vec<_>>());
        check_lookups(&log, 0);
        let first_kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".log").map(|f| f.parse::<u64>().unwrap())
            })
            .min()
            .unwrap();
        assert!(first_kept > 1 && first_kept <= 31, "{first_kept}");
        drop(log);
        let log = AuditLog::open(dir.path(), 500, test_indexer()).unwrap();
        log.set_start(31);
        assert_eq!(positions(&log, 0), (31..50).collect::<Vec<_>>());
        check_lookups(&log, 40);
    }

    #[test]
    fn segments_seal_in_the_background_and_unsynced_frames_stay_for_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        append_in_groups(&log, 1..60, 4);
        // Readable and indexed at once, whether or not the seals are done.
        assert_eq!(positions(&log, 0), (1..60).collect::<Vec<_>>());
        check_lookups(&log, 0);
        log.wait_for_seals();
        let segments: Vec<Arc<Segment>> = log.segments.read().unwrap().values().cloned().collect();
        assert!(segments.len() >= 3, "{}", segments.len());
        let (active, sealed) = segments.split_last().unwrap();
        for segment in sealed {
            assert!(matches!(
                *segment.offsets.read().unwrap(),
                Offsets::Sealed { .. }
            ));
            assert!(matches!(
                *segment.index.read().unwrap(),
                SegmentIndex::Sealed { .. }
            ));
            assert!(segment_path(dir.path(), segment.first, "idx").exists());
            assert!(segment_path(dir.path(), segment.first, "ndx").exists());
        }
        assert!(matches!(
            *active.offsets.read().unwrap(),
            Offsets::Active(_)
        ));
        check_lookups(&log, 0);

        // Frames appended without a sync before the segment fills: the segment is handed to
        // its seal, and the next sync still covers it.
        let mut next = 60;
        while log.segments.read().unwrap().len() == segments.len() {
            let (p, r) = (payload(next), redo(next));
            log.append(&[frame(next, &p, &r)]).unwrap();
            next += 1;
        }
        let unsynced: Vec<u64> = log
            .tail
            .lock()
            .unwrap()
            .unsynced
            .iter()
            .map(|s| s.first)
            .collect();
        assert_eq!(unsynced.len(), 2, "{unsynced:?}");
        assert!(unsynced.contains(&active.first), "{unsynced:?}");
        log.sync().unwrap();
        assert!(log.tail.lock().unwrap().unsynced.is_empty());
        log.publish(next - 1);
        assert_eq!(positions(&log, 0), (1..next).collect::<Vec<_>>());
        drop(log);
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        log.publish(next - 1);
        assert_eq!(positions(&log, 0), (1..next).collect::<Vec<_>>());
        check_lookups(&log, 0);
    }

    #[test]
    fn missing_or_damaged_index_files_are_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        append_in_groups(&log, 1..80, 4);
        drop(log);
        let mut ndx: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension() == Some("ndx".as_ref()))
            .collect();
        ndx.sort();
        assert!(ndx.len() >= 3, "{ndx:?}");
        std::fs::remove_file(&ndx[0]).unwrap();
        let mut bytes = std::fs::read(&ndx[1]).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 0xff;
        std::fs::write(&ndx[1], &bytes).unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        assert!(ndx[0].exists());
        check_lookups(&log, 0);
        check_lookups(&log, 33);
        // A block in the middle: open does not read it; the lookup that does rebuilds it.
        drop(log);
        let mut bytes = std::fs::read(&ndx[2]).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&ndx[2], &bytes).unwrap();
        let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
        log.publish(79);
        check_lookups(&log, 0);
        assert_eq!(log.damage(), None);
    }

    #[test]
    fn rewritten_and_removed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 400, test_indexer()).unwrap();
        // Sealed segments (3 and 5) and the active one (39).
        append_in_groups(&log, 1..40, 5);
        log.rewrite(3, None).unwrap();
        log.rewrite(39, None).unwrap();
        log.rewrite(5, Some(b"other")).unwrap();
        let read = log.read(0, usize::MAX, false).unwrap();
        let at: Vec<u64> = read.iter().map(|f| f.position).collect();
        assert!(!at.contains(&3) && !at.contains(&39) && at.contains(&4));
        assert_eq!(
            read.iter().find(|f| f.position == 5).unwrap().payload,
            b"other"
        );
        assert_eq!(log.head().unwrap().unwrap().position, 38);
        let lookup = |key: &str| log.lookup(key.as_bytes(), 0, usize::MAX).unwrap();
        assert!(!lookup("m3-0").contains(&3) && lookup("m3-0").contains(&6));
        assert!(!lookup("m3-2").contains(&5) && lookup("m3-2").contains(&8));
        assert!(!lookup("m7-4").contains(&39) && lookup("m7-4").contains(&32));
        drop(log);
        let log = AuditLog::open(dir.path(), 400, test_indexer()).unwrap();
        let again: Vec<u64> = log
            .read(0, usize::MAX, false)
            .unwrap()
            .iter()
            .map(|f| f.position)
            .collect();
        assert_eq!(again, at);
        assert_eq!(log.next_position().unwrap(), 39);
    }
}
