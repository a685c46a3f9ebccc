//! The leases in memory: the changes of the groups since the last checkpoint, kept instead
//! of written to sled's tree, and the indexes of every lease (by id, by expiry), which the
//! tree does not hold.
//!
//! A `Lease` inserted three keys into the tree (the lease, its id, its expiry) and a `Get`
//! rewrites one, and sled's inserts were the largest share of a request's CPU. Their groups
//! are durable without the tree: each entry's frame in the trail carries its lease changes
//! (the redo), which recovery applies again. So the writer keeps them here ([`Overlay`];
//! readers and guards look here first), and writes them to the tree with the next group that
//! writes the tree anyway (one that changes other records and is flushed), once
//! [`CHECKPOINT_CHANGES`] are kept, and at close, with the position through which the tree
//! then holds every lease change (`mleases-through`). `open` applies again the redo of the
//! entries after that position.
//!
//! The tree holds each lease under its token's hash only. Its id (for `RevokeLease`) and its
//! expiry (for the collection of expired leases) are indexed here, for every lease: built
//! from the tree's leases at open (after recovery), then kept by the writer. They cost about
//! 150 bytes of memory per lease outstanding; the two index keys per lease they replace cost
//! 13-16% of a `lease+get`'s CPU (BENCHMARKS.md).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use crate::model::{LeaseId, LeaseRecord, Time, TokenHash};
use crate::store::StoreError;
use crate::store::commit::Change;

use super::{Pending, stage_lease};

/// Lease changes kept that make the writer write them to the tree. Each checkpoint is a sled
/// batch and a flush: at 256, they were 12% of a `lease+get`'s CPU (1,024 costs 5-13% less
/// per `lease+get`, and 2,048 another 5%, BENCHMARKS.md). Its write holds the group's commits,
/// which the stall watchdog refuses after a second: 8,192 changes (24,576 keys) took over
/// that in a debug build on a loaded CI machine; 2,048 take a quarter.
pub(super) const CHECKPOINT_CHANGES: usize = 2048;

/// A lease as the groups since the checkpoint left it.
#[derive(Clone)]
enum Kept {
    /// Issued since the checkpoint (not in the tree), as it is now.
    New(LeaseRecord),
    /// In the tree, changed since.
    Updated(LeaseRecord),
    /// In the tree, deleted since.
    Deleted(LeaseRecord),
}

/// What the tree does not hold of the leases.
#[derive(Default)]
pub(super) struct Overlay {
    /// The lease changes since the checkpoint.
    by_hash: HashMap<[u8; 32], Kept>,
    /// Every lease, by id.
    by_id: HashMap<LeaseId, [u8; 32]>,
    /// Every lease, by expiry.
    expiring: BTreeSet<(Time, [u8; 32])>,
}

/// What the writer and the readers share.
pub(super) type SharedOverlay = Arc<RwLock<Overlay>>;

/// How a lease stands in the overlay.
pub(super) enum Found<'a> {
    /// Not changed since the checkpoint: as the tree holds it.
    InTree,
    /// As it is now.
    Is(&'a LeaseRecord),
    /// Deleted.
    Gone,
}

impl Overlay {
    /// Indexes a lease the tree holds (at open).
    pub(super) fn index(&mut self, lease: &LeaseRecord) {
        self.by_id.insert(lease.id, lease.token_hash.0);
        self.expiring.insert((lease.expires_at, lease.token_hash.0));
    }

    /// Keeps a lease change of a written group, and indexes it.
    pub(super) fn apply(&mut self, change: &Change) {
        match change {
            Change::NewLease(l) => {
                self.index(l);
                self.by_hash.insert(l.token_hash.0, Kept::New(l.clone()));
            }
            Change::UpdateLease(l) => {
                let kept = match self.by_hash.get(&l.token_hash.0) {
                    Some(Kept::New(_)) => Kept::New(l.clone()),
                    _ => Kept::Updated(l.clone()),
                };
                self.by_hash.insert(l.token_hash.0, kept);
            }
            Change::DeleteLease(l) => {
                self.by_id.remove(&l.id);
                self.expiring.remove(&(l.expires_at, l.token_hash.0));
                if let Some(Kept::New(_)) = self.by_hash.get(&l.token_hash.0) {
                    // Never in the tree: nothing to delete there.
                    self.by_hash.remove(&l.token_hash.0);
                } else {
                    self.by_hash
                        .insert(l.token_hash.0, Kept::Deleted(l.clone()));
                }
            }
            _ => {}
        }
    }

    /// Stages every change kept, as tree writes (before the group's own, which follow).
    pub(super) fn stage(&self, pending: &mut Pending) -> Result<(), StoreError> {
        for kept in self.by_hash.values() {
            let change = match kept {
                Kept::New(l) => Change::NewLease(l.clone()),
                Kept::Updated(l) => Change::UpdateLease(l.clone()),
                Kept::Deleted(l) => Change::DeleteLease(l.clone()),
            };
            stage_lease(&change, pending)?;
        }
        Ok(())
    }

    /// Lease changes kept.
    pub(super) fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Leases outstanding (indexed).
    pub(super) fn leases(&self) -> usize {
        self.by_id.len()
    }

    /// True if nothing is kept.
    pub(super) fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Drops the changes kept (written to the tree); the indexes stay.
    pub(super) fn clear(&mut self) {
        self.by_hash.clear();
    }

    /// The lease with this token hash.
    pub(super) fn lease(&self, hash: &TokenHash) -> Found<'_> {
        match self.by_hash.get(&hash.0) {
            None => Found::InTree,
            Some(Kept::New(l) | Kept::Updated(l)) => Found::Is(l),
            Some(Kept::Deleted(_)) => Found::Gone,
        }
    }

    /// The token hash of the lease with this id.
    pub(super) fn hash_of(&self, id: LeaseId) -> Option<TokenHash> {
        self.by_id.get(&id).copied().map(TokenHash)
    }

    /// The token hashes of at most `limit` leases that expired before `now`, by expiry.
    pub(super) fn expired(&self, now: Time, limit: usize) -> Vec<TokenHash> {
        self.expiring
            .iter()
            .take_while(|(at, _)| *at < now)
            .take(limit)
            .map(|(_, hash)| TokenHash(*hash))
            .collect()
    }
}

/// The overlay, for reading.
pub(super) fn read(shared: &SharedOverlay) -> std::sync::RwLockReadGuard<'_, Overlay> {
    shared.read().unwrap_or_else(|p| p.into_inner())
}

/// The overlay, for the writer.
pub(super) fn write(shared: &SharedOverlay) -> std::sync::RwLockWriteGuard<'_, Overlay> {
    shared.write().unwrap_or_else(|p| p.into_inner())
}
