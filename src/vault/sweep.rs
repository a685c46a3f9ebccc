//! The background sweep of secrets' lifecycles: every `gc_interval`, the process holding the
//! background turn counts the secrets by state for the gauges and does what fell due since
//! the last sweep: destroys the data keys of a secret whose recovery window ended,
//! and of a previous version whose rotation grace ended (`Destroy`), and records a secret
//! past its `expires_at` (`Expire`) and a rotation due (`RotationDue`, once per version). A
//! secret's record notes what was done, in the same commit, so a sweep after a crash (the
//! first one runs at start) or on another replica does nothing twice and misses nothing.

use std::time::Duration;

use crate::metrics::SecretStateLabels;
use crate::model::{Action, AuditDraft, Phase, SecretName, SecretRecord, TenantId, Time};
use crate::store::{Guard, StoreError, Transaction, Write};

use super::deletion::{given_back, held};
use super::{Vault, VaultError};

/// Secrets read per page of a sweep.
const SWEEP_PAGE: usize = 500;
/// "Expiring soon", for the gauge.
const SOON: Duration = Duration::from_secs(7 * 24 * 3600);

/// What one sweep counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LifeCounts {
    /// Active secrets.
    pub active: u64,
    /// Expired ones.
    pub expired: u64,
    /// Revoked within a recovery window.
    pub pending_deletion: u64,
    /// Revoked (destroyed).
    pub revoked: u64,
    /// Secrets whose rotation is due.
    pub rotation_due: u64,
    /// Active secrets expiring within 7 days.
    pub expiring_soon: u64,
    /// Audit entries this sweep recorded.
    pub recorded: u64,
}

impl LifeCounts {
    fn count(&mut self, s: &SecretRecord, now: Time) {
        match s.phase(now) {
            Phase::Active => self.active += 1,
            Phase::Expired => self.expired += 1,
            Phase::PendingDeletion => self.pending_deletion += 1,
            Phase::Revoked => self.revoked += 1,
        }
        self.rotation_due += u64::from(s.rotation_due(now));
        let soon = now.plus(SOON);
        self.expiring_soon += u64::from(
            s.phase(now) == Phase::Active && s.life.expires_at.is_some_and(|t| t <= soon),
        );
    }

    /// Stops reporting the gauges (another process sweeps).
    fn withdraw() {
        let m = crate::metrics::global();
        m.secrets.clear();
        m.secrets_rotation_due.set(0);
        m.secrets_expiring_soon.set(0);
    }

    fn publish(&self) {
        let m = crate::metrics::global();
        for (state, n) in [
            ("active", self.active),
            ("expired", self.expired),
            ("pending_deletion", self.pending_deletion),
            ("revoked", self.revoked),
        ] {
            m.secrets
                .get_or_create(&SecretStateLabels { state })
                .set(gauge(n));
        }
        m.secrets_rotation_due.set(gauge(self.rotation_due));
        m.secrets_expiring_soon.set(gauge(self.expiring_soon));
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Something fallen due for a secret: the entry to record, the record as it leaves it, and
/// the data keys it destroys.
#[derive(Debug)]
struct Due {
    action: Action,
    next: SecretRecord,
    /// The version the entry names.
    version: u32,
    /// Destroys every envelope but `Some(version)` (or all, `None`).
    destroy: Option<Option<u32>>,
    reason: &'static str,
}

/// What has fallen due for `s` at `now` and is not done yet, the destructions first.
fn due(s: &SecretRecord, now: Time) -> Option<Due> {
    let mut next = s.clone();
    let note = |action, next, reason| Due {
        action,
        next,
        version: s.version,
        destroy: None,
        reason,
    };
    if s.phase(now) == Phase::PendingDeletion && s.life.destroy_at.is_some_and(|t| t <= now) {
        next.life.destroy_at = None;
        next.life.grace = None;
        next.updated_at = now.max(s.updated_at);
        return Some(Due {
            destroy: Some(None),
            ..note(Action::Destroy, next, "recovery window ended")
        });
    }
    if let Some(grace) = s.life.grace.filter(|g| g.until <= now) {
        next.life.grace = None;
        return Some(Due {
            version: grace.version,
            destroy: Some(Some(s.version)),
            ..note(Action::Destroy, next, "rotation grace ended")
        });
    }
    if s.phase(now) == Phase::Expired && s.life.expiry_noted != s.life.expires_at {
        next.life.expiry_noted = s.life.expires_at;
        return Some(note(Action::Expire, next, ""));
    }
    if s.rotation_due(now) && s.life.rotation_due_noted != Some(s.version) {
        next.life.rotation_due_noted = Some(s.version);
        return Some(note(Action::RotationDue, next, ""));
    }
    None
}

impl Vault {
    /// Sweeps every secret once, with `fence` (this process holds the background turn, see
    /// `runner`): does what fell due and counts the secrets for the gauges. Without it, the
    /// process that holds the turn does both: this one reads nothing and stops reporting the
    /// gauges (so that every replica does not read every secret, and only one reports them).
    pub async fn sweep_secrets(&self, fence: Option<Guard>) -> Result<LifeCounts, VaultError> {
        let Some(fence) = fence else {
            LifeCounts::withdraw();
            return Ok(LifeCounts::default());
        };
        let now = Time::now();
        let mut counts = LifeCounts::default();
        let mut after: Option<(TenantId, SecretName)> = None;
        loop {
            let page = self
                .store
                .all_secrets(after.as_ref().map(|(t, n)| (t, n)), SWEEP_PAGE)
                .await?;
            for secret in &page {
                counts.count(secret, now);
                counts.recorded += self.record_due(secret.clone(), now, &fence).await?;
            }
            match page.last() {
                Some(last) if page.len() == SWEEP_PAGE => {
                    after = Some((last.tenant.clone(), last.name.clone()));
                }
                _ => break,
            }
        }
        counts.publish();
        Ok(counts)
    }

    /// Records what fell due for `secret`, one entry per commit, each guarded by the record
    /// it read and the background turn. A secret another writer changed meanwhile is left
    /// to the next sweep.
    async fn record_due(
        &self,
        mut secret: SecretRecord,
        now: Time,
        fence: &Guard,
    ) -> Result<u64, VaultError> {
        let mut recorded = 0;
        while let Some(due) = due(&secret, now) {
            let mut audit = AuditDraft::new(due.action, None, None);
            audit.secret(&secret);
            audit.version = Some(due.version);
            audit.reason = due.reason.to_string();
            let mut writes = vec![Write::PutSecret(due.next)];
            let mut charges = Vec::new();
            if let Some(keep) = due.destroy {
                writes.push(Write::DestroyEnvelopes {
                    secret_id: secret.id,
                    keep,
                });
                // What the destroyed data keys held goes back to the tenant's quota.
                let held = held(&*self.store, &secret).await?;
                let (secrets, freed) = match keep {
                    None => (-1, held.total()),
                    Some(_) => (0, held.previous.unwrap_or(0)),
                };
                charges.push(given_back(&secret.tenant, secrets, freed));
            }
            let tx = Transaction {
                charges,
                guards: vec![
                    Guard::secret(&secret.tenant, &secret.name, Some(&secret)),
                    fence.clone(),
                ],
                writes,
                audit: Some(audit),
            };
            match self.store.commit(tx).await {
                Ok(_) => recorded += 1,
                Err(StoreError::Conflict) => return Ok(recorded),
                Err(e) => return Err(e.into()),
            }
            if due.destroy.is_some() {
                self.cache.evict_secret(secret.id);
            }
            match self.store.secret(&secret.tenant, &secret.name).await? {
                Some(read) => secret = read,
                None => break,
            }
        }
        Ok(recorded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_due_once() {
        let mut s = crate::store::tests::secret("t", "n");
        let now = Time::from_micros(100_000_000);
        assert!(due(&s, now).is_none());
        s.life.expires_at = Some(Time::from_micros(50_000_000));
        s.life.rotate_after_us = Some(1_000_000);
        let first = due(&s, now).unwrap();
        assert_eq!(first.action, Action::Expire);
        let second = due(&first.next, now).unwrap();
        assert_eq!(second.action, Action::RotationDue);
        let next = second.next;
        assert!(due(&next, now).is_none());
        // A new expiry, and a new version, are due again.
        let mut later = next.clone();
        later.life.expires_at = Some(Time::from_micros(60_000_000));
        assert_eq!(due(&later, now).unwrap().action, Action::Expire);
        let mut rotated = next.clone();
        rotated.version += 1;
        assert_eq!(due(&rotated, now).unwrap().action, Action::RotationDue);
        // The end of a grace destroys the previous version, once.
        let mut graced = next.clone();
        graced.version = 3;
        graced.life.rotation_due_noted = Some(3);
        graced.life.grace = Some(crate::model::Grace {
            version: 2,
            until: Time::from_micros(90_000_000),
        });
        let end = due(&graced, now).unwrap();
        assert_eq!(
            (end.action, end.version, end.destroy),
            (Action::Destroy, 2, Some(Some(3)))
        );
        assert!(due(&end.next, now).is_none());
        // The end of a recovery window destroys them all, once; not before.
        let mut pending = next;
        pending.state = crate::model::SecretState::Revoked;
        pending.life.destroy_at = Some(Time::from_micros(100_000_001));
        assert!(due(&pending, now).is_none());
        pending.life.destroy_at = Some(now);
        let end = due(&pending, now).unwrap();
        assert_eq!((end.action, end.destroy), (Action::Destroy, Some(None)));
        assert!(due(&end.next, now).is_none());
    }
}
