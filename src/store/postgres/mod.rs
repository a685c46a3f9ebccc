//! The PostgreSQL engine, for several byokd replicas on one database (being built, issue
//! 17): the schema and its migrations ([`schema`]), the commit core's adapter
//! ([`PgAdapter`]), whose groups of every process extend one audit chain, and the store
//! ([`PgStore`]), which passes the shared store suite with two handles as two processes.
//! `[store] kind = "postgres"` opens it (through `store::Engine`); `tests/it/replicas.rs`
//! runs two byokd processes on one database.

mod adapter;
pub mod schema;
mod store;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use adapter::PgAdapter;
pub use store::PgStore;

use crate::store::StoreError;

/// A failed statement outside a group, as a store error.
fn pg_error(e: postgres::Error) -> StoreError {
    StoreError::Engine(format!("PostgreSQL: {e}"))
}

/// Refuses a server that would acknowledge a commit it can lose in a crash, and makes this
/// session's commits wait for the server's write-ahead log to be on disk.
fn check_durable(client: &mut postgres::Client) -> Result<(), StoreError> {
    let fsync: String = client
        .query_one("SHOW fsync", &[])
        .map_err(pg_error)?
        .get(0);
    refuse_unsafe(&fsync)?;
    client
        .batch_execute("SET synchronous_commit = on")
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
