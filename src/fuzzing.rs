//! Entry points for the fuzz targets in `fuzz/` (not part of byokd's API). Each feeds
//! arbitrary bytes to code that handles untrusted or possibly corrupted input; none may
//! panic, whatever the bytes.

use prost::Message;

use crate::api::v1 as pb;
use crate::model::{
    Action, Labels, LeaseId, Outcome, PrincipalId, Provider, Reason, SecretName, TenantId,
    check_value_len,
};

/// Decodes `bytes` as every kind of stored record, as the store would read them.
pub fn decode_stored_record(bytes: &[u8]) {
    crate::store::decode_any_record(bytes);
}

/// Decodes `bytes` as every request message byokd accepts, and runs the request validation
/// on whatever decodes.
pub fn validate_requests(bytes: &[u8]) {
    if let Ok(r) = pb::StoreRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = Provider::parse(r.provider);
        let _ = Labels::parse(r.labels);
        let _ = check_value_len("value", r.value.len());
    }
    if let Ok(r) = pb::RotateRequest::decode(bytes) {
        names(&r.tenant, &r.name);
    }
    if let Ok(r) = pb::LeaseRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = PrincipalId::parse_field("audience", r.audience);
        if let Some(ttl) = r.ttl {
            let _ = std::time::Duration::try_from(ttl);
        }
    }
    if let Ok(r) = pb::GetRequest::decode(bytes) {
        let _ = crate::lease::presented_token_hash(&r.token);
    }
    if let Ok(r) = pb::RevokeRequest::decode(bytes) {
        let _ = Reason::parse(r.reason);
        match r.target {
            Some(pb::revoke_request::Target::Secret(s)) => names(&s.tenant, &s.name),
            Some(pb::revoke_request::Target::LeaseId(id)) => {
                let _ = LeaseId::parse("lease_id", &id);
            }
            None => {}
        }
    }
    if let Ok(r) = pb::AuditRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = Action::parse("action", &r.action);
        let _ = Outcome::parse("outcome", &r.outcome);
        let _ = crate::audit::decode_page_token(&r.page_token);
        for t in [r.since, r.until].into_iter().flatten() {
            let _ = crate::model::Time::from_seconds_nanos(t.seconds, t.nanos);
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = crate::auth::CertIdentity::parse(text);
        let _ = toml::from_str::<toml::Value>(text);
    }
}

fn names(tenant: &str, name: &str) {
    let _ = TenantId::parse(tenant);
    let _ = SecretName::parse(name);
}
