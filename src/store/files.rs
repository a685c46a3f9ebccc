//! The files of the audit trail: opened with the trail's mode, and replaced whole, synced.
//! Both the segment files (`auditlog/`) and their indexes (`auditindex.rs`) use them.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
