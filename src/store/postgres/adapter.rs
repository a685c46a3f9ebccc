//! The commit core's adapter on PostgreSQL (see `store/commit.rs`).
//!
//! A group is one transaction. [`Adapter::begin_group`] opens it and takes the schema's
//! writers' lock (a transaction-scoped advisory lock, released by the commit or rollback),
//! then reads where the chain and the revisions stand: another process may have written since
//! this one last did. The guard reads see everything committed before the lock was taken, and
//! [`Adapter::write_group`] writes the group's rows, its audit entries and the revision counter
//! and commits, with `synchronous_commit` on: the group is durable when the commit returns.
//!
//! A statement that fails before the commit leaves nothing written (the transaction is
//! rolled back): the group's commits fail with UNAVAILABLE and the next group reconnects if
//! the connection was lost. A commit whose answer is lost is resolved before it is answered:
//! on a new connection the adapter looks for the group's witness (its last audit entry, byte
//! for byte, or the revision of a record it wrote). Found: the group committed and is
//! answered as durable. Not found: nothing of it was written (its transaction died with its
//! connection) and its callers get UNAVAILABLE. Only when the database stays unreachable for
//! [`RESOLVE_FOR`] is the outcome unknown, and the core fails the store for good.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, Statement};

use super::Target;

use crate::model::{AuditAnchor, AuditRecord, Revision, SecretId};
use crate::store::StoreError;
use crate::store::codec;
use crate::store::commit::{Adapter, Change, Group, Position, RecordKey};
use crate::store::usage::{Usage, UsageKey};

use super::redemptions::Redemptions;
use super::rows::{GroupRows, Writes, stored, usage_of, uuid};
use super::unavailable;

/// How long a commit whose answer was lost is looked for before its outcome is unknown.
pub const RESOLVE_FOR: Duration = Duration::from_secs(30);

/// A fault to inject at the next commit (tests only).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection drops before COMMIT is sent: the transaction is rolled back.
    DropBeforeCommit,
    /// COMMIT succeeds but its answer is lost.
    LoseAnswer,
}

/// What shows that a group committed.
enum Witness {
    /// Its last audit entry, as encoded.
    Entry(i64, Vec<u8>),
    /// A record it wrote, at the group's revision.
    Record(RecordKey, Revision),
    /// Nothing to look for (only deletions): the state is as if it committed.
    None,
}

/// The commit core's adapter: one connection, owned by the writer thread.
pub struct PgAdapter {
    target: Target,
    schema: String,
    /// Reads come through `&self` (the writer thread owns the adapter alone).
    conn: RefCell<Option<Connection>>,
    /// A group's transaction is open on `conn`, from `begin_group` to its commit (or to the
    /// rollback in `end_group`).
    open: Cell<bool>,
    /// The store's cache of redemptions, told of every group that commits.
    redemptions: Option<Arc<Redemptions>>,
    #[cfg(test)]
    pub(crate) fault: Cell<Option<Fault>>,
}

/// A connection and the statements prepared on it.
struct Connection {
    client: Client,
    sql: Statements,
}

/// Every statement the adapter runs, prepared once per connection.
struct Statements {
    secret_rev: Statement,
    envelope_rev: Statement,
    lease_rev: Statement,
    meta_rev: Statement,
    envelope_versions: Statement,
    anchor: Statement,
    audit_entry: Statement,
    /// BEGIN and the writers' lock, in one simple query.
    begin: String,
    /// The head entry, the anchor and the revision counter, in one row.
    position: Statement,
    /// The revisions of leases (by token hash) and of secrets (by tenant and name), and the
    /// usage of tenants (by usage key), at once: rows of kind 0, 1 and 2.
    group_reads: Statement,
    writes: Writes,
}

impl Statements {
    fn prepare(client: &mut Client, s: &str) -> Result<Self, postgres::Error> {
        let mut p = |sql: String| client.prepare(&sql);
        Ok(Self {
            secret_rev: p(format!(
                "SELECT rev FROM {s}.secrets WHERE tenant = $1 AND name = $2"
            ))?,
            envelope_rev: p(format!(
                "SELECT rev FROM {s}.envelopes WHERE secret_id = $1 AND version = $2"
            ))?,
            lease_rev: p(format!("SELECT rev FROM {s}.leases WHERE token_hash = $1"))?,
            meta_rev: p(format!("SELECT rev FROM {s}.meta WHERE name = $1"))?,
            envelope_versions: p(format!(
                "SELECT version FROM {s}.envelopes WHERE secret_id = $1 ORDER BY version"
            ))?,
            anchor: p(format!("SELECT record FROM {s}.anchor"))?,
            audit_entry: p(format!("SELECT record FROM {s}.audit WHERE seq = $1"))?,
            begin: format!("BEGIN; SELECT pg_advisory_xact_lock(hashtext('byokd-commit:{s}'))"),
            position: p(format!(
                "SELECT h.seq, h.record, (SELECT record FROM {s}.anchor), p.last_revision
                 FROM {s}.position p
                 LEFT JOIN LATERAL (SELECT seq, record FROM {s}.audit ORDER BY seq DESC LIMIT 1) h
                 ON true"
            ))?,
            group_reads: p(format!(
                "SELECT 0, token_hash, NULL::text, NULL::text, rev, NULL::int8, NULL::int8
                 FROM {s}.leases WHERE token_hash = ANY($1::bytea[])
                 UNION ALL
                 SELECT 1, NULL::bytea, s.tenant, s.name, s.rev, NULL::int8, NULL::int8
                 FROM {s}.secrets s JOIN unnest($2::text[], $3::text[]) AS k(tenant, name)
                 ON s.tenant = k.tenant AND s.name = k.name
                 UNION ALL
                 SELECT 2, NULL::bytea, u.tenant, NULL::text, u.secrets, u.value_bytes, u.leases
                 FROM {s}.usage u WHERE u.tenant = ANY($4::text[])"
            ))?,
            writes: Writes::prepare(client, s)?,
        })
    }
}

fn decode_audit(seq: i64, bytes: &[u8]) -> Result<AuditRecord, StoreError> {
    codec::decode(&codec::audit_key(seq as u64), bytes)
}

fn decode_anchor(bytes: &[u8]) -> Result<AuditAnchor, StoreError> {
    codec::decode(codec::AUDIT_ANCHOR_META, bytes)
}

impl PgAdapter {
    /// An adapter on the database `config` names, in `schema` (migrated already). Connects
    /// now, and refuses a server that does not make commits durable.
    pub fn connect(target: Target, schema: &str) -> Result<Self, StoreError> {
        super::schema::check_schema_name(schema)?;
        let adapter = Self {
            target,
            schema: schema.to_string(),
            conn: RefCell::new(None),
            open: Cell::new(false),
            redemptions: None,
            #[cfg(test)]
            fault: Cell::new(None),
        };
        adapter.with(|_, _| Ok(()))?;
        Ok(adapter)
    }

    /// Tells `redemptions` of every group this adapter commits, before its commits are
    /// answered.
    pub(super) fn telling(mut self, redemptions: Arc<Redemptions>) -> Self {
        self.redemptions = Some(redemptions);
        self
    }

    /// Runs `work` on the connection, made again first if it was lost between groups. Within
    /// a group a lost connection fails the group (its lock and transaction went with it).
    fn with<T>(
        &self,
        work: impl FnOnce(&mut Client, &Statements) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.borrow_mut();
        if conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            *conn = None;
        }
        if conn.is_none() {
            if self.open.get() {
                return Err(unavailable("the connection was lost during the group"));
            }
            let mut client = self.target.connect_blocking()?;
            super::check_durable(&mut client)?;
            let sql = Statements::prepare(&mut client, &self.schema).map_err(unavailable)?;
            *conn = Some(Connection { client, sql });
        }
        match conn.as_mut() {
            Some(c) => work(&mut c.client, &c.sql).map_err(unavailable),
            None => Err(unavailable("no connection")),
        }
    }

    /// Where the chain and the revisions stand now (read as a group would, without writing).
    pub fn position(&mut self) -> Result<Position, StoreError> {
        let position = self.begin_group()?;
        self.end_group();
        position.ok_or_else(|| unavailable("no position"))
    }

    /// Writes the group's rows in the open transaction (see `rows.rs`).
    fn write_rows(&self, group: &Group) -> Result<(), StoreError> {
        let rows = GroupRows::of(group)?;
        self.with(|client, sql| rows.write(client, &sql.writes))
    }
}

impl PgAdapter {
    /// Sends COMMIT (or, in tests, the fault asked for).
    fn commit(&self, client: &mut Client) -> Result<(), postgres::Error> {
        #[cfg(test)]
        match self.fault.take() {
            Some(Fault::DropBeforeCommit) => {
                // The server rolls back a transaction whose connection ends.
                return client
                    .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
                    .and_then(|()| client.batch_execute("COMMIT"));
            }
            Some(Fault::LoseAnswer) => {
                client.batch_execute("COMMIT")?;
                return client.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())");
            }
            None => {}
        }
        client.batch_execute("COMMIT")
    }

    /// Whether the group `witness` names committed, looked for on new connections until
    /// [`RESOLVE_FOR`] passes.
    fn resolve(&self, witness: &Witness) -> Result<bool, String> {
        let deadline = Instant::now() + RESOLVE_FOR;
        loop {
            let found = self.with(|client, sql| match witness {
                Witness::Entry(seq, bytes) => Ok(client
                    .query_opt(&sql.audit_entry, &[seq])?
                    .is_some_and(|row| row.get::<_, &[u8]>(0) == bytes.as_slice())),
                Witness::Record(key, revision) => {
                    let row = match key {
                        RecordKey::Secret(tenant, name) => client
                            .query_opt(&sql.secret_rev, &[&tenant.as_str(), &name.as_str()])?,
                        RecordKey::Envelope(id, version) => client.query_opt(
                            &sql.envelope_rev,
                            &[&uuid(id.as_bytes()), &(*version as i32)],
                        )?,
                        RecordKey::Lease(hash) => {
                            client.query_opt(&sql.lease_rev, &[&hash.0.as_slice()])?
                        }
                        RecordKey::Meta(meta) => {
                            client.query_opt(&sql.meta_rev, &[&meta.name()])?
                        }
                    };
                    Ok(row.is_some_and(|r| r.get::<_, i64>(0) == stored(*revision)))
                }
                Witness::None => Ok(true),
            });
            match found {
                Ok(found) => return Ok(found),
                Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// What shows that `group` committed.
fn witness(group: &Group) -> Witness {
    if let Some(entry) = group
        .transactions
        .iter()
        .rev()
        .find_map(|t| t.audit.as_ref())
        && let Ok(bytes) = codec::encode(entry)
    {
        return Witness::Entry(entry.seq as i64, bytes);
    }
    for change in group.transactions.iter().flat_map(|t| &t.changes) {
        let (key, revision) = match change {
            Change::Secret(s) => (RecordKey::Secret(s.tenant.clone(), s.name.clone()), s.rev),
            Change::Envelope(e) => (RecordKey::Envelope(e.secret_id, e.version), e.rev),
            Change::NewLease(l) | Change::UpdateLease(l) => (RecordKey::Lease(l.token_hash), l.rev),
            Change::Meta(key, revision, _) => (RecordKey::Meta(*key), *revision),
            Change::DeleteEnvelope(..)
            | Change::DeleteSecret(..)
            | Change::DeleteLease(_)
            | Change::Anchor(_) => continue,
        };
        return Witness::Record(key, revision);
    }
    Witness::None
}

impl Adapter for PgAdapter {
    fn check_writable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn revision(&self, key: &RecordKey) -> Result<Option<Revision>, StoreError> {
        let row = self.with(|client, sql| match key {
            RecordKey::Secret(tenant, name) => {
                client.query_opt(&sql.secret_rev, &[&tenant.as_str(), &name.as_str()])
            }
            RecordKey::Envelope(id, version) => client.query_opt(
                &sql.envelope_rev,
                &[&uuid(id.as_bytes()), &(*version as i32)],
            ),
            RecordKey::Lease(hash) => client.query_opt(&sql.lease_rev, &[&hash.0.as_slice()]),
            RecordKey::Meta(meta) => client.query_opt(&sql.meta_rev, &[&meta.name()]),
        })?;
        Ok(row.map(|r| Revision(r.get::<_, i64>(0) as u64)))
    }

    fn usage(&self, keys: &[UsageKey]) -> Result<Vec<Usage>, StoreError> {
        self.group_reads(&[], keys).map(|(_, usage)| usage)
    }

    /// Leases' and secrets' revisions and the usage in one statement; other revisions one by
    /// one.
    fn group_reads(
        &self,
        keys: &[RecordKey],
        usage: &[UsageKey],
    ) -> Result<(Vec<Option<Revision>>, Vec<Usage>), StoreError> {
        let mut hashes: Vec<&[u8]> = Vec::new();
        let (mut tenants, mut names): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for key in keys {
            match key {
                RecordKey::Lease(hash) => hashes.push(hash.0.as_slice()),
                RecordKey::Secret(tenant, name) => {
                    tenants.push(tenant.as_str());
                    names.push(name.as_str());
                }
                RecordKey::Envelope(..) | RecordKey::Meta(_) => {}
            }
        }
        let charged: Vec<&str> = usage.iter().map(UsageKey::as_str).collect();
        let rows = if hashes.is_empty() && tenants.is_empty() && charged.is_empty() {
            Vec::new()
        } else {
            self.with(|client, sql| {
                client.query(&sql.group_reads, &[&hashes, &tenants, &names, &charged])
            })?
        };
        let mut leases: HashMap<&[u8], i64> = HashMap::new();
        let mut secrets: HashMap<(&str, &str), i64> = HashMap::new();
        let mut stored: HashMap<&str, Usage> = HashMap::new();
        for row in &rows {
            match row.get::<_, i32>(0) {
                0 => {
                    leases.insert(row.get(1), row.get(4));
                }
                1 => {
                    secrets.insert((row.get(2), row.get(3)), row.get(4));
                }
                _ => {
                    stored.insert(row.get(2), usage_of(row, 4));
                }
            }
        }
        let revisions = keys
            .iter()
            .map(|key| match key {
                RecordKey::Lease(hash) => Ok(leases
                    .get(hash.0.as_slice())
                    .map(|rev| Revision(*rev as u64))),
                RecordKey::Secret(tenant, name) => Ok(secrets
                    .get(&(tenant.as_str(), name.as_str()))
                    .map(|rev| Revision(*rev as u64))),
                other => self.revision(other),
            })
            .collect::<Result<_, _>>()?;
        let usage = charged
            .iter()
            .map(|key| stored.get(key).copied().unwrap_or_default())
            .collect();
        Ok((revisions, usage))
    }

    fn envelope_versions(&self, secret_id: SecretId) -> Result<Vec<u32>, StoreError> {
        let rows = self.with(|client, sql| {
            client.query(&sql.envelope_versions, &[&uuid(secret_id.as_bytes())])
        })?;
        Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
    }

    fn anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        let row = self.with(|client, sql| client.query_opt(&sql.anchor, &[]))?;
        row.map(|r| decode_anchor(r.get(0))).transpose()
    }

    fn audit_entry(&self, seq: u64) -> Result<Option<AuditRecord>, StoreError> {
        let row = self.with(|client, sql| client.query_opt(&sql.audit_entry, &[&(seq as i64)]))?;
        row.map(|r| decode_audit(seq as i64, r.get(0))).transpose()
    }

    /// Writes the group's rows and commits. Until the commit is sent, a failure rolls back
    /// and nothing is written; a commit whose answer does not come is resolved (see the
    /// module documentation).
    fn write_group(&mut self, group: &Group) -> Result<(), StoreError> {
        if !self.open.get() {
            return Err(unavailable("no group is open"));
        }
        self.write_rows(group)?;
        self.open.set(false);
        let committed = {
            let mut conn = self.conn.borrow_mut();
            let Some(c) = conn.as_mut() else {
                return Err(unavailable("the connection was lost during the group"));
            };
            let result = self.commit(&mut c.client);
            // Only an ERROR on a live connection says the transaction rolled back; a lost
            // connection (or a FATAL that ends it) says nothing of the outcome.
            let lost = result.as_ref().is_err_and(|e| {
                c.client.is_closed()
                    || e.as_db_error()
                        .is_none_or(|d| matches!(d.severity(), "FATAL" | "PANIC"))
            });
            if lost {
                *conn = None;
            }
            result.map_err(|e| (e, lost))
        };
        let outcome = match committed {
            Ok(()) => Ok(()),
            // The server answered on a live connection: the transaction ended without
            // committing.
            Err((e, false)) => Err(unavailable(e)),
            Err((e, true)) => {
                tracing::warn!(error = %e, "the answer to a commit was lost; looking for it");
                match self.resolve(&witness(group)) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(unavailable(format!(
                        "the connection was lost before the commit took effect: {e}"
                    ))),
                    Err(why) => Err(StoreError::Engine(format!(
                        "PostgreSQL: the outcome of a commit is unknown ({e}), and stays so: {why}"
                    ))),
                }
            }
        };
        if let (Ok(()), Some(redemptions)) = (&outcome, &self.redemptions) {
            redemptions.committed(group);
        }
        outcome
    }

    fn close(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Opens the group's transaction, takes the writers' lock, and reads where the chain
    /// and the revisions stand now.
    ///
    /// A connection found dead here (the server restarted or failed over since the last
    /// group) is made again once: nothing of the group was written yet.
    fn begin_group(&mut self) -> Result<Option<Position>, StoreError> {
        self.end_group();
        let begin = |adapter: &Self| {
            adapter.with(|client, sql| {
                // One round trip for BEGIN and the lock, one for where things stand.
                adapter.open.set(true);
                client.batch_execute(&sql.begin)?;
                let row = client.query_one(&sql.position, &[])?;
                Ok((
                    row.get::<_, Option<i64>>(0),
                    row.get::<_, Option<Vec<u8>>>(1),
                    row.get::<_, Option<Vec<u8>>>(2),
                    row.get::<_, i64>(3),
                ))
            })
        };
        let mut begun = begin(self);
        if begun.is_err() {
            // Nothing was written: once more on a new connection (the old one may have been
            // ended, by a failover or an administrator, before its client noticed).
            self.open.set(false);
            *self.conn.borrow_mut() = None;
            begun = begin(self);
        }
        let position = begun.and_then(|(seq, head, anchor, last)| {
            let head = match (seq, head) {
                (Some(seq), Some(bytes)) => Some(decode_audit(seq, &bytes)?),
                _ => None,
            };
            let anchor = anchor.map(|bytes| decode_anchor(&bytes)).transpose()?;
            Ok(Position::after(
                head.as_ref(),
                anchor.as_ref(),
                Revision(last as u64),
            ))
        });
        if position.is_err() {
            self.end_group();
        }
        position.map(Some)
    }

    /// Rolls back a group that did not commit (releasing the writers' lock with it).
    fn end_group(&mut self) {
        if self.open.replace(false) {
            let mut conn = self.conn.borrow_mut();
            if let Some(c) = conn.as_mut()
                && c.client.batch_execute("ROLLBACK").is_err()
            {
                *conn = None;
            }
        }
    }
}
