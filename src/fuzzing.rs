//! Entry points for the fuzz targets in `fuzz/` (not part of byokd's API). Each feeds
//! arbitrary bytes to code that handles untrusted or possibly corrupted input; none may
//! panic, whatever the bytes.

use prost::Message;

use crate::api::v1 as pb;
use crate::model::{
    Action, Labels, LeaseId, Outcome, PrincipalId, Provider, Reason, SecretName, TenantId,
    check_value_len,
};

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
/// on whatever decodes.
pub fn validate_requests(bytes: &[u8]) {
    if let Ok(r) = pb::StoreRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = Provider::parse(r.provider);
        let _ = Labels::parse(r.labels);
        let _ = check_value_len("value", r.value.len());
    }
    if let Ok(r) = pb::RotateRequest::decode(bytes) {
        names(&r.tenant, &r.name);
    }
    if let Ok(r) = pb::LeaseRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = PrincipalId::parse_field("audience", r.audience);
        if let Some(ttl) = r.ttl {
            let _ = std::time::Duration::try_from(ttl);
        }
    }
    if let Ok(r) = pb::GetRequest::decode(bytes) {
        let _ = crate::lease::presented_token_hash(&r.token);
    }
    if let Ok(r) = pb::RevokeRequest::decode(bytes) {
        let _ = Reason::parse(r.reason);
        match r.target {
            Some(pb::revoke_request::Target::Secret(s)) => names(&s.tenant, &s.name),
            Some(pb::revoke_request::Target::LeaseId(id)) => {
                let _ = LeaseId::parse("lease_id", &id);
            }
            None => {}
        }
    }
    if let Ok(r) = pb::AuditRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = Action::parse("action", &r.action);
        let _ = Outcome::parse("outcome", &r.outcome);
        let _ = crate::audit::decode_page_token(&r.page_token);
        for t in [r.since, r.until].into_iter().flatten() {
            let _ = crate::model::Time::from_seconds_nanos(t.seconds, t.nanos);
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = crate::auth::CertIdentity::parse(text);
        let _ = toml::from_str::<toml::Value>(text);
    }
}

fn names(tenant: &str, name: &str) {
    let _ = TenantId::parse(tenant);
    let _ = SecretName::parse(name);
}

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
