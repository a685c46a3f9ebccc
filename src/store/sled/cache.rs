//! The stored bytes of secrets and envelopes, kept in memory as they are read, so that the
//! reads of a `Lease` and a `Get` (the secret, its envelope) and the writer's guard checks
//! skip sled's tree: those were 5% of a request's CPU (BENCHMARKS.md).
//!
//! The writer is sled's only writer. It forgets every cached key a group writes, between the
//! two steps of the write counter (`SledAdapter::writes`) around the group's tree writes. A
//! reader that missed keeps what it read only if the counter was even when it started to
//! read and has not moved by the time it holds the cache's lock: no group wrote the tree in
//! between, and any group that starts after will forget the key (it takes the same lock).
//! Only records that exist are kept (a miss is not), at most [`CACHED_RECORDS`]; when full,
//! the cache starts again empty. It holds what the tree holds: an envelope's ciphertext and
//! wrapped data key, never anything decrypted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::store::StoreError;
use crate::store::codec;

use super::engine;

/// Records kept at most: about 5 MB at 300 bytes per secret or envelope.
pub(super) const CACHED_RECORDS: usize = 16_384;

/// Secrets' and envelopes' stored bytes by key (see the module documentation).
#[derive(Default)]
pub(super) struct Cache {
    records: RwLock<HashMap<Vec<u8>, sled::IVec>>,
}

/// What the store's readers and its writer share.
pub(super) type SharedCache = Arc<Cache>;

/// True for the keyspaces the cache keeps.
fn cached(key: &[u8]) -> bool {
    matches!(key.first(), Some(&codec::SECRET | &codec::ENVELOPE))
}

impl Cache {
    /// The stored bytes under `key`: from the cache, else from the tree (kept if no group
    /// wrote the tree meanwhile; `writes` is the writer's counter).
    pub(super) fn read(
        &self,
        tree: &sled::Tree,
        writes: &AtomicU64,
        key: &[u8],
    ) -> Result<Option<sled::IVec>, StoreError> {
        if !cached(key) {
            return tree.get(key).map_err(engine);
        }
        if let Some(bytes) = self.lock_read().get(key) {
            return Ok(Some(bytes.clone()));
        }
        let before = writes.load(Ordering::Acquire);
        let bytes = tree.get(key).map_err(engine)?;
        if let Some(bytes) = &bytes
            && before.is_multiple_of(2)
        {
            let mut records = self.lock_write();
            if writes.load(Ordering::Acquire) == before {
                if records.len() >= CACHED_RECORDS {
                    records.clear();
                }
                records.insert(key.to_vec(), bytes.clone());
            }
        }
        Ok(bytes)
    }

    /// Forgets the keys a group wrote (the writer, while its counter is odd).
    pub(super) fn forget<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        let mut keys = keys.filter(|key| cached(key)).peekable();
        if keys.peek().is_none() {
            return;
        }
        let mut records = self.lock_write();
        for key in keys {
            records.remove(key);
        }
    }

    /// Forgets everything (after a write that bypassed the writer).
    pub(super) fn clear(&self) {
        self.lock_write().clear();
    }

    fn lock_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Vec<u8>, sled::IVec>> {
        self.records.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Vec<u8>, sled::IVec>> {
        self.records.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        (dir, tree)
    }

    #[test]
    fn keeps_what_it_read_and_forgets_what_the_writer_wrote() {
        let (_dir, tree) = tree();
        let (cache, writes) = (Cache::default(), AtomicU64::new(0));
        let key = [codec::SECRET, 1];
        tree.insert(key, &[1]).unwrap();
        assert_eq!(cache.read(&tree, &writes, &key).unwrap().unwrap(), [1]);
        // Bypassing the writer: the cache answers.
        tree.insert(key, &[2]).unwrap();
        assert_eq!(cache.read(&tree, &writes, &key).unwrap().unwrap(), [1]);
        // As the writer does.
        writes.fetch_add(1, Ordering::AcqRel);
        tree.insert(key, &[3]).unwrap();
        cache.forget([&key[..]].into_iter());
        writes.fetch_add(1, Ordering::AcqRel);
        assert_eq!(cache.read(&tree, &writes, &key).unwrap().unwrap(), [3]);
        // A removed record is not kept as absent.
        writes.fetch_add(1, Ordering::AcqRel);
        tree.remove(key).unwrap();
        cache.forget([&key[..]].into_iter());
        writes.fetch_add(1, Ordering::AcqRel);
        assert_eq!(cache.read(&tree, &writes, &key).unwrap(), None);
        tree.insert(key, &[4]).unwrap();
        assert_eq!(cache.read(&tree, &writes, &key).unwrap().unwrap(), [4]);
        // Other keyspaces are always read from the tree.
        let lease = [codec::LEASE, 1];
        tree.insert(lease, &[5]).unwrap();
        assert_eq!(cache.read(&tree, &writes, &lease).unwrap().unwrap(), [5]);
        tree.insert(lease, &[6]).unwrap();
        assert_eq!(cache.read(&tree, &writes, &lease).unwrap().unwrap(), [6]);
    }

    #[test]
    fn a_read_during_a_group_is_not_kept() {
        let (_dir, tree) = tree();
        let (cache, writes) = (Cache::default(), AtomicU64::new(0));
        let key = [codec::ENVELOPE, 1];
        tree.insert(key, &[1]).unwrap();
        // The writer is between its counter's steps: what a reader reads may be old.
        writes.fetch_add(1, Ordering::AcqRel);
        assert_eq!(cache.read(&tree, &writes, &key).unwrap().unwrap(), [1]);
        tree.insert(key, &[2]).unwrap();
        writes.fetch_add(1, Ordering::AcqRel);
        assert_eq!(cache.read(&tree, &writes, &key).unwrap().unwrap(), [2]);
    }

    #[test]
    fn starts_again_when_full() {
        let (_dir, tree) = tree();
        let (cache, writes) = (Cache::default(), AtomicU64::new(0));
        for i in 0..=CACHED_RECORDS as u32 {
            let mut key = vec![codec::SECRET];
            key.extend_from_slice(&i.to_be_bytes());
            tree.insert(&key, &[1]).unwrap();
            cache.read(&tree, &writes, &key).unwrap();
        }
        assert_eq!(cache.lock_read().len(), 1);
    }
}
