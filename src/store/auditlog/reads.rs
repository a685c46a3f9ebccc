//! Reading the trail: entries by position, lookups in the audit index, the head.

use super::frames::FrameReader;
use super::segments::Segment;
use super::{Attempt, AuditLog, Frame, NONE, Unreadable, corrupt, poisoned};
use crate::store::StoreError;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl AuditLog {
    /// The segments that may hold positions `>= from`, in order.
    fn segments_from(&self, from: u64) -> Result<Vec<Arc<Segment>>, StoreError> {
        let map = self.segments.read().map_err(poisoned)?;
        let begin = map.range(..=from).next_back().map_or(from, |(&k, _)| k);
        Ok(map.range(begin..).map(|(_, s)| s.clone()).collect())
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
    pub(super) fn lookup_once(
        &self,
        key: &[u8],
        from: u64,
        limit: usize,
    ) -> Result<Attempt<Vec<u64>>, StoreError> {
        let from = from.max(self.start.load(Ordering::Acquire)).max(1);
        let last = self.visible.load(Ordering::Acquire);
        let segments = self.segments_from(from)?;
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
    pub(super) fn read_once(
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
        let segments = self.segments_from(from)?;
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
}
