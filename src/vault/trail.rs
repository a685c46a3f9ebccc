//! The audit trail's operations: queries, chain verification and retention.

use crate::audit::{self, AuditFilter, AuditPage, RecordedHead, Verification};
use crate::auth::{AuthError, Operation, Principal};
use crate::model::{
    Action, AuditDraft, ChainHash, Outcome, PrincipalId, SecretName, TenantId, Time,
    ValidationError,
};
use crate::store::{Guard, Transaction, Write, on_blocking_thread};
use std::time::Duration;

use super::{
    AuditFilterInput, AuditInput, Caller, MAX_VERIFY_PAGE, PRUNE_BATCH, Vault, VaultError,
    VerifyInput, noted, page_size_or,
};

impl Vault {
    /// A page of the audit trail.
    pub async fn audit(&self, caller: &Caller, input: AuditInput) -> Result<AuditPage, VaultError> {
        operation!(self, caller, Action::Audit, |audit| {
            note_filter_target(caller, &mut audit, &input.filter);
            let principal = caller.authorize(Operation::Audit)?;
            let filter = audit_filter(input.filter, principal, &mut audit)?;
            let size = page_size_or(
                input.page_size,
                audit::DEFAULT_PAGE_SIZE,
                audit::MAX_PAGE_SIZE,
            )?;
            let from = audit::decode_page_token(&input.page_token)?;
            let page = self.scan(filter, from, size).await?;
            self.record(audit.settle()).await?;
            Ok(page)
        })
    }

    /// A page of audit entries, read on a blocking thread once a scan place is free (a
    /// query reads up to the store's scan budget of entries: CPU and disk work).
    pub(super) async fn scan(
        &self,
        filter: AuditFilter,
        from: u64,
        size: usize,
    ) -> Result<AuditPage, VaultError> {
        let _place = self
            .scans
            .clone()
            .acquire_owned()
            .await
            // Never closed.
            .map_err(|_| VaultError::Contention)?;
        let store = self.store.clone();
        let page =
            on_blocking_thread(
                async move { store.audit_query(&filter, from, u64::MAX, size).await },
            )
            .await
            .map_err(VaultError::Background)??;
        Ok(page)
    }

    /// Verifies the audit hash chain (a range of it, or all of it).
    pub async fn verify_audit(
        &self,
        caller: &Caller,
        input: VerifyInput,
    ) -> Result<Verification, VaultError> {
        operation!(self, caller, Action::VerifyAudit, |audit| {
            caller.authorize_global(Operation::Audit)?;
            if input.to_seq != 0 && input.to_seq < input.from_seq {
                return Err(ValidationError::new("to_seq", "before from_seq").into());
            }
            // Nothing past the head can be checked: that is no broken chain.
            let head = self.store.durable_audit_seq();
            if input.from_seq > head + 1 {
                return Err(VaultError::PastHead {
                    field: "from_seq",
                    head,
                });
            }
            let recorded = match (input.recorded_head_seq, input.recorded_head_hash.as_str()) {
                (0, "") => None,
                (0, _) => {
                    return Err(ValidationError::new(
                        "expected_head_seq",
                        "required with expected_head_hash",
                    )
                    .into());
                }
                (seq, hash) => Some(RecordedHead {
                    seq,
                    hash: parse_chain_hash(hash).ok_or_else(|| {
                        ValidationError::new("expected_head_hash", "64 hex digits")
                    })?,
                }),
            };
            let (store, key) = (self.store.clone(), self.chain.clone());
            let (from, to) = (input.from_seq, input.to_seq);
            let budget = audit::Budget {
                max_entries: match input.max_entries {
                    0 => MAX_VERIFY_PAGE,
                    n => n.min(MAX_VERIFY_PAGE),
                },
                stop: Some(audit.stop_flag()),
            };
            // Hashing the trail is CPU work: keep it off the async workers.
            let report = on_blocking_thread(async move {
                audit::verify(&*store, &key, from, to, recorded, &budget).await
            })
            .await
            .map_err(VaultError::Background)??;
            audit.reason = match (&report.broken, report.next) {
                (Some((seq, why)), _) => format!("chain broken at entry {seq}: {why}"),
                (None, Some(next)) => format!(
                    "chain intact so far ({} entries checked; resume at {next})",
                    report.checked
                ),
                (None, None) => format!("chain intact ({} entries checked)", report.checked),
            };
            self.record(audit.settle()).await?;
            Ok(report)
        })
    }

    /// Prunes audit entries older than `keep`, moving the chain's anchor past them, and
    /// records each prune in the trail; every commit carries `fence` (see `runner`). Returns
    /// how many entries went.
    pub async fn prune_audit(&self, keep: Duration, fence: Guard) -> Result<u64, VaultError> {
        let cutoff = Time::now().minus(keep);
        let mut total = 0;
        while let Some((first, through)) =
            audit::prune_through(&*self.store, cutoff, PRUNE_BATCH).await?
        {
            let mut entry = AuditDraft::new(Action::Prune, None, None);
            entry.reason = format!(
                "retention: pruned entries {first}..={through}, older than {}",
                humantime::format_duration(keep)
            );
            let tx = Transaction {
                charges: Vec::new(),
                guards: vec![fence.clone()],
                writes: vec![Write::PruneAudit { through }],
                audit: Some(entry),
            };
            self.store.commit(tx).await?;
            total += through - first + 1;
        }
        Ok(total)
    }
}

/// Parses audit filters and checks the principal may see what they select: a principal
/// scoped to specific tenants must name one of them.
/// The tenant and name an audit query filters on, into its audit entry as far as they are
/// valid, before authorization decides (see [`secret_ref`]).
pub(super) fn note_filter_target(
    caller: &Caller,
    audit: &mut AuditDraft,
    filter: &AuditFilterInput,
) {
    if !filter.tenant.is_empty() {
        let tenant = TenantId::from_request(filter.tenant.as_str());
        let _ = noted(caller, "tenant", tenant, &mut audit.tenant);
    }
    if !filter.name.is_empty() {
        let name = SecretName::from_request(filter.name.as_str());
        let _ = noted(caller, "name", name, &mut audit.name);
    }
}

pub(super) fn audit_filter(
    input: AuditFilterInput,
    principal: &Principal,
    audit: &mut AuditDraft,
) -> Result<AuditFilter, VaultError> {
    let filter = AuditFilter {
        tenant: non_empty(input.tenant)
            .map(TenantId::from_request)
            .transpose()?,
        name: non_empty(input.name)
            .map(SecretName::from_request)
            .transpose()?,
        principal: non_empty(input.principal)
            .map(|p| PrincipalId::parse_field("principal", p))
            .transpose()?,
        action: non_empty(input.action)
            .map(|a| Action::parse("action", &a))
            .transpose()?,
        peer: non_empty(input.peer).map(parse_peer).transpose()?,
        outcome: non_empty(input.outcome)
            .map(|o| Outcome::parse("outcome", &o))
            .transpose()?,
        since: time_field("since", input.since)?,
        until: time_field("until", input.until)?,
    };
    audit.tenant = filter.tenant.clone();
    audit.name = filter.name.clone();
    match &filter.tenant {
        Some(tenant) => principal.require_tenant(tenant)?,
        None if !principal.may_access_all() => {
            return Err(AuthError::TenantRequired {
                principal: principal.id.clone(),
            }
            .into());
        }
        None => {}
    }
    Ok(filter)
}

pub(super) fn parse_peer(peer: String) -> Result<String, ValidationError> {
    let ok = peer.len() <= 64
        && peer
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'));
    if ok {
        Ok(peer)
    } else {
        Err(ValidationError::new(
            "peer",
            "an IP address, optionally with :port",
        ))
    }
}

pub(super) fn parse_chain_hash(hex_text: &str) -> Option<ChainHash> {
    hex::decode(hex_text).ok()?.try_into().ok()
}

pub(super) fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn time_field(
    field: &'static str,
    t: Option<(i64, i32)>,
) -> Result<Option<Time>, ValidationError> {
    t.map(|(s, n)| {
        Time::from_seconds_nanos(s, n)
            .ok_or_else(|| ValidationError::new(field, "not a valid timestamp"))
    })
    .transpose()
}
