//! Process settings: no core dumps, the open-files limit, a private data directory.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::ServeError;

/// File descriptors kept for the store (segment files, sled, the seals' temporary files):
/// connections may not take them.
pub(super) const STORE_FD_RESERVE: u64 = 256;

/// The descriptor number at which connections are refused, logged.
pub(super) fn descriptor_ceiling() -> Option<u64> {
    let ceiling = crate::connection::descriptor_ceiling(STORE_FD_RESERVE);
    if let Some(ceiling) = ceiling {
        tracing::info!(
            ceiling,
            reserve = STORE_FD_RESERVE,
            "connections are refused once this many files are open (the open-files limit less the store's reserve)"
        );
    }
    ceiling
}

/// Keeps secrets out of core dumps: no core files, and not dumpable (which also keeps other
/// processes of the same user from ptrace-attaching).
pub(super) fn harden_process() {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    // Everything byokd creates (sled's files too) is its user's alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let no_core = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, no_core) {
        tracing::warn!(error = %e, "could not disable core dumps (RLIMIT_CORE)");
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "could not mark the process non-dumpable (PR_SET_DUMPABLE)");
    }
}

/// Most the soft limit on open files is raised to (Linux's default `fs.nr_open`).
pub(super) const OPEN_FILES_CEILING: u64 = 1 << 20;

/// Raises the soft limit on open files to the hard one: every sealed audit segment keeps three
/// files open (entries, offsets, index: about a hundred per GB of trail), which outgrows the
/// usual soft limit of 1024 long before the hard limit.
pub(crate) fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let wanted = limit
        .maximum
        .unwrap_or(OPEN_FILES_CEILING)
        .min(OPEN_FILES_CEILING);
    if limit.current.is_some_and(|current| current >= wanted) {
        return;
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(soft = wanted, "raised the open files limit"),
        Err(e) => tracing::warn!(
            error = %e,
            soft = ?limit.current,
            "could not raise the open files limit (RLIMIT_NOFILE)"
        ),
    }
}

/// Takes group and other permissions off the data directory and the store in it (a
/// directory created by hand, or files an older byokd or sled left 0644): 0700 directories,
/// files readable by byokd's user only. Other files there (a master key file) keep their
/// mode: their own checks refuse them if others may read them, because by then others may
/// have. Symbolic links inside are left alone.
pub(super) fn make_private(data_dir: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |path: &Path, source| ServeError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    let mut tightened = 0u64;
    let mut pending = vec![data_dir.to_path_buf()];
    let store = data_dir.join("db");
    while let Some(path) = pending.pop() {
        if path != data_dir && !path.starts_with(&store) {
            continue;
        }
        let meta = if path == data_dir {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        }
        .map_err(|e| error(&path, e))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(|e| error(&path, e))?;
            tightened += 1;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| error(&path, e))? {
                pending.push(entry.map_err(|e| error(&path, e))?.path());
            }
        }
    }
    if tightened > 0 {
        tracing::warn!(
            paths = tightened,
            dir = %data_dir.display(),
            "the data directory was readable by others: took group and other permissions off"
        );
    }
    Ok(())
}

pub(crate) fn create_private_dir(path: &Path) -> Result<(), ServeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ServeError::DataDir {
            path: path.to_path_buf(),
            source,
        })
}
