//! The vault's operations: what each RPC means, independent of the wire protocol.
//!
//! Every operation authenticates and authorizes its caller, validates its input, decides
//! against what it read from the store, and commits its change together with the audit entry
//! that records it (see `store` for how a stale read is caught). A failed operation commits an
//! audit entry of its own; if that cannot be written, the operation fails (fail closed).

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use tokio::sync::watch;

use crate::admission::RefusedReport;
use crate::auth::{AuthError, CertIdentity, Operation, Principal, Principals};
use crate::chain::ChainKey;
use crate::config::Limits;
use crate::crypto::{self, Plaintext, Sealed, SymmetricKey};
use crate::keyring::{DataKeyCache, Keyring, WrapContext};
use crate::lease::LeasePolicy;
use crate::model::{
    Action, AuditDraft, EnvelopeRecord, KeysChanged, Outcome, PrincipalId, SecretId, SecretName,
    SecretRecord, TenantId, Time, ValidationError,
};
use crate::pending::Pending;
use crate::quota::Quotas;
use crate::ratelimit::Buckets;
use crate::rotation::{KeyringState, Rotator};
use crate::store::{Store, StoreError, Transaction, UsageKey};

/// Associated-data label of a sealed secret value.
const VALUE_AAD_LABEL: &str = "byokd/v1/secret-value";
/// Times an operation re-reads and retries after losing a race with another writer.
const MAX_ATTEMPTS: usize = 8;

/// Runs one operation: its audit entry `$audit` (a [`Pending`], which records a request
/// abandoned before it ends) is begun, `$body` runs with it, and [`Vault::conclude`] records a
/// failure with its reason. A body records the entry of a success itself: with the change it
/// commits, or alone ([`Vault::record`]).
macro_rules! operation {
    ($vault:expr, $caller:expr, $action:expr, |$audit:ident| $body:block) => {{
        #[allow(unused_mut)]
        let mut $audit = $vault.begin($caller, $action);
        let result = async $body.await;
        $vault.conclude($caller, $audit, result).await
    }};
}

/// Default page size of List.
pub const DEFAULT_LIST_PAGE_SIZE: usize = 50;
/// Largest page size of List.
pub const MAX_LIST_PAGE_SIZE: usize = 1000;
/// Expired leases removed per garbage-collection commit.
const GC_BATCH: usize = 1000;
/// Audit entries pruned per commit.
const PRUNE_BATCH: u64 = 10_000;
/// Entries buffered for a live audit stream's consumer.
const WATCH_BUFFER: usize = 256;

mod activity;
mod admin;
mod caller;
mod deletion;
mod error;
mod io;
mod leases;
mod life;
mod listing;
mod secrets;
mod sweep;
mod trail;
mod unwrap;
mod watcher;

pub use self::activity::{MAX_USAGE_DAYS, MAX_USAGE_ROWS, day_start};
pub use self::admin::check_envelopes;
pub use self::caller::Caller;
pub use self::deletion::{Held, given_back, held};
pub use self::error::{DecryptFailure, VaultError};
pub use self::io::*;
use self::listing::{ListFilter, MAX_LIST_SCAN};
pub use self::sweep::LifeCounts;
use self::trail::{audit_filter, note_filter_target};
use self::watcher::Watchers;

/// What a vault is made of.
pub struct VaultParts {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The master key versions.
    pub keyring: Arc<Keyring>,
    /// The unwrapped data key cache.
    pub cache: DataKeyCache,
    /// Master-key rotation.
    pub rotator: Arc<Rotator>,
    /// The audit chain's key.
    pub chain: Arc<ChainKey>,
    /// The configured principals.
    pub principals: Arc<Principals>,
    /// Lease limits.
    pub policy: LeasePolicy,
    /// Rate limits.
    pub limits: Limits,
    /// Where backups are written before they are streamed (the data directory).
    pub scratch_dir: PathBuf,
    /// Per-tenant quotas and the volume's reserve.
    pub quotas: Arc<Quotas>,
}

/// The vault.
pub struct Vault {
    limits: Limits,
    request_rate: Buckets<PrincipalId>,
    failure_buckets: Buckets<String>,
    failed_gets: std::sync::atomic::AtomicU64,
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    cache: DataKeyCache,
    rotator: Arc<Rotator>,
    chain: Arc<ChainKey>,
    principals: Arc<Principals>,
    policy: LeasePolicy,
    shutdown: watch::Sender<bool>,
    watchers: Arc<Watchers>,
    scratch_dir: PathBuf,
    /// The result of the latest [`Vault::probe`].
    serving: std::sync::atomic::AtomicBool,
    /// Audit queries running at once (on blocking threads, half the cores at most, so that
    /// scanning auditors leave the other callers CPU and async workers).
    scans: Arc<tokio::sync::Semaphore>,
    quotas: Arc<Quotas>,
}

/// Associated data of a sealed value: binds it to its tenant, secret and version, so that a
/// ciphertext moved to another record does not open.
fn value_aad(tenant: &TenantId, id: SecretId, version: u32) -> Vec<u8> {
    crypto::associated_data(
        VALUE_AAD_LABEL,
        &[
            tenant.as_str().as_bytes(),
            id.as_bytes(),
            &version.to_be_bytes(),
        ],
    )
}

fn wrap_context(record: &SecretRecord) -> WrapContext {
    WrapContext::SecretVersion {
        tenant: record.tenant.clone(),
        secret_id: record.id,
        version: record.version,
    }
}

/// Counts the attempts of a read-decide-commit operation, whose commit is guarded on what it
/// read: each lost race reads again, at most [`MAX_ATTEMPTS`] times, then the caller gets
/// [`VaultError::Contention`].
#[derive(Default)]
struct Attempts(usize);

impl Attempts {
    /// Starts the next attempt, if one is left.
    fn next(&mut self) -> Result<(), VaultError> {
        if self.0 == MAX_ATTEMPTS {
            return Err(VaultError::Contention);
        }
        self.0 += 1;
        Ok(())
    }
}

/// Parses the secret a request names into its audit entry, as far as it is valid (an invalid
/// part is noted as invalid, never copied). Called before authorization, so that a denied
/// request is audited with the target it named; the caller raises the validation error after
/// authorization, which keeps the errors' order.
fn secret_ref(
    caller: &Caller,
    audit: &mut AuditDraft,
    tenant: String,
    name: String,
) -> Result<(TenantId, SecretName), VaultError> {
    let tenant = noted(
        caller,
        "tenant",
        TenantId::from_request(tenant),
        &mut audit.tenant,
    );
    let name = noted(
        caller,
        "name",
        SecretName::from_request(name),
        &mut audit.name,
    );
    Ok((tenant?, name?))
}

/// A part of the target a request names, as parsed: kept in the audit entry's `slot` if it
/// is valid, noted as invalid (never copied) if not; the result is returned for the caller to
/// raise after authorization (see [`secret_ref`]).
fn noted<T: Clone>(
    caller: &Caller,
    field: &'static str,
    parsed: Result<T, ValidationError>,
    slot: &mut Option<T>,
) -> Result<T, ValidationError> {
    match &parsed {
        Ok(value) => *slot = Some(value.clone()),
        Err(_) => caller.note_invalid(field),
    }
    parsed
}

/// The secret a request names, for `operation`: noted in its audit entry as far as it is valid,
/// then the caller authorized (so that a denied request is audited with the target it
/// named), then the target's validity and the principal's tenant checked, in that order.
fn authorize_secret<'c>(
    caller: &'c Caller,
    audit: &mut AuditDraft,
    operation: Operation,
    tenant: String,
    name: String,
) -> Result<(&'c Principal, TenantId, SecretName), VaultError> {
    let target = secret_ref(caller, audit, tenant, name);
    let principal = caller.authorize(operation)?;
    let (tenant, name) = target?;
    principal.require_tenant(&tenant)?;
    Ok((principal, tenant, name))
}

impl Vault {
    /// A vault made of `parts`.
    pub fn new(parts: VaultParts) -> Self {
        let VaultParts {
            store,
            keyring,
            cache,
            rotator,
            chain,
            principals,
            policy,
            limits,
            scratch_dir,
            quotas,
        } = parts;
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            scans: Arc::new(tokio::sync::Semaphore::new((cores / 2).max(1))),
            quotas,
            limits,
            request_rate: Buckets::default(),
            failure_buckets: Buckets::default(),
            failed_gets: std::sync::atomic::AtomicU64::new(0),
            store,
            keyring,
            cache,
            rotator,
            chain,
            principals,
            policy,
            shutdown: watch::channel(false).0,
            watchers: Watchers::new(
                limits.max_watch_streams,
                limits.max_watch_streams_per_principal,
            ),
            scratch_dir,
            serving: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// (hits, misses) of the data key cache.
    pub fn cache_stats(&self) -> (u64, u64) {
        self.cache.stats()
    }

    /// Authenticates a request from `peer` by its `authorization` metadata and its client
    /// certificate's identities, and charges it to the principal's request rate.
    pub fn caller(
        &self,
        authorization: Option<&str>,
        cert: &[CertIdentity],
        peer: Option<Arc<str>>,
    ) -> Caller {
        let principal = self.principals.authenticate(authorization, cert).cloned();
        self.caller_authenticated(principal, peer)
    }

    /// A caller already authenticated (by admission, before the request took a slot),
    /// charged to the principal's request rate.
    pub fn caller_authenticated(
        &self,
        principal: Result<Principal, AuthError>,
        peer: Option<Arc<str>>,
    ) -> Caller {
        let rate_limited = match &principal {
            Ok(p) => !self.request_rate.take(
                &p.id,
                p.rate_limit.unwrap_or(self.limits.principal_rate_limit),
            ),
            Err(_) => false,
        };
        Caller {
            principal,
            peer,
            rate_limited,
            invalid: Default::default(),
            deadline: None,
        }
    }

    /// Whether the vault can serve: the store still accepts writes and the current master
    /// key unwraps its key-check record (for AWS KMS, one Decrypt call). The error says why
    /// not, for the logs.
    pub async fn probe(&self) -> Result<(), String> {
        let result = self.try_probe().await;
        self.serving
            .store(result.is_ok(), std::sync::atomic::Ordering::Relaxed);
        result
    }

    /// True once the store failed in a way only a restart clears.
    pub fn needs_restart(&self) -> bool {
        self.store.failed_for_good()
    }

    async fn try_probe(&self) -> Result<(), String> {
        if !self.store.writable() {
            return Err(
                "the store refuses writes (after a failed write or flush, or while the audit trail is damaged)"
                    .into(),
            );
        }
        let state = KeyringState::load(&*self.store)
            .await
            .map_err(|e| format!("keyring state: {e}"))?
            .ok_or("no keyring state")?;
        let (current, key_id) = self.keyring.current();
        let check = state
            .versions
            .iter()
            .find(|v| v.version == current)
            .map(|v| v.check.clone())
            .ok_or("no key-check record for the current master key")?;
        let key = self.keyring.current_key().ok_or("no current master key")?;
        crate::keyring::verify_key_check(&*key, &check)
            .await
            .map_err(|e| format!("master key {key_id}: {e}"))
    }

    /// Values for the metrics endpoint, read now.
    pub async fn metrics_snapshot(&self) -> Result<crate::metrics::Snapshot, VaultError> {
        let (cache_hits, cache_misses) = self.cache.stats();
        let (volume_free_bytes, volume_size_bytes) = self.quotas.disk();
        Ok(crate::metrics::Snapshot {
            leases_held: self.store.usage(&UsageKey::All).await?.leases,
            volume_free_bytes,
            volume_size_bytes,
            volume_reserve_bytes: self.quotas.reserve_bytes(),
            store_bytes: self.store.size_on_disk().await?,
            audit_head_seq: self.store.durable_audit_seq(),
            cache_hits,
            cache_misses,
            cache_keys: self.cache.len() as u64,
            serving: self.store.writable()
                && self.serving.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Records requests that admission refused for the unauthenticated rate over the last
    /// `interval`: one `Throttled` entry per host, and one for the rest.
    pub async fn record_refused(
        &self,
        report: &RefusedReport,
        interval: Duration,
    ) -> Result<(), VaultError> {
        let period = humantime::format_duration(interval);
        let mut entries = Vec::new();
        for (host, count) in &report.hosts {
            let mut entry = AuditDraft::new(Action::Throttled, None, Some(host.to_string()));
            entry.reason = format!(
                "refused {count} requests without valid credentials from this host in the last {period} (over [limits] unauthenticated_rate_limit)"
            );
            entries.push(entry);
        }
        let (count, hosts) = report.others;
        if count > 0 {
            let mut entry = AuditDraft::new(Action::Throttled, None, None);
            entry.reason = format!(
                "refused {count} requests without valid credentials from {hosts} other hosts in the last {period} (over [limits] unauthenticated_rate_limit)"
            );
            entries.push(entry);
        }
        for mut entry in entries {
            entry.outcome = Outcome::ResourceExhausted;
            self.record(entry).await?;
        }
        Ok(())
    }

    /// Ends every live audit stream (at shutdown), telling each where to resume.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Commits `tx`: `value` once it is durable, `None` if its guards no longer held (another
    /// request changed what the caller read: read again, see [`Attempts`]).
    async fn commit_or_retry<T>(&self, tx: Transaction, value: T) -> Result<Option<T>, VaultError> {
        match self.store.commit(tx).await {
            Ok(_) => Ok(Some(value)),
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The audit entry of a request that will be abandoned if dropped unconcluded.
    fn begin(&self, caller: &Caller, action: Action) -> Pending {
        Pending::new(caller.draft(action), self.store.clone(), caller.deadline)
    }

    async fn record(&self, audit: AuditDraft) -> Result<(), VaultError> {
        self.store.commit(Transaction::audit_only(audit)).await?;
        Ok(())
    }

    /// Passes a result through; a failure is first recorded in the audit trail. If the
    /// failure cannot be recorded, the caller gets the store's error instead (fail closed).
    async fn conclude<T>(
        &self,
        caller: &Caller,
        audit: Pending,
        result: Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let mut audit = audit.finish();
        let Err(error) = result else {
            return result;
        };
        audit.outcome = error.outcome();
        let mut reason = error.to_string();
        let invalid = caller
            .invalid
            .lock()
            .map(|i| i.join(", "))
            .unwrap_or_default();
        if !invalid.is_empty() {
            reason = format!("{reason}; the request named an invalid {invalid}");
        }
        audit.reason = if audit.reason.is_empty() {
            reason
        } else {
            format!("{reason} (caller's reason: {})", audit.reason)
        };
        if let Err(store_error) = self.store.commit(Transaction::audit_only(audit)).await {
            tracing::error!(error = %store_error, failed = %error, "could not audit a failed request");
            return Err(store_error.into());
        }
        Err(error)
    }

    /// Seals `value` as the current version of `record` under a fresh data key.
    async fn seal(
        &self,
        record: &SecretRecord,
        value: &Plaintext,
    ) -> Result<EnvelopeRecord, VaultError> {
        let data_key = SymmetricKey::generate().map_err(VaultError::Crypto)?;
        let aad = value_aad(&record.tenant, record.id, record.version);
        let sealed =
            crypto::seal(&data_key, value.expose_secret(), &aad).map_err(VaultError::Crypto)?;
        let wrapped_key = self
            .keyring
            .wrap(&data_key, &wrap_context(record))
            .await
            .map_err(VaultError::Keyring)?;
        Ok(EnvelopeRecord {
            secret_id: record.id,
            tenant: record.tenant.clone(),
            version: record.version,
            wrapped_key,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
            created_at: Time::now(),
            rev: Default::default(),
        })
    }

    /// Follows the store's audit feed, for what other processes sharing the store changed:
    /// drops the cached data keys of every secret whose keys a Rotate or Revoke destroyed
    /// (each replica has a cache of its own), and brings the keyring to the stored state when
    /// a master-key rotation started or finished. A Get does not depend on the first, as it
    /// opens the version the store names as current: this keeps destroyed keys out of memory.
    /// When entries were missed (the feed lagged), the whole cache is dropped and the keyring
    /// reread. Runs until the store closes; the server runs it only on an engine that
    /// processes share.
    pub async fn follow_keys(self: Arc<Self>) {
        use tokio::sync::broadcast::error::RecvError;
        let mut feed = self.store.subscribe_audit();
        loop {
            let keyring_changed = match feed.recv().await {
                Ok(record) => match record.entry.keys_changed() {
                    KeysChanged::Secret(id) => {
                        self.cache.evict_secret(id);
                        false
                    }
                    KeysChanged::MasterKey => true,
                    KeysChanged::None => false,
                },
                Err(RecvError::Lagged(_)) => {
                    self.cache.clear();
                    true
                }
                Err(RecvError::Closed) => return,
            };
            if keyring_changed && let Err(e) = self.rotator.follow_stored().await {
                tracing::error!(error = %e, "could not open the master key versions another process added");
            }
        }
    }

    /// Opens the envelope of `record`'s current version. The envelope must belong to it: the
    /// data key is bound to tenant, secret id and version, and so is the value. The data key
    /// comes from the cache when it can.
    async fn open(
        &self,
        record: &SecretRecord,
        envelope: &EnvelopeRecord,
    ) -> Result<Plaintext, VaultError> {
        let data_key = match self.cache.get(record.id, record.version) {
            Some(key) => {
                tracing::trace!(secret_id = %record.id, version = record.version, "data key from the cache");
                key
            }
            // Boxed: the unwrap (a master key's call, perhaps to AWS KMS) is a future many
            // times the size of the rest of a `Get`'s, which every request would otherwise
            // carry and copy as its future moves, for a path the cache spares most of them.
            None => Box::pin(self.unwrap_uncached(record, envelope)).await?,
        };
        let sealed = Sealed {
            nonce: envelope.nonce,
            ciphertext: envelope.ciphertext.clone(),
        };
        crypto::open(
            &data_key,
            &sealed,
            &value_aad(&record.tenant, record.id, record.version),
        )
        .map_err(|e| VaultError::Decrypt(DecryptFailure::Open(e)))
    }

    /// Unwraps the data key of `record`'s `envelope` with the master key, and caches it.
    async fn unwrap_uncached(
        &self,
        record: &SecretRecord,
        envelope: &EnvelopeRecord,
    ) -> Result<Arc<SymmetricKey>, VaultError> {
        tracing::trace!(secret_id = %record.id, version = record.version, "data key unwrapped by the master key");
        let generation = self.cache.generation();
        let context = wrap_context(record);
        let follow = || async {
            if let Err(e) = self.rotator.follow_stored().await {
                tracing::warn!(error = %e, "could not open the stored master key versions");
            }
        };
        let key = unwrap::unwrap_data_key(&self.keyring, &*self.store, follow, envelope, &context)
            .await?;
        let key = Arc::new(key);
        self.cache
            .insert(record.id, record.version, key.clone(), generation);
        Ok(key)
    }
}

fn page_size_or(requested: u32, default: usize, max: usize) -> Result<usize, ValidationError> {
    match usize::try_from(requested) {
        Ok(0) => Ok(default),
        Ok(n) if n <= max => Ok(n),
        _ => Err(ValidationError::new("page_size", format!("at most {max}"))),
    }
}
