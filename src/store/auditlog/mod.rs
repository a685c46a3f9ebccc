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
//! changes of the entry's transaction (see `SledStore`'s recovery). Positions increase
//! along the trail; a gap is an entry that is missing (only ever made by the tamper tests;
//! more than [`MAX_MISSING`] in one segment is damage). The active segment's file may end
//! with zeros: space the writer sets aside ahead of its appends ([`tail::SET_ASIDE`] at a time),
//! cut off when the segment is left or the trail closed; a scan takes zeros up to the end
//! of the file for the end of the frames. The writer appends to the last segment (the
//! active one) and starts a new one once it holds [`DEFAULT_SEGMENT_BYTES`]; the segment it
//! leaves is sealed on a thread of its own (`seal_in_background`: tens of milliseconds that
//! the commits waiting for the next append need not wait for): fsynced, with an index file
//! (`.idx`: one u64 LE offset per position, `u64::MAX` where there is no entry) and its
//! audit index (`.ndx`) written beside it and renamed into place. Until then readers use
//! the in-memory forms; a seal cut short by a crash is redone at open. The active segment's
//! index is kept in memory and rebuilt at open by reading the segment, which also cuts off
//! a frame torn by a crash. Readers never see past the position the writer last published,
//! nor before the first position kept after a prune.
//!
//! The rooms: this file (the trail's state, opening, appending, syncing, pruning),
//! `tail.rs` (the writer's end: writing a group's frames, the zeros set aside),
//! `frames.rs` (the frame encoding and scans), `segments.rs` (segment files, offsets,
//! sealing), `reads.rs` (reads and index lookups), `repair.rs` (damage, scrub, repair) and
//! `tests.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::auditindex::{Indexer, SegmentIndex};
use super::files::{create_private_dir, open_file};
use super::{StoreError, TrailDamage};

mod frames;
mod reads;
mod repair;
mod segments;
mod tail;

use self::frames::encode_frame;
use self::segments::{
    Offsets, Segment, list_segments, open_active, seal, sealed_index, sealed_offsets,
};
use self::tail::Tail;

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
/// The most positions one segment may lack (a gap: an entry removed, which only the tamper
/// tests do): a scan holds an offset in memory for each, so a frame further ahead is damage.
const MAX_MISSING: u64 = 1 << 16;
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

/// What a reader could not read: a frame (at `position`) or an index block of `segment`.
struct Unreadable {
    segment: Arc<Segment>,
    position: u64,
    why: String,
}

/// A read's result, or what it could not read.
type Attempt<T> = Result<T, Unreadable>;

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
        create_private_dir(dir).map_err(io)?;
        let firsts = list_segments(dir)?;
        let mut segments = BTreeMap::new();
        let (mut tail_len, mut allocated) = (0, 0);
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(dir, first, "log");
            let file = open_file(&path, false).map_err(io)?;
            let (offsets, index) = match firsts.get(i + 1) {
                None => {
                    let scan = open_active(dir, &file, first, &indexer, acknowledged)?;
                    tail_len = scan.valid;
                    allocated = file.metadata().map_err(io)?.len().max(tail_len);
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
            tail: Mutex::new(Tail::new(tail_len, allocated, segment_bytes.max(1))),
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
                if let Some(previous) = &previous {
                    // A sealed segment ends with its last frame: the zeros set aside go, for
                    // good, before its successor exists.
                    tail.give_back(previous).map_err(|e| {
                        StoreError::Transient(format!("audit log: cannot end a segment: {e}"))
                    })?;
                }
                // The new segment first: if it cannot be created (no file descriptor left,
                // say), nothing changed and the next append tries again.
                let segment = self.create_segment(first_position)?;
                tail.reset(0);
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
        tail.write(&active, &buf)?;
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
}

impl Drop for AuditLog {
    /// A seal in progress finishes before the trail is closed: a store reopened in the same
    /// process must not find its files half written. The active segment's zeros set aside
    /// are cut off.
    fn drop(&mut self) {
        self.wait_for_seals();
        // Closed, the active segment ends with its last frame too (a crash leaves the zeros
        // set aside, which the next open reads as the end).
        let active = self
            .segments
            .read()
            .ok()
            .and_then(|s| s.values().next_back().cloned());
        if let (Some(active), Ok(mut tail)) = (active, self.tail.lock())
            && let Err(e) = tail.give_back(&active)
        {
            tracing::warn!(error = %e, "could not cut the audit trail's space set aside at close");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
