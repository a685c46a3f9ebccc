//! What `open` checks and repairs after a crash: the trail against the records (the position
//! they reflect, the prune anchor), lease changes applied again from the trail, and the
//! revision counter; then the usage the records hold.

use crate::model::{AuditAnchor, EnvelopeRecord, LeaseRecord, Revision};
use crate::store::auditlog::{self, AuditLog};
use crate::store::codec::{self};
use crate::store::commit::Change;
use crate::store::usage::{Tally, Usage, UsageKey};
use crate::store::{MetaKey, StoreError, TrailDamage};

use super::leases::Overlay;
use super::{Pending, batch_of, engine, stage_lease};

/// [`LeaseRedoRef`] read back (the same encoding).
#[derive(serde::Deserialize)]
pub(super) enum LeaseRedo {
    Put(LeaseRecord),
    Update(LeaseRecord),
    Delete(LeaseRecord),
    PutAt(u64, LeaseRecord),
    UpdateAt(u64, LeaseRecord),
}

impl LeaseRedo {
    /// The change, and the revision it carries.
    fn into_change(self) -> (Change, u64) {
        let at = |revision: u64, mut lease: LeaseRecord| {
            lease.rev = Revision(revision);
            lease
        };
        match self {
            LeaseRedo::Put(l) => (Change::NewLease(l), 0),
            LeaseRedo::Update(l) => (Change::UpdateLease(l), 0),
            LeaseRedo::Delete(l) => (Change::DeleteLease(l), 0),
            LeaseRedo::PutAt(r, l) => (Change::NewLease(at(r, l)), r),
            LeaseRedo::UpdateAt(r, l) => (Change::UpdateLease(at(r, l)), r),
        }
    }
}

/// The last audit position whose transaction's records the tree holds (0: none recorded).
pub(super) fn applied_position(tree: &sled::Tree) -> Result<u64, StoreError> {
    stored_u64(tree, codec::AUDIT_APPLIED_META)
}

/// The number (u64 big-endian) kept under `key`; 0 if there is none.
fn stored_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(stored_mark(tree, key)?.unwrap_or(0))
}

/// The number (u64 big-endian) kept under `key`, if there is one.
pub(super) fn stored_mark(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>, StoreError> {
    match tree.get(key).map_err(engine)? {
        Some(bytes) => codec::decode_u64(key, &bytes).map(Some),
        None => Ok(None),
    }
}

/// A meta value and its revision (0 for a value written before revisions).
pub(super) fn meta_value(
    tree: &sled::Tree,
    key: MetaKey,
) -> Result<Option<(Revision, sled::IVec)>, StoreError> {
    let Some(value) = tree.get(codec::meta_key(key)).map_err(engine)? else {
        return Ok(None);
    };
    Ok(Some((meta_revision(tree, key)?, value)))
}

/// The revision of a meta value (0: absent, or written before revisions).
pub(super) fn meta_revision(tree: &sled::Tree, key: MetaKey) -> Result<Revision, StoreError> {
    stored_u64(tree, &codec::meta_revision_key(key)).map(Revision)
}

/// The largest revision assigned (0: none recorded).
pub(super) fn stored_revision(tree: &sled::Tree) -> Result<Revision, StoreError> {
    stored_u64(tree, codec::REVISION_META).map(Revision)
}

/// The chain's anchor, if entries were ever pruned.
pub(super) fn anchor(tree: &sled::Tree) -> Result<Option<AuditAnchor>, StoreError> {
    match tree.get(codec::AUDIT_ANCHOR_META).map_err(engine)? {
        Some(bytes) => Ok(Some(codec::decode(codec::AUDIT_ANCHOR_META, &bytes)?)),
        None => Ok(None),
    }
}

/// The first entry the trail must hold: the one after the prune anchor.
pub(super) fn expected_first(anchor: Option<&AuditAnchor>) -> u64 {
    anchor.map_or(1, |a| a.seq + 1)
}

/// The trail starts where the anchor says: a first segment that starts later is missing.
pub(super) fn check_trail_start(
    log: &AuditLog,
    anchor: Option<&AuditAnchor>,
) -> Result<(), StoreError> {
    let expected = expected_first(anchor);
    match log.first_position()? {
        Some(first) if first > expected => Err(StoreError::TrailDamaged(Box::new(TrailDamage {
            location: format!("{} (its start)", log.dir().display()),
            reason: format!(
                "the trail starts at entry {first}, but entries from {expected} on were never pruned (a segment is missing)"
            ),
            first_lost: expected,
        }))),
        _ => Ok(()),
    }
}

/// Recovers after a crash. Entries after `applied` are from groups whose records sled lost:
/// lease changes carried in their frames are applied again; at the first entry whose
/// transaction changed other records, the trail is cut: that group was never answered, nor
/// was anything after it (see the module documentation). Audit-only entries before it stay.
/// Entries from the tree's lease position (`mleases-through`) through `applied` were answered,
/// but their lease changes were kept in memory (`leases.rs`): they are applied again too.
pub(super) fn recover_trail(
    db: &sled::Db,
    tree: &sled::Tree,
    log: &AuditLog,
    applied: u64,
) -> Result<(), StoreError> {
    let last = log.last_position()?;
    if last.unwrap_or(0) < applied {
        let end = last.map_or(1, |l| l + 1);
        return Err(StoreError::TrailDamaged(Box::new(TrailDamage {
            location: format!("{} (its end)", log.dir().display()),
            reason: format!(
                "the trail ends before entry {end}, but the records reflect entries through {applied}"
            ),
            first_lost: end,
        })));
    }
    // Stores made before lease changes were kept in memory wrote them with every group.
    let leases_through = stored_mark(tree, codec::LEASES_THROUGH_META)?;
    let Some(last) = last else {
        if leases_through.is_none() {
            tree.insert(codec::LEASES_THROUGH_META, &0u64.to_be_bytes())
                .map_err(engine)?;
        }
        return Ok(());
    };
    let mut from = leases_through.unwrap_or(applied).min(applied) + 1;
    let mut staged = Pending::new();
    let mut replayed = 0u64;
    let mut revision = stored_revision(tree)?;
    let mut kept = applied;
    'frames: loop {
        let frames = log.read(from, 4096, true)?;
        let Some(end) = frames.last().map(|f| f.position) else {
            break;
        };
        for frame in &frames {
            let answered = frame.position <= applied;
            if frame.flags & auditlog::STATE_BEARING != 0 {
                if frame.flags & auditlog::REPLAYABLE == 0 {
                    if answered {
                        // Its records are in the tree.
                        continue;
                    }
                    tracing::warn!(
                        from = frame.position,
                        through = last,
                        "dropping audit entries of transactions that were not committed \
                         before a crash"
                    );
                    log.truncate_after(frame.position - 1)?;
                    break 'frames;
                }
                let key = codec::audit_key(frame.position);
                let redo: Vec<LeaseRedo> = codec::decode(&key, &frame.redo)?;
                for write in redo {
                    let (change, at) = write.into_change();
                    stage_lease(&change, &mut staged)?;
                    revision = revision.max(Revision(at));
                }
                replayed += 1;
            }
            kept = kept.max(frame.position);
        }
        from = end + 1;
    }
    if kept > applied || leases_through != Some(kept) {
        for (key, position) in [
            (codec::AUDIT_APPLIED_META, kept),
            (codec::LEASES_THROUGH_META, kept),
            (codec::REVISION_META, revision.0),
        ] {
            staged.insert(key.to_vec(), Some(position.to_be_bytes().to_vec()));
        }
        tree.apply_batch(batch_of(&staged)).map_err(engine)?;
        db.flush().map_err(engine)?;
        if replayed > 0 {
            tracing::info!(
                entries = replayed,
                "applied lease changes again from the audit trail"
            );
        }
    }
    Ok(())
}

/// The usage the tree's records hold (sled keeps it in memory: counted here when the store
/// opens, after recovery, then kept by the writer), indexing each lease in `leases` on the
/// way (`leases.rs`).
pub(super) fn count_usage(
    tree: &sled::Tree,
    leases: &mut Overlay,
) -> Result<std::collections::HashMap<UsageKey, Usage>, StoreError> {
    let mut tally = Tally::default();
    for entry in tree.scan_prefix([codec::ENVELOPE]) {
        let (key, value) = entry.map_err(engine)?;
        tally.envelope(&codec::decode_record::<EnvelopeRecord>(&key, &value)?);
    }
    for entry in tree.scan_prefix([codec::LEASE]) {
        let (key, value) = entry.map_err(engine)?;
        let lease = codec::decode_record::<LeaseRecord>(&key, &value)?;
        tally.lease(&lease);
        leases.index(&lease);
    }
    Ok(tally.finish())
}
