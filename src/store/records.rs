//! The records a store holds, as every engine exchanges them: what an export yields, what an
//! import takes and what a backup file carries. They name no engine's keys.
//!
//! Each record has a kind's tag and bytes in the store codec (a mutable record with its
//! revision). Backups written before this form held one engine's keys and values (sled's, as
//! `codec.rs` lays them out); [`Record::from_engine_key`] reads those.

use super::codec;
use super::{MetaKey, StoreError};
use crate::model::{AuditAnchor, AuditRecord, EnvelopeRecord, Revision, SecretRecord};

/// One record of a store, engine-neutral. Leases are not records that travel: a restore
/// must not bring one back.
pub enum Record {
    /// A secret's record (or tombstone).
    Secret(SecretRecord),
    /// The envelope of one secret version.
    Envelope(EnvelopeRecord),
    /// A meta value: its key, revision and bytes.
    Meta(MetaKey, Revision, Vec<u8>),
    /// The audit chain's anchor: where the kept trail starts.
    Anchor(AuditAnchor),
    /// One audit entry; entries come in seq order.
    Audit(AuditRecord),
}

const SECRET: &[u8] = b"secret";
const ENVELOPE: &[u8] = b"envelope";
const ANCHOR: &[u8] = b"anchor";
const AUDIT: &[u8] = b"audit";
/// Followed by the meta key's name.
const META: &[u8] = b"meta/";

impl Record {
    /// The record's tag (its kind) and bytes.
    pub fn encode(&self) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        Ok(match self {
            Record::Secret(s) => (SECRET.to_vec(), codec::encode_record(s)?),
            Record::Envelope(e) => (ENVELOPE.to_vec(), codec::encode_record(e)?),
            Record::Meta(key, revision, value) => (
                [META, key.name().as_bytes()].concat(),
                [&revision.0.to_be_bytes()[..], value].concat(),
            ),
            Record::Anchor(anchor) => (ANCHOR.to_vec(), codec::encode(anchor)?),
            Record::Audit(entry) => (AUDIT.to_vec(), codec::encode(entry)?),
        })
    }

    /// Reads a record from its tag and bytes (see [`Record::encode`]).
    pub fn decode(tag: &[u8], bytes: &[u8]) -> Result<Record, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            key: format!("exported {}", String::from_utf8_lossy(tag)),
            reason: reason.into(),
        };
        Ok(match tag {
            SECRET => Record::Secret(codec::decode_record(tag, bytes)?),
            ENVELOPE => Record::Envelope(codec::decode_record(tag, bytes)?),
            ANCHOR => Record::Anchor(codec::decode(tag, bytes)?),
            AUDIT => Record::Audit(codec::decode(tag, bytes)?),
            _ => {
                let key = tag
                    .strip_prefix(META)
                    .and_then(|name| std::str::from_utf8(name).ok())
                    .and_then(MetaKey::named)
                    .ok_or_else(|| corrupt("unknown kind of record"))?;
                let (revision, value) = bytes
                    .split_first_chunk::<8>()
                    .ok_or_else(|| corrupt("no revision"))?;
                Record::Meta(key, Revision(u64::from_be_bytes(*revision)), value.to_vec())
            }
        })
    }

    /// Reads a record as an engine stored it under sled's key layout (`codec.rs`), which is
    /// what backups of format 1 hold. `None`: a key that carries nothing a store rebuilds
    /// from (the revision counter, meta revisions, the applied position, leases).
    pub fn from_engine_key(key: &[u8], value: &[u8]) -> Result<Option<Record>, StoreError> {
        let unknown = || StoreError::Corrupt {
            key: codec::describe_key(key),
            reason: "not a record a backup holds".into(),
        };
        let Some((&space, rest)) = key.split_first() else {
            return Err(unknown());
        };
        Ok(Some(match space {
            codec::SECRET => Record::Secret(codec::decode_record(key, value)?),
            codec::ENVELOPE => Record::Envelope(codec::decode_record(key, value)?),
            codec::AUDIT => Record::Audit(codec::decode(key, value)?),
            codec::META if key == codec::AUDIT_ANCHOR_META => {
                Record::Anchor(codec::decode(key, value)?)
            }
            codec::META
                if key == codec::REVISION_META
                    || key == codec::AUDIT_APPLIED_META
                    || key == codec::ACTIVITY_THROUGH_META
                    || key == codec::LEASES_THROUGH_META =>
            {
                return Ok(None);
            }
            codec::META => {
                let meta = std::str::from_utf8(rest)
                    .ok()
                    .and_then(MetaKey::named)
                    .ok_or_else(unknown)?;
                Record::Meta(meta, Revision(0), value.to_vec())
            }
            codec::META_REVISION
            | codec::LEASE
            | codec::LEASE_ID
            | codec::LEASE_EXPIRY
            | codec::ACTIVITY
            | codec::ACTIVITY_DAY => {
                return Ok(None);
            }
            _ => return Err(unknown()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite's secret `acme`/`k`, with revision `rev`.
    fn secret(rev: u64) -> SecretRecord {
        let mut s = crate::store::tests::secret("acme", "k");
        s.rev = Revision(rev);
        s
    }

    #[test]
    fn records_round_trip_with_their_revisions() {
        let records = [
            Record::Secret(secret(7)),
            Record::Meta(MetaKey::Keyring, Revision(3), b"state".to_vec()),
            Record::Anchor(AuditAnchor {
                seq: 9,
                hash: [1; 32],
                mac: [2; 32],
            }),
        ];
        for record in records {
            let (tag, bytes) = record.encode().unwrap();
            match (record, Record::decode(&tag, &bytes).unwrap()) {
                (Record::Secret(a), Record::Secret(b)) => {
                    assert_eq!((a.id, a.rev), (b.id, b.rev));
                    assert_eq!(b.rev, Revision(7));
                }
                (Record::Meta(k, r, v), Record::Meta(k2, r2, v2)) => {
                    assert_eq!((k, r, v), (k2, r2, v2))
                }
                (Record::Anchor(a), Record::Anchor(b)) => assert_eq!(a.seq, b.seq),
                _ => panic!("kind changed"),
            }
        }
        assert!(Record::decode(b"lease", b"\x01").is_err());
        assert!(Record::decode(b"meta/nope", &[0; 8]).is_err());
        assert!(Record::decode(b"meta/keyring", &[0; 7]).is_err());
    }

    #[test]
    fn engine_keys_of_older_backups_read_as_records() {
        let s = secret(0);
        let key = codec::secret_key(&s.tenant, &s.name);
        let stored = codec::encode_record(&secret(5)).unwrap();
        match Record::from_engine_key(&key, &stored).unwrap() {
            Some(Record::Secret(read)) => assert_eq!(read.rev, Revision(5)),
            _ => panic!("not a secret"),
        }
        let meta = codec::meta_key(MetaKey::AuditSeed);
        assert!(matches!(
            Record::from_engine_key(&meta, b"seed").unwrap(),
            Some(Record::Meta(MetaKey::AuditSeed, Revision(0), v)) if v == b"seed"
        ));
        for skipped in [
            codec::REVISION_META.to_vec(),
            codec::meta_revision_key(MetaKey::Keyring),
        ] {
            assert!(
                Record::from_engine_key(&skipped, &[0; 8])
                    .unwrap()
                    .is_none()
            );
        }
        assert!(Record::from_engine_key(b"mnot-a-meta", b"").is_err());
        assert!(Record::from_engine_key(b"", b"").is_err());
        assert!(Record::from_engine_key(b"Zzz", b"").is_err());
    }
}
