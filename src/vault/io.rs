//! The inputs and results of the vault's operations, in domain types (the service layer
//! converts the wire messages to and from them).

use crate::backup::BackupHeader;
use crate::crypto::Plaintext;
use crate::lease::{LeaseToken, RequestedTtl};
use crate::model::{AuditRecord, LeaseRecord, Phase, SecretId, SecretRecord};
use crate::store::SecretActivity;
use std::collections::HashMap;

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
    /// Refuse a value not shaped like the provider's keys, instead of warning.
    pub strict_format: bool,
    /// Who may use it and for how long.
    pub life: LifeInput,
}

/// A secret's lifecycle settings, as received (in Store and UpdateSecret).
#[derive(Default)]
pub struct LifeInput {
    /// Principals allowed to redeem its leases (empty: any reader of the tenant).
    pub allowed_readers: Vec<String>,
    /// When it stops being usable, seconds and nanoseconds.
    pub expires_at: Option<(i64, i32)>,
    /// How long after a version is made a rotation is due, seconds and nanoseconds.
    pub rotate_after: Option<(i64, i32)>,
}

/// Input of UpdateSecret, as received.
pub struct UpdateInput {
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// New labels.
    pub labels: HashMap<String, String>,
    /// New provider.
    pub provider: String,
    /// New lifecycle settings.
    pub life: LifeInput,
    /// The fields to change.
    pub update_mask: Vec<String>,
}

/// Input of List, as received.
#[derive(Default)]
pub struct ListInput {
    /// Tenant.
    pub tenant: String,
    /// Page size (0: default).
    pub page_size: u32,
    /// Page token.
    pub page_token: String,
    /// Only secrets of this provider (empty: any).
    pub provider: String,
    /// `k=v,k2=v2`: only secrets with all these labels (empty: any).
    pub label_selector: String,
    /// Only secrets in one of these phases (empty: any; `None`: a state that is not one).
    pub states: Vec<Option<Phase>>,
    /// Only secrets expiring before this time.
    pub expiring_before: Option<(i64, i32)>,
    /// Only secrets whose rotation is due.
    pub rotation_due: bool,
}

/// Input of Rotate, as received.
pub struct RotateInput {
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// The new value.
    pub value: Plaintext,
    /// Refuse a value not shaped like the provider's keys, instead of warning.
    pub strict_format: bool,
    /// How long the previous version stays redeemable by its leases, seconds and
    /// nanoseconds (absent or 0: destroyed at once).
    pub previous_grace: Option<(i64, i32)>,
}

/// A purged secret.
pub struct Purged {
    /// The id it had.
    pub secret_id: SecretId,
    /// Versions whose data keys were destroyed.
    pub versions_destroyed: u32,
}

/// A secret as a Store or Rotate left it, with what the caller should know about the value.
pub struct Changed {
    /// The secret's metadata and use.
    pub secret: Described,
    /// Warnings about the value (never quoting it).
    pub warnings: Vec<String>,
}

/// A secret's metadata as answered: its record and how much it was used (`None`: could not
/// be read after a change that committed).
pub struct Described {
    /// The record.
    pub secret: SecretRecord,
    /// Its use.
    pub usage: Option<SecretActivity>,
}

/// Input of GetUsage, as received.
#[derive(Default)]
pub struct UsageInput {
    /// Tenant.
    pub tenant: String,
    /// One secret's name (empty: the whole tenant).
    pub name: String,
    /// The first day's time, seconds and nanoseconds (absent: 29 days before `to`).
    pub from: Option<(i64, i32)>,
    /// The last day's time (absent: now).
    pub to: Option<(i64, i32)>,
    /// A bucket per principal too.
    pub group_by_principal: bool,
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
    /// Its use (see [`Described`]).
    pub usage: Option<SecretActivity>,
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
