//! Segments and their files: offsets (in memory, or the sealed segment's `.idx` file),
//! sealing, listing, and opening the active and the sealed segments.

use super::frames::{FrameReader, Scan, frame_after, scan};
use super::{NONE, index_error, io, poisoned, segment_path, sync_dir};
use crate::store::auditindex::{Indexer, SegmentIndex};
use crate::store::files::{open_file, write_file_synced};
use crate::store::{StoreError, TrailDamage, auditindex};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Where a segment's offsets are: on disk once sealed, in memory while active.
pub(super) enum Offsets {
    Sealed { file: File, count: u64 },
    Active(Vec<u64>),
}

impl Offsets {
    pub(super) fn count(&self) -> u64 {
        match self {
            Offsets::Sealed { count, .. } => *count,
            Offsets::Active(v) => v.len() as u64,
        }
    }

    /// Offsets of positions `first + from ..` up to `n` of them.
    pub(super) fn read(&self, from: u64, n: u64) -> Result<Vec<u64>, StoreError> {
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

pub(super) struct Segment {
    pub(super) first: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) offsets: RwLock<Offsets>,
    pub(super) index: RwLock<SegmentIndex>,
}

impl Segment {
    pub(super) fn count(&self) -> u64 {
        self.offsets.read().map_or(0, |o| o.count())
    }
}

/// The damage at `offset` of segment `first`.
pub(super) fn damage(
    dir: &Path,
    first: u64,
    offset: u64,
    reason: String,
    first_lost: u64,
) -> StoreError {
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
pub(super) fn gap(dir: &Path, first: u64, offset: u64, last: u64, next: u64) -> StoreError {
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

pub(super) fn write_index(dir: &Path, first: u64, offsets: &[u64]) -> Result<File, StoreError> {
    let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    let file = write_file_synced(&segment_path(dir, first, "idx"), &bytes).map_err(io)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Syncs a segment that takes no more entries and writes its index files. The files are
/// written under read locks (the segment no longer changes) and swapped in after, so that
/// readers are not held up meanwhile.
pub(super) fn seal(dir: &Path, segment: &Segment) -> Result<(), StoreError> {
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
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
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
pub(super) fn open_active(
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
pub(super) fn active_damage(
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
pub(super) fn sealed_offsets(
    dir: &Path,
    file: &File,
    first: u64,
    next: u64,
) -> Result<Offsets, StoreError> {
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
pub(super) fn complete_offsets(
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
pub(super) fn offsets_fit(
    idx: &File,
    file: &File,
    first: u64,
    expected: u64,
) -> Result<bool, StoreError> {
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
pub(super) fn sealed_index(
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
