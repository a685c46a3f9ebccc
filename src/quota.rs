//! Storage quotas: what one tenant may hold, and the free space kept for what must not fail.
//!
//! - Per tenant: active secrets, the bytes of their sealed values, and lease records (a lease
//!   counts until it is collected after its expiry, used up or not). A request that would
//!   take a tenant past one of them is refused (`RESOURCE_EXHAUSTED`); the usage is
//!   reserved before the commit and given back if the commit fails, so concurrent requests
//!   cannot overshoot together. Revocations and collection give usage back.
//! - The volume: below `min_free_mb` of free space, requests that make the store grow
//!   (Store, Rotate, Lease) are refused, so that revocations, redemptions and the audit
//!   entries of every request still have room. Free space is read from the file system at
//!   most every [`DISK_CHECK_INTERVAL`].
//!
//! - A full volume does not stop the start: the data directory holds a file of empty space
//!   (`space-reserve`, half the reserve, at most [`MAX_SPACE_FILE`]), which byokd deletes
//!   when it starts on a volume with less free space than that (saying so), so that the
//!   store can open and revocations be audited; it is made again at a start with room.
//!
//! The usage is counted from the store when the vault starts, then kept in memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::model::{SecretId, TenantId, Time};
use crate::store::{Store, StoreError};

/// The file of empty space kept in the data directory.
pub const SPACE_FILE: &str = "space-reserve";
/// Its largest size.
pub const MAX_SPACE_FILE: u64 = 4 * 1024 * 1024;

/// At start: gives back the space file if the volume has less free space than its size
/// (so that the store can open), or makes it if it is missing and the volume has room for it
/// and the reserve. Returns whether it was given back.
pub fn prepare_volume(data_dir: &std::path::Path, min_free: u64) -> std::io::Result<bool> {
    use std::io::Write;
    let path = data_dir.join(SPACE_FILE);
    let size = (min_free / 2).min(MAX_SPACE_FILE);
    let stat = rustix::fs::statvfs(data_dir)?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if path.exists() {
        if free < size {
            std::fs::remove_file(&path)?;
            tracing::warn!(
                free_kb = free >> 10,
                released_mb = size >> 20,
                "the data volume is full: deleted the space reserve so that byokd can start; the volume is nearly full until an operator makes room"
            );
            return Ok(true);
        }
        return Ok(false);
    }
    if size == 0 || free < min_free.saturating_add(size) {
        return Ok(false);
    }
    // Real blocks, not a sparse file: the space must be there to give back.
    let mut file = std::fs::File::create_new(&path)?;
    let chunk = vec![0u8; 1024 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(false)
}

/// How stale the free-space reading may be.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The quotas, as configured.
#[derive(Debug, Clone, Copy)]
pub struct QuotaLimits {
    /// Active secrets per tenant.
    pub max_secrets_per_tenant: u64,
    /// Bytes of sealed values per tenant.
    pub max_value_bytes_per_tenant: u64,
    /// Lease records per tenant.
    pub max_leases_per_tenant: u64,
    /// Bytes of sealed values in all (what bounds the store's memory: see BENCHMARKS.md).
    pub max_value_bytes_total: u64,
    /// Free space below which the store may not grow.
    pub min_free_bytes: u64,
}

/// What a tenant holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Active secrets.
    pub secrets: u64,
    /// Bytes of their sealed values.
    pub value_bytes: u64,
    /// Lease records.
    pub leases: u64,
}

/// A change in a tenant's usage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// Secrets.
    pub secrets: i64,
    /// Value bytes.
    pub value_bytes: i64,
    /// Leases.
    pub leases: i64,
}

/// Why a request was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuotaError {
    /// A tenant quota.
    #[error("tenant {tenant} is at its quota of {limit} {what}")]
    Tenant {
        /// The tenant.
        tenant: TenantId,
        /// What is counted.
        what: &'static str,
        /// The quota.
        limit: u64,
    },
    /// The vault's total of value bytes.
    #[error("the vault holds its quota of {limit} value bytes in all")]
    Total {
        /// The quota.
        limit: u64,
    },
    /// The volume is nearly full.
    #[error(
        "storage is nearly full: only revocations and reads are served until an operator makes room"
    )]
    VolumeNearlyFull,
}

/// The quotas and the usage they watch.
pub struct Quotas {
    limits: QuotaLimits,
    usage: Mutex<HashMap<TenantId, Usage>>,
    disk: DiskSpace,
}

impl Quotas {
    /// Quotas under `limits`, for a store in `data_dir` whose usage is `usage`.
    pub fn new(limits: QuotaLimits, data_dir: PathBuf, usage: HashMap<TenantId, Usage>) -> Self {
        Self {
            limits,
            usage: Mutex::new(usage),
            disk: DiskSpace::new(data_dir, limits.min_free_bytes),
        }
    }

    /// The usage of every tenant in `store`: its envelopes (one per active secret) and its
    /// lease records.
    pub async fn count(store: &dyn Store) -> Result<HashMap<TenantId, Usage>, StoreError> {
        const PAGE: usize = 1024;
        let mut usage: HashMap<TenantId, Usage> = HashMap::new();
        let mut seen: Option<SecretId> = None;
        let mut after = None;
        loop {
            let page = store.envelopes_after(after, PAGE).await?;
            for envelope in &page {
                let tenant = usage.entry(envelope.tenant.clone()).or_default();
                // Versions of one secret follow each other; a rotation may briefly keep two.
                if seen != Some(envelope.secret_id) {
                    tenant.secrets += 1;
                    seen = Some(envelope.secret_id);
                }
                tenant.value_bytes += envelope.ciphertext.len() as u64;
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some((last.secret_id, last.version)),
                _ => break,
            }
        }
        for lease in store
            .expired_leases(Time::from_micros(i64::MAX), usize::MAX)
            .await?
        {
            usage.entry(lease.tenant).or_default().leases += 1;
        }
        Ok(usage)
    }

    /// The usage of `tenant`.
    pub fn usage(&self, tenant: &TenantId) -> Usage {
        self.lock().get(tenant).copied().unwrap_or_default()
    }

    /// Reserves `delta` for `tenant` if it stays within the quotas (and, for a change that
    /// makes the store grow, the volume has room): kept by [`Reservation::keep`] once the
    /// change is committed, given back if dropped.
    pub fn reserve(&self, tenant: &TenantId, delta: Delta) -> Result<Reservation<'_>, QuotaError> {
        if self.disk.nearly_full() {
            return Err(QuotaError::VolumeNearlyFull);
        }
        let mut usage = self.lock();
        let next = apply(usage.get(tenant).copied().unwrap_or_default(), delta);
        let over = |grows: bool, value: u64, limit: u64, what| {
            if grows && value > limit {
                Err(QuotaError::Tenant {
                    tenant: tenant.clone(),
                    what,
                    limit,
                })
            } else {
                Ok(())
            }
        };
        over(
            delta.secrets > 0,
            next.secrets,
            self.limits.max_secrets_per_tenant,
            "secrets",
        )?;
        over(
            delta.value_bytes > 0,
            next.value_bytes,
            self.limits.max_value_bytes_per_tenant,
            "value bytes",
        )?;
        if delta.value_bytes > 0 {
            let others: u64 = usage
                .iter()
                .filter(|(t, _)| *t != tenant)
                .map(|(_, u)| u.value_bytes)
                .sum();
            if others.saturating_add(next.value_bytes) > self.limits.max_value_bytes_total {
                return Err(QuotaError::Total {
                    limit: self.limits.max_value_bytes_total,
                });
            }
        }
        let current = usage.entry(tenant.clone()).or_default();
        over(
            delta.leases > 0,
            next.leases,
            self.limits.max_leases_per_tenant,
            "leases",
        )?;
        *current = next;
        Ok(Reservation {
            quotas: self,
            tenant: tenant.clone(),
            delta,
            kept: false,
        })
    }

    /// Applies a change already committed (usage given back: revocations, collection).
    pub fn committed(&self, tenant: &TenantId, delta: Delta) {
        let mut usage = self.lock();
        let current = usage.entry(tenant.clone()).or_default();
        *current = apply(*current, delta);
    }

    /// Lease records of every tenant together.
    pub fn leases(&self) -> u64 {
        self.lock().values().map(|u| u.leases).sum()
    }

    /// The reserve kept on the volume, in bytes.
    pub fn reserve_bytes(&self) -> u64 {
        self.limits.min_free_bytes
    }

    /// The volume's free and total bytes (read at most [`DISK_CHECK_INTERVAL`] ago).
    pub fn disk(&self) -> (u64, u64) {
        self.disk.refresh_if_stale();
        (
            self.disk.free.load(Ordering::Relaxed),
            self.disk.total.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Usage>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn apply(usage: Usage, delta: Delta) -> Usage {
    let add = |value: u64, delta: i64| {
        if delta >= 0 {
            value.saturating_add(delta.unsigned_abs())
        } else {
            value.saturating_sub(delta.unsigned_abs())
        }
    };
    Usage {
        secrets: add(usage.secrets, delta.secrets),
        value_bytes: add(usage.value_bytes, delta.value_bytes),
        leases: add(usage.leases, delta.leases),
    }
}

/// Usage reserved for a change not yet committed; see [`Quotas::reserve`].
pub struct Reservation<'a> {
    quotas: &'a Quotas,
    tenant: TenantId,
    delta: Delta,
    kept: bool,
}

impl Reservation<'_> {
    /// The change was committed: the usage stays.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            let back = Delta {
                secrets: -self.delta.secrets,
                value_bytes: -self.delta.value_bytes,
                leases: -self.delta.leases,
            };
            self.quotas.committed(&self.tenant, back);
        }
    }
}

/// The free space of the data directory's volume.
struct DiskSpace {
    path: PathBuf,
    min_free: u64,
    free: AtomicU64,
    total: AtomicU64,
    /// Milliseconds since `epoch` of the last reading.
    checked: AtomicU64,
    epoch: Instant,
    /// Below twice the reserve (warned once per crossing).
    low: AtomicBool,
}

impl DiskSpace {
    fn new(path: PathBuf, min_free: u64) -> Self {
        let disk = Self {
            path,
            min_free,
            free: AtomicU64::new(u64::MAX),
            total: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            epoch: Instant::now(),
            low: AtomicBool::new(false),
        };
        disk.refresh();
        disk
    }

    fn nearly_full(&self) -> bool {
        self.refresh_if_stale();
        self.free.load(Ordering::Relaxed) < self.min_free
    }

    fn refresh_if_stale(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.checked.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= DISK_CHECK_INTERVAL.as_millis() as u64
            && self
                .checked
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.refresh();
        }
    }

    fn refresh(&self) {
        let stat = match rustix::fs::statvfs(&self.path) {
            Ok(stat) => stat,
            Err(e) => {
                tracing::warn!(error = %e, path = %self.path.display(), "cannot read the data volume's free space");
                return;
            }
        };
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let total = stat.f_blocks.saturating_mul(stat.f_frsize);
        self.free.store(free, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        let low = free < self.min_free.saturating_mul(2);
        if low != self.low.swap(low, Ordering::Relaxed) {
            if low {
                tracing::warn!(
                    free_mb = free >> 20,
                    reserve_mb = self.min_free >> 20,
                    "the data volume is nearly full: below the reserve, Store, Rotate and Lease are refused"
                );
            } else {
                tracing::info!(free_mb = free >> 20, "the data volume has room again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(secrets: u64) -> Quotas {
        Quotas::new(
            QuotaLimits {
                max_secrets_per_tenant: secrets,
                max_value_bytes_per_tenant: 1000,
                max_leases_per_tenant: 10,
                max_value_bytes_total: 1500,
                min_free_bytes: 0,
            },
            std::env::temp_dir(),
            HashMap::new(),
        )
    }

    #[test]
    fn reservations_are_kept_or_given_back_and_growth_stops_at_the_quota() {
        let q = quotas(2);
        let t = TenantId::parse("t").unwrap();
        let one = Delta {
            secrets: 1,
            value_bytes: 100,
            leases: 0,
        };
        q.reserve(&t, one).unwrap().keep();
        drop(q.reserve(&t, one).unwrap());
        assert_eq!(
            q.usage(&t).secrets,
            1,
            "a dropped reservation is given back"
        );
        q.reserve(&t, one).unwrap().keep();
        assert!(matches!(
            q.reserve(&t, one),
            Err(QuotaError::Tenant {
                what: "secrets",
                limit: 2,
                ..
            })
        ));
        // Giving back is never refused, and never goes below zero.
        q.committed(
            &t,
            Delta {
                secrets: -5,
                value_bytes: -100,
                leases: 0,
            },
        );
        assert_eq!(
            q.usage(&t),
            Usage {
                secrets: 0,
                value_bytes: 100,
                leases: 0
            }
        );
        let big = Delta {
            value_bytes: 901,
            ..Delta::default()
        };
        assert!(matches!(
            q.reserve(&t, big),
            Err(QuotaError::Tenant {
                what: "value bytes",
                ..
            })
        ));
    }
}
