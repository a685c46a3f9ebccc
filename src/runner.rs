//! Background work (lease collection, audit retention, the master-key rewrap) runs in one
//! process at a time among those sharing a store: the one that holds the turn.
//!
//! The turn is two meta records. `RunnerTurn` names the holder and until when its turn lasts;
//! the holder renews it, and another process takes it once it has lapsed. `RunnerEpoch` names
//! the holder too, and only a takeover writes it. Every job's commit carries a guard on the
//! epoch record at the revision its process took the turn with ([`Runner::fence`]), so a
//! process that lost its turn cannot write, even before it notices (fencing): its commit
//! fails the guard. The turn's length only decides how soon a dead holder is replaced; no
//! clock decides who may write. A store only one process can open (sled) has no one to wait
//! for: a new process takes the turn at once.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::Time;
use crate::store::{Guard, MetaKey, Store, StoreError, Transaction, load_meta, put_meta};

/// Who holds the turn, and until when (renewed by the holder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// The holding process.
    pub holder: [u8; 16],
    /// The epoch it took the turn in.
    pub epoch: u64,
    /// When the turn lapses unless renewed.
    pub until: Time,
}

/// The process that last took the turn, and how many takeovers there were.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// The process that took the turn.
    pub holder: [u8; 16],
    /// Takeovers so far.
    pub epoch: u64,
}

crate::postcard_meta!(Turn, MetaKey::RunnerTurn);
crate::postcard_meta!(Epoch, MetaKey::RunnerEpoch);

/// This process's side of the turn.
pub struct Runner {
    store: Arc<dyn Store>,
    me: [u8; 16],
    turn: Duration,
    /// Whether other processes may share the store (else any stored turn is a dead one's).
    shared: bool,
    held: Mutex<Option<Held>>,
    taken: AtomicU64,
    /// Told each time this process takes the turn (see [`Runner::turn_taken`]).
    turn_taken: tokio::sync::Notify,
}

/// A turn this process holds.
struct Held {
    /// The guard every job commit carries.
    fence: Guard,
    epoch: u64,
    /// When this process stops acting on it unless renewed (before the stored `until`, by
    /// the time a renewal took).
    until: Instant,
}

impl Runner {
    /// A runner for a new process on `store`, whose turns last `turn` once taken or renewed;
    /// `shared`: other processes may use the store too.
    pub fn new(store: Arc<dyn Store>, turn: Duration, shared: bool) -> Arc<Self> {
        Arc::new(Self {
            store,
            me: *uuid::Uuid::new_v4().as_bytes(),
            turn,
            shared,
            held: Mutex::new(None),
            taken: AtomicU64::new(0),
            turn_taken: tokio::sync::Notify::new(),
        })
    }

    /// The guard a job's commit must carry, while this process holds the turn.
    pub fn fence(&self) -> Option<Guard> {
        let held = self.lock();
        held.as_ref()
            .filter(|h| Instant::now() < h.until)
            .map(|h| h.fence.clone())
    }

    /// The epoch of the turn this process holds, if it does.
    pub fn epoch(&self) -> Option<u64> {
        self.lock()
            .as_ref()
            .filter(|h| Instant::now() < h.until)
            .map(|h| h.epoch)
    }

    /// How often the holder renews its turn (and the others look whether it lapsed): a third
    /// of its length.
    pub fn renewal_period(&self) -> Duration {
        self.turn / 3
    }

    /// Returns once this process has taken the turn since the last call returned (at once if
    /// it did meanwhile): for the one job that must act as soon as it may (the sweep of
    /// secrets' lifecycles, which does at a start what fell due while no process could).
    pub async fn turn_taken(&self) {
        self.turn_taken.notified().await
    }

    /// Turns this process has taken since it started.
    pub fn turns_taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Renews the turn if this process holds it, takes it if it is free or has lapsed, and
    /// otherwise notes that another process holds it. True if this process holds it after.
    pub async fn step(&self) -> Result<bool, StoreError> {
        let started = Instant::now();
        let now = Time::now();
        let turn = load_meta::<Turn>(&*self.store).await?;
        let mine = turn.as_ref().is_some_and(|t| t.value.holder == self.me);
        let free = !self.shared || turn.as_ref().is_none_or(|t| t.value.until < now);
        let held_epoch = self.lock().as_ref().map(|h| h.epoch);
        if !mine && !free {
            self.release();
            return Ok(false);
        }
        // Renewing a turn this process still holds keeps its epoch (and its fence); anything
        // else is a takeover, which moves the epoch on.
        let renewing = mine && held_epoch == turn.as_ref().map(|t| t.value.epoch);
        let mut guards = vec![Guard::meta(
            MetaKey::RunnerTurn,
            turn.as_ref().map(|t| t.revision),
        )];
        let mut writes = Vec::new();
        let epoch = if renewing {
            turn.as_ref().map_or(0, |t| t.value.epoch)
        } else {
            let stored = load_meta::<Epoch>(&*self.store).await?;
            let next = stored.as_ref().map_or(0, |e| e.value.epoch) + 1;
            guards.push(Guard::meta(
                MetaKey::RunnerEpoch,
                stored.as_ref().map(|e| e.revision),
            ));
            writes.push(put_meta(&Epoch {
                holder: self.me,
                epoch: next,
            })?);
            next
        };
        writes.push(put_meta(&Turn {
            holder: self.me,
            epoch,
            until: now.plus(self.turn),
        })?);
        match self
            .store
            .commit(Transaction {
                charges: Vec::new(),
                guards,
                writes,
                audit: None,
            })
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict) => {
                // Another process renewed or took it first.
                self.release();
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        let until = started + self.turn;
        if renewing && let Some(h) = self.lock().as_mut() {
            h.until = until;
            return Ok(true);
        }
        // The fence is the epoch record as this takeover wrote it: read it back (only a later
        // takeover changes it, and then this process does not hold the turn).
        let Some(stored) = load_meta::<Epoch>(&*self.store).await? else {
            return Ok(false);
        };
        if stored.value
            != (Epoch {
                holder: self.me,
                epoch,
            })
        {
            self.release();
            return Ok(false);
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        self.turn_taken.notify_one();
        crate::metrics::global().turns_taken.inc();
        crate::metrics::global().turn_held.set(1);
        tracing::info!(epoch, "this process took the turn to run background work");
        *self.lock() = Some(Held {
            fence: stored.guard(),
            epoch,
            until,
        });
        Ok(true)
    }

    /// Notes that this process does not hold the turn.
    fn release(&self) {
        if let Some(h) = self.lock().take() {
            crate::metrics::global().turn_held.set(0);
            tracing::info!(
                epoch = h.epoch,
                "this process no longer holds the background turn"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        // Each update replaces the whole value, so a poisoned lock is consistent.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Engine, Write};

    async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Engine::default().open(dir.path()).await.unwrap()
    }

    /// A commit that only a holder of `fence` may make.
    fn fenced(fence: Guard) -> Transaction {
        Transaction {
            charges: Vec::new(),
            guards: vec![fence],
            writes: vec![Write::PutMeta(MetaKey::BootstrapAdmin, b"job".to_vec())],
            audit: None,
        }
    }

    #[tokio::test]
    async fn a_holder_renews_its_turn_without_moving_its_fence() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let runner = Runner::new(store.clone(), Duration::from_secs(30), true);
        assert!(runner.fence().is_none(), "no turn before the first step");
        assert!(runner.step().await.unwrap());
        let fence = runner.fence().unwrap();
        assert_eq!(runner.epoch(), Some(1));
        for _ in 0..3 {
            assert!(runner.step().await.unwrap());
        }
        assert_eq!((runner.epoch(), runner.turns_taken()), (Some(1), 1));
        // Renewals leave the fence as it was: a job that read it before commits after.
        store.commit(fenced(fence)).await.unwrap();
    }

    #[tokio::test]
    async fn a_lapsed_turn_is_taken_over_and_fences_out_its_old_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let turn = Duration::from_millis(400);
        let (a, b) = (
            Runner::new(store.clone(), turn, true),
            Runner::new(store.clone(), turn, true),
        );
        assert!(a.step().await.unwrap());
        let stale = a.fence().unwrap();
        assert!(!b.step().await.unwrap(), "A's turn is live");
        assert!(b.fence().is_none());
        // A stops renewing (paused, partitioned): its turn lapses and B takes it.
        tokio::time::sleep(turn + Duration::from_millis(100)).await;
        assert!(b.step().await.unwrap());
        assert_eq!(b.epoch(), Some(2));
        // A's job, still holding its old fence, cannot write; B's can.
        assert!(matches!(
            store.commit(fenced(stale)).await,
            Err(StoreError::Conflict)
        ));
        store.commit(fenced(b.fence().unwrap())).await.unwrap();
        // A learns it on its next step.
        assert!(!a.step().await.unwrap());
        assert!(a.fence().is_none());
        assert_eq!((a.turns_taken(), b.turns_taken()), (1, 1));
    }

    #[tokio::test]
    async fn on_a_store_no_other_process_shares_a_restart_takes_the_turn_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let dead = Runner::new(store.clone(), Duration::from_secs(30), false);
        assert!(dead.step().await.unwrap());
        let stale = dead.fence().unwrap();
        // The process that held it is gone (killed): its successor does not wait 30 s.
        let next = Runner::new(store.clone(), Duration::from_secs(30), false);
        assert!(next.step().await.unwrap());
        assert_eq!(next.epoch(), Some(2));
        assert!(matches!(
            store.commit(fenced(stale)).await,
            Err(StoreError::Conflict)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runners_starting_at_once_give_the_turn_to_one() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let store = store(&dir).await;
            let runners: Vec<_> = (0..4)
                .map(|_| Runner::new(store.clone(), Duration::from_secs(30), true))
                .collect();
            let mut steps = tokio::task::JoinSet::new();
            for runner in &runners {
                let runner = runner.clone();
                steps.spawn(async move { runner.step().await.unwrap() });
            }
            let held = steps.join_all().await;
            assert_eq!(held.iter().filter(|h| **h).count(), 1, "{held:?}");
            let holders = runners.iter().filter(|r| r.fence().is_some()).count();
            assert_eq!(holders, 1);
        }
    }
}
