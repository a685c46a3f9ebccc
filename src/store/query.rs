//! Audit queries: which entries a filter selects, and the index walk that answers it for an
//! engine whose only secondary indexes are the trail's own (sled). An engine that can answer a
//! filter in one request (SQL with indexes) implements [`Store::audit_query`] itself.
//!
//! Times never decrease along the sequence, so a time range is a sequence range, found by
//! binary search: seq order is the time index.

use super::{AuditIndex, Store, StoreError};
use crate::model::peer_host;
use crate::model::{Action, AuditRecord, Outcome, PrincipalId, SecretName, TenantId, Time};

/// Most entries one query examines before it returns what it has with a token to resume:
/// filtered queries that no index serves cost bounded work per call.
const SCAN_BUDGET: usize = 20_000;
/// Entries read from the store at a time.
pub const SCAN_CHUNK: usize = 512;

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
    /// Entries from this peer: a host (any port) or a full `host:port`.
    pub peer: Option<String>,
    /// Entries with this outcome.
    pub outcome: Option<Outcome>,
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
            && self.outcome.is_none_or(|o| e.outcome == o)
            && self.peer.as_ref().is_none_or(|want| {
                e.peer
                    .as_ref()
                    .is_some_and(|peer| peer == want || peer_host(peer) == *want)
            })
            && self.since.is_none_or(|t| record.time >= t)
            && self.until.is_none_or(|t| record.time < t)
    }

    /// The most selective index that serves this filter, if any.
    fn index(&self) -> Option<AuditIndex> {
        match (&self.tenant, &self.name, &self.principal, &self.peer) {
            (Some(t), Some(n), _, _) => Some(AuditIndex::Secret(t.clone(), n.clone())),
            (_, _, Some(p), _) => Some(AuditIndex::Principal(p.clone())),
            (_, _, _, Some(peer)) => Some(AuditIndex::PeerHost(peer_host(peer))),
            (Some(t), None, None, None) => Some(AuditIndex::Tenant(t.clone())),
            (None, _, None, None) => None,
        }
    }
}

/// A page of results.
#[derive(Debug, Clone)]
pub struct AuditPage {
    /// Matching entries, oldest first.
    pub entries: Vec<AuditRecord>,
    /// Where the next page starts.
    pub resume_at: u64,
    /// False when the query reached the end of the trail (as of this call).
    pub more: bool,
}

/// Up to `page_size` entries matching `filter`, from sequence number `from` on, and no entry
/// after `until_seq`, found through the trail's indexes (or a scan where none serves).
pub async fn walk(
    store: &dyn Store,
    filter: &AuditFilter,
    from: u64,
    until_seq: u64,
    page_size: usize,
) -> Result<AuditPage, StoreError> {
    let (lo, hi) = seq_range(store, filter.since, filter.until).await?;
    let hi = hi.min(until_seq.saturating_add(1));
    let mut next = from.max(lo);
    let index = filter.index();
    let mut entries = Vec::new();
    let mut scanned = 0;
    while next < hi {
        // Candidates in sequence order: index hits are read one by one, only as far as the
        // page needs them; a scan reads a chunk at once.
        let (exhausted, candidates) = match &index {
            Some(index) => {
                let seqs = store.audit_index(index, next, SCAN_CHUNK).await?;
                (seqs.len() < SCAN_CHUNK, Candidates::Hits(seqs.into_iter()))
            }
            None => {
                let chunk = store.audit_entries(next, SCAN_CHUNK).await?;
                (
                    chunk.len() < SCAN_CHUNK,
                    Candidates::Read(chunk.into_iter()),
                )
            }
        };
        let mut candidates = candidates;
        while let Some((seq, record)) = candidates.next(store).await? {
            if seq >= hi {
                next = hi;
                break;
            }
            next = seq + 1;
            scanned += 1;
            if let Some(record) = record
                && filter.matches(&record)
            {
                entries.push(record);
                if entries.len() == page_size {
                    return Ok(AuditPage {
                        entries,
                        resume_at: next,
                        more: next < hi,
                    });
                }
            }
        }
        if exhausted {
            next = hi;
        } else if scanned >= SCAN_BUDGET {
            break;
        }
    }
    Ok(AuditPage {
        entries,
        resume_at: next,
        more: next < hi,
    })
}

/// Sequence numbers a query considers, in order, each with its entry (`None`: not readable).
enum Candidates {
    /// Index hits, each read when reached.
    Hits(std::vec::IntoIter<u64>),
    /// Entries read in a chunk.
    Read(std::vec::IntoIter<AuditRecord>),
}

impl Candidates {
    async fn next(
        &mut self,
        store: &dyn Store,
    ) -> Result<Option<(u64, Option<AuditRecord>)>, StoreError> {
        match self {
            Candidates::Hits(seqs) => match seqs.next() {
                Some(seq) => Ok(Some((seq, store.audit_entry(seq).await?))),
                None => Ok(None),
            },
            Candidates::Read(records) => Ok(records.next().map(|r| (r.seq, Some(r)))),
        }
    }
}

/// The sequence numbers `[lo, hi)` of the entries with `since <= time < until`.
pub async fn seq_range(
    store: &dyn Store,
    since: Option<Time>,
    until: Option<Time>,
) -> Result<(u64, u64), StoreError> {
    let Some(head) = store.audit_head().await? else {
        return Ok((1, 1));
    };
    let first = store
        .audit_entries(0, 1)
        .await?
        .first()
        .map_or(head.seq, |r| r.seq);
    let end = head.seq + 1;
    let lo = match since {
        Some(t) => first_at_or_after(store, t, first, end).await?,
        None => first,
    };
    let hi = match until {
        Some(t) => first_at_or_after(store, t, first, end).await?,
        None => end,
    };
    Ok((lo, hi.max(lo)))
}

/// The smallest seq in `[lo, hi)` whose entry's time is at or after `t` (`hi` if none).
pub async fn first_at_or_after(
    store: &dyn Store,
    t: Time,
    mut lo: u64,
    mut hi: u64,
) -> Result<u64, StoreError> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // The first entry at or after `mid` (there are no gaps unless the trail was tampered with).
        match store.audit_entries(mid, 1).await?.first() {
            Some(r) if r.time < t => lo = r.seq + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}
