//! Stores written by earlier versions: audit entries and index keys that were kept in the
//! tree move to the trail's own files.

use crate::store::StoreError;
use crate::store::auditlog::{AuditLog, NewFrame};
use crate::store::codec::{self};

use super::engine;

/// The seq of an audit entry's key in the tree (`a` + seq), where stores kept them before
/// the trail had its own files.
fn audit_key_seq(key: &[u8]) -> Option<u64> {
    match key {
        [codec::AUDIT, seq @ ..] => Some(u64::from_be_bytes(seq.try_into().ok()?)),
        _ => None,
    }
}

/// A frame for an entry whose transaction changed no records.
pub(super) fn plain_frame(position: u64, payload: &[u8]) -> NewFrame<'_> {
    NewFrame {
        position,
        flags: 0,
        payload,
        redo: &[],
        keys: None,
    }
}

/// Deletes every key of the keyspaces `spaces`, which earlier versions kept in the tree and
/// this one derives (the audit indexes, built from the trail's entries; the leases' id and
/// expiry indexes, kept in memory), logging `what` if there were any.
pub(super) fn remove_keyspaces(
    db: &sled::Db,
    tree: &sled::Tree,
    spaces: &[u8],
    what: &str,
) -> Result<(), StoreError> {
    let mut removed = 0u64;
    for space in spaces {
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for entry in tree.scan_prefix([*space]).take(10_000) {
                batch.remove(entry.map_err(engine)?.0);
                n += 1;
            }
            if n == 0 {
                break;
            }
            tree.apply_batch(batch).map_err(engine)?;
            removed += n;
        }
    }
    if removed > 0 {
        db.flush().map_err(engine)?;
        tracing::info!(keys = removed, "{what}");
    }
    Ok(())
}

/// Moves the audit entries of a store written before the trail had its own files from the
/// tree into the trail, then deletes them from the tree. Resumes where a crash stopped it.
pub(super) fn migrate_legacy_entries(
    db: &sled::Db,
    tree: &sled::Tree,
    log: &AuditLog,
) -> Result<(), StoreError> {
    let first = tree.scan_prefix([codec::AUDIT]).next();
    if first.is_none() {
        return Ok(());
    }
    let mut moved = 0u64;
    let mut chunk: Vec<(u64, sled::IVec)> = Vec::new();
    let flush_chunk = |chunk: &mut Vec<(u64, sled::IVec)>| -> Result<(), StoreError> {
        let next = log.next_position()?;
        let frames: Vec<NewFrame<'_>> = chunk
            .iter()
            .filter(|(seq, _)| *seq >= next)
            .map(|(seq, value)| plain_frame(*seq, value))
            .collect();
        log.append(&frames)?;
        chunk.clear();
        Ok(())
    };
    for entry in tree.scan_prefix([codec::AUDIT]) {
        let (key, value) = entry.map_err(engine)?;
        let Some(seq) = audit_key_seq(&key) else {
            continue;
        };
        chunk.push((seq, value));
        moved += 1;
        if chunk.len() >= 4096 {
            flush_chunk(&mut chunk)?;
        }
    }
    flush_chunk(&mut chunk)?;
    log.sync()?;
    let mut batch = sled::Batch::default();
    for entry in tree.scan_prefix([codec::AUDIT]) {
        batch.remove(entry.map_err(engine)?.0);
    }
    if let Some(last) = log.last_position()? {
        batch.insert(codec::AUDIT_APPLIED_META, &last.to_be_bytes());
    }
    tree.apply_batch(batch).map_err(engine)?;
    db.flush().map_err(engine)?;
    tracing::info!(
        entries = moved,
        "moved the audit trail out of the tree into its segment files"
    );
    Ok(())
}
