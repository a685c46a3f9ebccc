//! Commands that work on a data directory without a running server: audit verification and
//! export. They open the sled database directly, so they need the server stopped (sled locks
//! its directory) or a copy of the directory, e.g. a backup.

use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::audit::{self, RecordedHead, Verification};
use crate::config::Config;
use crate::model::{AuditRecord, Time};
use crate::server::{Initialise, ServeError, open_keys, open_store};
use crate::store::Store;

/// Verifies the audit chain of the configured data directory (needs its master key).
pub async fn verify_audit(
    config: &Config,
    from: u64,
    to: u64,
    recorded: Option<RecordedHead>,
) -> Result<Verification, ServeError> {
    let store = open_store(&config.data_dir)?;
    let result = async {
        let keys = open_keys(
            &config.master_key,
            &store,
            Initialise::Never,
            &config.data_dir,
        )
        .await?;
        audit::verify(&store, &keys.chain, from, to, recorded).map_err(audit_error)
    }
    .await;
    store.close().await?;
    result
}

/// Writes the audit entries at or after `since` as JSON lines to `out`. Returns how many.
pub async fn export_audit(
    data_dir: &Path,
    since: Option<Time>,
    out: &mut dyn std::io::Write,
) -> Result<u64, ServeError> {
    let store = open_store(data_dir)?;
    let result = write_jsonl(&store, since, out);
    store.close().await?;
    result
}

fn write_jsonl(
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
        let page = audit::query(store, &filter, from, u64::MAX, audit::MAX_PAGE_SIZE)
            .map_err(audit_error)?;
        for record in &page.entries {
            let line = serde_json::to_string(&ExportedEntry::from(record))
                .map_err(|e| ServeError::Export(e.to_string()))?;
            writeln!(out, "{line}").map_err(|e| ServeError::Export(e.to_string()))?;
            count += 1;
        }
        if !page.more {
            out.flush().map_err(|e| ServeError::Export(e.to_string()))?;
            return Ok(count);
        }
        from = page.resume_at;
    }
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
            time: rfc3339(r.time),
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

/// A time as RFC 3339 in UTC with microseconds, e.g. `2026-11-25T01:02:03.456789Z`.
pub fn rfc3339(t: Time) -> String {
    let (secs, nanos) = t.seconds_nanos();
    let system = if secs >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::new(secs.unsigned_abs(), nanos.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    };
    humantime::format_rfc3339_micros(system).to_string()
}
