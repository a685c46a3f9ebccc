//! Frames: their encoding, and reading them from a segment file: the scans that find where a
//! segment ends, and whether it ends torn or damaged.

use super::{Frame, HEADER, MAX_MISSING, MAX_PAYLOAD, NONE, NewFrame, READ_CHUNK, io};
use crate::store::StoreError;
use crate::store::auditindex::{Indexer, SegmentIndex};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Appends one frame to `out`.
pub(super) fn encode_frame(out: &mut Vec<u8>, frame: NewFrame<'_>) {
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
pub(super) fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
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
pub(super) struct FrameReader<'a> {
    pub(super) file: &'a File,
    pub(super) buf: Vec<u8>,
    pub(super) at: u64,
    pub(super) chunk: usize,
}

impl<'a> FrameReader<'a> {
    pub(super) fn new(file: &'a File) -> Self {
        Self {
            file,
            buf: Vec::new(),
            at: 0,
            chunk: 4096,
        }
    }

    /// The frame at `offset`, `Ok(None)` at the end of the file, `Err(reason)` where the bytes
    /// are not a frame (or the file ends inside one).
    pub(super) fn frame_at(&mut self, offset: u64) -> Result<Option<(Frame, usize)>, String> {
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

    pub(super) fn fill(&mut self, offset: u64, len: usize) -> Result<(), String> {
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
pub(super) struct Scan {
    /// Offsets by position (from the segment's first), [`NONE`] where there is no entry.
    pub(super) offsets: Vec<u64>,
    /// Length of the valid prefix.
    pub(super) valid: u64,
    /// The segment's index (when asked for).
    pub(super) index: SegmentIndex,
    /// Where the valid prefix ends short of the end of the file (but for zeros to the end:
    /// space set aside), and why.
    pub(super) bad: Option<BadFrame>,
}

/// Bytes that are not the next frame.
pub(super) struct BadFrame {
    pub(super) offset: u64,
    pub(super) reason: String,
    /// A valid frame, but out of order: never the result of a torn write.
    pub(super) out_of_order: bool,
}

/// Reads every valid frame of a segment from its start, up to the end of the file or the
/// first bytes that are not the next frame. With `indexer`, also builds the segment's index.
pub(super) fn scan(file: &File, first: u64, indexer: Option<&Indexer>) -> Scan {
    let mut reader = FrameReader::new(file);
    let mut offsets = Vec::new();
    let mut index = SegmentIndex::new();
    let mut at = 0u64;
    let mut missing = 0u64;
    let bad = loop {
        match reader.frame_at(at) {
            Ok(None) => break None,
            // Zeros from here to the end: space the writer set aside, not yet written.
            Err(_) if zeros_to_end(file, at) => break None,
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
                missing = missing.saturating_add(frame.position - expected);
                if missing > MAX_MISSING {
                    // Each missing position costs a slot in memory that no byte of the file
                    // pays for: a position far ahead is damage, not a gap to pad.
                    break Some(BadFrame {
                        offset: at,
                        reason: format!(
                            "entry {} where entry {expected} belongs: more than \
                             {MAX_MISSING} entries missing from the segment",
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

/// Whether every byte of `file` from `offset` to its end is zero (the space the writer sets
/// aside ahead of its appends, see `AuditLog::append`). False if it cannot be read.
pub(super) fn zeros_to_end(file: &File, offset: u64) -> bool {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut at = offset;
    loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => return true,
            Ok(n) if buf[..n].iter().all(|&b| b == 0) => at += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// The offset of a valid frame of position `expected` or later that starts after `offset`,
/// if any. A bad frame with valid frames after it is damage; without, it is the last write,
/// torn by a crash.
pub(super) fn frame_after(
    file: &File,
    offset: u64,
    expected: u64,
) -> Result<Option<u64>, StoreError> {
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
