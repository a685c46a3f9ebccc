//! Commands that work on a data directory without a running server: audit verification and
//! export, and restoring a backup. They open the sled database directly, so they need the
//! server stopped (sled locks its directory) or a copy of the directory. Also `backup`, the
//! client side of the online backup, which talks to the running server.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::audit::{self, RecordedHead, Verification};
use crate::backup::{BackupHeader, BackupReader};
use crate::config::Config;
use crate::model::{Action, AuditDraft, AuditRecord, SecretName, SecretRecord, TenantId, Time};
use crate::server::{Initialise, Keys, ServeError, open_keys, open_store};
use crate::store::{
    RepairNote, RepairPlan, Store, StoreError, Transaction, Write, load_meta, put_meta,
};

/// Verifies the audit chain of the configured data directory (needs its master key).
pub async fn verify_audit(
    config: &Config,
    from: u64,
    to: u64,
    recorded: Option<RecordedHead>,
) -> Result<Verification, ServeError> {
    let store = match open_store(&config.store, &config.data_dir).await {
        Ok(store) => store,
        // A trail too damaged to open is a broken chain, not a failure to check it.
        Err(ServeError::OpenStore {
            source: StoreError::TrailDamaged(damage),
            ..
        }) => {
            return Ok(Verification {
                checked: 0,
                broken: Some((damage.first_lost, format!("the trail is damaged: {damage}"))),
                head: None,
                anchor_seq: 0,
                next: None,
            });
        }
        Err(e) => return Err(e),
    };
    let result = async {
        let keys = existing_keys(config, &*store).await?;
        audit::verify(
            &*store,
            &keys.chain,
            from,
            to,
            recorded,
            &audit::Budget::default(),
        )
        .await
        .map_err(audit_error)
    }
    .await;
    store.close().await?;
    result
}

/// The keys of an existing data directory (never initialising one).
async fn existing_keys(config: &Config, store: &dyn Store) -> Result<Keys, ServeError> {
    open_keys(
        &config.master_key,
        store,
        Initialise::Never,
        &config.data_dir,
    )
    .await
}

/// What `byokd audit repair` found or did.
#[derive(Debug)]
pub enum Repair {
    /// The trail is intact and no repair is pending.
    NothingToDo,
    /// The trail is damaged; nothing was changed (run again with `apply`).
    Planned(RepairPlan),
    /// The trail was cut and the cut recorded in a `Repair` entry: its seq and reason.
    Done {
        /// Seq of the `Repair` entry.
        seq: u64,
        /// What it says.
        note: String,
    },
}

/// Finds where the audit trail of the configured (stopped) data directory is damaged, and
/// with `apply` cuts it there: the damaged files are copied into
/// `<data_dir>/audit-quarantine/<time>/` first, every outstanding lease ends, and a `Repair`
/// entry chained after the last entry kept records what was lost. Needs the master key.
pub async fn repair_audit(config: &Config, apply: bool) -> Result<Repair, ServeError> {
    crate::server::raise_open_files_limit();
    let db = sled_location(
        config,
        "byokd audit repair mends the sled engine's trail files; a PostgreSQL store keeps its \
         trail in tables, which PostgreSQL itself keeps intact",
    )?;
    let open_error = |source| ServeError::OpenStore {
        path: db.clone(),
        source,
    };
    let plan = config.store.plan_repair_at(&db).map_err(open_error)?;
    if !apply {
        return Ok(match plan {
            Some(plan) => Repair::Planned(plan),
            None => Repair::NothingToDo,
        });
    }
    if let Some(plan) = &plan {
        let stamp = Time::now().to_rfc3339().replace(':', "");
        let quarantine = config.data_dir.join("audit-quarantine").join(stamp);
        let note = format!(
            "byokd audit repair: the trail was cut before entry {first}, where it was damaged \
             ({damage}); entries from {first} on are lost (copies of the damaged segment files: \
             {quarantine}); {leases} outstanding leases were ended, so that no use recorded \
             only in a lost entry can be redeemed again",
            first = plan.damage.first_lost,
            damage = plan.damage,
            quarantine = quarantine.display(),
            leases = plan.leases,
        );
        config
            .store
            .apply_repair_at(&db, plan, &quarantine, &note)
            .map_err(open_error)?;
        tracing::warn!(%note, "audit trail cut");
    }
    let store = open_store(&config.store, &config.data_dir).await?;
    let result = async {
        let note = match load_meta::<RepairNote>(&*store).await? {
            Some(note) if !note.value.0.is_empty() => note.value.0,
            _ => return Ok(Repair::NothingToDo),
        };
        let keys = existing_keys(config, &*store).await?;
        store.start_audit_chain(keys.chain).await?;
        let mut entry = AuditDraft::new(Action::Repair, None, None);
        entry.reason = note.clone();
        let committed = store
            .commit(Transaction {
                writes: vec![put_meta(&RepairNote(String::new()))?],
                audit: Some(entry),
                ..Default::default()
            })
            .await?;
        Ok(Repair::Done {
            seq: committed.audit_seq.unwrap_or(0),
            note,
        })
    }
    .await;
    store.close().await?;
    result
}

/// Writes the audit entries at or after `since` as JSON lines to `out`. Returns how many.
pub async fn export_audit(
    engine: &crate::store::Engine,
    data_dir: &Path,
    since: Option<Time>,
    out: &mut dyn std::io::Write,
) -> Result<u64, ServeError> {
    let store = open_store(engine, data_dir).await?;
    let result = write_jsonl(&*store, since, out).await;
    store.close().await?;
    result
}

async fn write_jsonl(
    store: &dyn Store,
    since: Option<Time>,
    out: &mut dyn std::io::Write,
) -> Result<u64, ServeError> {
    let filter = audit::AuditFilter {
        since,
        ..Default::default()
    };
    let mut from = 0;
    let mut count = 0;
    loop {
        let page = store
            .audit_query(&filter, from, u64::MAX, audit::MAX_PAGE_SIZE)
            .await?;
        for record in &page.entries {
            let line = serde_json::to_string(&ExportedEntry::from(record))
                .map_err(|e| ServeError::Export(e.to_string()))?;
            writeln!(out, "{}", escape_hidden(&line))
                .map_err(|e| ServeError::Export(e.to_string()))?;
            count += 1;
        }
        if !page.more {
            out.flush().map_err(|e| ServeError::Export(e.to_string()))?;
            return Ok(count);
        }
        from = page.resume_at;
    }
}

/// `json` with every character [`crate::model::is_hidden_or_control`] written as a `\u`
/// escape (JSON allows them raw inside strings, where serde_json leaves them; a reader that
/// splits lines on U+2028 or shows a bidirectional override would see something else than
/// what is there). Outside strings, serde_json's output is ASCII.
fn escape_hidden(json: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    if !json.chars().any(crate::model::is_hidden_or_control) {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut escaped = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if crate::model::is_hidden_or_control(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(escaped, "\\u{unit:04X}");
            }
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

fn audit_error(e: audit::AuditError) -> ServeError {
    match e {
        audit::AuditError::Store(e) => ServeError::Store(e),
        other => ServeError::Export(other.to_string()),
    }
}

/// One exported entry: stable field names, RFC 3339 times, empty fields left out.
#[derive(Debug, Serialize)]
pub struct ExportedEntry {
    /// Position in the trail.
    pub seq: u64,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    /// Authenticated principal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Peer address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The RPC (or `Prune`).
    pub action: &'static str,
    /// Tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Secret name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Secret id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_id: Option<String>,
    /// Secret version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Lease id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// gRPC status code name.
    pub outcome: &'static str,
    /// Numeric gRPC status code.
    pub code: i32,
    /// Why it failed, or the caller's reason.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Hash chain link, hex.
    pub prev_hash: String,
    /// Hash chain link, hex.
    pub hash: String,
}

impl From<&AuditRecord> for ExportedEntry {
    fn from(r: &AuditRecord) -> Self {
        let e = &r.entry;
        Self {
            seq: r.seq,
            time: r.time.to_rfc3339(),
            principal: e.principal.as_ref().map(ToString::to_string),
            peer: e.peer.clone(),
            action: e.action.as_str(),
            tenant: e.tenant.as_ref().map(ToString::to_string),
            name: e.name.as_ref().map(ToString::to_string),
            secret_id: e.secret_id.map(|id| id.to_string()),
            version: e.version,
            lease_id: e.lease_id.map(|id| id.to_string()),
            outcome: e.outcome.as_str(),
            code: e.outcome.code(),
            reason: e.reason.clone(),
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        }
    }
}

pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

/// What `restore` loaded and checked.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    /// Records loaded.
    pub records: u64,
    /// Audit entries whose chain links were verified.
    pub audit_entries: u64,
    /// Secret versions unwrapped and decrypted.
    pub versions_checked: u64,
    /// The backup's header.
    pub header: BackupHeader,
    /// Secrets revoked after the backup was taken, revoked again in the restored data.
    pub revocations_replayed: Vec<(TenantId, SecretName)>,
    /// Secrets purged after the backup was taken, purged again in the restored data.
    pub purges_replayed: Vec<(TenantId, SecretName)>,
    /// Secrets rotated after the backup was taken: the restored value is the older one.
    pub rotated_after: Vec<(TenantId, SecretName)>,
}

/// What a restore does about what happened after the backup was taken.
#[derive(Debug, Clone)]
pub enum LaterChanges {
    /// Revoke again every secret this audit export (`byokd audit export --format jsonl` of
    /// the server the backup came from) records as revoked after the backup's head, and list
    /// the secrets it records as rotated since.
    Replay(PathBuf),
    /// Bring the data back as the backup has it: secrets revoked since come back.
    Ignore,
}

/// What an audit export records after a backup's head.
struct Later {
    /// Secrets revoked (and not restored since): the entry's seq, tenant and name.
    revoked: Vec<(u64, TenantId, SecretName)>,
    /// Secrets purged: the entry's seq, tenant, name and the purged secret's id.
    purged: Vec<(u64, TenantId, SecretName, String)>,
    /// Secrets rotated.
    rotated: Vec<(TenantId, SecretName)>,
}

/// The secrets an audit export records as revoked (and not restored since), purged and
/// rotated, after entry `after`.
fn later_changes(export: &Path, after: u64) -> Result<Later, ServeError> {
    use std::io::BufRead;
    let bad = |line: usize, why: &dyn std::fmt::Display| {
        ServeError::Restore(format!("{} line {line}: {why}", export.display()))
    };
    let file = std::fs::File::open(export)
        .map_err(|e| ServeError::Restore(format!("{}: {e}", export.display())))?;
    let (mut revoked, mut purged, mut rotated) = (Vec::new(), Vec::new(), Vec::new());
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| bad(number + 1, &e))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(number + 1, &e))?;
        let seq = entry["seq"]
            .as_u64()
            .ok_or_else(|| bad(number + 1, &"no seq"))?;
        if seq <= after || entry["outcome"] != "OK" || !entry["lease_id"].is_null() {
            continue;
        }
        let target = || -> Result<(TenantId, SecretName), ServeError> {
            let field = |name: &str| entry[name].as_str().unwrap_or_default().to_string();
            Ok((
                TenantId::parse(field("tenant")).map_err(|e| bad(number + 1, &e))?,
                SecretName::parse(field("name")).map_err(|e| bad(number + 1, &e))?,
            ))
        };
        match entry["action"].as_str() {
            Some("Revoke") => {
                let (tenant, name) = target()?;
                revoked.push((seq, tenant, name));
            }
            // A revocation with a recovery window that a Restore undid is not replayed.
            Some("Restore") => {
                let restored = target()?;
                revoked.retain(|(_, t, n)| (t, n) != (&restored.0, &restored.1));
            }
            Some("Purge") => {
                let (tenant, name) = target()?;
                let id = entry["secret_id"].as_str().unwrap_or_default().to_string();
                purged.push((seq, tenant, name, id));
            }
            Some("Rotate") => rotated.push(target()?),
            _ => {}
        }
    }
    Ok(Later {
        revoked,
        purged,
        rotated,
    })
}

/// Revokes `secrets` in `store` (as a revocation does: a tombstone, every version
/// destroyed), each with an audit entry saying where the revocation came from.
async fn replay_revocations(
    store: &dyn Store,
    secrets: &[(u64, TenantId, SecretName)],
    export: &Path,
) -> Result<Vec<(TenantId, SecretName)>, ServeError> {
    let mut replayed = Vec::new();
    for (seq, tenant, name) in secrets {
        let Some(current) = store.secret(tenant, name).await? else {
            continue;
        };
        if current.state == crate::model::SecretState::Revoked {
            continue;
        }
        let now = Time::now();
        let mut tombstone = current.clone();
        tombstone.state = crate::model::SecretState::Revoked;
        tombstone.revoked_at = Some(now);
        tombstone.updated_at = now;
        tombstone.life.destroy_at = None;
        tombstone.life.grace = None;
        let again = (Action::Revoke, "revoked", *seq, export);
        destroy_again(store, &current, Write::PutSecret(tombstone), again).await?;
        replayed.push((tenant.clone(), name.clone()));
    }
    Ok(replayed)
}

/// Purges `secrets` in `store` again (every version destroyed, the record deleted), each
/// the secret of the id the purge named, with an audit entry saying where it came from.
async fn replay_purges(
    store: &dyn Store,
    secrets: &[(u64, TenantId, SecretName, String)],
    export: &Path,
) -> Result<Vec<(TenantId, SecretName)>, ServeError> {
    let mut replayed = Vec::new();
    for (seq, tenant, name, id) in secrets {
        let Some(current) = store.secret(tenant, name).await? else {
            continue;
        };
        if current.id.to_string() != *id {
            continue;
        }
        let deleted = Write::DeleteSecret {
            tenant: tenant.clone(),
            name: name.clone(),
        };
        let again = (Action::Purge, "purged", *seq, export);
        destroy_again(store, &current, deleted, again).await?;
        replayed.push((tenant.clone(), name.clone()));
    }
    Ok(replayed)
}

/// Destroys every version of `secret` again, with `record` (its tombstone, or its record's
/// deletion), in one commit that gives back what its data keys held and is audited as
/// `(action, verb, seq, export)`: an action the export recorded, at entry `seq`.
async fn destroy_again(
    store: &dyn Store,
    secret: &SecretRecord,
    record: Write,
    (action, verb, seq, export): (Action, &str, u64, &Path),
) -> Result<(), ServeError> {
    let held = crate::vault::held(store, secret).await?;
    let mut entry = AuditDraft::new(action, None, None);
    entry.secret(secret);
    entry.reason = format!(
        "restore: {verb} after the backup was taken (entry {seq} of {})",
        export.display()
    );
    let given_back = crate::vault::given_back(&secret.tenant, -i64::from(held.any()), held.total());
    store
        .commit(Transaction {
            charges: vec![given_back],
            guards: Vec::new(),
            writes: vec![
                record,
                Write::DestroyEnvelopes {
                    secret_id: secret.id,
                    keep: None,
                },
            ],
            audit: Some(entry),
        })
        .await?;
    Ok(())
}

/// Loads the backup `input` into the configured data directory, which must hold no data.
/// The records go to a staging store first (through [`crate::store::Store::import`]); it
/// becomes the data directory's database only after the backup's checksum, the master key's
/// key check, the whole audit chain (up to the head the backup names) and the decryption of
/// every stored value succeed.
pub async fn restore(
    config: &Config,
    input: &Path,
    later: LaterChanges,
) -> Result<RestoreSummary, ServeError> {
    let restore_error = |e: &dyn std::fmt::Display| ServeError::Restore(e.to_string());
    if config.store.location(&config.data_dir).is_some() {
        crate::server::create_private_dir(&config.data_dir)?;
    }
    let file = std::fs::File::open(input)
        .map_err(|e| ServeError::Restore(format!("{}: {e}", input.display())))?;
    let mut reader =
        BackupReader::new(std::io::BufReader::new(file)).map_err(|e| restore_error(&e))?;
    let header = reader.header().clone();
    let recorded = if header.audit_head_seq == 0 {
        None
    } else {
        let hash = hex::decode(&header.audit_head_hash)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(|| ServeError::Restore("malformed audit head in the header".into()))?;
        Some(RecordedHead {
            seq: header.audit_head_seq,
            hash,
        })
    };
    crate::server::raise_open_files_limit();
    let store = config
        .store
        .open_staging(&config.data_dir)
        .await
        .map_err(|e| restore_error(&e))?;
    let result =
        async {
            let records = store
                .import(Box::new(move || {
                    reader.next_record().map_err(|e| e.to_string())
                }))
                .await
                .map_err(|e| restore_error(&e));
            let records = match records {
                Ok(records) => records,
                Err(e) => {
                    let _ = store.close().await;
                    return Err(e);
                }
            };
            let checked = async {
                let keys = existing_keys(config, &*store).await?;
                let report = audit::verify(
                    &*store,
                    &keys.chain,
                    0,
                    0,
                    recorded,
                    &audit::Budget::default(),
                )
                .await
                .map_err(audit_error)?;
                if let Some((seq, why)) = report.broken {
                    return Err(ServeError::Restore(format!(
                        "audit chain broken at entry {seq}: {why}"
                    )));
                }
                let versions = crate::vault::check_envelopes(&*store, &keys.keyring)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = ?e, "decrypt check failed");
                        ServeError::Restore(
                            "a stored value did not decrypt under the configured master key".into(),
                        )
                    })?;
                let (revocations_replayed, purges_replayed, rotated_after) = match &later {
                    LaterChanges::Ignore => (Vec::new(), Vec::new(), Vec::new()),
                    LaterChanges::Replay(export) => {
                        let later = later_changes(export, header.audit_head_seq)?;
                        store.start_audit_chain(keys.chain.clone()).await?;
                        let purged = replay_purges(&*store, &later.purged, export).await?;
                        let revoked = replay_revocations(&*store, &later.revoked, export).await?;
                        (revoked, purged, later.rotated)
                    }
                };
                Ok((
                    report.checked,
                    versions,
                    revocations_replayed,
                    purges_replayed,
                    rotated_after,
                ))
            }
            .await;
            store.close().await?;
            let (
                audit_entries,
                versions_checked,
                revocations_replayed,
                purges_replayed,
                rotated_after,
            ) = checked?;
            config
                .store
                .promote_staging(&config.data_dir)
                .await
                .map_err(|e| restore_error(&e))?;
            Ok(RestoreSummary {
                records,
                audit_entries,
                versions_checked,
                header: header.clone(),
                revocations_replayed,
                purges_replayed,
                rotated_after,
            })
        }
        .await;
    if result.is_err()
        && let Err(e) = config.store.discard_staging(&config.data_dir).await
    {
        tracing::warn!(error = %e, "could not discard the restore's staging store");
    }
    result
}

/// `byokd migrate`: applies the schema migrations the configured database lacks. What it
/// did, for the operator.
pub async fn migrate(config: &Config) -> Result<String, ServeError> {
    let migrated = config
        .store
        .migrate()
        .await
        .map_err(|source| ServeError::OpenStore {
            path: config.data_dir.clone(),
            source,
        })?;
    Ok(match (migrated, &config.store) {
        (Some(m), crate::store::Engine::Postgres { schema, .. }) if m.applied.is_empty() => {
            format!("schema {schema} is up to date (migration {})", m.latest)
        }
        (Some(m), crate::store::Engine::Postgres { schema, .. }) => format!(
            "schema {schema}: applied migrations {} (now at {})",
            m.applied
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            m.latest
        ),
        _ => "nothing to do: the sled engine migrates a data directory when it opens it".into(),
    })
}

/// The sled store's directory, for the commands that work on it alone; for another engine,
/// an error that says why (`why`).
fn sled_location(config: &Config, why: &str) -> Result<std::path::PathBuf, ServeError> {
    config
        .store
        .location(&config.data_dir)
        .ok_or_else(|| ServeError::OpenStore {
            path: config.data_dir.clone(),
            source: crate::store::StoreError::Engine(why.to_string()),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn hidden_characters_are_escaped_in_exported_lines() {
        let text = "a\u{2028}b\u{202E}c\u{E0041}d\u{85}e\u{200B}";
        let line = serde_json::to_string(&serde_json::json!({ "reason": text })).unwrap();
        let escaped = super::escape_hidden(&line);
        assert_eq!(
            escaped,
            r#"{"reason":"a\u2028b\u202Ec\uDB40\uDC41d\u0085e\u200B"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
        assert_eq!(back["reason"], text);
        assert!(matches!(
            super::escape_hidden("{\"a\":\"plain é\"}"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
