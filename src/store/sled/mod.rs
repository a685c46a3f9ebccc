//! The sled adapter: records in one sled tree, the audit trail in segment files beside it
//! (`auditlog/`).
//!
//! Reads go straight to sled or the segment files from the calling task. Commits go to the
//! commit core (`commit.rs`), which checks guards, assigns revisions and chains the audit
//! entries, and hands each group to this adapter's `write_group`, which makes it durable:
//!
//! 1. appends the group's audit entries to the trail and `fdatasync`s it;
//! 2. applies the group's record changes to the tree as one atomic `sled::Batch`, which also
//!    records the last audit position the tree reflects (`maudit-applied`) and the largest
//!    revision assigned (`mrevision`);
//! 3. flushes sled, if any transaction of the group changed records the trail cannot replay;
//!
//! and only then lets readers see its entries (the core then answers the group's commits).
//! One append, one batch and one flush per group make many concurrent writers cost one
//! fsync of each.
//!
//! Lease changes (issuing a lease, a `Get`'s use, revoking a lease) are the exception: each
//! entry's frame carries them, so a group of them (and of audit-only entries) is durable with
//! step 1. The writer keeps them in memory (`leases.rs`: readers and guards look there first)
//! and writes them to the tree at a checkpoint: with the next group that is flushed anyway,
//! once 1,024 are kept, and at close, marking the position through which the tree holds every
//! lease change (`mleases-through`). Such a group writes only the revision counter and the
//! position to the tree, and is not flushed. The tree holds a lease under its token's hash
//! only; `leases.rs` keeps every lease's id and expiry in memory. The secrets' use is kept
//! the same way as lease changes (`activity.rs`).
//!
//! After a crash, the trail may hold entries of a group whose records sled lost (step 1 done,
//! step 2 or 3 not): none of them was answered. `open` keeps the audit-only entries after the
//! position sled recorded and cuts the trail at the first entry whose transaction changed
//! records (flagged in its frame), since everything from there on belongs to unanswered
//! groups; it applies again the lease changes of every entry after the lease position.
//!
//! The audit indexes live with the trail (`auditindex.rs`: one per segment, derived from its
//! entries), not in sled.
//!
//! The writer calls the blocking `Db::flush`, never `flush_async`: concurrent `flush_async`
//! calls deadlock in sled 0.34 (sled issue #1308).

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::{broadcast, oneshot};

use super::auditindex;
use super::auditlog::{self, AuditLog, Frame};
use super::codec::{self, encode};
use super::commit::{Change, Committer, Position};
use super::{
    AuditFilter, AuditIndex, AuditPage, Committed, DayQuery, DayRow, ExportSink, ImportSource,
    MetaKey, MetaValue, Record, Redemption, SecretActivity, Store, StoreError, TrailDamage,
    Transaction, Usage, UsageKey, query,
};
use crate::chain::ChainKey;
use crate::model::{
    AuditAnchor, AuditRecord, EnvelopeRecord, LeaseId, LeaseRecord, Revision, SecretId, SecretName,
    SecretRecord, TenantId, Time, TokenHash,
};

mod activity;
mod cache;
mod leases;
mod migrations;
mod recovery;
mod writer;

use self::migrations::{migrate_legacy_entries, remove_keyspaces};
use self::recovery::{
    anchor, applied_position, check_trail_start, count_usage, expected_first, meta_revision,
    meta_value, recover_trail, stored_revision,
};
use self::writer::{Pending, SledAdapter, batch_of, stage, stage_lease};

/// A store in a sled database directory.
pub struct SledStore {
    tree: sled::Tree,
    /// Odd while the writer applies a group to the tree (see [`SledAdapter::writes`]).
    writes: Arc<AtomicU64>,
    committer: Committer<SledAdapter>,
    db: sled::Db,
    log: Arc<AuditLog>,
    /// Tells the scrub of the sealed segments (a thread started at open) to stop.
    stop_scrub: Arc<AtomicBool>,
    /// What each tenant holds (see [`SledAdapter::usage`]).
    usage: SharedUsage,
    /// The secrets' use not yet written to the tree (see `activity.rs`).
    unwritten: activity::SharedUnwritten,
    /// The lease changes not yet written to the tree (see `leases.rs`).
    leases: leases::SharedOverlay,
    /// Secrets and envelopes as read (see `cache.rs`).
    cache: cache::SharedCache,
}

/// The usage of the records, counted at open and kept by the writer as groups are written.
type SharedUsage = Arc<std::sync::Mutex<HashMap<UsageKey, Usage>>>;

/// How long `open` waits for a directory lock that is being released: sled's I/O threads
/// can outlive the handle that was just dropped by a moment (reopening in one process).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// sled's page cache by default, in bytes (sled's own default is 1 GiB).
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
        {
            // sled reports a held lock as an `Other` error with this message.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other.map_err(engine),
        }
    }
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// The audit trail's directory inside the store's.
const AUDIT_DIR: &str = "audit";

/// The index keys of a stored audit record, for the trail's indexes (none if it does not
/// decode: reading it reports the damage).
fn indexer() -> auditindex::Indexer {
    Arc::new(
        |payload: &[u8]| match codec::decode::<AuditRecord>(&codec::audit_key(0), payload) {
            Ok(record) => codec::audit_index_prefixes(&record),
            Err(_) => Vec::new(),
        },
    )
}

/// Where a stopped server's audit trail is damaged, and what a repair would end.
#[derive(Debug, Clone)]
pub struct RepairPlan {
    /// The first damage.
    pub damage: TrailDamage,
    /// Leases outstanding: a repair ends them all.
    pub leases: u64,
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. sled locks the directory: a second process
    /// cannot open it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, DEFAULT_CACHE_BYTES, auditlog::DEFAULT_SEGMENT_BYTES)
    }

    /// Opens (or creates) the database in `dir` with a page cache of `cache_bytes` and audit
    /// segments of `segment_bytes` (`[store]` in the config; small ones let tests cross
    /// segments).
    pub fn open_with(dir: &Path, cache_bytes: u64, segment_bytes: u64) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        let db = open_db(dir, cache_bytes)?;
        let tree = db.open_tree("byokd").map_err(engine)?;
        let sled_opened = started.elapsed();
        // Entries the records reflect were acknowledged: a bad frame among them is damage,
        // not a write a crash tore.
        let log = Arc::new(AuditLog::open_acknowledged(
            &dir.join(AUDIT_DIR),
            segment_bytes,
            indexer(),
            applied_position(&tree)?,
        )?);
        let trail_opened = started.elapsed();
        migrate_legacy_entries(&db, &tree, &log)?;
        remove_keyspaces(
            &db,
            &tree,
            &codec::LEGACY_INDEX_SPACES,
            "removed audit index keys the trail's own indexes replace",
        )?;
        remove_keyspaces(
            &db,
            &tree,
            &codec::LEGACY_LEASE_INDEX_SPACES,
            "removed lease index keys the indexes in memory replace",
        )?;
        let anchor = anchor(&tree)?;
        check_trail_start(&log, anchor.as_ref())?;
        let applied = applied_position(&tree)?;
        recover_trail(&db, &tree, &log, applied)?;
        activity::catch_up(&db, &tree, &log)?;
        // What the trail holds after recovery is on disk: readers may see all of it.
        if let Some(last) = log.last_position()? {
            log.publish(last);
        }
        if let Some(anchor) = &anchor {
            // A prune whose segments were not deleted before a crash.
            log.set_start(anchor.seq.saturating_add(1));
            log.delete_through(anchor.seq)?;
        }
        tracing::info!(
            sled_ms = sled_opened.as_millis() as u64,
            trail_ms = (trail_opened - sled_opened).as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "store opened"
        );
        let head = log.head()?.as_ref().map(decode_frame).transpose()?;
        let mut position = Position::after(head.as_ref(), anchor.as_ref(), stored_revision(&tree)?);
        // The trail could end before what a tampered or damaged store's records reflect; the
        // sequence goes on after its last entry (and verification against a recorded head
        // tells the difference).
        position.next_seq = position.next_seq.max(log.next_position()?);
        let writes = Arc::new(AtomicU64::new(0));
        let counting = std::time::Instant::now();
        let mut indexed = leases::Overlay::default();
        let counted = count_usage(&tree, &mut indexed)?;
        tracing::info!(
            tenants = counted.len().saturating_sub(1),
            leases = indexed.leases(),
            ms = counting.elapsed().as_millis() as u64,
            "tenant usage counted, leases indexed"
        );
        let usage: SharedUsage = Arc::new(std::sync::Mutex::new(counted));
        let unwritten = activity::SharedUnwritten::default();
        let leases = Arc::new(std::sync::RwLock::new(indexed));
        let cache = cache::SharedCache::default();
        let adapter = SledAdapter {
            db: db.clone(),
            tree: tree.clone(),
            log: log.clone(),
            writes: writes.clone(),
            usage: usage.clone(),
            unwritten: unwritten.clone(),
            leases: leases.clone(),
            cache: cache.clone(),
        };
        let store = Self {
            tree,
            writes,
            committer: Committer::start(adapter, position)?,
            db,
            log,
            stop_scrub: Arc::new(AtomicBool::new(false)),
            usage,
            unwritten,
            leases,
            cache,
        };
        store.start_scrub();
        Ok(store)
    }

    /// Reads the sealed segments whole on a thread of their own (open only checks their
    /// ends): damage found there stops writes, as damage found by any reader does.
    fn start_scrub(&self) {
        let (log, stop) = (self.log.clone(), self.stop_scrub.clone());
        let spawned = std::thread::Builder::new()
            .name("byokd-audit-scrub".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                match log.scrub(&stop) {
                    Ok(None) => tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        "audit trail scrubbed"
                    ),
                    // Logged where it was marked.
                    Ok(Some(_)) => {}
                    Err(e) => tracing::error!(error = %e, "could not scrub the audit trail"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the audit trail's scrub");
        }
    }

    /// For `byokd audit repair`, on a stopped server's store: reads the whole audit trail and
    /// says where it is damaged, if it is, and how many leases a repair would end.
    pub fn plan_repair(dir: &Path) -> Result<Option<RepairPlan>, StoreError> {
        let db = open_db(dir, DEFAULT_CACHE_BYTES)?;
        let tree = db.open_tree("byokd").map_err(engine)?;
        let anchor = anchor(&tree)?;
        let applied = applied_position(&tree)?;
        let damage = AuditLog::find_damage(
            &dir.join(AUDIT_DIR),
            expected_first(anchor.as_ref()),
            applied,
        )?;
        Ok(damage.map(|damage| RepairPlan {
            damage,
            leases: tree.scan_prefix([codec::LEASE]).count() as u64,
        }))
    }

    /// For `byokd audit repair`, on a stopped server's store: cuts the audit trail before
    /// the damage `plan` names, keeping copies of the files it changes in `quarantine`.
    /// First, in one flushed batch: every lease ends (a use recorded only in a lost entry
    /// must not be redeemable again), the records stop claiming the lost entries, and `note`
    /// is kept as the pending repair (the server refuses to start until the `Repair` entry
    /// that records it is in the trail). Safe to run again after a crash.
    pub fn apply_repair(
        dir: &Path,
        plan: &RepairPlan,
        quarantine: &Path,
        note: &str,
    ) -> Result<Vec<std::path::PathBuf>, StoreError> {
        {
            let db = open_db(dir, DEFAULT_CACHE_BYTES)?;
            let tree = db.open_tree("byokd").map_err(engine)?;
            let mut pending = Pending::new();
            // The secrets' use is counted again from the trail as cut at the next open.
            pending.insert(codec::ACTIVITY_THROUGH_META.to_vec(), None);
            stage_removal(
                &tree,
                &[
                    codec::LEASE,
                    codec::LEASE_ID,
                    codec::LEASE_EXPIRY,
                    codec::ACTIVITY,
                    codec::ACTIVITY_DAY,
                ],
                &mut pending,
            )?;
            let kept = plan.damage.first_lost.saturating_sub(1);
            if applied_position(&tree)? > kept {
                pending.insert(
                    codec::AUDIT_APPLIED_META.to_vec(),
                    Some(kept.to_be_bytes().to_vec()),
                );
            }
            // Every lease ended: none of the trail's lease changes is applied again.
            pending.insert(
                codec::LEASES_THROUGH_META.to_vec(),
                Some(kept.to_be_bytes().to_vec()),
            );
            // Written as a commit would write it: with a new revision.
            let revision = Revision(stored_revision(&tree)?.0 + 1);
            let note = super::RepairNote(note.to_string()).to_bytes()?;
            stage(
                &Change::Meta(MetaKey::RepairPending, revision, note),
                &mut pending,
            )?;
            pending.insert(
                codec::REVISION_META.to_vec(),
                Some(revision.0.to_be_bytes().to_vec()),
            );
            tree.apply_batch(batch_of(&pending)).map_err(engine)?;
            db.flush().map_err(engine)?;
        }
        AuditLog::cut_before(&dir.join(AUDIT_DIR), plan.damage.first_lost, quarantine)
    }

    /// A lease: as kept in memory since the last checkpoint, else as the tree holds it.
    fn lease(&self, hash: &TokenHash) -> Result<Option<LeaseRecord>, StoreError> {
        match leases::read(&self.leases).lease(hash) {
            leases::Found::Is(lease) => Ok(Some(lease.clone())),
            leases::Found::Gone => Ok(None),
            leases::Found::InTree => self.get(&codec::lease_key(hash)),
        }
    }

    fn get<T: codec::Revisioned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.cache.read(&self.tree, &self.writes, key)? {
            Some(bytes) => codec::decode_record(key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Overwrites a secret's stored record with arbitrary bytes, bypassing the writer. Only for
    /// tests of how byokd handles a corrupted record on a stopped server's data.
    pub fn danger_overwrite_secret_bytes(
        &self,
        tenant: &TenantId,
        name: &SecretName,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.tree
            .insert(codec::secret_key(tenant, name), bytes)
            .map_err(engine)?;
        self.cache.clear();
        self.tree.flush().map(drop).map_err(engine)
    }

    /// Sets the last audit position the records claim to reflect, in a stopped server's store.
    /// Only for tests of what an attacker who edits the records too can hide.
    pub fn danger_set_applied_position(dir: &Path, position: u64) -> Result<(), StoreError> {
        let db = open_db(dir, DEFAULT_CACHE_BYTES)?;
        let tree = db.open_tree("byokd").map_err(engine)?;
        tree.insert(codec::AUDIT_APPLIED_META, &position.to_be_bytes())
            .map_err(engine)?;
        db.flush().map(drop).map_err(engine)
    }

    /// Deletes every lease from a stopped server's tree and sets the position through which
    /// the tree holds lease changes to `mark`, as a crash would leave a store whose lease
    /// changes since `mark` were kept in memory. Only for tests of how they are applied again.
    pub fn danger_forget_leases(dir: &Path, mark: u64) -> Result<(), StoreError> {
        let db = open_db(dir, DEFAULT_CACHE_BYTES)?;
        let tree = db.open_tree("byokd").map_err(engine)?;
        let mut pending = Pending::new();
        stage_removal(
            &tree,
            &[codec::LEASE, codec::LEASE_ID, codec::LEASE_EXPIRY],
            &mut pending,
        )?;
        pending.insert(
            codec::LEASES_THROUGH_META.to_vec(),
            Some(mark.to_be_bytes().to_vec()),
        );
        tree.apply_batch(batch_of(&pending)).map_err(engine)?;
        db.flush().map(drop).map_err(engine)
    }

    /// Sets the mark of the last entry the secrets' use counts in a stopped server's store
    /// (`None`: no mark) and, if `forget_rows`, deletes the rows, as a crash that lost them,
    /// or a store made before they were kept, would leave it. Only for tests of how they are
    /// counted again.
    pub fn danger_forget_activity(
        dir: &Path,
        forget_rows: bool,
        mark: Option<u64>,
    ) -> Result<(), StoreError> {
        let db = open_db(dir, DEFAULT_CACHE_BYTES)?;
        let tree = db.open_tree("byokd").map_err(engine)?;
        let mut pending = Pending::new();
        if forget_rows {
            stage_removal(&tree, &[codec::ACTIVITY, codec::ACTIVITY_DAY], &mut pending)?;
        }
        pending.insert(
            codec::ACTIVITY_THROUGH_META.to_vec(),
            mark.map(|m| m.to_be_bytes().to_vec()),
        );
        tree.apply_batch(batch_of(&pending)).map_err(engine)?;
        db.flush().map(drop).map_err(engine)
    }

    /// Writes an audit entry directly, bypassing the writer, its chain and its indexes, or
    /// deletes it (`None`). Only for tests that tamper with a stopped server's data: it breaks
    /// the audit chain by design.
    pub fn danger_overwrite_audit_entry(
        &self,
        seq: u64,
        record: Option<&AuditRecord>,
    ) -> Result<(), StoreError> {
        match record {
            Some(r) => self.log.rewrite(seq, Some(&encode(r)?)),
            None => self.log.rewrite(seq, None),
        }
    }
}

/// Stages the removal of every key in the keyspaces `prefixes` (on a stopped server's tree).
fn stage_removal(
    tree: &sled::Tree,
    prefixes: &[u8],
    pending: &mut Pending,
) -> Result<(), StoreError> {
    for prefix in prefixes {
        for entry in tree.scan_prefix([*prefix]) {
            pending.insert(entry.map_err(engine)?.0.to_vec(), None);
        }
    }
    Ok(())
}

fn decode_frame(frame: &Frame) -> Result<AuditRecord, StoreError> {
    codec::decode(&codec::audit_key(frame.position), &frame.payload)
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn secret(
        &self,
        tenant: &TenantId,
        name: &SecretName,
    ) -> Result<Option<SecretRecord>, StoreError> {
        self.get(&codec::secret_key(tenant, name))
    }

    async fn list_secrets(
        &self,
        tenant: &TenantId,
        after: Option<&SecretName>,
        limit: usize,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let prefix = codec::secret_prefix(tenant);
        let start = match after {
            Some(name) => Bound::Excluded(codec::secret_key(tenant, name)),
            None => Bound::Included(prefix.clone()),
        };
        let mut out = Vec::new();
        for entry in self.tree.range((start, Bound::Unbounded)) {
            let (key, value) = entry.map_err(engine)?;
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(codec::decode_record(&key, &value)?);
        }
        Ok(out)
    }

    async fn all_secrets(
        &self,
        after: Option<(&TenantId, &SecretName)>,
        limit: usize,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let start = match after {
            Some((tenant, name)) => Bound::Excluded(codec::secret_key(tenant, name)),
            None => Bound::Included(vec![codec::SECRET]),
        };
        let mut out = Vec::new();
        for entry in self.tree.range((start, Bound::Unbounded)) {
            let (key, value) = entry.map_err(engine)?;
            if key.first() != Some(&codec::SECRET) || out.len() >= limit {
                break;
            }
            out.push(codec::decode_record(&key, &value)?);
        }
        Ok(out)
    }

    async fn envelope(
        &self,
        secret_id: SecretId,
        version: u32,
    ) -> Result<Option<EnvelopeRecord>, StoreError> {
        self.get(&codec::envelope_key(secret_id, version))
    }

    async fn envelopes_after(
        &self,
        after: Option<(SecretId, u32)>,
        limit: usize,
    ) -> Result<Vec<EnvelopeRecord>, StoreError> {
        let start = match after {
            Some((id, version)) => Bound::Excluded(codec::envelope_key(id, version)),
            None => Bound::Included(vec![codec::ENVELOPE]),
        };
        let mut out = Vec::new();
        for entry in self.tree.range((start, Bound::Unbounded)) {
            let (key, value) = entry.map_err(engine)?;
            if key.first() != Some(&codec::ENVELOPE) || out.len() >= limit {
                break;
            }
            out.push(codec::decode_record(&key, &value)?);
        }
        Ok(out)
    }

    async fn envelope_count(&self) -> Result<u64, StoreError> {
        let mut count = 0;
        for entry in self.tree.scan_prefix([codec::ENVELOPE]) {
            entry.map_err(engine)?;
            count += 1;
        }
        Ok(count)
    }

    async fn lease_by_token(
        &self,
        token_hash: &TokenHash,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        self.lease(token_hash)
    }

    async fn lease_by_id(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        let hash = leases::read(&self.leases).hash_of(id);
        match hash {
            Some(hash) => self.lease(&hash),
            None => Ok(None),
        }
    }

    async fn redemption(&self, token_hash: &TokenHash) -> Result<Option<Redemption>, StoreError> {
        // One state: no group was written to the tree (or the leases kept in memory) between
        // the first read and the last.
        loop {
            let before = self.writes.load(Ordering::Acquire);
            if before % 2 == 1 {
                tokio::task::yield_now().await;
                continue;
            }
            let Some(lease) = self.lease(token_hash)? else {
                return Ok(None);
            };
            let secret =
                self.get::<SecretRecord>(&codec::secret_key(&lease.tenant, &lease.name))?;
            let envelope = match &secret {
                Some(s) => self.get(&codec::envelope_key(s.id, s.version))?,
                None => None,
            };
            if self.writes.load(Ordering::Acquire) == before {
                return Ok(Some(Redemption {
                    lease,
                    secret,
                    envelope,
                }));
            }
        }
    }

    async fn expired_leases(
        &self,
        now: Time,
        limit: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let expired = leases::read(&self.leases).expired(now, limit);
        let mut out = Vec::with_capacity(expired.len());
        for hash in expired {
            // Deleted meanwhile: not expired any more.
            if let Some(lease) = self.lease(&hash)? {
                out.push(lease);
            }
        }
        Ok(out)
    }

    async fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.log
            .read(from, limit, false)?
            .iter()
            .map(decode_frame)
            .collect()
    }

    async fn audit_entry(&self, seq: u64) -> Result<Option<AuditRecord>, StoreError> {
        match self.log.read(seq, 1, false)?.first() {
            Some(frame) if frame.position == seq => decode_frame(frame).map(Some),
            _ => Ok(None),
        }
    }

    async fn audit_head(&self) -> Result<Option<AuditRecord>, StoreError> {
        self.log.head()?.as_ref().map(decode_frame).transpose()
    }

    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        anchor(&self.tree)
    }

    async fn audit_index(
        &self,
        index: &AuditIndex,
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        self.log
            .lookup(&codec::audit_index_prefix(index), from, limit)
    }

    async fn audit_query(
        &self,
        filter: &AuditFilter,
        from: u64,
        until_seq: u64,
        page_size: usize,
    ) -> Result<AuditPage, StoreError> {
        query::walk(self, filter, from, until_seq, page_size).await
    }

    fn durable_audit_seq(&self) -> u64 {
        self.committer.status().durable_seq()
    }

    fn subscribe_audit(&self) -> broadcast::Receiver<Arc<AuditRecord>> {
        self.committer.status().subscribe()
    }

    async fn meta(&self, key: MetaKey) -> Result<Option<(Revision, Vec<u8>)>, StoreError> {
        Ok(meta_value(&self.tree, key)?.map(|(revision, value)| (revision, value.to_vec())))
    }

    async fn start_audit_chain(&self, key: Arc<ChainKey>) -> Result<(), StoreError> {
        self.committer.start_chain(key).await
    }

    async fn commit(&self, tx: Transaction) -> Result<Committed, StoreError> {
        self.committer.commit(tx).await
    }

    async fn usage(&self, key: &UsageKey) -> Result<Usage, StoreError> {
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        Ok(usage.get(key).copied().unwrap_or_default())
    }

    async fn activity(&self, ids: &[SecretId]) -> Result<Vec<SecretActivity>, StoreError> {
        activity::read(&self.tree, &self.unwritten, ids)
    }

    async fn activity_days(&self, query: &DayQuery) -> Result<Vec<DayRow>, StoreError> {
        activity::days(&self.tree, &self.unwritten, query)
    }

    async fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk().map_err(engine)? + self.log.size_on_disk()?)
    }

    fn writable(&self) -> bool {
        self.committer.status().writable() && self.log.damage().is_none()
    }

    fn failed_for_good(&self) -> bool {
        self.committer.status().failed_for_good()
    }

    async fn export(&self, sink: ExportSink) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.committer
            .between(Box::new(move |adapter: &mut SledAdapter| {
                let _ = reply.send(adapter.export(sink));
            }))
            .await?;
        let exported = answer.await.map_err(|_| StoreError::Closed)??;
        let Some((first, last)) = exported.trail else {
            return Ok(exported.count);
        };
        // The trail up to the head of that moment is append-only: read without holding
        // writes, so that a backup holds them for a time that does not grow with the trail.
        let log = self.log.clone();
        let mut sink = exported.sink;
        let trail = tokio::task::spawn_blocking(move || {
            let mut count = 0;
            let mut from = first;
            while from <= last {
                let frames = log.read(from, 4096, true)?;
                if frames.first().map(|f| f.position) != Some(from) {
                    return Err(StoreError::Export(format!(
                        "audit entry {from} is gone (pruned by retention during the backup?); retry"
                    )));
                }
                for frame in frames.iter().take_while(|f| f.position <= last) {
                    sink(Record::Audit(decode_frame(frame)?)).map_err(StoreError::Export)?;
                    count += 1;
                    from = frame.position + 1;
                }
                if frames.last().is_some_and(|f| f.position >= last) {
                    break;
                }
            }
            Ok(count)
        })
        .await
        .map_err(|e| StoreError::Engine(format!("export task: {e}")))??;
        Ok(exported.count + trail)
    }

    async fn import(&self, source: ImportSource) -> Result<u64, StoreError> {
        self.committer.import(source).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.stop_scrub.store(true, Ordering::Release);
        self.committer.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::migrations::plain_frame;
    use super::writer::lease_redo;
    use super::*;
    use crate::store::auditlog::NewFrame;
    use crate::store::tests::{chain_key, check_indexes_against_entries, varied_draft};

    /// The index keys stores kept in the tree per entry before posting blocks: index prefix
    /// and the entry's seq.
    fn per_entry_index_keys(record: &AuditRecord) -> Vec<Vec<u8>> {
        codec::audit_index_prefixes(record)
            .into_iter()
            .map(|mut key| {
                key.extend_from_slice(&record.seq.to_be_bytes());
                key
            })
            .collect()
    }

    /// Index keys that older stores kept in the tree (per entry, or posting blocks) are
    /// removed at open; queries answer from the trail's own indexes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn index_keys_kept_in_the_tree_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        for i in 0..300 {
            store
                .commit(Transaction::audit_only(varied_draft(i)))
                .await
                .unwrap();
        }
        for record in store.audit_entries(0, usize::MAX).await.unwrap() {
            for key in per_entry_index_keys(&record) {
                store.tree.insert(key, Vec::new()).unwrap();
            }
        }
        store
            .tree
            .insert([codec::AUDIT_POSTINGS, 1, 2], vec![1, 0])
            .unwrap();
        store.close().await.unwrap();
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        for space in codec::LEGACY_INDEX_SPACES {
            assert!(store.tree.scan_prefix([space]).next().is_none());
        }
        check_indexes_against_entries(&store).await;
        store.close().await.unwrap();
    }

    fn get_draft(n: u64) -> crate::model::AuditDraft {
        let mut d = varied_draft(n);
        d.reason = format!("entry {n}");
        d
    }

    /// A frame as the writer stores it, for `seq`, chained after `prev`.
    fn frame_bytes(prev: &AuditRecord, n: u64) -> (AuditRecord, Vec<u8>) {
        let entry = get_draft(n);
        let seq = prev.seq + 1;
        let time = prev.time;
        let record = AuditRecord {
            seq,
            time,
            hash: chain_key().link(&prev.hash, seq, time, &entry),
            prev_hash: prev.hash,
            entry,
        };
        let bytes = encode(&record).unwrap();
        (record, bytes)
    }

    /// After a crash between a group's append to the trail and its records reaching sled,
    /// reopening keeps the audit-only entries after what sled reflects and cuts the trail
    /// at the first entry whose records sled does not hold: nothing from there on was answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_whose_records_were_lost_are_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        for i in 0..5 {
            store
                .commit(Transaction::audit_only(get_draft(i)))
                .await
                .unwrap();
        }
        let head = store.audit_head().await.unwrap().unwrap();
        assert_eq!(applied_position(&store.tree).unwrap(), head.seq);
        // What a crash can leave: an answered audit-only entry, then a group whose records
        // sled lost (a state-bearing entry and an audit-only one after it).
        let (a, a_bytes) = frame_bytes(&head, 100);
        let (b, b_bytes) = frame_bytes(&a, 101);
        let (c, c_bytes) = frame_bytes(&b, 102);
        store
            .log
            .append(&[
                plain_frame(a.seq, &a_bytes),
                NewFrame {
                    flags: auditlog::STATE_BEARING,
                    ..plain_frame(b.seq, &b_bytes)
                },
                plain_frame(c.seq, &c_bytes),
            ])
            .unwrap();
        store.log.sync().unwrap();
        store.close().await.unwrap();
        drop(store);

        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.audit_head().await.unwrap(), Some(a.clone()));
        assert_eq!(store.durable_audit_seq(), a.seq);
        store.start_audit_chain(chain_key()).await.unwrap();
        let next = store
            .commit(Transaction::audit_only(get_draft(7)))
            .await
            .unwrap();
        assert_eq!(next.audit_seq, Some(b.seq));
        let all = store.audit_entries(0, usize::MAX).await.unwrap();
        assert!(all.windows(2).all(|w| w[1].prev_hash == w[0].hash));
        assert_eq!(all.len(), 7);
        store.close().await.unwrap();
    }

    /// A store whose audit trail starts a new segment every few entries.
    async fn small_segment_store(dir: &Path) -> SledStore {
        let store = SledStore::open_with(dir, DEFAULT_CACHE_BYTES, 2048).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        store
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_fails_before_it_wrote_anything_is_retried_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = small_segment_store(dir.path()).await;
        let mut n = 0;
        while n < 20 {
            store
                .commit(Transaction::audit_only(get_draft(n)))
                .await
                .unwrap();
            n += 1;
        }
        let next = store.log.next_position().unwrap();
        let mut blocked = false;
        for _ in 0..100 {
            // The segment file for whichever append comes next cannot be created (as when
            // no file descriptor is left).
            let blocker = dir
                .path()
                .join(AUDIT_DIR)
                .join(format!("{:020}.log", store.log.next_position().unwrap()));
            std::fs::create_dir(&blocker).unwrap();
            let result = store.commit(Transaction::audit_only(get_draft(n))).await;
            std::fs::remove_dir(&blocker).unwrap();
            n += 1;
            match result {
                Ok(_) => continue,
                Err(e) => {
                    assert!(matches!(e, StoreError::Transient(_)), "{e}");
                    assert!(e.is_unavailable());
                    blocked = true;
                    break;
                }
            }
        }
        assert!(blocked, "no append started a segment");
        assert!(!store.writable(), "refusing while the cause lasts");
        assert!(!store.failed_for_good());
        // The cause is gone: the next commit goes through and the chain has no gap.
        let committed = store
            .commit(Transaction::audit_only(get_draft(n)))
            .await
            .unwrap();
        assert!(store.writable());
        let all = store.audit_entries(0, usize::MAX).await.unwrap();
        assert_eq!(all.last().map(|r| r.seq), committed.audit_seq);
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert!(all.windows(2).all(|w| w[1].prev_hash == w[0].hash));
        assert!(all.len() as u64 >= next);
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trail_shorter_than_the_records_reflect_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = small_segment_store(dir.path()).await;
        for i in 0..40 {
            store
                .commit(Transaction::audit_only(get_draft(i)))
                .await
                .unwrap();
        }
        store.close().await.unwrap();
        drop(store);
        // The last segment deleted: the trail ends before what the records reflect.
        let audit = dir.path().join(AUDIT_DIR);
        let last = auditlog::tests::segment_files(&audit)
            .pop()
            .expect("a segment");
        std::fs::remove_file(&last).unwrap();
        let error = SledStore::open_with(dir.path(), DEFAULT_CACHE_BYTES, 2048)
            .err()
            .expect("refused");
        let StoreError::TrailDamaged(damage) = &error else {
            panic!("{error}");
        };
        assert!(
            damage
                .reason
                .contains("the records reflect entries through 40"),
            "{damage}"
        );
        // The repair finds the same and cuts nothing more than the missing tail.
        let plan = SledStore::plan_repair(dir.path()).unwrap().expect("damage");
        assert_eq!(plan.damage.first_lost, damage.first_lost);
        SledStore::apply_repair(dir.path(), &plan, &dir.path().join("q"), "test repair").unwrap();
        let store = SledStore::open_with(dir.path(), DEFAULT_CACHE_BYTES, 2048).unwrap();
        assert_eq!(
            super::super::load_meta::<super::super::RepairNote>(&store)
                .await
                .unwrap()
                .map(|note| note.value),
            Some(super::super::RepairNote("test repair".into()))
        );
        assert_eq!(
            store.audit_head().await.unwrap().map(|h| h.seq + 1),
            Some(damage.first_lost)
        );
        store.close().await.unwrap();
    }

    fn lease_record(hash: u8, uses: u32) -> LeaseRecord {
        LeaseRecord {
            id: crate::model::LeaseId::generate(),
            token_hash: TokenHash([hash; 32]),
            secret_id: crate::model::SecretId::generate(),
            tenant: TenantId::parse("t").unwrap(),
            name: SecretName::parse("n").unwrap(),
            version: 1,
            issued_to: crate::model::PrincipalId::parse("p").unwrap(),
            audience: None,
            created_at: Time::from_micros(0),
            expires_at: Time::from_micros(i64::MAX),
            max_uses: 3,
            uses,
            revoked: false,
            rev: Default::default(),
        }
    }

    /// Lease changes travel in their entries' frames: when sled lost their batch (no flush is
    /// waited for them), open applies them again from the trail, up to the first entry whose
    /// other record changes sled lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_changes_lost_with_a_batch_are_applied_again_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        let issued = lease_record(7, 0);
        store
            .commit(Transaction {
                writes: vec![super::super::Write::PutLease(issued.clone())],
                audit: Some(get_draft(0)),
                ..Default::default()
            })
            .await
            .unwrap();
        let head = store.audit_head().await.unwrap().unwrap();
        // What sled may lose: a use of that lease, a new lease, then a group with a change
        // the trail cannot replay.
        // Revisions past the stored counter: the group that assigned them is lost with it.
        let mut used = issued.clone();
        used.uses = 1;
        used.rev = Revision(40);
        let mut new = lease_record(8, 0);
        new.rev = Revision(41);
        let (a, a_bytes) = frame_bytes(&head, 1);
        let (b, b_bytes) = frame_bytes(&a, 2);
        let (c, c_bytes) = frame_bytes(&b, 3);
        let use_redo = lease_redo(&[Change::UpdateLease(used.clone())]).unwrap();
        let new_redo = lease_redo(&[Change::NewLease(new.clone())]).unwrap();
        let replayable = auditlog::STATE_BEARING | auditlog::REPLAYABLE;
        store
            .log
            .append(&[
                NewFrame {
                    flags: replayable,
                    redo: &use_redo,
                    ..plain_frame(a.seq, &a_bytes)
                },
                NewFrame {
                    flags: replayable,
                    redo: &new_redo,
                    ..plain_frame(b.seq, &b_bytes)
                },
                NewFrame {
                    flags: auditlog::STATE_BEARING,
                    ..plain_frame(c.seq, &c_bytes)
                },
            ])
            .unwrap();
        store.log.sync().unwrap();
        store.close().await.unwrap();
        drop(store);

        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            store.lease_by_token(&issued.token_hash).await.unwrap(),
            Some(used.clone())
        );
        assert_eq!(store.lease_by_id(new.id).await.unwrap(), Some(new.clone()));
        assert_eq!(store.audit_head().await.unwrap(), Some(b));
        assert_eq!(applied_position(&store.tree).unwrap(), a.seq + 1);
        // Revisions go on after the replayed ones: none is assigned twice.
        store.start_audit_chain(chain_key()).await.unwrap();
        let mut again = used.clone();
        again.uses = 2;
        store
            .commit(Transaction {
                writes: vec![super::super::Write::UpdateLease(again)],
                ..Default::default()
            })
            .await
            .unwrap();
        let stored = store
            .lease_by_token(&issued.token_hash)
            .await
            .unwrap()
            .unwrap();
        assert!(stored.rev > new.rev, "{:?}", stored.rev);
        store.close().await.unwrap();
    }

    fn distinct_hash(i: usize) -> [u8; 32] {
        let mut hash = [0xa5; 32];
        hash[..8].copy_from_slice(&(i as u64).to_be_bytes());
        hash
    }

    /// The leases' id and expiry indexes are in memory, for every lease: those the last
    /// checkpoint wrote to the tree as well as those kept since, and after reopening. Index
    /// keys that older stores kept in the tree are removed at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_are_indexed_across_checkpoints_reopening_and_older_stores() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        // More than a checkpoint's worth, expiring in turn: the first ones are in the tree.
        let count = leases::CHECKPOINT_CHANGES + 100;
        let issued: Vec<LeaseRecord> = (0..count)
            .map(|i| LeaseRecord {
                token_hash: TokenHash(distinct_hash(i)),
                expires_at: Time::from_micros(1_000 + i as i64),
                ..lease_record(0, 0)
            })
            .collect();
        for lease in &issued {
            store
                .commit(Transaction {
                    writes: vec![super::super::Write::PutLease(lease.clone())],
                    audit: Some(get_draft(0)),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        assert!(leases::read(&store.leases).len() < count, "no checkpoint");
        let gone = store
            .lease_by_token(&issued[1].token_hash)
            .await
            .unwrap()
            .unwrap();
        store
            .commit(Transaction {
                writes: vec![super::super::Write::DeleteLease(gone)],
                ..Default::default()
            })
            .await
            .unwrap();
        async fn check(store: &SledStore, issued: &[LeaseRecord]) {
            for i in [0, 2, issued.len() - 1] {
                let found = store.lease_by_id(issued[i].id).await.unwrap();
                assert_eq!(found.map(|l| l.token_hash), Some(issued[i].token_hash));
            }
            assert_eq!(store.lease_by_id(issued[1].id).await.unwrap(), None);
            let expired = |micros, limit| store.expired_leases(Time::from_micros(micros), limit);
            let hashes = |leases: Vec<LeaseRecord>| -> Vec<TokenHash> {
                leases.into_iter().map(|l| l.token_hash).collect()
            };
            assert_eq!(
                hashes(expired(1_003, 10).await.unwrap()),
                [issued[0].token_hash, issued[2].token_hash]
            );
            let all = expired(i64::MAX, usize::MAX).await.unwrap();
            assert_eq!(all.len(), issued.len() - 1);
            assert_eq!(all[0].token_hash, issued[0].token_hash);
            assert_eq!(
                all[all.len() - 1].token_hash,
                issued[issued.len() - 1].token_hash
            );
            assert!(all.windows(2).all(|w| w[0].expires_at < w[1].expires_at));
        }
        check(&store, &issued).await;
        // An older store's index keys (an id's and an expiry's) beside the leases.
        let first = &issued[0];
        let mut id_key = vec![codec::LEASE_ID];
        id_key.extend_from_slice(first.id.as_bytes());
        let mut expiry_key = vec![codec::LEASE_EXPIRY];
        expiry_key.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0x03, 0xe8]);
        expiry_key.extend_from_slice(&first.token_hash.0);
        store.tree.insert(id_key, &first.token_hash.0).unwrap();
        store.tree.insert(expiry_key, vec![]).unwrap();
        store.close().await.unwrap();
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        for space in codec::LEGACY_LEASE_INDEX_SPACES {
            assert!(store.tree.scan_prefix([space]).next().is_none());
        }
        check(&store, &issued).await;
        store.close().await.unwrap();
    }

    /// A store that kept its audit entries in the tree (before the trail had its own files)
    /// has them moved into the trail at open, chain intact, and keeps going after them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_kept_in_the_tree_move_into_the_trail() {
        let source = tempfile::tempdir().unwrap();
        let store = SledStore::open(source.path()).unwrap();
        store.start_audit_chain(chain_key()).await.unwrap();
        for i in 0..300 {
            store
                .commit(Transaction::audit_only(varied_draft(i)))
                .await
                .unwrap();
        }
        let entries = store.audit_entries(0, usize::MAX).await.unwrap();
        store.close().await.unwrap();
        drop(store);

        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_db(dir.path(), DEFAULT_CACHE_BYTES).unwrap();
            let tree = db.open_tree("byokd").unwrap();
            for record in &entries {
                tree.insert(codec::audit_key(record.seq), encode(record).unwrap())
                    .unwrap();
                for key in per_entry_index_keys(record) {
                    tree.insert(key, Vec::new()).unwrap();
                }
            }
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.audit_entries(0, usize::MAX).await.unwrap(), entries);
        assert!(store.tree.scan_prefix([codec::AUDIT]).next().is_none());
        check_indexes_against_entries(&store).await;
        store.start_audit_chain(chain_key()).await.unwrap();
        let next = store
            .commit(Transaction::audit_only(varied_draft(300)))
            .await
            .unwrap();
        assert_eq!(next.audit_seq, Some(301));
        assert_eq!(
            store.audit_entry(301).await.unwrap().unwrap().prev_hash,
            entries.last().unwrap().hash
        );
        store.close().await.unwrap();
    }

    /// The whole suite with segments of a few entries each: reads, prunes and reopens cross
    /// and delete segment files.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_segments_pass_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open_with(dir.path(), DEFAULT_CACHE_BYTES, 2048).unwrap());
        crate::store::tests::check_adapter(store.clone()).await;
        let segments = std::fs::read_dir(dir.path().join(AUDIT_DIR))
            .unwrap()
            .count();
        assert!(segments > 4, "{segments} files");
        let entries = store.audit_entries(0, usize::MAX).await.unwrap();
        store.close().await.unwrap();
        drop(store);
        let store = SledStore::open_with(dir.path(), DEFAULT_CACHE_BYTES, 2048).unwrap();
        assert_eq!(store.audit_entries(0, usize::MAX).await.unwrap(), entries);
        check_indexes_against_entries(&store).await;
        store.close().await.unwrap();
    }
}
