//! The background sweep of secrets' lifecycles: every `gc_interval`, each process counts the
//! secrets by state for the gauges, and the one holding the background turn records what fell
//! due since the last sweep (a secret past its `expires_at`: `Expire`; a rotation due:
//! `RotationDue`, once per version). A secret's record notes what the trail has recorded, in
//! the same commit, so a sweep after a crash or on another replica records nothing twice and
//! misses nothing.

use std::time::Duration;

use crate::metrics::SecretStateLabels;
use crate::model::{Action, AuditDraft, Phase, SecretName, SecretRecord, TenantId, Time};
use crate::store::{Guard, StoreError, Transaction, Write};

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

/// What has fallen due for `s` at `now` and is not recorded yet: the entry to record and the
/// record noting it.
fn due(s: &SecretRecord, now: Time) -> Option<(Action, SecretRecord)> {
    let mut next = s.clone();
    if s.phase(now) == Phase::Expired && s.life.expiry_noted != s.life.expires_at {
        next.life.expiry_noted = s.life.expires_at;
        return Some((Action::Expire, next));
    }
    if s.rotation_due(now) && s.life.rotation_due_noted != Some(s.version) {
        next.life.rotation_due_noted = Some(s.version);
        return Some((Action::RotationDue, next));
    }
    None
}

impl Vault {
    /// Sweeps every secret once: counts them for the gauges and, with `fence` (this process
    /// holds the background turn, see `runner`), records what fell due.
    pub async fn sweep_secrets(&self, fence: Option<Guard>) -> Result<LifeCounts, VaultError> {
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
                if let Some(fence) = &fence {
                    counts.recorded += self.record_due(secret.clone(), now, fence).await?;
                }
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
        while let Some((action, next)) = due(&secret, now) {
            let mut audit = AuditDraft::new(action, None, None);
            audit.secret(&secret);
            let tx = Transaction {
                charges: Vec::new(),
                guards: vec![
                    Guard::secret(&secret.tenant, &secret.name, Some(&secret)),
                    fence.clone(),
                ],
                writes: vec![Write::PutSecret(next)],
                audit: Some(audit),
            };
            match self.store.commit(tx).await {
                Ok(_) => recorded += 1,
                Err(StoreError::Conflict) => return Ok(recorded),
                Err(e) => return Err(e.into()),
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
        let (action, next) = due(&s, now).unwrap();
        assert_eq!(action, Action::Expire);
        let (action, next) = due(&next, now).unwrap();
        assert_eq!(action, Action::RotationDue);
        assert!(due(&next, now).is_none());
        // A new expiry, and a new version, are due again.
        let mut later = next.clone();
        later.life.expires_at = Some(Time::from_micros(60_000_000));
        assert_eq!(due(&later, now).unwrap().0, Action::Expire);
        let mut rotated = next;
        rotated.version += 1;
        assert_eq!(due(&rotated, now).unwrap().0, Action::RotationDue);
    }
}
