//! Checking the audit trail: page tokens of queries (which the store answers, see
//! `store::query`), hash-chain verification, and the retention policy's plan.
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
use crate::model::{AuditRecord, ChainHash, Time};
use crate::store::query::{SCAN_CHUNK, first_at_or_after, seq_range};
pub use crate::store::{AuditFilter, AuditPage};
use crate::store::{Store, StoreError};

/// Default number of entries in a page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: usize = 1000;

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
pub async fn verify(
    store: &dyn Store,
    key: &ChainKey,
    from: u64,
    to: u64,
    recorded: Option<RecordedHead>,
    budget: &Budget,
) -> Result<Verification, AuditError> {
    let head = match store.audit_head().await {
        Ok(head) => head.map(|r| (r.seq, r.hash)),
        Err(StoreError::Corrupt { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let anchor = store.audit_anchor().await?;
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
        match read_entry(store, start).await? {
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
        let chunk = match store.audit_entries(expected, want).await {
            Ok(chunk) => chunk,
            // Some entry in this chunk does not decode: find it one at a time.
            Err(StoreError::Corrupt { .. }) => match read_entry(store, expected).await? {
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
                match store.audit_anchor().await? {
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
async fn read_entry(store: &dyn Store, seq: u64) -> Result<Option<AuditRecord>, AuditError> {
    match store.audit_entry(seq).await {
        Ok(r) => Ok(r),
        Err(StoreError::Corrupt { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The last seq to prune so that entries older than `cutoff` go, at most `max` at a time;
/// `None` if nothing is that old.
pub async fn prune_through(
    store: &dyn Store,
    cutoff: Time,
    max: u64,
) -> Result<Option<(u64, u64)>, AuditError> {
    let Some(first) = store.audit_entries(0, 1).await?.into_iter().next() else {
        return Ok(None);
    };
    if first.time >= cutoff {
        return Ok(None);
    }
    let (_, end) = seq_range(store, None, None).await?;
    let keep_from = first_at_or_after(store, cutoff, first.seq, end).await?;
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
