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
//! the connection was lost. A commit whose answer is lost leaves the outcome unknown, and the
//! core then fails the store for good.

use std::cell::{Cell, RefCell};

use postgres::{Client, NoTls, Statement};

use crate::model::{AuditAnchor, AuditRecord, Revision, SecretId};
use crate::store::StoreError;
use crate::store::codec;
use crate::store::commit::{Adapter, Change, Group, Position, RecordKey};

/// The commit core's adapter: one connection, owned by the writer thread.
pub struct PgAdapter {
    config: postgres::Config,
    schema: String,
    /// Reads come through `&self` (the writer thread owns the adapter alone).
    conn: RefCell<Option<Connection>>,
    /// A group's transaction is open on `conn`, from `begin_group` to its commit (or to the
    /// rollback in `end_group`).
    open: Cell<bool>,
}

/// A connection and the statements prepared on it.
struct Connection {
    client: Client,
    sql: Statements,
}

/// Every statement the adapter runs, prepared once per connection.
struct Statements {
    lock: Statement,
    head: Statement,
    anchor: Statement,
    last_revision: Statement,
    secret_rev: Statement,
    envelope_rev: Statement,
    lease_rev: Statement,
    meta_rev: Statement,
    envelope_versions: Statement,
    audit_entry: Statement,
    put_secret: Statement,
    put_envelope: Statement,
    delete_envelope: Statement,
    put_lease: Statement,
    delete_lease: Statement,
    put_meta: Statement,
    put_anchor: Statement,
    prune: Statement,
    append: Statement,
    set_revision: Statement,
}

impl Statements {
    fn prepare(client: &mut Client, s: &str) -> Result<Self, postgres::Error> {
        let mut p = |sql: String| client.prepare(&sql);
        Ok(Self {
            lock: p(format!(
                "SELECT pg_advisory_xact_lock(hashtext('byokd-commit:{s}'))"
            ))?,
            head: p(format!(
                "SELECT seq, record FROM {s}.audit ORDER BY seq DESC LIMIT 1"
            ))?,
            anchor: p(format!("SELECT record FROM {s}.anchor"))?,
            last_revision: p(format!("SELECT last_revision FROM {s}.position"))?,
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
            audit_entry: p(format!("SELECT record FROM {s}.audit WHERE seq = $1"))?,
            put_secret: p(format!(
                "INSERT INTO {s}.secrets (tenant, name, id, version, rev, record)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (tenant, name)
                 DO UPDATE SET id = $3, version = $4, rev = $5, record = $6"
            ))?,
            put_envelope: p(format!(
                "INSERT INTO {s}.envelopes (secret_id, version, rev, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (secret_id, version) DO UPDATE SET rev = $3, record = $4"
            ))?,
            delete_envelope: p(format!(
                "DELETE FROM {s}.envelopes WHERE secret_id = $1 AND version = $2"
            ))?,
            put_lease: p(format!(
                "INSERT INTO {s}.leases (token_hash, id, tenant, name, expires_at, rev, record)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (token_hash) DO UPDATE SET rev = $6, record = $7"
            ))?,
            delete_lease: p(format!("DELETE FROM {s}.leases WHERE token_hash = $1"))?,
            put_meta: p(format!(
                "INSERT INTO {s}.meta (name, rev, value) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET rev = $2, value = $3"
            ))?,
            put_anchor: p(format!(
                "INSERT INTO {s}.anchor (one, seq, record) VALUES (true, $1, $2)
                 ON CONFLICT (one) DO UPDATE SET seq = $1, record = $2"
            ))?,
            prune: p(format!("DELETE FROM {s}.audit WHERE seq <= $1"))?,
            append: p(format!(
                "INSERT INTO {s}.audit (seq, time, index_keys, record) VALUES ($1, $2, $3, $4)"
            ))?,
            set_revision: p(format!(
                "UPDATE {s}.position SET last_revision = greatest(last_revision, $1)"
            ))?,
        })
    }
}

fn uuid(id: SecretId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

fn stored(revision: Revision) -> i64 {
    revision.0 as i64
}

fn decode_audit(seq: i64, bytes: &[u8]) -> Result<AuditRecord, StoreError> {
    codec::decode(&codec::audit_key(seq as u64), bytes)
}

fn decode_anchor(bytes: &[u8]) -> Result<AuditAnchor, StoreError> {
    codec::decode(codec::AUDIT_ANCHOR_META, bytes)
}

/// An error of a statement before the commit: nothing of the group is written.
fn before_commit(e: impl std::fmt::Display) -> StoreError {
    StoreError::Transient(format!("PostgreSQL: {e}"))
}

impl PgAdapter {
    /// An adapter on the database `config` names, in `schema` (migrated already). Connects
    /// now, and refuses a server that does not make commits durable.
    pub fn connect(config: postgres::Config, schema: &str) -> Result<Self, StoreError> {
        super::schema::check_schema_name(schema)?;
        let adapter = Self {
            config,
            schema: schema.to_string(),
            conn: RefCell::new(None),
            open: Cell::new(false),
        };
        adapter.with(|_, _| Ok(()))?;
        Ok(adapter)
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
                return Err(before_commit("the connection was lost during the group"));
            }
            let mut client = self.config.connect(NoTls).map_err(before_commit)?;
            super::check_durable(&mut client)?;
            let sql = Statements::prepare(&mut client, &self.schema).map_err(before_commit)?;
            *conn = Some(Connection { client, sql });
        }
        match conn.as_mut() {
            Some(c) => work(&mut c.client, &c.sql).map_err(before_commit),
            None => Err(before_commit("no connection")),
        }
    }

    /// Where the chain and the revisions stand now (read as a group would, without writing).
    pub fn position(&mut self) -> Result<Position, StoreError> {
        let position = self.begin_group()?;
        self.end_group();
        position.ok_or_else(|| before_commit("no position"))
    }

    /// Writes the group's rows in the open transaction.
    fn write_rows(&self, group: &Group) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        for tx in &group.transactions {
            for change in &tx.changes {
                rows.push(Row::of(change)?);
            }
            if let Some(record) = &tx.audit {
                rows.push(Row::Audit(
                    record.seq as i64,
                    record.time.as_micros(),
                    codec::audit_index_prefixes(record),
                    codec::encode(record)?,
                ));
            }
        }
        self.with(|client, sql| {
            for row in &rows {
                row.write(client, sql)?;
            }
            client.execute(&sql.set_revision, &[&stored(group.last_revision)])?;
            Ok(())
        })
    }
}

/// A row to write, encoded.
enum Row {
    Secret(String, String, uuid::Uuid, i32, i64, Vec<u8>),
    Envelope(uuid::Uuid, i32, i64, Vec<u8>),
    DeleteEnvelope(uuid::Uuid, i32),
    Lease(Vec<u8>, uuid::Uuid, String, String, i64, i64, Vec<u8>),
    DeleteLease(Vec<u8>),
    Meta(&'static str, i64, Vec<u8>),
    Anchor(i64, Vec<u8>),
    Audit(i64, i64, Vec<Vec<u8>>, Vec<u8>),
}

impl Row {
    fn of(change: &Change) -> Result<Self, StoreError> {
        Ok(match change {
            Change::Secret(s) => Row::Secret(
                s.tenant.as_str().to_string(),
                s.name.as_str().to_string(),
                uuid(s.id),
                s.version as i32,
                stored(s.rev),
                codec::encode_record(s)?,
            ),
            Change::Envelope(e) => Row::Envelope(
                uuid(e.secret_id),
                e.version as i32,
                stored(e.rev),
                codec::encode_record(e)?,
            ),
            Change::DeleteEnvelope(id, version) => Row::DeleteEnvelope(uuid(*id), *version as i32),
            Change::NewLease(l) | Change::UpdateLease(l) => Row::Lease(
                l.token_hash.0.to_vec(),
                uuid::Uuid::from_bytes(*l.id.as_bytes()),
                l.tenant.as_str().to_string(),
                l.name.as_str().to_string(),
                l.expires_at.as_micros(),
                stored(l.rev),
                codec::encode_record(l)?,
            ),
            Change::DeleteLease(l) => Row::DeleteLease(l.token_hash.0.to_vec()),
            Change::Meta(key, revision, value) => {
                Row::Meta(key.name(), stored(*revision), value.clone())
            }
            Change::Anchor(anchor) => Row::Anchor(anchor.seq as i64, codec::encode(anchor)?),
        })
    }

    fn write(&self, client: &mut Client, sql: &Statements) -> Result<(), postgres::Error> {
        match self {
            Row::Secret(tenant, name, id, version, rev, record) => {
                client.execute(&sql.put_secret, &[tenant, name, id, version, rev, record])?
            }
            Row::Envelope(id, version, rev, record) => {
                client.execute(&sql.put_envelope, &[id, version, rev, record])?
            }
            Row::DeleteEnvelope(id, version) => {
                client.execute(&sql.delete_envelope, &[id, version])?
            }
            Row::Lease(hash, id, tenant, name, expires, rev, record) => client.execute(
                &sql.put_lease,
                &[hash, id, tenant, name, expires, rev, record],
            )?,
            Row::DeleteLease(hash) => client.execute(&sql.delete_lease, &[hash])?,
            Row::Meta(name, rev, value) => client.execute(&sql.put_meta, &[name, rev, value])?,
            Row::Anchor(seq, record) => {
                client.execute(&sql.put_anchor, &[seq, record])?;
                client.execute(&sql.prune, &[seq])?
            }
            Row::Audit(seq, time, keys, record) => {
                client.execute(&sql.append, &[seq, time, keys, record])?
            }
        };
        Ok(())
    }
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
            RecordKey::Envelope(id, version) => {
                client.query_opt(&sql.envelope_rev, &[&uuid(*id), &(*version as i32)])
            }
            RecordKey::Lease(hash) => client.query_opt(&sql.lease_rev, &[&hash.0.as_slice()]),
            RecordKey::Meta(meta) => client.query_opt(&sql.meta_rev, &[&meta.name()]),
        })?;
        Ok(row.map(|r| Revision(r.get::<_, i64>(0) as u64)))
    }

    fn envelope_versions(&self, secret_id: SecretId) -> Result<Vec<u32>, StoreError> {
        let rows =
            self.with(|client, sql| client.query(&sql.envelope_versions, &[&uuid(secret_id)]))?;
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
    /// and nothing is written; a commit whose answer does not come leaves the outcome
    /// unknown.
    fn write_group(&mut self, group: &Group) -> Result<(), StoreError> {
        if !self.open.get() {
            return Err(before_commit("no group is open"));
        }
        self.write_rows(group)?;
        self.open.set(false);
        let mut conn = self.conn.borrow_mut();
        let Some(c) = conn.as_mut() else {
            return Err(before_commit("the connection was lost during the group"));
        };
        match c.client.batch_execute("COMMIT") {
            Ok(()) => Ok(()),
            // The server answered: the transaction ended without committing.
            Err(e) if e.as_db_error().is_some() => Err(before_commit(e)),
            Err(e) => {
                *conn = None;
                Err(StoreError::Engine(format!(
                    "PostgreSQL: the outcome of a commit is unknown: {e}"
                )))
            }
        }
    }

    fn close(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Opens the group's transaction, takes the writers' lock, and reads where the chain
    /// and the revisions stand now.
    fn begin_group(&mut self) -> Result<Option<Position>, StoreError> {
        self.end_group();
        let begun = self.with(|client, sql| {
            client.batch_execute("BEGIN")?;
            self.open.set(true);
            client.execute(&sql.lock, &[])?;
            let head = client.query_opt(&sql.head, &[])?;
            let anchor = client.query_opt(&sql.anchor, &[])?;
            let last: i64 = client.query_one(&sql.last_revision, &[])?.get(0);
            Ok((head, anchor, last))
        });
        let position = begun.and_then(|(head, anchor, last)| {
            let head = head.map(|r| decode_audit(r.get(0), r.get(1))).transpose()?;
            let anchor = anchor.map(|r| decode_anchor(r.get(0))).transpose()?;
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
