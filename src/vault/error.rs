//! What can go wrong in a vault operation, and how each failure is reported: its audit outcome
//! and the message a caller may see (internal causes are logged, never returned).

use crate::audit::AuditError;
use crate::auth::AuthError;
use crate::backup::BackupError;
use crate::crypto::CryptoError;
use crate::keyring::KeyringError;
use crate::lease::LeaseError;
use crate::model::{Outcome, ValidationError};
use crate::quota::QuotaError;
use crate::rotation::RotationError;
use crate::store::StoreError;

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
    /// The secret is past its expiry (a Rotate makes it active again).
    #[error("secret expired; rotate it to use it again")]
    SecretExpired,
    /// Restore of a secret that is not pending deletion (or whose window has ended).
    #[error("secret is not pending deletion")]
    NotPendingDeletion,
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
    Store(StoreError),
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

impl From<StoreError> for VaultError {
    /// A quota the store held a charge to is the caller's to hear (RESOURCE_EXHAUSTED);
    /// other store failures are not.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::OverQuota(over) => VaultError::Quota(QuotaError::Over(over)),
            other => VaultError::Store(other),
        }
    }
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
            VaultError::SecretRevoked
            | VaultError::SecretExpired
            | VaultError::NotPendingDeletion => Outcome::FailedPrecondition,
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
