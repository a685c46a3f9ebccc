//! Which storage engine a data directory uses (`[store] kind`), and the one place that opens,
//! imports into and repairs it: nothing outside `store/` names an adapter.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::sled::{DEFAULT_CACHE_BYTES, RepairPlan, SledStore};
use super::{DEFAULT_AUDIT_SEGMENT_BYTES, Store, StoreError};

/// The engines `[store] kind` may name.
pub const KINDS: &[&str] = &["sled"];

/// A configured engine and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The embedded default: sled for the records and segment files for the audit trail, in
    /// `<data_dir>/db`.
    Sled {
        /// sled's page cache, in bytes.
        cache_bytes: u64,
        /// Size at which the audit trail starts a new segment, in bytes.
        audit_segment_bytes: u64,
    },
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
    /// The engine `kind` names, with sled's settings; `Err` names the kinds there are.
    pub fn of_kind(kind: &str, cache_bytes: u64, audit_segment_bytes: u64) -> Result<Self, String> {
        match kind {
            "sled" => Ok(Engine::Sled {
                cache_bytes,
                audit_segment_bytes,
            }),
            other => Err(format!(
                "store.kind: unknown engine {other:?}; the engines are: {}",
                KINDS.join(", ")
            )),
        }
    }

    /// Where the store of `data_dir` lives.
    pub fn location(&self, data_dir: &Path) -> PathBuf {
        match self {
            Engine::Sled { .. } => data_dir.join("db"),
        }
    }

    /// Opens (or creates) the store at `location`.
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
        }
    }

    /// For `byokd audit repair`, on a stopped server's store: where its trail is damaged, if
    /// it is.
    pub fn plan_repair_at(&self, location: &Path) -> Result<Option<RepairPlan>, StoreError> {
        match self {
            Engine::Sled { .. } => SledStore::plan_repair(location),
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_kind_names_the_kinds_there_are() {
        assert_eq!(
            Engine::of_kind("sled", 1, 2).unwrap(),
            Engine::Sled {
                cache_bytes: 1,
                audit_segment_bytes: 2
            }
        );
        let err = Engine::of_kind("postgres-ish", 1, 2).unwrap_err();
        assert!(
            err.contains("\"postgres-ish\"") && err.contains("sled"),
            "{err}"
        );
    }
}
