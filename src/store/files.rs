//! The files of the audit trail: its directories and files made with the trail's modes, and
//! files replaced whole, synced.
//! Both the segment files (`auditlog/`) and their indexes (`auditindex.rs`) use them.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Creates the directory `path` (and its parents), mode 0700, if it is not there.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Opens `path` for reading and writing (creating it, mode 0600, if asked).
pub fn open_file(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .open(path)
}

/// Writes `bytes` to `path` through `<path>.tmp` (synced, then renamed over `path`; a leftover
/// `.tmp` is removed at open). The caller syncs the directory.
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut file = open_file(Path::new(&tmp), true)?;
    file.set_len(0)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(file)
}
