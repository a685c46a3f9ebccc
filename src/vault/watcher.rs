//! WatchAudit: a stream of the trail's entries as they become durable, resumable from a
//! sequence number, with a bounded number of watchers per principal and in all.

use crate::audit::AuditFilter;
use crate::auth::Operation;
use crate::model::{Action, AuditRecord, PrincipalId};
use crate::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, watch};

use super::{
    Caller, Vault, VaultError, WATCH_BUFFER, WatchEvent, WatchInput, audit_filter,
    note_filter_target,
};

impl Vault {
    /// Streams matching audit entries: those from `from_seq` on, then new ones as they become
    /// durable. A consumer that falls behind is caught up from the store; writers never wait
    /// for it.
    pub async fn watch_audit(
        &self,
        caller: &Caller,
        input: WatchInput,
    ) -> Result<mpsc::Receiver<WatchEvent>, VaultError> {
        operation!(self, caller, Action::WatchAudit, |audit| {
            note_filter_target(caller, &mut audit, &input.filter);
            let principal = caller.authorize(Operation::Audit)?;
            let mut filter = audit_filter(input.filter, principal, &mut audit)?;
            filter.since = None;
            filter.until = None;
            let permit = self.watchers.open(&principal.id)?;
            let head = self.store.durable_audit_seq();
            let from = match input.from_seq {
                0 => head + 1,
                seq if seq > head + 1 => {
                    return Err(VaultError::PastHead {
                        field: "from_seq",
                        head,
                    });
                }
                seq => seq,
            };
            if let Some(anchor) = self.store.audit_anchor().await?
                && from <= anchor.seq
            {
                return Err(VaultError::Pruned {
                    first_kept: anchor.seq + 1,
                });
            }
            // Subscribe before recording this call, so that nothing falls in between.
            let feed = self.store.subscribe_audit();
            self.record(audit.settle()).await?;
            let (tx, rx) = mpsc::channel(WATCH_BUFFER);
            let watcher = Watcher {
                store: self.store.clone(),
                filter,
                next: from,
                tx,
                shutdown: self.shutdown.subscribe(),
                _permit: permit,
            };
            tokio::spawn(watcher.run(feed));
            Ok(rx)
        })
    }
}

/// A live audit stream's task.
pub(super) struct Watcher {
    store: Arc<dyn Store>,
    filter: AuditFilter,
    /// The next seq to consider.
    next: u64,
    tx: mpsc::Sender<WatchEvent>,
    shutdown: watch::Receiver<bool>,
    /// Its place among the live streams, given back when it ends.
    _permit: WatchPermit,
}

/// The live audit streams: at most `max` in all, and `per_principal` per principal.
pub(super) struct Watchers {
    max: usize,
    per_principal: usize,
    open: std::sync::Mutex<(usize, HashMap<PrincipalId, usize>)>,
}

impl Watchers {
    pub(super) fn new(max: usize, per_principal: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_principal,
            open: Default::default(),
        })
    }

    /// A place for one more stream of `principal`, if the limits allow.
    pub(super) fn open(
        self: &Arc<Self>,
        principal: &PrincipalId,
    ) -> Result<WatchPermit, VaultError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_principal) = &mut *open;
        if *total >= self.max {
            return Err(VaultError::TooManyStreams {
                scope: "in all",
                max: self.max,
            });
        }
        let mine = by_principal.entry(principal.clone()).or_default();
        if *mine >= self.per_principal {
            return Err(VaultError::TooManyStreams {
                scope: "for this principal",
                max: self.per_principal,
            });
        }
        *mine += 1;
        *total += 1;
        Ok(WatchPermit {
            watchers: self.clone(),
            principal: principal.clone(),
        })
    }
}

/// One live audit stream's place (see [`Watchers`]).
pub(super) struct WatchPermit {
    watchers: Arc<Watchers>,
    principal: PrincipalId,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.watchers.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_principal) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(mine) = by_principal.get_mut(&self.principal) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                by_principal.remove(&self.principal);
            }
        }
    }
}

impl Watcher {
    pub(super) async fn run(mut self, mut feed: broadcast::Receiver<Arc<AuditRecord>>) {
        loop {
            if !self.catch_up().await {
                return;
            }
            // Follow the live feed until it skips ahead of us.
            loop {
                let received = tokio::select! {
                    _ = self.shutdown.wait_for(|stopping| *stopping) => {
                        let _ = self.tx.try_send(WatchEvent::Ended { resume_at: self.next });
                        return;
                    }
                    () = self.tx.closed() => return,
                    received = feed.recv() => received,
                };
                match received {
                    Ok(record) if record.seq < self.next => continue,
                    Ok(record) if record.seq == self.next => {
                        self.next = record.seq + 1;
                        if self.filter.matches(&record)
                            && !self
                                .send(WatchEvent::Entry(Box::new((*record).clone())))
                                .await
                        {
                            return;
                        }
                    }
                    // Entries were missed (lagged behind the feed, or raced the catch-up):
                    // read them from the store.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        tracing::debug!(
                            resume_at = self.next,
                            "audit stream fell behind the live feed; catching up from the store"
                        );
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = self.tx.try_send(WatchEvent::Ended {
                            resume_at: self.next,
                        });
                        return;
                    }
                }
            }
        }
    }

    /// Sends every matching durable entry from `next` on. False if the stream is over.
    pub(super) async fn catch_up(&mut self) -> bool {
        loop {
            let durable = self.store.durable_audit_seq();
            if self.next > durable {
                return true;
            }
            match self.store.audit_anchor().await {
                Ok(Some(anchor)) if self.next <= anchor.seq => {
                    let _ = self.tx.try_send(WatchEvent::Pruned {
                        resume_at: anchor.seq + 1,
                    });
                    return false;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "audit stream could not read the store");
                    let _ = self.tx.try_send(WatchEvent::Ended {
                        resume_at: self.next,
                    });
                    return false;
                }
            }
            let page = match self
                .store
                .audit_query(&self.filter, self.next, durable, WATCH_BUFFER)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "audit stream could not read the store");
                    let _ = self.tx.try_send(WatchEvent::Ended {
                        resume_at: self.next,
                    });
                    return false;
                }
            };
            for record in page.entries {
                let seq = record.seq;
                if !self.send(WatchEvent::Entry(Box::new(record))).await {
                    return false;
                }
                self.next = seq + 1;
            }
            self.next = self.next.max(page.resume_at);
            if !page.more {
                return true;
            }
        }
    }

    /// Sends `event`, waiting for a slow consumer but not past shutdown. False if the
    /// stream is over.
    pub(super) async fn send(&mut self, event: WatchEvent) -> bool {
        tokio::select! {
            sent = self.tx.send(event) => sent.is_ok(),
            _ = self.shutdown.wait_for(|stopping| *stopping) => {
                let _ = self.tx.try_send(WatchEvent::Ended { resume_at: self.next });
                false
            }
        }
    }
}
