//! Reading the audit trail: filtered, paginated queries.
//!
//! Entries are written by the store, in the same atomic batch as the change they record
//! (see `store`). This module only reads them back.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::model::{Action, AuditRecord, PrincipalId, SecretName, TenantId, Time};
use crate::store::{Store, StoreError};

/// Default number of entries in a page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Most entries one query examines before it returns what it has with a token to resume:
/// filtered queries over a long trail cost bounded work per call.
const SCAN_BUDGET: usize = 20_000;
/// Entries read from the store at a time.
const SCAN_CHUNK: usize = 512;

/// Errors of audit queries.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The page token was not produced by this server.
    #[error("page_token: not a token returned by Audit")]
    InvalidPageToken,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which entries to return; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Entries about this tenant.
    pub tenant: Option<TenantId>,
    /// Entries about this secret name.
    pub name: Option<SecretName>,
    /// Entries by this principal.
    pub principal: Option<PrincipalId>,
    /// Entries of this RPC.
    pub action: Option<Action>,
    /// Entries at or after this time.
    pub since: Option<Time>,
    /// Entries before this time.
    pub until: Option<Time>,
}

impl AuditFilter {
    /// True if `record` matches every set criterion.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let e = &record.entry;
        self.tenant
            .as_ref()
            .is_none_or(|t| e.tenant.as_ref() == Some(t))
            && self
                .name
                .as_ref()
                .is_none_or(|n| e.name.as_ref() == Some(n))
            && self
                .principal
                .as_ref()
                .is_none_or(|p| e.principal.as_ref() == Some(p))
            && self.action.is_none_or(|a| e.action == a)
            && self.since.is_none_or(|t| record.time >= t)
            && self.until.is_none_or(|t| record.time < t)
    }
}

/// A page of results.
#[derive(Debug, Clone)]
pub struct AuditPage {
    /// Matching entries, oldest first.
    pub entries: Vec<AuditRecord>,
    /// Where the next page starts, if the trail goes on.
    pub next_page_token: Option<String>,
}

/// Encodes the sequence number a page resumes at.
fn encode_token(seq: u64) -> String {
    URL_SAFE_NO_PAD.encode(seq.to_be_bytes())
}

/// Decodes a page token (empty: from the start).
pub fn decode_page_token(token: &str) -> Result<u64, AuditError> {
    if token.is_empty() {
        return Ok(1);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| AuditError::InvalidPageToken)?;
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| AuditError::InvalidPageToken)?;
    Ok(u64::from_be_bytes(bytes))
}

/// Up to `page_size` entries matching `filter`, starting at sequence number `from`.
pub fn query(
    store: &dyn Store,
    filter: &AuditFilter,
    from: u64,
    page_size: usize,
) -> Result<AuditPage, AuditError> {
    let mut entries = Vec::new();
    let mut next = from;
    let mut scanned = 0;
    loop {
        let chunk = store.audit_entries(next, SCAN_CHUNK)?;
        let exhausted = chunk.len() < SCAN_CHUNK;
        for record in chunk {
            next = record.seq + 1;
            scanned += 1;
            if filter.matches(&record) {
                entries.push(record);
                if entries.len() == page_size {
                    return Ok(AuditPage {
                        entries,
                        next_page_token: Some(encode_token(next)),
                    });
                }
            }
        }
        if exhausted {
            return Ok(AuditPage {
                entries,
                next_page_token: None,
            });
        }
        if scanned >= SCAN_BUDGET {
            return Ok(AuditPage {
                entries,
                next_page_token: Some(encode_token(next)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_junk() {
        assert_eq!(decode_page_token("").unwrap(), 1);
        assert_eq!(decode_page_token(&encode_token(42)).unwrap(), 42);
        for junk in ["%%%", "AAAA", "not a token"] {
            assert!(matches!(
                decode_page_token(junk),
                Err(AuditError::InvalidPageToken)
            ));
        }
    }
}
