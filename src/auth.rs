//! Principals, roles and bearer-token authentication.
//!
//! A principal is configured with the SHA-256 of its token, never the token. Authentication
//! hashes the presented token and compares it with every principal's hash in constant time,
//! so neither timing nor early exit tells how close a guess was.

use std::collections::BTreeSet;
use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::model::{PrincipalId, TenantId};

/// Authentication and authorization failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing bearer token")]
    MissingToken,
    /// `authorization` metadata that is not `Bearer <token>`.
    #[error("malformed authorization header")]
    MalformedHeader,
    /// A token no principal has.
    #[error("unknown bearer token")]
    UnknownToken,
    /// The principal lacks every role that grants the operation.
    #[error("principal {principal} may not {operation}")]
    RoleDenied {
        /// The principal.
        principal: PrincipalId,
        /// What it tried.
        operation: Operation,
    },
    /// The principal is scoped to specific tenants and named none.
    #[error("principal {principal} is scoped to specific tenants: set tenant")]
    TenantRequired {
        /// The principal.
        principal: PrincipalId,
    },
    /// The operation spans every tenant; the principal is scoped to specific ones.
    #[error(
        "principal {principal} is scoped to specific tenants; this needs access to all tenants"
    )]
    GlobalScopeRequired {
        /// The principal.
        principal: PrincipalId,
    },
    /// The principal may not act in the tenant.
    #[error("principal {principal} has no access to tenant {tenant}")]
    TenantDenied {
        /// The principal.
        principal: PrincipalId,
        /// The tenant.
        tenant: TenantId,
    },
}

/// A role, as named in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Store, Rotate, Revoke, Describe, List.
    Writer,
    /// Lease, and Revoke a lease.
    Leaser,
    /// Get (redeem a lease).
    Reader,
    /// Audit.
    Auditor,
    /// Everything.
    Admin,
}

/// An operation that needs a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Store a secret.
    Store,
    /// Rotate a secret.
    Rotate,
    /// Revoke a whole secret.
    RevokeSecret,
    /// Revoke one lease.
    RevokeLease,
    /// Read metadata.
    Describe,
    /// List metadata.
    List,
    /// Issue a lease.
    Lease,
    /// Redeem a lease.
    Get,
    /// Read the audit trail.
    Audit,
    /// Rotate the master key, or follow a rotation.
    RotateMasterKey,
}

impl Operation {
    /// The roles that grant this operation (admin grants all).
    fn granted_by(self) -> &'static [Role] {
        match self {
            Operation::Store
            | Operation::Rotate
            | Operation::RevokeSecret
            | Operation::Describe
            | Operation::List => &[Role::Writer, Role::Admin],
            Operation::RevokeLease => &[Role::Leaser, Role::Writer, Role::Admin],
            Operation::Lease => &[Role::Leaser, Role::Admin],
            Operation::Get => &[Role::Reader, Role::Admin],
            Operation::Audit => &[Role::Auditor, Role::Admin],
            Operation::RotateMasterKey => &[Role::Admin],
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Store => "store secrets",
            Operation::Rotate => "rotate secrets",
            Operation::RevokeSecret => "revoke secrets",
            Operation::RevokeLease => "revoke leases",
            Operation::Describe => "describe secrets",
            Operation::List => "list secrets",
            Operation::Lease => "lease secrets",
            Operation::Get => "redeem leases",
            Operation::Audit => "read the audit trail",
            Operation::RotateMasterKey => "rotate the master key",
        })
    }
}

/// Which tenants a principal may act in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant (`"*"` in the config).
    All,
    /// Only these.
    Only(BTreeSet<TenantId>),
}

/// Prefix of tokens generated for principals (`byokd new-token`, the bootstrap admin).
pub const ADMIN_TOKEN_PREFIX: &str = "byokd_pt_";

/// Prefix of principal tokens that byokd generates (`byokd new-token`, the bootstrap admin).
pub const PRINCIPAL_TOKEN_PREFIX: &str = "byokd_pt_";

/// SHA-256 of a bearer token.
pub type TokenDigest = [u8; 32];

/// Hashes a bearer token as the config's `token_sha256` expects.
pub fn token_digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// A configured caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Its id, as recorded in the audit trail.
    pub id: PrincipalId,
    /// SHA-256 of its bearer token.
    pub token_sha256: TokenDigest,
    /// Its roles.
    pub roles: BTreeSet<Role>,
    /// Its tenants.
    pub tenants: TenantScope,
}

impl Principal {
    /// Ok if one of the principal's roles grants `operation`.
    pub fn require(&self, operation: Operation) -> Result<(), AuthError> {
        if operation
            .granted_by()
            .iter()
            .any(|r| self.roles.contains(r))
        {
            Ok(())
        } else {
            Err(AuthError::RoleDenied {
                principal: self.id.clone(),
                operation,
            })
        }
    }

    /// Ok if the principal may act in `tenant`.
    pub fn require_tenant(&self, tenant: &TenantId) -> Result<(), AuthError> {
        if self.may_access(tenant) {
            Ok(())
        } else {
            Err(AuthError::TenantDenied {
                principal: self.id.clone(),
                tenant: tenant.clone(),
            })
        }
    }

    /// True if the principal may act in every tenant.
    pub fn may_access_all(&self) -> bool {
        self.tenants == TenantScope::All
    }

    /// True if the principal may act in `tenant`.
    pub fn may_access(&self, tenant: &TenantId) -> bool {
        match &self.tenants {
            TenantScope::All => true,
            TenantScope::Only(set) => set.contains(tenant),
        }
    }
}

/// The configured principals.
#[derive(Debug, Clone, Default)]
pub struct Principals(Vec<Principal>);

impl Principals {
    /// A registry of `principals`; ids must be unique (checked when the config is loaded).
    pub fn new(principals: Vec<Principal>) -> Self {
        Self(principals)
    }

    /// The principal with `id`.
    pub fn get(&self, id: &PrincipalId) -> Option<&Principal> {
        self.0.iter().find(|p| &p.id == id)
    }

    /// True if no principal is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Authenticates the value of an `authorization` header.
    pub fn authenticate(&self, header: Option<&str>) -> Result<&Principal, AuthError> {
        let header = header.ok_or(AuthError::MissingToken)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MalformedHeader)?;
        let digest = token_digest(token);
        // Look at every principal, whatever matches, so timing does not depend on the token.
        let mut found = None;
        for p in &self.0 {
            if bool::from(p.token_sha256.ct_eq(&digest)) {
                found = Some(p);
            }
        }
        found.ok_or(AuthError::UnknownToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(id: &str, token: &str, roles: &[Role], tenants: Option<&[&str]>) -> Principal {
        Principal {
            id: PrincipalId::parse(id).unwrap(),
            token_sha256: token_digest(token),
            roles: roles.iter().copied().collect(),
            tenants: match tenants {
                None => TenantScope::All,
                Some(t) => {
                    TenantScope::Only(t.iter().map(|t| TenantId::parse(*t).unwrap()).collect())
                }
            },
        }
    }

    #[test]
    fn bearer_tokens_authenticate() {
        let ps = Principals::new(vec![
            principal("orch", "tok-a", &[Role::Writer], None),
            principal("agent", "tok-b", &[Role::Reader], Some(&["acme"])),
        ]);
        assert_eq!(
            ps.authenticate(Some("Bearer tok-b")).unwrap().id.as_str(),
            "agent"
        );
        assert_eq!(ps.authenticate(None).unwrap_err(), AuthError::MissingToken);
        assert_eq!(
            ps.authenticate(Some("tok-b")).unwrap_err(),
            AuthError::MalformedHeader
        );
        assert_eq!(
            ps.authenticate(Some("Bearer ")).unwrap_err(),
            AuthError::MalformedHeader
        );
        assert_eq!(
            ps.authenticate(Some("Bearer tok-c")).unwrap_err(),
            AuthError::UnknownToken
        );
        assert_eq!(
            ps.authenticate(Some("Bearer tok-")).unwrap_err(),
            AuthError::UnknownToken
        );
    }

    #[test]
    fn roles_grant_operations() {
        let table: &[(Role, &[Operation])] = &[
            (
                Role::Writer,
                &[
                    Operation::Store,
                    Operation::Rotate,
                    Operation::RevokeSecret,
                    Operation::RevokeLease,
                    Operation::Describe,
                    Operation::List,
                ],
            ),
            (Role::Leaser, &[Operation::Lease, Operation::RevokeLease]),
            (Role::Reader, &[Operation::Get]),
            (Role::Auditor, &[Operation::Audit]),
        ];
        let all = [
            Operation::Store,
            Operation::Rotate,
            Operation::RevokeSecret,
            Operation::RevokeLease,
            Operation::Describe,
            Operation::List,
            Operation::Lease,
            Operation::Get,
            Operation::Audit,
        ];
        for (role, granted) in table {
            let p = principal("p", "t", &[*role], None);
            for op in all {
                assert_eq!(
                    p.require(op).is_ok(),
                    granted.contains(&op),
                    "{role:?} {op:?}"
                );
            }
        }
        let admin = principal("a", "t", &[Role::Admin], None);
        assert!(all.iter().all(|op| admin.require(*op).is_ok()));
    }

    #[test]
    fn tenant_scope_is_enforced() {
        let p = principal("p", "t", &[Role::Writer], Some(&["acme"]));
        assert!(p.require_tenant(&TenantId::parse("acme").unwrap()).is_ok());
        let err = p
            .require_tenant(&TenantId::parse("globex").unwrap())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "principal p has no access to tenant globex"
        );
    }
}
