//! Who is calling: the authenticated principal (or why there is none), its peer, and what
//! its request named that was not valid.

use crate::auth::{AuthError, Operation, Principal};
use crate::model::{Action, AuditDraft};
use std::time::Instant;

use super::VaultError;
/// Who is calling: the authentication result and where from. Authentication failures are
/// kept, not raised, so that the operation can audit them.
pub struct Caller {
    pub(super) principal: Result<Principal, AuthError>,
    pub(super) peer: Option<std::sync::Arc<str>>,
    /// The principal has used up its request rate.
    pub(super) rate_limited: bool,
    /// Parts of the request's target that were not valid: a failure's audit entry says so
    /// (the value itself is never recorded).
    pub(super) invalid: std::sync::Mutex<Vec<&'static str>>,
    /// When the request's answer is no longer wanted (see [`Pending`]).
    pub(super) deadline: Option<Instant>,
}

impl Caller {
    /// The caller, whose request's answer is no longer wanted after `deadline`.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    pub(super) fn authorize(&self, operation: Operation) -> Result<&Principal, VaultError> {
        let principal = self.principal.as_ref().map_err(|e| e.clone())?;
        if self.rate_limited {
            return Err(AuthError::RateLimited {
                principal: principal.id.clone(),
            }
            .into());
        }
        principal.require(operation)?;
        Ok(principal)
    }

    /// [`Caller::authorize`] for an operation on the whole vault: the principal must also
    /// have every tenant in scope.
    pub(super) fn authorize_global(&self, operation: Operation) -> Result<&Principal, VaultError> {
        let principal = self.authorize(operation)?;
        if !principal.may_access_all() {
            return Err(AuthError::GlobalScopeRequired {
                principal: principal.id.clone(),
            }
            .into());
        }
        Ok(principal)
    }

    /// The keys of the caller's failed-redemption buckets: its peer host together with its
    /// principal (so that one principal's bad guesses do not lock out another's valid Gets
    /// from the same host), and its principal from any host.
    pub(super) fn failure_keys(&self) -> Vec<String> {
        let principal = self.principal.as_ref().ok().map(|p| p.id.as_str());
        let mut keys = Vec::with_capacity(2);
        if let Some(peer) = &self.peer {
            keys.push(format!(
                "peer:{}|{}",
                crate::model::peer_host(peer),
                principal.unwrap_or("")
            ));
        }
        if let Some(principal) = principal {
            keys.push(format!("principal:{principal}"));
        }
        keys
    }

    /// Notes that the request named an invalid `field` (tenant, name, lease id, ...).
    pub(super) fn note_invalid(&self, field: &'static str) {
        let mut invalid = self.invalid.lock().unwrap_or_else(|p| p.into_inner());
        if !invalid.contains(&field) {
            invalid.push(field);
        }
    }

    pub(super) fn draft(&self, action: Action) -> AuditDraft {
        AuditDraft::new(
            action,
            self.principal.as_ref().ok().map(|p| p.id.clone()),
            self.peer.as_deref().map(str::to_owned),
        )
    }
}
