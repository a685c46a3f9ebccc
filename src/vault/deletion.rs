//! A secret's end: Revoke (at once, or after a recovery window), Restore within the window,
//! Purge, and the bytes a secret's data keys hold (what a destruction gives back to the
//! tenant's quota).

use std::time::Duration;

use crate::auth::Operation;
use crate::model::{Action, Phase, Reason, SecretRecord, SecretState, TenantId, Time};
use crate::pending::Pending;
use crate::quota::{Delta, Quotas};
use crate::store::{Charge, Guard, Store, StoreError, Transaction, Write};

use super::life::window_field;
use super::{Attempts, Caller, Described, Purged, Revoked, Vault, VaultError, authorize_secret};

/// Longest recovery window.
const MAX_RECOVERY_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// What Revoke does to a secret, decided from what it read.
enum Revocation {
    /// Already revoked (or already pending deletion, asked for a window again): nothing.
    Nothing,
    /// Every version destroyed now.
    DestroyNow,
    /// Kept, restorable, until the window ends.
    Window(Duration),
}

/// What destroying data keys gives back to `tenant`'s usage: `secrets` (0 or -1) and the
/// `freed` bytes of sealed values.
pub fn given_back(tenant: &TenantId, secrets: i64, freed: i64) -> Charge {
    Quotas::give_back(
        tenant,
        Delta {
            secrets,
            value_bytes: -freed,
            leases: 0,
        },
    )
}

impl Vault {
    /// Revokes the secret `target` names (tenant, name, recovery window).
    pub(super) async fn revoke_secret(
        &self,
        caller: &Caller,
        target: (String, String, Option<(i64, i32)>),
        reason: String,
        audit: &mut Pending,
    ) -> Result<Revoked, VaultError> {
        let (tenant, name, window) = target;
        let (_, tenant, name) =
            authorize_secret(caller, audit, Operation::RevokeSecret, tenant, name)?;
        audit.reason = Reason::parse(reason)?.as_str().to_string();
        let window = window_field("recovery_window", window, MAX_RECOVERY_WINDOW, "30 days")?;
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let current = self.secret_named(&tenant, &name).await?;
            audit.secret(&current);
            let now = Time::now();
            let phase = current.phase(now);
            let revocation = match (phase, window) {
                (Phase::Revoked, _) | (Phase::PendingDeletion, Some(_)) => Revocation::Nothing,
                (_, None) => Revocation::DestroyNow,
                (_, Some(w)) => Revocation::Window(w),
            };
            let mut tombstone = current.clone();
            tombstone.state = SecretState::Revoked;
            tombstone.updated_at = now;
            if phase != Phase::PendingDeletion {
                tombstone.revoked_at = Some(now);
            }
            // A revocation ends a rotation grace at once.
            tombstone.life.grace = None;
            let (keep, freed) = match revocation {
                Revocation::Nothing => {
                    self.record(audit.settle()).await?;
                    return Ok(Revoked {
                        already_revoked: true,
                        secret: Some(current),
                        usage: None,
                    });
                }
                Revocation::DestroyNow => {
                    tombstone.life.destroy_at = None;
                    (None, held(&*self.store, &current).await?.total())
                }
                Revocation::Window(w) => {
                    tombstone.life.destroy_at = Some(now.plus(w));
                    let previous = held(&*self.store, &current).await?.previous;
                    (Some(current.version), previous.unwrap_or(0))
                }
            };
            // The usage counts what the data keys hold: a secret pending deletion still
            // holds its current version.
            let secrets = if matches!(revocation, Revocation::DestroyNow) {
                -1
            } else {
                0
            };
            let tx = Transaction {
                charges: vec![given_back(&tenant, secrets, freed)],
                guards: vec![Guard::secret(&tenant, &name, Some(&current))],
                writes: vec![
                    Write::PutSecret(tombstone.clone()),
                    Write::DestroyEnvelopes {
                        secret_id: current.id,
                        keep,
                    },
                ],
                audit: Some(audit.clone()),
            };
            let revoked = Revoked {
                already_revoked: phase == Phase::PendingDeletion,
                secret: Some(tombstone),
                usage: None,
            };
            if let Some(done) = self.commit_or_retry(tx, revoked).await? {
                // Destroyed data keys may not be served from memory; nor, while the secret
                // is revoked, any other.
                self.cache.evict_secret(current.id);
                return Ok(done);
            }
        }
    }

    /// Makes a secret pending deletion active again (its leases stay ended).
    pub async fn restore(
        &self,
        caller: &Caller,
        tenant: String,
        name: String,
    ) -> Result<Described, VaultError> {
        let restored = operation!(self, caller, Action::Restore, |audit| {
            let (_, tenant, name) =
                authorize_secret(caller, &mut audit, Operation::Restore, tenant, name)?;
            let mut attempts = Attempts::default();
            loop {
                attempts.next()?;
                let current = self.secret_named(&tenant, &name).await?;
                audit.secret(&current);
                let now = Time::now();
                let within = current.life.destroy_at.is_some_and(|t| now < t);
                if current.phase(now) != Phase::PendingDeletion || !within {
                    return Err(VaultError::NotPendingDeletion);
                }
                let mut restored = current.clone();
                restored.state = SecretState::Active;
                restored.revoked_at = None;
                restored.updated_at = now;
                restored.life.destroy_at = None;
                restored.life.leases_after = Some(now);
                let tx = Transaction {
                    charges: Vec::new(),
                    guards: vec![Guard::secret(&tenant, &name, Some(&current))],
                    writes: vec![Write::PutSecret(restored.clone())],
                    audit: Some(audit.clone()),
                };
                if let Some(done) = self.commit_or_retry(tx, restored).await? {
                    return Ok(done);
                }
            }
        })?;
        Ok(self.after_change(restored).await)
    }

    /// Destroys every version of a secret now and deletes its record (its name is free).
    pub async fn purge(
        &self,
        caller: &Caller,
        tenant: String,
        name: String,
        reason: String,
    ) -> Result<Purged, VaultError> {
        operation!(self, caller, Action::Purge, |audit| {
            let (_, tenant, name) =
                authorize_secret(caller, &mut audit, Operation::Purge, tenant, name)?;
            audit.reason = Reason::parse(reason)?.as_str().to_string();
            let mut attempts = Attempts::default();
            loop {
                attempts.next()?;
                let current = self.secret_named(&tenant, &name).await?;
                audit.secret(&current);
                let holds = current.phase(Time::now()) != Phase::Revoked;
                let (secrets, freed, versions) = match holds {
                    true => (
                        -1,
                        held(&*self.store, &current).await?.total(),
                        1 + u32::from(current.life.grace.is_some()),
                    ),
                    false => (0, 0, 0),
                };
                let tx = Transaction {
                    charges: vec![given_back(&tenant, secrets, freed)],
                    guards: vec![Guard::secret(&tenant, &name, Some(&current))],
                    writes: vec![
                        Write::DestroyEnvelopes {
                            secret_id: current.id,
                            keep: None,
                        },
                        Write::DeleteSecret {
                            tenant: tenant.clone(),
                            name: name.clone(),
                        },
                    ],
                    audit: Some(audit.clone()),
                };
                let purged = Purged {
                    secret_id: current.id,
                    versions_destroyed: versions,
                };
                if let Some(done) = self.commit_or_retry(tx, purged).await? {
                    self.cache.evict_secret(current.id);
                    return Ok(done);
                }
            }
        })
    }
}

/// The bytes of the sealed values a secret's data keys hold (what its quota counts): its
/// current version's and, during a rotation grace, the previous one's; `None` for a version
/// whose envelope is not stored.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// The current version's.
    pub current: Option<i64>,
    /// The previous version's, kept by a rotation grace.
    pub previous: Option<i64>,
}

impl Held {
    /// Both together.
    pub fn total(self) -> i64 {
        self.current.unwrap_or(0) + self.previous.unwrap_or(0)
    }

    /// Whether the secret holds any data key.
    pub fn any(self) -> bool {
        self.current.is_some() || self.previous.is_some()
    }
}

/// What `secret`'s data keys hold in `store` (one read per version kept).
pub async fn held(store: &dyn Store, secret: &SecretRecord) -> Result<Held, StoreError> {
    let bytes = |version| async move {
        store
            .envelope(secret.id, version)
            .await
            .map(|e| e.map(|e| e.ciphertext.len() as i64))
    };
    let previous = match secret.life.grace {
        Some(grace) => bytes(grace.version).await?,
        None => None,
    };
    Ok(Held {
        current: bytes(secret.version).await?,
        previous,
    })
}
