//! Operations on secrets: Store, Describe, List, Rotate and Revoke.

use super::deletion::held;
use super::life::window_field;
use crate::auth::Operation;
use crate::crypto::Plaintext;
use crate::model::{
    Action, AuditDraft, Grace, Labels, Phase, Provider, SecretId, SecretName, SecretRecord,
    SecretState, TenantId, Time, ValidationError, check_value_len, keyshape, value_hint,
};
use crate::quota::Delta;
use crate::store::{Guard, StoreError, Transaction, Write};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{
    Attempts, Caller, Changed, DEFAULT_LIST_PAGE_SIZE, Described, ListFilter, ListInput,
    MAX_LIST_PAGE_SIZE, MAX_LIST_SCAN, RevokeTarget, Revoked, RotateInput, StoreInput, Vault,
    VaultError, authorize_secret, noted, page_size_or,
};

impl Vault {
    /// Stores a new secret at version 1.
    pub async fn store(&self, caller: &Caller, input: StoreInput) -> Result<Changed, VaultError> {
        operation!(self, caller, Action::Store, |audit| {
            self.try_store(caller, input, &mut audit).await
        })
    }

    pub(super) async fn try_store(
        &self,
        caller: &Caller,
        input: StoreInput,
        audit: &mut AuditDraft,
    ) -> Result<Changed, VaultError> {
        let (_, tenant, name) =
            authorize_secret(caller, audit, Operation::Store, input.tenant, input.name)?;
        let provider = Provider::from_request(input.provider)?;
        let labels = Labels::from_request(input.labels)?;
        check_value_len("value", input.value.len())?;
        let warnings = shape_warnings(&provider, &input.value, input.strict_format)?;
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
            life: self.new_life(input.life, now)?,
            rev: Default::default(),
        };
        let envelope = self.seal(&record, &input.value).await?;
        audit.secret(&record);
        let charge = self.quotas.charge(
            &record.tenant,
            Delta {
                secrets: 1,
                value_bytes: envelope.ciphertext.len() as i64,
                leases: 0,
            },
        )?;
        let tx = Transaction {
            charges: vec![charge],
            guards: vec![Guard::secret(&record.tenant, &record.name, None)],
            writes: vec![
                Write::PutSecret(record.clone()),
                Write::PutEnvelope(envelope),
            ],
            audit: Some(audit.clone()),
        };
        match self.store.commit(tx).await {
            Ok(_) => Ok(Changed {
                // A new secret (a new id, even for a name used before): not used yet.
                secret: Described {
                    secret: record,
                    usage: Some(Default::default()),
                },
                warnings,
            }),
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
    ) -> Result<Described, VaultError> {
        operation!(self, caller, Action::Describe, |audit| {
            let (_, tenant, name) =
                authorize_secret(caller, &mut audit, Operation::Describe, tenant, name)?;
            let record = self.secret_named(&tenant, &name).await?;
            audit.secret(&record);
            let mut described = self.described(vec![record]).await?;
            self.record(audit.settle()).await?;
            described.pop().ok_or(VaultError::SecretNotFound)
        })
    }

    /// A page of a tenant's secrets, and the token of the next page.
    pub async fn list(
        &self,
        caller: &Caller,
        input: ListInput,
    ) -> Result<(Vec<Described>, Option<String>), VaultError> {
        operation!(self, caller, Action::List, |audit| {
            let tenant = TenantId::from_request(input.tenant.as_str());
            let tenant = noted(caller, "tenant", tenant, &mut audit.tenant);
            let principal = caller.authorize(Operation::List)?;
            let tenant = tenant?;
            principal.require_tenant(&tenant)?;
            let size = page_size_or(input.page_size, DEFAULT_LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE)?;
            let mut after = match input.page_token.as_str() {
                "" => None,
                token => Some(decode_list_token(token)?),
            };
            let filter = ListFilter::parse(&input)?;
            // Up to a page and one more that match, reading at most MAX_LIST_SCAN records:
            // a page cut short by the bound still has a next page.
            let mut page = Vec::new();
            let mut scanned = 0;
            let more = loop {
                let read = self
                    .store
                    .list_secrets(&tenant, after.as_ref(), size + 1)
                    .await?;
                let full = read.len() == size + 1;
                for secret in read {
                    scanned += 1;
                    after = Some(secret.name.clone());
                    if filter.matches(&secret) {
                        page.push(secret);
                        if page.len() > size {
                            break;
                        }
                    }
                }
                if page.len() > size {
                    page.truncate(size);
                    after = page.last().map(|s| s.name.clone());
                    break true;
                }
                if !full {
                    break false;
                }
                if scanned >= MAX_LIST_SCAN {
                    break true;
                }
            };
            let next = after
                .filter(|_| more)
                .map(|name| URL_SAFE_NO_PAD.encode(name.as_str()));
            let page = self.described(page).await?;
            self.record(audit.settle()).await?;
            Ok((page, next))
        })
    }

    /// Replaces a secret's value with a new version and destroys the previous one.
    pub async fn rotate(&self, caller: &Caller, input: RotateInput) -> Result<Changed, VaultError> {
        operation!(self, caller, Action::Rotate, |audit| {
            self.try_rotate(caller, input, &mut audit).await
        })
    }

    pub(super) async fn try_rotate(
        &self,
        caller: &Caller,
        input: RotateInput,
        audit: &mut AuditDraft,
    ) -> Result<Changed, VaultError> {
        let RotateInput {
            tenant,
            name,
            value,
            strict_format,
            previous_grace,
        } = input;
        let (_, tenant, name) = authorize_secret(caller, audit, Operation::Rotate, tenant, name)?;
        check_value_len("value", value.len())?;
        let grace = window_field("previous_grace", previous_grace, MAX_GRACE, "15 minutes")?;
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let current = self.active_secret(&tenant, &name).await?;
            let warnings = shape_warnings(&current.provider, &value, strict_format)?;
            let mut next = current.clone();
            next.version = current
                .version
                .checked_add(1)
                .ok_or_else(|| ValidationError::new("name", "secret has no versions left"))?;
            let now = Time::now();
            next.updated_at = now;
            // A new version: its own rotation reminder, and an expiry that has passed is over
            // (a Rotate makes an expired secret active again).
            next.life.version_created_at = Some(now);
            next.life.rotation_due_noted = None;
            if current.phase(now) == Phase::Expired {
                next.life.expires_at = None;
                next.life.expiry_noted = None;
            }
            next.hint = value_hint(value.expose_secret());
            // With a grace, the previous version is kept for its leases (and a version kept
            // by an earlier grace is destroyed); without, it is destroyed now.
            next.life.grace = grace.map(|g| Grace {
                version: current.version,
                until: now.plus(g),
            });
            let keep = grace.map(|_| current.version);
            let envelope = self.seal(&next, &value).await?;
            audit.secret(&next);
            // What this Rotate destroys: every version but the one a grace keeps.
            let held = held(&*self.store, &current).await?;
            let destroyed = match keep {
                Some(_) => held.previous.unwrap_or(0),
                None => held.total(),
            };
            let charge = self.quotas.charge(
                &tenant,
                Delta {
                    value_bytes: envelope.ciphertext.len() as i64 - destroyed,
                    ..Delta::default()
                },
            )?;
            let tx = Transaction {
                charges: vec![charge],
                guards: vec![Guard::secret(&tenant, &name, Some(&current))],
                writes: vec![
                    Write::PutSecret(next.clone()),
                    Write::DestroyEnvelopes {
                        secret_id: next.id,
                        keep,
                    },
                    Write::PutEnvelope(envelope),
                ],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self.commit_or_retry(tx, next).await? {
                // Destroyed data keys may not be served from memory (a kept one is unwrapped
                // again when a lease needs it).
                self.cache.evict_secret(done.id);
                return Ok(Changed {
                    secret: self.after_change(done).await,
                    warnings,
                });
            }
        }
    }

    /// Revokes a secret (destroying every version, at once or after `recovery_window`) or one
    /// lease. Revoking twice succeeds.
    pub async fn revoke(
        &self,
        caller: &Caller,
        target: RevokeTarget,
        reason: String,
        recovery_window: Option<(i64, i32)>,
    ) -> Result<Revoked, VaultError> {
        let mut revoked = operation!(self, caller, Action::Revoke, |audit| {
            match target {
                RevokeTarget::Missing => caller.authorize(Operation::RevokeLease).and_then(|_| {
                    Err(ValidationError::new("target", "set secret or lease_id").into())
                }),
                RevokeTarget::Secret { tenant, name } => {
                    let target = (tenant, name, recovery_window);
                    self.revoke_secret(caller, target, reason, &mut audit).await
                }
                RevokeTarget::Lease(id) => {
                    let window = recovery_window.filter(|&(s, n)| (s, n) != (0, 0));
                    self.revoke_lease(caller, &id, reason, window, &mut audit)
                        .await
                }
            }
        })?;
        if let Some(secret) = &revoked.secret {
            revoked.usage = self.usage_after(secret.id).await;
        }
        Ok(revoked)
    }

    /// The secret `tenant`/`name`: `SecretNotFound` if there is none.
    pub(super) async fn secret_named(
        &self,
        tenant: &TenantId,
        name: &SecretName,
    ) -> Result<SecretRecord, VaultError> {
        self.store
            .secret(tenant, name)
            .await?
            .ok_or(VaultError::SecretNotFound)
    }

    /// The secret `tenant`/`name`, if it exists and is active.
    pub(super) async fn active_secret(
        &self,
        tenant: &TenantId,
        name: &SecretName,
    ) -> Result<SecretRecord, VaultError> {
        let secret = self.secret_named(tenant, name).await?;
        if secret.state == SecretState::Revoked {
            return Err(VaultError::SecretRevoked);
        }
        Ok(secret)
    }
}

/// The warnings about a value stored for `provider` (see [`keyshape`]); with `strict`, a
/// value not shaped like the provider's keys is refused instead.
fn shape_warnings(
    provider: &Provider,
    value: &Plaintext,
    strict: bool,
) -> Result<Vec<String>, VaultError> {
    match keyshape::value_warning(provider.as_str(), value.expose_secret()) {
        None => Ok(Vec::new()),
        Some(problem) if strict => Err(ValidationError::new("value", problem).into()),
        Some(problem) => Ok(vec![format!("value {problem}; stored as given")]),
    }
}

/// Longest rotation grace.
const MAX_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

pub(super) fn decode_list_token(token: &str) -> Result<SecretName, ValidationError> {
    let invalid = || ValidationError::new("page_token", "not a token returned by List");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let name = String::from_utf8(bytes).map_err(|_| invalid())?;
    SecretName::parse(name).map_err(|_| invalid())
}
