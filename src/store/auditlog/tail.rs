//! The writer's end of the trail: where the active segment's frames end, the zeros set aside
//! after them, and how a group's frames are written there.
//!
//! - **Space set aside**: the writer adds [`SET_ASIDE`] bytes of zeros past the frames at a
//!   time, so that a sync writes the frames' pages alone, not the file's new size and block
//!   allocation as well. The zeros go around the page cache (`O_DIRECT`, where the file system
//!   takes it): one write to the device, not a copy into memory that the next sync then
//!   writes again.
//! - **Whole pages**: a group's frames are written with the rest of their pages (the part of
//!   the first page before them, kept in memory, and zeros after them), so that the kernel
//!   never reads a page of zeros back from the disk to complete it. The bytes before the
//!   frames are written again as they were: a write torn by a crash leaves them as they were.
//! - **No room**: where the file system refuses the room (a nearly full volume, a file size
//!   limit), frames are written alone at the end of the file until the next segment.
//!
//! The file's length is `allocated` at all times, and every byte between `len` and it is zero.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::io;
use super::segments::Segment;
use crate::store::StoreError;

/// Bytes of zeros the writer adds to the active segment's file at a time, ahead of its
/// appends (at most a segment's worth, in whole pages): a sync then writes the frames' pages
/// alone, not the file's new size and block allocation (`BENCHMARKS.md`, "Space set aside").
pub(super) const SET_ASIDE: u64 = 4 * 1024 * 1024;
/// The unit of the page cache (and a multiple of a block device's logical block): writes in
/// whole pages need no read, and writes around the cache are aligned to it.
const PAGE: u64 = 4096;
/// Zeros written at a time when setting space aside.
const ZEROS: usize = 256 * 1024;

/// The writer's end of the active segment.
pub(super) struct Tail {
    /// Bytes of frames in the active segment.
    pub(super) len: u64,
    /// Length of the active segment's file: its frames, then zeros set aside for the next.
    pub(super) allocated: u64,
    /// Segments appended to since the last sync.
    pub(super) unsynced: Vec<Arc<Segment>>,
    /// Whether to set space aside: not once the file system refused it, until the next
    /// segment.
    set_aside: bool,
    /// The file's bytes from the start of the page that holds `len` up to `len`, once read.
    page: Option<Vec<u8>>,
    /// The active segment opened around the page cache: `None` until tried, then the handle,
    /// or `None` inside if the file system does not take such writes.
    direct: Option<Option<File>>,
    /// Zeros to write from (one page more than [`ZEROS`], to start on a page boundary).
    zeros: Vec<u8>,
    /// Bytes set aside at a time: [`SET_ASIDE`], at most a segment's worth, in whole pages.
    pub(super) room: u64,
}

impl Tail {
    /// The end of an active segment with `len` bytes of frames in a file of `allocated`
    /// (at least `len`), in a trail of `segment_bytes` segments.
    pub(super) fn new(len: u64, allocated: u64, segment_bytes: u64) -> Self {
        Self {
            len,
            allocated,
            unsynced: Vec::new(),
            set_aside: true,
            page: None,
            direct: None,
            zeros: Vec::new(),
            room: SET_ASIDE.min(segment_bytes).div_ceil(PAGE) * PAGE,
        }
    }

    /// A new active segment, or the active one rewritten: its frames end at `len`, and so
    /// does its file.
    pub(super) fn reset(&mut self, len: u64) {
        self.len = len;
        self.allocated = len;
        self.set_aside = true;
        self.page = None;
        self.direct = None;
    }

    /// Cuts the zeros set aside off the active segment `segment`, durably.
    pub(super) fn give_back(&mut self, segment: &Segment) -> std::io::Result<()> {
        if self.allocated > self.len {
            segment.file.set_len(self.len)?;
            segment.file.sync_all()?;
            self.allocated = self.len;
        }
        Ok(())
    }

    /// Writes `frames` (whole frames) after the active segment's last, without syncing. On
    /// failure none of it counts: the frames end where they did, and so does the file.
    pub(super) fn write(&mut self, segment: &Segment, frames: &[u8]) -> Result<(), StoreError> {
        let end = self.len + frames.len() as u64;
        if self.set_aside {
            match self.write_pages(segment, frames) {
                Ok(()) => {
                    self.len = end;
                    return Ok(());
                }
                Err(e) => {
                    // Bytes that reached the file past `len` are overwritten or cut below.
                    tracing::debug!(error = %e, "no room to set aside in the audit trail's segment");
                    self.set_aside = false;
                    self.page = None;
                    segment.file.set_len(self.allocated).map_err(io)?;
                }
            }
        }
        if let Err(e) = segment.file.write_all_at(frames, self.len) {
            // Whatever reached the file goes, so that the next append starts at the same place.
            return match segment.file.set_len(self.len) {
                Ok(()) => {
                    self.allocated = self.len;
                    Err(StoreError::Transient(format!("audit log: {e}")))
                }
                Err(_) => Err(io(e)),
            };
        }
        self.len = end;
        self.allocated = self.allocated.max(end);
        Ok(())
    }

    /// Writes `frames` in whole pages, and sets space aside if that reached the end of the
    /// file. Fails if the file system refuses a page.
    fn write_pages(&mut self, segment: &Segment, frames: &[u8]) -> std::io::Result<()> {
        let from = self.len / PAGE * PAGE;
        let end = self.len + frames.len() as u64;
        let to = end.div_ceil(PAGE) * PAGE;
        let mut out = match self.page.take() {
            Some(page) => page,
            None => {
                let mut page = vec![0; (self.len - from) as usize];
                segment.file.read_exact_at(&mut page, from)?;
                page
            }
        };
        out.reserve((to - self.len) as usize);
        out.extend_from_slice(frames);
        out.resize((to - from) as usize, 0);
        segment.file.write_all_at(&out, from)?;
        if to > self.allocated {
            self.allocated = to;
            let room = self.room;
            if let Err(e) = self.add_zeros(segment, to, room) {
                // The frames are written; only the room is refused.
                tracing::debug!(error = %e, "no room to set aside in the audit trail's segment");
                self.set_aside = false;
                segment.file.set_len(to)?;
                return Ok(());
            }
            self.allocated = to + room;
        }
        // The last page's bytes up to the frames' end, for the next write.
        out.truncate((end - from) as usize);
        out.drain(..((end / PAGE * PAGE) - from) as usize);
        self.page = Some(out);
        Ok(())
    }

    /// Writes `room` bytes of zeros at `at` (both whole pages), around the page cache where
    /// the file system takes it.
    fn add_zeros(&mut self, segment: &Segment, at: u64, room: u64) -> std::io::Result<()> {
        if self.zeros.is_empty() {
            self.zeros = vec![0; ZEROS + PAGE as usize];
        }
        let start = self
            .zeros
            .as_ptr()
            .align_offset(PAGE as usize)
            .min(PAGE as usize);
        let zeros = &self.zeros[start..start + ZEROS];
        if self.direct.is_none() {
            self.direct = Some(open_direct(segment).ok());
        }
        let mut done = 0;
        while done < room {
            let n = (room - done).min(ZEROS as u64) as usize;
            let written = match self.direct.as_ref().and_then(Option::as_ref) {
                Some(file) => match file.write_all_at(&zeros[..n], at + done) {
                    // A file system that opens such a handle but refuses its writes (their
                    // alignment, say): through the page cache from here on.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                        self.direct = Some(None);
                        continue;
                    }
                    written => written,
                },
                None => segment.file.write_all_at(&zeros[..n], at + done),
            };
            written?;
            done += n as u64;
        }
        Ok(())
    }
}

/// The segment's file opened for writes around the page cache.
#[cfg(target_os = "linux")]
fn open_direct(segment: &Segment) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&segment.path)
}

/// Elsewhere the zeros go through the page cache.
#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Segment) -> std::io::Result<File> {
    Err(std::io::ErrorKind::Unsupported.into())
}
