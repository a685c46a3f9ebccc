//! The sled adapter: one sled tree, one writer thread, group commit.
//!
//! Reads go straight to sled from the calling task. Every commit goes through a channel to a
//! single writer thread, which checks the transaction's guards, applies its writes and audit
//! entry as one atomic `sled::Batch`, and, once the channel is momentarily empty (or a group
//! is full), flushes sled once for the whole group before answering any of its commits.
//! One writer gives a total order (audit sequence numbers without gaps, guards checked
//! against the latest state); the shared flush makes many concurrent writers cost one fsync.
//!
//! The writer calls the blocking `Db::flush`, never `flush_async`: concurrent `flush_async`
//! calls deadlock in sled 0.34 (sled issue #1308).

use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::codec::{self, encode};
use super::{Committed, Guard, MetaKey, Store, StoreError, Transaction, Write};
use crate::model::{
    AuditRecord, EnvelopeRecord, LeaseId, LeaseRecord, SecretId, SecretName, SecretRecord,
    TenantId, Time, TokenHash,
};

/// Most transactions applied before one shared flush.
const MAX_GROUP: usize = 512;
/// Commits that may wait for the writer before callers are slowed down.
const QUEUE_DEPTH: usize = 4096;

/// A store in a sled database directory.
pub struct SledStore {
    tree: sled::Tree,
    jobs: mpsc::Sender<Message>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

enum Message {
    Commit(
        Box<Transaction>,
        oneshot::Sender<Result<Committed, StoreError>>,
    ),
    Close(oneshot::Sender<Result<(), StoreError>>),
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. sled locks the directory: a second process
    /// cannot open it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open().map_err(engine)?;
        let tree = db.open_tree("byokd").map_err(engine)?;
        let (next_seq, last_time) = match tree
            .range(codec::audit_key(0)..=codec::audit_key(u64::MAX))
            .next_back()
        {
            Some(entry) => {
                let (key, value) = entry.map_err(engine)?;
                let record: AuditRecord = codec::decode(&key, &value)?;
                (record.seq + 1, record.time)
            }
            None => (1, Time::from_micros(i64::MIN)),
        };
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            db,
            tree: tree.clone(),
            next_seq,
            last_time,
            poisoned: false,
        };
        let handle = std::thread::Builder::new()
            .name("byokd-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Engine(format!("spawn writer thread: {e}")))?;
        Ok(Self {
            tree,
            jobs,
            writer: Mutex::new(Some(handle)),
        })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.tree.get(key).map_err(engine)? {
            Some(bytes) => codec::decode(key, &bytes).map(Some),
            None => Ok(None),
        }
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    fn secret(
        &self,
        tenant: &TenantId,
        name: &SecretName,
    ) -> Result<Option<SecretRecord>, StoreError> {
        self.get(&codec::secret_key(tenant, name))
    }

    fn list_secrets(
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
            out.push(codec::decode(&key, &value)?);
        }
        Ok(out)
    }

    fn envelope(
        &self,
        secret_id: SecretId,
        version: u32,
    ) -> Result<Option<EnvelopeRecord>, StoreError> {
        self.get(&codec::envelope_key(secret_id, version))
    }

    fn lease_by_token(&self, token_hash: &TokenHash) -> Result<Option<LeaseRecord>, StoreError> {
        self.get(&codec::lease_key(token_hash))
    }

    fn lease_by_id(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        let key = codec::lease_id_key(id);
        let Some(hash) = self.tree.get(&key).map_err(engine)? else {
            return Ok(None);
        };
        let hash: [u8; 32] = hash.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            key: codec::describe_key(&key),
            reason: "index entry is not a token hash".into(),
        })?;
        self.lease_by_token(&TokenHash(hash))
    }

    fn expired_leases(&self, now: Time, limit: usize) -> Result<Vec<LeaseRecord>, StoreError> {
        let start = vec![codec::LEASE_EXPIRY];
        let end = codec::lease_expiry_key(now, &TokenHash([0; 32]));
        let mut out = Vec::new();
        for entry in self.tree.range(start..end).take(limit) {
            let (key, _) = entry.map_err(engine)?;
            let hash = codec::lease_expiry_hash(&key).ok_or_else(|| StoreError::Corrupt {
                key: codec::describe_key(&key),
                reason: "malformed expiry index key".into(),
            })?;
            if let Some(lease) = self.lease_by_token(&hash)? {
                out.push(lease);
            }
        }
        Ok(out)
    }

    fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.tree
            .range(codec::audit_key(from)..=codec::audit_key(u64::MAX))
            .take(limit)
            .map(|entry| {
                let (key, value) = entry.map_err(engine)?;
                codec::decode(&key, &value)
            })
            .collect()
    }

    fn meta(&self, key: MetaKey) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree
            .get(codec::meta_key(key))
            .map_err(engine)?
            .map(|v| v.to_vec()))
    }

    async fn commit(&self, tx: Transaction) -> Result<Committed, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Message::Commit(Box::new(tx), reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn close(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let sent = self.jobs.send(Message::Close(reply)).await.is_ok();
        let result = if sent {
            answer.await.map_err(|_| StoreError::Closed)?
        } else {
            Ok(())
        };
        let handle = self.writer.lock().map(|mut h| h.take()).unwrap_or(None);
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| StoreError::Engine(format!("join writer: {e}")))?
                .map_err(|_| StoreError::Engine("writer thread panicked".into()))?;
        }
        result
    }
}

/// State owned by the writer thread.
struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    next_seq: u64,
    last_time: Time,
    poisoned: bool,
}

type Reply = oneshot::Sender<Result<Committed, StoreError>>;

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group: Vec<(Reply, Result<Committed, StoreError>)> = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Commit(tx, reply) => {
                        let result = self.apply(*tx);
                        group.push((reply, result));
                    }
                    Message::Close(reply) => {
                        close = Some(reply);
                        break;
                    }
                }
                if group.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            let wrote = group.iter().any(|(_, r)| r.is_ok());
            if wrote && let Err(e) = self.db.flush() {
                tracing::error!(error = %e, "store flush failed; refusing further writes");
                self.poisoned = true;
                for (_, result) in &mut group {
                    if result.is_ok() {
                        *result = Err(StoreError::Engine(format!("flush: {e}")));
                    }
                }
            }
            for (reply, result) in group {
                // The caller may have gone away (cancelled RPC); the commit stands regardless.
                let _ = reply.send(result);
            }
            if let Some(reply) = close {
                let _ = reply.send(self.db.flush().map(drop).map_err(engine));
                return;
            }
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "final store flush failed");
        }
    }

    fn apply(&mut self, tx: Transaction) -> Result<Committed, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        for guard in &tx.guards {
            self.check(guard)?;
        }
        let mut batch = sled::Batch::default();
        for write in &tx.writes {
            self.stage(write, &mut batch)?;
        }
        let mut audit = None;
        if let Some(entry) = tx.audit {
            // Entry times never go backwards along the sequence, even if the clock does.
            let time = Time::now().max(self.last_time);
            let record = AuditRecord {
                seq: self.next_seq,
                time,
                entry,
            };
            batch.insert(&codec::audit_key(record.seq), encode(&record)?);
            audit = Some((record.seq, time));
        }
        self.tree.apply_batch(batch).map_err(engine)?;
        if let Some((seq, time)) = audit {
            self.next_seq = seq + 1;
            self.last_time = time;
        }
        Ok(Committed {
            audit_seq: audit.map(|(seq, _)| seq),
        })
    }

    fn check(&self, guard: &Guard) -> Result<(), StoreError> {
        let (key, expected) = match guard {
            Guard::Secret {
                tenant,
                name,
                expect,
            } => (
                codec::secret_key(tenant, name),
                expect.as_ref().map(encode).transpose()?,
            ),
            Guard::Lease { token_hash, expect } => (
                codec::lease_key(token_hash),
                expect.as_ref().map(encode).transpose()?,
            ),
        };
        let current = self.tree.get(&key).map_err(engine)?;
        if current.as_deref() == expected.as_deref() {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }

    fn stage(&self, write: &Write, batch: &mut sled::Batch) -> Result<(), StoreError> {
        match write {
            Write::PutSecret(s) => batch.insert(codec::secret_key(&s.tenant, &s.name), encode(s)?),
            Write::PutEnvelope(e) => {
                batch.insert(codec::envelope_key(e.secret_id, e.version), encode(e)?)
            }
            Write::DestroyEnvelopes { secret_id, keep } => {
                for entry in self.tree.scan_prefix(codec::envelope_prefix(*secret_id)) {
                    let (key, _) = entry.map_err(engine)?;
                    if keep.is_none_or(|k| codec::envelope_key_version(&key) != Some(k)) {
                        batch.remove(key);
                    }
                }
            }
            Write::PutLease(l) => {
                // A lease's expiry never changes, so its expiry index key is stable.
                batch.insert(codec::lease_key(&l.token_hash), encode(l)?);
                batch.insert(codec::lease_id_key(l.id), &l.token_hash.0[..]);
                batch.insert(
                    codec::lease_expiry_key(l.expires_at, &l.token_hash),
                    &[][..],
                );
            }
            Write::DeleteLease(l) => {
                batch.remove(codec::lease_key(&l.token_hash));
                batch.remove(codec::lease_id_key(l.id));
                batch.remove(codec::lease_expiry_key(l.expires_at, &l.token_hash));
            }
            Write::PutMeta(key, value) => batch.insert(codec::meta_key(*key), value.as_slice()),
        }
        Ok(())
    }
}
