//! Reading and checking the audit trail: filtered queries through indexes, hash-chain
//! verification, and the retention policy's plan.
//!
//! Entries are written by the store, in the same atomic batch as the change they record, with
//! their chain link and index entries (see `store` and `chain`). This module only reads.
//! Times never decrease along the sequence, so a time range is a sequence range, found by
//! binary search: seq order is the time index.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::chain::{self, ChainKey};
use crate::model::peer_host;
use crate::model::{
    Action, AuditRecord, ChainHash, Outcome, PrincipalId, SecretName, TenantId, Time,
};
use crate::store::{AuditIndex, Store, StoreError};

/// Default number of entries in a page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Most entries one query examines before it returns what it has with a token to resume:
/// filtered queries that no index serves cost bounded work per call.
const SCAN_BUDGET: usize = 20_000;
/// Entries read from the store at a time.
const SCAN_CHUNK: usize = 512;

/// Errors of audit queries and checks.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The page token was not produced by this server.
    #[error("page_token: not a token returned by Audit")]
    InvalidPageToken,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request was abandoned (its caller went away or its deadline passed).
    #[error("abandoned")]
    Abandoned,
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

impl AuditPage {
    /// The token that continues this query, if there is more to read.
    pub fn next_page_token(&self) -> Option<String> {
        self.more
            .then(|| URL_SAFE_NO_PAD.encode(self.resume_at.to_be_bytes()))
    }
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

/// Sequence numbers a query considers, in order, each with its entry (`None`: not readable).
type Candidates<'a> = Box<dyn Iterator<Item = Result<(u64, Option<AuditRecord>), StoreError>> + 'a>;

/// Up to `page_size` entries matching `filter`, from sequence number `from` on, and no entry
/// after `until_seq`.
pub fn query(
    store: &dyn Store,
    filter: &AuditFilter,
    from: u64,
    until_seq: u64,
    page_size: usize,
) -> Result<AuditPage, AuditError> {
    let (lo, hi) = seq_range(store, filter.since, filter.until)?;
    let hi = hi.min(until_seq.saturating_add(1));
    let mut next = from.max(lo);
    let index = filter.index();
    let mut entries = Vec::new();
    let mut scanned = 0;
    while next < hi {
        // Candidates in sequence order with their entries: index hits are read one by one,
        // only as far as the page needs them; a scan reads a chunk at once.
        let (exhausted, candidates): (bool, Candidates<'_>) = match &index {
            Some(index) => {
                let seqs = store.audit_index(index, next, SCAN_CHUNK)?;
                let exhausted = seqs.len() < SCAN_CHUNK;
                let read = seqs
                    .into_iter()
                    .map(|seq| Ok((seq, store.audit_entry(seq)?)));
                (exhausted, Box::new(read))
            }
            None => {
                let chunk = store.audit_entries(next, SCAN_CHUNK)?;
                let exhausted = chunk.len() < SCAN_CHUNK;
                (
                    exhausted,
                    Box::new(chunk.into_iter().map(|r| Ok((r.seq, Some(r))))),
                )
            }
        };
        for candidate in candidates {
            let (seq, record) = candidate?;
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

/// The sequence numbers `[lo, hi)` of the entries with `since <= time < until`.
fn seq_range(
    store: &dyn Store,
    since: Option<Time>,
    until: Option<Time>,
) -> Result<(u64, u64), AuditError> {
    let Some(head) = store.audit_head()? else {
        return Ok((1, 1));
    };
    let first = store
        .audit_entries(0, 1)?
        .first()
        .map_or(head.seq, |r| r.seq);
    let end = head.seq + 1;
    let lo = match since {
        Some(t) => first_at_or_after(store, t, first, end)?,
        None => first,
    };
    let hi = match until {
        Some(t) => first_at_or_after(store, t, first, end)?,
        None => end,
    };
    Ok((lo, hi.max(lo)))
}

/// The smallest seq in `[lo, hi)` whose entry's time is at or after `t` (`hi` if none).
fn first_at_or_after(
    store: &dyn Store,
    t: Time,
    mut lo: u64,
    mut hi: u64,
) -> Result<u64, AuditError> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // The first entry at or after `mid` (there are no gaps unless the trail was tampered with).
        match store.audit_entries(mid, 1)?.first() {
            Some(r) if r.time < t => lo = r.seq + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// Outcome of a chain verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Entries checked.
    pub checked: u64,
    /// The first entry found broken (missing, out of place, altered, not following its
    /// predecessor, or missing from the end), with why; `None` if the chain holds.
    pub broken: Option<(u64, String)>,
    /// The latest entry's seq and hash.
    pub head: Option<(u64, ChainHash)>,
    /// Where the chain starts: the last pruned seq (0 if nothing was pruned).
    pub anchor_seq: u64,
    /// The check stopped at its budget: the next entry to check (resume from there).
    pub next: Option<u64>,
}

/// How much one verification may do.
#[derive(Debug, Clone, Default)]
pub struct Budget {
    /// Entries to check at most; 0: no limit.
    pub max_entries: u64,
    /// Raised when the answer is no longer wanted: the verification stops.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Budget {
    fn spent(&self, checked: u64) -> bool {
        self.max_entries != 0 && checked >= self.max_entries
    }

    fn check_stop(&self) -> Result<(), AuditError> {
        match &self.stop {
            Some(stop) if stop.load(Ordering::Acquire) => Err(AuditError::Abandoned),
            _ => Ok(()),
        }
    }
}

/// A head recorded earlier (outside byokd): the trail must still reach it, with this hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedHead {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: ChainHash,
}

/// Checks the chain from `from` to `to` (0: to the head) under `key`, and, if given, that
/// the trail still reaches `recorded` unchanged; within `budget` (past its entries, the
/// report says where to resume).
pub fn verify(
    store: &dyn Store,
    key: &ChainKey,
    from: u64,
    to: u64,
    recorded: Option<RecordedHead>,
    budget: &Budget,
) -> Result<Verification, AuditError> {
    let head = match store.audit_head() {
        Ok(head) => head.map(|r| (r.seq, r.hash)),
        Err(StoreError::Corrupt { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let anchor = store.audit_anchor()?;
    let anchor_seq = anchor.as_ref().map_or(0, |a| a.seq);
    let mut report = Verification {
        checked: 0,
        broken: None,
        head,
        anchor_seq,
        next: None,
    };
    let broken = |mut report: Verification, seq: u64, why: String| {
        report.broken = Some((seq, why));
        Ok(report)
    };
    let (mut expected, mut prev) = match &anchor {
        Some(a) if !key.is_authentic(a) => {
            return broken(
                report,
                a.seq + 1,
                "the chain's anchor is not authentic".into(),
            );
        }
        Some(a) => (a.seq + 1, a.hash),
        None => (1, chain::GENESIS),
    };
    if from > expected {
        let start = from - 1;
        match read_entry(store, start)? {
            Some(r) if r.seq == start && key.is_intact(&r) => {
                prev = r.hash;
                expected = from;
            }
            Some(_) | None => {
                return broken(
                    report,
                    start,
                    format!("entry {start} is missing or altered"),
                );
            }
        }
    }
    let last = if to == 0 { u64::MAX } else { to };
    let mut recorded_seen = false;
    let head_seq = report.head.map_or(0, |(seq, _)| seq);
    // A recorded head before this call's range was checked by an earlier page.
    let first = expected;
    'chain: while expected <= last {
        budget.check_stop()?;
        if budget.spent(report.checked) {
            if expected <= head_seq {
                report.next = Some(expected);
                return Ok(report);
            }
            break;
        }
        let want = if budget.max_entries == 0 {
            SCAN_CHUNK
        } else {
            let left = budget.max_entries - report.checked;
            SCAN_CHUNK.min(usize::try_from(left).unwrap_or(SCAN_CHUNK))
        };
        let chunk = match store.audit_entries(expected, want) {
            Ok(chunk) => chunk,
            // Some entry in this chunk does not decode: find it one at a time.
            Err(StoreError::Corrupt { .. }) => match read_entry(store, expected)? {
                Some(r) => vec![r],
                None => {
                    return broken(
                        report,
                        expected,
                        format!("entry {expected} does not decode"),
                    );
                }
            },
            Err(e) => return Err(e.into()),
        };
        if chunk.is_empty() {
            break;
        }
        for r in chunk {
            if r.seq != expected {
                // Retention may have pruned entries since this verification began: an
                // authentic anchor that now ends right before this entry stands for them.
                match store.audit_anchor()? {
                    Some(a) if a.seq >= expected && a.seq + 1 == r.seq && key.is_authentic(&a) => {
                        report.anchor_seq = a.seq;
                        prev = a.hash;
                        expected = r.seq;
                    }
                    _ => {
                        return broken(
                            report,
                            expected,
                            format!("entry {expected} is missing or out of place"),
                        );
                    }
                }
            }
            if r.prev_hash != prev {
                return broken(
                    report,
                    r.seq,
                    format!("entry {} does not follow entry {}", r.seq, r.seq - 1),
                );
            }
            if !key.is_intact(&r) {
                return broken(report, r.seq, format!("entry {} was altered", r.seq));
            }
            if let Some(h) = recorded.filter(|h| h.seq == r.seq) {
                recorded_seen = true;
                if h.hash != r.hash {
                    return broken(
                        report,
                        r.seq,
                        format!("entry {} differs from the recorded head", r.seq),
                    );
                }
            }
            prev = r.hash;
            expected += 1;
            report.checked += 1;
            if r.seq >= last {
                break 'chain;
            }
        }
    }
    if let Some(h) = recorded
        .filter(|h| h.seq <= last && h.seq >= first && h.seq > report.anchor_seq && !recorded_seen)
    {
        let end = expected - 1;
        return broken(
            report,
            expected,
            format!(
                "the trail ends at entry {end}, before the recorded head {}",
                h.seq
            ),
        );
    }
    Ok(report)
}

/// One entry, with "does not decode" reported as absent-or-altered rather than as an error.
fn read_entry(store: &dyn Store, seq: u64) -> Result<Option<AuditRecord>, AuditError> {
    match store.audit_entry(seq) {
        Ok(r) => Ok(r),
        Err(StoreError::Corrupt { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The last seq to prune so that entries older than `cutoff` go, at most `max` at a time;
/// `None` if nothing is that old.
pub fn prune_through(
    store: &dyn Store,
    cutoff: Time,
    max: u64,
) -> Result<Option<(u64, u64)>, AuditError> {
    let Some(first) = store.audit_entries(0, 1)?.into_iter().next() else {
        return Ok(None);
    };
    if first.time >= cutoff {
        return Ok(None);
    }
    let (_, end) = seq_range(store, None, None)?;
    let keep_from = first_at_or_after(store, cutoff, first.seq, end)?;
    let through = (keep_from - 1).min(first.seq + max - 1);
    Ok(Some((first.seq, through)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_junk() {
        let page = AuditPage {
            entries: Vec::new(),
            resume_at: 42,
            more: true,
        };
        assert_eq!(decode_page_token("").unwrap(), 1);
        assert_eq!(
            decode_page_token(&page.next_page_token().unwrap()).unwrap(),
            42
        );
        assert_eq!(
            AuditPage {
                more: false,
                ..page
            }
            .next_page_token(),
            None
        );
        for junk in ["%%%", "AAAA", "not a token"] {
            assert!(matches!(
                decode_page_token(junk),
                Err(AuditError::InvalidPageToken)
            ));
        }
    }
}
