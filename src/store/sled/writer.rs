//! The sled adapter's side of the commit core: what a group becomes on disk (its frames in
//! the trail, then its records in the tree), the lease changes a frame carries, and exports.

use crate::model::{AuditAnchor, AuditRecord, LeaseRecord, Revision, SecretId};
use crate::store::auditlog::{self, AuditLog, NewFrame};
use crate::store::codec::{self, encode};
use crate::store::commit::{Adapter, Change, Group, RecordKey};
use crate::store::usage::{Usage, UsageKey};
use crate::store::{ExportSink, Record, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::activity::{Counting, SharedUnwritten, Unwritten, unwritten};
use super::cache::SharedCache;
use super::leases::{self, Found, Overlay, SharedOverlay};
use super::{anchor, decode_frame, engine, meta_revision, meta_value};

/// What the writer copied while writes waited, and the part of the trail left to copy.
pub(super) struct RecordsExported {
    pub(super) sink: ExportSink,
    pub(super) count: u64,
    /// The trail's positions at that moment (first, last), if it had any.
    pub(super) trail: Option<(u64, u64)>,
}

/// A lease change as the redo part of an entry's frame carries it (see `lease_redo`). Frames
/// written before revisions hold `Put` and `Update` (read as revision 0); the variants keep
/// their places in the encoding.
#[derive(serde::Serialize)]
pub(super) enum LeaseRedoRef<'a> {
    #[allow(dead_code)]
    Put(&'a LeaseRecord),
    #[allow(dead_code)]
    Update(&'a LeaseRecord),
    Delete(&'a LeaseRecord),
    PutAt(u64, &'a LeaseRecord),
    UpdateAt(u64, &'a LeaseRecord),
}

/// The redo part for a transaction that changes leases only (issuing a lease, a `Get`'s use,
/// revoking a lease): its entry's frame then holds everything recovery needs to apply the
/// change again, so the group needs no sled flush. Leases are short-lived and never secret
/// material (a lease holds its token's SHA-256 digest, not the token); other records are not
/// copied into the trail, which is kept for years.
pub(super) fn lease_redo(changes: &[Change]) -> Option<Vec<u8>> {
    let mut redo = Vec::with_capacity(changes.len());
    for change in changes {
        redo.push(match change {
            Change::NewLease(l) => LeaseRedoRef::PutAt(l.rev.0, l),
            Change::UpdateLease(l) => LeaseRedoRef::UpdateAt(l.rev.0, l),
            Change::DeleteLease(l) => LeaseRedoRef::Delete(l),
            _ => return None,
        });
    }
    if redo.is_empty() {
        return None;
    }
    encode(&redo).ok()
}

/// Stages a lease change (see `stage`).
pub(super) fn stage_lease(change: &Change, pending: &mut Pending) -> Result<(), StoreError> {
    match change {
        // The lease only: its id and expiry are indexed in memory (`leases.rs`).
        Change::NewLease(l) | Change::UpdateLease(l) => {
            pending.insert(
                codec::lease_key(&l.token_hash),
                Some(codec::encode_record(l)?),
            );
        }
        Change::DeleteLease(l) => {
            pending.insert(codec::lease_key(&l.token_hash), None);
        }
        _ => {}
    }
    Ok(())
}

/// The sled adapter of the commit core (`commit.rs`), owned by the writer thread.
pub(super) struct SledAdapter {
    pub(super) db: sled::Db,
    pub(super) tree: sled::Tree,
    pub(super) log: Arc<AuditLog>,
    /// Counts the groups applied to the tree twice, once before and once after: a reader
    /// that sees the same even count before and after its reads read one state.
    pub(super) writes: Arc<AtomicU64>,
    /// What each tenant holds: kept in memory (a process is sled's only writer), counted
    /// when the store opens and changed as each group is written.
    pub(super) usage: super::SharedUsage,
    /// The secrets' use the tree does not hold yet (see `activity.rs`).
    pub(super) unwritten: SharedUnwritten,
    /// The lease changes the tree does not hold yet (see `leases.rs`).
    pub(super) leases: SharedOverlay,
    /// Secrets and envelopes as read (see `cache.rs`): forgotten as the tree changes.
    pub(super) cache: SharedCache,
}

/// An audit entry's frame parts: its stored bytes, its index keys and its redo (lease
/// changes only).
pub(super) struct Framed {
    seq: u64,
    bytes: Vec<u8>,
    keys: Vec<Vec<u8>>,
    changes_records: bool,
    redo: Option<Vec<u8>>,
}

/// The group's changes as keys: key to new value (`None`: deleted).
pub(super) type Pending = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

impl Adapter for SledAdapter {
    fn check_writable(&self) -> Result<(), StoreError> {
        match self.log.damage() {
            Some(damage) => Err(StoreError::TrailDamaged(Box::new(damage))),
            None => Ok(()),
        }
    }

    fn revision(&self, key: &RecordKey) -> Result<Option<Revision>, StoreError> {
        let stored_key = match key {
            RecordKey::Secret(tenant, name) => codec::secret_key(tenant, name),
            RecordKey::Envelope(id, version) => codec::envelope_key(*id, *version),
            RecordKey::Lease(hash) => match leases::read(&self.leases).lease(hash) {
                Found::Is(lease) => return Ok(Some(lease.rev)),
                Found::Gone => return Ok(None),
                Found::InTree => codec::lease_key(hash),
            },
            RecordKey::Meta(meta) => {
                return Ok(meta_value(&self.tree, *meta)?.map(|(revision, _)| revision));
            }
        };
        match self.cache.read(&self.tree, &self.writes, &stored_key)? {
            Some(bytes) => codec::stored_revision(&stored_key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn usage(&self, keys: &[UsageKey]) -> Result<Vec<Usage>, StoreError> {
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        Ok(keys
            .iter()
            .map(|key| usage.get(key).copied().unwrap_or_default())
            .collect())
    }

    fn envelope_versions(&self, secret_id: SecretId) -> Result<Vec<u32>, StoreError> {
        let mut versions = Vec::new();
        for entry in self.tree.scan_prefix(codec::envelope_prefix(secret_id)) {
            let (key, _) = entry.map_err(engine)?;
            versions.extend(codec::envelope_key_version(&key));
        }
        Ok(versions)
    }

    fn anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        anchor(&self.tree)
    }

    fn audit_entry(&self, seq: u64) -> Result<Option<AuditRecord>, StoreError> {
        match self.log.read(seq, 1, true)?.first() {
            Some(frame) if frame.position == seq => decode_frame(frame).map(Some),
            _ => Ok(None),
        }
    }

    /// Makes a group durable, in the order the module documentation gives: its audit entries,
    /// then its records (with the audit position they reflect), then sled's flush if records
    /// changed that the trail cannot replay.
    fn write_group(&mut self, group: &Group) -> Result<(), StoreError> {
        let mut pending = Pending::new();
        let mut framed = Vec::new();
        let mut pruned = None;
        let mut lease_changes = Vec::new();
        for tx in &group.transactions {
            for change in &tx.changes {
                if change.is_lease() {
                    lease_changes.push(change);
                } else {
                    stage(change, &mut pending)?;
                }
                if let Change::Anchor(anchor) = change {
                    pruned = Some(anchor.seq);
                }
            }
            if let Some(record) = &tx.audit {
                framed.push(Framed {
                    seq: record.seq,
                    bytes: encode(record)?,
                    keys: codec::audit_index_prefixes(record),
                    changes_records: !tx.changes.is_empty(),
                    redo: lease_redo(&tx.changes),
                });
            }
        }
        // Changes the trail cannot replay must reach sled atomically and be in sled's log
        // before they are answered.
        let mut needs_flush = !pending.is_empty();
        // Lease changes and the secrets' use are kept in memory (`leases.rs`, `activity.rs`)
        // and written with a group that is flushed anyway, or (flushing this one) once
        // enough is kept: a checkpoint, marked with the group's last entry.
        let (counting, checkpoint) = {
            let counts = unwritten(&self.unwritten);
            let counting = counts.count(&self.tree, &group.activity)?;
            let kept = leases::read(&self.leases);
            let checkpoint = match framed.last() {
                Some(last)
                    if needs_flush
                        || kept.len() + lease_changes.len() >= leases::CHECKPOINT_CHANGES
                        || counts.due(&counting) =>
                {
                    let (changes, through) = (&lease_changes, last.seq);
                    stage_checkpoint(&counts, &counting, &kept, changes, through, &mut pending)?;
                    true
                }
                _ => false,
            };
            (counting, checkpoint)
        };
        needs_flush |= checkpoint;
        let has_changes = group.transactions.iter().any(|tx| !tx.changes.is_empty());
        let revision = has_changes.then(|| {
            (
                codec::REVISION_META.to_vec(),
                Some(group.last_revision.0.to_be_bytes().to_vec()),
            )
        });
        let mut applied = None;
        if let Some(last) = framed.last().map(|f| f.seq) {
            let frames: Vec<NewFrame<'_>> = framed.iter().map(Framed::frame).collect();
            self.log.append(&frames)?;
            self.log.sync()?;
            applied = Some((
                codec::AUDIT_APPLIED_META.to_vec(),
                Some(last.to_be_bytes().to_vec()),
            ));
        }
        self.writes.fetch_add(1, Ordering::AcqRel);
        let written = if needs_flush {
            pending.extend(revision);
            pending.extend(applied);
            let written = self.write_batch(&pending);
            self.cache.forget(pending.keys().map(Vec::as_slice));
            written
        } else {
            // The revision counter first, the position last (see `write_in_order`).
            self.write_in_order(revision.into_iter().chain(applied))
        };
        if written.is_ok() {
            let mut kept = leases::write(&self.leases);
            for change in &lease_changes {
                kept.apply(change);
            }
            if checkpoint {
                kept.clear();
            }
        }
        self.writes.fetch_add(1, Ordering::AcqRel);
        written?;
        if let Some(through) = pruned {
            self.log.set_start(through.saturating_add(1));
        }
        if needs_flush {
            self.db.flush().map_err(engine)?;
        }
        if let Some(through) = pruned {
            // The anchor is durable: the segments it covers whole can go.
            self.log.delete_through(through)?;
        }
        unwritten(&self.unwritten).apply(counting, checkpoint);
        if let Some(last) = framed.last() {
            self.log.publish(last.seq);
        }
        if !group.usage.is_empty() {
            let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            usage.extend(group.usage.iter().cloned());
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), StoreError> {
        // What is kept in memory (lease changes, the secrets' use) goes to the tree, marked
        // with the trail's last entry.
        let mut counts = unwritten(&self.unwritten);
        let mut kept = leases::write(&self.leases);
        if (!counts.is_empty() || !kept.is_empty())
            && let Some(last) = self.log.last_position()?
        {
            let mut pending = Pending::new();
            stage_checkpoint(
                &counts,
                &Counting::default(),
                &kept,
                &[],
                last,
                &mut pending,
            )?;
            self.tree.apply_batch(batch_of(&pending)).map_err(engine)?;
            counts.apply(Counting::default(), true);
            kept.clear();
        }
        drop((counts, kept));
        self.db.flush().map(drop).map_err(engine)
    }
}

/// Stages a checkpoint, marked with the trail's entry `through`: the counts kept in memory
/// with those the group adds (`counting`), the lease changes kept, then the group's own
/// (`newer`), and the marks that the tree holds them.
fn stage_checkpoint(
    counts: &Unwritten,
    counting: &Counting,
    kept: &Overlay,
    newer: &[&Change],
    through: u64,
    pending: &mut Pending,
) -> Result<(), StoreError> {
    counts.stage_checkpoint(counting, through, pending)?;
    kept.stage(pending)?;
    for change in newer {
        stage_lease(change, pending)?;
    }
    pending.insert(
        codec::LEASES_THROUGH_META.to_vec(),
        Some(through.to_be_bytes().to_vec()),
    );
    Ok(())
}

impl Framed {
    fn frame(&self) -> NewFrame<'_> {
        let mut flags = 0;
        if self.changes_records {
            flags |= auditlog::STATE_BEARING;
        }
        if self.redo.is_some() {
            flags |= auditlog::REPLAYABLE;
        }
        NewFrame {
            position: self.seq,
            flags,
            payload: &self.bytes,
            redo: self.redo.as_deref().unwrap_or_default(),
            keys: Some(&self.keys),
        }
    }
}

/// Staged changes as one sled batch.
pub(super) fn batch_of(pending: &Pending) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (key, value) in pending {
        match value {
            Some(v) => batch.insert(key.as_slice(), v.as_slice()),
            None => batch.remove(key.as_slice()),
        }
    }
    batch
}

/// Stages one resolved change as keys.
pub(super) fn stage(change: &Change, pending: &mut Pending) -> Result<(), StoreError> {
    match change {
        Change::Secret(s) => {
            pending.insert(
                codec::secret_key(&s.tenant, &s.name),
                Some(codec::encode_record(s)?),
            );
        }
        Change::Envelope(e) => {
            pending.insert(
                codec::envelope_key(e.secret_id, e.version),
                Some(codec::encode_record(e)?),
            );
        }
        Change::DeleteEnvelope(id, version) => {
            pending.insert(codec::envelope_key(*id, *version), None);
        }
        Change::DeleteSecret(tenant, name) => {
            pending.insert(codec::secret_key(tenant, name), None);
        }
        Change::NewLease(_) | Change::UpdateLease(_) | Change::DeleteLease(_) => {
            stage_lease(change, pending)?
        }
        Change::Meta(key, revision, value) => {
            pending.insert(codec::meta_key(*key), Some(value.clone()));
            pending.insert(
                codec::meta_revision_key(*key),
                Some(revision.0.to_be_bytes().to_vec()),
            );
        }
        // The entries (and their index entries) are hidden once the anchor is written, and
        // their segments deleted once it is durable (see `write_group`); a segment the anchor
        // covers in part keeps its older entries on disk until a prune covers it whole.
        Change::Anchor(anchor) => {
            pending.insert(codec::AUDIT_ANCHOR_META.to_vec(), Some(encode(anchor)?));
        }
    }
    Ok(())
}

impl SledAdapter {
    /// Copies every record but leases to `sink` (run between groups: nothing is written
    /// meanwhile), and says which part of the trail the copy goes with (copied after,
    /// without holding writes).
    pub(super) fn export(&self, mut sink: ExportSink) -> Result<RecordsExported, StoreError> {
        let mut count = 0;
        for entry in self.tree.iter() {
            let (key, value) = entry.map_err(engine)?;
            let Some(mut record) = Record::from_engine_key(&key, &value)? else {
                continue;
            };
            if let Record::Meta(meta, revision, _) = &mut record {
                *revision = meta_revision(&self.tree, *meta)?;
            }
            sink(record).map_err(StoreError::Export)?;
            count += 1;
        }
        let first = self.log.read(0, 1, false)?.first().map(|f| f.position);
        let last = self.log.last_position()?;
        Ok(RecordsExported {
            sink,
            count,
            trail: first.zip(last),
        })
    }

    /// Applies the group's changes to the tree as one atomic batch.
    fn write_batch(&mut self, pending: &Pending) -> Result<(), StoreError> {
        self.tree.apply_batch(batch_of(pending)).map_err(engine)
    }

    /// Writes a group that changed no record the trail cannot replay (its lease changes are
    /// kept in memory): the revision counter and the trail's position, one key at a time (a
    /// sled batch costs two writes of sled's log buffer, which such a group does not need).
    /// sled recovers a prefix of its writes: the revision counter comes first, the position
    /// last.
    fn write_in_order(
        &mut self,
        writes: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<(), StoreError> {
        for (key, value) in writes {
            match value {
                Some(v) => self.tree.insert(key, v).map(drop),
                None => self.tree.remove(key).map(drop),
            }
            .map_err(engine)?;
        }
        Ok(())
    }
}
