//! Persistence behind a narrow trait.
//!
//! The rest of byokd reads records through [`Store`] and changes them only by committing a
//! [`Transaction`]: guards (what the caller's decision was based on), writes, and the audit
//! entry that records the change. A backend applies each transaction atomically, serialized
//! with every other one, and returns only once it is durable. This is what makes
//! check-then-act safe: if a guard no longer holds, nothing is written and the caller gets
//! [`StoreError::Conflict`] to re-read and decide again.
//!
//! The rules every engine shares (guards, revisions, audit sequencing and chain links, group
//! commit) live in `commit.rs`, and the quotas it holds tenants' usage to in `usage.rs`.
//! `sled/` and `postgres/` are the engine adapters, opened only through `engine.rs`, which
//! `[store] kind` chooses; `tests` holds the suite every engine must pass.

pub mod activity;
mod auditindex;
mod auditlog;
mod codec;
mod commit;
mod engine;
mod files;
pub mod postgres;
pub mod query;
mod records;
pub mod sled;
pub mod usage;

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::chain::ChainKey;
use crate::model::{
    AuditAnchor, AuditDraft, AuditRecord, EnvelopeRecord, LeaseId, LeaseRecord, PrincipalId,
    Revision, SecretId, SecretName, SecretRecord, TenantId, Time, TokenHash,
};

pub use self::activity::{DayQuery, DayRow, SecretActivity};
pub use self::auditlog::DEFAULT_SEGMENT_BYTES as DEFAULT_AUDIT_SEGMENT_BYTES;
pub use self::commit::RecordKey;
pub use self::engine::{Engine, KINDS};
pub use self::postgres::DatabaseUrl;
pub use self::query::{AuditFilter, AuditPage};
pub use self::records::Record;
pub use self::sled::{DEFAULT_CACHE_BYTES, RepairPlan, SledStore};
pub use self::usage::{Charge, OverQuota, Usage, UsageKey};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A guard of the transaction no longer held; nothing was written.
    #[error("transaction conflict: a guarded record changed")]
    Conflict,
    /// The storage engine failed.
    #[error("storage engine: {0}")]
    Engine(String),
    /// A stored record could not be decoded.
    #[error("corrupt stored record under {key}: {reason}")]
    Corrupt {
        /// Which record (key description, no values).
        key: String,
        /// Why it could not be decoded.
        reason: String,
    },
    /// An earlier flush failed, so durability can no longer be promised: the store refuses
    /// all further writes until restarted.
    #[error("store is failed after an earlier flush error")]
    Poisoned,
    /// An export's sink failed, or an import's source.
    #[error("export: {0}")]
    Export(String),
    /// The store was closed.
    #[error("store is closed")]
    Closed,
    /// An audit entry was committed before the audit chain's key was installed.
    #[error("audit chain not started")]
    ChainNotStarted,
    /// A prune named entries that do not exist.
    #[error("cannot prune the audit trail through seq {0}: no such entry")]
    PruneOutOfRange(u64),
    /// The audit trail is damaged (not merely torn by a crash): nothing is written until an
    /// operator restores the data directory or repairs the trail.
    #[error(
        "the audit trail is damaged: {0}; byokd writes nothing until an operator restores the \
         data directory from a backup or runs `byokd audit repair` (which records what was lost)"
    )]
    TrailDamaged(Box<TrailDamage>),
    /// A write failed before anything of it reached the disk (for example, no file descriptor
    /// was left to start a new audit segment); nothing changed, and the next write tries again.
    #[error("write failed, nothing was written: {0}")]
    Transient(String),
    /// A charge of the transaction would take a tenant past a quota; nothing was written.
    #[error(transparent)]
    OverQuota(#[from] OverQuota),
}

impl StoreError {
    /// True if the store cannot take writes now (closed, failed, damaged trail, or a write
    /// that failed before anything was written): callers get UNAVAILABLE, not INTERNAL.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Closed
                | StoreError::Poisoned
                | StoreError::TrailDamaged(_)
                | StoreError::Transient(_)
        )
    }
}

/// Where and how the audit trail is damaged. A torn last write, which a crash leaves, is not
/// damage: it is cut off at open. Anything else that is not a valid, complete, contiguous
/// run of frames is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailDamage {
    /// The file and offset, e.g. `audit/00000000000000000001.log at offset 4096`.
    pub location: String,
    /// What is wrong there.
    pub reason: String,
    /// The first entry the trail no longer holds intact; a repair keeps the entries before it.
    pub first_lost: u64,
}

impl std::fmt::Display for TrailDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (entries from {} on are lost or in doubt)",
            self.location, self.reason, self.first_lost
        )
    }
}

/// Named values kept beside the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaKey {
    /// The master key versions and the rotation job ([`crate::rotation::KeyringState`]).
    Keyring,
    /// The audit chain key's seed ([`crate::keyring::StoredKey`]).
    AuditSeed,
    /// SHA-256 of the bootstrap admin token, when no principals are configured.
    BootstrapAdmin,
    /// What `byokd audit repair` cut, until its `Repair` entry is in the trail (empty: none
    /// pending). The server refuses to start while one is pending.
    RepairPending,
    /// Which process holds the turn to run background work, until when
    /// ([`crate::runner::Turn`]).
    RunnerTurn,
    /// The process that last took that turn ([`crate::runner::Epoch`]): the jobs' fence.
    RunnerEpoch,
}

impl MetaKey {
    const ALL: [MetaKey; 6] = [
        MetaKey::Keyring,
        MetaKey::AuditSeed,
        MetaKey::BootstrapAdmin,
        MetaKey::RepairPending,
        MetaKey::RunnerTurn,
        MetaKey::RunnerEpoch,
    ];

    /// The key of this name.
    fn named(name: &str) -> Option<MetaKey> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            MetaKey::Keyring => "keyring",
            MetaKey::AuditSeed => "audit-seed",
            MetaKey::BootstrapAdmin => "bootstrap-admin",
            MetaKey::RepairPending => "audit-repair",
            MetaKey::RunnerTurn => "runner-turn",
            MetaKey::RunnerEpoch => "runner-epoch",
        }
    }
}

/// A typed meta value: its key and its encoding, in one place. Read with [`load_meta`],
/// written with [`put_meta`].
pub trait MetaValue: Sized {
    /// Where it is kept.
    const KEY: MetaKey;
    /// Its stored bytes.
    fn to_bytes(&self) -> Result<Vec<u8>, StoreError>;
    /// The value of stored bytes, if they decode.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

/// A meta value as read, with the revision a guard names.
#[derive(Debug, Clone)]
pub struct Meta<T> {
    /// Its revision.
    pub revision: Revision,
    /// The value.
    pub value: T,
}

impl<T: MetaValue> Meta<T> {
    /// The guard that the value is still the one read.
    pub fn guard(&self) -> Guard {
        Guard::meta(T::KEY, Some(self.revision))
    }
}

/// The meta value `T`, if stored.
pub async fn load_meta<T: MetaValue>(store: &dyn Store) -> Result<Option<Meta<T>>, StoreError> {
    let Some((revision, bytes)) = store.meta(T::KEY).await? else {
        return Ok(None);
    };
    let value = T::from_bytes(&bytes).ok_or_else(|| StoreError::Corrupt {
        key: format!("meta value {}", T::KEY.name()),
        reason: "undecodable".into(),
    })?;
    Ok(Some(Meta { revision, value }))
}

/// The write that stores `value`.
pub fn put_meta<T: MetaValue>(value: &T) -> Result<Write, StoreError> {
    Ok(Write::PutMeta(T::KEY, value.to_bytes()?))
}

/// Implements [`MetaValue`] for a type stored as its postcard encoding.
#[macro_export]
macro_rules! postcard_meta {
    ($t:ty, $key:expr) => {
        impl $crate::store::MetaValue for $t {
            const KEY: $crate::store::MetaKey = $key;
            fn to_bytes(&self) -> Result<Vec<u8>, $crate::store::StoreError> {
                postcard::to_stdvec(self)
                    .map_err(|e| $crate::store::StoreError::Engine(format!("encode: {e}")))
            }
            fn from_bytes(bytes: &[u8]) -> Option<Self> {
                postcard::from_bytes(bytes).ok()
            }
        }
    };
}

/// What `byokd audit repair` cut, until its `Repair` entry is in the trail (empty: none
/// pending), as UTF-8 text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairNote(pub String);

impl MetaValue for RepairNote {
    const KEY: MetaKey = MetaKey::RepairPending;
    fn to_bytes(&self) -> Result<Vec<u8>, StoreError> {
        Ok(self.0.as_bytes().to_vec())
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(String::from_utf8_lossy(bytes).into_owned()))
    }
}

/// An index of the audit trail: the sequence numbers of the entries with one value of one
/// field, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditIndex {
    /// Entries about one secret.
    Secret(TenantId, SecretName),
    /// Entries about one tenant.
    Tenant(TenantId),
    /// Entries by one principal.
    Principal(PrincipalId),
    /// Entries from one peer host (IP address, any port).
    PeerHost(String),
}

/// A condition a transaction's writes depend on: the record must still be at the revision the
/// caller read (`None`: must still be absent). Built with [`Guard::secret`], [`Guard::lease`],
/// [`Guard::envelope`] or [`Guard::meta`].
#[derive(Debug, Clone)]
pub struct Guard {
    /// The record.
    pub key: RecordKey,
    /// Its revision as read.
    pub expect: Option<Revision>,
}

/// A change to apply.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace a secret's metadata.
    PutSecret(SecretRecord),
    /// Delete a secret's metadata (a purge: its name is free again).
    DeleteSecret {
        /// Its tenant.
        tenant: TenantId,
        /// Its name.
        name: SecretName,
    },
    /// Insert or replace a version's envelope.
    PutEnvelope(EnvelopeRecord),
    /// Delete every envelope of the secret except version `keep` (crypto-shredding: the
    /// wrapped data keys are gone).
    DestroyEnvelopes {
        /// The secret.
        secret_id: SecretId,
        /// The version to keep, if any.
        keep: Option<u32>,
    },
    /// Insert or replace a lease (and its indexes).
    PutLease(LeaseRecord),
    /// Replace an existing lease whose id, token hash and expiry are unchanged (uses,
    /// revocation): its indexes stay as they are.
    UpdateLease(LeaseRecord),
    /// Delete a lease (and its indexes).
    DeleteLease(LeaseRecord),
    /// Set a meta value.
    PutMeta(MetaKey, Vec<u8>),
    /// Delete every audit entry up to and including `through` (and their index entries), and
    /// move the chain's anchor to entry `through`.
    PruneAudit {
        /// Last sequence number to delete.
        through: u64,
    },
}

/// An atomic unit of change.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    /// What it adds to (or gives back from) tenants' usage: checked against their quotas with
    /// the guards (see `usage.rs`).
    pub charges: Vec<Charge>,
    /// All must hold, or nothing is written.
    pub guards: Vec<Guard>,
    /// Applied together.
    pub writes: Vec<Write>,
    /// The audit entry recording the change, committed in the same atomic batch.
    pub audit: Option<AuditDraft>,
}

impl Transaction {
    /// A transaction that only appends an audit entry.
    pub fn audit_only(entry: AuditDraft) -> Self {
        Self {
            charges: Vec::new(),
            guards: Vec::new(),
            writes: Vec::new(),
            audit: Some(entry),
        }
    }
}

/// What a commit produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Sequence number of the transaction's audit entry, if it had one.
    pub audit_seq: Option<u64>,
}

/// A lease with what its redemption needs, read from one state of the store.
#[derive(Debug, Clone)]
pub struct Redemption {
    /// The lease.
    pub lease: LeaseRecord,
    /// Its secret, if it still exists.
    pub secret: Option<SecretRecord>,
    /// The envelope of the secret's current version, if it exists.
    pub envelope: Option<EnvelopeRecord>,
}

/// The storage backend.
///
/// Reads see every committed transaction. A commit returns only after its changes, and every
/// change committed before it, are durable.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// The secret `tenant`/`name`.
    async fn secret(
        &self,
        tenant: &TenantId,
        name: &SecretName,
    ) -> Result<Option<SecretRecord>, StoreError>;

    /// Up to `limit` secrets of `tenant` ordered by name, starting after `after`.
    async fn list_secrets(
        &self,
        tenant: &TenantId,
        after: Option<&SecretName>,
        limit: usize,
    ) -> Result<Vec<SecretRecord>, StoreError>;

    /// Up to `limit` secrets of every tenant, ordered by tenant and name, starting after
    /// `after` (for the background sweep of secrets' lifecycles).
    async fn all_secrets(
        &self,
        after: Option<(&TenantId, &SecretName)>,
        limit: usize,
    ) -> Result<Vec<SecretRecord>, StoreError>;

    /// The envelope of one secret version.
    async fn envelope(
        &self,
        secret_id: SecretId,
        version: u32,
    ) -> Result<Option<EnvelopeRecord>, StoreError>;

    /// Up to `limit` envelopes after `after` (secret id, version), in storage order.
    async fn envelopes_after(
        &self,
        after: Option<(SecretId, u32)>,
        limit: usize,
    ) -> Result<Vec<EnvelopeRecord>, StoreError>;

    /// How many envelopes exist.
    async fn envelope_count(&self) -> Result<u64, StoreError>;

    /// The lease with this token hash.
    async fn lease_by_token(
        &self,
        token_hash: &TokenHash,
    ) -> Result<Option<LeaseRecord>, StoreError>;

    /// The lease with this token hash, its secret and the envelope of the secret's current
    /// version, all as of one state of the store (a `Get` costs one read). An engine may
    /// answer from copies it keeps instead, as long as a stale copy fails the guards of the
    /// commit that uses it (and the read after that [`StoreError::Conflict`] is fresh), and
    /// only copies that let the lease be redeemed are answered from.
    async fn redemption(&self, token_hash: &TokenHash) -> Result<Option<Redemption>, StoreError>;

    /// The lease with this id.
    async fn lease_by_id(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError>;

    /// Up to `limit` leases that expired before `now`, oldest expiry first.
    async fn expired_leases(&self, now: Time, limit: usize)
    -> Result<Vec<LeaseRecord>, StoreError>;

    /// Up to `limit` audit entries with `seq >= from`, in order.
    async fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;

    /// The audit entry `seq`.
    async fn audit_entry(&self, seq: u64) -> Result<Option<AuditRecord>, StoreError>;

    /// The latest audit entry.
    async fn audit_head(&self) -> Result<Option<AuditRecord>, StoreError>;

    /// The chain's anchor, if entries were ever pruned.
    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError>;

    /// Up to `limit` sequence numbers `>= from` in `index`, ascending.
    async fn audit_index(
        &self,
        index: &AuditIndex,
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError>;

    /// Up to `page_size` entries matching `filter`, from `from` on and none after
    /// `until_seq`, examining a bounded number of entries per call (the page says where to
    /// resume). An engine with secondary indexes answers it in one request; one without
    /// walks the trail's indexes ([`query::walk`]).
    async fn audit_query(
        &self,
        filter: &AuditFilter,
        from: u64,
        until_seq: u64,
        page_size: usize,
    ) -> Result<AuditPage, StoreError>;

    /// The sequence number of the latest audit entry known to be durable.
    fn durable_audit_seq(&self) -> u64;

    /// Audit entries as they become durable, from now on. A receiver that falls behind the
    /// channel's capacity is told how many it missed (and can read them from the store).
    fn subscribe_audit(&self) -> broadcast::Receiver<Arc<AuditRecord>>;

    /// Installs the audit chain's key. Until then, commits that carry an audit entry fail
    /// with [`StoreError::ChainNotStarted`].
    async fn start_audit_chain(&self, key: Arc<ChainKey>) -> Result<(), StoreError>;

    /// A meta value's stored bytes and revision (callers read it typed, with [`load_meta`]).
    async fn meta(&self, key: MetaKey) -> Result<Option<(Revision, Vec<u8>)>, StoreError>;

    /// Applies `tx` atomically if its guards hold, and returns once it is durable.
    async fn commit(&self, tx: Transaction) -> Result<Committed, StoreError>;

    /// Flushes and stops accepting commits.
    async fn close(&self) -> Result<(), StoreError>;

    /// Bytes the store occupies on disk.
    async fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// What a tenant (or all together) holds, as of the latest commit this store knows.
    async fn usage(&self, key: &UsageKey) -> Result<Usage, StoreError>;

    /// How much each of `ids` was used, in their order (a secret never used: zero), as of
    /// the latest commit this store knows.
    async fn activity(&self, ids: &[SecretId]) -> Result<Vec<SecretActivity>, StoreError>;

    /// The day buckets `query` names, in no particular order: at most `query.limit`, or one
    /// more if there are more.
    async fn activity_days(&self, query: &DayQuery) -> Result<Vec<DayRow>, StoreError>;

    /// False while the store refuses writes: after a failed write or flush, or while the
    /// audit trail is damaged.
    fn writable(&self) -> bool;

    /// True once a write or flush failed in a way only a restart can clear (durability
    /// unknown): liveness turns NOT_SERVING so that an orchestrator restarts the process.
    fn failed_for_good(&self) -> bool;

    /// Passes every record except leases (which a restore must not bring back) to `sink`,
    /// from one consistent state: the records while writes wait, then the audit trail up to
    /// its head at that moment (append-only, read without holding writes). Returns how many
    /// records were passed.
    async fn export(&self, sink: ExportSink) -> Result<u64, StoreError>;

    /// Loads the records of an export (in the order [`Store::export`] gives them, or any
    /// order that keeps audit entries in seq order) into this store, which must hold no
    /// record and no audit entry yet. Returns how many records it loaded, once they are
    /// durable. A failed import leaves the store refusing writes: discard it.
    async fn import(&self, source: ImportSource) -> Result<u64, StoreError>;
}

/// Runs `work` (store reads that may block for long, such as scans and counts, or CPU work
/// over them, such as hashing the trail) on a blocking thread, off the async workers.
pub async fn on_blocking_thread<F>(work: F) -> Result<F::Output, tokio::task::JoinError>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || runtime.block_on(work)).await
}

/// Receives the records of an export; an error stops it.
pub type ExportSink = Box<dyn FnMut(Record) -> Result<(), String> + Send>;

/// Yields the records of an import, until `None`; an error stops it.
pub type ImportSource = Box<dyn FnMut() -> Result<Option<Record>, String> + Send>;

/// Decodes `bytes` as each kind of stored record (for the fuzz targets): an error is fine, a
/// panic is a bug.
pub(crate) fn decode_any_record(bytes: &[u8]) {
    let key = [codec::SECRET];
    let _ = codec::decode_record::<SecretRecord>(&key, bytes);
    let _ = codec::decode_record::<EnvelopeRecord>(&key, bytes);
    let _ = codec::decode_record::<LeaseRecord>(&key, bytes);
    let _ = codec::decode::<AuditRecord>(&key, bytes);
    let _ = codec::decode::<AuditAnchor>(&key, bytes);
    let _ = codec::decode::<activity::Counted<SecretActivity>>(&key, bytes);
    let _ = codec::decode::<activity::Counted<Option<activity::DayValue>>>(&key, bytes);
    let _ = codec::activity_day_of_key(bytes);
}

/// Opens an audit trail made of the given files' bytes (for the fuzz targets): first the
/// segment alone, as the active one; then sealed, with its offset (`.idx`) and index
/// (`.ndx`) files, by an empty active segment that starts after its last entry. Each open
/// reads every entry, looks up an index key and scrubs. Whatever the bytes, each step ends
/// in a value or an error, never a panic.
pub(crate) fn read_any_trail(segment: &[u8], offsets: &[u8], index: &[u8]) {
    const KEY: &[u8] = b"T\x00fuzz\x00";
    let indexer: auditindex::Indexer = std::sync::Arc::new(|_: &[u8]| vec![KEY.to_vec()]);
    let name =
        |dir: &std::path::Path, first: u64, ext: &str| dir.join(format!("{first:020}.{ext}"));
    let exercise = |log: &auditlog::AuditLog| {
        let _ = log.read(1, 100_000, true);
        let _ = log.lookup(KEY, 1, 1000);
        let _ = log.scrub(&std::sync::atomic::AtomicBool::new(false));
        log.head().ok().flatten().map(|f| f.position)
    };
    let Ok(active) = tempfile::tempdir() else {
        return;
    };
    if std::fs::write(name(active.path(), 1, "log"), segment).is_err() {
        return;
    }
    let last = auditlog::AuditLog::open(active.path(), u64::MAX, indexer.clone())
        .ok()
        .and_then(|log| exercise(&log))
        .unwrap_or(1);
    let Ok(sealed) = tempfile::tempdir() else {
        return;
    };
    let dir = sealed.path();
    let written = std::fs::write(name(dir, 1, "log"), segment)
        .and_then(|()| std::fs::write(name(dir, 1, "idx"), offsets))
        .and_then(|()| std::fs::write(name(dir, 1, "ndx"), index))
        .and_then(|()| std::fs::write(name(dir, last.saturating_add(1), "log"), []));
    if written.is_ok()
        && let Ok(log) = auditlog::AuditLog::open(dir, u64::MAX, indexer)
    {
        exercise(&log);
    }
}

#[cfg(test)]
pub(crate) mod tests;
