//! The PostgreSQL schema and its migrations.
//!
//! Migrations are numbered and applied in order, each once, in one transaction under a
//! transaction-scoped advisory lock named after the schema: replicas that start at once (or
//! `byokd migrate` beside them) apply each migration exactly once and none sees a half-made
//! schema. They are expand/contract: a migration only adds what the running version does not
//! use yet, and what an older version still uses is dropped only once no replica runs it,
//! so that two versions can run side by side during a rolling deploy. A database that already
//! has migrations this build does not know (a newer version ran) is used as it is.

use postgres::GenericClient;

use crate::model::TenantId;
use crate::store::StoreError;
use crate::store::codec;
use crate::store::usage::Tally;

use super::rows::UsageColumns;

use super::pg_error;

/// One step of the schema.
pub struct Migration {
    /// Its number: migrations apply in this order.
    pub version: i32,
    /// What it does.
    pub name: &'static str,
    /// Its statements, with `{schema}` for the schema's name.
    sql: &'static str,
    /// What it fills in after its statements, in the same transaction.
    fill: Option<Fill>,
}

/// A migration's step in Rust, given the transaction and the schema's name.
type Fill = fn(&mut postgres::Transaction<'_>, &str) -> Result<(), StoreError>;

/// Every migration this build knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "records, audit trail and commit position",
        sql: include_str!("migrations/0001.sql"),
        fill: None,
    },
    Migration {
        version: 2,
        name: "usage per tenant",
        sql: include_str!("migrations/0002.sql"),
        fill: Some(count_usage),
    },
    Migration {
        version: 3,
        name: "the secrets' use",
        sql: include_str!("migrations/0003.sql"),
        fill: Some(super::activity::count_trail),
    },
];

/// Fills the usage table from the records, under the writers' lock (so that no group of any
/// replica commits meanwhile): the envelopes (active secrets and their sealed values) and
/// the lease records.
fn count_usage(tx: &mut postgres::Transaction<'_>, s: &str) -> Result<(), StoreError> {
    use postgres::fallible_iterator::FallibleIterator;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock(hashtext('byokd-commit:{s}'))"
    ))
    .map_err(pg_error)?;
    let mut tally = Tally::default();
    let table = |name: &str| format!("{s}.{name}");
    let mut rows = tx
        .query_raw(&format!("SELECT record FROM {s}.envelopes"), no_params())
        .map_err(pg_error)?;
    while let Some(row) = rows.next().map_err(pg_error)? {
        let record = row.get::<_, &[u8]>(0);
        tally.envelope(&codec::decode_record(
            table("envelopes").as_bytes(),
            record,
        )?);
    }
    drop(rows);
    let leases = tx
        .query(
            &format!("SELECT tenant, count(*) FROM {s}.leases GROUP BY tenant"),
            &[],
        )
        .map_err(pg_error)?;
    for row in &leases {
        let tenant = row.get::<_, &str>(0);
        let tenant = TenantId::parse(tenant).map_err(|e| StoreError::Corrupt {
            key: table("leases"),
            reason: format!("a lease's tenant: {e}"),
        })?;
        tally.leases(&tenant, row.get::<_, i64>(1).max(0) as u64);
    }
    let counted = UsageColumns::of(&tally.finish());
    tx.execute(
        &format!(
            "INSERT INTO {s}.usage (tenant, secrets, value_bytes, leases)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[])"
        ),
        &[
            &counted.keys,
            &counted.counts[0],
            &counted.counts[1],
            &counted.counts[2],
        ],
    )
    .map_err(pg_error)?;
    Ok(())
}

/// No parameters, for `query_raw`.
fn no_params() -> std::iter::Empty<&'static (dyn postgres::types::ToSql + Sync)> {
    std::iter::empty()
}

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The migrations it applied now.
    pub applied: Vec<i32>,
    /// The latest migration in the database afterwards (a newer build's may be later than
    /// any this build knows).
    pub latest: i32,
}

/// Checks that `schema` is a plain identifier (it is spliced into statements).
pub fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if first_ok
        && schema.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Ok(())
    } else {
        Err(StoreError::Engine(format!(
            "schema name {schema:?}: use 1 to 63 lowercase letters, digits and underscores, \
             not starting with a digit"
        )))
    }
}

/// Applies the migrations `schema` lacks, creating the schema if needed.
pub fn migrate(client: &mut impl GenericClient, schema: &str) -> Result<Migrated, StoreError> {
    check_schema_name(schema)?;
    let mut tx = client.transaction().map_err(pg_error)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('byokd-migrate:' || $1))",
        &[&schema],
    )
    .map_err(pg_error)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .map_err(pg_error)?;
    let row = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.schema_migrations"),
            &[],
        )
        .map_err(pg_error)?;
    let recorded: i32 = row.get(0);
    let mut latest = recorded;
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > recorded) {
        tx.batch_execute(&migration.sql.replace("{schema}", schema))
            .map_err(pg_error)?;
        if let Some(fill) = migration.fill {
            fill(&mut tx, schema)?;
        }
        tx.execute(
            &format!("INSERT INTO {schema}.schema_migrations (version, name) VALUES ($1, $2)"),
            &[&migration.version, &migration.name],
        )
        .map_err(pg_error)?;
        applied.push(migration.version);
        latest = migration.version;
    }
    tx.commit().map_err(pg_error)?;
    Ok(Migrated { applied, latest })
}

/// The schema a restore into `schema` fills and checks first.
pub fn staging_name(schema: &str) -> Result<String, StoreError> {
    let staging = format!("{schema}_restoring");
    check_schema_name(&staging)?;
    Ok(staging)
}

/// Whether `schema` holds any record, meta value or audit entry (a schema that does not
/// exist, or that `byokd migrate` only created, holds none).
pub fn holds_records(client: &mut impl GenericClient, schema: &str) -> Result<bool, StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .map_err(pg_error)?
        .get(0);
    if !exists {
        return Ok(false);
    }
    let any = ["meta", "secrets", "envelopes", "anchor", "audit"]
        .iter()
        .map(|table| format!("EXISTS (SELECT 1 FROM {schema}.{table})"))
        .collect::<Vec<_>>()
        .join(" OR ");
    Ok(client
        .query_one(&format!("SELECT {any}"), &[])
        .map_err(pg_error)?
        .get(0))
}

/// Drops `schema` and everything in it, if it exists.
pub fn drop_schema(client: &mut impl GenericClient, schema: &str) -> Result<(), StoreError> {
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .map_err(pg_error)
}

/// Makes the restore's staging schema `schema`, in one transaction, under the migration lock
/// (so that no process creates `schema` meanwhile), if `schema` still holds nothing.
pub fn promote_staging(client: &mut postgres::Client, schema: &str) -> Result<(), StoreError> {
    let staging = staging_name(schema)?;
    let mut tx = client.transaction().map_err(pg_error)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('byokd-migrate:' || $1))",
        &[&schema],
    )
    .map_err(pg_error)?;
    if holds_records(&mut tx, schema)? {
        return Err(StoreError::Engine(format!(
            "schema {schema} holds records now: a restore goes only into an empty one"
        )));
    }
    drop_schema(&mut tx, schema)?;
    tx.batch_execute(&format!("ALTER SCHEMA {staging} RENAME TO {schema}"))
        .map_err(pg_error)?;
    tx.commit().map_err(pg_error)
}
