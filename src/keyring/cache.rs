//! A bounded, time-limited cache of unwrapped data keys, so that a hot secret does not cost
//! one key-service call per `Get`.
//!
//! Keys are shared as `Arc<SymmetricKey>` (no copy of the material); the last holder's drop
//! zeroizes them, so evicting an entry zeroizes its key once no request still uses it.
//! Rotate and Revoke evict a secret's keys at once, and an unwrap that started before such an
//! eviction does not put its key back. Other processes sharing the store evict them when
//! the audit feed brings the Rotate or Revoke (`Vault::follow_keys`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::crypto::SymmetricKey;
use crate::model::SecretId;

/// Cache limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Most keys held; 0 disables the cache.
    pub capacity: usize,
    /// How long a key may be served from the cache.
    pub ttl: Duration,
}

impl CacheSettings {
    /// No caching.
    pub const DISABLED: CacheSettings = CacheSettings {
        capacity: 0,
        ttl: Duration::ZERO,
    };
}

type Slot = (SecretId, u32);

/// The cache.
pub struct DataKeyCache {
    settings: CacheSettings,
    inner: Mutex<Inner>,
    /// Bumped by every eviction; an insert based on an older value is dropped.
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<Slot, (Arc<SymmetricKey>, Instant)>,
    /// Insertion order, for evicting the oldest when full.
    order: VecDeque<Slot>,
}

impl DataKeyCache {
    /// An empty cache.
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner::default()),
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The value to pass to [`insert`](Self::insert) for an unwrap starting now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The data key of a secret version, if cached and fresh.
    pub fn get(&self, secret: SecretId, version: u32) -> Option<Arc<SymmetricKey>> {
        if self.settings.capacity == 0 {
            return None;
        }
        let mut inner = self.lock();
        let found = match inner.keys.get(&(secret, version)) {
            Some((key, at)) if at.elapsed() < self.settings.ttl => Some(key.clone()),
            Some(_) => {
                inner.keys.remove(&(secret, version));
                None
            }
            None => None,
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches a key unwrapped by a call that started at `generation`, unless an eviction
    /// happened since.
    pub fn insert(&self, secret: SecretId, version: u32, key: Arc<SymmetricKey>, generation: u64) {
        if self.settings.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        // Checked under the lock that evictions also take.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        while inner.keys.len() >= self.settings.capacity {
            match inner.order.pop_front() {
                Some(oldest) => {
                    inner.keys.remove(&oldest);
                }
                None => break,
            }
        }
        if inner
            .keys
            .insert((secret, version), (key, Instant::now()))
            .is_none()
        {
            inner.order.push_back((secret, version));
        }
    }

    /// Drops every cached key of `secret`.
    pub fn evict_secret(&self, secret: SecretId) {
        let mut inner = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        inner.keys.retain(|(id, _), _| *id != secret);
        inner.order.retain(|(id, _)| *id != secret);
    }

    /// Drops every cached key (when evictions may have been missed).
    pub fn clear(&self) {
        let mut inner = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        inner.keys.clear();
        inner.order.clear();
    }

    /// Keys held now (expired ones included until a lookup or an eviction drops them).
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<SymmetricKey> {
        Arc::new(SymmetricKey::generate().unwrap())
    }

    fn cache(capacity: usize, ttl_ms: u64) -> DataKeyCache {
        DataKeyCache::new(CacheSettings {
            capacity,
            ttl: Duration::from_millis(ttl_ms),
        })
    }

    #[test]
    fn hits_misses_and_capacity() {
        let c = cache(2, 60_000);
        let (a, b, d) = (
            SecretId::generate(),
            SecretId::generate(),
            SecretId::generate(),
        );
        assert!(c.get(a, 1).is_none());
        c.insert(a, 1, key(), c.generation());
        c.insert(b, 1, key(), c.generation());
        assert!(c.get(a, 1).is_some());
        c.insert(d, 1, key(), c.generation());
        assert!(c.get(a, 1).is_none(), "the oldest went when full");
        assert!(c.get(b, 1).is_some() && c.get(d, 1).is_some());
        assert_eq!(c.stats(), (3, 2));
    }

    #[test]
    fn entries_expire() {
        let c = cache(10, 20);
        let a = SecretId::generate();
        c.insert(a, 1, key(), c.generation());
        assert!(c.get(a, 1).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.get(a, 1).is_none());
    }

    #[test]
    fn eviction_wins_over_a_racing_insert() {
        let c = cache(10, 60_000);
        let (a, b) = (SecretId::generate(), SecretId::generate());
        c.insert(a, 1, key(), c.generation());
        c.insert(a, 2, key(), c.generation());
        c.insert(b, 1, key(), c.generation());
        let before = c.generation();
        c.evict_secret(a);
        assert!(c.get(a, 1).is_none() && c.get(a, 2).is_none());
        assert!(c.get(b, 1).is_some());
        // An unwrap that started before the eviction does not repopulate.
        c.insert(a, 2, key(), before);
        assert!(c.get(a, 2).is_none());
        assert_eq!(c.len(), 1);
        // Clearing drops everything, and also wins over an insert that started before it.
        let before = c.generation();
        c.clear();
        assert!(c.is_empty() && c.get(b, 1).is_none());
        c.insert(b, 1, key(), before);
        assert!(c.is_empty());
    }

    #[test]
    fn zero_capacity_disables() {
        let c = DataKeyCache::new(CacheSettings::DISABLED);
        let a = SecretId::generate();
        c.insert(a, 1, key(), c.generation());
        assert!(c.get(a, 1).is_none());
        assert_eq!(c.stats(), (0, 0));
    }
}
