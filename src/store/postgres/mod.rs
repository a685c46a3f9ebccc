//! The PostgreSQL engine, for several byokd replicas on one database (being built, issue
//! 17): the schema and its migrations ([`schema`]), the commit core's adapter
//! ([`PgAdapter`]), whose groups of every process extend one audit chain, and the store
//! ([`PgStore`]), which passes the shared store suite with two handles as two processes.
//! `[store] kind = "postgres"` opens it (through `store::Engine`); `tests/it/replicas.rs`
//! runs two byokd processes on one database.

mod activity;
mod adapter;
mod feed;
mod redemptions;
mod rows;
pub mod schema;
mod store;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
mod tls;

pub use adapter::PgAdapter;
pub use schema::Migrated;
pub use store::PgStore;
pub use tls::Target;

use zeroize::Zeroizing;

use crate::store::StoreError;

/// A failed statement outside a group, as a store error.
fn pg_error(e: postgres::Error) -> StoreError {
    StoreError::Engine(format!("PostgreSQL: {e}"))
}

/// A failure that wrote nothing (a read, a lost connection, a statement before COMMIT): its
/// callers get UNAVAILABLE, and the next attempt may succeed.
fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Transient(format!("PostgreSQL: {e}"))
}

/// What every session of byokd's sets first: each execution of a prepared statement is
/// planned for its parameters and the tables as they are then. (By default a statement run
/// five times may switch to a generic plan, and one chosen while a table was small keeps
/// scanning it whole as it grows, until the next ANALYZE: measured, the writer then spent a
/// CPU on reading the whole audit table in each group. BENCHMARKS.md.)
const SESSION_SETTINGS: &str = "SET plan_cache_mode = force_custom_plan";

/// Refuses a server that would acknowledge a commit it can lose in a crash, and makes this
/// session's commits wait for the server's write-ahead log to be on disk (with
/// [`SESSION_SETTINGS`]).
fn check_durable(client: &mut postgres::Client) -> Result<(), StoreError> {
    let fsync: String = client
        .query_one("SHOW fsync", &[])
        .map_err(pg_error)?
        .get(0);
    refuse_unsafe(&fsync)?;
    client
        .batch_execute(&format!("SET synchronous_commit = on; {SESSION_SETTINGS}"))
        .map_err(pg_error)
}

/// The check of [`check_durable`] on the server's `fsync` setting.
fn refuse_unsafe(fsync: &str) -> Result<(), StoreError> {
    if fsync == "on" {
        Ok(())
    } else {
        Err(StoreError::Engine(format!(
            "PostgreSQL runs with fsync = {fsync}: a commit it acknowledges can be lost in a \
             crash, so byokd does not use it (set fsync = on)"
        )))
    }
}

/// A PostgreSQL connection URL: it may hold a password, so it is never printed and is
/// cleared from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(Zeroizing<String>);

impl DatabaseUrl {
    /// The URL `text`, checked to be one PostgreSQL's client accepts.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rest, _) = tls::split(text)?;
        match rest.parse::<tokio_postgres::Config>() {
            Ok(_) if text.starts_with("postgres://") || text.starts_with("postgresql://") => {
                Ok(Self(Zeroizing::new(text.to_string())))
            }
            _ => Err(
                "store.url: not a PostgreSQL URL like postgres://byokd@db.internal:5432/byokd \
                 (the error is not shown: the URL may hold a password)"
                    .into(),
            ),
        }
    }

    /// Whether the URL holds a password (the file it is in must then be private).
    pub fn has_password(&self) -> bool {
        tls::split(&self.0)
            .ok()
            .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().ok())
            .is_some_and(|c| c.get_password().is_some())
    }

    /// Where to connect, and how (see [`tls`]).
    pub(crate) fn target(&self) -> Result<Target, StoreError> {
        let (rest, protection) = tls::split(&self.0).map_err(StoreError::Engine)?;
        let rest = Zeroizing::new(rest);
        let config = rest
            .parse()
            .map_err(|_| StoreError::Engine("store.url is not a PostgreSQL URL".into()))?;
        if protection == tls::Protection::Plain && !local(&config) {
            tracing::warn!(
                "connecting to PostgreSQL on another host without TLS: add \
                 sslmode=verify-full to store.url"
            );
        }
        Target::new(config, &protection)
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

/// Whether every host of `config` is this machine (a socket, or a loopback address).
fn local(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => true,
    })
}

/// Applies the migrations `schema` of the database at `url` lacks (`byokd migrate`).
pub async fn migrate(url: &DatabaseUrl, schema: &str) -> Result<Migrated, StoreError> {
    let target = url.target()?;
    let schema = schema.to_string();
    // The blocking client runs a runtime of its own: not on an async worker.
    tokio::task::spawn_blocking(move || migrate_blocking(&target, &schema))
        .await
        .map_err(|e| StoreError::Engine(format!("migrate: {e}")))?
}

/// [`migrate`] on the calling (blocking) thread, on a connection of its own; refuses a
/// server that does not make commits durable. A store does this at open.
fn migrate_blocking(target: &Target, schema: &str) -> Result<Migrated, StoreError> {
    let mut client = target.connect_blocking()?;
    check_durable(&mut client)?;
    schema::migrate(&mut client, schema)
}

/// A restore into `schema` of the database at `url`, staged in a schema of its own: what it
/// does before, on success and on failure (each on a connection of its own).
pub enum Staging {
    /// Fails unless `schema` holds nothing, then drops a staging schema an interrupted
    /// restore left.
    Begin,
    /// Makes the staging schema `schema` (if `schema` still holds nothing).
    Promote,
    /// Drops the staging schema.
    Discard,
}

/// Runs `step` of a restore into `schema`; returns the staging schema's name.
pub async fn staging(url: &DatabaseUrl, schema: &str, step: Staging) -> Result<String, StoreError> {
    let target = url.target()?;
    let schema = schema.to_string();
    tokio::task::spawn_blocking(move || {
        let staging = schema::staging_name(&schema)?;
        let mut client = target.connect_blocking()?;
        match step {
            Staging::Begin => {
                if schema::holds_records(&mut client, &schema)? {
                    return Err(StoreError::Engine(format!(
                        "schema {schema} already holds records; restore only into an empty one"
                    )));
                }
                schema::drop_schema(&mut client, &staging)?;
            }
            Staging::Promote => schema::promote_staging(&mut client, &schema)?,
            Staging::Discard => schema::drop_schema(&mut client, &staging)?,
        }
        Ok(staging)
    })
    .await
    .map_err(|e| StoreError::Engine(format!("restore: {e}")))?
}
