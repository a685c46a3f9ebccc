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
    /// A client certificate (verified against the client CA) that no principal claims.
    #[error("client certificate identity is not mapped to a principal")]
    UnknownCertificate,
    /// The principal sent more requests than its rate limit allows.
    #[error("principal {principal} is over its request rate; retry later")]
    RateLimited {
        /// The principal.
        principal: PrincipalId,
    },
    /// The bearer token and the client certificate name different principals.
    #[error("bearer token and client certificate belong to different principals")]
    CredentialsDisagree,
    /// The client certificate's identities map to more than one principal.
    #[error("client certificate names more than one principal: {}", principals.join(", "))]
    AmbiguousCertificate {
        /// The principals it names.
        principals: Vec<String>,
    },
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
    /// Take a backup of the whole store.
    Backup,
    /// Change a secret's metadata.
    UpdateSecret,
    /// Restore a secret pending deletion.
    Restore,
    /// Purge a secret.
    Purge,
    /// Read how much secrets were used.
    GetUsage,
}

impl Operation {
    /// The roles that grant this operation (admin grants all).
    fn granted_by(self) -> &'static [Role] {
        match self {
            Operation::Store
            | Operation::Rotate
            | Operation::RevokeSecret
            | Operation::Describe
            | Operation::UpdateSecret
            | Operation::Restore
            | Operation::List => &[Role::Writer, Role::Admin],
            Operation::RevokeLease => &[Role::Leaser, Role::Writer, Role::Admin],
            Operation::Lease => &[Role::Leaser, Role::Admin],
            Operation::Get => &[Role::Reader, Role::Admin],
            Operation::Audit => &[Role::Auditor, Role::Admin],
            Operation::GetUsage => &[Role::Auditor, Role::Writer, Role::Admin],
            Operation::RotateMasterKey | Operation::Backup | Operation::Purge => &[Role::Admin],
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
            Operation::Backup => "take a backup",
            Operation::UpdateSecret => "update secrets",
            Operation::Restore => "restore secrets",
            Operation::Purge => "purge secrets",
            Operation::GetUsage => "read secrets' usage",
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

/// An identity carried by a client certificate, as the config names it: a URI SAN such as a
/// SPIFFE ID (`spiffe://trust-domain/workload`), a DNS SAN (`dns:agent.internal`) or the
/// subject common name (`cn:agent`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertIdentity {
    /// A URI SAN, e.g. a SPIFFE ID.
    Uri(String),
    /// A DNS SAN (compared case-insensitively).
    Dns(String),
    /// The subject's common name.
    CommonName(String),
}

impl CertIdentity {
    /// Parses the config form: `spiffe://...` or `uri:...`, `dns:...`, `cn:...`.
    pub fn parse(text: &str) -> Option<Self> {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if text.starts_with("spiffe://") {
            return Some(CertIdentity::Uri(text.to_string()));
        }
        let (kind, value) = text.split_once(':')?;
        match kind {
            "uri" => non_empty(value).map(CertIdentity::Uri),
            "dns" => non_empty(value).map(|v| CertIdentity::Dns(v.to_ascii_lowercase())),
            "cn" => non_empty(value).map(CertIdentity::CommonName),
            _ => None,
        }
    }
}

impl fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertIdentity::Uri(u) => f.write_str(u),
            CertIdentity::Dns(d) => write!(f, "dns:{d}"),
            CertIdentity::CommonName(c) => write!(f, "cn:{c}"),
        }
    }
}

/// A token bucket: `per_second` requests on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second (positive; below 1 for one every few seconds).
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

/// A configured caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Its id, as recorded in the audit trail.
    pub id: PrincipalId,
    /// SHA-256 of its bearer token, if it authenticates with one.
    pub token_sha256: Option<TokenDigest>,
    /// Client certificate identities that authenticate it (with mTLS).
    pub cert_ids: BTreeSet<CertIdentity>,
    /// Its roles.
    pub roles: BTreeSet<Role>,
    /// Its tenants.
    pub tenants: TenantScope,
    /// Its own request rate limit, instead of the default.
    pub rate_limit: Option<RateLimit>,
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

    /// Every configured principal.
    pub fn iter(&self) -> impl Iterator<Item = &Principal> {
        self.0.iter()
    }

    /// Authenticates a request by its `authorization` header and the identities of its
    /// (CA-verified) client certificate. Either may identify the principal; if both do, they
    /// must agree.
    pub fn authenticate(
        &self,
        header: Option<&str>,
        cert: &[CertIdentity],
    ) -> Result<&Principal, AuthError> {
        // A certificate names at most one principal: one that several principals claim
        // authenticates none of them.
        let mut claimed = self
            .0
            .iter()
            .filter(|p| cert.iter().any(|id| p.cert_ids.contains(id)));
        let by_cert = claimed.next();
        if let Some(other) = claimed.next() {
            let mut principals = vec![
                by_cert.map(|p| p.id.to_string()).unwrap_or_default(),
                other.id.to_string(),
            ];
            principals.extend(claimed.map(|p| p.id.to_string()));
            return Err(AuthError::AmbiguousCertificate { principals });
        }
        let Some(header) = header else {
            return match (by_cert, cert.is_empty()) {
                (Some(p), _) => Ok(p),
                (None, false) => Err(AuthError::UnknownCertificate),
                (None, true) => Err(AuthError::MissingToken),
            };
        };
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
            if let Some(known) = &p.token_sha256
                && bool::from(known.ct_eq(&digest))
            {
                found = Some(p);
            }
        }
        let by_token = found.ok_or(AuthError::UnknownToken)?;
        match by_cert {
            Some(p) if p.id != by_token.id => Err(AuthError::CredentialsDisagree),
            _ => Ok(by_token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(id: &str, token: &str, roles: &[Role], tenants: Option<&[&str]>) -> Principal {
        Principal {
            id: PrincipalId::parse(id).unwrap(),
            token_sha256: Some(token_digest(token)),
            cert_ids: BTreeSet::new(),
            rate_limit: None,
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
            ps.authenticate(Some("Bearer tok-b"), &[])
                .unwrap()
                .id
                .as_str(),
            "agent"
        );
        assert_eq!(
            ps.authenticate(None, &[]).unwrap_err(),
            AuthError::MissingToken
        );
        assert_eq!(
            ps.authenticate(Some("tok-b"), &[]).unwrap_err(),
            AuthError::MalformedHeader
        );
        assert_eq!(
            ps.authenticate(Some("Bearer "), &[]).unwrap_err(),
            AuthError::MalformedHeader
        );
        assert_eq!(
            ps.authenticate(Some("Bearer tok-c"), &[]).unwrap_err(),
            AuthError::UnknownToken
        );
        assert_eq!(
            ps.authenticate(Some("Bearer tok-"), &[]).unwrap_err(),
            AuthError::UnknownToken
        );
    }

    #[test]
    fn client_certificates_identify_principals() {
        let spiffe = CertIdentity::parse("spiffe://prod/agent").unwrap();
        let mut agent = principal("agent", "tok-b", &[Role::Reader], None);
        agent.cert_ids.insert(spiffe.clone());
        let mut cert_only = principal("sidecar", "unused", &[Role::Reader], None);
        cert_only.token_sha256 = None;
        cert_only
            .cert_ids
            .insert(CertIdentity::parse("dns:Sidecar.Internal").unwrap());
        let ps = Principals::new(vec![
            principal("orch", "tok-a", &[Role::Writer], None),
            agent,
            cert_only,
        ]);
        assert_eq!(
            ps.authenticate(None, std::slice::from_ref(&spiffe))
                .unwrap()
                .id
                .as_str(),
            "agent"
        );
        let dns = CertIdentity::Dns("sidecar.internal".into());
        assert_eq!(
            ps.authenticate(None, &[dns]).unwrap().id.as_str(),
            "sidecar"
        );
        assert_eq!(
            ps.authenticate(Some("Bearer tok-b"), std::slice::from_ref(&spiffe))
                .unwrap()
                .id
                .as_str(),
            "agent"
        );
        assert_eq!(
            ps.authenticate(Some("Bearer tok-a"), &[spiffe])
                .unwrap_err(),
            AuthError::CredentialsDisagree
        );
        // One certificate, two principals: neither.
        let both = [
            CertIdentity::Dns("sidecar.internal".into()),
            CertIdentity::Uri("spiffe://prod/agent".into()),
        ];
        assert_eq!(
            ps.authenticate(None, &both).unwrap_err(),
            AuthError::AmbiguousCertificate {
                principals: vec!["agent".into(), "sidecar".into()]
            }
        );
        let stranger = CertIdentity::parse("cn:stranger").unwrap();
        assert_eq!(
            ps.authenticate(None, std::slice::from_ref(&stranger))
                .unwrap_err(),
            AuthError::UnknownCertificate
        );
        // A token still works alongside an unmapped certificate.
        assert_eq!(
            ps.authenticate(Some("Bearer tok-a"), &[stranger])
                .unwrap()
                .id
                .as_str(),
            "orch"
        );
        assert_eq!(
            ps.authenticate(Some("Bearer unused"), &[]).unwrap_err(),
            AuthError::UnknownToken
        );
        for bad in ["", "dns:", "ftp:x", "agent"] {
            assert_eq!(CertIdentity::parse(bad), None, "{bad}");
        }
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
                    Operation::GetUsage,
                ],
            ),
            (Role::Leaser, &[Operation::Lease, Operation::RevokeLease]),
            (Role::Reader, &[Operation::Get]),
            (Role::Auditor, &[Operation::Audit, Operation::GetUsage]),
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
            Operation::GetUsage,
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
