//! Leases: short-lived bearer capabilities to read one secret version.
//!
//! A token is 256 random bits, shown once (in the `LeaseGrant`); the store keeps its SHA-256
//! and looks leases up by that hash, so a token is never compared byte by byte, and a stolen
//! database yields no usable token.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::crypto::{self, CryptoError};
use crate::model::{LeaseRecord, Phase, PrincipalId, SecretRecord, SecretState, Time, TokenHash};

/// Prefix of every lease token, so that secret scanners can recognise a leaked one.
pub const TOKEN_PREFIX: &str = "byokd_lt_";
/// Length of a token: the prefix and 32 bytes in unpadded base64url.
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 43;

/// Default lifetime of a lease.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Default upper bound on a requested lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(15 * 60);
/// Default upper bound on `max_uses`.
pub const DEFAULT_MAX_USES: u32 = 1000;

/// Why a lease cannot be issued or redeemed. Redemption failures are told apart here, for the
/// audit trail, and collapse into one answer for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The requested lifetime is zero or negative.
    #[error("ttl must be positive")]
    TtlNotPositive,
    /// The requested lifetime exceeds the configured maximum.
    #[error("ttl must be at most {}", humantime::format_duration(*max))]
    TtlTooLong {
        /// The configured maximum.
        max: Duration,
    },
    /// `max_uses` exceeds the configured maximum.
    #[error("max_uses must be at most {max}")]
    TooManyUses {
        /// The configured maximum.
        max: u32,
    },
    /// The presented token is not shaped like a token.
    #[error("malformed token")]
    MalformedToken,
    /// No lease has this token.
    #[error("no such lease")]
    NoSuchLease,
    /// The lease has expired.
    #[error("lease expired")]
    Expired,
    /// Every use was consumed.
    #[error("lease used up")]
    UsedUp,
    /// The lease was revoked.
    #[error("lease revoked")]
    Revoked,
    /// The caller is not the lease's audience.
    #[error("caller is not the lease's audience")]
    WrongAudience,
    /// The caller is not one of the secret's allowed readers.
    #[error("caller is not one of the secret's allowed readers")]
    NotAllowedReader,
    /// The secret is past its expiry.
    #[error("secret expired")]
    SecretExpired,
    /// The caller may not act in the lease's tenant.
    #[error("caller has no access to the lease's tenant")]
    WrongTenant,
    /// The secret was rotated since the lease was issued.
    #[error("secret was rotated since the lease was issued")]
    Superseded,
    /// The secret was revoked (or replaced).
    #[error("secret was revoked")]
    SecretRevoked,
}

/// A freshly minted lease token. Shown once to the caller; only its hash is kept.
pub struct LeaseToken(crypto::SecretToken);

impl LeaseToken {
    /// 256 random bits from the operating system.
    pub fn generate() -> Result<Self, CryptoError> {
        crypto::random_token(TOKEN_PREFIX).map(Self)
    }

    /// The token text, to hand to the caller once.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// The hash the store keeps.
    pub fn hash(&self) -> TokenHash {
        hash_token(self.0.expose_secret())
    }
}

fn hash_token(token: &str) -> TokenHash {
    TokenHash(Sha256::digest(token.as_bytes()).into())
}

/// Hashes a presented token for lookup, after a shape check that needs no secret data.
pub fn presented_token_hash(token: &str) -> Result<TokenHash, LeaseError> {
    let well_formed = token.len() == TOKEN_LEN
        && token.starts_with(TOKEN_PREFIX)
        && token[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if well_formed {
        Ok(hash_token(token))
    } else {
        Err(LeaseError::MalformedToken)
    }
}

/// Limits on the leases the server issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    /// Lifetime when the request names none.
    pub default_ttl: Duration,
    /// Longest lifetime a request may ask for.
    pub max_ttl: Duration,
    /// Most uses a request may ask for.
    pub max_uses: u32,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self {
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            max_uses: DEFAULT_MAX_USES,
        }
    }
}

/// A requested lifetime, as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestedTtl {
    /// None given: use the default.
    Default,
    /// Zero or negative.
    NotPositive,
    /// A positive duration.
    Positive(Duration),
}

impl LeasePolicy {
    /// The lifetime and use count to grant for a request, or why not.
    pub fn grant(&self, ttl: RequestedTtl, max_uses: u32) -> Result<(Duration, u32), LeaseError> {
        let ttl = match ttl {
            RequestedTtl::Default => self.default_ttl.min(self.max_ttl),
            RequestedTtl::NotPositive => return Err(LeaseError::TtlNotPositive),
            RequestedTtl::Positive(d) if d > self.max_ttl => {
                return Err(LeaseError::TtlTooLong { max: self.max_ttl });
            }
            RequestedTtl::Positive(d) => d,
        };
        let uses = match max_uses {
            0 => 1,
            n if n > self.max_uses => return Err(LeaseError::TooManyUses { max: self.max_uses }),
            n => n,
        };
        Ok((ttl, uses))
    }
}

/// Checks that `lease` may be redeemed now by `caller` against the secret's current record.
pub fn check_redeemable(
    lease: &LeaseRecord,
    secret: Option<&SecretRecord>,
    caller: &PrincipalId,
    now: Time,
) -> Result<(), LeaseError> {
    if lease.revoked {
        return Err(LeaseError::Revoked);
    }
    if now >= lease.expires_at {
        return Err(LeaseError::Expired);
    }
    if lease.uses >= lease.max_uses {
        return Err(LeaseError::UsedUp);
    }
    if lease.audience.as_ref().is_some_and(|a| a != caller) {
        return Err(LeaseError::WrongAudience);
    }
    match secret {
        Some(s) if s.id == lease.secret_id && s.state == SecretState::Active => {
            let in_grace = s
                .life
                .grace
                .is_some_and(|g| g.version == lease.version && now < g.until);
            if !s.life.may_read(caller) {
                Err(LeaseError::NotAllowedReader)
            } else if s.life.leases_after.is_some_and(|t| lease.created_at < t) {
                // Issued before a revocation that a Restore undid: ended by it.
                Err(LeaseError::SecretRevoked)
            } else if s.phase(now) == Phase::Expired {
                Err(LeaseError::SecretExpired)
            } else if s.version == lease.version || in_grace {
                Ok(())
            } else {
                Err(LeaseError::Superseded)
            }
        }
        _ => Err(LeaseError::SecretRevoked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LeaseId, SecretId, SecretName, TenantId};

    #[test]
    fn tokens_are_random_and_hash_checked() {
        let a = LeaseToken::generate().unwrap();
        let b = LeaseToken::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), TOKEN_LEN);
        assert_eq!(presented_token_hash(a.expose_secret()).unwrap(), a.hash());
        assert_ne!(a.hash(), b.hash());
        for bad in [
            "",
            "byokd_lt_",
            &a.expose_secret()[1..],
            &format!("{}=", &a.expose_secret()[..TOKEN_LEN - 1]),
        ] {
            assert_eq!(
                presented_token_hash(bad),
                Err(LeaseError::MalformedToken),
                "{bad}"
            );
        }
    }

    #[test]
    fn policy_bounds_requests() {
        let p = LeasePolicy::default();
        assert_eq!(p.grant(RequestedTtl::Default, 0), Ok((DEFAULT_TTL, 1)));
        assert_eq!(
            p.grant(RequestedTtl::Positive(DEFAULT_MAX_TTL), 5),
            Ok((DEFAULT_MAX_TTL, 5))
        );
        assert_eq!(
            p.grant(
                RequestedTtl::Positive(DEFAULT_MAX_TTL + Duration::from_secs(1)),
                1
            ),
            Err(LeaseError::TtlTooLong {
                max: DEFAULT_MAX_TTL
            })
        );
        assert_eq!(
            p.grant(RequestedTtl::NotPositive, 1),
            Err(LeaseError::TtlNotPositive)
        );
        assert_eq!(
            p.grant(RequestedTtl::Default, 1001),
            Err(LeaseError::TooManyUses { max: 1000 })
        );
        assert_eq!(
            LeaseError::TtlTooLong {
                max: DEFAULT_MAX_TTL
            }
            .to_string(),
            "ttl must be at most 15m"
        );
    }

    #[test]
    fn redemption_checks() {
        use crate::model::{Labels, Provider};
        let secret = SecretRecord {
            id: SecretId::generate(),
            tenant: TenantId::parse("t").unwrap(),
            name: SecretName::parse("n").unwrap(),
            provider: Provider::parse("p").unwrap(),
            labels: Labels::default(),
            version: 2,
            state: SecretState::Active,
            created_at: Time::from_micros(0),
            updated_at: Time::from_micros(0),
            hint: String::new(),
            revoked_at: None,
            life: Default::default(),
            rev: Default::default(),
        };
        let caller = PrincipalId::parse("agent").unwrap();
        let lease = LeaseRecord {
            id: LeaseId::generate(),
            token_hash: TokenHash([0; 32]),
            secret_id: secret.id,
            tenant: secret.tenant.clone(),
            name: secret.name.clone(),
            version: 2,
            issued_to: caller.clone(),
            audience: Some(caller.clone()),
            created_at: Time::from_micros(0),
            expires_at: Time::from_micros(100),
            max_uses: 2,
            uses: 1,
            revoked: false,
            rev: Default::default(),
        };
        let now = Time::from_micros(50);
        let check = |l: &LeaseRecord, s: &SecretRecord, who: &PrincipalId, t| {
            check_redeemable(l, Some(s), who, t)
        };
        assert_eq!(check(&lease, &secret, &caller, now), Ok(()));
        assert_eq!(
            check(&lease, &secret, &caller, Time::from_micros(100)),
            Err(LeaseError::Expired)
        );
        let other = PrincipalId::parse("other").unwrap();
        assert_eq!(
            check(&lease, &secret, &other, now),
            Err(LeaseError::WrongAudience)
        );
        let used = LeaseRecord {
            uses: 2,
            ..lease.clone()
        };
        assert_eq!(check(&used, &secret, &caller, now), Err(LeaseError::UsedUp));
        let revoked = LeaseRecord {
            revoked: true,
            ..lease.clone()
        };
        assert_eq!(
            check(&revoked, &secret, &caller, now),
            Err(LeaseError::Revoked)
        );
        let rotated = SecretRecord {
            version: 3,
            ..secret.clone()
        };
        assert_eq!(
            check(&lease, &rotated, &caller, now),
            Err(LeaseError::Superseded)
        );
        let gone = SecretRecord {
            state: SecretState::Revoked,
            ..secret.clone()
        };
        assert_eq!(
            check(&lease, &gone, &caller, now),
            Err(LeaseError::SecretRevoked)
        );
        let replaced = SecretRecord {
            id: SecretId::generate(),
            ..secret.clone()
        };
        assert_eq!(
            check(&lease, &replaced, &caller, now),
            Err(LeaseError::SecretRevoked)
        );
        assert_eq!(
            check_redeemable(&lease, None, &caller, now),
            Err(LeaseError::SecretRevoked)
        );
    }
}
