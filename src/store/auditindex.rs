//! The audit trail's indexes, one per segment: for each index key (an index and its value, see
//! `codec::audit_index_prefix`), the positions of the segment's entries that carry it.
//!
//! The active segment's index is a map in memory, filled as entries are appended and rebuilt
//! from the segment at open. When the segment is sealed the map is written, sorted by key, to
//! an `.ndx` file beside it, in blocks of about 4 KiB:
//!
//! ```text
//! block:     entries (key_len: u16 | key | count: u32 | count x position - first: u32), crc32: u32
//! directory: per block: key_len: u16 | first key | offset: u64 | len: u32
//! footer:    directory offset: u64 | directory len: u32 | directory crc32: u32 | magic: 8 bytes
//! ```
//!
//! Only the directory (a key per block: a few hundredths of the index) is held in memory for
//! a sealed segment; a lookup reads the one block that can hold its key. Indexes are derived
//! from the trail: a missing or damaged index file is rebuilt from its segment at open.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The index keys of an entry, from its stored record (none if it does not decode).
pub type Indexer = Arc<dyn Fn(&[u8]) -> Vec<Vec<u8>> + Send + Sync>;

const MAGIC: &[u8; 8] = b"byokdNX1";
const FOOTER: usize = 8 + 4 + 4 + 8;
const BLOCK_TARGET: usize = 4096;

/// A block of a sealed index: its first key and where it is.
pub struct BlockRef {
    first_key: Vec<u8>,
    offset: u64,
    len: u32,
}

/// One segment's index.
pub enum SegmentIndex {
    /// Key to positions relative to the segment's first, ascending.
    Active(HashMap<Vec<u8>, Vec<u32>>),
    Sealed {
        file: File,
        blocks: Vec<BlockRef>,
    },
}

impl SegmentIndex {
    pub fn new() -> Self {
        SegmentIndex::Active(HashMap::new())
    }

    /// Records that the entry at `relative` carries `keys` (active segments only; entries come
    /// in order).
    pub fn add(&mut self, relative: u32, keys: &[Vec<u8>]) {
        if let SegmentIndex::Active(map) = self {
            for key in keys {
                match map.get_mut(key.as_slice()) {
                    Some(positions) => {
                        if positions.last().is_none_or(|&last| last < relative) {
                            positions.push(relative);
                        }
                    }
                    None => {
                        map.insert(key.clone(), vec![relative]);
                    }
                }
            }
        }
    }

    /// Up to `limit` relative positions `>= from` of the entries carrying `key`, ascending.
    pub fn lookup(&self, key: &[u8], from: u32, limit: usize) -> Result<Vec<u32>, String> {
        let pick = |all: &[u32]| {
            let start = all.partition_point(|&p| p < from);
            let end = start.saturating_add(limit).min(all.len());
            all[start..end].to_vec()
        };
        let all = match self {
            SegmentIndex::Active(map) => {
                return Ok(map.get(key).map(|all| pick(all)).unwrap_or_default());
            }
            SegmentIndex::Sealed { file, blocks } => {
                let at = blocks.partition_point(|b| b.first_key.as_slice() <= key);
                let Some(block) = at.checked_sub(1).and_then(|i| blocks.get(i)) else {
                    return Ok(Vec::new());
                };
                let mut buf = vec![0u8; block.len as usize + 4];
                file.read_exact_at(&mut buf, block.offset)
                    .map_err(|e| e.to_string())?;
                let (body, crc) = buf.split_at(block.len as usize);
                if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap_or([0; 4])) {
                    return Err("index block checksum mismatch".into());
                }
                find_in_block(body, key)?.unwrap_or_default()
            }
        };
        Ok(pick(&all))
    }

    /// The index written to `path` (through a temporary file, synced, renamed) and held as
    /// sealed. Active indexes only.
    pub fn seal(&self, path: &Path) -> Result<SegmentIndex, String> {
        match self {
            SegmentIndex::Active(map) => write(path, map),
            SegmentIndex::Sealed { .. } => Err("index already sealed".into()),
        }
    }
}

impl Default for SegmentIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads `n` bytes at `*at` of `buf`, advancing.
fn take<'a>(buf: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = at.checked_add(n).ok_or("index entry out of range")?;
    let slice = buf.get(*at..end).ok_or("index entry out of range")?;
    *at = end;
    Ok(slice)
}

fn u16_at(buf: &[u8], at: &mut usize) -> Result<usize, String> {
    let b = take(buf, at, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn u32_at(buf: &[u8], at: &mut usize) -> Result<u32, String> {
    let b = take(buf, at, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(buf: &[u8], at: &mut usize) -> Result<u64, String> {
    let b = take(buf, at, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

/// The positions of `key` in a block, if it is there.
fn find_in_block(body: &[u8], key: &[u8]) -> Result<Option<Vec<u32>>, String> {
    let mut at = 0;
    while at < body.len() {
        let key_len = u16_at(body, &mut at)?;
        let entry_key = take(body, &mut at, key_len)?;
        let count = u32_at(body, &mut at)? as usize;
        let positions = take(
            body,
            &mut at,
            count.checked_mul(4).ok_or("count out of range")?,
        )?;
        match entry_key.cmp(key) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Greater => return Ok(None),
            std::cmp::Ordering::Equal => {
                return Ok(Some(
                    positions
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ));
            }
        }
    }
    Ok(None)
}

fn write(path: &Path, map: &HashMap<Vec<u8>, Vec<u32>>) -> Result<SegmentIndex, String> {
    let mut sorted: Vec<(&Vec<u8>, &Vec<u32>)> = map.iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    let mut blocks = Vec::new();
    let mut block_start = 0;
    let mut first_key: Option<&Vec<u8>> = None;
    let close_block =
        |out: &mut Vec<u8>, start: usize, first: &Vec<u8>, blocks: &mut Vec<BlockRef>| {
            let crc = crc32fast::hash(&out[start..]);
            blocks.push(BlockRef {
                first_key: first.clone(),
                offset: start as u64,
                len: (out.len() - start) as u32,
            });
            out.extend_from_slice(&crc.to_le_bytes());
        };
    for (key, positions) in sorted {
        if key.len() > u16::MAX as usize {
            continue;
        }
        if first_key.is_none() {
            first_key = Some(key);
            block_start = out.len();
        }
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(positions.len() as u32).to_le_bytes());
        for p in positions {
            out.extend_from_slice(&p.to_le_bytes());
        }
        if out.len() - block_start >= BLOCK_TARGET
            && let Some(first) = first_key.take()
        {
            close_block(&mut out, block_start, first, &mut blocks);
        }
    }
    if let Some(first) = first_key {
        close_block(&mut out, block_start, first, &mut blocks);
    }
    let directory_offset = out.len() as u64;
    let mut directory = Vec::new();
    for block in &blocks {
        directory.extend_from_slice(&(block.first_key.len() as u16).to_le_bytes());
        directory.extend_from_slice(&block.first_key);
        directory.extend_from_slice(&block.offset.to_le_bytes());
        directory.extend_from_slice(&block.len.to_le_bytes());
    }
    out.extend_from_slice(&directory);
    out.extend_from_slice(&directory_offset.to_le_bytes());
    out.extend_from_slice(&(directory.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&directory).to_le_bytes());
    out.extend_from_slice(MAGIC);

    let file = super::files::write_file_synced(path, &out).map_err(|e| e.to_string())?;
    Ok(SegmentIndex::Sealed { file, blocks })
}

/// Opens a sealed index file: its footer and directory (checked), not its blocks.
pub fn load(path: &Path) -> Result<SegmentIndex, String> {
    let io = |e: std::io::Error| e.to_string();
    let file = super::files::open_file(path, false).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len < FOOTER as u64 {
        return Err("index file too short".into());
    }
    let mut footer = [0u8; FOOTER];
    file.read_exact_at(&mut footer, len - FOOTER as u64)
        .map_err(io)?;
    if &footer[16..] != MAGIC {
        return Err("not an index file".into());
    }
    let mut at = 0;
    let directory_offset = u64_at(&footer, &mut at)?;
    let directory_len = u32_at(&footer, &mut at)? as u64;
    let directory_crc = u32_at(&footer, &mut at)?;
    if directory_offset + directory_len + FOOTER as u64 != len {
        return Err("index directory out of range".into());
    }
    let mut directory = vec![0u8; directory_len as usize];
    file.read_exact_at(&mut directory, directory_offset)
        .map_err(io)?;
    if crc32fast::hash(&directory) != directory_crc {
        return Err("index directory checksum mismatch".into());
    }
    let mut blocks = Vec::new();
    let mut at = 0;
    while at < directory.len() {
        let key_len = u16_at(&directory, &mut at)?;
        let first_key = take(&directory, &mut at, key_len)?.to_vec();
        let offset = u64_at(&directory, &mut at)?;
        let len = u32_at(&directory, &mut at)?;
        if offset + u64::from(len) + 4 > directory_offset {
            return Err("index block out of range".into());
        }
        blocks.push(BlockRef {
            first_key,
            offset,
            len,
        });
    }
    Ok(SegmentIndex::Sealed { file, blocks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_lookups_match_the_active_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut active = SegmentIndex::new();
        for rel in 0..20_000u32 {
            let keys = vec![
                format!("name-{:05}", rel % 7_000).into_bytes(),
                format!("tenant-{}", rel % 13).into_bytes(),
                b"principal".to_vec(),
            ];
            active.add(rel, &keys);
        }
        let path = dir.path().join("1.ndx");
        let sealed = active.seal(&path).unwrap();
        let reloaded = load(&path).unwrap();
        if let SegmentIndex::Sealed { blocks, .. } = &reloaded {
            assert!(blocks.len() > 10, "{} blocks", blocks.len());
        }
        for key in [
            "name-00000",
            "name-06999",
            "name-03500",
            "tenant-0",
            "tenant-12",
            "principal",
            "absent",
            "",
            "zzz",
        ] {
            for from in [0, 1, 9_999, 19_999, 25_000] {
                let expected = active.lookup(key.as_bytes(), from, usize::MAX).unwrap();
                let three = active.lookup(key.as_bytes(), from, 3).unwrap();
                assert_eq!(three, expected[..expected.len().min(3)]);
                assert_eq!(reloaded.lookup(key.as_bytes(), from, 3).unwrap(), three);
                assert_eq!(
                    sealed.lookup(key.as_bytes(), from, usize::MAX).unwrap(),
                    expected,
                    "{key} {from}"
                );
                assert_eq!(
                    reloaded.lookup(key.as_bytes(), from, usize::MAX).unwrap(),
                    expected,
                    "{key} {from}"
                );
            }
        }
        assert_eq!(
            active.lookup(b"principal", 0, usize::MAX).unwrap().len(),
            20_000
        );
        assert_eq!(
            active.lookup(b"name-00001", 0, usize::MAX).unwrap(),
            vec![1, 7_001, 14_001]
        );
    }

    #[test]
    fn damaged_index_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut active = SegmentIndex::new();
        for rel in 0..2_000u32 {
            active.add(rel, &[format!("k{}", rel % 300).into_bytes()]);
        }
        let path = dir.path().join("1.ndx");
        active.seal(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // A flipped byte in the directory or the footer: the file is not used.
        let mut bad = bytes.clone();
        let at = bad.len() - FOOTER - 3;
        bad[at] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(load(&path).is_err());
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(load(&path).is_err());
        // A flipped byte in a block: lookups there fail instead of answering wrongly.
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let index = load(&path).unwrap();
        assert!(index.lookup(b"k0", 0, 10).is_err());
    }
}
