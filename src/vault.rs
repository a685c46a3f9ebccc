//! The vault's operations: what each RPC means, independent of the wire protocol.
//!
//! Every operation authenticates and authorizes its caller, validates its input, decides
//! against what it read from the store, and commits its change together with the audit entry
//! that records it (see `store` for how a stale read is caught). A failed operation commits an
//! audit entry of its own; if that cannot be written, the operation fails (fail closed).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};

use crate::admission::RefusedReport;
use crate::audit::{self, AuditError, AuditFilter, AuditPage, RecordedHead, Verification};
use crate::auth::{AuthError, CertIdentity, Operation, Principal, Principals};
use crate::backup::{BackupError, BackupHeader, BackupWriter};
use crate::chain::ChainKey;
use crate::config::Limits;
use crate::crypto::{self, CryptoError, Plaintext, Sealed, SymmetricKey};
use crate::keyring::{DataKeyCache, Keyring, KeyringError, WrapContext};
use crate::lease::{self, LeaseError, LeasePolicy, LeaseToken, RequestedTtl};
use crate::model::{
    Action, AuditDraft, AuditRecord, ChainHash, EnvelopeRecord, Labels, LeaseId, LeaseRecord,
    Outcome, PrincipalId, Provider, Reason, SecretId, SecretName, SecretRecord, SecretState,
    TenantId, Time, TokenHash, ValidationError, check_value_len, value_hint,
};
use crate::pending::Pending;
use crate::quota::{Delta, QuotaError, Quotas};
use crate::ratelimit::Buckets;
use crate::rotation::{KeyringState, RotationError, RotationJob, Rotator};
use crate::store::{Guard, Redemption, Store, StoreError, Transaction, Write};

/// Associated-data label of a sealed secret value.
const VALUE_AAD_LABEL: &str = "byokd/v1/secret-value";
/// Times an operation re-reads and retries after losing a race with another writer.
const MAX_ATTEMPTS: usize = 8;
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

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Authentication or authorization failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The request was malformed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No such secret.
    #[error("secret not found")]
    SecretNotFound,
    /// No such lease (or one in a tenant the caller cannot see).
    #[error("lease not found")]
    LeaseNotFound,
    /// The name is taken.
    #[error("a secret with this name already exists")]
    AlreadyExists,
    /// The secret is revoked.
    #[error("secret is revoked")]
    SecretRevoked,
    /// A lease could not be issued or redeemed.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// An audit query failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Other writers kept changing the records this operation depends on.
    #[error("too much contention on this secret; retry")]
    Contention,
    /// A stored value could not be decrypted. The cause is for logs only.
    #[error("decryption failed")]
    Decrypt(DecryptFailure),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The master key failed (other than a failed unwrap).
    #[error(transparent)]
    Keyring(KeyringError),
    /// The crypto core failed (other than a failed open).
    #[error(transparent)]
    Crypto(CryptoError),
    /// A background task failed.
    #[error("background task: {0}")]
    Background(tokio::task::JoinError),
    /// A tenant quota, or the volume's reserve.
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// A master-key rotation could not start or be found.
    #[error(transparent)]
    Rotation(RotationError),
    /// Too many failed lease redemptions from this peer or principal.
    #[error("too many failed lease redemptions; retry later")]
    TooManyFailures,
    /// A backup could not be written.
    #[error("backup: {0}")]
    Backup(BackupError),
    /// The requested audit entries were pruned by retention.
    #[error("from_seq: entries before {first_kept} were pruned by retention")]
    Pruned {
        /// The first entry still kept.
        first_kept: u64,
    },
    /// A sequence number past the audit trail's head.
    #[error("{field}: past the audit trail's head (entry {head})")]
    PastHead {
        /// The request field.
        field: &'static str,
        /// The head's seq.
        head: u64,
    },
    /// Too many live audit streams.
    #[error("too many audit streams open {scope} (at most {max}); close one or retry later")]
    TooManyStreams {
        /// "for this principal" or "in all".
        scope: &'static str,
        /// The limit.
        max: usize,
    },
}

/// Why a stored value did not decrypt; logged, never returned to callers.
#[derive(Debug)]
pub enum DecryptFailure {
    /// The version's envelope is missing although the secret is active.
    MissingEnvelope,
    /// The data key did not unwrap.
    Unwrap(KeyringError),
    /// The value did not open under its data key.
    Open(CryptoError),
}

impl VaultError {
    /// The outcome recorded in the audit trail and returned to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            VaultError::Auth(
                AuthError::MissingToken
                | AuthError::MalformedHeader
                | AuthError::UnknownToken
                | AuthError::UnknownCertificate
                | AuthError::CredentialsDisagree
                | AuthError::AmbiguousCertificate { .. },
            ) => Outcome::Unauthenticated,
            VaultError::Auth(AuthError::RateLimited { .. })
            | VaultError::TooManyFailures
            | VaultError::TooManyStreams { .. }
            | VaultError::Quota(_) => Outcome::ResourceExhausted,
            VaultError::Auth(_) => Outcome::PermissionDenied,
            VaultError::Invalid(_) | VaultError::Audit(AuditError::InvalidPageToken) => {
                Outcome::InvalidArgument
            }
            VaultError::Audit(AuditError::Abandoned) => Outcome::Cancelled,
            VaultError::SecretNotFound | VaultError::LeaseNotFound => Outcome::NotFound,
            VaultError::AlreadyExists => Outcome::AlreadyExists,
            VaultError::SecretRevoked => Outcome::FailedPrecondition,
            VaultError::Pruned { .. } | VaultError::PastHead { .. } => Outcome::OutOfRange,
            VaultError::Lease(
                LeaseError::TtlNotPositive
                | LeaseError::TtlTooLong { .. }
                | LeaseError::TooManyUses { .. },
            ) => Outcome::InvalidArgument,
            VaultError::Lease(_) => Outcome::NotFound,
            VaultError::Contention | VaultError::Store(StoreError::Conflict) => Outcome::Aborted,
            VaultError::Decrypt(_) => Outcome::DataLoss,
            VaultError::Store(e)
            | VaultError::Audit(AuditError::Store(e))
            | VaultError::Rotation(RotationError::Store(e))
                if e.is_unavailable() =>
            {
                Outcome::Unavailable
            }
            VaultError::Keyring(KeyringError::Unavailable(_))
            | VaultError::Rotation(RotationError::Keyring(KeyringError::Unavailable(_))) => {
                Outcome::Unavailable
            }
            VaultError::Keyring(KeyringError::KeyUnusable(_))
            | VaultError::Rotation(RotationError::Keyring(KeyringError::KeyUnusable(_)))
            | VaultError::Rotation(RotationError::InProgress(_)) => Outcome::FailedPrecondition,
            VaultError::Rotation(RotationError::NoSuchJob(_)) => Outcome::NotFound,
            VaultError::Store(_)
            | VaultError::Audit(AuditError::Store(_))
            | VaultError::Keyring(_)
            | VaultError::Rotation(_)
            | VaultError::Crypto(_)
            | VaultError::Backup(_)
            | VaultError::Background(_) => Outcome::Internal,
        }
    }

    /// The message returned to the caller: precise about the caller's own mistakes, silent
    /// about internals, and the same for every failed lease redemption (no oracle telling
    /// "no such lease" from "expired" from "used up").
    pub fn public_message(&self) -> String {
        match self.outcome() {
            Outcome::Internal => "internal error".to_string(),
            Outcome::Unavailable => "service unavailable; retry later".to_string(),
            _ => match self {
                VaultError::Lease(LeaseError::TtlNotPositive) => {
                    "ttl: must be positive".to_string()
                }
                VaultError::Lease(
                    e @ (LeaseError::TtlTooLong { .. } | LeaseError::TooManyUses { .. }),
                ) => e.to_string(),
                VaultError::Lease(_) => "lease not found or no longer valid".to_string(),
                VaultError::Auth(AuthError::UnknownToken) => "invalid bearer token".to_string(),
                // Which principals, for the audit trail only.
                VaultError::Auth(AuthError::AmbiguousCertificate { .. }) => {
                    "client certificate names more than one principal".to_string()
                }
                // Key ids and the key service's words stay in the logs.
                VaultError::Keyring(_) | VaultError::Rotation(RotationError::Keyring(_)) => {
                    "master key unusable".to_string()
                }
                VaultError::Auth(AuthError::MalformedHeader) => {
                    "malformed authorization metadata: expected 'Bearer <token>'".to_string()
                }
                other => other.to_string(),
            },
        }
    }

    /// True if the failure is byokd's fault rather than the caller's: to be logged with its
    /// cause.
    pub fn is_internal(&self) -> bool {
        matches!(
            self.outcome(),
            Outcome::Internal | Outcome::Unavailable | Outcome::DataLoss
        ) || matches!(
            self,
            VaultError::Keyring(_) | VaultError::Rotation(RotationError::Keyring(_))
        )
    }
}

/// Who is calling: the authentication result and where from. Authentication failures are
/// kept, not raised, so that the operation can audit them.
pub struct Caller {
    principal: Result<Principal, AuthError>,
    peer: Option<String>,
    /// The principal has used up its request rate.
    rate_limited: bool,
    /// Parts of the request's target that were not valid: a failure's audit entry says so
    /// (the value itself is never recorded).
    invalid: std::sync::Mutex<Vec<&'static str>>,
    /// When the request's answer is no longer wanted (see [`Pending`]).
    deadline: Option<Instant>,
}

impl Caller {
    /// The caller, whose request's answer is no longer wanted after `deadline`.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    fn authorize(&self, operation: Operation) -> Result<&Principal, VaultError> {
        let principal = self.principal.as_ref().map_err(|e| e.clone())?;
        if self.rate_limited {
            return Err(AuthError::RateLimited {
                principal: principal.id.clone(),
            }
            .into());
        }
        principal.require(operation)?;
        Ok(principal)
    }

    /// [`Caller::authorize`] for an operation on the whole vault: the principal must also
    /// have every tenant in scope.
    fn authorize_global(&self, operation: Operation) -> Result<&Principal, VaultError> {
        let principal = self.authorize(operation)?;
        if !principal.may_access_all() {
            return Err(AuthError::GlobalScopeRequired {
                principal: principal.id.clone(),
            }
            .into());
        }
        Ok(principal)
    }

    /// The keys of the caller's failed-redemption buckets: its peer host together with its
    /// principal (so that one principal's bad guesses do not lock out another's valid Gets
    /// from the same host), and its principal from any host.
    fn failure_keys(&self) -> Vec<String> {
        let principal = self.principal.as_ref().ok().map(|p| p.id.as_str());
        let mut keys = Vec::with_capacity(2);
        if let Some(peer) = &self.peer {
            keys.push(format!(
                "peer:{}|{}",
                crate::model::peer_host(peer),
                principal.unwrap_or("")
            ));
        }
        if let Some(principal) = principal {
            keys.push(format!("principal:{principal}"));
        }
        keys
    }

    /// Notes that the request named an invalid `field` (tenant, name, lease id, ...).
    fn note_invalid(&self, field: &'static str) {
        let mut invalid = self.invalid.lock().unwrap_or_else(|p| p.into_inner());
        if !invalid.contains(&field) {
            invalid.push(field);
        }
    }

    fn draft(&self, action: Action) -> AuditDraft {
        AuditDraft::new(
            action,
            self.principal.as_ref().ok().map(|p| p.id.clone()),
            self.peer.clone(),
        )
    }
}

/// Input of Store, as received.
pub struct StoreInput {
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Provider.
    pub provider: String,
    /// The value.
    pub value: Plaintext,
    /// Labels.
    pub labels: HashMap<String, String>,
}

/// Input of Lease, as received.
pub struct LeaseInput {
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Requested lifetime.
    pub ttl: RequestedTtl,
    /// Requested uses (0: one).
    pub max_uses: u32,
    /// Principal allowed to redeem it (empty: any reader of the tenant).
    pub audience: String,
}

/// What Revoke targets, as received.
pub enum RevokeTarget {
    /// None given.
    Missing,
    /// A whole secret.
    Secret {
        /// Tenant.
        tenant: String,
        /// Name.
        name: String,
    },
    /// One lease, by id.
    Lease(String),
}

/// Audit filters, as received; empty means any.
#[derive(Default)]
pub struct AuditFilterInput {
    /// Tenant filter.
    pub tenant: String,
    /// Name filter.
    pub name: String,
    /// Principal filter.
    pub principal: String,
    /// Action filter.
    pub action: String,
    /// Peer filter: a host, or host:port.
    pub peer: String,
    /// Outcome filter: a gRPC code name.
    pub outcome: String,
    /// Lower time bound, seconds and nanoseconds.
    pub since: Option<(i64, i32)>,
    /// Upper time bound, seconds and nanoseconds.
    pub until: Option<(i64, i32)>,
}

/// Input of Audit, as received.
#[derive(Default)]
pub struct AuditInput {
    /// Filters.
    pub filter: AuditFilterInput,
    /// Page size (0: default).
    pub page_size: u32,
    /// Page token.
    pub page_token: String,
}

/// Input of VerifyAudit, as received.
#[derive(Default)]
pub struct VerifyInput {
    /// First seq to check (0: from the chain's start).
    pub from_seq: u64,
    /// Last seq to check (0: to the head).
    pub to_seq: u64,
    /// A head recorded earlier that the trail must still reach (0: none).
    pub recorded_head_seq: u64,
    /// Its hash, hex.
    pub recorded_head_hash: String,
    /// Entries to check in this call (0, or more than [`MAX_VERIFY_PAGE`]: that many).
    pub max_entries: u64,
}

/// The name of a backup's temporary file in the data directory starts with this (files
/// left by a killed process are deleted at start).
pub const BACKUP_TEMP_PREFIX: &str = ".backup-";

/// Entries one VerifyAudit call checks at most (about a second of CPU): a longer check
/// resumes where the last one stopped.
pub const MAX_VERIFY_PAGE: u64 = 1_000_000;

/// Input of WatchAudit, as received.
#[derive(Default)]
pub struct WatchInput {
    /// Filters (time bounds are ignored).
    pub filter: AuditFilterInput,
    /// First seq to send (0: only entries from now on).
    pub from_seq: u64,
}

/// What a live audit stream yields.
pub enum WatchEvent {
    /// A matching entry.
    Entry(Box<AuditRecord>),
    /// The server ends the stream; reconnecting with `from_seq = resume_at` continues
    /// without a gap.
    Ended {
        /// Where to resume.
        resume_at: u64,
    },
    /// Entries the stream had not sent yet were pruned by retention; the trail now starts
    /// at `resume_at`.
    Pruned {
        /// The first entry still kept.
        resume_at: u64,
    },
}

/// A lease just issued, with the token to hand over once.
pub struct IssuedLease {
    /// The lease.
    pub lease: LeaseRecord,
    /// Its token.
    pub token: LeaseToken,
}

/// A redeemed lease.
pub struct Redeemed {
    /// The secret value.
    pub value: Plaintext,
    /// The secret's metadata.
    pub secret: SecretRecord,
    /// The lease after this use.
    pub lease: LeaseRecord,
}

/// Result of Revoke.
pub struct Revoked {
    /// The target was already revoked.
    pub already_revoked: bool,
    /// The secret's tombstone, when a secret was revoked.
    pub secret: Option<SecretRecord>,
}

/// A backup taken by [`Vault::backup`].
pub struct BackupFile {
    /// The file; deleted when dropped.
    pub file: tempfile::NamedTempFile,
    /// Records it holds.
    pub records: u64,
    /// Its header.
    pub header: BackupHeader,
}

/// Unwraps every stored data key and opens every stored value (a restored data directory's
/// decrypt check). Returns how many versions opened; the first failure stops the check.
pub async fn check_envelopes(store: &dyn Store, keyring: &Keyring) -> Result<u64, VaultError> {
    let mut after = None;
    let mut checked = 0;
    loop {
        let page = store.envelopes_after(after, 256).await?;
        let Some(last) = page.last() else {
            return Ok(checked);
        };
        after = Some((last.secret_id, last.version));
        for envelope in &page {
            let context = WrapContext::SecretVersion {
                tenant: envelope.tenant.clone(),
                secret_id: envelope.secret_id,
                version: envelope.version,
            };
            let key = keyring
                .unwrap(&envelope.wrapped_key, &context)
                .await
                .map_err(|e| VaultError::Decrypt(DecryptFailure::Unwrap(e)))?;
            let sealed = Sealed {
                nonce: envelope.nonce,
                ciphertext: envelope.ciphertext.clone(),
            };
            crypto::open(
                &key,
                &sealed,
                &value_aad(&envelope.tenant, envelope.secret_id, envelope.version),
            )
            .map_err(|e| VaultError::Decrypt(DecryptFailure::Open(e)))?;
            checked += 1;
        }
    }
}

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
        peer: Option<String>,
    ) -> Caller {
        let principal = self.principals.authenticate(authorization, cert).cloned();
        self.caller_authenticated(principal, peer)
    }

    /// A caller already authenticated (by admission, before the request took a slot),
    /// charged to the principal's request rate.
    pub fn caller_authenticated(
        &self,
        principal: Result<Principal, AuthError>,
        peer: Option<String>,
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
            leases_held: self.quotas.leases(),
            volume_free_bytes,
            volume_size_bytes,
            volume_reserve_bytes: self.quotas.reserve_bytes(),
            store_bytes: self.store.size_on_disk().await?,
            audit_head_seq: self.store.durable_audit_seq(),
            cache_hits,
            cache_misses,
            serving: self.store.writable()
                && self.serving.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Takes a backup: every record but leases, from one consistent state, into a
    /// temporary file in the data directory (deleted when the returned file is dropped).
    /// Writes wait while the records are copied. Admin only.
    pub async fn backup(&self, caller: &Caller) -> Result<BackupFile, VaultError> {
        let mut audit = self.begin(caller, Action::Backup);
        let result = async {
            caller.authorize_global(Operation::Backup)?;
            // Recorded first, so that the backup holds the entry of its own taking.
            audit.reason = "backup started".into();
            self.record(audit.settle()).await?;
            let state = KeyringState::load(&*self.store)
                .await
                .map_err(VaultError::Rotation)?
                .ok_or(VaultError::Rotation(RotationError::CorruptState))?;
            let file = tempfile::Builder::new()
                .prefix(BACKUP_TEMP_PREFIX)
                .tempfile_in(&self.scratch_dir)
                .map_err(|e| VaultError::Backup(BackupError::Io(e)))?;
            let out = file
                .as_file()
                .try_clone()
                .map_err(|e| VaultError::Backup(BackupError::Io(e)))?;
            let head = self.store.audit_head().await?;
            let header = BackupHeader {
                created_at: Time::now().to_rfc3339(),
                byokd_version: env!("CARGO_PKG_VERSION").to_string(),
                audit_head_seq: head.as_ref().map_or(0, |h| h.seq),
                audit_head_hash: head
                    .as_ref()
                    .map(|h| hex::encode(h.hash))
                    .unwrap_or_default(),
                master_key_ids: state
                    .versions
                    .iter()
                    .filter(|v| v.retired_at.is_none())
                    .map(|v| v.key_id.clone())
                    .collect(),
            };
            let writer = BackupWriter::new(std::io::BufWriter::new(out), &header)
                .map_err(VaultError::Backup)?;
            let writer = Arc::new(std::sync::Mutex::new(Some(writer)));
            let sink_writer = writer.clone();
            // A backup nobody waits for any more stops copying.
            let stop = audit.stop_flag();
            self.store
                .export(Box::new(move |key, value| {
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        return Err("the backup was abandoned".into());
                    }
                    let mut guard = sink_writer.lock().map_err(|_| "poisoned".to_string())?;
                    let w = guard.as_mut().ok_or("finished")?;
                    w.record(key, value).map_err(|e| e.to_string())
                }))
                .await?;
            let writer =
                writer
                    .lock()
                    .ok()
                    .and_then(|mut w| w.take())
                    .ok_or(VaultError::Backup(BackupError::Format(
                        "writer lost".into(),
                    )))?;
            let (out, records) = writer.finish().map_err(VaultError::Backup)?;
            let out = out
                .into_inner()
                .map_err(|e| VaultError::Backup(BackupError::Io(e.into_error())))?;
            out.sync_all()
                .map_err(|e| VaultError::Backup(BackupError::Io(e)))?;
            Ok(BackupFile {
                file,
                records,
                header,
            })
        }
        .await;
        self.conclude(caller, audit, result).await
    }

    /// Failed lease redemptions so far (each one also audited).
    pub fn failed_redemptions(&self) -> u64 {
        self.failed_gets.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a new secret at version 1.
    pub async fn store(
        &self,
        caller: &Caller,
        input: StoreInput,
    ) -> Result<SecretRecord, VaultError> {
        let mut audit = self.begin(caller, Action::Store);
        let result = self.try_store(caller, input, &mut audit).await;
        self.conclude(caller, audit, result).await
    }

    async fn try_store(
        &self,
        caller: &Caller,
        input: StoreInput,
        audit: &mut AuditDraft,
    ) -> Result<SecretRecord, VaultError> {
        let target = secret_ref(caller, audit, input.tenant, input.name);
        let principal = caller.authorize(Operation::Store)?;
        let (tenant, name) = target?;
        principal.require_tenant(&tenant)?;
        let provider = Provider::parse(input.provider)?;
        let labels = Labels::parse(input.labels)?;
        check_value_len("value", input.value.len())?;
        if self.store.secret(&tenant, &name).await?.is_some() {
            return Err(VaultError::AlreadyExists);
        }
        let now = Time::now();
        let record = SecretRecord {
            id: SecretId::generate(),
            tenant,
            name,
            provider,
            labels,
            version: 1,
            state: SecretState::Active,
            created_at: now,
            updated_at: now,
            hint: value_hint(input.value.expose_secret()),
            revoked_at: None,
            rev: Default::default(),
        };
        let envelope = self.seal(&record, &input.value).await?;
        audit.secret(&record);
        let reservation = self.quotas.reserve(
            &record.tenant,
            Delta {
                secrets: 1,
                value_bytes: envelope.ciphertext.len() as i64,
                leases: 0,
            },
        )?;
        let tx = Transaction {
            guards: vec![Guard::secret(&record.tenant, &record.name, None)],
            writes: vec![
                Write::PutSecret(record.clone()),
                Write::PutEnvelope(envelope),
            ],
            audit: Some(audit.clone()),
        };
        match self.store.commit(tx).await {
            Ok(_) => {
                reservation.keep();
                Ok(record)
            }
            // Another Store of the same name committed first.
            Err(StoreError::Conflict) => Err(VaultError::AlreadyExists),
            Err(e) => Err(e.into()),
        }
    }

    /// Metadata of one secret.
    pub async fn describe(
        &self,
        caller: &Caller,
        tenant: String,
        name: String,
    ) -> Result<SecretRecord, VaultError> {
        let mut audit = self.begin(caller, Action::Describe);
        let result = async {
            let target = secret_ref(caller, &mut audit, tenant, name);
            let principal = caller.authorize(Operation::Describe)?;
            let (tenant, name) = target?;
            principal.require_tenant(&tenant)?;
            let record = self
                .store
                .secret(&tenant, &name)
                .await?
                .ok_or(VaultError::SecretNotFound)?;
            audit.secret(&record);
            self.record(audit.settle()).await?;
            Ok(record)
        }
        .await;
        self.conclude(caller, audit, result).await
    }

    /// A page of a tenant's secrets, and the token of the next page.
    pub async fn list(
        &self,
        caller: &Caller,
        tenant: String,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<SecretRecord>, Option<String>), VaultError> {
        let mut audit = self.begin(caller, Action::List);
        let result = async {
            let tenant = TenantId::parse(tenant);
            match &tenant {
                Ok(t) => audit.tenant = Some(t.clone()),
                Err(_) => caller.note_invalid("tenant"),
            }
            let principal = caller.authorize(Operation::List)?;
            let tenant = tenant?;
            principal.require_tenant(&tenant)?;
            let size = page_size_or(page_size, DEFAULT_LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE)?;
            let after = match page_token.as_str() {
                "" => None,
                token => Some(decode_list_token(token)?),
            };
            let mut page = self
                .store
                .list_secrets(&tenant, after.as_ref(), size + 1)
                .await?;
            let next = if page.len() > size {
                page.truncate(size);
                page.last().map(|s| URL_SAFE_NO_PAD.encode(s.name.as_str()))
            } else {
                None
            };
            self.record(audit.settle()).await?;
            Ok((page, next))
        }
        .await;
        self.conclude(caller, audit, result).await
    }

    /// Issues a lease on the current version of a secret.
    pub async fn lease(
        &self,
        caller: &Caller,
        input: LeaseInput,
    ) -> Result<IssuedLease, VaultError> {
        let mut audit = self.begin(caller, Action::Lease);
        let result = self.try_lease(caller, input, &mut audit).await;
        self.conclude(caller, audit, result).await
    }

    async fn try_lease(
        &self,
        caller: &Caller,
        input: LeaseInput,
        audit: &mut AuditDraft,
    ) -> Result<IssuedLease, VaultError> {
        let target = secret_ref(caller, audit, input.tenant, input.name);
        let principal = caller.authorize(Operation::Lease)?;
        let (tenant, name) = target?;
        principal.require_tenant(&tenant)?;
        let audience = match input.audience.as_str() {
            "" => None,
            id => {
                let id = PrincipalId::parse_field("audience", id)?;
                if self.principals.get(&id).is_none() {
                    return Err(ValidationError::new("audience", "no such principal").into());
                }
                Some(id)
            }
        };
        let (ttl, max_uses) = self.policy.grant(input.ttl, input.max_uses)?;
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let secret = self.active_secret(&tenant, &name).await?;
            let token = LeaseToken::generate().map_err(VaultError::Crypto)?;
            let now = Time::now();
            let lease = LeaseRecord {
                id: LeaseId::generate(),
                token_hash: token.hash(),
                secret_id: secret.id,
                tenant: secret.tenant.clone(),
                name: secret.name.clone(),
                version: secret.version,
                issued_to: principal.id.clone(),
                audience: audience.clone(),
                created_at: now,
                expires_at: now.plus(ttl),
                max_uses,
                uses: 0,
                revoked: false,
                rev: Default::default(),
            };
            audit.lease(&lease);
            let reservation = self.quotas.reserve(
                &tenant,
                Delta {
                    leases: 1,
                    ..Delta::default()
                },
            )?;
            let tx = Transaction {
                // The lease is on the version current at commit, not merely at read.
                guards: vec![Guard::secret(&tenant, &name, Some(&secret))],
                writes: vec![Write::PutLease(lease.clone())],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self
                .commit_or_retry(tx, IssuedLease { lease, token })
                .await?
            {
                reservation.keep();
                return Ok(done);
            }
        }
    }

    /// Redeems a lease token: the plaintext, consuming one use.
    pub async fn get(&self, caller: &Caller, token: &str) -> Result<Redeemed, VaultError> {
        let mut audit = self.begin(caller, Action::Get);
        // The lease the token names (with its secret and envelope: one read), read before
        // anything decides, so that a refused request is audited with its target.
        let token_hash = lease::presented_token_hash(token);
        let first = match &token_hash {
            Ok(hash) => match self.store.redemption(hash).await {
                Ok(found) => found,
                Err(e) => return self.conclude(caller, audit, Err(e.into())).await,
            },
            Err(_) => None,
        };
        if let Some(read) = &first {
            audit.lease(&read.lease);
        }
        let limit = self.limits.failed_get_rate_limit;
        let keys = caller.failure_keys();
        // A peer or principal that keeps presenting bad tokens is refused before its next
        // guess is looked at.
        let result = if keys
            .iter()
            .all(|k| self.failure_buckets.has_token(k, limit))
        {
            let result = self.try_get(caller, token_hash, first, &mut audit).await;
            if let Err(VaultError::Lease(_)) = &result {
                self.failed_gets
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for key in &keys {
                    self.failure_buckets.take(key, limit);
                }
            }
            result
        } else {
            Err(VaultError::TooManyFailures)
        };
        self.conclude(caller, audit, result).await
    }

    async fn try_get(
        &self,
        caller: &Caller,
        token_hash: Result<TokenHash, LeaseError>,
        first: Option<Redemption>,
        audit: &mut AuditDraft,
    ) -> Result<Redeemed, VaultError> {
        let principal = caller.authorize(Operation::Get)?;
        let token_hash = token_hash?;
        let mut first = Some(first);
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let Redemption {
                lease,
                secret,
                envelope,
            } = match first.take() {
                Some(read) => read,
                None => self.store.redemption(&token_hash).await?,
            }
            .ok_or(LeaseError::NoSuchLease)?;
            audit.lease(&lease);
            if !principal.may_access(&lease.tenant) {
                return Err(LeaseError::WrongTenant.into());
            }
            lease::check_redeemable(&lease, secret.as_ref(), &principal.id, Time::now())?;
            let Some(secret) = secret else {
                // check_redeemable fails when the secret is absent.
                return Err(LeaseError::SecretRevoked.into());
            };
            let envelope = envelope.ok_or(VaultError::Decrypt(DecryptFailure::MissingEnvelope))?;
            let value = self.open(&secret, &envelope).await?;
            let mut used = lease.clone();
            used.uses += 1;
            let tx = Transaction {
                // The use counts only if nobody else consumed, revoked or rotated meanwhile.
                guards: vec![
                    Guard::lease(token_hash, Some(&lease)),
                    Guard::secret(&secret.tenant, &secret.name, Some(&secret)),
                ],
                writes: vec![Write::UpdateLease(used.clone())],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self
                .commit_or_retry(
                    tx,
                    Redeemed {
                        value,
                        secret,
                        lease: used,
                    },
                )
                .await?
            {
                return Ok(done);
            }
        }
    }

    /// Replaces a secret's value with a new version and destroys the previous one.
    pub async fn rotate(
        &self,
        caller: &Caller,
        tenant: String,
        name: String,
        value: Plaintext,
    ) -> Result<SecretRecord, VaultError> {
        let mut audit = self.begin(caller, Action::Rotate);
        let result = self
            .try_rotate(caller, tenant, name, value, &mut audit)
            .await;
        self.conclude(caller, audit, result).await
    }

    async fn try_rotate(
        &self,
        caller: &Caller,
        tenant: String,
        name: String,
        value: Plaintext,
        audit: &mut AuditDraft,
    ) -> Result<SecretRecord, VaultError> {
        let target = secret_ref(caller, audit, tenant, name);
        let principal = caller.authorize(Operation::Rotate)?;
        let (tenant, name) = target?;
        principal.require_tenant(&tenant)?;
        check_value_len("value", value.len())?;
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let current = self.active_secret(&tenant, &name).await?;
            let mut next = current.clone();
            next.version = current
                .version
                .checked_add(1)
                .ok_or_else(|| ValidationError::new("name", "secret has no versions left"))?;
            next.updated_at = Time::now();
            next.hint = value_hint(value.expose_secret());
            let envelope = self.seal(&next, &value).await?;
            audit.secret(&next);
            let before = self.value_bytes(&current).await?;
            let reservation = self.quotas.reserve(
                &tenant,
                Delta {
                    value_bytes: envelope.ciphertext.len() as i64 - before,
                    ..Delta::default()
                },
            )?;
            let tx = Transaction {
                guards: vec![Guard::secret(&tenant, &name, Some(&current))],
                writes: vec![
                    Write::PutSecret(next.clone()),
                    Write::DestroyEnvelopes {
                        secret_id: next.id,
                        keep: Some(next.version),
                    },
                    Write::PutEnvelope(envelope),
                ],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self.commit_or_retry(tx, next).await? {
                reservation.keep();
                // The previous version's data key is destroyed: drop it from memory too.
                self.cache.evict_secret(done.id);
                return Ok(done);
            }
        }
    }

    /// Revokes a secret (destroying every version) or one lease. Revoking twice succeeds.
    pub async fn revoke(
        &self,
        caller: &Caller,
        target: RevokeTarget,
        reason: String,
    ) -> Result<Revoked, VaultError> {
        let mut audit = self.begin(caller, Action::Revoke);
        let result = match target {
            RevokeTarget::Missing => caller
                .authorize(Operation::RevokeLease)
                .and_then(|_| Err(ValidationError::new("target", "set secret or lease_id").into())),
            RevokeTarget::Secret { tenant, name } => {
                self.revoke_secret(caller, tenant, name, reason, &mut audit)
                    .await
            }
            RevokeTarget::Lease(id) => self.revoke_lease(caller, &id, reason, &mut audit).await,
        };
        self.conclude(caller, audit, result).await
    }

    async fn revoke_secret(
        &self,
        caller: &Caller,
        tenant: String,
        name: String,
        reason: String,
        audit: &mut Pending,
    ) -> Result<Revoked, VaultError> {
        let target = secret_ref(caller, audit, tenant, name);
        let principal = caller.authorize(Operation::RevokeSecret)?;
        let (tenant, name) = target?;
        principal.require_tenant(&tenant)?;
        audit.reason = Reason::parse(reason)?.as_str().to_string();
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let current = self
                .store
                .secret(&tenant, &name)
                .await?
                .ok_or(VaultError::SecretNotFound)?;
            audit.secret(&current);
            if current.state == SecretState::Revoked {
                self.record(audit.settle()).await?;
                return Ok(Revoked {
                    already_revoked: true,
                    secret: Some(current),
                });
            }
            let now = Time::now();
            let mut tombstone = current.clone();
            tombstone.state = SecretState::Revoked;
            tombstone.revoked_at = Some(now);
            tombstone.updated_at = now;
            let freed = self.value_bytes(&current).await?;
            let tx = Transaction {
                guards: vec![Guard::secret(&tenant, &name, Some(&current))],
                writes: vec![
                    Write::PutSecret(tombstone.clone()),
                    Write::DestroyEnvelopes {
                        secret_id: current.id,
                        keep: None,
                    },
                ],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self
                .commit_or_retry(
                    tx,
                    Revoked {
                        already_revoked: false,
                        secret: Some(tombstone),
                    },
                )
                .await?
            {
                // Every data key of the secret is destroyed: none may be served from memory.
                self.cache.evict_secret(current.id);
                self.quotas.committed(
                    &tenant,
                    Delta {
                        secrets: -1,
                        value_bytes: -freed,
                        leases: 0,
                    },
                );
                return Ok(done);
            }
        }
    }

    async fn revoke_lease(
        &self,
        caller: &Caller,
        id: &str,
        reason: String,
        audit: &mut Pending,
    ) -> Result<Revoked, VaultError> {
        // The lease it names, before authorization decides, so that a denied request is
        // audited with its target.
        let id = LeaseId::parse("lease_id", id);
        let found = match &id {
            Ok(id) => {
                audit.lease_id = Some(*id);
                let found = self.store.lease_by_id(*id).await?;
                if let Some(lease) = &found {
                    audit.lease(lease);
                }
                found
            }
            Err(_) => {
                caller.note_invalid("lease id");
                None
            }
        };
        let principal = caller.authorize(Operation::RevokeLease)?;
        audit.reason = Reason::parse(reason)?.as_str().to_string();
        let id = id?;
        let mut first = Some(found);
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let lease = match first.take() {
                Some(read) => read,
                None => self.store.lease_by_id(id).await?,
            };
            let lease = match lease {
                // A lease in another tenant is reported as absent, not as forbidden.
                Some(lease) if principal.may_access(&lease.tenant) => lease,
                _ => return Err(VaultError::LeaseNotFound),
            };
            audit.lease(&lease);
            if lease.revoked {
                self.record(audit.settle()).await?;
                return Ok(Revoked {
                    already_revoked: true,
                    secret: None,
                });
            }
            let mut revoked = lease.clone();
            revoked.revoked = true;
            let tx = Transaction {
                guards: vec![Guard::lease(lease.token_hash, Some(&lease))],
                writes: vec![Write::UpdateLease(revoked)],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self
                .commit_or_retry(
                    tx,
                    Revoked {
                        already_revoked: false,
                        secret: None,
                    },
                )
                .await?
            {
                return Ok(done);
            }
        }
    }

    /// A page of the audit trail.
    pub async fn audit(&self, caller: &Caller, input: AuditInput) -> Result<AuditPage, VaultError> {
        let mut audit = self.begin(caller, Action::Audit);
        let result = async {
            note_filter_target(caller, &mut audit, &input.filter);
            let principal = caller.authorize(Operation::Audit)?;
            let filter = audit_filter(input.filter, principal, &mut audit)?;
            let size = page_size_or(
                input.page_size,
                audit::DEFAULT_PAGE_SIZE,
                audit::MAX_PAGE_SIZE,
            )?;
            let from = audit::decode_page_token(&input.page_token)?;
            let page = self.scan(filter, from, size).await?;
            self.record(audit.settle()).await?;
            Ok(page)
        }
        .await;
        self.conclude(caller, audit, result).await
    }

    /// A page of audit entries, read on a blocking thread once a scan place is free (a
    /// query reads up to the store's scan budget of entries: CPU and disk work).
    async fn scan(
        &self,
        filter: AuditFilter,
        from: u64,
        size: usize,
    ) -> Result<AuditPage, VaultError> {
        let _place = self
            .scans
            .clone()
            .acquire_owned()
            .await
            // Never closed.
            .map_err(|_| VaultError::Contention)?;
        let (store, runtime) = (self.store.clone(), tokio::runtime::Handle::current());
        let page = tokio::task::spawn_blocking(move || {
            runtime.block_on(store.audit_query(&filter, from, u64::MAX, size))
        })
        .await
        .map_err(VaultError::Background)??;
        Ok(page)
    }

    /// Verifies the audit hash chain (a range of it, or all of it).
    pub async fn verify_audit(
        &self,
        caller: &Caller,
        input: VerifyInput,
    ) -> Result<Verification, VaultError> {
        let mut audit = self.begin(caller, Action::VerifyAudit);
        let result = async {
            caller.authorize_global(Operation::Audit)?;
            if input.to_seq != 0 && input.to_seq < input.from_seq {
                return Err(ValidationError::new("to_seq", "before from_seq").into());
            }
            // Nothing past the head can be checked: that is no broken chain.
            let head = self.store.durable_audit_seq();
            if input.from_seq > head + 1 {
                return Err(VaultError::PastHead {
                    field: "from_seq",
                    head,
                });
            }
            let recorded = match (input.recorded_head_seq, input.recorded_head_hash.as_str()) {
                (0, "") => None,
                (0, _) => {
                    return Err(ValidationError::new(
                        "expected_head_seq",
                        "required with expected_head_hash",
                    )
                    .into());
                }
                (seq, hash) => Some(RecordedHead {
                    seq,
                    hash: parse_chain_hash(hash).ok_or_else(|| {
                        ValidationError::new("expected_head_hash", "64 hex digits")
                    })?,
                }),
            };
            let (store, key) = (self.store.clone(), self.chain.clone());
            let (from, to) = (input.from_seq, input.to_seq);
            let budget = audit::Budget {
                max_entries: match input.max_entries {
                    0 => MAX_VERIFY_PAGE,
                    n => n.min(MAX_VERIFY_PAGE),
                },
                stop: Some(audit.stop_flag()),
            };
            // Hashing the trail is CPU work: keep it off the async workers.
            let runtime = tokio::runtime::Handle::current();
            let report = tokio::task::spawn_blocking(move || {
                runtime.block_on(audit::verify(&*store, &key, from, to, recorded, &budget))
            })
            .await
            .map_err(VaultError::Background)??;
            audit.reason = match (&report.broken, report.next) {
                (Some((seq, why)), _) => format!("chain broken at entry {seq}: {why}"),
                (None, Some(next)) => format!(
                    "chain intact so far ({} entries checked; resume at {next})",
                    report.checked
                ),
                (None, None) => format!("chain intact ({} entries checked)", report.checked),
            };
            self.record(audit.settle()).await?;
            Ok(report)
        }
        .await;
        self.conclude(caller, audit, result).await
    }

    /// Streams matching audit entries: those from `from_seq` on, then new ones as they become
    /// durable. A consumer that falls behind is caught up from the store; writers never wait
    /// for it.
    pub async fn watch_audit(
        &self,
        caller: &Caller,
        input: WatchInput,
    ) -> Result<mpsc::Receiver<WatchEvent>, VaultError> {
        let mut audit = self.begin(caller, Action::WatchAudit);
        let result = async {
            note_filter_target(caller, &mut audit, &input.filter);
            let principal = caller.authorize(Operation::Audit)?;
            let mut filter = audit_filter(input.filter, principal, &mut audit)?;
            filter.since = None;
            filter.until = None;
            let permit = self.watchers.open(&principal.id)?;
            let head = self.store.durable_audit_seq();
            let from = match input.from_seq {
                0 => head + 1,
                seq if seq > head + 1 => {
                    return Err(VaultError::PastHead {
                        field: "from_seq",
                        head,
                    });
                }
                seq => seq,
            };
            if let Some(anchor) = self.store.audit_anchor().await?
                && from <= anchor.seq
            {
                return Err(VaultError::Pruned {
                    first_kept: anchor.seq + 1,
                });
            }
            // Subscribe before recording this call, so that nothing falls in between.
            let feed = self.store.subscribe_audit();
            self.record(audit.settle()).await?;
            let (tx, rx) = mpsc::channel(WATCH_BUFFER);
            let watcher = Watcher {
                store: self.store.clone(),
                filter,
                next: from,
                tx,
                shutdown: self.shutdown.subscribe(),
                _permit: permit,
            };
            tokio::spawn(watcher.run(feed));
            Ok(rx)
        }
        .await;
        self.conclude(caller, audit, result).await
    }

    /// Starts a master-key rotation to the configured master key (admin).
    pub async fn rotate_master_key(&self, caller: &Caller) -> Result<RotationJob, VaultError> {
        let audit = self.begin(caller, Action::RotateMasterKey);
        let result = async {
            caller.authorize_global(Operation::RotateMasterKey)?;
            self.rotator
                .start(audit.clone())
                .await
                .map_err(VaultError::Rotation)
        }
        .await;
        self.conclude(caller, audit, result).await
    }

    /// The progress of a master-key rotation (the latest, if `job_id` is empty).
    pub async fn rotation_status(
        &self,
        caller: &Caller,
        job_id: String,
    ) -> Result<RotationJob, VaultError> {
        let mut audit = self.begin(caller, Action::GetRotationStatus);
        let result = async {
            // Master-key rotation concerns the whole vault, as RotateMasterKey does.
            caller.authorize_global(Operation::RotateMasterKey)?;
            let job_id = match job_id.as_str() {
                "" => None,
                id => Some(
                    uuid::Uuid::parse_str(id)
                        .map_err(|_| {
                            ValidationError::new("job_id", "not a rotation job id (a UUID)")
                        })?
                        .to_string(),
                ),
            };
            let job = self
                .rotator
                .status(job_id.as_deref())
                .await
                .map_err(VaultError::Rotation)?;
            audit.version = Some(job.target);
            self.record(audit.settle()).await?;
            Ok(job)
        }
        .await;
        self.conclude(caller, audit, result).await
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

    /// Prunes audit entries older than `keep`, moving the chain's anchor past them, and
    /// records each prune in the trail. Returns how many entries went.
    pub async fn prune_audit(&self, keep: Duration) -> Result<u64, VaultError> {
        let cutoff = Time::now().minus(keep);
        let mut total = 0;
        while let Some((first, through)) =
            audit::prune_through(&*self.store, cutoff, PRUNE_BATCH).await?
        {
            let mut entry = AuditDraft::new(Action::Prune, None, None);
            entry.reason = format!(
                "retention: pruned entries {first}..={through}, older than {}",
                humantime::format_duration(keep)
            );
            let tx = Transaction {
                writes: vec![Write::PruneAudit { through }],
                audit: Some(entry),
                ..Default::default()
            };
            self.store.commit(tx).await?;
            total += through - first + 1;
        }
        Ok(total)
    }

    /// Deletes every lease that has expired, a batch per commit. Returns how many.
    pub async fn collect_expired_leases(&self) -> Result<usize, VaultError> {
        let now = Time::now();
        let mut total = 0;
        loop {
            let expired = self.store.expired_leases(now, GC_BATCH).await?;
            let count = expired.len();
            if count == 0 {
                return Ok(total);
            }
            let tenants: Vec<TenantId> = expired.iter().map(|l| l.tenant.clone()).collect();
            let tx = Transaction {
                writes: expired.into_iter().map(Write::DeleteLease).collect(),
                ..Default::default()
            };
            self.store.commit(tx).await?;
            for tenant in &tenants {
                self.quotas.committed(
                    tenant,
                    Delta {
                        leases: -1,
                        ..Delta::default()
                    },
                );
            }
            total += count;
            if count < GC_BATCH {
                return Ok(total);
            }
        }
    }

    /// Commits `tx` and returns `Some(value)` once it is durable, or `None` if a guard no
    /// longer held: another writer changed what the caller read, so it must read again.
    /// Commits `tx`: `value` once it is durable, `None` if its guards no longer held (another
    /// request changed what the caller read: read again, see [`Attempts`]).
    async fn commit_or_retry<T>(&self, tx: Transaction, value: T) -> Result<Option<T>, VaultError> {
        match self.store.commit(tx).await {
            Ok(_) => Ok(Some(value)),
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The secret `tenant`/`name`, if it exists and is active.
    async fn active_secret(
        &self,
        tenant: &TenantId,
        name: &SecretName,
    ) -> Result<SecretRecord, VaultError> {
        let secret = self
            .store
            .secret(tenant, name)
            .await?
            .ok_or(VaultError::SecretNotFound)?;
        if secret.state == SecretState::Revoked {
            return Err(VaultError::SecretRevoked);
        }
        Ok(secret)
    }

    /// Commits a successful read-only operation's audit entry.
    /// The bytes of a secret's current sealed value (what its quota counts).
    async fn value_bytes(&self, secret: &SecretRecord) -> Result<i64, VaultError> {
        Ok(self
            .store
            .envelope(secret.id, secret.version)
            .await?
            .map_or(0, |e| e.ciphertext.len() as i64))
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
            None => {
                tracing::trace!(secret_id = %record.id, version = record.version, "data key unwrapped by the master key");
                let generation = self.cache.generation();
                let key = self
                    .keyring
                    .unwrap(&envelope.wrapped_key, &wrap_context(record))
                    .await
                    .map_err(|e| match e {
                        KeyringError::Unwrap | KeyringError::ForeignKey { .. } => {
                            VaultError::Decrypt(DecryptFailure::Unwrap(e))
                        }
                        other => VaultError::Keyring(other),
                    })?;
                let key = Arc::new(key);
                self.cache
                    .insert(record.id, record.version, key.clone(), generation);
                key
            }
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

/// Parses a tenant and name, noting each in the audit draft as soon as it is valid.
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
    let tenant = TenantId::parse(tenant);
    let name = SecretName::parse(name);
    match &tenant {
        Ok(t) => audit.tenant = Some(t.clone()),
        Err(_) => caller.note_invalid("tenant"),
    }
    match &name {
        Ok(n) => audit.name = Some(n.clone()),
        Err(_) => caller.note_invalid("name"),
    }
    Ok((tenant?, name?))
}

fn page_size_or(requested: u32, default: usize, max: usize) -> Result<usize, ValidationError> {
    match usize::try_from(requested) {
        Ok(0) => Ok(default),
        Ok(n) if n <= max => Ok(n),
        _ => Err(ValidationError::new("page_size", format!("at most {max}"))),
    }
}

fn decode_list_token(token: &str) -> Result<SecretName, ValidationError> {
    let invalid = || ValidationError::new("page_token", "not a token returned by List");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let name = String::from_utf8(bytes).map_err(|_| invalid())?;
    SecretName::parse(name).map_err(|_| invalid())
}

/// Parses audit filters and checks the principal may see what they select: a principal
/// scoped to specific tenants must name one of them.
/// The tenant and name an audit query filters on, into its audit entry as far as they are
/// valid, before authorization decides (see [`secret_ref`]).
fn note_filter_target(caller: &Caller, audit: &mut AuditDraft, filter: &AuditFilterInput) {
    if !filter.tenant.is_empty() {
        match TenantId::parse(filter.tenant.as_str()) {
            Ok(t) => audit.tenant = Some(t),
            Err(_) => caller.note_invalid("tenant"),
        }
    }
    if !filter.name.is_empty() {
        match SecretName::parse(filter.name.as_str()) {
            Ok(n) => audit.name = Some(n),
            Err(_) => caller.note_invalid("name"),
        }
    }
}

fn audit_filter(
    input: AuditFilterInput,
    principal: &Principal,
    audit: &mut AuditDraft,
) -> Result<AuditFilter, VaultError> {
    let filter = AuditFilter {
        tenant: non_empty(input.tenant).map(TenantId::parse).transpose()?,
        name: non_empty(input.name).map(SecretName::parse).transpose()?,
        principal: non_empty(input.principal)
            .map(|p| PrincipalId::parse_field("principal", p))
            .transpose()?,
        action: non_empty(input.action)
            .map(|a| Action::parse("action", &a))
            .transpose()?,
        peer: non_empty(input.peer).map(parse_peer).transpose()?,
        outcome: non_empty(input.outcome)
            .map(|o| Outcome::parse("outcome", &o))
            .transpose()?,
        since: time_field("since", input.since)?,
        until: time_field("until", input.until)?,
    };
    audit.tenant = filter.tenant.clone();
    audit.name = filter.name.clone();
    match &filter.tenant {
        Some(tenant) => principal.require_tenant(tenant)?,
        None if !principal.may_access_all() => {
            return Err(AuthError::TenantRequired {
                principal: principal.id.clone(),
            }
            .into());
        }
        None => {}
    }
    Ok(filter)
}

fn parse_peer(peer: String) -> Result<String, ValidationError> {
    let ok = peer.len() <= 64
        && peer
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'));
    if ok {
        Ok(peer)
    } else {
        Err(ValidationError::new(
            "peer",
            "an IP address, optionally with :port",
        ))
    }
}

fn parse_chain_hash(hex_text: &str) -> Option<ChainHash> {
    hex::decode(hex_text).ok()?.try_into().ok()
}

/// A live audit stream's task.
struct Watcher {
    store: Arc<dyn Store>,
    filter: AuditFilter,
    /// The next seq to consider.
    next: u64,
    tx: mpsc::Sender<WatchEvent>,
    shutdown: watch::Receiver<bool>,
    /// Its place among the live streams, given back when it ends.
    _permit: WatchPermit,
}

/// The live audit streams: at most `max` in all, and `per_principal` per principal.
struct Watchers {
    max: usize,
    per_principal: usize,
    open: std::sync::Mutex<(usize, HashMap<PrincipalId, usize>)>,
}

impl Watchers {
    fn new(max: usize, per_principal: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_principal,
            open: Default::default(),
        })
    }

    /// A place for one more stream of `principal`, if the limits allow.
    fn open(self: &Arc<Self>, principal: &PrincipalId) -> Result<WatchPermit, VaultError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_principal) = &mut *open;
        if *total >= self.max {
            return Err(VaultError::TooManyStreams {
                scope: "in all",
                max: self.max,
            });
        }
        let mine = by_principal.entry(principal.clone()).or_default();
        if *mine >= self.per_principal {
            return Err(VaultError::TooManyStreams {
                scope: "for this principal",
                max: self.per_principal,
            });
        }
        *mine += 1;
        *total += 1;
        Ok(WatchPermit {
            watchers: self.clone(),
            principal: principal.clone(),
        })
    }
}

/// One live audit stream's place (see [`Watchers`]).
struct WatchPermit {
    watchers: Arc<Watchers>,
    principal: PrincipalId,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.watchers.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_principal) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(mine) = by_principal.get_mut(&self.principal) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                by_principal.remove(&self.principal);
            }
        }
    }
}

impl Watcher {
    async fn run(mut self, mut feed: broadcast::Receiver<Arc<AuditRecord>>) {
        loop {
            if !self.catch_up().await {
                return;
            }
            // Follow the live feed until it skips ahead of us.
            loop {
                let received = tokio::select! {
                    _ = self.shutdown.wait_for(|stopping| *stopping) => {
                        let _ = self.tx.try_send(WatchEvent::Ended { resume_at: self.next });
                        return;
                    }
                    () = self.tx.closed() => return,
                    received = feed.recv() => received,
                };
                match received {
                    Ok(record) if record.seq < self.next => continue,
                    Ok(record) if record.seq == self.next => {
                        self.next = record.seq + 1;
                        if self.filter.matches(&record)
                            && !self
                                .send(WatchEvent::Entry(Box::new((*record).clone())))
                                .await
                        {
                            return;
                        }
                    }
                    // Entries were missed (lagged behind the feed, or raced the catch-up):
                    // read them from the store.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        tracing::debug!(
                            resume_at = self.next,
                            "audit stream fell behind the live feed; catching up from the store"
                        );
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = self.tx.try_send(WatchEvent::Ended {
                            resume_at: self.next,
                        });
                        return;
                    }
                }
            }
        }
    }

    /// Sends every matching durable entry from `next` on. False if the stream is over.
    async fn catch_up(&mut self) -> bool {
        loop {
            let durable = self.store.durable_audit_seq();
            if self.next > durable {
                return true;
            }
            match self.store.audit_anchor().await {
                Ok(Some(anchor)) if self.next <= anchor.seq => {
                    let _ = self.tx.try_send(WatchEvent::Pruned {
                        resume_at: anchor.seq + 1,
                    });
                    return false;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "audit stream could not read the store");
                    let _ = self.tx.try_send(WatchEvent::Ended {
                        resume_at: self.next,
                    });
                    return false;
                }
            }
            let page = match self
                .store
                .audit_query(&self.filter, self.next, durable, WATCH_BUFFER)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "audit stream could not read the store");
                    let _ = self.tx.try_send(WatchEvent::Ended {
                        resume_at: self.next,
                    });
                    return false;
                }
            };
            for record in page.entries {
                let seq = record.seq;
                if !self.send(WatchEvent::Entry(Box::new(record))).await {
                    return false;
                }
                self.next = seq + 1;
            }
            self.next = self.next.max(page.resume_at);
            if !page.more {
                return true;
            }
        }
    }

    /// Sends `event`, waiting for a slow consumer but not past shutdown. False if the
    /// stream is over.
    async fn send(&mut self, event: WatchEvent) -> bool {
        tokio::select! {
            sent = self.tx.send(event) => sent.is_ok(),
            _ = self.shutdown.wait_for(|stopping| *stopping) => {
                let _ = self.tx.try_send(WatchEvent::Ended { resume_at: self.next });
                false
            }
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn time_field(field: &'static str, t: Option<(i64, i32)>) -> Result<Option<Time>, ValidationError> {
    t.map(|(s, n)| {
        Time::from_seconds_nanos(s, n)
            .ok_or_else(|| ValidationError::new(field, "not a valid timestamp"))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_service_failures_map_to_statuses_without_details() {
        let cases = [
            (
                KeyringError::Unavailable("arn:aws:kms:eu-west-1:1:key/abc throttled".into()),
                Outcome::Unavailable,
            ),
            (
                KeyringError::KeyUnusable(
                    "DisabledException: arn:aws:kms:eu-west-1:1:key/abc".into(),
                ),
                Outcome::FailedPrecondition,
            ),
            (KeyringError::Derive, Outcome::Internal),
        ];
        for (error, outcome) in cases {
            let error = VaultError::Keyring(error);
            assert_eq!(error.outcome(), outcome, "{error:?}");
            assert!(error.is_internal(), "{error:?} is logged with its cause");
            assert!(
                !error.public_message().contains("arn:"),
                "{}",
                error.public_message()
            );
        }
        let unwrap = VaultError::Decrypt(DecryptFailure::Unwrap(KeyringError::Unwrap));
        assert_eq!(
            (unwrap.outcome(), unwrap.public_message().as_str()),
            (Outcome::DataLoss, "decryption failed")
        );
        let busy = VaultError::Rotation(RotationError::InProgress("job".into()));
        assert_eq!(busy.outcome(), Outcome::FailedPrecondition);
    }
}
