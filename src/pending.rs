//! A request's audit entry while the request runs.
//!
//! A request can end without an answer: its caller goes away (the stream is reset), or its
//! deadline passes (the server's `request_timeout`, or the caller's `grpc-timeout`). The
//! transport then drops the request's future, and with it the [`Pending`] entry, which
//! records itself as `CANCELLED` or `DEADLINE_EXCEEDED` (with the target the request named
//! so far) and raises its stop flag, which work running off the async workers (a
//! verification, a scan) checks to stop too.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::model::{AuditDraft, Outcome};
use crate::store::{Store, Transaction};

/// How early a drop still counts as the deadline's: timers fire to the millisecond, the
/// transport's started before the request reached the vault, and a caller's own timer
/// (which resets the stream) started before the request was sent.
const DEADLINE_SLACK: Duration = Duration::from_millis(20);

/// A request's audit entry until the request concludes; see the module documentation.
pub struct Pending {
    draft: AuditDraft,
    /// The entry was recorded or handed to [`Pending::finish`]: not to be recorded again.
    settled: bool,
    /// The request concluded: nothing to stop when dropped.
    finished: bool,
    store: Arc<dyn Store>,
    deadline: Option<Instant>,
    stop: Arc<AtomicBool>,
}

impl Pending {
    /// `draft`, recorded in `store` if dropped unsettled; past `deadline`, as
    /// `DEADLINE_EXCEEDED`.
    pub fn new(draft: AuditDraft, store: Arc<dyn Store>, deadline: Option<Instant>) -> Self {
        Self {
            draft,
            settled: false,
            finished: false,
            store,
            deadline,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Raised when the request is abandoned: blocking work on its behalf stops.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The entry as it stands, to commit; it will not be recorded again when dropped.
    pub fn settle(&mut self) -> AuditDraft {
        self.settled = true;
        self.draft.clone()
    }

    /// The entry, to conclude the request with.
    pub fn finish(mut self) -> AuditDraft {
        self.settled = true;
        self.finished = true;
        let action = self.draft.action;
        std::mem::replace(&mut self.draft, AuditDraft::new(action, None, None))
    }
}

impl Deref for Pending {
    type Target = AuditDraft;

    fn deref(&self) -> &AuditDraft {
        &self.draft
    }
}

impl DerefMut for Pending {
    fn deref_mut(&mut self) -> &mut AuditDraft {
        &mut self.draft
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.finished {
            self.stop.store(true, Ordering::Release);
        }
        if self.settled {
            return;
        }
        let mut entry = self.draft.clone();
        // The transport's timer started a little before the request reached the vault.
        let past_deadline = self
            .deadline
            .is_some_and(|d| Instant::now() + DEADLINE_SLACK >= d);
        entry.outcome = if past_deadline {
            Outcome::DeadlineExceeded
        } else {
            Outcome::Cancelled
        };
        let why = if past_deadline {
            "the deadline passed before the answer"
        } else {
            "the caller went away before the answer"
        };
        entry.reason = if entry.reason.is_empty() {
            why.into()
        } else {
            format!("{why} (caller's reason: {})", entry.reason)
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                action = entry.action.as_str(),
                "an abandoned request could not be audited: no runtime"
            );
            return;
        };
        let store = self.store.clone();
        runtime.spawn(async move {
            if let Err(e) = store.commit(Transaction::audit_only(entry)).await {
                tracing::error!(error = %e, "could not audit an abandoned request");
            }
        });
    }
}
