//! Key layout and record encoding shared by the storage adapters.
//!
//! Every record is one format byte followed by its postcard encoding; a mutable record (secret,
//! envelope, lease) has its revision, 8 bytes big-endian, between the two (format 2; records
//! of format 1, written before revisions, read as revision 0). Fields a record gained later
//! follow its body as an extension (a secret's `Lifecycle`), so that older records, and
//! backups of them, read as they are. Decoding re-runs the domain
//! types' validation, so a corrupted value is an error, never a panic or a bad value.
//! Keys start with one byte naming the keyspace; integers are big-endian so that byte order
//! is numeric order.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::activity::DayKey;
use super::{AuditIndex, MetaKey, StoreError};
use crate::model::{
    AuditRecord, EnvelopeRecord, LeaseRecord, Lifecycle, Revision, SecretId, SecretName,
    SecretRecord, TenantId, TokenHash,
};

/// Format byte of immutable records (audit entries, the anchor), and of mutable records
/// written before revisions.
const FORMAT_V1: u8 = 1;
/// Format byte of mutable records: a revision, then the record.
const FORMAT_V2: u8 = 2;

/// `s` tenant 0x00 name -> SecretRecord
pub const SECRET: u8 = b's';
/// `e` secret_id version -> EnvelopeRecord
pub const ENVELOPE: u8 = b'e';
/// `l` token_hash -> LeaseRecord
pub const LEASE: u8 = b'l';
/// `i` lease_id -> token_hash: stores before the leases' indexes were kept in memory
pub const LEASE_ID: u8 = b'i';
/// `x` expires_at token_hash -> (): stores before the leases' indexes were kept in memory
pub const LEASE_EXPIRY: u8 = b'x';
/// The keyspaces of the lease indexes that older stores kept in the tree (removed at open).
pub const LEGACY_LEASE_INDEX_SPACES: [u8; 2] = [LEASE_ID, LEASE_EXPIRY];
/// `a` seq -> AuditRecord: stores before the trail had its own files, and backups
pub const AUDIT: u8 = b'a';
/// `m` name -> bytes
pub const META: u8 = b'm';
/// `r` name -> revision of the meta value `name` (u64 big-endian; absent: 0)
pub const META_REVISION: u8 = b'r';
/// Index keys (the trail's indexes, see `auditindex.rs`; older stores kept them in the
/// tree, each with a seq appended):
/// `N` tenant 0x00 name 0x00 (audit entries by secret)
pub const AUDIT_BY_SECRET: u8 = b'N';
/// `T` tenant 0x00 (audit entries by tenant)
pub const AUDIT_BY_TENANT: u8 = b'T';
/// `P` principal 0x00 (audit entries by principal)
pub const AUDIT_BY_PRINCIPAL: u8 = b'P';
/// `R` peer host 0x00 (audit entries by peer host)
pub const AUDIT_BY_PEER: u8 = b'R';
/// Audit index postings of stores before the trail had its own indexes (removed at open).
pub const AUDIT_POSTINGS: u8 = b'Q';
/// The keyspaces of audit index keys that older stores kept in the tree (removed at open).
pub const LEGACY_INDEX_SPACES: [u8; 5] = [
    AUDIT_BY_SECRET,
    AUDIT_BY_TENANT,
    AUDIT_BY_PRINCIPAL,
    AUDIT_BY_PEER,
    AUDIT_POSTINGS,
];
/// `c` secret_id -> Counted<SecretActivity>: a secret's use (sled; see `activity.rs`)
pub const ACTIVITY: u8 = b'c';
/// `d` tenant 0x00 day secret_id principal -> Counted<DayValue>: a day bucket (sled)
pub const ACTIVITY_DAY: u8 = b'd';
/// The meta key of the last audit position whose entries the tree's activity rows count
/// (u64 big-endian; absent in stores made before they were kept, whose first open counts the
/// whole trail).
pub const ACTIVITY_THROUGH_META: &[u8] = b"mactivity-through";
/// The meta key of the audit chain's anchor.
pub const AUDIT_ANCHOR_META: &[u8] = b"maudit-anchor";
/// The meta key of the last audit position whose transaction's records the tree holds
/// (u64 big-endian), written in every batch that goes with audit entries.
pub const AUDIT_APPLIED_META: &[u8] = b"maudit-applied";
/// The meta key of the last audit position through which the tree holds every lease change
/// (u64 big-endian; sled keeps later ones in memory, and recovery applies them again from
/// the trail; absent in stores made before, which wrote them with every group).
pub const LEASES_THROUGH_META: &[u8] = b"mleases-through";
/// The meta key of the largest revision assigned (u64 big-endian), written with (and, where
/// writes are not atomic, before) the records that carry it.
pub const REVISION_META: &[u8] = b"mrevision";

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    // Room for an audit record (a few hundred bytes), so that the encoding seldom grows it.
    let mut out = Vec::with_capacity(512);
    out.push(FORMAT_V1);
    postcard::to_io(value, &mut out).map_err(|e| StoreError::Engine(format!("encode: {e}")))?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            postcard::from_bytes(body).map_err(|e| corrupt(key, format!("undecodable: {e}")))
        }
        Some((other, _)) => Err(corrupt(key, format!("unknown format {other}"))),
        None => Err(corrupt(key, "empty".to_string())),
    }
}

fn corrupt(key: &[u8], reason: String) -> StoreError {
    StoreError::Corrupt {
        key: describe_key(key),
        reason,
    }
}

/// A mutable record: it carries the revision the store assigned it.
pub trait Revisioned: Serialize + DeserializeOwned {
    /// The record's revision.
    fn revision(&self) -> Revision;
    /// Sets the record's revision (when read).
    fn set_revision(&mut self, revision: Revision);

    /// Appends the record's extension (fields added after its first format), if it has one
    /// to keep.
    fn encode_extension(&self, _out: &mut Vec<u8>) -> Result<(), StoreError> {
        Ok(())
    }
    /// Reads the record's extension from the bytes after its body (empty: none).
    fn decode_extension(&mut self, _key: &[u8], _bytes: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
}

macro_rules! revisioned {
    ($($t:ty),*) => {$(
        impl Revisioned for $t {
            fn revision(&self) -> Revision {
                self.rev
            }
            fn set_revision(&mut self, revision: Revision) {
                self.rev = revision;
            }
        }
    )*};
}
revisioned!(EnvelopeRecord, LeaseRecord);

/// The first byte of a secret's extension, [`Lifecycle`] (postcard) after it.
const SECRET_EXTENSION_V1: u8 = 1;

/// A secret's extension is its [`Lifecycle`], written only when it is not the default: a
/// secret that uses none of it is stored exactly as before the extension existed.
impl Revisioned for SecretRecord {
    fn revision(&self) -> Revision {
        self.rev
    }
    fn set_revision(&mut self, revision: Revision) {
        self.rev = revision;
    }
    fn encode_extension(&self, out: &mut Vec<u8>) -> Result<(), StoreError> {
        if self.life != Lifecycle::default() {
            out.push(SECRET_EXTENSION_V1);
            postcard::to_io(&self.life, out)
                .map_err(|e| StoreError::Engine(format!("encode: {e}")))?;
        }
        Ok(())
    }
    fn decode_extension(&mut self, key: &[u8], bytes: &[u8]) -> Result<(), StoreError> {
        self.life = match bytes.split_first() {
            None => Lifecycle::default(),
            Some((&SECRET_EXTENSION_V1, life)) => postcard::from_bytes(life)
                .map_err(|e| corrupt(key, format!("undecodable extension: {e}")))?,
            Some((other, _)) => return Err(corrupt(key, format!("unknown extension {other}"))),
        };
        Ok(())
    }
}

/// A mutable record with its revision (format 2): the revision, the record, its extension.
pub fn encode_record<T: Revisioned>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_V2);
    out.extend_from_slice(&value.revision().0.to_be_bytes());
    postcard::to_io(value, &mut out).map_err(|e| StoreError::Engine(format!("encode: {e}")))?;
    value.encode_extension(&mut out)?;
    Ok(out)
}

/// A mutable record and its revision, of either format.
pub fn decode_record<T: Revisioned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let (revision, body) = split_revision(key, bytes)?;
    let (mut value, rest): (T, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| corrupt(key, format!("undecodable: {e}")))?;
    value.decode_extension(key, rest)?;
    value.set_revision(revision);
    Ok(value)
}

/// The revision of a stored mutable record, without decoding the record.
pub fn stored_revision(key: &[u8], bytes: &[u8]) -> Result<Revision, StoreError> {
    split_revision(key, bytes).map(|(revision, _)| revision)
}

fn split_revision<'a>(key: &[u8], bytes: &'a [u8]) -> Result<(Revision, &'a [u8]), StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => Ok((Revision(0), body)),
        Some((&FORMAT_V2, rest)) => match rest.split_first_chunk::<8>() {
            Some((revision, body)) => Ok((Revision(u64::from_be_bytes(*revision)), body)),
            None => Err(corrupt(key, "truncated revision".to_string())),
        },
        Some((other, _)) => Err(corrupt(key, format!("unknown format {other}"))),
        None => Err(corrupt(key, "empty".to_string())),
    }
}

/// A revision as a meta value or counter (u64 big-endian).
pub fn decode_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(key, "not a 64-bit number".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// A loggable description of a key: its keyspace and length, never its contents (which
/// include tenant and secret names, fine to log, but also token hashes).
pub fn describe_key(key: &[u8]) -> String {
    let space = match key.first() {
        Some(&SECRET) => "secret",
        Some(&ENVELOPE) => "envelope",
        Some(&LEASE) => "lease",
        Some(&LEASE_ID) => "lease-id",
        Some(&LEASE_EXPIRY) => "lease-expiry",
        Some(&AUDIT) => "audit",
        Some(&META) => "meta",
        Some(&META_REVISION) => "meta-revision",
        Some(&AUDIT_BY_SECRET | &AUDIT_BY_TENANT | &AUDIT_BY_PRINCIPAL | &AUDIT_BY_PEER) => {
            "audit-index"
        }
        Some(&AUDIT_POSTINGS) => "audit-postings",
        Some(&ACTIVITY) => "activity",
        Some(&ACTIVITY_DAY) => "activity-day",
        _ => "unknown",
    };
    format!("{space} key ({} bytes)", key.len())
}

pub fn activity_key(secret_id: SecretId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(ACTIVITY);
    k.extend_from_slice(secret_id.as_bytes());
    k
}

/// The day buckets of `tenant` from `day` on (see [`activity_day_key`]).
pub fn activity_day_prefix(tenant: &TenantId, day: Option<i64>) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tenant.as_str().len() + 8);
    k.push(ACTIVITY_DAY);
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(0);
    if let Some(day) = day {
        // The sign bit flipped: byte order is numeric order for negative days too.
        k.extend_from_slice(&((day as u64) ^ (1 << 63)).to_be_bytes());
    }
    k
}

pub fn activity_day_key(key: &DayKey) -> Vec<u8> {
    let mut k = activity_day_prefix(&key.tenant, Some(key.day));
    k.extend_from_slice(key.secret_id.as_bytes());
    k.extend_from_slice(key.principal.as_bytes());
    k
}

/// The bucket a day key names (`None`: not a day key).
pub fn activity_day_of_key(key: &[u8]) -> Option<DayKey> {
    let rest = key.strip_prefix(&[ACTIVITY_DAY])?;
    let sep = rest.iter().position(|b| *b == 0)?;
    let tenant = TenantId::parse(std::str::from_utf8(&rest[..sep]).ok()?).ok()?;
    let rest = &rest[sep + 1..];
    let day = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) ^ (1 << 63);
    let secret_id = SecretId::from_bytes(rest.get(8..24)?.try_into().ok()?);
    let principal = std::str::from_utf8(rest.get(24..)?).ok()?.to_string();
    Some(DayKey {
        tenant,
        day: day as i64,
        secret_id,
        principal,
    })
}

pub fn secret_prefix(tenant: &TenantId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tenant.as_str().len());
    k.push(SECRET);
    k.extend_from_slice(tenant.as_str().as_bytes());
    // Names and tenants never contain 0x00, so this separator keeps tenants apart.
    k.push(0);
    k
}

pub fn secret_key(tenant: &TenantId, name: &SecretName) -> Vec<u8> {
    let mut k = secret_prefix(tenant);
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

pub fn envelope_prefix(secret_id: SecretId) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.push(ENVELOPE);
    k.extend_from_slice(secret_id.as_bytes());
    k
}

pub fn envelope_key(secret_id: SecretId, version: u32) -> Vec<u8> {
    let mut k = envelope_prefix(secret_id);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Version number at the end of an envelope key.
pub fn envelope_key_version(key: &[u8]) -> Option<u32> {
    let tail: [u8; 4] = key.get(17..21)?.try_into().ok()?;
    Some(u32::from_be_bytes(tail))
}

pub fn lease_key(hash: &TokenHash) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(LEASE);
    k.extend_from_slice(&hash.0);
    k
}

pub fn audit_key(seq: u64) -> [u8; 9] {
    let mut k = [AUDIT; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The key of one index value in the trail's indexes.
pub fn audit_index_prefix(index: &AuditIndex) -> Vec<u8> {
    match index {
        AuditIndex::Secret(t, n) => index_key(AUDIT_BY_SECRET, &[t.as_str(), n.as_str()]),
        AuditIndex::Tenant(t) => index_key(AUDIT_BY_TENANT, &[t.as_str()]),
        AuditIndex::Principal(p) => index_key(AUDIT_BY_PRINCIPAL, &[p.as_str()]),
        AuditIndex::PeerHost(h) => index_key(AUDIT_BY_PEER, &[h.as_str()]),
    }
}

/// The keyspace byte, then each part followed by 0x00 (names, ids and peer addresses never
/// contain it).
fn index_key(space: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(space);
    for part in parts {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

/// The index prefixes (see [`audit_index_prefix`]) an audit record belongs to, built from
/// its fields as they are (a writer builds them for every entry).
pub fn audit_index_prefixes(record: &AuditRecord) -> Vec<Vec<u8>> {
    let e = &record.entry;
    let mut keys = Vec::with_capacity(4);
    if let Some(tenant) = &e.tenant {
        if let Some(name) = &e.name {
            keys.push(index_key(
                AUDIT_BY_SECRET,
                &[tenant.as_str(), name.as_str()],
            ));
        }
        keys.push(index_key(AUDIT_BY_TENANT, &[tenant.as_str()]));
    }
    if let Some(p) = &e.principal {
        keys.push(index_key(AUDIT_BY_PRINCIPAL, &[p.as_str()]));
    }
    if let Some(peer) = &e.peer {
        keys.push(index_key(AUDIT_BY_PEER, &[&crate::model::peer_host(peer)]));
    }
    keys
}

pub fn meta_key(key: MetaKey) -> Vec<u8> {
    let mut k = vec![META];
    k.extend_from_slice(key.name().as_bytes());
    k
}

pub fn meta_revision_key(key: MetaKey) -> Vec<u8> {
    let mut k = vec![META_REVISION];
    k.extend_from_slice(key.name().as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let key = secret_key(
            &TenantId::parse("t").unwrap(),
            &SecretName::parse("n").unwrap(),
        );
        for bytes in [
            &[][..],
            &[9, 1, 2][..],
            &[FORMAT_V1][..],
            &[FORMAT_V1, 0xff, 0xff][..],
        ] {
            let err = decode::<crate::model::SecretRecord>(&key, bytes).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        }
        for bytes in [
            &[][..],
            &[9, 1, 2][..],
            &[FORMAT_V2, 0, 0, 0][..],
            &[FORMAT_V2, 0, 0, 0, 0, 0, 0, 0, 7, 0xff][..],
        ] {
            let err = decode_record::<SecretRecord>(&key, bytes).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        }
    }

    /// A secret without lifecycle settings is stored as before they existed (so older
    /// records, and backups of them, read as they are); one with them keeps them all.
    #[test]
    fn a_secret_extension_is_written_only_when_needed() {
        let plain = crate::store::tests::secret("t", "n");
        let bytes = encode_record(&plain).unwrap();
        let mut old = vec![FORMAT_V2];
        old.extend_from_slice(&plain.rev.0.to_be_bytes());
        old.extend_from_slice(&postcard::to_stdvec(&plain).unwrap());
        assert_eq!(bytes, old);
        assert_eq!(decode_record::<SecretRecord>(b"s", &bytes).unwrap(), plain);
        let full = crate::store::tests::with_life(plain);
        let bytes = encode_record(&full).unwrap();
        assert_eq!(decode_record::<SecretRecord>(b"s", &bytes).unwrap(), full);
        let mut unknown = old.clone();
        unknown.push(9);
        let err = decode_record::<SecretRecord>(b"s", &unknown).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let truncated = &bytes[..bytes.len() - 1];
        assert!(decode_record::<SecretRecord>(b"s", truncated).is_err());
    }

    #[test]
    fn tenant_prefixes_do_not_overlap() {
        let a = secret_prefix(&TenantId::parse("ab").unwrap());
        let b = secret_key(
            &TenantId::parse("a").unwrap(),
            &SecretName::parse("b").unwrap(),
        );
        assert!(!b.starts_with(&a));
    }
}
