//! The commit core with several writers on one engine, as replicas on PostgreSQL will be: an
//! in-memory engine shared by two committers, whose `begin_group` takes the writers' lock and
//! returns where the chain and the revisions stand.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex};

use super::{Adapter, Change, Committer, Group, Position, RecordKey};
use crate::model::{Action, AuditAnchor, AuditRecord, Revision, SecretId};
use crate::store::tests::{chain_key, put, secret};
use crate::store::usage::{Usage, UsageKey};
use crate::store::{Guard, Record, StoreError, Transaction, Write};

/// What the engine holds: record revisions, envelope versions and the trail.
#[derive(Default)]
struct State {
    revisions: HashMap<RecordKey, Revision>,
    envelopes: BTreeSet<(SecretId, u32)>,
    trail: Vec<AuditRecord>,
    last_revision: Revision,
    usage: HashMap<UsageKey, Usage>,
}

/// The engine: its state, and the lock a group holds from `begin_group` to `end_group`.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    locked: Mutex<bool>,
    unlocked: Condvar,
}

/// One process's adapter on the shared engine.
struct Handle {
    engine: Arc<Shared>,
    /// False: behave as an engine only this process writes (never read the position).
    shared: bool,
}

impl Handle {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.engine.state.lock().unwrap()
    }
}

impl Adapter for Handle {
    fn check_writable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn revision(&self, key: &RecordKey) -> Result<Option<Revision>, StoreError> {
        Ok(self.state().revisions.get(key).copied())
    }

    fn usage(&self, keys: &[UsageKey]) -> Result<Vec<Usage>, StoreError> {
        let state = self.state();
        Ok(keys
            .iter()
            .map(|key| state.usage.get(key).copied().unwrap_or_default())
            .collect())
    }

    fn envelope_versions(&self, secret_id: SecretId) -> Result<Vec<u32>, StoreError> {
        let state = self.state();
        let versions = state
            .envelopes
            .range((secret_id, 0)..=(secret_id, u32::MAX));
        Ok(versions.map(|(_, v)| *v).collect())
    }

    fn anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        Ok(None)
    }

    fn audit_entry(&self, seq: u64) -> Result<Option<AuditRecord>, StoreError> {
        Ok(self.state().trail.iter().find(|r| r.seq == seq).cloned())
    }

    fn write_group(&mut self, group: &Group) -> Result<(), StoreError> {
        let mut state = self.state();
        for tx in &group.transactions {
            for change in &tx.changes {
                match change {
                    Change::Secret(s) => {
                        let key = RecordKey::Secret(s.tenant.clone(), s.name.clone());
                        state.revisions.insert(key, s.rev);
                    }
                    Change::Envelope(e) => {
                        state.envelopes.insert((e.secret_id, e.version));
                        let key = RecordKey::Envelope(e.secret_id, e.version);
                        state.revisions.insert(key, e.rev);
                    }
                    other => panic!("not used here: {other:?}"),
                }
            }
            state.trail.extend(tx.audit.clone());
        }
        state.usage.extend(group.usage.iter().cloned());
        state.last_revision = group.last_revision;
        Ok(())
    }

    fn close(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn begin_group(&mut self) -> Result<Option<Position>, StoreError> {
        if !self.shared {
            return Ok(None);
        }
        let mut locked = self.engine.locked.lock().unwrap();
        while *locked {
            locked = self.engine.unlocked.wait(locked).unwrap();
        }
        *locked = true;
        let state = self.state();
        Ok(Some(Position::after(
            state.trail.last(),
            None,
            state.last_revision,
        )))
    }

    fn end_group(&mut self) {
        if self.shared {
            *self.engine.locked.lock().unwrap() = false;
            self.engine.unlocked.notify_one();
        }
    }
}

/// What a test reads back from an engine once its writers closed.
pub(crate) struct Written {
    /// The audit trail, in seq order.
    pub trail: Vec<AuditRecord>,
    /// The revisions of the records written.
    pub revisions: Vec<Revision>,
    /// The engine's revision counter.
    pub last_revision: Revision,
}

/// Two committers on one engine (each on an adapter `adapter` makes), 2 x 64 concurrent
/// commits each, and 16 racing creates of one name: where the engine is shared, one chain
/// (seqs 1..=n in commit order, each entry linked to the one before and intact, times never
/// decreasing), revisions never assigned twice, and exactly one create wins. Returns whether
/// all of that held in what `written` reads back.
pub(crate) async fn two_writers<A: Adapter>(
    adapter: impl Fn() -> A,
    written: impl FnOnce() -> Written,
) -> bool {
    let key = chain_key();
    let mut committers = Vec::new();
    for _ in 0..2 {
        let committer =
            Committer::start(adapter(), Position::after(None, None, Revision(0))).unwrap();
        committer.start_chain(key.clone()).await.unwrap();
        committers.push(Arc::new(committer));
    }
    let mut tasks = Vec::new();
    for wave in 0..2 {
        for i in 0..64 {
            let committer = committers[i % 2].clone();
            let s = secret("t", &format!("w{wave}-{i}"));
            tasks.push(tokio::spawn(async move {
                committer
                    .commit(put(vec![Write::PutSecret(s)], Action::Store))
                    .await
                    .is_ok()
            }));
        }
    }
    for i in 0..16 {
        let committer = committers[i % 2].clone();
        let s = secret("t", "raced");
        tasks.push(tokio::spawn(async move {
            let tx = Transaction {
                guards: vec![Guard::secret(&s.tenant, &s.name, None)],
                ..put(vec![Write::PutSecret(s)], Action::Store)
            };
            committer.commit(tx).await.is_ok()
        }));
    }
    let mut won = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let ok = task.await.unwrap();
        if i < 128 {
            assert!(ok, "commit {i} failed");
        } else {
            won += usize::from(ok);
        }
    }
    for committer in &committers {
        committer.close().await.unwrap();
    }
    let Written {
        trail,
        revisions,
        last_revision,
    } = written();
    let one_chain = trail.iter().enumerate().all(|(i, r)| {
        r.seq == i as u64 + 1
            && key.is_intact(r)
            && (i == 0 || (r.prev_hash == trail[i - 1].hash && r.time >= trail[i - 1].time))
    });
    let distinct: BTreeSet<Revision> = revisions.iter().copied().collect();
    one_chain
        && trail.len() == 128 + won
        && won == 1
        && distinct.len() == revisions.len()
        && last_revision == Revision(revisions.len() as u64)
}

/// [`two_writers`] on the in-memory engine; `shared`: its adapters take the writers' lock.
async fn two_writers_in_memory(shared: bool) -> bool {
    let engine = Arc::new(Shared::default());
    let handle = || Handle {
        engine: engine.clone(),
        shared,
    };
    let written = || {
        let state = engine.state.lock().unwrap();
        Written {
            trail: state.trail.clone(),
            revisions: state.revisions.values().copied().collect(),
            last_revision: state.last_revision,
        }
    };
    two_writers(handle, written).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_engine_keep_one_chain_through_begin_group() {
    assert!(two_writers_in_memory(true).await);
}

/// The check above fails without the hook: each committer then builds on its own position,
/// and the chain forks (this guards the test itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_begin_group_two_processes_fork_the_chain() {
    assert!(!two_writers_in_memory(false).await);
}

/// An import into a shared engine runs under the writers' lock and against the engine's
/// position: another process's next commit follows the imported head and revisions, and a
/// process that has written nothing itself is refused an import into the engine others wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_on_a_shared_engine_is_where_the_other_writers_go_on() {
    let start = |engine: &Arc<Shared>| {
        let handle = Handle {
            engine: engine.clone(),
            shared: true,
        };
        Committer::start(handle, Position::after(None, None, Revision(0))).unwrap()
    };
    // A trail of three entries and a secret, made on another engine.
    let source = Arc::new(Shared::default());
    let maker = start(&source);
    maker.start_chain(chain_key()).await.unwrap();
    for i in 0..3 {
        let s = secret("t", &format!("made-{i}"));
        maker
            .commit(put(vec![Write::PutSecret(s)], Action::Store))
            .await
            .unwrap();
    }
    maker.close().await.unwrap();
    let trail = source.state.lock().unwrap().trail.clone();
    let mut imported = secret("t", "imported");
    imported.rev = Revision(3);

    let engine = Arc::new(Shared::default());
    let (a, b) = (start(&engine), start(&engine));
    let mut records: Vec<Record> = trail.iter().cloned().map(Record::Audit).collect();
    records.push(Record::Secret(imported));
    records.reverse();
    let loaded = a.import(Box::new(move || Ok(records.pop()))).await.unwrap();
    assert_eq!(loaded, 4);
    b.start_chain(chain_key()).await.unwrap();
    let committed = b
        .commit(put(
            vec![Write::PutSecret(secret("t", "next"))],
            Action::Store,
        ))
        .await
        .unwrap();
    assert_eq!(committed.audit_seq, Some(4));
    {
        let state = engine.state.lock().unwrap();
        assert_eq!(state.trail[3].prev_hash, trail[2].hash);
        assert_eq!(state.last_revision, Revision(4));
    }
    // A third process, which has written nothing itself, finds the engine not empty.
    let c = start(&engine);
    let again = c.import(Box::new(|| Ok(None))).await;
    assert!(matches!(again, Err(StoreError::Export(_))), "{again:?}");
    for committer in [a, b, c] {
        committer.close().await.unwrap();
    }
}

/// While a group's write has taken longer than `STALL` (here: another writer holds the
/// engine's lock), commits not in it are refused: a new one at once, and one queued behind
/// it by the watchdog (and never applied later), while a barrier queued with it still runs
/// after the write. Commits behind a shorter wait are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_refused_while_a_write_stalls_not_queued_behind_it() {
    use std::time::{Duration, Instant};
    let engine = Arc::new(Shared::default());
    let handle = Handle {
        engine: engine.clone(),
        shared: true,
    };
    let committer =
        Arc::new(Committer::start(handle, Position::after(None, None, Revision(0))).unwrap());
    committer.start_chain(chain_key()).await.unwrap();
    let commit = |name: &'static str| {
        let committer = committer.clone();
        tokio::spawn(async move {
            let tx = put(vec![Write::PutSecret(secret("t", name))], Action::Store);
            committer.commit(tx).await
        })
    };
    let lock = |locked: bool| {
        *engine.locked.lock().unwrap() = locked;
        engine.unlocked.notify_one();
    };
    type Answer = Result<
        Result<Result<super::Committed, StoreError>, tokio::task::JoinError>,
        tokio::time::error::Elapsed,
    >;
    let refused = |answer: &Answer| matches!(answer, Ok(Ok(Err(StoreError::Transient(_)))));
    let stall = super::STALL;
    // A wait shorter than the limit: both applied.
    lock(true);
    let (first, second) = (commit("short-first"), commit("short-second"));
    tokio::time::sleep(stall / 2).await;
    lock(false);
    assert!(first.await.unwrap().is_ok() && second.await.unwrap().is_ok());

    let start = Instant::now();
    lock(true);
    let stalled = commit("stalled");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued = commit("queued");
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let barrier = {
        let ran = ran.clone();
        committer.between(Box::new(move |_: &mut Handle| {
            ran.store(true, std::sync::atomic::Ordering::SeqCst)
        }))
    };
    barrier.await.unwrap();
    let queued = tokio::time::timeout_at((start + stall * 2).into(), queued).await;
    assert!(refused(&queued), "a queued commit waited: {queued:?}");
    let new = tokio::time::timeout(Duration::from_millis(100), commit("new")).await;
    assert!(
        refused(&new),
        "a new commit was not refused at once: {new:?}"
    );
    lock(false);
    assert!(stalled.await.unwrap().is_ok(), "the stalled group's commit");
    assert!(commit("after").await.unwrap().is_ok());
    assert!(
        ran.load(std::sync::atomic::Ordering::SeqCst),
        "the barrier was lost"
    );
    // What was refused wrote nothing, then or later.
    let mut names: Vec<String> = engine
        .state
        .lock()
        .unwrap()
        .revisions
        .keys()
        .filter_map(|key| match key {
            RecordKey::Secret(_, name) => Some(name.as_str().to_string()),
            _ => None,
        })
        .collect();
    names.sort();
    assert_eq!(names, ["after", "short-first", "short-second", "stalled"]);
    assert_eq!(engine.state.lock().unwrap().trail.len(), 4);
}

/// Two writers of one engine charging one tenant's quota at once (2 x 40 commits, each a
/// secret more, under a quota of 25): exactly 25 commit, the others fail with `OverQuota`
/// and write nothing, and the engine's usage says 25 (for the tenant and for all); giving
/// back is never refused and makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_charging_one_quota_commit_exactly_up_to_it() {
    use crate::store::usage::{Charge, Delta, Limits, OverQuota};
    let engine = Arc::new(Shared::default());
    let key = chain_key();
    let mut committers = Vec::new();
    for _ in 0..2 {
        let handle = Handle {
            engine: engine.clone(),
            shared: true,
        };
        let committer = Committer::start(handle, Position::after(None, None, Revision(0))).unwrap();
        committer.start_chain(key.clone()).await.unwrap();
        committers.push(Arc::new(committer));
    }
    let s = secret("t", "any");
    let limits = Limits {
        secrets_per_tenant: 25,
        value_bytes_per_tenant: 1 << 20,
        leases_per_tenant: 10,
        value_bytes_total: 1 << 20,
    };
    let charge = move |secrets: i64| Charge {
        tenant: s.tenant.clone(),
        delta: Delta {
            secrets,
            value_bytes: 10 * secrets,
            leases: 0,
        },
        limits: Some(limits),
    };
    let mut tasks = Vec::new();
    for i in 0..80 {
        let committer = committers[i % 2].clone();
        let tx = Transaction {
            charges: vec![charge(1)],
            ..put(
                vec![Write::PutSecret(secret("t", &format!("s{i}")))],
                Action::Store,
            )
        };
        tasks.push(tokio::spawn(async move { committer.commit(tx).await }));
    }
    let (mut won, mut over) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => won += 1,
            Err(StoreError::OverQuota(OverQuota::Tenant { what, limit, .. })) => {
                assert_eq!((what, limit), ("secrets", 25));
                over += 1;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((won, over), (25, 55));
    let usage = |key: &UsageKey| engine.state.lock().unwrap().usage.get(key).copied();
    let tenant = UsageKey::Tenant(crate::model::TenantId::parse("t").unwrap());
    let expect = Usage {
        secrets: 25,
        value_bytes: 250,
        leases: 0,
    };
    assert_eq!(usage(&tenant), Some(expect));
    assert_eq!(usage(&UsageKey::All), Some(expect));
    let secrets = engine
        .state
        .lock()
        .unwrap()
        .revisions
        .keys()
        .filter(|k| matches!(k, RecordKey::Secret(..)))
        .count();
    assert_eq!(secrets, 25, "a refused commit wrote its record");
    // Giving back (no limits) is never refused, and makes room on the other writer.
    let back = Transaction {
        charges: vec![Charge {
            limits: None,
            ..charge(-1)
        }],
        ..put(Vec::new(), Action::Revoke)
    };
    committers[0].commit(back).await.unwrap();
    let again = Transaction {
        charges: vec![charge(1)],
        ..put(vec![Write::PutSecret(secret("t", "again"))], Action::Store)
    };
    committers[1].commit(again).await.unwrap();
    assert_eq!(usage(&tenant).map(|u| u.secrets), Some(25));
    for committer in &committers {
        committer.close().await.unwrap();
    }
}
