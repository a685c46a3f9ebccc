//! Domain types: validated identifiers and the records byokd keeps.
//!
//! "Parse, don't validate": every value that crossed the network is checked once, here, and
//! gets its own type, so later code cannot forget the check. Records decode through the same
//! checks (`serde(try_from)`), so a corrupted stored record is an error, not a bad value.
//! These are byokd's own types: the generated protobuf types stop at `service.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod keyshape;

/// Longest tenant, secret name or principal id, in characters.
pub const MAX_NAME_LEN: usize = 128;
/// Longest provider name.
pub const MAX_PROVIDER_LEN: usize = 64;
/// Largest secret value in bytes (64 KiB).
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Most labels on one secret.
pub const MAX_LABELS: usize = 32;
/// Longest label key.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// Longest revocation reason.
pub const MAX_REASON_LEN: usize = 256;

/// A request field that failed validation. The message names the field and the rule, never
/// the offending value (it may be a secret pasted in the wrong field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// The request field, as named in the proto.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl ValidationError {
    /// A validation failure of `field`.
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// True for characters that free text may not hold: controls, line and paragraph separators
/// (which split lines for some readers, U+2028 in JSON among them), and invisible format
/// characters (bidirectional overrides and isolates, zero-width characters, tags), which make
/// text read differently from what it holds.
pub fn is_hidden_or_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{08E2}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
        )
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn check_name(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, "required"));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("at most {max} characters"),
        ));
    }
    if !s.chars().all(is_name_char) {
        return Err(ValidationError::new(
            field,
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `s` against the naming rules.
            pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
                let s = s.into();
                check_name($field, &s, $max)?;
                Ok(Self(s))
            }

            /// Parses a name a request carries: [`Self::parse`]'s rules, and it must not look
            /// like an API key (a key pasted into the wrong field must not be kept in clear).
            pub fn from_request(s: impl Into<String>) -> Result<Self, ValidationError> {
                let s = s.into();
                keyshape::refuse_key($field, &s)?;
                Self::parse(s)
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, ValidationError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A tenant: 1-128 characters of `[A-Za-z0-9._-]`.
    TenantId,
    "tenant",
    MAX_NAME_LEN
);
name_type!(
    /// A secret's name, unique within its tenant: 1-128 characters of `[A-Za-z0-9._-]`.
    SecretName,
    "name",
    MAX_NAME_LEN
);
name_type!(
    /// A model provider such as `anthropic`: 1-64 characters of `[A-Za-z0-9._-]`.
    Provider,
    "provider",
    MAX_PROVIDER_LEN
);
name_type!(
    /// A principal's id: 1-128 characters of `[A-Za-z0-9._-]`.
    PrincipalId,
    "principal",
    MAX_NAME_LEN
);

impl PrincipalId {
    /// Parses `s` as the id named in a request's `field` (e.g. `audience`); like
    /// [`Self::from_request`], it must not look like an API key.
    pub fn parse_field(field: &'static str, s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        keyshape::refuse_key(field, &s)?;
        check_name(field, &s, MAX_NAME_LEN)?;
        Ok(Self(s))
    }
}

/// A secret's labels: at most 32, keys 1-63 characters of `[A-Za-z0-9._/-]`, values up to 256
/// printable characters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Checks every label.
    pub fn parse(map: impl IntoIterator<Item = (String, String)>) -> Result<Self, ValidationError> {
        let map: BTreeMap<String, String> = map.into_iter().collect();
        if map.len() > MAX_LABELS {
            return Err(ValidationError::new(
                "labels",
                format!("at most {MAX_LABELS} labels"),
            ));
        }
        for (k, v) in &map {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_LABEL_KEY_LEN
                && k.chars().all(|c| is_name_char(c) || c == '/');
            if !key_ok {
                return Err(ValidationError::new(
                    "labels",
                    format!(
                        "keys are 1-{MAX_LABEL_KEY_LEN} characters of letters, digits, '.', '_', '-' and '/'"
                    ),
                ));
            }
            if v.chars().count() > MAX_LABEL_VALUE_LEN || v.chars().any(is_hidden_or_control) {
                return Err(ValidationError::new(
                    "labels",
                    format!(
                        "values are at most {MAX_LABEL_VALUE_LEN} characters without control, line-separator or invisible formatting characters"
                    ),
                ));
            }
        }
        Ok(Self(map))
    }

    /// Checks the labels a request carries: [`Self::parse`]'s rules, and no key or value may
    /// look like an API key.
    pub fn from_request(
        map: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ValidationError> {
        let labels = Self::parse(map)?;
        for (k, v) in labels.iter() {
            keyshape::refuse_key("labels", k)?;
            keyshape::refuse_key("labels", v)?;
        }
        Ok(labels)
    }

    /// The labels, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = ValidationError;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, ValidationError> {
        Self::parse(map)
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

/// A free-text reason (for a revocation), at most 256 characters, none of them
/// [`is_hidden_or_control`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    /// Checks a caller-supplied reason (which must not hold what looks like an API key).
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        keyshape::refuse_key("reason", &s)?;
        if s.chars().count() > MAX_REASON_LEN {
            return Err(ValidationError::new(
                "reason",
                format!("at most {MAX_REASON_LEN} characters"),
            ));
        }
        if s.chars().any(is_hidden_or_control) {
            return Err(ValidationError::new(
                "reason",
                "control, line-separator and invisible formatting characters (bidirectional overrides, zero-width) are not allowed",
            ));
        }
        Ok(Self(s))
    }

    /// The reason text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the size of a secret value (1 byte to 64 KiB) in request field `field`.
pub fn check_value_len(field: &'static str, len: usize) -> Result<(), ValidationError> {
    if len == 0 {
        return Err(ValidationError::new(field, "required (1 byte to 64 KiB)"));
    }
    if len > MAX_VALUE_LEN {
        return Err(ValidationError::new(
            field,
            format!("at most {MAX_VALUE_LEN} bytes"),
        ));
    }
    Ok(())
}

macro_rules! uuid_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(uuid::Uuid);

        impl $name {
            /// A fresh random (v4) id.
            pub fn generate() -> Self {
                Self(uuid::Uuid::new_v4())
            }

            /// Parses the hyphenated form; `field` names the request field for errors.
            pub fn parse(field: &'static str, s: &str) -> Result<Self, ValidationError> {
                uuid::Uuid::try_parse(s)
                    .map(Self)
                    .map_err(|_| ValidationError::new(field, "not a valid id"))
            }

            /// The 16 raw bytes, for storage keys.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// The id of 16 raw bytes (as a storage key holds it).
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(uuid::Uuid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_type!(
    /// A secret's immutable id, assigned at Store.
    SecretId
);
uuid_type!(
    /// A lease's id: public, safe to log and to revoke by (unlike its token).
    LeaseId
);

/// SHA-256 of a lease token: what the store keeps instead of the token.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenHash(pub [u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// A point in time, in microseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Time(i64);

impl Time {
    /// As RFC 3339 in UTC with microseconds, e.g. `2026-11-25T01:02:03.456789Z`.
    pub fn to_rfc3339(self) -> String {
        let (secs, nanos) = self.seconds_nanos();
        let system = if secs >= 0 {
            std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::new(secs.unsigned_abs(), nanos.unsigned_abs())
        } else {
            std::time::SystemTime::UNIX_EPOCH
        };
        humantime::format_rfc3339_micros(system).to_string()
    }
}

impl Time {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    /// Converts from `SystemTime`, saturating far outside the representable range.
    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// From microseconds since the epoch.
    pub const fn from_micros(us: i64) -> Self {
        Self(us)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Seconds and nanoseconds since the epoch, as in `google.protobuf.Timestamp`.
    pub fn seconds_nanos(self) -> (i64, i32) {
        let secs = self.0.div_euclid(1_000_000);
        // rem_euclid of 1e6 is below 1e6, so the nanoseconds fit in i32.
        let nanos = (self.0.rem_euclid(1_000_000) * 1_000) as i32;
        (secs, nanos)
    }

    /// From seconds and nanoseconds since the epoch; `None` if out of range.
    pub fn from_seconds_nanos(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        seconds
            .checked_mul(1_000_000)
            .and_then(|us| us.checked_add(i64::from(nanos) / 1_000))
            .map(Self)
    }

    /// This time minus `d`, saturating.
    pub fn minus(self, d: Duration) -> Self {
        let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(us))
    }

    /// This time plus `d`, saturating.
    pub fn plus(self, d: Duration) -> Self {
        let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(us))
    }
}

/// The revision of a stored record: the store assigns a new, larger one each time a commit
/// writes the record, and a [`crate::store::Guard`] names the revision its caller read.
/// Records written before revisions existed read as revision 0. It is not part of a record's
/// serialized body: the store keeps it beside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

/// Whether a secret can still be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretState {
    /// The current version can be leased and read.
    Active,
    /// Every version was destroyed; the record remains as a tombstone.
    Revoked,
}

/// A secret's metadata: everything but the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Immutable id.
    pub id: SecretId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Name, unique within the tenant.
    pub name: SecretName,
    /// Model provider.
    pub provider: Provider,
    /// Caller-supplied labels.
    pub labels: Labels,
    /// Current version, starting at 1.
    pub version: u32,
    /// Active or revoked.
    pub state: SecretState,
    /// When the secret was stored.
    pub created_at: Time,
    /// When it last changed (store, rotate, revoke).
    pub updated_at: Time,
    /// Non-secret fingerprint of the current value; see [`value_hint`].
    pub hint: String,
    /// When it was revoked.
    pub revoked_at: Option<Time>,
    /// Who may use it and for how long (kept in the stored record's extension, see
    /// `store/codec.rs`: records written before it existed read with the default).
    #[serde(skip)]
    pub life: Lifecycle,
    /// The store's revision of this record (see [`Revision`]); ignored when written.
    #[serde(skip)]
    pub rev: Revision,
}

/// What a secret's owner set about its use, and where the secret is in its life beyond
/// active or revoked. The default is a secret as byokd kept them before any of it existed:
/// any reader of the tenant, no expiry, no reminder, destroyed at revocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// When not empty, the only principals that may redeem its leases (sorted, distinct).
    pub allowed_readers: Vec<PrincipalId>,
    /// When it stops being usable (until a Rotate gives it a new value).
    pub expires_at: Option<Time>,
    /// How long after a version is made a rotation is due, in microseconds.
    pub rotate_after_us: Option<u64>,
    /// When the current version was made (absent in records written before: `updated_at`).
    pub version_created_at: Option<Time>,
    /// The version whose due rotation the trail has recorded (`RotationDue`).
    pub rotation_due_noted: Option<u32>,
    /// The expiry the trail has recorded (`Expire`).
    pub expiry_noted: Option<Time>,
    /// Revoked with a recovery window: the data keys are kept until then.
    pub destroy_at: Option<Time>,
    /// The previous version, still redeemable by the leases issued for it until `until`.
    pub grace: Option<Grace>,
    /// Leases issued before this time do not work (set by a Restore: the leases a
    /// revocation ended stay ended).
    pub leases_after: Option<Time>,
}

/// A previous version kept for the leases issued on it, for a while after a Rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grace {
    /// The previous version.
    pub version: u32,
    /// When its data key is destroyed.
    pub until: Time,
}

impl Lifecycle {
    /// Whether `principal` may redeem the secret's leases.
    pub fn may_read(&self, principal: &PrincipalId) -> bool {
        self.allowed_readers.is_empty() || self.allowed_readers.contains(principal)
    }
}

/// Where a secret is in its life, as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The current version can be leased and read.
    Active,
    /// Past its `expires_at`: nothing can be leased or read until a Rotate.
    Expired,
    /// Revoked within a recovery window: restorable until `destroy_at`.
    PendingDeletion,
    /// Every version was destroyed.
    Revoked,
}

impl SecretRecord {
    /// When the current version was made.
    pub fn version_made_at(&self) -> Time {
        self.life.version_created_at.unwrap_or(self.updated_at)
    }

    /// Where the secret is in its life at `now`.
    pub fn phase(&self, now: Time) -> Phase {
        match self.state {
            SecretState::Revoked if self.life.destroy_at.is_some() => Phase::PendingDeletion,
            SecretState::Revoked => Phase::Revoked,
            SecretState::Active if self.life.expires_at.is_some_and(|t| t <= now) => Phase::Expired,
            SecretState::Active => Phase::Active,
        }
    }

    /// Whether a rotation is due at `now`: `rotate_after` has passed since the current version
    /// was made (of an active or expired secret).
    pub fn rotation_due(&self, now: Time) -> bool {
        self.state == SecretState::Active
            && self.life.rotate_after_us.is_some_and(|after| {
                self.version_made_at().plus(Duration::from_micros(after)) <= now
            })
    }
}

/// A data key wrapped by a master key, with the id of that master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Id of the master key that wrapped it.
    pub key_id: String,
    /// The data directory's master key version that wrapped it.
    pub key_version: u32,
    /// Opaque wrapped bytes.
    pub blob: Vec<u8>,
}

/// The sealed value of one secret version and its wrapped data key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeRecord {
    /// The secret this version belongs to.
    pub secret_id: SecretId,
    /// The secret's tenant (part of the data key's wrap context).
    pub tenant: TenantId,
    /// The version number.
    pub version: u32,
    /// The data key, wrapped by the master key.
    pub wrapped_key: WrappedKey,
    /// AES-GCM nonce of the value.
    pub nonce: [u8; 12],
    /// Sealed value with its tag.
    pub ciphertext: Vec<u8>,
    /// When this version was created.
    pub created_at: Time,
    /// The store's revision of this record (see [`Revision`]); ignored when written.
    #[serde(skip)]
    pub rev: Revision,
}

/// A lease: the right to redeem one secret version a bounded number of times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Public id.
    pub id: LeaseId,
    /// SHA-256 of the bearer token; the token itself is never stored.
    pub token_hash: TokenHash,
    /// Leased secret.
    pub secret_id: SecretId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its name.
    pub name: SecretName,
    /// The version leased; redemption fails once the secret has moved on.
    pub version: u32,
    /// Principal that obtained the lease.
    pub issued_to: PrincipalId,
    /// If set, the only principal that may redeem it.
    pub audience: Option<PrincipalId>,
    /// When it was issued.
    pub created_at: Time,
    /// When it stops working.
    pub expires_at: Time,
    /// Uses allowed.
    pub max_uses: u32,
    /// Uses consumed.
    pub uses: u32,
    /// Ended by Revoke.
    pub revoked: bool,
    /// The store's revision of this record (see [`Revision`]); ignored when written.
    #[serde(skip)]
    pub rev: Revision,
}

/// What an audited request did: one per RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// `Store`
    Store,
    /// `Describe`
    Describe,
    /// `List`
    List,
    /// `Lease`
    Lease,
    /// `Get`
    Get,
    /// `Rotate`
    Rotate,
    /// `Revoke`
    Revoke,
    /// `Audit`
    Audit,
    /// `VerifyAudit`
    VerifyAudit,
    /// `WatchAudit`
    WatchAudit,
    /// Audit entries pruned by the retention policy (not an RPC).
    Prune,
    /// `RotateMasterKey`
    RotateMasterKey,
    /// `GetRotationStatus`
    GetRotationStatus,
    /// A master-key rotation's rewrap job finished (not an RPC).
    Rewrap,
    /// `Backup`
    Backup,
    /// `byokd audit repair` cut a damaged audit trail (not an RPC); the reason says what was
    /// lost.
    Repair,
    /// Requests refused before they reached the vault (too many unauthenticated requests
    /// from one host), counted: one entry per host and interval (not an RPC).
    Throttled,
    /// `UpdateSecret`; the reason names the fields changed.
    UpdateSecret,
    /// A secret reached its `expires_at` (not an RPC: the background sweep records it).
    Expire,
    /// A secret's rotation fell due (not an RPC: the background sweep records it once per
    /// version).
    RotationDue,
    /// `Restore`
    Restore,
    /// `Purge`
    Purge,
    /// Data keys destroyed when a recovery window or a rotation grace ended (not an RPC: the
    /// background sweep records it).
    Destroy,
    /// `GetUsage`
    GetUsage,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 24] = [
        Action::Store,
        Action::Describe,
        Action::List,
        Action::Lease,
        Action::Get,
        Action::Rotate,
        Action::Revoke,
        Action::Audit,
        Action::VerifyAudit,
        Action::WatchAudit,
        Action::Prune,
        Action::RotateMasterKey,
        Action::GetRotationStatus,
        Action::Rewrap,
        Action::Backup,
        Action::Repair,
        Action::Throttled,
        Action::UpdateSecret,
        Action::Expire,
        Action::RotationDue,
        Action::Restore,
        Action::Purge,
        Action::Destroy,
        Action::GetUsage,
    ];

    /// The RPC's name, as recorded and as filtered on.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Store => "Store",
            Action::Describe => "Describe",
            Action::List => "List",
            Action::Lease => "Lease",
            Action::Get => "Get",
            Action::Rotate => "Rotate",
            Action::Revoke => "Revoke",
            Action::Audit => "Audit",
            Action::VerifyAudit => "VerifyAudit",
            Action::WatchAudit => "WatchAudit",
            Action::Prune => "Prune",
            Action::RotateMasterKey => "RotateMasterKey",
            Action::GetRotationStatus => "GetRotationStatus",
            Action::Rewrap => "Rewrap",
            Action::Backup => "Backup",
            Action::Repair => "Repair",
            Action::Throttled => "Throttled",
            Action::UpdateSecret => "UpdateSecret",
            Action::Expire => "Expire",
            Action::RotationDue => "RotationDue",
            Action::Restore => "Restore",
            Action::Purge => "Purge",
            Action::Destroy => "Destroy",
            Action::GetUsage => "GetUsage",
        }
    }

    /// Parses an RPC name, case-insensitively; `field` names the request field.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                ValidationError::new(
                    field,
                    "unknown action (an RPC name such as Get, or Prune, Rewrap, Repair, Throttled, Expire, RotationDue, Destroy)",
                )
            })
    }
}

/// How a request ended: byokd's own mirror of the gRPC status codes it uses, so the domain
/// can record outcomes without knowing the wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Success.
    Ok,
    /// Bad input.
    InvalidArgument,
    /// No such secret or lease (or one the caller may not see).
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// Authenticated, but not allowed.
    PermissionDenied,
    /// The state forbids the operation (e.g. a revoked secret).
    FailedPrecondition,
    /// Too much contention; retry.
    Aborted,
    /// Over a rate or concurrency limit; retry later.
    ResourceExhausted,
    /// Past the valid range (e.g. audit entries pruned by retention).
    OutOfRange,
    /// No valid credentials.
    Unauthenticated,
    /// Stored data could not be decrypted.
    DataLoss,
    /// A dependency (store, key service) is unavailable.
    Unavailable,
    /// A bug or an unexpected failure.
    Internal,
    /// The caller went away before the answer.
    Cancelled,
    /// The request's deadline passed before the answer.
    DeadlineExceeded,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 15] = [
        Outcome::Ok,
        Outcome::InvalidArgument,
        Outcome::NotFound,
        Outcome::AlreadyExists,
        Outcome::PermissionDenied,
        Outcome::FailedPrecondition,
        Outcome::Aborted,
        Outcome::ResourceExhausted,
        Outcome::OutOfRange,
        Outcome::Unauthenticated,
        Outcome::DataLoss,
        Outcome::Unavailable,
        Outcome::Internal,
        Outcome::Cancelled,
        Outcome::DeadlineExceeded,
    ];

    /// Parses a gRPC code name such as `PERMISSION_DENIED` (case-insensitive); `field` names
    /// the request field.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                ValidationError::new(
                    field,
                    "not a gRPC status code name such as PERMISSION_DENIED",
                )
            })
    }

    /// Canonical gRPC name of the code, e.g. `PERMISSION_DENIED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::InvalidArgument => "INVALID_ARGUMENT",
            Outcome::NotFound => "NOT_FOUND",
            Outcome::AlreadyExists => "ALREADY_EXISTS",
            Outcome::PermissionDenied => "PERMISSION_DENIED",
            Outcome::FailedPrecondition => "FAILED_PRECONDITION",
            Outcome::Aborted => "ABORTED",
            Outcome::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Outcome::OutOfRange => "OUT_OF_RANGE",
            Outcome::Unauthenticated => "UNAUTHENTICATED",
            Outcome::DataLoss => "DATA_LOSS",
            Outcome::Unavailable => "UNAVAILABLE",
            Outcome::Internal => "INTERNAL",
            Outcome::Cancelled => "CANCELLED",
            Outcome::DeadlineExceeded => "DEADLINE_EXCEEDED",
        }
    }

    /// Numeric gRPC code.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Ok => 0,
            Outcome::InvalidArgument => 3,
            Outcome::NotFound => 5,
            Outcome::AlreadyExists => 6,
            Outcome::PermissionDenied => 7,
            Outcome::FailedPrecondition => 9,
            Outcome::Aborted => 10,
            Outcome::ResourceExhausted => 8,
            Outcome::OutOfRange => 11,
            Outcome::Internal => 13,
            Outcome::Unavailable => 14,
            Outcome::DataLoss => 15,
            Outcome::Unauthenticated => 16,
            Outcome::Cancelled => 1,
            Outcome::DeadlineExceeded => 4,
        }
    }
}

/// One audit entry as the caller of the store describes it; the store assigns `seq` and `time`
/// when it commits the entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditDraft {
    /// Authenticated principal, if any.
    pub principal: Option<PrincipalId>,
    /// Peer address of the caller.
    pub peer: Option<String>,
    /// The RPC.
    pub action: Action,
    /// Tenant concerned, if known and valid.
    pub tenant: Option<TenantId>,
    /// Secret name concerned, if known and valid.
    pub name: Option<SecretName>,
    /// Secret id concerned, if known.
    pub secret_id: Option<SecretId>,
    /// Secret version concerned, if any.
    pub version: Option<u32>,
    /// Lease concerned, if any (never the token).
    pub lease_id: Option<LeaseId>,
    /// How the request ended.
    pub outcome: Outcome,
    /// Why it failed, or the caller's reason for a revocation.
    pub reason: String,
}

/// What a committed entry changed of the keys a process may hold copies of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysChanged {
    /// Nothing.
    None,
    /// A Rotate, Revoke, Destroy or Purge of this secret destroyed data keys of it.
    Secret(SecretId),
    /// A master-key rotation started or rewrapped envelopes: the keyring changed.
    MasterKey,
}

impl AuditDraft {
    /// What this entry, committed, changed of the keys other processes may hold copies of
    /// (a failed request changed nothing).
    pub fn keys_changed(&self) -> KeysChanged {
        if self.outcome != Outcome::Ok {
            return KeysChanged::None;
        }
        match (self.action, self.secret_id) {
            (Action::Rotate | Action::Revoke | Action::Destroy | Action::Purge, Some(id)) => {
                KeysChanged::Secret(id)
            }
            (Action::RotateMasterKey | Action::Rewrap, _) => KeysChanged::MasterKey,
            _ => KeysChanged::None,
        }
    }

    /// A draft for `action` by `principal` from `peer`, outcome OK until told otherwise.
    pub fn new(action: Action, principal: Option<PrincipalId>, peer: Option<String>) -> Self {
        Self {
            principal,
            peer,
            action,
            tenant: None,
            name: None,
            secret_id: None,
            version: None,
            lease_id: None,
            outcome: Outcome::Ok,
            reason: String::new(),
        }
    }

    /// Records which secret the request concerned.
    pub fn secret(&mut self, record: &SecretRecord) {
        self.tenant = Some(record.tenant.clone());
        self.name = Some(record.name.clone());
        self.secret_id = Some(record.id);
        self.version = Some(record.version);
    }

    /// Records which lease the request concerned.
    pub fn lease(&mut self, lease: &LeaseRecord) {
        self.tenant = Some(lease.tenant.clone());
        self.name = Some(lease.name.clone());
        self.secret_id = Some(lease.secret_id);
        self.version = Some(lease.version);
        self.lease_id = Some(lease.id);
    }
}

/// A link of the audit hash chain: HMAC-SHA256 output (see `chain`).
pub type ChainHash = [u8; 32];

/// A committed audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the trail, from 1, without gaps.
    pub seq: u64,
    /// When the store committed it; never decreases along the sequence.
    pub time: Time,
    /// What happened.
    pub entry: AuditDraft,
    /// `hash` of the previous entry (of the anchor, for the first entry kept).
    pub prev_hash: ChainHash,
    /// HMAC of `prev_hash` and this entry's canonical encoding under the audit key.
    pub hash: ChainHash,
}

/// Where the audit chain starts: the last pruned entry (`seq` 0 and a zero hash when
/// nothing was pruned), authenticated with the audit key so that it cannot be moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    /// Sequence number of the last pruned entry.
    pub seq: u64,
    /// Its hash: the `prev_hash` of the first entry kept.
    pub hash: ChainHash,
    /// HMAC of `seq` and `hash` under the audit key.
    pub mac: ChainHash,
}

/// A non-secret fingerprint of a value, such as `sk-a…a1b2`: at most 8 characters of the
/// value, and fewer for short values (none below 16 bytes), so that the hint never narrows
/// down a value an attacker could otherwise not guess. Non-printable values get `…` only.
pub fn value_hint(value: &[u8]) -> String {
    const ELLIPSIS: &str = "…";
    let printable = value.iter().all(|b| b.is_ascii_graphic());
    if !printable || value.len() < 16 {
        return ELLIPSIS.to_string();
    }
    // 4 + 4 characters from 32 bytes up; 2 + 2 between 16 and 31 bytes.
    let side = if value.len() >= 32 { 4 } else { 2 };
    let head = String::from_utf8_lossy(&value[..side]);
    let tail = String::from_utf8_lossy(&value[value.len() - side..]);
    format!("{head}{ELLIPSIS}{tail}")
}

/// The host part of a peer address (`10.0.0.1:5000` -> `10.0.0.1`): what the peer audit index
/// keys and the per-host rate limits count.
pub fn peer_host(peer: &str) -> String {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(TenantId::parse("acme-corp_1.prod").is_ok());
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(129)] {
            let err = TenantId::parse(bad).unwrap_err();
            assert_eq!(err.field, "tenant");
        }
        assert!(SecretName::parse("x".repeat(128)).is_ok());
        assert_eq!(
            SecretName::parse("").unwrap_err().to_string(),
            "name: required"
        );
    }

    #[test]
    fn labels_are_bounded() {
        let ok = Labels::parse([("team/owner".into(), "Ada Lovelace".into())]);
        assert!(ok.is_ok());
        let too_many = (0..33).map(|i| (format!("k{i}"), String::new()));
        assert!(Labels::parse(too_many).is_err());
        assert!(Labels::parse([("".into(), "v".into())]).is_err());
        assert!(Labels::parse([("k".into(), "line\nbreak".into())]).is_err());
        assert!(Labels::parse([("k".into(), "v".repeat(257))]).is_err());
    }

    #[test]
    fn value_limits() {
        assert!(check_value_len("value", 0).is_err());
        assert!(check_value_len("value", 1).is_ok());
        assert!(check_value_len("value", 65536).is_ok());
        assert_eq!(
            check_value_len("value", 65537).unwrap_err().to_string(),
            "value: at most 65536 bytes"
        );
    }

    #[test]
    fn hints_reveal_at_most_eight_characters() {
        let key = b"sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789-a1b2";
        assert_eq!(value_hint(key), "sk-a…a1b2");
        assert_eq!(value_hint(b"0123456789abcdef"), "01…ef");
        assert_eq!(value_hint(b"short-secret"), "…");
        assert_eq!(value_hint(&[0xff; 40]), "…");
        for len in 0..100 {
            let v: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let hint = value_hint(&v);
            let revealed = hint.chars().filter(|&c| c != '…').count();
            assert!(revealed <= 8 && revealed * 4 <= len, "len {len}: {hint}");
        }
    }

    #[test]
    fn time_round_trips_through_seconds_and_nanos() {
        for us in [0, 1, 1_700_000_000_123_456, -1, -1_500_000] {
            let t = Time::from_micros(us);
            let (s, n) = t.seconds_nanos();
            assert_eq!(Time::from_seconds_nanos(s, n), Some(t));
        }
        assert_eq!(Time::from_seconds_nanos(0, -1), None);
        assert_eq!(Time::from_seconds_nanos(i64::MAX, 0), None);
    }

    #[test]
    fn actions_parse_case_insensitively() {
        assert_eq!(Action::parse("action", "get").unwrap(), Action::Get);
        assert!(Action::parse("action", "Delete").is_err());
    }
}
