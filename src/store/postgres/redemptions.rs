//! The redemptions a replica knows, so that a `Get` of a lease it has seen costs no read.
//!
//! Every `Get` reads its lease, the lease's secret and that secret's current envelope, and
//! commits the lease's new use under guards on the lease's and the secret's revisions. On
//! PostgreSQL that read is a statement on a pooled connection, about as costly as the
//! request's share of its group's commit. This cache keeps the leases and secrets this
//! replica read or wrote, and answers a redemption from them when it can.
//!
//! Why a cached answer is safe, whatever other replicas did meanwhile:
//! - A `Get` releases a value only once its commit's guards held: the lease and the secret
//!   were, at the commit, at the revisions the cached copies carry. A stale copy fails its
//!   guards ([`StoreError::Conflict`]); the store then forgets the records the transaction
//!   guarded, and the retry reads them from the database.
//! - A refusal is never decided on a stale secret: a cached redemption is served only when
//!   its secret is active at the lease's version and nothing about the secret could refuse
//!   the lease (no allowed readers to hold the caller to, not expired, the lease not ended by
//!   a revocation that a Restore undid), the answer that lets the lease be redeemed; anything
//!   else is read (so a secret bound to its readers costs a read per `Get`). What a cached lease alone refuses (revoked, used up,
//!   expired, another audience) never becomes redeemable again.
//! - Copies only move forward: a record replaces a cached one only with a larger revision
//!   (revisions grow in commit order across every replica), so a read that raced a commit of
//!   this replica cannot put back what the commit replaced. A deleted lease that such a read
//!   puts back fails its guard once, as above.
//!
//! [`StoreError::Conflict`]: crate::store::StoreError::Conflict

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::model::{
    AuditRecord, EnvelopeRecord, KeysChanged, LeaseRecord, Phase, SecretId, SecretName,
    SecretRecord, TenantId, Time, TokenHash,
};
use crate::store::commit::{Change, Group, RecordKey};
use crate::store::{Guard, Redemption};

/// Leases kept at most (one arbitrary lease is dropped for each one past it).
const MAX_LEASES: usize = 65_536;
/// Secrets, with their current envelope, kept at most.
const MAX_SECRETS: usize = 4_096;
/// Sealed values kept at most, in bytes (values are up to 64 KiB; API keys are far smaller).
const MAX_SEALED_BYTES: usize = 16 << 20;

/// The leases and secrets this replica read or committed last.
#[derive(Default)]
pub struct Redemptions {
    inner: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    leases: HashMap<TokenHash, LeaseRecord>,
    secrets: Secrets,
}

/// Secrets, each with the envelope of its current version (read together), and the bytes of
/// their sealed values.
#[derive(Default)]
struct Secrets {
    map: HashMap<(TenantId, SecretName), (SecretRecord, EnvelopeRecord)>,
    sealed_bytes: usize,
}

impl Secrets {
    fn get(&self, key: &(TenantId, SecretName)) -> Option<&(SecretRecord, EnvelopeRecord)> {
        self.map.get(key)
    }

    /// Keeps `secret` unless a later revision of it is kept, dropping arbitrary others while
    /// the bounds would be passed.
    fn put(&mut self, secret: &SecretRecord, envelope: &EnvelopeRecord) {
        let key = (secret.tenant.clone(), secret.name.clone());
        if self
            .map
            .get(&key)
            .is_some_and(|(held, _)| held.rev >= secret.rev)
        {
            return;
        }
        self.remove(&key);
        let size = envelope.ciphertext.len();
        while !self.map.is_empty()
            && (self.map.len() >= MAX_SECRETS || self.sealed_bytes + size > MAX_SEALED_BYTES)
        {
            let Some(any) = self.map.keys().next().cloned() else {
                break;
            };
            self.remove(&any);
        }
        if size <= MAX_SEALED_BYTES {
            self.sealed_bytes += size;
            self.map.insert(key, (secret.clone(), envelope.clone()));
        }
    }

    fn remove(&mut self, key: &(TenantId, SecretName)) {
        if let Some((_, envelope)) = self.map.remove(key) {
            self.sealed_bytes -= envelope.ciphertext.len();
        }
    }

    /// Forgets the secrets with these ids.
    fn forget_ids(&mut self, ids: &HashSet<SecretId>) {
        let mut freed = 0;
        self.map.retain(|_, (secret, envelope)| {
            let keep = !ids.contains(&secret.id);
            if !keep {
                freed += envelope.ciphertext.len();
            }
            keep
        });
        self.sealed_bytes -= freed;
    }
}

impl Redemptions {
    /// The lease `token_hash` names with its secret and envelope, if all are known, the
    /// secret is active at the lease's version and nothing about the secret could refuse it.
    pub fn get(&self, token_hash: &TokenHash) -> Option<Redemption> {
        let known = self.lock();
        let lease = known.leases.get(token_hash)?;
        let (secret, envelope) = known
            .secrets
            .get(&(lease.tenant.clone(), lease.name.clone()))?;
        let life = &secret.life;
        let redeemable = secret.id == lease.secret_id
            && secret.phase(Time::now()) == Phase::Active
            && secret.version == lease.version
            && envelope.version == secret.version
            && life.allowed_readers.is_empty()
            && life.leases_after.is_none_or(|t| lease.created_at >= t);
        redeemable.then(|| Redemption {
            lease: lease.clone(),
            secret: Some(secret.clone()),
            envelope: Some(envelope.clone()),
        })
    }

    /// Keeps what a read of the database found.
    pub fn read(&self, found: &Redemption) {
        let mut known = self.lock();
        known.put_lease(&found.lease);
        if let (Some(secret), Some(envelope)) = (&found.secret, &found.envelope)
            && envelope.secret_id == secret.id
            && envelope.version == secret.version
        {
            known.secrets.put(secret, envelope);
        }
    }

    /// Follows a group this replica committed: its leases as written, and its secrets and
    /// envelopes forgotten (read again at their next use).
    pub fn committed(&self, group: &Group) {
        let mut known = self.lock();
        let mut envelopes_of: HashSet<SecretId> = HashSet::new();
        for change in group.transactions.iter().flat_map(|t| &t.changes) {
            match change {
                Change::NewLease(lease) | Change::UpdateLease(lease) => known.put_lease(lease),
                Change::DeleteLease(lease) => {
                    known.leases.remove(&lease.token_hash);
                }
                Change::Secret(secret) => {
                    known
                        .secrets
                        .remove(&(secret.tenant.clone(), secret.name.clone()));
                }
                Change::DeleteSecret(tenant, name) => {
                    known.secrets.remove(&(tenant.clone(), name.clone()));
                }
                Change::Envelope(envelope) => {
                    envelopes_of.insert(envelope.secret_id);
                }
                Change::DeleteEnvelope(id, _) => {
                    envelopes_of.insert(*id);
                }
                Change::Meta(..) | Change::Anchor(_) => {}
            }
        }
        if !envelopes_of.is_empty() {
            known.secrets.forget_ids(&envelopes_of);
        }
    }

    /// Forgets the records `guards` name (a commit found one of them changed).
    pub fn forget(&self, guards: &[RecordKey]) {
        let mut known = self.lock();
        for key in guards {
            match key {
                RecordKey::Lease(hash) => {
                    known.leases.remove(hash);
                }
                RecordKey::Secret(tenant, name) => {
                    known.secrets.remove(&(tenant.clone(), name.clone()));
                }
                RecordKey::Envelope(id, _) => known.secrets.forget_ids(&HashSet::from([*id])),
                RecordKey::Meta(_) => {}
            }
        }
    }

    /// Follows every replica's audit entries as they commit (the store's feed): forgets the
    /// secret a Rotate or Revoke changed, so that no copy of a destroyed envelope stays in
    /// memory, and every secret when a master-key rotation rewraps envelopes (a copy wrapped
    /// by a version about to be retired would not open) or when entries were missed. Runs
    /// until the feed closes.
    pub async fn follow(self: Arc<Self>, mut feed: broadcast::Receiver<Arc<AuditRecord>>) {
        loop {
            match feed.recv().await {
                Ok(record) => match record.entry.keys_changed() {
                    KeysChanged::Secret(id) => {
                        self.lock().secrets.forget_ids(&HashSet::from([id]));
                    }
                    KeysChanged::MasterKey => self.lock().secrets = Secrets::default(),
                    KeysChanged::None => {}
                },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.lock().secrets = Secrets::default();
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// The records a transaction's guards name.
    pub fn guarded(guards: &[Guard]) -> Vec<RecordKey> {
        guards
            .iter()
            .map(|g| g.key.clone())
            .filter(|k| !matches!(k, RecordKey::Meta(_)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        // The maps stay consistent whatever panicked while holding them.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Known {
    fn put_lease(&mut self, lease: &LeaseRecord) {
        let newer = self
            .leases
            .get(&lease.token_hash)
            .is_none_or(|held| held.rev < lease.rev);
        if newer {
            bounded_insert(
                &mut self.leases,
                lease.token_hash,
                lease.clone(),
                MAX_LEASES,
            );
        }
    }
}

/// Inserts, first dropping an arbitrary entry if the map is full.
fn bounded_insert<K: std::hash::Hash + Eq + Clone, V>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
    max: usize,
) {
    if map.len() >= max
        && !map.contains_key(&key)
        && let Some(any) = map.keys().next().cloned()
    {
        map.remove(&any);
    }
    map.insert(key, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SecretState;
    use crate::model::{Action, Outcome, Revision};
    use crate::store::commit::Resolved;
    use crate::store::tests as suite;

    /// `base` at `version`, revision `rev`, in `state`.
    fn secret(base: &SecretRecord, version: u32, rev: u64, state: SecretState) -> SecretRecord {
        let mut s = base.clone();
        s.version = version;
        s.rev = Revision(rev);
        s.state = state;
        s
    }

    fn lease(secret: &SecretRecord, hash: u8, rev: u64) -> LeaseRecord {
        let mut l = suite::lease(secret, hash, i64::MAX);
        l.max_uses = 10;
        l.rev = Revision(rev);
        l
    }

    fn read(lease: &LeaseRecord, secret: &SecretRecord) -> Redemption {
        let mut envelope = suite::envelope(secret.id, secret.version);
        envelope.rev = secret.rev;
        Redemption {
            lease: lease.clone(),
            secret: Some(secret.clone()),
            envelope: Some(envelope),
        }
    }

    fn group(changes: Vec<Change>) -> Group {
        Group {
            transactions: vec![Resolved {
                changes,
                audit: None,
            }],
            last_revision: Revision(0),
            usage: Vec::new(),
            activity: Default::default(),
        }
    }

    #[test]
    fn serves_what_was_read_and_follows_own_commits() {
        let cache = Redemptions::default();
        let s = secret(&suite::secret("t", "s"), 1, 1, SecretState::Active);
        let l = lease(&s, 1, 2);
        assert!(cache.get(&l.token_hash).is_none());
        cache.read(&read(&l, &s));
        assert_eq!(cache.get(&l.token_hash).map(|r| r.lease), Some(l.clone()));
        // A use this replica committed: the next Get guards the new revision.
        let mut used = l.clone();
        used.uses = 1;
        used.rev = Revision(5);
        cache.committed(&group(vec![Change::UpdateLease(used.clone())]));
        assert_eq!(
            cache.get(&l.token_hash).map(|r| r.lease),
            Some(used.clone())
        );
        // A read that started before that commit does not put the older copy back.
        cache.read(&read(&l, &s));
        assert_eq!(
            cache.get(&l.token_hash).map(|r| r.lease.rev),
            Some(Revision(5))
        );
        // The last use deletes the lease.
        cache.committed(&group(vec![Change::DeleteLease(used)]));
        assert!(cache.get(&l.token_hash).is_none());
    }

    #[test]
    fn a_changed_secret_is_read_again() {
        let cache = Redemptions::default();
        let base = suite::secret("t", "s");
        let s = secret(&base, 1, 1, SecretState::Active);
        let l = lease(&s, 1, 2);
        cache.read(&read(&l, &s));
        // A Rotate committed here.
        let rotated = secret(&base, 2, 7, SecretState::Active);
        cache.committed(&group(vec![Change::Secret(rotated.clone())]));
        assert!(cache.get(&l.token_hash).is_none());
        // A lease of the new version, read with the new secret. The old lease read with its
        // old secret is not served (superseded: the database decides), and the older read
        // does not replace the newer secret.
        let l2 = lease(&rotated, 2, 8);
        cache.read(&read(&l2, &rotated));
        assert!(cache.get(&l2.token_hash).is_some());
        cache.read(&read(&l, &s));
        assert!(cache.get(&l.token_hash).is_none());
        assert!(cache.get(&l2.token_hash).is_some());
        // An envelope change (a rewrap) forgets the secret.
        let mut rewrapped = suite::envelope(rotated.id, 2);
        rewrapped.rev = Revision(9);
        cache.committed(&group(vec![Change::Envelope(rewrapped)]));
        assert!(cache.get(&l2.token_hash).is_none());
    }

    #[test]
    fn only_a_redeemable_answer_is_served() {
        let base = suite::secret("t", "s");
        let cache = Redemptions::default();
        let l = lease(&secret(&base, 1, 1, SecretState::Active), 1, 2);
        cache.read(&read(&l, &secret(&base, 1, 3, SecretState::Revoked)));
        assert!(cache.get(&l.token_hash).is_none());
        // A lease committed here for a version the cached secret has not reached.
        let cache = Redemptions::default();
        let old = secret(&base, 1, 1, SecretState::Active);
        cache.read(&read(&lease(&old, 9, 2), &old));
        let newer = lease(&secret(&base, 2, 5, SecretState::Active), 1, 6);
        cache.committed(&group(vec![Change::NewLease(newer.clone())]));
        assert!(cache.get(&newer.token_hash).is_none());
    }

    #[test]
    fn forgets_what_a_failed_guard_names_and_stays_bounded() {
        let cache = Redemptions::default();
        let s = secret(&suite::secret("t", "s"), 1, 1, SecretState::Active);
        let l = lease(&s, 1, 2);
        cache.read(&read(&l, &s));
        cache.forget(&[RecordKey::Secret(s.tenant.clone(), s.name.clone())]);
        assert!(cache.get(&l.token_hash).is_none());
        cache.read(&read(&l, &s));
        cache.forget(&[RecordKey::Lease(l.token_hash)]);
        assert!(cache.get(&l.token_hash).is_none());
        let mut map = HashMap::new();
        for i in 0..10 {
            bounded_insert(&mut map, i, i, 4);
        }
        assert_eq!(map.len(), 4);
        assert_eq!(map.get(&9), Some(&9));
    }

    /// Another replica's Rotate or Revoke (as the feed brings it) drops the secret it
    /// names; a master-key rewrap or a lagging feed drops every secret.
    #[tokio::test]
    async fn what_other_replicas_change_is_forgotten_as_the_feed_brings_it() {
        let cache = Arc::new(Redemptions::default());
        let (sender, feed) = broadcast::channel(4);
        let following = tokio::spawn(cache.clone().follow(feed));
        let base = [suite::secret("t", "a"), suite::secret("t", "b")];
        let leases: Vec<LeaseRecord> = base
            .iter()
            .enumerate()
            .map(|(i, b)| lease(&secret(b, 1, 1, SecretState::Active), i as u8, 2))
            .collect();
        let learn = |i: usize| {
            let s = secret(&base[i], 1, 1, SecretState::Active);
            cache.read(&read(&leases[i], &s));
        };
        let known = |i: usize| cache.get(&leases[i].token_hash).is_some();
        let forgotten = |i: usize| {
            tokio::time::timeout(std::time::Duration::from_secs(5), async move {
                while known(i) {
                    tokio::task::yield_now().await;
                }
            })
        };
        let entry = |action: Action, i: Option<usize>| {
            let mut record = crate::store::tests::audit_record(action);
            record.entry.secret_id = i.map(|i| base[i].id);
            Arc::new(record)
        };
        learn(0);
        learn(1);
        // A failed Rotate of b and a Describe of b change nothing; the Revoke of a after them
        // drops a alone.
        let mut failed = (*entry(Action::Rotate, Some(1))).clone();
        failed.entry.outcome = Outcome::PermissionDenied;
        sender.send(Arc::new(failed)).unwrap();
        sender.send(entry(Action::Describe, Some(1))).unwrap();
        sender.send(entry(Action::Revoke, Some(0))).unwrap();
        forgotten(0).await.unwrap();
        assert!(known(1));
        sender.send(entry(Action::Rewrap, None)).unwrap();
        forgotten(1).await.unwrap();
        // More entries than the feed holds, before the follower reads any: it lagged.
        learn(1);
        for _ in 0..6 {
            sender.send(entry(Action::Describe, Some(0))).unwrap();
        }
        forgotten(1).await.unwrap();
        drop(sender);
        following.await.unwrap();
    }

    #[test]
    fn sealed_values_kept_stay_within_their_bytes() {
        let mut secrets = Secrets::default();
        let value = 60 << 10;
        for i in 0..(MAX_SEALED_BYTES / value + 50) {
            let s = secret(
                &suite::secret("t", &format!("s{i}")),
                1,
                1,
                SecretState::Active,
            );
            let mut e = suite::envelope(s.id, 1);
            e.ciphertext = vec![0; value];
            secrets.put(&s, &e);
            assert!(secrets.sealed_bytes <= MAX_SEALED_BYTES);
        }
        assert_eq!(secrets.map.len(), MAX_SEALED_BYTES / value);
        let held: usize = secrets.map.values().map(|(_, e)| e.ciphertext.len()).sum();
        assert_eq!(held, secrets.sealed_bytes);
        let ids: HashSet<SecretId> = secrets.map.values().map(|(s, _)| s.id).take(3).collect();
        secrets.forget_ids(&ids);
        let held: usize = secrets.map.values().map(|(_, e)| e.ciphertext.len()).sum();
        assert_eq!(held, secrets.sealed_bytes);
        assert_eq!(secrets.map.len(), MAX_SEALED_BYTES / value - 3);
    }
}
