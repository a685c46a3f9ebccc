//! The audit hash chain: pure computation, no IO.
//!
//! Every audit entry carries `hash = HMAC-SHA256(K, prev_hash || canonical(entry))`, where
//! `prev_hash` is the previous entry's hash and K is the audit key. K is derived with HKDF
//! (label [`AUDIT_KEY_LABEL`]) from a random seed that only the master key can unwrap, never
//! from the data-key wrapping key. Editing, deleting, reordering or inserting an entry breaks
//! the chain at that entry for anyone holding K; an attacker without K cannot repair it.
//! Removing entries from the end is only detectable against a head recorded elsewhere.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::{self, KEY_LEN, SymmetricKey};
use crate::model::{
    AuditAnchor, AuditDraft, AuditRecord, ChainHash, PrincipalId, SecretName, TenantId, Time,
};

/// HKDF label of the audit key.
pub const AUDIT_KEY_LABEL: &[u8] = b"byokd/v1/audit-chain-key";
/// Domain label of an entry's canonical encoding.
const ENTRY_LABEL: &str = "byokd/v1/audit-entry";
/// Domain label of the anchor's MAC.
const ANCHOR_LABEL: &str = "byokd/v1/audit-anchor";

/// The `prev_hash` of the very first entry.
pub const GENESIS: ChainHash = [0; 32];

/// The key of the audit chain's HMACs.
pub struct ChainKey(Zeroizing<[u8; KEY_LEN]>);

impl ChainKey {
    /// Derives the audit key from the audit seed.
    pub fn derive(seed: &SymmetricKey) -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        let hkdf = Hkdf::<Sha256>::new(None, seed.expose_secret());
        if hkdf.expand(AUDIT_KEY_LABEL, key.as_mut()).is_err() {
            unreachable!("HKDF-SHA256 expands to 255 * 32 bytes; 32 always fit");
        }
        Self(key)
    }

    fn mac(&self, parts: &[&[u8]]) -> ChainHash {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()) else {
            unreachable!("HMAC takes keys of any length");
        };
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// The hash of an entry with sequence number `seq`, committed at `time`, following
    /// `prev_hash`.
    pub fn link(
        &self,
        prev_hash: &ChainHash,
        seq: u64,
        time: Time,
        entry: &AuditDraft,
    ) -> ChainHash {
        self.mac(&[prev_hash, &canonical(seq, time, entry)])
    }

    /// True if `record.hash` is right for its contents and its `prev_hash`.
    pub fn is_intact(&self, record: &AuditRecord) -> bool {
        let expected = self.link(&record.prev_hash, record.seq, record.time, &record.entry);
        // Not secret (the hash is stored in the clear), so no constant-time compare needed.
        expected == record.hash
    }

    /// An anchor at `seq` (the last pruned entry) with hash `hash`.
    pub fn anchor(&self, seq: u64, hash: ChainHash) -> AuditAnchor {
        AuditAnchor {
            seq,
            hash,
            mac: self.anchor_mac(seq, &hash),
        }
    }

    /// True if the anchor was made with this key.
    pub fn is_authentic(&self, anchor: &AuditAnchor) -> bool {
        self.anchor_mac(anchor.seq, &anchor.hash) == anchor.mac
    }

    fn anchor_mac(&self, seq: u64, hash: &ChainHash) -> ChainHash {
        self.mac(&[&crypto::associated_data(
            ANCHOR_LABEL,
            &[&seq.to_be_bytes(), hash],
        )])
    }
}

/// The canonical encoding of an entry: every field, length-prefixed, in a fixed order, so that
/// no two different entries encode alike. An absent optional field encodes as empty, which no
/// present value does (names, ids and versions are never empty).
pub fn canonical(seq: u64, time: Time, e: &AuditDraft) -> Vec<u8> {
    fn text(v: Option<&str>) -> &[u8] {
        v.unwrap_or_default().as_bytes()
    }
    let secret_id = e.secret_id.map(|id| *id.as_bytes());
    let version = e.version.map(u32::to_be_bytes);
    let lease_id = e.lease_id.map(|id| *id.as_bytes());
    crypto::associated_data(
        ENTRY_LABEL,
        &[
            &seq.to_be_bytes(),
            &time.as_micros().to_be_bytes(),
            text(e.principal.as_ref().map(PrincipalId::as_str)),
            text(e.peer.as_deref()),
            e.action.as_str().as_bytes(),
            text(e.tenant.as_ref().map(TenantId::as_str)),
            text(e.name.as_ref().map(SecretName::as_str)),
            secret_id.as_ref().map_or(&[][..], |id| &id[..]),
            version.as_ref().map_or(&[][..], |v| &v[..]),
            lease_id.as_ref().map_or(&[][..], |id| &id[..]),
            e.outcome.as_str().as_bytes(),
            e.reason.as_bytes(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, Outcome, PrincipalId, TenantId};

    fn key(byte: u8) -> ChainKey {
        ChainKey::derive(&SymmetricKey::from_slice(&[byte; 32]).unwrap())
    }

    fn entry() -> AuditDraft {
        let mut d = AuditDraft::new(
            Action::Get,
            Some(PrincipalId::parse("agent").unwrap()),
            Some("10.0.0.1:5".into()),
        );
        d.tenant = Some(TenantId::parse("acme").unwrap());
        d.version = Some(2);
        d
    }

    fn record(k: &ChainKey, prev: ChainHash, seq: u64, e: AuditDraft) -> AuditRecord {
        let time = Time::from_micros(seq as i64);
        AuditRecord {
            seq,
            time,
            hash: k.link(&prev, seq, time, &e),
            prev_hash: prev,
            entry: e,
        }
    }

    #[test]
    fn a_record_is_intact_until_any_field_changes() {
        let k = key(1);
        let r = record(&k, GENESIS, 1, entry());
        assert!(k.is_intact(&r));
        assert!(!key(2).is_intact(&r), "another key cannot vouch for it");
        type Edit = Box<dyn Fn(&mut AuditRecord)>;
        let edits: Vec<Edit> = vec![
            Box::new(|r| r.seq += 1),
            Box::new(|r| r.time = Time::from_micros(99)),
            Box::new(|r| r.prev_hash[0] ^= 1),
            Box::new(|r| r.entry.outcome = Outcome::Ok),
            Box::new(|r| r.entry.outcome = Outcome::NotFound),
            Box::new(|r| r.entry.principal = None),
            Box::new(|r| r.entry.peer = Some("10.0.0.2:5".into())),
            Box::new(|r| r.entry.action = Action::Store),
            Box::new(|r| r.entry.tenant = None),
            Box::new(|r| r.entry.version = Some(3)),
            Box::new(|r| r.entry.version = None),
            Box::new(|r| r.entry.reason = "x".into()),
        ];
        let changed = edits.iter().filter(|edit| {
            let mut copy = r.clone();
            edit(&mut copy);
            copy != r && !k.is_intact(&copy)
        });
        // Setting the outcome to its current value (Ok) is no change; every real edit is caught.
        assert_eq!(changed.count(), edits.len() - 1);
    }

    #[test]
    fn canonical_encoding_separates_fields() {
        let mut a = entry();
        a.tenant = Some(TenantId::parse("ab").unwrap());
        a.name = None;
        let mut b = entry();
        b.tenant = Some(TenantId::parse("a").unwrap());
        b.name = Some(crate::model::SecretName::parse("b").unwrap());
        assert_ne!(
            canonical(1, Time::from_micros(1), &a),
            canonical(1, Time::from_micros(1), &b)
        );
    }

    #[test]
    fn anchors_are_authenticated() {
        let k = key(1);
        let a = k.anchor(41, [7; 32]);
        assert!(k.is_authentic(&a));
        assert!(!key(2).is_authentic(&a));
        let moved = AuditAnchor {
            seq: 42,
            ..a.clone()
        };
        assert!(!k.is_authentic(&moved));
        let rehashed = AuditAnchor { hash: [8; 32], ..a };
        assert!(!k.is_authentic(&rehashed));
    }
}
