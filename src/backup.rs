//! The backup file format: every store record except leases (values still sealed by their
//! data keys, data keys still wrapped by the master key), with the audit chain, in one
//! self-checking file.
//!
//! ```text
//! "BYOKDBAK" | format: u32 | header length: u32 | header (JSON)
//! { tag length: u32 | tag | value length: u32 | value }*
//! u32::MAX (end) | record count: u64 | SHA-256 of everything before it: 32 bytes
//! ```
//! All integers are big-endian. Format 2 holds the engine-neutral records of
//! [`crate::store::Record`] (a tag naming the kind, then its bytes), so that a backup of one
//! engine restores into any other. Format 1, written before, held sled's keys and values: it
//! is still read, as the same records. The format does no IO of its own: it reads and writes
//! any `Read`/`Write`.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::Record;

/// The first bytes of a backup.
pub const MAGIC: &[u8; 8] = b"BYOKDBAK";
/// The format this build writes.
pub const FORMAT: u32 = 2;
/// Backups written before the records were engine-neutral: sled's keys and values.
const FORMAT_ENGINE_KEYS: u32 = 1;
/// Largest key or value accepted when reading (a corrupt length must not allocate gigabytes).
const MAX_FIELD: u32 = 64 * 1024 * 1024;
const END: u32 = u32::MAX;

/// One entry of the file as it is framed: tag (or, in format 1, key) and value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Why a backup could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Not a byokd backup, or one of another format.
    #[error("not a byokd backup (format {0})")]
    Format(String),
    /// The file is cut short or altered.
    #[error("backup is truncated or corrupt: {0}")]
    Corrupt(String),
}

/// What a backup says about itself, stored at its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// The byokd version that took it.
    pub byokd_version: String,
    /// The newest audit entry it holds (0: none).
    pub audit_head_seq: u64,
    /// That entry's chain hash, hex (empty: none).
    pub audit_head_hash: String,
    /// Ids of the master keys its data keys are wrapped by: a restore needs them.
    pub master_key_ids: Vec<String>,
}

/// Writes a backup.
pub struct BackupWriter<W: Write> {
    out: W,
    hash: Sha256,
    records: u64,
}

impl<W: Write> BackupWriter<W> {
    /// Starts a backup with `header`.
    pub fn new(out: W, header: &BackupHeader) -> Result<Self, BackupError> {
        let header =
            serde_json::to_vec(header).map_err(|e| BackupError::Format(format!("header: {e}")))?;
        let mut writer = Self {
            out,
            hash: Sha256::new(),
            records: 0,
        };
        writer.put(MAGIC)?;
        writer.put(&FORMAT.to_be_bytes())?;
        writer.field(&header)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.hash.update(bytes);
        self.out.write_all(bytes)?;
        Ok(())
    }

    fn field(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| *l <= MAX_FIELD)
            .ok_or_else(|| BackupError::Format(format!("field of {} bytes", bytes.len())))?;
        self.put(&len.to_be_bytes())?;
        self.put(bytes)
    }

    /// Adds one record.
    pub fn record(&mut self, record: &Record) -> Result<(), BackupError> {
        let (tag, value) = record
            .encode()
            .map_err(|e| BackupError::Format(e.to_string()))?;
        self.entry(&tag, &value)
    }

    /// Adds one entry as it is framed (see [`BackupReader::next_entry`]).
    pub fn entry(&mut self, tag: &[u8], value: &[u8]) -> Result<(), BackupError> {
        self.field(tag)?;
        self.field(value)?;
        self.records += 1;
        Ok(())
    }

    /// Ends the backup; returns the output and the number of records.
    pub fn finish(mut self) -> Result<(W, u64), BackupError> {
        self.put(&END.to_be_bytes())?;
        let records = self.records;
        self.put(&records.to_be_bytes())?;
        let digest = self.hash.finalize_reset();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok((self.out, records))
    }
}

/// Reads a backup, checking its count and hash at the end: a record is only trustworthy once
/// [`BackupReader::next_record`] has returned `None` without error.
pub struct BackupReader<R: Read> {
    input: R,
    format: u32,
    hash: Sha256,
    records: u64,
    header: BackupHeader,
}

impl<R: Read> BackupReader<R> {
    /// Opens a backup and reads its header.
    pub fn new(input: R) -> Result<Self, BackupError> {
        let mut reader = Self {
            input,
            format: FORMAT,
            hash: Sha256::new(),
            records: 0,
            header: BackupHeader {
                created_at: String::new(),
                byokd_version: String::new(),
                audit_head_seq: 0,
                audit_head_hash: String::new(),
                master_key_ids: Vec::new(),
            },
        };
        let mut magic = [0; 8];
        reader.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(BackupError::Format("unknown".into()));
        }
        reader.format = reader.u32()?;
        if ![FORMAT, FORMAT_ENGINE_KEYS].contains(&reader.format) {
            return Err(BackupError::Format(reader.format.to_string()));
        }
        let len = reader.u32()?;
        let header = reader.field(len)?;
        reader.header = serde_json::from_slice(&header)
            .map_err(|e| BackupError::Corrupt(format!("header: {e}")))?;
        Ok(reader)
    }

    /// The backup's header.
    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                BackupError::Corrupt("truncated".into())
            } else {
                BackupError::Io(e)
            }
        })?;
        self.hash.update(&*buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut b = [0; 4];
        self.take(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn field(&mut self, len: u32) -> Result<Vec<u8>, BackupError> {
        if len > MAX_FIELD {
            return Err(BackupError::Corrupt(format!("field of {len} bytes")));
        }
        let mut buf = vec![0; len as usize];
        self.take(&mut buf)?;
        Ok(buf)
    }

    /// The file's format.
    pub fn format(&self) -> u32 {
        self.format
    }

    /// The next record, or `None` at the end once the count and hash check out. Entries of
    /// format 1 that carry no record (see [`Record::from_engine_key`]) are passed over.
    pub fn next_record(&mut self) -> Result<Option<Record>, BackupError> {
        while let Some((tag, value)) = self.next_entry()? {
            let record = if self.format == FORMAT_ENGINE_KEYS {
                Record::from_engine_key(&tag, &value)
            } else {
                Record::decode(&tag, &value).map(Some)
            };
            if let Some(record) = record.map_err(|e| BackupError::Corrupt(e.to_string()))? {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// The next entry as it is framed, or `None` at the end once the count and hash check
    /// out.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, BackupError> {
        let len = self.u32()?;
        if len == END {
            let mut count = [0; 8];
            self.take(&mut count)?;
            let expected = self.hash.finalize_reset();
            let mut digest = [0; 32];
            self.input
                .read_exact(&mut digest)
                .map_err(|_| BackupError::Corrupt("truncated".into()))?;
            if u64::from_be_bytes(count) != self.records {
                return Err(BackupError::Corrupt("record count does not match".into()));
            }
            if digest[..] != expected[..] {
                return Err(BackupError::Corrupt("checksum does not match".into()));
            }
            let mut rest = [0; 1];
            if self.input.read(&mut rest)? != 0 {
                return Err(BackupError::Corrupt("data after the end".into()));
            }
            return Ok(None);
        }
        let key = self.field(len)?;
        let len = self.u32()?;
        let value = self.field(len)?;
        self.records += 1;
        Ok(Some((key, value)))
    }

    /// Reads to the end, checking everything (each record decodes); returns the number of
    /// entries.
    pub fn verify(mut self) -> Result<u64, BackupError> {
        while self.next_record()?.is_some() {}
        Ok(self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Revision;
    use crate::store::MetaKey;

    fn header() -> BackupHeader {
        BackupHeader {
            created_at: "2026-11-25T00:00:00Z".into(),
            byokd_version: "test".into(),
            audit_head_seq: 7,
            audit_head_hash: "ab".repeat(32),
            master_key_ids: vec!["local:abc".into()],
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = BackupWriter::new(Vec::new(), &header()).unwrap();
        w.record(&Record::Meta(
            MetaKey::AuditSeed,
            Revision(4),
            b"seed".to_vec(),
        ))
        .unwrap();
        w.entry(b"a\x00\x01", b"").unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let mut r = BackupReader::new(&bytes[..]).unwrap();
        assert_eq!(r.header(), &header());
        assert_eq!(r.format(), FORMAT);
        assert!(matches!(
            r.next_record().unwrap(),
            Some(Record::Meta(MetaKey::AuditSeed, Revision(4), v)) if v == b"seed"
        ));
        assert_eq!(
            r.next_entry().unwrap(),
            Some((b"a\x00\x01".to_vec(), Vec::new()))
        );
        assert_eq!(r.next_entry().unwrap(), None);
        // The second entry is no record of format 2.
        let err = BackupReader::new(&bytes[..]).unwrap().verify();
        assert!(matches!(err, Err(BackupError::Corrupt(_))), "{err:?}");
    }

    /// A backup of format 1 (sled's keys, from the fuzz seeds: written by an earlier
    /// version) reads as records, and those records written as format 2 read back the same.
    #[test]
    fn a_format_1_backup_reads_as_the_records_format_2_holds() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/seeds/backup_file/three-secrets.bak"
        );
        let old = std::fs::read(path).unwrap();
        let mut reader = BackupReader::new(&old[..]).unwrap();
        assert_eq!(reader.format(), FORMAT_ENGINE_KEYS);
        let mut writer = BackupWriter::new(Vec::new(), reader.header()).unwrap();
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            writer.record(&record).unwrap();
            records.push(record.encode().unwrap());
        }
        let (new, count) = writer.finish().unwrap();
        let mut tags: Vec<_> = records.iter().map(|(t, _)| t.clone()).collect();
        tags.dedup();
        assert!(count >= 8 && tags.len() >= 4, "{count} {tags:?}");
        let mut reader = BackupReader::new(&new[..]).unwrap();
        assert_eq!(reader.format(), FORMAT);
        for want in records {
            let got = reader.next_record().unwrap().unwrap().encode().unwrap();
            assert_eq!(got, want);
        }
        assert!(reader.next_record().unwrap().is_none());
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_detected() {
        let check = |mut r: BackupReader<&[u8]>| -> Result<u64, BackupError> {
            while r.next_entry()?.is_some() {}
            Ok(r.records)
        };
        let bytes = sample();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            let result = BackupReader::new(&bad[..]).and_then(check);
            assert!(result.is_err(), "flipped byte {i} went unnoticed");
            let cut = BackupReader::new(&bytes[..i]).and_then(check);
            assert!(cut.is_err(), "truncation at {i} went unnoticed");
        }
        assert_eq!(BackupReader::new(&bytes[..]).and_then(check).unwrap(), 2);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(BackupReader::new(&longer[..]).and_then(check).is_err());
    }
}
