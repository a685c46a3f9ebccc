//! The suite every storage engine must pass. [`suite`] runs every case through a
//! [`Subject`], which opens the engine's stores; each engine has one `#[test]` that calls it
//! (at the end of this file), so that the next engine is added by one line and its subject.

use std::sync::Arc;

use super::*;
use crate::chain::ChainKey;
use crate::model::{Action, Labels, Outcome, PrincipalId, Provider, SecretState, WrappedKey};

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn name(s: &str) -> SecretName {
    SecretName::parse(s).unwrap()
}

pub(crate) fn secret(t: &str, n: &str) -> SecretRecord {
    SecretRecord {
        id: SecretId::generate(),
        tenant: tenant(t),
        name: name(n),
        provider: Provider::parse("anthropic").unwrap(),
        labels: Labels::default(),
        version: 1,
        state: SecretState::Active,
        created_at: Time::from_micros(1),
        updated_at: Time::from_micros(1),
        hint: "…".into(),
        revoked_at: None,
        life: Default::default(),
        rev: Default::default(),
    }
}

/// `s` with every lifecycle field set, to see each one kept.
pub(crate) fn with_life(mut s: SecretRecord) -> SecretRecord {
    s.life = crate::model::Lifecycle {
        allowed_readers: vec![crate::model::PrincipalId::parse("agent").unwrap()],
        expires_at: Some(Time::from_micros(9_000_000)),
        rotate_after_us: Some(60_000_000),
        version_created_at: Some(Time::from_micros(2)),
        rotation_due_noted: Some(1),
        expiry_noted: Some(Time::from_micros(8_000_000)),
        destroy_at: Some(Time::from_micros(7_000_000)),
        grace: Some(crate::model::Grace {
            version: 1,
            until: Time::from_micros(6_000_000),
        }),
        leases_after: Some(Time::from_micros(5_000_000)),
    };
    s
}

pub(crate) fn envelope(id: SecretId, version: u32) -> EnvelopeRecord {
    EnvelopeRecord {
        secret_id: id,
        tenant: tenant("t"),
        version,
        wrapped_key: WrappedKey {
            key_id: "k".into(),
            key_version: 1,
            blob: vec![version as u8; 8],
        },
        nonce: [0; 12],
        ciphertext: vec![1, 2, 3],
        created_at: Time::from_micros(1),
        rev: Default::default(),
    }
}

pub(crate) fn lease(s: &SecretRecord, hash: u8, expires_at: i64) -> LeaseRecord {
    LeaseRecord {
        id: LeaseId::generate(),
        token_hash: TokenHash([hash; 32]),
        secret_id: s.id,
        tenant: s.tenant.clone(),
        name: s.name.clone(),
        version: s.version,
        issued_to: PrincipalId::parse("p").unwrap(),
        audience: None,
        created_at: Time::from_micros(0),
        expires_at: Time::from_micros(expires_at),
        max_uses: 1,
        uses: 0,
        revoked: false,
        rev: Default::default(),
    }
}

/// A record read back, without the revision the store gave it (to compare with what was
/// written).
fn plain<T: codec::Revisioned>(read: Option<T>) -> Option<T> {
    read.map(|mut r| {
        r.set_revision(Revision(0));
        r
    })
}

fn plain_all<T: codec::Revisioned>(read: Vec<T>) -> Vec<T> {
    read.into_iter().filter_map(|r| plain(Some(r))).collect()
}

fn draft(action: Action) -> AuditDraft {
    AuditDraft::new(action, None, Some("127.0.0.1:1".into()))
}

/// A committed entry of `action`, outside any chain (for what follows the feed).
pub(crate) fn audit_record(action: Action) -> AuditRecord {
    AuditRecord {
        seq: 1,
        time: Time::from_micros(1),
        entry: draft(action),
        prev_hash: [0; 32],
        hash: [0; 32],
    }
}

pub(crate) fn put(writes: Vec<Write>, action: Action) -> Transaction {
    Transaction {
        charges: Vec::new(),
        guards: Vec::new(),
        writes,
        audit: Some(draft(action)),
    }
}

pub(crate) fn chain_key() -> Arc<ChainKey> {
    Arc::new(ChainKey::derive(
        &crate::crypto::SymmetricKey::from_slice(&[3; 32]).unwrap(),
    ))
}

/// Runs the whole suite against `store`, which must be empty.
/// One engine under test.
#[async_trait::async_trait]
pub(crate) trait Subject: Sync {
    /// A new, empty store (its audit chain not started).
    async fn fresh(&self) -> Arc<dyn Store>;
    /// Another handle on the same store, as a second process would have: for an engine that
    /// one process owns (sled), the same handle again.
    async fn another_handle(&self, store: &Arc<dyn Store>) -> Arc<dyn Store>;
}

/// Every case, on stores of `subject`.
pub(crate) async fn suite(subject: &dyn Subject) {
    let store = subject.fresh().await;
    check_adapter(store.clone()).await;
    revisions_increase_and_guard_every_record(&*store).await;
    redemptions_read_lease_secret_and_current_envelope(&*store).await;
    audit_queries_match_a_filtered_scan(&*store).await;
    an_export_imports_into_an_empty_store(&*store, subject).await;
    close(&store).await;
    let first = subject.fresh().await;
    let second = subject.another_handle(&first).await;
    concurrent_first_starts_initialise_once([first.clone(), second.clone()]).await;
    close(&second).await;
    close(&first).await;
    let first = subject.fresh().await;
    let second = subject.another_handle(&first).await;
    charges_on_two_handles_stop_exactly_at_the_quota([first.clone(), second.clone()]).await;
    close(&second).await;
    close(&first).await;
    activity_counts_committed_leases_and_gets(subject).await;
}

async fn close(store: &Arc<dyn Store>) {
    store.close().await.unwrap();
    assert!(matches!(
        store.commit(Transaction::default()).await,
        Err(StoreError::Closed)
    ));
}

/// An audit-only transaction: `action` on `s` by `who`, ending with `outcome`.
pub(crate) fn use_of(s: &SecretRecord, action: Action, outcome: Outcome, who: &str) -> Transaction {
    let mut entry = AuditDraft::new(action, PrincipalId::parse(who).ok(), None);
    entry.tenant = Some(s.tenant.clone());
    entry.name = Some(s.name.clone());
    entry.secret_id = Some(s.id);
    entry.outcome = outcome;
    Transaction::audit_only(entry)
}

/// The secrets' use is counted from the entries each group commits (a Lease issued, a Get
/// that succeeded, a Get that failed; nothing else), per secret and per day bucket, the same
/// on every handle; an import counts it again from the entries it brings.
async fn activity_counts_committed_leases_and_gets(subject: &dyn Subject) {
    use crate::store::activity::{buckets, day_of};
    let store = subject.fresh().await;
    store.start_audit_chain(chain_key()).await.unwrap();
    let (k, other) = (secret("act", "k"), secret("act", "other"));
    let mut uses = Vec::new();
    for (n, action, outcome, who) in [
        (5, Action::Lease, Outcome::Ok, "app"),
        (4, Action::Get, Outcome::Ok, "agent"),
        (2, Action::Get, Outcome::Ok, "agent2"),
        (3, Action::Get, Outcome::NotFound, "stranger"),
        (2, Action::Lease, Outcome::FailedPrecondition, "app"),
        (2, Action::Describe, Outcome::Ok, "app"),
    ] {
        for _ in 0..n {
            uses.push(use_of(&k, action, outcome, who));
        }
    }
    uses.push(use_of(&other, Action::Lease, Outcome::Ok, "app"));
    let tasks: Vec<_> = uses
        .into_iter()
        .map(|tx| {
            let store = store.clone();
            tokio::spawn(async move { store.commit(tx).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let last = store
        .commit(use_of(&k, Action::Get, Outcome::Ok, "last"))
        .await
        .unwrap();
    let at = store
        .audit_entry(last.audit_seq.unwrap())
        .await
        .unwrap()
        .unwrap()
        .time;
    let never = secret("act", "never");
    let read = store.activity(&[k.id, never.id, other.id]).await.unwrap();
    assert_eq!(
        (
            read[0].leases_issued,
            read[0].redemptions,
            read[0].failed_redemptions
        ),
        (5, 7, 3)
    );
    assert_eq!(read[0].last_redeemed_at, Some(at));
    assert_eq!(
        read[0].last_redeemed_by.as_ref().map(|p| p.as_str()),
        Some("last")
    );
    assert!(read[0].last_leased_at.is_some_and(|t| t <= at));
    assert_eq!(read[1], SecretActivity::default());
    assert_eq!(read[2].leases_issued, 1);
    // The day buckets: one per day, secret and principal.
    let today = day_of(at);
    let query = |name: Option<&str>, limit| DayQuery {
        tenant: tenant("act"),
        name: name.map(super::tests::name),
        from: today - 2,
        to: today + 1,
        limit,
    };
    let rows = store.activity_days(&query(None, 100)).await.unwrap();
    let per_secret = buckets(rows.clone(), false);
    let total = |rows: &[DayRow], id| {
        rows.iter().filter(|r| r.key.secret_id == id).fold(
            crate::store::activity::Counts::default(),
            |mut sum, r| {
                sum.add(r.counts);
                sum
            },
        )
    };
    let counted = total(&per_secret, k.id);
    assert_eq!(
        (
            counted.leases,
            counted.redemptions,
            counted.failed_redemptions
        ),
        (5, 7, 3)
    );
    assert_eq!(total(&per_secret, other.id).leases, 1);
    let agents: std::collections::BTreeSet<_> = buckets(rows, true)
        .into_iter()
        .filter(|r| r.key.secret_id == k.id && r.counts.redemptions > 0)
        .map(|r| r.key.principal)
        .collect();
    assert_eq!(
        agents.into_iter().collect::<Vec<_>>(),
        ["agent", "agent2", "last"]
    );
    let named = store
        .activity_days(&query(Some("other"), 100))
        .await
        .unwrap();
    assert!(!named.is_empty() && named.iter().all(|r| r.key.secret_id == other.id));
    // One more row than the limit says there are more.
    assert_eq!(store.activity_days(&query(None, 1)).await.unwrap().len(), 2);
    let mut elsewhere = query(None, 100);
    elsewhere.tenant = tenant("else");
    assert!(store.activity_days(&elsewhere).await.unwrap().is_empty());
    let mut earlier = query(None, 100);
    (earlier.from, earlier.to) = (today - 30, today - 2);
    assert!(store.activity_days(&earlier).await.unwrap().is_empty());
    // Another handle reads the same.
    let second = subject.another_handle(&store).await;
    assert_eq!(second.activity(&[k.id]).await.unwrap()[0], read[0]);
    // An import counts the entries it brings.
    let exported = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = exported.clone();
    store
        .export(Box::new(move |record| {
            sink.lock().unwrap().push(record);
            Ok(())
        }))
        .await
        .unwrap();
    let mut records = std::mem::take(&mut *exported.lock().unwrap());
    records.reverse();
    let fresh = subject.fresh().await;
    fresh
        .import(Box::new(move || Ok(records.pop())))
        .await
        .unwrap();
    assert_eq!(
        fresh.activity(&[k.id, other.id]).await.unwrap(),
        vec![read[0].clone(), read[2].clone()]
    );
    let mut imported = fresh.activity_days(&query(None, 100)).await.unwrap();
    let mut original = store.activity_days(&query(None, 100)).await.unwrap();
    imported.sort_by(|a, b| a.key.cmp(&b.key));
    original.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(imported, original);
    close(&fresh).await;
    if !Arc::ptr_eq(&second, &store) {
        close(&second).await;
    }
    close(&store).await;
}

/// Sled stores in a temporary directory, with audit segments of a given size.
pub(crate) struct SledSubject {
    dir: tempfile::TempDir,
    segment_bytes: u64,
    opened: std::sync::atomic::AtomicU32,
}

impl SledSubject {
    pub(crate) fn new(segment_bytes: u64) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            segment_bytes,
            opened: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Subject for SledSubject {
    async fn fresh(&self) -> Arc<dyn Store> {
        let n = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.dir.path().join(n.to_string());
        Arc::new(
            SledStore::open_with(&dir, crate::store::DEFAULT_CACHE_BYTES, self.segment_bytes)
                .unwrap(),
        )
    }

    async fn another_handle(&self, store: &Arc<dyn Store>) -> Arc<dyn Store> {
        store.clone()
    }
}

pub(crate) async fn check_adapter(store: Arc<dyn Store>) {
    assert!(matches!(
        store
            .commit(Transaction::audit_only(draft(Action::List)))
            .await,
        Err(StoreError::ChainNotStarted)
    ));
    store.start_audit_chain(chain_key()).await.unwrap();
    records_round_trip(&*store).await;
    guards_reject_stale_reads(&*store).await;
    envelopes_are_destroyed(&*store).await;
    deleted_secrets_free_their_name(&*store).await;
    leases_are_indexed(&*store).await;
    audit_sequence_has_no_gaps(store.clone()).await;
    racing_creates_of_one_name_let_exactly_one_win(store.clone()).await;
    the_chain_holds_after_two_waves_of_64_concurrent_commits(store.clone()).await;
    audit_entries_are_chained_and_indexed(&*store).await;
    durable_entries_are_fed_to_subscribers(&*store).await;
    audit_indexes_span_blocks(&*store).await;
    pruning_moves_the_anchor(&*store).await;
    audit_indexes_span_blocks(&*store).await;
}

/// Whether `record` belongs in `index`, decided from its fields (not the store's keys).
fn in_index(index: &AuditIndex, record: &AuditRecord) -> bool {
    let e = &record.entry;
    match index {
        AuditIndex::Secret(t, n) => e.tenant.as_ref() == Some(t) && e.name.as_ref() == Some(n),
        AuditIndex::Tenant(t) => e.tenant.as_ref() == Some(t),
        AuditIndex::Principal(p) => e.principal.as_ref() == Some(p),
        AuditIndex::PeerHost(h) => {
            e.peer.as_deref().map(crate::model::peer_host).as_ref() == Some(h)
        }
    }
}

/// Entries that vary over a few tenants, secrets, principals and peers.
pub(crate) fn varied_draft(i: u64) -> AuditDraft {
    let mut d = draft(Action::Get);
    d.tenant = Some(tenant(&format!("blk{}", i % 3)));
    if !i.is_multiple_of(5) {
        d.name = Some(name(&format!("s{}", i % 7)));
    }
    if !i.is_multiple_of(4) {
        d.principal = Some(PrincipalId::parse(format!("p{}", i % 2)).unwrap());
    }
    d.peer = Some(format!("10.0.0.{}:{}", i % 2, 1000 + i));
    d
}

/// Checks every index a varied entry can be in against the entries themselves, from several
/// starting points and page sizes.
pub(crate) async fn check_indexes_against_entries(store: &dyn Store) {
    let all = store.audit_entries(0, usize::MAX).await.unwrap();
    let mut indexes = vec![AuditIndex::Tenant(tenant("nope"))];
    for e in all.iter().map(|r| &r.entry) {
        let mut of_entry = Vec::new();
        if let Some(t) = &e.tenant {
            if let Some(n) = &e.name {
                of_entry.push(AuditIndex::Secret(t.clone(), n.clone()));
            }
            of_entry.push(AuditIndex::Tenant(t.clone()));
        }
        if let Some(p) = &e.principal {
            of_entry.push(AuditIndex::Principal(p.clone()));
        }
        if let Some(peer) = &e.peer {
            of_entry.push(AuditIndex::PeerHost(crate::model::peer_host(peer)));
        }
        for index in of_entry {
            if !indexes.contains(&index) {
                indexes.push(index);
            }
        }
    }
    let first = all[0].seq;
    let last = all.last().unwrap().seq;
    for index in &indexes {
        let expected: Vec<u64> = all
            .iter()
            .filter(|r| in_index(index, r))
            .map(|r| r.seq)
            .collect();
        for from in [
            0,
            first,
            first + 255,
            256,
            511,
            512,
            last - 3,
            last,
            last + 1,
        ] {
            for limit in [1, 7, 300, usize::MAX] {
                let want: Vec<u64> = expected
                    .iter()
                    .copied()
                    .filter(|&s| s >= from)
                    .take(limit)
                    .collect();
                assert_eq!(
                    store.audit_index(index, from, limit).await.unwrap(),
                    want,
                    "{index:?} from {from} limit {limit}"
                );
            }
        }
    }
}

async fn audit_indexes_span_blocks(store: &dyn Store) {
    // Enough entries to complete at least two blocks and leave one open.
    for i in 0..600 {
        store
            .commit(Transaction::audit_only(varied_draft(i)))
            .await
            .unwrap();
    }
    check_indexes_against_entries(store).await;
}

async fn records_round_trip(store: &dyn Store) {
    let s = with_life(secret("t1", "a"));
    let c = store
        .commit(put(
            vec![
                Write::PutSecret(s.clone()),
                Write::PutEnvelope(envelope(s.id, 1)),
            ],
            Action::Store,
        ))
        .await
        .unwrap();
    assert!(c.audit_seq.is_some());
    assert_eq!(
        plain(store.secret(&s.tenant, &s.name).await.unwrap()),
        Some(s.clone())
    );
    assert_eq!(
        plain(store.envelope(s.id, 1).await.unwrap()),
        Some(envelope(s.id, 1))
    );
    assert_eq!(store.secret(&tenant("t1x"), &s.name).await.unwrap(), None);

    for n in ["b", "c", "d"] {
        store
            .commit(put(vec![Write::PutSecret(secret("t1", n))], Action::Store))
            .await
            .unwrap();
    }
    store
        .commit(put(
            vec![Write::PutSecret(secret("t1x", "a"))],
            Action::Store,
        ))
        .await
        .unwrap();
    let names = |v: Vec<SecretRecord>| {
        v.into_iter()
            .map(|s| s.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.list_secrets(&tenant("t1"), None, 10).await.unwrap()),
        ["a", "b", "c", "d"]
    );
    assert_eq!(
        names(store.list_secrets(&tenant("t1"), None, 2).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(
        names(
            store
                .list_secrets(&tenant("t1"), Some(&name("b")), 10)
                .await
                .unwrap()
        ),
        ["c", "d"]
    );
    assert!(
        store
            .list_secrets(&tenant("t"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Every tenant's, in tenant and name order, page after page.
    let all = |v: Vec<SecretRecord>| {
        v.into_iter()
            .filter(|s| s.tenant.as_str().starts_with("t1"))
            .map(|s| format!("{}/{}", s.tenant, s.name))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        all(store.all_secrets(None, 100).await.unwrap()),
        ["t1/a", "t1/b", "t1/c", "t1/d", "t1x/a"]
    );
    assert_eq!(
        all(store
            .all_secrets(Some((&tenant("t1"), &name("c"))), 2)
            .await
            .unwrap()),
        ["t1/d", "t1x/a"]
    );

    store
        .commit(Transaction {
            writes: vec![Write::PutMeta(MetaKey::Keyring, b"check".to_vec())],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .meta(MetaKey::Keyring)
            .await
            .unwrap()
            .map(|(_, v)| v)
            .as_deref(),
        Some(&b"check"[..])
    );
    assert_eq!(store.meta(MetaKey::BootstrapAdmin).await.unwrap(), None);
}

/// A purge deletes a secret's record: gone from reads and lists, its name free for a new
/// secret, and a guard on what was read before fails.
async fn deleted_secrets_free_their_name(store: &dyn Store) {
    let s = with_life(secret("purge", "a"));
    store
        .commit(put(
            vec![
                Write::PutSecret(s.clone()),
                Write::PutEnvelope(envelope(s.id, 1)),
            ],
            Action::Store,
        ))
        .await
        .unwrap();
    let read = store.secret(&s.tenant, &s.name).await.unwrap().unwrap();
    let purge = Transaction {
        guards: vec![Guard::secret(&s.tenant, &s.name, Some(&read))],
        writes: vec![
            Write::DestroyEnvelopes {
                secret_id: s.id,
                keep: None,
            },
            Write::DeleteSecret {
                tenant: s.tenant.clone(),
                name: s.name.clone(),
            },
        ],
        ..put(Vec::new(), Action::Purge)
    };
    store.commit(purge.clone()).await.unwrap();
    assert_eq!(store.secret(&s.tenant, &s.name).await.unwrap(), None);
    assert_eq!(store.envelope(s.id, 1).await.unwrap(), None);
    assert!(
        store
            .list_secrets(&s.tenant, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // What was read before the purge guards nothing any more.
    assert!(matches!(
        store.commit(purge).await,
        Err(StoreError::Conflict)
    ));
    // The name is free: a new secret takes it, guarded on its absence.
    let again = secret("purge", "a");
    let store_again = Transaction {
        guards: vec![Guard::secret(&s.tenant, &s.name, None)],
        writes: vec![Write::PutSecret(again.clone())],
        ..put(Vec::new(), Action::Store)
    };
    store.commit(store_again).await.unwrap();
    assert_eq!(
        plain(store.secret(&s.tenant, &s.name).await.unwrap()),
        Some(again)
    );
}

async fn guards_reject_stale_reads(store: &dyn Store) {
    let s = secret("t2", "a");
    let absent = Guard::secret(&s.tenant, &s.name, None);
    let create = Transaction {
        charges: Vec::new(),
        guards: vec![absent.clone()],
        writes: vec![Write::PutSecret(s.clone())],
        audit: Some(draft(Action::Store)),
    };
    store.commit(create.clone()).await.unwrap();
    let before = store.audit_entries(0, usize::MAX).await.unwrap().len();
    // The same create again: the name is now taken, so nothing is written, not even the audit.
    assert!(matches!(
        store.commit(create).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store.audit_entries(0, usize::MAX).await.unwrap().len(),
        before
    );

    let mut rotated = s.clone();
    rotated.version = 2;
    let rotate = |read: SecretRecord| Transaction {
        charges: Vec::new(),
        guards: vec![Guard::secret(&s.tenant, &s.name, Some(&read))],
        writes: vec![Write::PutSecret(rotated.clone())],
        audit: None,
    };
    let read = store.secret(&s.tenant, &s.name).await.unwrap().unwrap();
    store.commit(rotate(read.clone())).await.unwrap();
    // A second writer that read version 1 loses.
    assert!(matches!(
        store.commit(rotate(read)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store
            .secret(&s.tenant, &s.name)
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

async fn envelopes_are_destroyed(store: &dyn Store) {
    let s = secret("t3", "a");
    let other = secret("t3", "b");
    store
        .commit(put(
            vec![
                Write::PutEnvelope(envelope(s.id, 1)),
                Write::PutEnvelope(envelope(s.id, 2)),
                Write::PutEnvelope(envelope(other.id, 1)),
            ],
            Action::Store,
        ))
        .await
        .unwrap();
    store
        .commit(put(
            vec![
                Write::DestroyEnvelopes {
                    secret_id: s.id,
                    keep: Some(3),
                },
                Write::PutEnvelope(envelope(s.id, 3)),
            ],
            Action::Rotate,
        ))
        .await
        .unwrap();
    assert_eq!(store.envelope(s.id, 1).await.unwrap(), None);
    assert_eq!(store.envelope(s.id, 2).await.unwrap(), None);
    assert!(store.envelope(s.id, 3).await.unwrap().is_some());
    assert!(store.envelope(other.id, 1).await.unwrap().is_some());
    store
        .commit(put(
            vec![Write::DestroyEnvelopes {
                secret_id: s.id,
                keep: None,
            }],
            Action::Revoke,
        ))
        .await
        .unwrap();
    assert_eq!(store.envelope(s.id, 3).await.unwrap(), None);
    assert!(store.envelope(other.id, 1).await.unwrap().is_some());

    // Walking all envelopes in order, and guarding one.
    let all = store.envelopes_after(None, usize::MAX).await.unwrap();
    assert_eq!(all.len() as u64, store.envelope_count().await.unwrap());
    assert!(all.iter().any(|e| e.secret_id == other.id));
    let first = (all[0].secret_id, all[0].version);
    assert_eq!(
        store
            .envelopes_after(Some(first), usize::MAX)
            .await
            .unwrap(),
        all[1..]
    );
    assert_eq!(store.envelopes_after(None, 1).await.unwrap(), all[..1]);
    let current = store.envelope(other.id, 1).await.unwrap().unwrap();
    let mut rewrapped = current.clone();
    rewrapped.wrapped_key.key_version = 2;
    let guarded = |read: EnvelopeRecord| Transaction {
        charges: Vec::new(),
        guards: vec![Guard::envelope(other.id, 1, Some(&read))],
        writes: vec![Write::PutEnvelope(rewrapped.clone())],
        audit: None,
    };
    store.commit(guarded(current.clone())).await.unwrap();
    assert!(matches!(
        store.commit(guarded(current)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        plain(store.envelope(other.id, 1).await.unwrap()),
        plain(Some(rewrapped))
    );
}

async fn leases_are_indexed(store: &dyn Store) {
    let s = secret("t4", "a");
    let early = lease(&s, 1, 100);
    let late = lease(&s, 2, 300);
    store
        .commit(put(
            vec![
                Write::PutLease(late.clone()),
                Write::PutLease(early.clone()),
            ],
            Action::Lease,
        ))
        .await
        .unwrap();
    assert_eq!(
        plain(store.lease_by_token(&early.token_hash).await.unwrap()),
        Some(early.clone())
    );
    assert_eq!(
        plain(store.lease_by_id(late.id).await.unwrap()),
        Some(late.clone())
    );
    assert_eq!(store.lease_by_id(LeaseId::generate()).await.unwrap(), None);
    assert!(
        store
            .expired_leases(Time::from_micros(100), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        plain_all(
            store
                .expired_leases(Time::from_micros(101), 10)
                .await
                .unwrap()
        ),
        vec![early.clone()]
    );
    assert_eq!(
        plain_all(
            store
                .expired_leases(Time::from_micros(400), 1)
                .await
                .unwrap()
        ),
        vec![early.clone()]
    );
    assert_eq!(
        store
            .expired_leases(Time::from_micros(400), 10)
            .await
            .unwrap()
            .len(),
        2
    );

    let mut used = early.clone();
    used.uses = 1;
    let consume = |read: LeaseRecord| Transaction {
        charges: Vec::new(),
        guards: vec![Guard::lease(early.token_hash, Some(&read))],
        writes: vec![Write::PutLease(used.clone())],
        audit: Some(draft(Action::Get)),
    };
    let read = store
        .lease_by_token(&early.token_hash)
        .await
        .unwrap()
        .unwrap();
    store.commit(consume(read.clone())).await.unwrap();
    assert!(matches!(
        store.commit(consume(read)).await,
        Err(StoreError::Conflict)
    ));

    store
        .commit(Transaction {
            writes: vec![Write::DeleteLease(used.clone())],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(store.lease_by_token(&early.token_hash).await.unwrap(), None);
    assert_eq!(store.lease_by_id(early.id).await.unwrap(), None);
    assert_eq!(
        plain_all(
            store
                .expired_leases(Time::from_micros(400), 10)
                .await
                .unwrap()
        ),
        vec![late]
    );
}

async fn audit_sequence_has_no_gaps(store: Arc<dyn Store>) {
    let start = store.audit_entries(0, usize::MAX).await.unwrap();
    let first_new = start.last().map_or(1, |e| e.seq + 1);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut d = draft(Action::Describe);
                d.reason = format!("task {i}");
                d.outcome = Outcome::NotFound;
                store
                    .commit(Transaction::audit_only(d))
                    .await
                    .unwrap()
                    .audit_seq
                    .unwrap()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    let expected: Vec<u64> = (first_new..first_new + 64).collect();
    assert_eq!(seqs, expected);
    let all = store.audit_entries(0, usize::MAX).await.unwrap();
    assert!(
        all.windows(2)
            .all(|w| w[0].seq + 1 == w[1].seq && w[0].time <= w[1].time)
    );
    assert_eq!(all.first().unwrap().seq, 1);
    let page = store.audit_entries(first_new, 10).await.unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(page[0].seq, first_new);
    assert_eq!(page[0].entry.outcome, Outcome::NotFound);
}

/// Sixteen commits guarded on the same absent name, at once: exactly one creates it (with
/// its audit entry); every other one is a conflict that writes nothing, not even its entry.
async fn racing_creates_of_one_name_let_exactly_one_win(store: Arc<dyn Store>) {
    let before = store.audit_entries(0, usize::MAX).await.unwrap().len();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                let s = secret("race", "one-name");
                let tx = Transaction {
                    charges: Vec::new(),
                    guards: vec![Guard::secret(&s.tenant, &s.name, None)],
                    writes: vec![Write::PutSecret(s.clone())],
                    audit: Some(draft(Action::Store)),
                };
                barrier.wait().await;
                (s.id, store.commit(tx).await)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (id, Ok(committed)) => winners.push((id, committed.audit_seq)),
            (_, Err(StoreError::Conflict)) => {}
            (_, Err(e)) => panic!("{e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let stored = store
        .secret(&tenant("race"), &name("one-name"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.id, winners[0].0);
    let after = store.audit_entries(0, usize::MAX).await.unwrap();
    assert_eq!(after.len(), before + 1);
    assert_eq!(Some(after.last().unwrap().seq), winners[0].1);
}

/// Two waves of 64 concurrent commits each, records and audit-only entries mixed: the trail
/// stays one gap-free chain in commit order, with times that never go back.
async fn the_chain_holds_after_two_waves_of_64_concurrent_commits(store: Arc<dyn Store>) {
    let key = chain_key();
    let first_new = store.audit_head().await.unwrap().map_or(1, |h| h.seq + 1);
    for wave in 0..2 {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let tx = if i % 2 == 0 {
                        put(
                            vec![Write::PutSecret(secret("waves", &format!("w{wave}-{i}")))],
                            Action::Store,
                        )
                    } else {
                        Transaction::audit_only(draft(Action::Describe))
                    };
                    store.commit(tx).await.unwrap().audit_seq.unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let all = store.audit_entries(first_new, usize::MAX).await.unwrap();
    assert_eq!(all.len(), 128);
    assert_eq!(all[0].seq, first_new);
    let before = store.audit_entry(first_new - 1).await.unwrap().unwrap();
    assert_eq!(all[0].prev_hash, before.hash);
    for pair in all.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert_eq!(pair[1].prev_hash, pair[0].hash);
        assert!(pair[1].time >= pair[0].time);
    }
    assert!(all.iter().all(|r| key.is_intact(r)));
    assert_eq!(
        store
            .list_secrets(&tenant("waves"), None, 1000)
            .await
            .unwrap()
            .len(),
        64
    );
}

async fn audit_entries_are_chained_and_indexed(store: &dyn Store) {
    let key = chain_key();
    let all = store.audit_entries(0, usize::MAX).await.unwrap();
    assert_eq!(all[0].prev_hash, crate::chain::GENESIS);
    for pair in all.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert!(all.iter().all(|r| key.is_intact(r)));
    assert_eq!(store.audit_head().await.unwrap().as_ref(), all.last());
    assert_eq!(store.audit_entry(2).await.unwrap().as_ref(), all.get(1));
    assert_eq!(store.durable_audit_seq(), all.last().unwrap().seq);

    let mut d = draft(Action::Get);
    d.tenant = Some(tenant("idx"));
    d.name = Some(name("k"));
    d.principal = Some(PrincipalId::parse("agent-7").unwrap());
    d.peer = Some("10.1.2.3:4567".into());
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(
            store
                .commit(Transaction::audit_only(d.clone()))
                .await
                .unwrap()
                .audit_seq
                .unwrap(),
        );
    }
    let indexes = [
        AuditIndex::Secret(tenant("idx"), name("k")),
        AuditIndex::Tenant(tenant("idx")),
        AuditIndex::Principal(PrincipalId::parse("agent-7").unwrap()),
        AuditIndex::PeerHost("10.1.2.3".into()),
    ];
    for index in &indexes {
        assert_eq!(
            store.audit_index(index, 0, 10).await.unwrap(),
            seqs,
            "{index:?}"
        );
        assert_eq!(
            store.audit_index(index, seqs[1], 10).await.unwrap(),
            &seqs[1..]
        );
        assert_eq!(store.audit_index(index, 0, 1).await.unwrap(), &seqs[..1]);
    }
    assert!(
        store
            .audit_index(&AuditIndex::Tenant(tenant("id")), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .audit_index(&AuditIndex::Secret(tenant("idx"), name("kk")), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn durable_entries_are_fed_to_subscribers(store: &dyn Store) {
    let mut feed = store.subscribe_audit();
    let seq = store
        .commit(Transaction::audit_only(draft(Action::Audit)))
        .await
        .unwrap()
        .audit_seq
        .unwrap();
    let fed = feed.recv().await.unwrap();
    assert_eq!(fed.seq, seq);
    assert!(store.durable_audit_seq() >= seq);
    // Commits without an audit entry feed nothing.
    store.commit(Transaction::default()).await.unwrap();
    assert!(feed.try_recv().is_err());
}

async fn pruning_moves_the_anchor(store: &dyn Store) {
    let key = chain_key();
    let before = store.audit_entries(0, usize::MAX).await.unwrap();
    let through = before[4].seq;
    assert!(matches!(
        store
            .commit(Transaction {
                writes: vec![Write::PruneAudit { through: 999_999 }],
                ..Default::default()
            })
            .await,
        Err(StoreError::PruneOutOfRange(999_999))
    ));
    store
        .commit(Transaction {
            writes: vec![Write::PruneAudit { through }],
            audit: Some(draft(Action::Prune)),
            ..Default::default()
        })
        .await
        .unwrap();
    let after = store.audit_entries(0, usize::MAX).await.unwrap();
    assert_eq!(after[0].seq, through + 1);
    assert_eq!(after.len(), before.len() - 5 + 1);
    let anchor = store.audit_anchor().await.unwrap().unwrap();
    assert_eq!((anchor.seq, anchor.hash), (through, before[4].hash));
    assert!(key.is_authentic(&anchor));
    assert_eq!(after[0].prev_hash, anchor.hash);
    // Pruned entries are gone from the indexes too.
    let peer = AuditIndex::PeerHost("127.0.0.1".into());
    let remaining = store.audit_index(&peer, 0, usize::MAX).await.unwrap();
    assert!(!remaining.is_empty() && remaining.iter().all(|&s| s > through));
    check_indexes_against_entries(store).await;
}

/// A secret `tenant`/`a` at version 1 with its envelope and a lease on it (token hash bytes
/// `hash`), committed together.
async fn stored_with_lease(
    store: &dyn Store,
    tenant: &str,
    hash: u8,
) -> (SecretRecord, LeaseRecord) {
    let s = with_life(secret(tenant, "a"));
    let l = lease(&s, hash, i64::MAX);
    store
        .commit(put(
            vec![
                Write::PutSecret(s.clone()),
                Write::PutEnvelope(envelope(s.id, 1)),
                Write::PutLease(l.clone()),
            ],
            Action::Store,
        ))
        .await
        .unwrap();
    (s, l)
}

/// A redemption reads the lease, its secret and the envelope of the secret's current
/// version together; it follows a rotation, and a lease whose secret is gone has none.
async fn redemptions_read_lease_secret_and_current_envelope(store: &dyn Store) {
    let (s, l) = stored_with_lease(store, "redeem", 91).await;
    let read = store.redemption(&l.token_hash).await.unwrap().unwrap();
    assert_eq!(plain(Some(read.lease)), Some(l.clone()));
    assert_eq!(plain(read.secret), Some(s.clone()));
    assert_eq!(plain(read.envelope), Some(envelope(s.id, 1)));
    let mut rotated = s.clone();
    rotated.version = 2;
    store
        .commit(put(
            vec![
                Write::PutSecret(rotated.clone()),
                Write::PutEnvelope(envelope(s.id, 2)),
                Write::DestroyEnvelopes {
                    secret_id: s.id,
                    keep: Some(2),
                },
            ],
            Action::Rotate,
        ))
        .await
        .unwrap();
    let read = store.redemption(&l.token_hash).await.unwrap().unwrap();
    assert_eq!(plain(read.secret), Some(rotated));
    assert_eq!(plain(read.envelope), Some(envelope(s.id, 2)));
    assert!(
        store
            .redemption(&TokenHash([92; 32]))
            .await
            .unwrap()
            .is_none()
    );
    let orphan = lease(&secret("redeem", "never-stored"), 93, i64::MAX);
    store
        .commit(put(vec![Write::PutLease(orphan.clone())], Action::Lease))
        .await
        .unwrap();
    let read = store.redemption(&orphan.token_hash).await.unwrap().unwrap();
    assert!(read.secret.is_none() && read.envelope.is_none());
}

/// An audit query answers what filtering every entry would, page by page.
async fn audit_queries_match_a_filtered_scan(store: &dyn Store) {
    let all = store.audit_entries(0, usize::MAX).await.unwrap();
    let head = all.last().map_or(0, |r| r.seq);
    let filters = [
        AuditFilter::default(),
        AuditFilter {
            tenant: Some(tenant("t1")),
            ..Default::default()
        },
        AuditFilter {
            tenant: Some(tenant("t1")),
            name: Some(name("a")),
            ..Default::default()
        },
        AuditFilter {
            action: Some(Action::List),
            ..Default::default()
        },
        AuditFilter {
            peer: Some("127.0.0.1".into()),
            since: all.get(all.len() / 2).map(|r| r.time),
            ..Default::default()
        },
    ];
    for filter in &filters {
        let want: Vec<u64> = all
            .iter()
            .filter(|r| filter.matches(r))
            .map(|r| r.seq)
            .collect();
        let mut got = Vec::new();
        let mut from = 0;
        loop {
            let page = store.audit_query(filter, from, head, 7).await.unwrap();
            got.extend(page.entries.iter().map(|r| r.seq));
            if !page.more {
                break;
            }
            from = page.resume_at;
        }
        assert_eq!(got, want, "{filter:?}");
    }
}

/// An export loads into an empty store through `import`: the same records with their
/// revisions, the same trail (anchor, entries, indexes), no lease; the chain and the
/// revisions go on from there. A store that holds records refuses an import; an import that
/// fails half-way leaves its store refusing writes.
async fn an_export_imports_into_an_empty_store(store: &dyn Store, subject: &dyn Subject) {
    let (_, lease) = stored_with_lease(store, "export", 93).await;
    store
        .commit(put(
            vec![Write::PutMeta(MetaKey::BootstrapAdmin, b"admin".to_vec())],
            Action::Store,
        ))
        .await
        .unwrap();
    let exported = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = exported.clone();
    let count = store
        .export(Box::new(move |record| {
            sink.lock().unwrap().push(record.encode().unwrap());
            Ok(())
        }))
        .await
        .unwrap();
    let exported = std::mem::take(&mut *exported.lock().unwrap());
    assert_eq!(count, exported.len() as u64);
    let records = || exported.iter().map(|(t, b)| Record::decode(t, b).unwrap());
    let source = |skip: Option<u64>| -> ImportSource {
        let mut records: Vec<Record> = records()
            .filter(|r| !matches!(r, Record::Audit(e) if Some(e.seq) == skip))
            .collect();
        records.reverse();
        Box::new(move || Ok(records.pop()))
    };
    let fresh = subject.fresh().await;
    let loaded = fresh.import(source(None)).await.unwrap();
    assert_eq!(loaded, count);
    let mut kinds = [0; 5];
    for record in records() {
        match record {
            Record::Secret(s) => {
                kinds[0] += 1;
                assert_eq!(fresh.secret(&s.tenant, &s.name).await.unwrap(), Some(s));
            }
            Record::Envelope(e) => {
                kinds[1] += 1;
                let read = fresh.envelope(e.secret_id, e.version).await.unwrap();
                assert_eq!(read, Some(e));
            }
            Record::Meta(key, revision, value) => {
                kinds[2] += 1;
                assert_eq!(fresh.meta(key).await.unwrap(), Some((revision, value)));
            }
            Record::Anchor(a) => {
                kinds[3] += 1;
                assert_eq!(fresh.audit_anchor().await.unwrap(), Some(a));
            }
            Record::Audit(_) => kinds[4] += 1,
        }
    }
    assert!(kinds.iter().all(|&n| n > 0), "{kinds:?}");
    // The import counted what its records hold: the tenant's secrets that have values, and
    // the sealed values.
    let mut expect = crate::store::usage::Usage::default();
    let mut ids = std::collections::HashSet::new();
    for record in records() {
        if let Record::Envelope(e) = record
            && e.tenant == tenant("t")
        {
            expect.secrets += u64::from(ids.insert(e.secret_id));
            expect.value_bytes += e.ciphertext.len() as u64;
        }
    }
    assert!(expect.secrets > 1 && expect.value_bytes > 0);
    let counted = crate::store::UsageKey::Tenant(tenant("t"));
    assert_eq!(fresh.usage(&counted).await.unwrap(), expect);
    let entries = store.audit_entries(0, usize::MAX).await.unwrap();
    assert_eq!(fresh.audit_entries(0, usize::MAX).await.unwrap(), entries);
    let peer = AuditIndex::PeerHost("127.0.0.1".into());
    assert_eq!(
        fresh.audit_index(&peer, 0, usize::MAX).await.unwrap(),
        store.audit_index(&peer, 0, usize::MAX).await.unwrap()
    );
    assert!(
        fresh
            .lease_by_token(&lease.token_hash)
            .await
            .unwrap()
            .is_none()
    );
    // The chain goes on from the imported head; revisions from the largest imported.
    fresh.start_audit_chain(chain_key()).await.unwrap();
    let head = entries.last().unwrap().clone();
    let next = secret("export", "after-import");
    let committed = fresh
        .commit(put(vec![Write::PutSecret(next.clone())], Action::Store))
        .await
        .unwrap();
    assert_eq!(committed.audit_seq, Some(head.seq + 1));
    let entry = fresh.audit_entry(head.seq + 1).await.unwrap().unwrap();
    assert_eq!(entry.prev_hash, head.hash);
    let newest = fresh
        .secret(&next.tenant, &next.name)
        .await
        .unwrap()
        .unwrap();
    let largest = records()
        .filter_map(|r| match r {
            Record::Secret(s) => Some(s.rev),
            Record::Envelope(e) => Some(e.rev),
            Record::Meta(_, revision, _) => Some(revision),
            _ => None,
        })
        .max()
        .unwrap();
    assert!(newest.rev > largest);
    // Not into a store that holds records (and that store stays writable).
    let again = fresh.import(Box::new(|| Ok(None))).await;
    assert!(matches!(again, Err(StoreError::Export(_))), "{again:?}");
    assert!(fresh.writable());
    close(&fresh).await;
    // Entries that do not follow each other stop the import, and the store with it.
    let broken = subject.fresh().await;
    let refused = broken.import(source(Some(head.seq - 1))).await;
    assert!(matches!(refused, Err(StoreError::Export(_))), "{refused:?}");
    assert!(!broken.writable());
    close(&broken).await;
}

/// Every record a commit writes gets a revision larger than any before; a guard holds only
/// for the revision read, for each kind of record, meta values included.
async fn revisions_increase_and_guard_every_record(store: &dyn Store) {
    let (s, l) = stored_with_lease(store, "rev", 77).await;
    let first = store.secret(&s.tenant, &s.name).await.unwrap().unwrap();
    let env = store.envelope(s.id, 1).await.unwrap().unwrap();
    let leased = store.lease_by_token(&l.token_hash).await.unwrap().unwrap();
    // One transaction, one revision, whatever it wrote.
    assert!(first.rev > Revision(0));
    assert_eq!((env.rev, leased.rev), (first.rev, first.rev));
    store
        .commit(put(vec![Write::PutSecret(s.clone())], Action::Rotate))
        .await
        .unwrap();
    let second = store.secret(&s.tenant, &s.name).await.unwrap().unwrap();
    assert!(second.rev > first.rev);

    let guarded = |guard: Guard| Transaction {
        charges: Vec::new(),
        guards: vec![guard],
        writes: vec![Write::PutMeta(MetaKey::BootstrapAdmin, vec![1])],
        audit: None,
    };
    let conflict = |r: Result<Committed, StoreError>| matches!(r, Err(StoreError::Conflict));
    // Stale reads of each kind of record lose; current ones win.
    let stale = [
        Guard::secret(&s.tenant, &s.name, Some(&first)),
        Guard::secret(&s.tenant, &s.name, None),
        Guard::envelope(s.id, 1, None),
        Guard::envelope(s.id, 2, Some(&env)),
        Guard::lease(l.token_hash, None),
        Guard::lease(TokenHash([78; 32]), Some(&leased)),
        Guard::meta(MetaKey::BootstrapAdmin, Some(Revision(0))),
    ];
    for guard in stale {
        assert!(
            conflict(store.commit(guarded(guard.clone())).await),
            "{guard:?}"
        );
    }
    assert_eq!(store.meta(MetaKey::BootstrapAdmin).await.unwrap(), None);
    for guard in [
        Guard::secret(&s.tenant, &s.name, Some(&second)),
        Guard::envelope(s.id, 1, Some(&env)),
        Guard::lease(l.token_hash, Some(&leased)),
    ] {
        store.commit(guarded(guard)).await.unwrap();
    }
    // A meta value: created once when absent, then replaced only at the revision read.
    let (created, _) = store.meta(MetaKey::BootstrapAdmin).await.unwrap().unwrap();
    assert!(created > second.rev);
    assert!(conflict(
        store
            .commit(guarded(Guard::meta(MetaKey::Keyring, Some(created))))
            .await
    ));
    store
        .commit(guarded(Guard::meta(MetaKey::BootstrapAdmin, Some(created))))
        .await
        .unwrap();
    assert!(conflict(
        store
            .commit(guarded(Guard::meta(MetaKey::BootstrapAdmin, Some(created))))
            .await
    ));
    // Within one group, a later transaction sees an earlier one's revision: of two commits
    // guarded on the same read, sent together, exactly one wins.
    let current = store.secret(&s.tenant, &s.name).await.unwrap().unwrap();
    let rewrite = || {
        store.commit(Transaction {
            charges: Vec::new(),
            guards: vec![Guard::secret(&s.tenant, &s.name, Some(&current))],
            writes: vec![Write::PutSecret(s.clone())],
            audit: None,
        })
    };
    let (a, b) = tokio::join!(rewrite(), rewrite());
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1);
    assert!(conflict(a) || conflict(b));
}

/// The quotas of `limits`, as the commit core applies them.
fn quota_limits(secrets: u64, leases: u64) -> crate::store::usage::Limits {
    crate::store::usage::Limits {
        secrets_per_tenant: secrets,
        value_bytes_per_tenant: 1 << 20,
        leases_per_tenant: leases,
        value_bytes_total: 1 << 20,
    }
}

/// Two handles (two processes, for a shared engine) charge one tenant at once: 2 x 30
/// Stores (a secret, its envelope and a charge of one secret and its bytes) under a quota of
/// 25 secrets, then 2 x 20 leases under a quota of 12. Exactly the quota commits, whichever
/// handle; the others fail with `OverQuota` and write nothing; both handles read the same
/// usage, for the tenant and for all; a give-back on one makes room on the other.
async fn charges_on_two_handles_stop_exactly_at_the_quota(handles: [Arc<dyn Store>; 2]) {
    use crate::store::usage::{Charge, Delta, OverQuota, Usage, UsageKey};
    for store in &handles {
        store.start_audit_chain(chain_key()).await.unwrap();
    }
    let t = tenant("quota");
    let charge = |delta: Delta, limited: Option<(u64, u64)>| Charge {
        tenant: t.clone(),
        delta,
        limits: limited.map(|(secrets, leases)| quota_limits(secrets, leases)),
    };
    let stored = |i: usize| {
        let s = secret("quota", &format!("s{i}"));
        let mut e = envelope(s.id, 1);
        e.tenant = s.tenant.clone();
        let delta = Delta {
            secrets: 1,
            value_bytes: e.ciphertext.len() as i64,
            leases: 0,
        };
        (s, e, delta)
    };
    // Counts the answers: (committed, over the quota named `what`).
    async fn race(
        commits: Vec<(Arc<dyn Store>, Transaction)>,
        what: &'static str,
    ) -> (usize, usize) {
        let barrier = Arc::new(tokio::sync::Barrier::new(commits.len()));
        let tasks: Vec<_> = commits
            .into_iter()
            .map(|(store, tx)| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.commit(tx).await
                })
            })
            .collect();
        let (mut won, mut over) = (0, 0);
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::OverQuota(OverQuota::Tenant { what: w, .. })) if w == what => {
                    over += 1
                }
                Err(e) => panic!("{e}"),
            }
        }
        (won, over)
    }
    let commits = (0..60)
        .map(|i| {
            let (s, e, delta) = stored(i);
            let tx = Transaction {
                charges: vec![charge(delta, Some((25, 12)))],
                ..put(
                    vec![Write::PutSecret(s), Write::PutEnvelope(e)],
                    Action::Store,
                )
            };
            (handles[i % 2].clone(), tx)
        })
        .collect();
    assert_eq!(race(commits, "secrets").await, (25, 35));
    let listed = handles[1].list_secrets(&t, None, 1000).await.unwrap();
    assert_eq!(listed.len(), 25, "a refused commit wrote its records");
    let bytes = 25 * envelope(SecretId::generate(), 1).ciphertext.len() as u64;
    let mut expect = Usage {
        secrets: 25,
        value_bytes: bytes,
        leases: 0,
    };
    for store in &handles {
        assert_eq!(
            store.usage(&UsageKey::Tenant(t.clone())).await.unwrap(),
            expect
        );
        assert_eq!(store.usage(&UsageKey::All).await.unwrap(), expect);
    }
    // Leases, on the secrets that committed.
    let commits = (0..40)
        .map(|i| {
            let l = lease(&listed[i % 25], 100 + i as u8, i64::MAX);
            let delta = Delta {
                leases: 1,
                ..Delta::default()
            };
            let tx = Transaction {
                charges: vec![charge(delta, Some((25, 12)))],
                ..put(vec![Write::PutLease(l)], Action::Lease)
            };
            (handles[i % 2].clone(), tx)
        })
        .collect();
    assert_eq!(race(commits, "leases").await, (12, 28));
    expect.leases = 12;
    for store in &handles {
        assert_eq!(
            store.usage(&UsageKey::Tenant(t.clone())).await.unwrap(),
            expect
        );
    }
    // Giving back is never refused; the room it makes is there for the other handle.
    let (_, _, one) = stored(0);
    let back = Transaction {
        charges: vec![charge(one.back(), None)],
        ..put(Vec::new(), Action::Revoke)
    };
    handles[0].commit(back).await.unwrap();
    let (s, e, delta) = stored(60);
    let again = Transaction {
        charges: vec![charge(delta, Some((25, 12)))],
        ..put(
            vec![Write::PutSecret(s), Write::PutEnvelope(e)],
            Action::Store,
        )
    };
    handles[1].commit(again).await.unwrap();
    for store in &handles {
        assert_eq!(
            store.usage(&UsageKey::Tenant(t.clone())).await.unwrap(),
            expect
        );
    }
}

/// Commits what makes usage in every way (secrets with their values, a rotation, leases, a
/// revocation, collected leases), each with its charge, in two tenants; returns the usage
/// the charges left (tenant `u1`, tenant `u2`, all), which a count of the records must match.
pub(crate) async fn charged_records(store: &dyn Store) -> [crate::store::usage::Usage; 3] {
    use crate::store::usage::{Charge, Delta, UsageKey};
    store.start_audit_chain(chain_key()).await.unwrap();
    let charged = |t: &TenantId, delta: Delta, writes: Vec<Write>| Transaction {
        charges: vec![Charge {
            tenant: t.clone(),
            delta,
            limits: Some(quota_limits(100, 100)),
        }],
        ..put(writes, Action::Store)
    };
    for (t, n) in [("u1", 5), ("u2", 3)] {
        for i in 0..n {
            let s = secret(t, &format!("s{i}"));
            let mut e = envelope(s.id, 1);
            e.tenant = s.tenant.clone();
            e.ciphertext = vec![7; 10 + i];
            let delta = Delta {
                secrets: 1,
                value_bytes: e.ciphertext.len() as i64,
                leases: 0,
            };
            let writes = vec![Write::PutSecret(s.clone()), Write::PutEnvelope(e)];
            store
                .commit(charged(&s.tenant, delta, writes))
                .await
                .unwrap();
            let l = lease(&s, (i as u8) * 2 + u8::from(t == "u2") * 64, i64::MAX);
            let delta = Delta {
                leases: 1,
                ..Delta::default()
            };
            let writes = vec![Write::PutLease(l)];
            store
                .commit(charged(&s.tenant, delta, writes))
                .await
                .unwrap();
        }
    }
    // u1/s0 rotated to a longer value; u1/s1 revoked; one of u2's leases collected.
    let u1 = tenant("u1");
    let s0 = store.secret(&u1, &name("s0")).await.unwrap().unwrap();
    let mut next = s0.clone();
    next.version = 2;
    let mut e = envelope(s0.id, 2);
    e.tenant = u1.clone();
    e.ciphertext = vec![8; 50];
    let delta = Delta {
        value_bytes: 50 - 10,
        ..Delta::default()
    };
    let writes = vec![
        Write::PutSecret(next),
        Write::DestroyEnvelopes {
            secret_id: s0.id,
            keep: Some(2),
        },
        Write::PutEnvelope(e),
    ];
    store.commit(charged(&u1, delta, writes)).await.unwrap();
    let s1 = store.secret(&u1, &name("s1")).await.unwrap().unwrap();
    let mut tombstone = s1.clone();
    tombstone.state = SecretState::Revoked;
    let back = Delta {
        secrets: -1,
        value_bytes: -11,
        leases: 0,
    };
    let revoke = Transaction {
        charges: vec![Charge {
            tenant: u1.clone(),
            delta: back,
            limits: None,
        }],
        ..put(
            vec![
                Write::PutSecret(tombstone),
                Write::DestroyEnvelopes {
                    secret_id: s1.id,
                    keep: None,
                },
            ],
            Action::Revoke,
        )
    };
    store.commit(revoke).await.unwrap();
    let u2 = tenant("u2");
    let collected = store
        .lease_by_token(&TokenHash([64; 32]))
        .await
        .unwrap()
        .unwrap();
    let collect = Transaction {
        charges: vec![Charge {
            tenant: u2.clone(),
            delta: Delta {
                leases: -1,
                ..Delta::default()
            },
            limits: None,
        }],
        guards: Vec::new(),
        writes: vec![Write::DeleteLease(collected)],
        audit: None,
    };
    store.commit(collect).await.unwrap();
    let mut usage = [Default::default(); 3];
    for (i, key) in [UsageKey::Tenant(u1), UsageKey::Tenant(u2), UsageKey::All]
        .iter()
        .enumerate()
    {
        usage[i] = store.usage(key).await.unwrap();
    }
    let u1 = crate::store::usage::Usage {
        secrets: 4,
        value_bytes: 50 + 12 + 13 + 14,
        leases: 5,
    };
    assert_eq!(usage[0], u1);
    assert_eq!(usage[1].leases, 2);
    usage
}

/// Two handles on one empty store (two processes, for a shared engine) start at the same
/// moment: both end with the same keyring and the same audit chain key, and the store holds
/// one of each.
async fn concurrent_first_starts_initialise_once(handles: [Arc<dyn Store>; 2]) {
    let keys = tempfile::tempdir().unwrap();
    let config = crate::config::MasterKeyConfig {
        spec: crate::keyring::MasterKeySpec::Local {
            path: keys.path().join("master.key"),
        },
        aws: Default::default(),
        cache: crate::keyring::CacheSettings::DISABLED,
        rewrap_batch: 1,
        rewrap_pause: std::time::Duration::ZERO,
    };
    let start = |store: Arc<dyn Store>| {
        let (config, dir) = (config.clone(), keys.path().to_path_buf());
        tokio::spawn(async move {
            crate::server::open_keys(&config, &*store, crate::server::Initialise::IfNew, &dir)
                .await
                .map_err(|e| e.to_string())
        })
    };
    let [a, b] = handles;
    let (first, second) = tokio::join!(start(a.clone()), start(b.clone()));
    let (first, second) = (first.unwrap().unwrap(), second.unwrap().unwrap());
    assert_eq!(first.state.versions, second.state.versions);
    assert_eq!(first.state.versions.len(), 1);
    let probe = draft(Action::List);
    let link =
        |chain: &ChainKey| chain.link(&crate::chain::GENESIS, 1, Time::from_micros(1), &probe);
    assert_eq!(link(&first.chain), link(&second.chain));
    // What both handles read back is what each was given.
    for store in [&a, &b] {
        let stored = crate::rotation::KeyringState::load(&**store)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.versions, first.state.versions);
        assert!(store.meta(MetaKey::AuditSeed).await.unwrap().is_some());
    }
    // The key file the winner created is the one both use.
    assert_eq!(std::fs::read_dir(keys.path()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_passes_the_suite() {
    suite(&SledSubject::new(crate::store::DEFAULT_AUDIT_SEGMENT_BYTES)).await;
}

/// sled keeps the usage in memory: counted from the records when the store opens, it is
/// what the charges left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_counts_the_usage_its_records_hold_when_it_opens() {
    use crate::store::usage::UsageKey;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let charged = charged_records(&store).await;
    store.close().await.unwrap();
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    for (key, usage) in [
        UsageKey::Tenant(tenant("u1")),
        UsageKey::Tenant(tenant("u2")),
        UsageKey::All,
    ]
    .iter()
    .zip(charged)
    {
        assert_eq!(store.usage(key).await.unwrap(), usage, "{key:?}");
    }
    store.close().await.unwrap();
}

/// sled counts the secrets' use again from the trail where the tree does not hold it (kept in
/// memory since the last checkpoint when the process died), never counting twice an entry a
/// row already counts; a store made before the counts were kept has them counted from its
/// trail at its first open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_counts_the_secrets_use_again_from_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let k = secret("t", "k");
    let query = DayQuery {
        tenant: tenant("t"),
        name: None,
        from: i64::MIN / 2,
        to: i64::MAX / 2,
        limit: 100,
    };
    let store = SledStore::open(dir.path()).unwrap();
    store.start_audit_chain(chain_key()).await.unwrap();
    for (action, outcome) in [
        (Action::Lease, Outcome::Ok),
        (Action::Get, Outcome::Ok),
        (Action::Get, Outcome::DeadlineExceeded),
        (Action::Lease, Outcome::Ok),
    ] {
        store
            .commit(use_of(&k, action, outcome, "p"))
            .await
            .unwrap();
    }
    let used = store.activity(&[k.id]).await.unwrap();
    assert_eq!(
        (
            used[0].leases_issued,
            used[0].redemptions,
            used[0].failed_redemptions
        ),
        (2, 1, 1)
    );
    let days = store.activity_days(&query).await.unwrap();
    store.close().await.unwrap();
    drop(store);
    // (forget the rows, the mark of the last entry they count)
    for (forget, mark) in [
        // The rows count more than the mark says (a checkpoint whose mark a crash lost): the
        // entries after it are not counted twice.
        (false, Some(1)),
        // Nothing written since the start (the writer keeps the use in memory between
        // checkpoints): counted again from the trail.
        (true, Some(0)),
        // A store from before the counts: its trail is counted at open.
        (true, None),
    ] {
        SledStore::danger_forget_activity(dir.path(), forget, mark).unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            store.activity(&[k.id]).await.unwrap(),
            used,
            "{forget} {mark:?}"
        );
        assert_eq!(store.activity_days(&query).await.unwrap(), days);
        store.close().await.unwrap();
    }
}

/// sled keeps the lease changes of groups that change nothing else in memory, written to the
/// tree at a checkpoint (a group flushed anyway, or close); after a crash that lost them, the
/// trail's frames bring them back: every lease issued, used, revoked or deleted since the
/// tree's lease position reads as it was, by token, by id and by expiry, and counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_applies_again_the_lease_changes_it_kept_in_memory() {
    use crate::store::usage::UsageKey;
    let dir = tempfile::tempdir().unwrap();
    let s = secret("t", "k");
    let (mut kept, mut used, gone, expired);
    let mark;
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        store
            .commit(put(vec![Write::PutSecret(s.clone())], Action::Store))
            .await
            .unwrap();
        mark = store.durable_audit_seq();
        (kept, used, gone) = (
            lease(&s, 1, i64::MAX),
            lease(&s, 2, i64::MAX),
            lease(&s, 3, i64::MAX),
        );
        expired = lease(&s, 4, 5);
        for l in [&kept, &used, &gone, &expired] {
            store
                .commit(put(vec![Write::PutLease(l.clone())], Action::Lease))
                .await
                .unwrap();
        }
        used = store
            .lease_by_token(&used.token_hash)
            .await
            .unwrap()
            .unwrap();
        used.uses += 1;
        used.revoked = true;
        store
            .commit(put(vec![Write::UpdateLease(used.clone())], Action::Get))
            .await
            .unwrap();
        let read = store
            .lease_by_token(&gone.token_hash)
            .await
            .unwrap()
            .unwrap();
        store
            .commit(put(vec![Write::DeleteLease(read)], Action::Revoke))
            .await
            .unwrap();
        kept = store
            .lease_by_token(&kept.token_hash)
            .await
            .unwrap()
            .unwrap();
        used = store
            .lease_by_token(&used.token_hash)
            .await
            .unwrap()
            .unwrap();
        store.close().await.unwrap();
    }
    async fn check(dir: &std::path::Path, leases: [&LeaseRecord; 4]) -> crate::store::Usage {
        let [kept, used, gone, expired] = leases;
        let store = SledStore::open(dir).unwrap();
        for l in [kept, used] {
            assert_eq!(
                store.lease_by_token(&l.token_hash).await.unwrap().as_ref(),
                Some(l)
            );
        }
        assert_eq!((used.uses, used.revoked), (1, true));
        assert_eq!(store.lease_by_token(&gone.token_hash).await.unwrap(), None);
        assert_eq!(store.lease_by_id(gone.id).await.unwrap(), None);
        assert_eq!(
            store
                .lease_by_id(kept.id)
                .await
                .unwrap()
                .map(|l| l.token_hash),
            Some(kept.token_hash)
        );
        let expiring = store
            .expired_leases(Time::from_micros(10), 10)
            .await
            .unwrap();
        assert_eq!(
            expiring.iter().map(|l| l.token_hash).collect::<Vec<_>>(),
            [expired.token_hash]
        );
        let usage = store.usage(&UsageKey::Tenant(tenant("t"))).await.unwrap();
        store.close().await.unwrap();
        usage
    }
    let leases = [&kept, &used, &gone, &expired];
    // Written at close: read back from the tree.
    let at_close = check(dir.path(), leases).await;
    assert_eq!(at_close.leases, 3);
    // As a crash would leave it: nothing of them in the tree since the Store.
    SledStore::danger_forget_leases(dir.path(), mark).unwrap();
    assert_eq!(check(dir.path(), leases).await, at_close);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_adapter_indexes_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mut i = 0;
    // Stop, reopen (the active segment's index is rebuilt from its entries) and go on: the
    // indexes must hold the entries from before each restart too.
    for stop in [300, 400, 511, 512, 700] {
        let store = SledStore::open(dir.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        while i < stop {
            store
                .commit(Transaction::audit_only(varied_draft(i)))
                .await
                .unwrap();
            i += 1;
        }
        check_indexes_against_entries(&store).await;
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_adapter_reopens_with_the_next_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret("t", "a");
    let last_hash: crate::model::ChainHash;
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        for _ in 0..3 {
            store
                .commit(Transaction::audit_only(draft(Action::List)))
                .await
                .unwrap();
        }
        store
            .commit(put(vec![Write::PutSecret(s.clone())], Action::Store))
            .await
            .unwrap();
        last_hash = store.audit_head().await.unwrap().unwrap().hash;
        store.close().await.unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.durable_audit_seq(), 4);
    store.start_audit_chain(chain_key()).await.unwrap();
    assert_eq!(
        plain(store.secret(&s.tenant, &s.name).await.unwrap()),
        Some(s)
    );
    let c = store
        .commit(Transaction::audit_only(draft(Action::List)))
        .await
        .unwrap();
    assert_eq!(c.audit_seq, Some(5));
    assert_eq!(
        store.audit_entry(5).await.unwrap().unwrap().prev_hash,
        last_hash
    );
    store.close().await.unwrap();
}
