//! Storage quotas: what one tenant may hold, and the free space kept for what must not fail.
//!
//! - Per tenant: active secrets, the bytes of their sealed values, and lease records (a lease
//!   counts until it is collected after its expiry, used up or not); and the value bytes of
//!   all tenants together. A request carries its change to the usage as a charge in its
//!   transaction, and the store's commit core refuses one that would take a tenant past a
//!   quota (`RESOURCE_EXHAUSTED`), against the usage the store holds: concurrent requests,
//!   on one process or on several replicas, cannot overshoot together (see
//!   `store/usage.rs`). Revocations and collection give usage back.
//! - The volume: below `min_free_mb` of free space, requests that make the store grow
//!   (Store, Rotate, Lease) are refused, so that revocations, redemptions and the audit
//!   entries of every request still have room. Free space is read from the file system at
//!   most every [`DISK_CHECK_INTERVAL`].
//!
//! - A full volume does not stop the start: the data directory holds a file of empty space
//!   (`space-reserve`, half the reserve, at most [`MAX_SPACE_FILE`]), which byokd deletes
//!   when it starts on a volume with less free space than that (saying so), so that the
//!   store can open and revocations be audited; it is made again at a start with room.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::model::TenantId;
pub use crate::store::usage::Delta;
use crate::store::usage::{Charge, Limits, OverQuota};

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

/// Why a request was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuotaError {
    /// A tenant's quota, or all tenants' (held by the store at commit).
    #[error(transparent)]
    Over(#[from] OverQuota),
    /// The volume is nearly full.
    #[error(
        "storage is nearly full: only revocations and reads are served until an operator makes room"
    )]
    VolumeNearlyFull,
}

/// The quotas, and the volume's free space.
pub struct Quotas {
    limits: QuotaLimits,
    disk: DiskSpace,
}

impl Quotas {
    /// Quotas under `limits`, for a store in `data_dir`.
    pub fn new(limits: QuotaLimits, data_dir: PathBuf) -> Self {
        Self {
            limits,
            disk: DiskSpace::new(data_dir, limits.min_free_bytes),
        }
    }

    /// The charge of a change that makes the store grow (Store, Rotate, Lease) by `delta`
    /// for `tenant`, held to the quotas when it commits; refused at once while the volume is
    /// nearly full.
    pub fn charge(&self, tenant: &TenantId, delta: Delta) -> Result<Charge, QuotaError> {
        if self.disk.nearly_full() {
            return Err(QuotaError::VolumeNearlyFull);
        }
        Ok(Charge {
            tenant: tenant.clone(),
            delta,
            limits: Some(Limits {
                secrets_per_tenant: self.limits.max_secrets_per_tenant,
                value_bytes_per_tenant: self.limits.max_value_bytes_per_tenant,
                leases_per_tenant: self.limits.max_leases_per_tenant,
                value_bytes_total: self.limits.max_value_bytes_total,
            }),
        })
    }

    /// The charge of a change that gives usage back (revocations, collection): never
    /// refused.
    pub fn give_back(tenant: &TenantId, delta: Delta) -> Charge {
        Charge {
            tenant: tenant.clone(),
            delta,
            limits: None,
        }
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
