//! Damage and repair: damage found while the store runs (it stops appends), examining and
//! scrubbing segments, finding damage in a stopped trail and cutting it off (`byokd audit
//! repair`), recovery's truncation, and the tamper tests' rewrite.

use super::frames::{FrameReader, encode_frame, scan};
use super::segments::{
    Offsets, Segment, active_damage, complete_offsets, damage, list_segments, write_index,
};
use super::{
    AuditLog, Frame, NONE, NewFrame, corrupt, index_error, io, poisoned, segment_path, sync_dir,
};
use crate::store::auditindex::SegmentIndex;
use crate::store::files::{create_private_dir, open_file};
use crate::store::{StoreError, TrailDamage};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

impl AuditLog {
    /// The damage found since open, if any: appends are refused while there is some.
    pub fn damage(&self) -> Option<TrailDamage> {
        self.damage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records damage found while the store runs: from now on appends are refused.
    pub(super) fn mark_damaged(&self, found: TrailDamage) {
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

    /// The first position of the segment after `segment` (`None`: it is the active one).
    fn next_segment(&self, segment: &Segment) -> Result<Option<u64>, StoreError> {
        let segments = self.segments.read().map_err(poisoned)?;
        Ok(segments
            .range(segment.first + 1..)
            .next()
            .map(|(&first, _)| first))
    }

    /// Reads a segment whole and checks it against its offsets: damage is an error; offsets
    /// that do not fit a sound sealed segment are written again (they are derived from it):
    /// `Ok(true)` then.
    pub(super) fn examine(&self, segment: &Arc<Segment>) -> Result<bool, StoreError> {
        let Some(next) = self.next_segment(segment)? else {
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
    pub(super) fn reindex(&self, segment: &Arc<Segment>) -> Result<(), StoreError> {
        // A segment with a successor is sealed.
        let sealed = self.next_segment(segment)?.is_some();
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
        create_private_dir(quarantine).map_err(io)?;
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
            let found = scan(&segment.file, segment.first, None);
            let mut offsets = found.offsets;
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
                None => found.valid,
            };
            segment.file.set_len(len).map_err(io)?;
            segment.file.sync_all().map_err(io)?;
            let _ = std::fs::remove_file(segment_path(&self.dir, segment.first, "idx"));
            let _ = std::fs::remove_file(segment_path(&self.dir, segment.first, "ndx"));
            let index = scan(&segment.file, segment.first, Some(&self.indexer)).index;
            *segment.offsets.write().map_err(poisoned)? = Offsets::Active(offsets);
            *segment.index.write().map_err(poisoned)? = index;
            tail.reset(len);
        }
        sync_dir(&self.dir)?;
        tail.unsynced.clear();
        drop(segments);
        self.visible
            .store(self.last_position()?.unwrap_or(0), Ordering::Release);
        Ok(())
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
            tail.reset(buf.len() as u64);
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
