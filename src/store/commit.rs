//! The commit core every engine shares.
//!
//! An engine adapter reads what the core asks, writes a whole group of transactions
//! atomically and durably, and recovers after a crash ([`Adapter`]). Everything else a commit
//! means is decided here, once, for every engine:
//!
//! - **Guards**: each names the [`Revision`] of a record its caller read (or that the record
//!   was absent). The core checks it against the engine's state overlaid with the changes of
//!   the earlier transactions of the same group; a guard that no longer holds fails the
//!   transaction with [`StoreError::Conflict`] and nothing of it is written.
//! - **Quotas**: each transaction's [`Charge`](super::Charge)s (what it adds to or gives back from a
//!   tenant's usage) are checked, after its guards, against the usage the engine holds
//!   overlaid with the group's earlier charges (`usage.rs`); one that would take a tenant or
//!   all tenants past a quota fails the transaction with [`StoreError::OverQuota`]. The
//!   group's new usage is written with it, so every writer of the store counts the same.
//! - **Revisions**: every record a transaction writes gets the transaction's revision, one
//!   larger than any before it.
//! - **The audit chain**: each entry's sequence number (gap-free, in commit order), its time
//!   (never decreasing, whatever the clock does), its link to the entry before, and the MAC
//!   of the anchor a prune leaves.
//! - **Group commit**: one writer thread takes the commits that queue (up to [`MAX_GROUP`]),
//!   applies them one after another, has the adapter write the group, and answers them all
//!   only once it is durable. A group that fails before anything of it was written leaves no
//!   trace: the chain goes on from where it stood and the next group tries again. A group
//!   whose outcome is unknown fails the store for good (see [`Store::failed_for_good`]).
//! - **A stalled write**: once a group's write (from its start to its answer) has taken
//!   longer than [`STALL`] (an engine that does not answer, a commit whose answer was lost
//!   and is being looked for), commits are refused ([`StoreError::Transient`]: UNAVAILABLE,
//!   nothing written) instead of waiting behind it: new ones at once, and those already
//!   queued by a watchdog (`commit/queue.rs`) within [`STALL`] / 4. The commits of the
//!   stalled group itself wait for its outcome.
//! - **Several writers**: an engine that other processes write too starts each group under
//!   its writers' lock and tells the core where the chain and the revisions stand
//!   ([`Adapter::begin_group`]), so that all of them extend one chain (tested with two
//!   committers on one in-memory engine in `commit/tests.rs`).
//! - **Import**: an export's records go into an empty store as groups the adapter writes
//!   like any other; the chain then goes on from the last imported entry.
//!
//! [`Store::failed_for_good`]: super::Store::failed_for_good

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};

use super::activity::Activity;
use super::usage::{Ledger, Tally, Usage, UsageKey};
use super::{Committed, Guard, ImportSource, MetaKey, Record, StoreError, Transaction, Write};
use crate::chain::{ChainKey, GENESIS};
use crate::model::{
    AuditAnchor, AuditRecord, ChainHash, EnvelopeRecord, LeaseRecord, Revision, SecretId,
    SecretName, SecretRecord, TenantId, Time, TokenHash,
};
use queue::Queue;

mod queue;

/// Records an import writes in one group.
const IMPORT_GROUP: usize = 4096;
/// Most transactions in one group.
pub const MAX_GROUP: usize = 512;
/// Commits that may wait for the writer before callers are slowed down.
const QUEUE_DEPTH: usize = 4096;
/// Durable audit entries buffered for each live subscriber.
const FEED_CAPACITY: usize = 1024;

/// How long a group's write may take before commits are refused instead of queued behind it.
pub const STALL: Duration = Duration::from_secs(1);

/// A record a guard can name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecordKey {
    /// The secret `tenant`/`name`.
    Secret(TenantId, SecretName),
    /// The envelope of one secret version.
    Envelope(SecretId, u32),
    /// The lease with this token hash.
    Lease(TokenHash),
    /// A meta value.
    Meta(MetaKey),
}

/// A change as the core resolved it: what an adapter writes. Records carry the revision
/// the core assigned.
#[derive(Debug, Clone)]
pub enum Change {
    /// Insert or replace a secret's record.
    Secret(SecretRecord),
    /// Delete a secret's record.
    DeleteSecret(TenantId, SecretName),
    /// Insert or replace a version's envelope.
    Envelope(EnvelopeRecord),
    /// Delete the envelope of one version (its wrapped data key is gone).
    DeleteEnvelope(SecretId, u32),
    /// Insert a new lease (and its indexes).
    NewLease(LeaseRecord),
    /// Replace a lease whose id, token hash and expiry are unchanged.
    UpdateLease(LeaseRecord),
    /// Delete a lease (and its indexes).
    DeleteLease(LeaseRecord),
    /// Set a meta value.
    Meta(MetaKey, Revision, Vec<u8>),
    /// Move the chain's anchor to the entry it names, and drop the entries up to it.
    Anchor(AuditAnchor),
}

impl Change {
    /// True for changes to leases, which are short-lived and never secret material.
    pub fn is_lease(&self) -> bool {
        matches!(
            self,
            Change::NewLease(_) | Change::UpdateLease(_) | Change::DeleteLease(_)
        )
    }
}

/// One transaction of a group, resolved: its changes and its sealed audit entry.
#[derive(Debug)]
pub struct Resolved {
    /// Record changes, in the order the transaction gave them.
    pub changes: Vec<Change>,
    /// The audit entry, with its sequence number, time and chain link.
    pub audit: Option<AuditRecord>,
}

/// What an adapter writes at once: the group's transactions whose guards held, in commit
/// order.
#[derive(Debug)]
pub struct Group {
    /// The transactions.
    pub transactions: Vec<Resolved>,
    /// The largest revision the group assigned (to keep, so that none is assigned twice).
    pub last_revision: Revision,
    /// The usage the group leaves, for each key its charges changed (written with it).
    pub usage: Vec<(UsageKey, Usage)>,
    /// What its audit entries add to the secrets' use (written with it).
    pub activity: Activity,
}

impl Group {
    /// Counts what its audit entries add to the secrets' use, before it is written.
    fn count_activity(&mut self) {
        self.activity = Activity::of(self.transactions.iter().filter_map(|t| t.audit.as_ref()));
    }
}

/// What an engine adapter does for the core. Reads see the engine's durable state (the
/// core overlays the group's own changes); [`Adapter::write_group`] is the only write.
pub trait Adapter: Send + 'static {
    /// Fails if the engine takes no writes now (for example, a damaged audit trail).
    fn check_writable(&self) -> Result<(), StoreError>;
    /// The stored revision of a record (`None`: absent).
    fn revision(&self, key: &RecordKey) -> Result<Option<Revision>, StoreError>;
    /// The stored usage of `keys`, in their order (a key never written: zero).
    fn usage(&self, keys: &[UsageKey]) -> Result<Vec<Usage>, StoreError>;
    /// What a group's start reads: the stored revisions of `keys` and the stored usage of
    /// `usage`, each in their order. An engine that answers them in one request overrides
    /// this (the default reads the revisions one by one, then the usage).
    fn group_reads(
        &self,
        keys: &[RecordKey],
        usage: &[UsageKey],
    ) -> Result<(Vec<Option<Revision>>, Vec<Usage>), StoreError> {
        let revisions = keys
            .iter()
            .map(|key| self.revision(key))
            .collect::<Result<_, _>>()?;
        let usage = if usage.is_empty() {
            Vec::new()
        } else {
            self.usage(usage)?
        };
        Ok((revisions, usage))
    }
    /// The versions of a secret's envelopes, as stored.
    fn envelope_versions(&self, secret_id: SecretId) -> Result<Vec<u32>, StoreError>;
    /// The chain's anchor, as stored.
    fn anchor(&self) -> Result<Option<AuditAnchor>, StoreError>;
    /// A durable audit entry.
    fn audit_entry(&self, seq: u64) -> Result<Option<AuditRecord>, StoreError>;
    /// Writes the group atomically and durably, and lets readers see it. An error that
    /// wrote nothing is [`StoreError::Transient`] or [`StoreError::TrailDamaged`]; any other
    /// leaves the outcome unknown.
    fn write_group(&mut self, group: &Group) -> Result<(), StoreError>;
    /// Makes everything durable before the store closes.
    fn close(&mut self) -> Result<(), StoreError>;
    /// Starts a group, before its first guard is read. An engine that other processes write
    /// too takes its writers' lock here (held until [`Adapter::end_group`], so that the
    /// group's guard reads and its write see no other writer) and returns where the chain and
    /// the revisions stand now: another process may have moved them since this one last
    /// wrote. `None` (the default): only this process writes, and the core's own position
    /// holds. An error fails the group's commits.
    fn begin_group(&mut self) -> Result<Option<Position>, StoreError> {
        Ok(None)
    }
    /// Ends the group [`Adapter::begin_group`] started, whether it wrote or not.
    fn end_group(&mut self) {}
}

/// Where the chain and the revisions stand: what the next commit builds on.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    /// Sequence number of the next audit entry.
    pub next_seq: u64,
    /// Time of the last entry (the next is not earlier).
    pub last_time: Time,
    /// Hash of the last entry (or the anchor's, or [`GENESIS`]).
    pub prev_hash: ChainHash,
    /// The next revision to assign.
    pub next_revision: u64,
}

impl Position {
    /// The position after `head` (the latest entry), else after `anchor`, else the start;
    /// revisions go on after `last_revision`.
    pub fn after(
        head: Option<&AuditRecord>,
        anchor: Option<&AuditAnchor>,
        last_revision: Revision,
    ) -> Self {
        let (next_seq, last_time, prev_hash) = match (head, anchor) {
            (Some(head), _) => (head.seq + 1, head.time, head.hash),
            (None, Some(anchor)) => (anchor.seq + 1, Time::from_micros(i64::MIN), anchor.hash),
            (None, None) => (1, Time::from_micros(i64::MIN), GENESIS),
        };
        Self {
            next_seq,
            last_time,
            prev_hash,
            next_revision: last_revision.0 + 1,
        }
    }
}

/// What every handle of the store can see of the writer.
pub struct Status {
    /// False once a write's outcome is unknown: only a restart clears it.
    sound: AtomicBool,
    /// The last group failed before it wrote anything (cleared by the next that succeeds).
    failing: AtomicBool,
    durable_seq: AtomicU64,
    feed: broadcast::Sender<Arc<AuditRecord>>,
    /// When the group being written started, in microseconds after `epoch` plus one (0: no
    /// group is being written).
    group_started: AtomicU64,
    epoch: Instant,
}

impl Status {
    /// True unless the store failed for good or the last group failed.
    pub fn writable(&self) -> bool {
        self.sound.load(Ordering::Acquire) && !self.failing.load(Ordering::Acquire)
    }

    /// True once a write's outcome was unknown.
    pub fn failed_for_good(&self) -> bool {
        !self.sound.load(Ordering::Acquire)
    }

    /// The sequence number of the latest durable audit entry.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// Durable audit entries from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AuditRecord>> {
        self.feed.subscribe()
    }

    fn fail_for_good(&self) {
        self.sound.store(false, Ordering::Release);
    }

    /// How long the group being written has taken so far, if one is.
    fn writing_for(&self) -> Option<Duration> {
        let started = self.group_started.load(Ordering::Acquire);
        let started = self.epoch + Duration::from_micros(started.checked_sub(1)?);
        Some(started.elapsed())
    }

    fn group_started(&self, at: Option<Instant>) {
        let micros = at.map_or(0, |at| {
            u64::try_from(at.duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX - 1) + 1
        });
        self.group_started.store(micros, Ordering::Release);
    }
}

/// Why a commit is refused while the store's write is stalled.
fn stalled(waited: Duration) -> StoreError {
    crate::metrics::global().commits_refused_stalled.inc();
    StoreError::Transient(format!(
        "the store's current write has not finished after {} ms",
        waited.as_millis()
    ))
}

type Reply = oneshot::Sender<Result<Committed, StoreError>>;

/// What a group's start read: its guards' stored revisions and its charges' stored usage.
type GroupReads = (
    foldhash::HashMap<RecordKey, Option<Revision>>,
    foldhash::HashMap<UsageKey, Usage>,
);

/// Work run on the writer thread between groups, with the adapter.
pub type Between<A> = Box<dyn FnOnce(&mut A) + Send>;

enum Message<A> {
    Commit(Box<Transaction>, Reply),
    StartChain(Arc<ChainKey>, oneshot::Sender<()>),
    Between(Between<A>),
    Import(ImportSource, oneshot::Sender<Result<u64, StoreError>>),
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// The handle of the writer thread: commits go in, durable answers come out.
pub struct Committer<A> {
    jobs: mpsc::Sender<Message<A>>,
    status: Arc<Status>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<A: Adapter> Committer<A> {
    /// Starts the writer thread on `adapter`, whose durable state ends at `position`.
    pub fn start(adapter: A, position: Position) -> Result<Self, StoreError> {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let status = Arc::new(Status {
            sound: AtomicBool::new(true),
            failing: AtomicBool::new(false),
            durable_seq: AtomicU64::new(position.next_seq - 1),
            feed,
            group_started: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let queue = Queue::start(rx, status.clone())
            .map_err(|e| StoreError::Engine(format!("spawn watchdog thread: {e}")))?;
        let writer = Writer {
            adapter,
            status: status.clone(),
            chain: None,
            position,
            poisoned: false,
        };
        let thread = std::thread::Builder::new()
            .name("byokd-store-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::Engine(format!("spawn writer thread: {e}")))?;
        Ok(Self {
            jobs,
            status,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// What every handle can see of the writer.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Applies `tx` atomically if its guards hold, and returns once it is durable. Refused
    /// (nothing written) once the group being written has taken longer than [`STALL`] and
    /// `tx` is not in it.
    pub async fn commit(&self, tx: Transaction) -> Result<Committed, StoreError> {
        if let Some(writing) = self.status.writing_for()
            && writing > STALL
        {
            return Err(stalled(writing));
        }
        let (reply, answer) = oneshot::channel();
        self.send(Message::Commit(Box::new(tx), reply)).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Installs the audit chain's key.
    pub async fn start_chain(&self, key: Arc<ChainKey>) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::StartChain(key, reply)).await?;
        answer.await.map_err(|_| StoreError::Closed)
    }

    /// Runs `work` on the writer thread once the groups before it are durable, while no
    /// other group is written.
    pub async fn between(&self, work: Between<A>) -> Result<(), StoreError> {
        self.send(Message::Between(work)).await
    }

    /// Loads an export's records into the empty store (see [`super::Store::import`]).
    pub async fn import(&self, source: ImportSource) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Message::Import(source, reply)).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Stops the writer once the groups before are durable, and waits for it.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let result = match self.send(Message::Close(reply)).await {
            Ok(()) => answer.await.map_err(|_| StoreError::Closed)?,
            Err(_) => Ok(()),
        };
        let thread = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| StoreError::Engine(format!("join writer: {e}")))?
                .map_err(|_| StoreError::Engine("writer thread panicked".into()))?;
        }
        result
    }

    async fn send(&self, message: Message<A>) -> Result<(), StoreError> {
        self.jobs
            .send(message)
            .await
            .map_err(|_| StoreError::Closed)
    }
}

/// A commit of the open group, waiting for the group's write: the place of its transaction
/// in the group, or why it failed.
struct Waiting {
    reply: Reply,
    result: Result<usize, StoreError>,
}

/// What the group's guards are checked against: its changes not yet written (a record's new
/// revision, `None`: deleted), then the stored revisions read when the group began.
#[derive(Default)]
struct Overlay {
    /// What the group's transactions so far wrote.
    written: foldhash::HashMap<RecordKey, Option<Revision>>,
    /// The stored revisions read at the group's start.
    stored: foldhash::HashMap<RecordKey, Option<Revision>>,
}

/// State owned by the writer thread.
struct Writer<A> {
    adapter: A,
    status: Arc<Status>,
    chain: Option<Arc<ChainKey>>,
    position: Position,
    poisoned: bool,
}

impl<A: Adapter> Writer<A> {
    fn run(mut self, queue: Arc<Queue<A>>) {
        self.serve(&queue);
        queue.stop();
    }

    fn serve(&mut self, queue: &Queue<A>) {
        while let Some(first) = queue.recv() {
            // Where the chain stood before the group, should the group write nothing.
            let mut before = self.position;
            // Whether the adapter started the group (see `Adapter::begin_group`).
            let mut started: Option<Result<(), StoreError>> = None;
            let mut group = Group {
                transactions: Vec::new(),
                last_revision: Revision(0),
                usage: Vec::new(),
                activity: Activity::default(),
            };
            let mut waiting: Vec<Waiting> = Vec::new();
            let mut overlay = Overlay::default();
            let mut ledger = Ledger::default();
            // The commits that queued (up to MAX_GROUP), up to a barrier.
            let mut commits = Vec::new();
            let mut after = None;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Commit(tx, reply) => commits.push((tx, reply)),
                    Message::StartChain(key, reply) if commits.is_empty() => {
                        self.chain = Some(key);
                        let _ = reply.send(());
                    }
                    // Barriers: the group before them is durable before they run (a chain
                    // started after commits of the group does not apply to them).
                    other => {
                        after = Some(other);
                        break;
                    }
                }
                if commits.len() < MAX_GROUP {
                    next = queue.try_recv();
                }
            }
            // When the group's write started (none: the message was a barrier alone).
            let group_started = (!commits.is_empty()).then(Instant::now);
            if !commits.is_empty() {
                self.status.group_started(group_started);
                let begun = self.begin_group();
                before = self.position;
                let failure = match &begun {
                    Ok(()) => match self.group_reads(&commits) {
                        Ok((revisions, usage)) => {
                            overlay.stored = revisions;
                            ledger.stored = usage;
                            None
                        }
                        Err(e) => Some(e),
                    },
                    Err(e) => Some(copy_failure(e)),
                };
                for (tx, reply) in commits {
                    let result = match &failure {
                        None => self.apply(*tx, &mut overlay, &mut ledger).map(|resolved| {
                            group.transactions.push(resolved);
                            group.transactions.len() - 1
                        }),
                        Some(e) => Err(copy_failure(e)),
                    };
                    waiting.push(Waiting { reply, result });
                }
                started = Some(begun);
                group.usage = ledger.written();
            }
            let mut audits: Vec<Option<AuditRecord>> = match self.write(&mut group, before) {
                Ok(()) => group.transactions.into_iter().map(|t| t.audit).collect(),
                Err(e) => {
                    for w in &mut waiting {
                        if w.result.is_ok() {
                            w.result = Err(copy_failure(&e));
                        }
                    }
                    Vec::new()
                }
            };
            if started.is_some_and(|begun| begun.is_ok()) {
                self.adapter.end_group();
            }
            if let Some(group_started) = group_started {
                self.status.group_started(None);
                let took = group_started.elapsed();
                if took > STALL {
                    tracing::warn!(
                        took_ms = took.as_millis() as u64,
                        "a store write stalled; commits not in it were refused meanwhile"
                    );
                }
            }
            if let Some(seq) = audits.iter().rev().find_map(|a| a.as_ref().map(|r| r.seq)) {
                self.status.durable_seq.store(seq, Ordering::Release);
            }
            for w in waiting {
                let result = w.result.map(|at| {
                    let record = audits[at].take();
                    let audit_seq = record.as_ref().map(|r| r.seq);
                    // No subscriber is fine (then there is nothing to share: the record is
                    // dropped here); a lagging one is told so by the channel.
                    if let Some(record) = record.filter(|_| self.status.feed.receiver_count() > 0) {
                        let _ = self.status.feed.send(Arc::new(record));
                    }
                    Committed { audit_seq }
                });
                // The caller may have gone away (cancelled RPC); the commit stands regardless.
                let _ = w.reply.send(result);
            }
            match after {
                Some(Message::Between(work)) => work(&mut self.adapter),
                Some(Message::Import(source, reply)) => {
                    let _ = reply.send(self.import(source));
                }
                Some(Message::Close(reply)) => {
                    let _ = reply.send(self.adapter.close());
                    return;
                }
                _ => {}
            }
        }
        if let Err(e) = self.adapter.close() {
            tracing::error!(error = %e, "final store flush failed");
        }
    }

    /// Has the adapter write the group's transactions, if any. On failure, returns the error
    /// each of them fails with: one that wrote nothing leaves the chain where it stood
    /// (`before`); any other fails the store for good.
    fn write(&mut self, group: &mut Group, before: Position) -> Result<(), StoreError> {
        if group.transactions.is_empty() {
            return Ok(());
        }
        group.last_revision = Revision(self.position.next_revision - 1);
        group.count_activity();
        crate::metrics::global()
            .group_commits
            .observe(group.transactions.len() as f64);
        let started = std::time::Instant::now();
        let written = if self.poisoned {
            Err(StoreError::Poisoned)
        } else {
            self.adapter.write_group(group)
        };
        crate::metrics::global()
            .flush_duration
            .observe(started.elapsed().as_secs_f64());
        self.status.failing.store(
            matches!(written, Err(StoreError::Transient(_))),
            Ordering::Release,
        );
        let Err(e) = written else {
            return Ok(());
        };
        if matches!(e, StoreError::Transient(_) | StoreError::TrailDamaged(_)) {
            // The group failed as a whole and left no trace: the chain goes on from where it
            // stood, and the next group tries again.
            tracing::warn!(error = %e, "store write failed before anything was written");
            self.position = before;
            return Err(e);
        }
        if !self.poisoned {
            tracing::error!(error = %e, "store write or flush failed; refusing further writes");
            self.poisoned = true;
            self.status.fail_for_good();
        }
        Err(StoreError::Engine(format!("write: {e}")))
    }

    /// Has the adapter start a group (see [`Adapter::begin_group`]); the group builds on
    /// the position the adapter names, if it names one.
    fn begin_group(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let started = std::time::Instant::now();
        let begun = self.adapter.begin_group();
        crate::metrics::global()
            .commit_order_wait
            .observe(started.elapsed().as_secs_f64());
        if let Some(position) = begun? {
            self.position = position;
        }
        Ok(())
    }

    /// Checks `tx`'s guards and resolves its writes and audit entry. Nothing of a
    /// transaction that fails is kept.
    fn apply(
        &mut self,
        tx: Transaction,
        overlay: &mut Overlay,
        ledger: &mut Ledger,
    ) -> Result<Resolved, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        self.adapter.check_writable()?;
        for guard in &tx.guards {
            if self.current(&guard.key, overlay)? != guard.expect {
                return Err(StoreError::Conflict);
            }
        }
        let charged = ledger.charge(&tx.charges)?;
        let revision = Revision(self.position.next_revision);
        let mut changes = Vec::with_capacity(tx.writes.len());
        let mut touched = Vec::new();
        for write in tx.writes {
            self.resolve(write, revision, overlay, &mut changes, &mut touched)?;
        }
        let audit = match tx.audit {
            Some(draft) => {
                let chain = self.chain.as_ref().ok_or(StoreError::ChainNotStarted)?;
                // Entry times never go backwards along the sequence, even if the clock does.
                let time = Time::now().max(self.position.last_time);
                let seq = self.position.next_seq;
                let prev_hash = self.position.prev_hash;
                Some(AuditRecord {
                    seq,
                    time,
                    hash: chain.link(&prev_hash, seq, time, &draft),
                    prev_hash,
                    entry: draft,
                })
            }
            None => None,
        };
        overlay.written.extend(touched);
        ledger.apply(charged);
        if !changes.is_empty() {
            self.position.next_revision += 1;
        }
        if let Some(record) = &audit {
            self.position.next_seq = record.seq + 1;
            self.position.last_time = record.time;
            self.position.prev_hash = record.hash;
        }
        Ok(Resolved { changes, audit })
    }

    /// The stored revisions of every record the guards of `commits` name, and the stored
    /// usage of every tenant their charges name (and of all tenants together), read at once
    /// (an engine reads them in one request).
    fn group_reads(&self, commits: &[(Box<Transaction>, Reply)]) -> Result<GroupReads, StoreError> {
        let keys: Vec<RecordKey> = commits
            .iter()
            .flat_map(|(tx, _)| tx.guards.iter().map(|g| g.key.clone()))
            .collect::<foldhash::HashSet<_>>()
            .into_iter()
            .collect();
        let charged = Ledger::keys(commits.iter().flat_map(|(tx, _)| &tx.charges));
        let (revisions, usage) = self.adapter.group_reads(&keys, &charged)?;
        Ok((
            keys.into_iter().zip(revisions).collect(),
            charged.into_iter().zip(usage).collect(),
        ))
    }

    /// The revision of `key` counting the group's changes so far.
    fn current(&self, key: &RecordKey, overlay: &Overlay) -> Result<Option<Revision>, StoreError> {
        match overlay.written.get(key).or_else(|| overlay.stored.get(key)) {
            Some(revision) => Ok(*revision),
            None => self.adapter.revision(key),
        }
    }

    /// Turns one write into changes, noting the records it touches.
    fn resolve(
        &self,
        write: Write,
        revision: Revision,
        overlay: &Overlay,
        changes: &mut Vec<Change>,
        touched: &mut Vec<(RecordKey, Option<Revision>)>,
    ) -> Result<(), StoreError> {
        let mut put = |key: RecordKey, change: Change| {
            touched.push((key, Some(revision)));
            changes.push(change);
        };
        match write {
            Write::PutSecret(mut s) => {
                s.rev = revision;
                put(
                    RecordKey::Secret(s.tenant.clone(), s.name.clone()),
                    Change::Secret(s),
                );
            }
            Write::PutEnvelope(mut e) => {
                e.rev = revision;
                put(
                    RecordKey::Envelope(e.secret_id, e.version),
                    Change::Envelope(e),
                );
            }
            Write::PutLease(mut l) => {
                l.rev = revision;
                put(RecordKey::Lease(l.token_hash), Change::NewLease(l));
            }
            Write::UpdateLease(mut l) => {
                l.rev = revision;
                put(RecordKey::Lease(l.token_hash), Change::UpdateLease(l));
            }
            Write::PutMeta(key, value) => {
                put(RecordKey::Meta(key), Change::Meta(key, revision, value));
            }
            Write::DeleteLease(l) => {
                touched.push((RecordKey::Lease(l.token_hash), None));
                changes.push(Change::DeleteLease(l));
            }
            Write::DeleteSecret { tenant, name } => {
                touched.push((RecordKey::Secret(tenant.clone(), name.clone()), None));
                changes.push(Change::DeleteSecret(tenant, name));
            }
            Write::DestroyEnvelopes { secret_id, keep } => {
                let mut versions = self.adapter.envelope_versions(secret_id)?;
                for (key, revision) in &overlay.written {
                    if let RecordKey::Envelope(id, version) = key
                        && *id == secret_id
                    {
                        versions.retain(|v| v != version);
                        if revision.is_some() {
                            versions.push(*version);
                        }
                    }
                }
                versions.sort_unstable();
                for version in versions {
                    if keep != Some(version) {
                        touched.push((RecordKey::Envelope(secret_id, version), None));
                        changes.push(Change::DeleteEnvelope(secret_id, version));
                    }
                }
            }
            Write::PruneAudit { through } => changes.push(Change::Anchor(self.anchor(through)?)),
        }
        Ok(())
    }

    /// Loads an import into the store, which must be empty; on failure the store takes no
    /// more writes (a partial import must not be served).
    fn import(&mut self, source: ImportSource) -> Result<u64, StoreError> {
        // One group as far as other writers go: the whole import runs under their lock.
        self.begin_group()?;
        let imported = self.import_begun(source);
        self.adapter.end_group();
        imported
    }

    fn import_begun(&mut self, source: ImportSource) -> Result<u64, StoreError> {
        let empty = self.position.next_seq == 1
            && self.position.next_revision == 1
            && self.adapter.anchor()?.is_none();
        if !empty {
            return Err(StoreError::Export(
                "the store already holds records; import only into an empty one".into(),
            ));
        }
        let loaded = self.load(source);
        if loaded.is_err() && !self.poisoned {
            self.poisoned = true;
            self.status.fail_for_good();
        }
        loaded
    }

    /// Writes the records `source` yields in groups of [`IMPORT_GROUP`]: the group's audit
    /// entries, each as a transaction of its own, then its other records as one. Audit
    /// entries must follow each other (and the anchor, if any); their chain links are
    /// checked by whoever verifies the trail after (a restore does, against the chain key).
    fn load(&mut self, mut source: ImportSource) -> Result<u64, StoreError> {
        let mut count = 0;
        let mut group = Group {
            transactions: Vec::new(),
            last_revision: Revision(0),
            usage: Vec::new(),
            activity: Activity::default(),
        };
        // The usage the records bring, written with the last group.
        let mut tally = Tally::default();
        let mut records = Vec::new();
        let (mut first, mut last, mut head, mut anchor) = (None, None, None, None);
        loop {
            let next = source().map_err(StoreError::Export)?;
            let end = next.is_none();
            if let Some(record) = next {
                count += 1;
                let change = match record {
                    Record::Audit(entry) => {
                        if let Some(last) = last
                            && entry.seq != last + 1
                        {
                            return Err(StoreError::Export(format!(
                                "audit entry {} does not follow entry {last}",
                                entry.seq
                            )));
                        }
                        first.get_or_insert(entry.seq);
                        last = Some(entry.seq);
                        group.transactions.push(Resolved {
                            changes: Vec::new(),
                            audit: Some(entry),
                        });
                        continue;
                    }
                    Record::Secret(s) => Change::Secret(s),
                    Record::Envelope(e) => {
                        tally.envelope(&e);
                        Change::Envelope(e)
                    }
                    Record::Meta(key, revision, value) => Change::Meta(key, revision, value),
                    Record::Anchor(a) => {
                        anchor = Some(a.clone());
                        Change::Anchor(a)
                    }
                };
                let revision = match &change {
                    Change::Secret(s) => s.rev,
                    Change::Envelope(e) => e.rev,
                    Change::Meta(_, revision, _) => *revision,
                    _ => Revision(0),
                };
                group.last_revision = group.last_revision.max(revision);
                records.push(change);
            }
            if end || records.len() + group.transactions.len() >= IMPORT_GROUP {
                if !records.is_empty() {
                    group.transactions.push(Resolved {
                        changes: std::mem::take(&mut records),
                        audit: None,
                    });
                }
                if end && !tally.is_empty() {
                    group.usage = std::mem::take(&mut tally).finish().into_iter().collect();
                }
                if !group.transactions.is_empty() || !group.usage.is_empty() {
                    group.count_activity();
                    self.adapter.write_group(&group)?;
                    let mut newest = group.transactions.iter_mut().rev();
                    head = newest.find_map(|t| t.audit.take()).or(head);
                    group.transactions.clear();
                }
            }
            if end {
                break;
            }
        }
        let start = anchor.as_ref().map_or(1, |a: &AuditAnchor| a.seq + 1);
        if first.is_some_and(|first| first != start) {
            return Err(StoreError::Export(format!(
                "the audit entries start at {} instead of {start}",
                first.unwrap_or_default()
            )));
        }
        self.position = Position::after(head.as_ref(), anchor.as_ref(), group.last_revision);
        self.status
            .durable_seq
            .store(self.position.next_seq - 1, Ordering::Release);
        Ok(count)
    }

    /// The anchor of a prune through entry `through`, with a MAC so that it cannot be moved
    /// without the audit key.
    fn anchor(&self, through: u64) -> Result<AuditAnchor, StoreError> {
        let chain = self.chain.as_ref().ok_or(StoreError::ChainNotStarted)?;
        // A forged anchor is evidence: moving it would replace it with an authentic one.
        if let Some(current) = self.adapter.anchor()?
            && !chain.is_authentic(&current)
        {
            return Err(StoreError::Corrupt {
                key: "the audit chain's anchor".into(),
                reason: "the audit chain's anchor is not authentic; not pruning over it".into(),
            });
        }
        // Entries of earlier groups only: `through` names an entry already durable.
        let last = self
            .adapter
            .audit_entry(through)?
            .ok_or(StoreError::PruneOutOfRange(through))?;
        Ok(chain.anchor(last.seq, last.hash))
    }
}

/// A copy of the error a group's write failed with (see `Writer::write`), for each of its
/// commits.
fn copy_failure(e: &StoreError) -> StoreError {
    match e {
        StoreError::TrailDamaged(damage) => StoreError::TrailDamaged(damage.clone()),
        StoreError::Transient(why) => StoreError::Transient(why.clone()),
        StoreError::Engine(why) => StoreError::Engine(why.clone()),
        other => StoreError::Engine(other.to_string()),
    }
}

impl Guard {
    /// The secret `tenant`/`name` is still as read (`None`: still absent).
    pub fn secret(tenant: &TenantId, name: &SecretName, read: Option<&SecretRecord>) -> Self {
        Self {
            key: RecordKey::Secret(tenant.clone(), name.clone()),
            expect: read.map(|s| s.rev),
        }
    }

    /// The lease with this token hash is still as read.
    pub fn lease(token_hash: TokenHash, read: Option<&LeaseRecord>) -> Self {
        Self {
            key: RecordKey::Lease(token_hash),
            expect: read.map(|l| l.rev),
        }
    }

    /// The envelope of one secret version is still as read.
    pub fn envelope(secret_id: SecretId, version: u32, read: Option<&EnvelopeRecord>) -> Self {
        Self {
            key: RecordKey::Envelope(secret_id, version),
            expect: read.map(|e| e.rev),
        }
    }

    /// A meta value is still at the revision read (`None`: still absent).
    pub fn meta(key: MetaKey, read: Option<Revision>) -> Self {
        Self {
            key: RecordKey::Meta(key),
            expect: read,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
