//! Entry points for the fuzz targets in `fuzz/` (not part of byokd's API). Each feeds
//! arbitrary bytes to code that handles untrusted or possibly corrupted input; none may
//! panic, whatever the bytes.

/// Decodes `bytes` as every kind of stored record, as the store would read them.
pub fn decode_stored_record(bytes: &[u8]) {
    use crate::store::MetaValue;
    crate::store::decode_any_record(bytes);
    let _ = crate::rotation::KeyringState::from_bytes(bytes);
    let _ = crate::keyring::StoredKey::from_bytes(bytes);
}

/// Splits `bytes` into a segment file, its offset file and its index file (each but the
/// last prefixed by its length, a u16 LE) and opens, reads, searches and scrubs the trail
/// they make.
pub fn read_audit_files(bytes: &[u8]) {
    let mut rest = bytes;
    let mut part = || {
        let (len, tail) = match rest {
            [a, b, tail @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), tail),
            _ => (0, &[][..]),
        };
        let (head, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        head
    };
    let segment = part();
    let offsets = part();
    crate::store::read_any_trail(segment, offsets, rest);
}

/// Reads `bytes` as a backup file: header, every record, the checksum.
pub fn read_backup(bytes: &[u8]) {
    if let Ok(mut reader) = crate::backup::BackupReader::new(bytes) {
        let _ = reader.header();
        let mut records = 0u32;
        while let Ok(Some(_)) = reader.next_record() {
            records += 1;
            if records > 100_000 {
                return;
            }
        }
    }
    if let Ok(reader) = crate::backup::BackupReader::new(bytes) {
        let _ = reader.verify();
    }
}

/// Parses `bytes` as a config file and resolves it, as `byokd serve --config` would.
pub fn parse_config(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = crate::config::Config::from_text(text, std::path::Path::new("/etc/byokd"));
    }
}

/// Decodes `bytes` as every request message byokd accepts, and runs the request validation
/// on whatever decodes (in the service layer, which alone knows the wire types).
pub use crate::service::validate_requests;

#[cfg(test)]
mod tests {
    /// Every fuzz target's committed seed corpus runs through its entry point (so that a
    /// regression on a seed fails `cargo test`, not only a fuzzing run), and the seeds of the
    /// file formats are real ones that open.
    #[test]
    fn the_seed_corpus_runs_through_every_entry_point() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 5] = [
            ("stored_record", super::decode_stored_record),
            ("request_validation", super::validate_requests),
            ("audit_files", super::read_audit_files),
            ("backup_file", super::read_backup),
            ("config_file", super::parse_config),
        ];
        for (target, run) in targets {
            let seeds: Vec<_> = std::fs::read_dir(seeds.join(target))
                .unwrap_or_else(|e| panic!("{target}: {e}"))
                .map(|e| e.expect("seed").path())
                .collect();
            assert!(!seeds.is_empty(), "{target} has no seeds");
            for seed in seeds {
                run(&std::fs::read(&seed).expect("seed"));
            }
        }
        let backup = std::fs::read(seeds.join("backup_file/three-secrets.bak")).expect("seed");
        let reader = crate::backup::BackupReader::new(&backup[..]).expect("a real backup");
        assert!(reader.verify().expect("its checksum") > 3);
        for name in ["minimal.toml", "full.toml"] {
            let text = std::fs::read_to_string(seeds.join("config_file").join(name)).unwrap();
            crate::config::Config::from_text(&text, std::path::Path::new("/etc/byokd"))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
