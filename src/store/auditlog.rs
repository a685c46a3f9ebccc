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
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::StoreError;
use super::auditindex::{self, Indexer, SegmentIndex};

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

pub(super) fn open_file(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .open(path)
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

/// Reads every valid frame of a segment from its start: the offsets by position (from
/// `first`), and the length of the valid prefix (a torn or corrupt tail is not part of it).
/// With `indexer`, also the segment's index.
fn scan(file: &File, first: u64, indexer: Option<&Indexer>) -> (Vec<u64>, u64, SegmentIndex) {
    let mut reader = FrameReader::new(file);
    let mut offsets = Vec::new();
    let mut index = SegmentIndex::new();
    let mut at = 0u64;
    while let Ok(Some((frame, len))) = reader.frame_at(at) {
        let expected = first + offsets.len() as u64;
        if frame.position < expected {
            break;
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
    (offsets, at, index)
}

/// Writes `bytes` to `path` through `<path>.tmp` (synced, then renamed over `path`; a leftover
/// `.tmp` is removed at open). The caller syncs the directory.
pub(super) fn write_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut file = open_file(Path::new(&tmp), true)?;
    file.set_len(0)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(file)
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

impl AuditLog {
    /// Opens (or creates) the trail in `dir`, cutting off a torn tail; `indexer` gives the
    /// index keys of a stored record.
    pub fn open(dir: &Path, segment_bytes: u64, indexer: Indexer) -> Result<Self, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
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
                // Left by a seal that did not finish: the seal is redone below.
                std::fs::remove_file(dir.join(&*name)).map_err(io)?;
            }
        }
        firsts.sort_unstable();
        let mut segments = BTreeMap::new();
        let mut tail_len = 0;
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(dir, first, "log");
            let file = open_file(&path, false).map_err(io)?;
            let last = i + 1 == firsts.len();
            let idx_path = segment_path(dir, first, "idx");
            let ndx_path = segment_path(dir, first, "ndx");
            let (offsets, index) = if last {
                // The active segment: its index files were never written; a crash may have
                // torn its last frame.
                let _ = std::fs::remove_file(&idx_path);
                let _ = std::fs::remove_file(&ndx_path);
                let (offsets, valid, index) = scan(&file, first, Some(&indexer));
                if file.metadata().map_err(io)?.len() > valid {
                    file.set_len(valid).map_err(io)?;
                    file.sync_all().map_err(io)?;
                }
                tail_len = valid;
                (Offsets::Active(offsets), index)
            } else {
                let offsets = match open_file(&idx_path, false) {
                    Ok(idx) => {
                        let count = idx.metadata().map_err(io)?.len() / 8;
                        Offsets::Sealed { file: idx, count }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let (offsets, _, _) = scan(&file, first, None);
                        let count = offsets.len() as u64;
                        let idx = write_index(dir, first, &offsets)?;
                        Offsets::Sealed { file: idx, count }
                    }
                    Err(e) => return Err(io(e)),
                };
                let index = match auditindex::load(&ndx_path) {
                    Ok(index) => index,
                    Err(why) => {
                        // Derived from the segment: rebuild it.
                        if ndx_path.exists() {
                            tracing::warn!(
                                segment = first,
                                why,
                                "rebuilding a damaged audit index"
                            );
                        }
                        let (_, _, index) = scan(&file, first, Some(&indexer));
                        let sealed = index.seal(&ndx_path).map_err(index_error)?;
                        sync_dir(dir)?;
                        sealed
                    }
                };
                (offsets, index)
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
        };
        log.visible
            .store(log.last_position()?.unwrap_or(0), Ordering::Release);
        Ok(log)
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
                if let Some(previous) = previous {
                    // If frames of it are not synced yet it stays in `unsynced`: the next
                    // `sync` covers them, whether or not the seal has got that far.
                    self.seal_in_background(previous)?;
                }
                let segment = self.create_segment(first_position)?;
                tail.len = 0;
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
        active.file.write_all_at(&buf, tail.len).map_err(io)?;
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

    fn create_segment(&self, first: u64) -> Result<Arc<Segment>, StoreError> {
        let path = segment_path(&self.dir, first, "log");
        let file = open_file(&path, true).map_err(io)?;
        file.set_len(0).map_err(io)?;
        sync_dir(&self.dir)?;
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
    fn seal_in_background(&self, segment: Arc<Segment>) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let mut sealers = self.sealers.lock().map_err(poisoned)?;
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
            })
            .map_err(io)?;
        sealers.push(spawned);
        Ok(())
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
            let found = segment
                .index
                .read()
                .map_err(poisoned)?
                .lookup(key, relative, limit - out.len())
                .map_err(|why| corrupt(&segment, format!("index: {why}")))?;
            for relative in found {
                let position = segment.first + u64::from(relative);
                if position > last || out.len() >= limit {
                    break;
                }
                out.push(position);
            }
        }
        Ok(out)
    }

    /// Up to `limit` frames at positions `>= from`, in order, among those readers may see
    /// (`unpublished`: the writer's view, everything appended).
    pub fn read(
        &self,
        from: u64,
        limit: usize,
        unpublished: bool,
    ) -> Result<Vec<Frame>, StoreError> {
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
                    return Ok(out);
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
                        return Ok(out);
                    }
                    if offset != NONE {
                        let frame = match reader.frame_at(offset) {
                            Ok(Some((frame, _))) => frame,
                            Ok(None) => {
                                return Err(corrupt(
                                    &segment,
                                    format!("entry {position} is missing"),
                                ));
                            }
                            Err(why) => {
                                return Err(corrupt(&segment, format!("entry {position}: {why}")));
                            }
                        };
                        if frame.position != position {
                            return Err(corrupt(
                                &segment,
                                format!("entry {position} is stored as {}", frame.position),
                            ));
                        }
                        out.push(frame);
                    }
                    position += 1;
                }
            }
        }
        Ok(out)
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
            let (mut offsets, _, _) = scan(&segment.file, segment.first, None);
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
            let (_, _, index) = scan(&segment.file, segment.first, Some(&self.indexer));
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
mod tests {
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
