//! Token buckets keyed by principal or peer: request rate limits per principal, and limits on
//! failed lease redemptions (against token guessing).
//!
//! Hand-written rather than `governor`, because the failed-redemption limit needs to *look*
//! at a bucket before a request (refuse once a peer has used up its failures) and *take* from
//! it only when the request fails, which governor's keyed limiter does not offer.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use crate::auth::RateLimit;

/// Most keys tracked before idle (full) buckets are forgotten.
const MAX_KEYS: usize = 100_000;

/// Token buckets, one per key.
pub struct Buckets<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, limit: RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.updated = now;
    }
}

impl<K: Hash + Eq + Clone> Default for Buckets<K> {
    fn default() -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Takes one token from `key`'s bucket; false if it is empty.
    pub fn take(&self, key: &K, limit: RateLimit) -> bool {
        self.with(key, limit, |bucket| {
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// True if `key`'s bucket has a token, without taking it. Looking makes no bucket: a key
    /// without one has its whole burst (at least 1, as configuration requires).
    pub fn has_token(&self, key: &K, limit: RateLimit) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match buckets.get_mut(key) {
            Some(bucket) => {
                bucket.refill(limit, Instant::now());
                bucket.tokens >= 1.0
            }
            None => limit.burst >= 1,
        }
    }

    /// True if no key has a bucket (nothing was taken since the idle ones were forgotten).
    pub fn is_empty(&self) -> bool {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn with<T>(&self, key: &K, limit: RateLimit, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let now = Instant::now();
        // Every critical section leaves the map consistent, so a poisoned lock is usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.refill(limit, now);
                b.tokens < f64::from(limit.burst)
            });
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: f64::from(limit.burst),
            updated: now,
        });
        bucket.refill(limit, now);
        f(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills() {
        let limit = RateLimit {
            per_second: 20.0,
            burst: 3,
        };
        let b = Buckets::default();
        assert!((0..3).all(|_| b.take(&"p", limit)));
        assert!(!b.take(&"p", limit));
        assert!(!b.has_token(&"p", limit));
        assert!(b.take(&"q", limit), "keys are independent");
        std::thread::sleep(std::time::Duration::from_millis(120));
        assert!(b.has_token(&"p", limit));
        assert!(b.take(&"p", limit));
    }

    #[test]
    fn looking_does_not_take() {
        let limit = RateLimit {
            per_second: 1.0,
            burst: 1,
        };
        let b = Buckets::default();
        assert!((0..10).all(|_| b.has_token(&1, limit)));
        assert!(b.is_empty(), "looking makes no bucket");
        assert!(b.take(&1, limit));
        assert!(!b.is_empty());
        assert!(!b.has_token(&1, limit));
    }
}
