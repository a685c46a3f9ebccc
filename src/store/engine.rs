//! Which storage engine a data directory uses (`[store] kind`), and the one place that opens,
//! imports into and repairs it: nothing outside `store/` names an adapter.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::postgres::{
    DatabaseUrl, Migrated, PgStore, Staging, migrate as migrate_postgres, staging as pg_staging,
};
use super::sled::{DEFAULT_CACHE_BYTES, RepairPlan, SledStore};
use super::{DEFAULT_AUDIT_SEGMENT_BYTES, Store, StoreError};

/// The engines `[store] kind` may name.
pub const KINDS: &[&str] = &["sled", "postgres"];

/// A configured engine and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// The embedded default: sled for the records and segment files for the audit trail, in
    /// `<data_dir>/db`.
    Sled {
        /// sled's page cache, in bytes.
        cache_bytes: u64,
        /// Size at which the audit trail starts a new segment, in bytes.
        audit_segment_bytes: u64,
    },
    /// A PostgreSQL database that several byokd processes may share.
    Postgres {
        /// Where the database is (with its credentials).
        url: DatabaseUrl,
        /// The schema byokd's tables are in.
        schema: String,
        /// The most connections this process opens for reads (besides its writer's one).
        pool_size: usize,
    },
}

/// Where a sled store lives in its data directory.
fn sled_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

/// Where a restore fills and checks a sled store before it becomes `db`.
fn sled_staging_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("db.restoring")
}

fn engine_io(e: std::io::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl Default for Engine {
    fn default() -> Self {
        Engine::Sled {
            cache_bytes: DEFAULT_CACHE_BYTES,
            audit_segment_bytes: DEFAULT_AUDIT_SEGMENT_BYTES,
        }
    }
}

impl Engine {
    /// Whether several processes may use the store at once (sled's data directory is locked
    /// by the one process that opened it).
    pub fn shared(&self) -> bool {
        matches!(self, Engine::Postgres { .. })
    }

    /// The message for a `kind` that names no engine: it names the kinds there are.
    pub fn unknown_kind(kind: &str) -> String {
        format!(
            "store.kind: unknown engine {kind:?}; the engines are: {}",
            KINDS.join(", ")
        )
    }

    /// Where the store of `data_dir` lives: a directory for sled; `None` for an engine
    /// elsewhere.
    pub fn location(&self, data_dir: &Path) -> Option<PathBuf> {
        match self {
            Engine::Sled { .. } => Some(sled_dir(data_dir)),
            Engine::Postgres { .. } => None,
        }
    }

    /// Where the store is, for the operator: the data directory, or the database's schema
    /// (never the URL, which may hold a password).
    pub fn describe(&self, data_dir: &Path) -> String {
        match self {
            Engine::Sled { .. } => data_dir.display().to_string(),
            Engine::Postgres { schema, .. } => format!("the PostgreSQL schema {schema}"),
        }
    }

    /// Opens (or creates) the store of `data_dir` (sled) or of the database (PostgreSQL,
    /// applying the migrations it lacks).
    pub async fn open(&self, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            Engine::Sled { .. } => self.open_at(&sled_dir(data_dir)),
            Engine::Postgres {
                url,
                schema,
                pool_size,
            } => Ok(Arc::new(
                PgStore::open(url.target()?, schema, *pool_size).await?,
            )),
        }
    }

    /// Applies the schema migrations the database lacks (`byokd migrate`); `None` for sled,
    /// which migrates a store when it opens it.
    pub async fn migrate(&self) -> Result<Option<Migrated>, StoreError> {
        match self {
            Engine::Sled { .. } => Ok(None),
            Engine::Postgres { url, schema, .. } => migrate_postgres(url, schema).await.map(Some),
        }
    }

    /// Opens (or creates) a sled store at `location` (a restore's staging directory).
    pub fn open_at(&self, location: &Path) -> Result<Arc<dyn Store>, StoreError> {
        match *self {
            Engine::Sled {
                cache_bytes,
                audit_segment_bytes,
            } => Ok(Arc::new(SledStore::open_with(
                location,
                cache_bytes,
                audit_segment_bytes,
            )?)),
            Engine::Postgres { .. } => Err(StoreError::Engine(
                "a PostgreSQL store has no location in the data directory".into(),
            )),
        }
    }

    /// Opens a new, empty store for a restore into this engine's store, which must hold
    /// nothing: a staging directory in `data_dir` (sled), a staging schema (PostgreSQL).
    /// Whatever an interrupted restore left there is discarded. [`promote_staging`] makes it
    /// the store once it is filled, checked and closed; [`discard_staging`] drops it.
    ///
    /// [`promote_staging`]: Self::promote_staging
    /// [`discard_staging`]: Self::discard_staging
    pub async fn open_staging(&self, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            Engine::Sled { .. } => {
                let db = sled_dir(data_dir);
                if db.exists() {
                    return Err(StoreError::Engine(format!(
                        "{} already holds a database; restore only into an empty data directory",
                        db.display()
                    )));
                }
                let staging = sled_staging_dir(data_dir);
                if staging.exists() {
                    // Left by an interrupted restore: never served, safe to discard.
                    std::fs::remove_dir_all(&staging).map_err(engine_io)?;
                }
                self.open_at(&staging)
            }
            Engine::Postgres {
                url,
                schema,
                pool_size,
            } => {
                let staging = pg_staging(url, schema, Staging::Begin).await?;
                Ok(Arc::new(
                    PgStore::open(url.target()?, &staging, *pool_size).await?,
                ))
            }
        }
    }

    /// Makes the (closed) staging store of [`open_staging`](Self::open_staging) the store.
    pub async fn promote_staging(&self, data_dir: &Path) -> Result<(), StoreError> {
        match self {
            Engine::Sled { .. } => {
                let db = sled_dir(data_dir);
                std::fs::rename(sled_staging_dir(data_dir), &db).map_err(engine_io)?;
                std::fs::File::open(data_dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(engine_io)
            }
            Engine::Postgres { url, schema, .. } => {
                pg_staging(url, schema, Staging::Promote).await.map(drop)
            }
        }
    }

    /// Drops the staging store of a restore that failed.
    pub async fn discard_staging(&self, data_dir: &Path) -> Result<(), StoreError> {
        match self {
            Engine::Sled { .. } => match std::fs::remove_dir_all(sled_staging_dir(data_dir)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(engine_io(e)),
                _ => Ok(()),
            },
            Engine::Postgres { url, schema, .. } => {
                pg_staging(url, schema, Staging::Discard).await.map(drop)
            }
        }
    }

    /// For `byokd audit repair`, on a stopped server's store: where its trail is damaged, if
    /// it is.
    pub fn plan_repair_at(&self, location: &Path) -> Result<Option<RepairPlan>, StoreError> {
        match self {
            Engine::Sled { .. } => SledStore::plan_repair(location),
            Engine::Postgres { .. } => Err(StoreError::Engine(
                "byokd audit repair mends the sled engine's trail files; PostgreSQL keeps the \
                 trail in its own durable tables"
                    .into(),
            )),
        }
    }

    /// Cuts the trail as `plan` says (copies of the damaged files go to `quarantine`) and
    /// leaves `note` for the `Repair` entry.
    pub fn apply_repair_at(
        &self,
        location: &Path,
        plan: &RepairPlan,
        quarantine: &Path,
        note: &str,
    ) -> Result<Vec<PathBuf>, StoreError> {
        match self {
            Engine::Sled { .. } => SledStore::apply_repair(location, plan, quarantine, note),
            Engine::Postgres { .. } => self.plan_repair_at(location).map(|_| Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_kind_names_the_kinds_there_are() {
        let err = Engine::unknown_kind("postgres-ish");
        assert!(
            err.contains("\"postgres-ish\"") && err.contains("sled") && err.contains("postgres"),
            "{err}"
        );
    }

    #[test]
    fn a_database_url_is_never_printed() {
        let url = DatabaseUrl::parse("postgres://byokd:hunter2@db.internal:5432/byokd").unwrap();
        assert!(url.has_password());
        assert_eq!(format!("{url:?}"), "DatabaseUrl(..)");
        let engine = Engine::Postgres {
            url,
            schema: "byokd".into(),
            pool_size: 16,
        };
        assert!(!format!("{engine:?}").contains("hunter2"));
        let bad = DatabaseUrl::parse("mysql://root:hunter2@db/x").unwrap_err();
        assert!(!bad.contains("hunter2"), "{bad}");
        assert!(
            !DatabaseUrl::parse("postgres://byokd@db/x")
                .unwrap()
                .has_password()
        );
    }
}
