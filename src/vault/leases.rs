//! Leases: issuing one, redeeming it (Get), revoking one, and collecting expired ones.

use std::collections::BTreeMap;

use crate::auth::Operation;
use crate::lease::{self, LeaseError, LeaseToken};
use crate::model::{
    Action, AuditDraft, LeaseId, LeaseRecord, Phase, PrincipalId, Reason, SecretRecord, TenantId,
    Time, TokenHash, ValidationError,
};
use crate::pending::Pending;
use crate::quota::{Delta, Quotas};
use crate::store::{Guard, Redemption, Transaction, Write};

use super::{
    Attempts, Caller, DecryptFailure, GC_BATCH, IssuedLease, LeaseInput, Redeemed, Revoked, Vault,
    VaultError, authorize_secret,
};

impl Vault {
    /// Failed lease redemptions so far (each one also audited).
    pub fn failed_redemptions(&self) -> u64 {
        self.failed_gets.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Issues a lease on the current version of a secret.
    pub async fn lease(
        &self,
        caller: &Caller,
        input: LeaseInput,
    ) -> Result<IssuedLease, VaultError> {
        operation!(self, caller, Action::Lease, |audit| {
            self.try_lease(caller, input, &mut audit).await
        })
    }

    pub(super) async fn try_lease(
        &self,
        caller: &Caller,
        input: LeaseInput,
        audit: &mut AuditDraft,
    ) -> Result<IssuedLease, VaultError> {
        let (principal, tenant, name) =
            authorize_secret(caller, audit, Operation::Lease, input.tenant, input.name)?;
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
            let now = Time::now();
            if secret.phase(now) == Phase::Expired {
                return Err(VaultError::SecretExpired);
            }
            if let Some(audience) = &audience
                && !secret.life.may_read(audience)
            {
                return Err(ValidationError::new(
                    "audience",
                    "not one of the secret's allowed_readers",
                )
                .into());
            }
            let token = LeaseToken::generate().map_err(VaultError::Crypto)?;
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
            let charge = self.quotas.charge(
                &tenant,
                Delta {
                    leases: 1,
                    ..Delta::default()
                },
            )?;
            let tx = Transaction {
                charges: vec![charge],
                // The lease is on the version current at commit, not merely at read.
                guards: vec![Guard::secret(&tenant, &name, Some(&secret))],
                writes: vec![Write::PutLease(lease.clone())],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self
                .commit_or_retry(tx, IssuedLease { lease, token })
                .await?
            {
                return Ok(done);
            }
        }
    }

    /// Redeems a lease token: the plaintext, consuming one use.
    pub async fn get(&self, caller: &Caller, token: &str) -> Result<Redeemed, VaultError> {
        operation!(self, caller, Action::Get, |audit| {
            // The lease the token names (with its secret and envelope: one read), read before
            // anything decides, so that a refused request is audited with its target.
            let token_hash = lease::presented_token_hash(token);
            let first = match &token_hash {
                Ok(hash) => self.store.redemption(hash).await?,
                Err(_) => None,
            };
            if let Some(read) = &first {
                audit.lease(&read.lease);
            }
            let limit = self.limits.failed_get_rate_limit;
            // A peer or principal that keeps presenting bad tokens is refused before its next
            // guess is looked at. Only one that failed has a bucket to look at.
            if !self.failure_buckets.is_empty()
                && !caller
                    .failure_keys()
                    .iter()
                    .all(|k| self.failure_buckets.has_token(k, limit))
            {
                return Err(VaultError::TooManyFailures);
            }
            let result = self.try_get(caller, token_hash, first, &mut audit).await;
            if let Err(VaultError::Lease(_)) = &result {
                self.failed_gets
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for key in &caller.failure_keys() {
                    self.failure_buckets.take(key, limit);
                }
            }
            result
        })
    }

    pub(super) async fn try_get(
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
            let value = if lease.version == secret.version {
                let envelope =
                    envelope.ok_or(VaultError::Decrypt(DecryptFailure::MissingEnvelope))?;
                self.open(&secret, &envelope).await?
            } else {
                // A lease on the previous version, in its rotation grace: that version.
                let envelope = self
                    .store
                    .envelope(secret.id, lease.version)
                    .await?
                    .ok_or(VaultError::Decrypt(DecryptFailure::MissingEnvelope))?;
                let previous = SecretRecord {
                    version: lease.version,
                    ..secret.clone()
                };
                self.open(&previous, &envelope).await?
            };
            let mut used = lease.clone();
            used.uses += 1;
            let tx = Transaction {
                charges: Vec::new(),
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

    pub(super) async fn revoke_lease(
        &self,
        caller: &Caller,
        id: &str,
        reason: String,
        recovery_window: Option<(i64, i32)>,
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
        if recovery_window.is_some() {
            return Err(ValidationError::new(
                "recovery_window",
                "only a secret's revocation has one",
            )
            .into());
        }
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
                    usage: None,
                });
            }
            let mut revoked = lease.clone();
            revoked.revoked = true;
            let tx = Transaction {
                charges: Vec::new(),
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
                        usage: None,
                    },
                )
                .await?
            {
                return Ok(done);
            }
        }
    }

    /// Deletes every lease that has expired, a batch per commit, each carrying `fence` (see
    /// `runner`). Returns how many.
    pub async fn collect_expired_leases(&self, fence: Guard) -> Result<usize, VaultError> {
        let now = Time::now();
        let mut total = 0;
        loop {
            let expired = self.store.expired_leases(now, GC_BATCH).await?;
            let count = expired.len();
            if count == 0 {
                return Ok(total);
            }
            let mut collected: BTreeMap<&TenantId, i64> = BTreeMap::new();
            for lease in &expired {
                *collected.entry(&lease.tenant).or_default() += 1;
            }
            let charges = collected
                .into_iter()
                .map(|(tenant, leases)| {
                    let back = Delta {
                        leases: -leases,
                        ..Delta::default()
                    };
                    Quotas::give_back(tenant, back)
                })
                .collect();
            let tx = Transaction {
                charges,
                guards: vec![fence.clone()],
                writes: expired.into_iter().map(Write::DeleteLease).collect(),
                audit: None,
            };
            self.store.commit(tx).await?;
            total += count;
            if count < GC_BATCH {
                return Ok(total);
            }
        }
    }
}
