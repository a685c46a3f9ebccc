//! A group's rows, written in one statement.
//!
//! Every group holds the cluster's writers' lock from BEGIN to COMMIT, so each round trip
//! under it is time no other group of any replica can use. A group's leases, secrets and
//! envelopes (each record as the group leaves it: the last change of a record wins), its
//! audit entries, the revision counter and the NOTIFY to the replicas' feeds go to the
//! server as one statement of data-modifying `WITH` clauses: column arrays that `unnest`
//! into upserts and deletes (the secrets' use into additive upserts, `activity.rs`), and the entries as one multi-row insert (a statement per count
//! of entries, prepared when first needed; more than [`ENTRIES_PER_STATEMENT`] take one more
//! statement per batch). Meta values and the anchor, written by rare commits, have statements
//! of their own.

use std::cell::RefCell;
use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Client, Statement};

use crate::model::Revision;
use crate::store::StoreError;
use crate::store::codec;
use crate::store::commit::{Change, Group};
use crate::store::usage::{Usage, UsageKey};

use super::activity;

/// Audit entries one statement inserts at most.
const ENTRIES_PER_STATEMENT: usize = 256;
/// The group statement's first parameter of the activity upserts, and of the entries.
const FIRST_ACTIVITY: usize = 27;
const FIRST_ENTRY: usize = FIRST_ACTIVITY + activity::PARAMS;

/// The write statements, for one schema on one connection.
pub(super) struct Writes {
    put_meta: Statement,
    delete_secret: Statement,
    put_anchor: Statement,
    prune: Statement,
    /// The group statement with n audit entries, by n (prepared when first needed).
    groups: RefCell<HashMap<usize, Statement>>,
    schema: String,
    channel: String,
}

impl Writes {
    pub(super) fn prepare(client: &mut Client, s: &str) -> Result<Self, postgres::Error> {
        Ok(Self {
            put_meta: client.prepare(&format!(
                "INSERT INTO {s}.meta (name, rev, value) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET rev = $2, value = $3"
            ))?,
            delete_secret: client.prepare(&format!(
                "DELETE FROM {s}.secrets WHERE tenant = $1 AND name = $2"
            ))?,
            put_anchor: client.prepare(&format!(
                "INSERT INTO {s}.anchor (one, seq, record) VALUES (true, $1, $2)
                 ON CONFLICT (one) DO UPDATE SET seq = $1, record = $2"
            ))?,
            prune: client.prepare(&format!("DELETE FROM {s}.audit WHERE seq <= $1"))?,
            groups: RefCell::default(),
            schema: s.to_string(),
            channel: super::feed::channel(s),
        })
    }

    /// The group statement that inserts `entries` audit entries (see [`GroupRows::write`]
    /// for its parameters).
    fn group(&self, client: &mut Client, entries: usize) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.groups.borrow().get(&entries) {
            return Ok(statement.clone());
        }
        let s = &self.schema;
        let mut sql = format!(
            "WITH put_leases AS (
               INSERT INTO {s}.leases (token_hash, id, tenant, name, expires_at, rev, record)
               SELECT * FROM unnest($1::bytea[], $2::uuid[], $3::text[], $4::text[],
                                    $5::int8[], $6::int8[], $7::bytea[])
               ON CONFLICT (token_hash) DO UPDATE SET rev = excluded.rev, record = excluded.record),
             delete_leases AS (DELETE FROM {s}.leases WHERE token_hash = ANY($8::bytea[])),
             put_secrets AS (
               INSERT INTO {s}.secrets (tenant, name, id, version, rev, record)
               SELECT * FROM unnest($9::text[], $10::text[], $11::uuid[], $12::int4[],
                                    $13::int8[], $14::bytea[])
               ON CONFLICT (tenant, name) DO UPDATE SET id = excluded.id,
                 version = excluded.version, rev = excluded.rev, record = excluded.record),
             put_envelopes AS (
               INSERT INTO {s}.envelopes (secret_id, version, rev, record)
               SELECT * FROM unnest($15::uuid[], $16::int4[], $17::int8[], $18::bytea[])
               ON CONFLICT (secret_id, version) DO UPDATE SET rev = excluded.rev,
                 record = excluded.record),
             delete_envelopes AS (
               DELETE FROM {s}.envelopes e USING unnest($19::uuid[], $20::int4[]) AS k(id, version)
               WHERE e.secret_id = k.id AND e.version = k.version),
             counter AS (
               UPDATE {s}.position SET last_revision = greatest(last_revision, $21::int8)),
             put_usage AS (
               INSERT INTO {s}.usage (tenant, secrets, value_bytes, leases)
               SELECT * FROM unnest($23::text[], $24::int8[], $25::int8[], $26::int8[])
               ON CONFLICT (tenant) DO UPDATE SET secrets = excluded.secrets,
                 value_bytes = excluded.value_bytes, leases = excluded.leases),
             {}",
            activity::upserts(s, FIRST_ACTIVITY)
        );
        if entries > 0 {
            let values = (0..entries)
                .map(|i| {
                    let p = FIRST_ENTRY + 4 * i;
                    format!("(${}, ${}, ${}, ${})", p, p + 1, p + 2, p + 3)
                })
                .collect::<Vec<_>>()
                .join(", ");
            sql.push_str(&format!(
                ", entries AS (INSERT INTO {s}.audit (seq, time, index_keys, record) VALUES {values})"
            ));
        }
        // Delivered to the listeners (every replica's feed) only if the group commits.
        sql.push_str(&format!(
            " SELECT pg_notify('{}', $22::text) WHERE $22::text IS NOT NULL",
            self.channel
        ));
        let statement = client.prepare(&sql)?;
        self.groups.borrow_mut().insert(entries, statement.clone());
        Ok(statement)
    }
}

/// A lease as written.
struct LeaseRow {
    id: uuid::Uuid,
    tenant: String,
    name: String,
    expires_at: i64,
    rev: i64,
    record: Vec<u8>,
}

/// A secret as written.
struct SecretRow {
    id: uuid::Uuid,
    version: i32,
    rev: i64,
    record: Vec<u8>,
}

/// An envelope as written: its revision and record.
type EnvelopeRow = (i64, Vec<u8>);

/// An audit entry as written.
struct EntryRow {
    seq: i64,
    time: i64,
    index_keys: Vec<Vec<u8>>,
    record: Vec<u8>,
}

/// What a group leaves written, encoded.
pub(super) struct GroupRows {
    /// By token hash: the lease as the group leaves it (`None`: deleted).
    leases: HashMap<Vec<u8>, Option<LeaseRow>>,
    /// By tenant and name: the secret as the group leaves it (`None`: deleted).
    secrets: HashMap<(String, String), Option<SecretRow>>,
    /// By secret id and version: the envelope as the group leaves it (`None`: deleted).
    envelopes: HashMap<(uuid::Uuid, i32), Option<EnvelopeRow>>,
    metas: Vec<(&'static str, i64, Vec<u8>)>,
    anchor: Option<(i64, Vec<u8>)>,
    entries: Vec<EntryRow>,
    last_revision: i64,
    /// The usage the group leaves.
    usage: UsageColumns,
    /// What its entries add to the secrets' use.
    activity: activity::Columns,
}

/// Usage rows as columns, for `unnest`: keys, then secrets, value bytes and leases.
#[derive(Default)]
pub(super) struct UsageColumns {
    pub(super) keys: Vec<String>,
    pub(super) counts: [Vec<i64>; 3],
}

impl UsageColumns {
    /// The columns of `usage`.
    pub(super) fn of<'a>(usage: impl IntoIterator<Item = (&'a UsageKey, &'a Usage)>) -> Self {
        let mut columns = Self::default();
        for (key, usage) in usage {
            columns.keys.push(key.as_str().to_string());
            let counts = [usage.secrets, usage.value_bytes, usage.leases];
            for (column, n) in columns.counts.iter_mut().zip(counts) {
                column.push(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        columns
    }
}

/// A secret's or a lease's id as PostgreSQL's `uuid`.
pub(super) fn uuid(id: &[u8; 16]) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id)
}

pub(super) fn stored(revision: Revision) -> i64 {
    revision.0 as i64
}

/// A usage row's counts: secrets, value bytes and leases in the columns from `first` on.
pub(super) fn usage_of(row: &postgres::Row, first: usize) -> Usage {
    let count = |i| row.get::<_, i64>(first + i).max(0) as u64;
    Usage {
        secrets: count(0),
        value_bytes: count(1),
        leases: count(2),
    }
}

impl GroupRows {
    /// The rows `group` writes.
    pub(super) fn of(group: &Group) -> Result<Self, StoreError> {
        let mut rows = Self {
            leases: HashMap::new(),
            secrets: HashMap::new(),
            envelopes: HashMap::new(),
            metas: Vec::new(),
            anchor: None,
            entries: Vec::new(),
            last_revision: stored(group.last_revision),
            usage: UsageColumns::of(group.usage.iter().map(|(k, u)| (k, u))),
            activity: activity::Columns::of(&group.activity),
        };
        for tx in &group.transactions {
            for change in &tx.changes {
                rows.add(change)?;
            }
            if let Some(entry) = &tx.audit {
                rows.entries.push(EntryRow {
                    seq: entry.seq as i64,
                    time: entry.time.as_micros(),
                    index_keys: codec::audit_index_prefixes(entry),
                    record: codec::encode(entry)?,
                });
            }
        }
        Ok(rows)
    }

    fn add(&mut self, change: &Change) -> Result<(), StoreError> {
        match change {
            Change::Secret(s) => {
                self.secrets.insert(
                    (s.tenant.as_str().to_string(), s.name.as_str().to_string()),
                    Some(SecretRow {
                        id: uuid(s.id.as_bytes()),
                        version: s.version as i32,
                        rev: stored(s.rev),
                        record: codec::encode_record(s)?,
                    }),
                );
            }
            Change::DeleteSecret(tenant, name) => {
                self.secrets.insert(
                    (tenant.as_str().to_string(), name.as_str().to_string()),
                    None,
                );
            }
            Change::Envelope(e) => {
                self.envelopes.insert(
                    (uuid(e.secret_id.as_bytes()), e.version as i32),
                    Some((stored(e.rev), codec::encode_record(e)?)),
                );
            }
            Change::DeleteEnvelope(id, version) => {
                self.envelopes
                    .insert((uuid(id.as_bytes()), *version as i32), None);
            }
            Change::NewLease(l) | Change::UpdateLease(l) => {
                self.leases.insert(
                    l.token_hash.0.to_vec(),
                    Some(LeaseRow {
                        id: uuid::Uuid::from_bytes(*l.id.as_bytes()),
                        tenant: l.tenant.as_str().to_string(),
                        name: l.name.as_str().to_string(),
                        expires_at: l.expires_at.as_micros(),
                        rev: stored(l.rev),
                        record: codec::encode_record(l)?,
                    }),
                );
            }
            Change::DeleteLease(l) => {
                self.leases.insert(l.token_hash.0.to_vec(), None);
            }
            Change::Meta(key, revision, value) => {
                self.metas
                    .push((key.name(), stored(*revision), value.clone()))
            }
            Change::Anchor(anchor) => {
                self.anchor = Some((anchor.seq as i64, codec::encode(anchor)?));
            }
        }
        Ok(())
    }

    /// Writes the rows in the open transaction: meta values, the anchor and deleted secrets
    /// (purges) one by one, then everything else in one statement (one more per
    /// [`ENTRIES_PER_STATEMENT`] entries).
    pub(super) fn write(&self, client: &mut Client, sql: &Writes) -> Result<(), postgres::Error> {
        for (name, rev, value) in &self.metas {
            client.execute(&sql.put_meta, &[name, rev, value])?;
        }
        if let Some((seq, record)) = &self.anchor {
            client.execute(&sql.put_anchor, &[seq, record])?;
            client.execute(&sql.prune, &[seq])?;
        }
        let mut all = Columns::default();
        for (hash, lease) in &self.leases {
            match lease {
                Some(l) => all.put_leases.push(hash, l),
                None => all.delete_leases.push(hash),
            }
        }
        for ((tenant, name), s) in &self.secrets {
            match s {
                Some(s) => all.secrets.push(tenant, name, s),
                None => {
                    client.execute(&sql.delete_secret, &[tenant, name])?;
                }
            }
        }
        for ((id, version), envelope) in &self.envelopes {
            match envelope {
                Some((rev, record)) => all.put_envelopes.push(*id, *version, *rev, record),
                None => {
                    all.gone_ids.push(*id);
                    all.gone_versions.push(*version);
                }
            }
        }
        all.notify = self.entries.last().map(|e| e.seq.to_string());
        all.usage = Some(&self.usage);
        all.activity = Some(&self.activity);
        let none = Columns::default();
        let no_usage = UsageColumns::default();
        let no_activity = activity::Columns::default();
        let chunks: Vec<&[EntryRow]> = if self.entries.is_empty() {
            vec![&[]]
        } else {
            self.entries.chunks(ENTRIES_PER_STATEMENT).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            // The records and the NOTIFY go with the last batch of entries.
            let columns = if i == last { &all } else { &none };
            let (l, s, e) = (
                &columns.put_leases,
                &columns.secrets,
                &columns.put_envelopes,
            );
            let usage = columns.usage.unwrap_or(&no_usage);
            let activity = columns.activity.unwrap_or(&no_activity);
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                &l.hash,
                &l.id,
                &l.tenant,
                &l.name,
                &l.expires_at,
                &l.rev,
                &l.record,
                &columns.delete_leases,
                &s.tenant,
                &s.name,
                &s.id,
                &s.version,
                &s.rev,
                &s.record,
                &e.id,
                &e.version,
                &e.rev,
                &e.record,
                &columns.gone_ids,
                &columns.gone_versions,
                &self.last_revision,
                &columns.notify,
                &usage.keys,
                &usage.counts[0],
                &usage.counts[1],
                &usage.counts[2],
            ];
            params.extend(activity.params());
            for entry in chunk {
                params.extend([
                    &entry.seq as &(dyn ToSql + Sync),
                    &entry.time,
                    &entry.index_keys,
                    &entry.record,
                ]);
            }
            let statement = sql.group(client, chunk.len())?;
            client.query(&statement, &params)?;
        }
        Ok(())
    }
}

/// The parameters of the group statement but the counter and the entries (see
/// [`Writes::group`]); empty for a statement that only inserts entries.
#[derive(Default)]
struct Columns<'a> {
    put_leases: LeaseColumns<'a>,
    delete_leases: Vec<&'a [u8]>,
    secrets: SecretColumns<'a>,
    put_envelopes: EnvelopeColumns<'a>,
    gone_ids: Vec<uuid::Uuid>,
    gone_versions: Vec<i32>,
    notify: Option<String>,
    /// The usage rows (none in a statement that only inserts entries).
    usage: Option<&'a UsageColumns>,
    /// What the group adds to the secrets' use (likewise).
    activity: Option<&'a activity::Columns>,
}

/// Leases' columns, for `unnest`.
#[derive(Default)]
struct LeaseColumns<'a> {
    hash: Vec<&'a [u8]>,
    id: Vec<uuid::Uuid>,
    tenant: Vec<&'a str>,
    name: Vec<&'a str>,
    expires_at: Vec<i64>,
    rev: Vec<i64>,
    record: Vec<&'a [u8]>,
}

impl<'a> LeaseColumns<'a> {
    fn push(&mut self, hash: &'a [u8], l: &'a LeaseRow) {
        self.hash.push(hash);
        self.id.push(l.id);
        self.tenant.push(&l.tenant);
        self.name.push(&l.name);
        self.expires_at.push(l.expires_at);
        self.rev.push(l.rev);
        self.record.push(&l.record);
    }
}

/// Secrets' columns, for `unnest`.
#[derive(Default)]
struct SecretColumns<'a> {
    tenant: Vec<&'a str>,
    name: Vec<&'a str>,
    id: Vec<uuid::Uuid>,
    version: Vec<i32>,
    rev: Vec<i64>,
    record: Vec<&'a [u8]>,
}

impl<'a> SecretColumns<'a> {
    fn push(&mut self, tenant: &'a str, name: &'a str, s: &'a SecretRow) {
        self.tenant.push(tenant);
        self.name.push(name);
        self.id.push(s.id);
        self.version.push(s.version);
        self.rev.push(s.rev);
        self.record.push(&s.record);
    }
}

/// Envelopes' columns, for `unnest`.
#[derive(Default)]
struct EnvelopeColumns<'a> {
    id: Vec<uuid::Uuid>,
    version: Vec<i32>,
    rev: Vec<i64>,
    record: Vec<&'a [u8]>,
}

impl<'a> EnvelopeColumns<'a> {
    fn push(&mut self, id: uuid::Uuid, version: i32, rev: i64, record: &'a [u8]) {
        self.id.push(id);
        self.version.push(version);
        self.rev.push(rev);
        self.record.push(record);
    }
}
