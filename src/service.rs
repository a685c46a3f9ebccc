//! The gRPC boundary: generated protobuf types in, domain calls, protobuf types out.
//!
//! This is the one place where errors become `tonic::Status`. Internal failures are logged
//! here with their cause and returned as a generic message. Request bodies are never logged.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use crate::admission::Admitted;
use crate::api::v1::{self as pb, vault_server};
use crate::crypto::Plaintext;
use crate::lease::RequestedTtl;
use crate::model::{AuditRecord, Outcome, Phase, Time};
use crate::store::{DayRow, SecretActivity};
use crate::vault::{
    AuditFilterInput, AuditInput, Caller, Changed, Described, LeaseInput, LifeInput, ListInput,
    RevokeTarget, RotateInput, StoreInput, UpdateInput, UsageInput, Vault, VaultError, VerifyInput,
    WatchEvent, WatchInput, day_start,
};

/// Bytes per message of a backup stream.
const BACKUP_CHUNK: usize = 64 * 1024;

/// The `byokd.v1.Vault` service.
pub struct VaultService {
    vault: Arc<Vault>,
    /// The server's request timeout: a request's answer is not wanted after it (nor after
    /// the caller's own `grpc-timeout`).
    request_timeout: Option<Duration>,
}

impl VaultService {
    /// A service answering with `vault`.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self {
            vault,
            request_timeout: None,
        }
    }

    /// The service, under the server's request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The server, ready to add to a tonic router.
    pub fn into_server(self) -> vault_server::VaultServer<Self> {
        vault_server::VaultServer::new(self)
    }

    /// The caller admission authenticated (see `admission`). A request that did not come
    /// through admission (a service used on its own) is authenticated by its metadata.
    fn caller<T>(&self, request: &mut Request<T>) -> Caller {
        let timeout = match (self.request_timeout, grpc_timeout(request.metadata())) {
            (Some(server), Some(client)) => Some(server.min(client)),
            (server, client) => server.or(client),
        };
        let deadline = |arrived: Instant| timeout.and_then(|t| arrived.checked_add(t));
        if let Some(admitted) = request.extensions_mut().remove::<Admitted>() {
            let deadline = deadline(admitted.arrived);
            return self
                .vault
                .caller_authenticated(admitted.principal, admitted.peer)
                .with_deadline(deadline);
        }
        let authorization = request
            .metadata()
            .get("authorization")
            // Present but not text: pass something that fails as malformed, not as missing.
            .map(|v| v.to_str().unwrap_or(""));
        let peer = request.remote_addr().map(|a| a.to_string().into());
        self.vault
            .caller(authorization, &[], peer)
            .with_deadline(deadline(Instant::now()))
    }
}

/// The caller's `grpc-timeout` (up to 8 digits and a unit: H, M, S, m, u, n), if valid.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[tonic::async_trait]
impl vault_server::Vault for VaultService {
    async fn store(
        &self,
        mut request: Request<pb::StoreRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let caller = self.caller(&mut request);
        let mut req = request.into_inner();
        let input = StoreInput {
            tenant: req.tenant,
            name: req.name,
            provider: req.provider,
            // Moves the buffer: no copy of the value is left behind unzeroized.
            value: Plaintext::new(std::mem::take(&mut req.value)),
            labels: req.labels,
            strict_format: req.strict_format,
            life: LifeInput {
                allowed_readers: req.allowed_readers,
                expires_at: req.expires_at.map(seconds_nanos),
                rotate_after: req.rotate_after.map(|d| (d.seconds, d.nanos)),
            },
        };
        let result = self.vault.store(&caller, input).await;
        respond("Store", result.map(changed))
    }

    async fn describe(
        &self,
        mut request: Request<pb::SecretRef>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let result = self.vault.describe(&caller, req.tenant, req.name).await;
        respond("Describe", result.map(|r| metadata(&r)))
    }

    async fn list(
        &self,
        mut request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let states = req
            .states
            .iter()
            .map(|s| match pb::SecretState::try_from(*s) {
                Ok(pb::SecretState::Active) => Some(Phase::Active),
                Ok(pb::SecretState::Expired) => Some(Phase::Expired),
                Ok(pb::SecretState::Revoked) => Some(Phase::Revoked),
                Ok(pb::SecretState::PendingDeletion) => Some(Phase::PendingDeletion),
                Ok(pb::SecretState::Unspecified) | Err(_) => None,
            })
            .collect();
        let input = ListInput {
            tenant: req.tenant,
            page_size: req.page_size,
            page_token: req.page_token,
            provider: req.provider,
            label_selector: req.label_selector,
            states,
            expiring_before: req.expiring_before.map(seconds_nanos),
            rotation_due: req.rotation_due,
        };
        let result = self.vault.list(&caller, input).await;
        respond(
            "List",
            result.map(|(secrets, next)| pb::ListResponse {
                secrets: secrets.iter().map(metadata).collect(),
                next_page_token: next.unwrap_or_default(),
            }),
        )
    }

    async fn lease(
        &self,
        mut request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseGrant>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let ttl = match req.ttl {
            None => RequestedTtl::Default,
            Some(d) => match std::time::Duration::try_from(d) {
                Ok(d) if !d.is_zero() => RequestedTtl::Positive(d),
                _ => RequestedTtl::NotPositive,
            },
        };
        let input = LeaseInput {
            tenant: req.tenant,
            name: req.name,
            ttl,
            max_uses: req.max_uses,
            audience: req.audience,
        };
        let result = self.vault.lease(&caller, input).await;
        respond(
            "Lease",
            result.map(|issued| pb::LeaseGrant {
                lease_id: issued.lease.id.to_string(),
                token: issued.token.expose_secret().to_string(),
                expires_at: Some(timestamp(issued.lease.expires_at)),
                max_uses: issued.lease.max_uses,
                version: issued.lease.version,
            }),
        )
    }

    async fn get(
        &self,
        mut request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::SecretValue>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let result = self.vault.get(&caller, &req.token).await;
        respond(
            "Get",
            result.map(|r| pb::SecretValue {
                value: r.value.expose_secret().to_vec(),
                tenant: r.secret.tenant.to_string(),
                name: r.secret.name.to_string(),
                provider: r.secret.provider.to_string(),
                // The version the value is of: the lease's (a previous one, in a rotation grace).
                version: r.lease.version,
                lease_id: r.lease.id.to_string(),
                remaining_uses: r.lease.max_uses.saturating_sub(r.lease.uses),
            }),
        )
    }

    async fn rotate(
        &self,
        mut request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let caller = self.caller(&mut request);
        let mut req = request.into_inner();
        let input = RotateInput {
            value: Plaintext::new(std::mem::take(&mut req.value)),
            tenant: req.tenant,
            name: req.name,
            strict_format: req.strict_format,
            previous_grace: req.previous_grace.map(|d| (d.seconds, d.nanos)),
        };
        let result = self.vault.rotate(&caller, input).await;
        respond("Rotate", result.map(changed))
    }

    async fn update_secret(
        &self,
        mut request: Request<pb::UpdateSecretRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let input = UpdateInput {
            tenant: req.tenant,
            name: req.name,
            labels: req.labels,
            provider: req.provider,
            life: LifeInput {
                allowed_readers: req.allowed_readers,
                expires_at: req.expires_at.map(seconds_nanos),
                rotate_after: req.rotate_after.map(|d| (d.seconds, d.nanos)),
            },
            update_mask: req.update_mask.map(|m| m.paths).unwrap_or_default(),
        };
        let result = self.vault.update_secret(&caller, input).await;
        respond("UpdateSecret", result.map(|r| metadata(&r)))
    }

    async fn restore(
        &self,
        mut request: Request<pb::SecretRef>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let result = self.vault.restore(&caller, req.tenant, req.name).await;
        respond("Restore", result.map(|r| metadata(&r)))
    }

    async fn get_usage(
        &self,
        mut request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::UsageReport>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let input = UsageInput {
            tenant: req.tenant,
            name: req.name,
            from: req.from.map(seconds_nanos),
            to: req.to.map(seconds_nanos),
            group_by_principal: req.group_by_principal,
        };
        let result = self.vault.get_usage(&caller, input).await;
        respond(
            "GetUsage",
            result.map(|rows| pb::UsageReport {
                buckets: rows.iter().map(usage_bucket).collect(),
            }),
        )
    }

    async fn purge(
        &self,
        mut request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let result = self
            .vault
            .purge(&caller, req.tenant, req.name, req.reason)
            .await;
        respond(
            "Purge",
            result.map(|p| pb::PurgeResponse {
                secret_id: p.secret_id.to_string(),
                versions_destroyed: p.versions_destroyed,
            }),
        )
    }

    async fn revoke(
        &self,
        mut request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let target = match req.target {
            None => RevokeTarget::Missing,
            Some(pb::revoke_request::Target::Secret(s)) => RevokeTarget::Secret {
                tenant: s.tenant,
                name: s.name,
            },
            Some(pb::revoke_request::Target::LeaseId(id)) => RevokeTarget::Lease(id),
        };
        let window = req.recovery_window.map(|d| (d.seconds, d.nanos));
        let result = self.vault.revoke(&caller, target, req.reason, window).await;
        respond(
            "Revoke",
            result.map(|r| pb::RevokeResponse {
                already_revoked: r.already_revoked,
                secret: r.secret.map(|secret| {
                    metadata(&Described {
                        secret,
                        usage: r.usage,
                    })
                }),
            }),
        )
    }

    async fn audit(
        &self,
        mut request: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let input = AuditInput {
            filter: AuditFilterInput {
                tenant: req.tenant,
                name: req.name,
                principal: req.principal,
                action: req.action,
                peer: req.peer,
                outcome: req.outcome,
                since: req.since.map(|t| (t.seconds, t.nanos)),
                until: req.until.map(|t| (t.seconds, t.nanos)),
            },
            page_size: req.page_size,
            page_token: req.page_token,
        };
        let result = self.vault.audit(&caller, input).await;
        respond(
            "Audit",
            result.map(|page| pb::AuditResponse {
                entries: page.entries.iter().map(audit_entry).collect(),
                next_page_token: page.next_page_token().unwrap_or_default(),
            }),
        )
    }

    async fn verify_audit(
        &self,
        mut request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let input = VerifyInput {
            from_seq: req.from_seq,
            to_seq: req.to_seq,
            recorded_head_seq: req.expected_head_seq,
            recorded_head_hash: req.expected_head_hash,
            max_entries: req.max_entries,
        };
        let result = self.vault.verify_audit(&caller, input).await;
        respond(
            "VerifyAudit",
            result.map(|v| {
                let (head_seq, head_hash) = v
                    .head
                    .map_or((0, String::new()), |(seq, hash)| (seq, hex::encode(hash)));
                let (first_bad_seq, problem) = v.broken.unwrap_or_default();
                pb::VerifyAuditResponse {
                    ok: first_bad_seq == 0 && problem.is_empty(),
                    entries_checked: v.checked,
                    first_bad_seq,
                    head_seq,
                    head_hash,
                    anchor_seq: v.anchor_seq,
                    problem,
                    next_seq: v.next.unwrap_or(0),
                }
            }),
        )
    }

    async fn rotate_master_key(
        &self,
        mut request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        let caller = self.caller(&mut request);
        let result = self.vault.rotate_master_key(&caller).await;
        respond(
            "RotateMasterKey",
            result.map(|job| pb::RotateMasterKeyResponse {
                job_id: job.id,
                new_key_version: job.target,
            }),
        )
    }

    async fn get_rotation_status(
        &self,
        mut request: Request<pb::GetRotationStatusRequest>,
    ) -> Result<Response<pb::RotationStatus>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let result = self.vault.rotation_status(&caller, req.job_id).await;
        respond(
            "GetRotationStatus",
            result.map(|job| pb::RotationStatus {
                done: job.finished_at.is_some(),
                started_at: Some(timestamp(job.started_at)),
                finished_at: job.finished_at.map(timestamp),
                job_id: job.id,
                new_key_version: job.target,
                rewrapped: job.rewrapped,
                total: job.total,
            }),
        )
    }

    type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn backup(
        &self,
        mut request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let caller = self.caller(&mut request);
        let backup = respond("Backup", self.vault.backup(&caller).await)?.into_inner();
        tracing::info!(
            records = backup.records,
            audit_head_seq = backup.header.audit_head_seq,
            "backup taken; streaming it"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // The temporary file is read off the async workers and deleted when the stream ends,
        // however it ends.
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = match backup.file.reopen() {
                Ok(file) => file,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the backup file");
                    let _ = tx.blocking_send(Err(Status::internal("internal error")));
                    return;
                }
            };
            let mut buf = vec![0; BACKUP_CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = pb::BackupChunk {
                            data: buf[..n].to_vec(),
                        };
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            tracing::warn!("backup stream cancelled by the client");
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the backup file failed");
                        let _ = tx.blocking_send(Err(Status::internal("internal error")));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchAuditStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEntry, Status>> + Send>>;

    async fn watch_audit(
        &self,
        mut request: Request<pb::WatchAuditRequest>,
    ) -> Result<Response<Self::WatchAuditStream>, Status> {
        let caller = self.caller(&mut request);
        let req = request.into_inner();
        let input = WatchInput {
            filter: AuditFilterInput {
                tenant: req.tenant,
                name: req.name,
                principal: req.principal,
                action: req.action,
                peer: req.peer,
                outcome: req.outcome,
                since: None,
                until: None,
            },
            from_seq: req.from_seq,
        };
        let result = self.vault.watch_audit(&caller, input).await;
        respond(
            "WatchAudit",
            result.map(|events| {
                let stream = ReceiverStream::new(events).map(|event| match event {
                    WatchEvent::Entry(record) => Ok(audit_entry(&record)),
                    WatchEvent::Ended { resume_at } => Err(stream_end(
                        Code::Unavailable,
                        format!("audit stream ended by the server; resume with from_seq={resume_at}"),
                        resume_at,
                    )),
                    WatchEvent::Pruned { resume_at } => Err(stream_end(
                        Code::OutOfRange,
                        format!(
                            "entries this stream had not sent yet were pruned by retention; the trail now starts at {resume_at}"
                        ),
                        resume_at,
                    )),
                });
                Box::pin(stream) as Self::WatchAuditStream
            }),
        )
    }
}

/// Trailing metadata of an ended WatchAudit stream: the seq to resume from.
pub const RESUME_METADATA: &str = "byokd-resume-from-seq";

/// The status that ends a WatchAudit stream, with where to resume in its metadata.
fn stream_end(code: Code, message: String, resume_at: u64) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(RESUME_METADATA, resume_at.into());
    Status::with_metadata(code, message, metadata)
}

/// Turns a domain result into a gRPC response: the single place errors become `Status`.
fn respond<T>(method: &'static str, result: Result<T, VaultError>) -> Result<Response<T>, Status> {
    match method {
        "Lease" if result.is_ok() => {
            crate::metrics::global().leases_issued.inc();
        }
        "Get" => crate::metrics::global().redeemed(result.is_ok()),
        _ => {}
    }
    match result {
        Ok(message) => {
            tracing::debug!(method, outcome = "OK", "request");
            Ok(Response::new(message))
        }
        Err(error) => {
            let outcome = error.outcome();
            if error.is_internal() {
                // The cause goes to the log only; the caller gets a generic message.
                tracing::error!(method, outcome = outcome.as_str(), error = %error, detail = ?error, "request failed");
            } else {
                tracing::info!(method, outcome = outcome.as_str(), "request refused");
            }
            Err(Status::new(code(outcome), error.public_message()))
        }
    }
}

fn code(outcome: Outcome) -> Code {
    match outcome {
        Outcome::Ok => Code::Ok,
        Outcome::InvalidArgument => Code::InvalidArgument,
        Outcome::NotFound => Code::NotFound,
        Outcome::AlreadyExists => Code::AlreadyExists,
        Outcome::PermissionDenied => Code::PermissionDenied,
        Outcome::FailedPrecondition => Code::FailedPrecondition,
        Outcome::Aborted => Code::Aborted,
        Outcome::ResourceExhausted => Code::ResourceExhausted,
        Outcome::OutOfRange => Code::OutOfRange,
        Outcome::Unauthenticated => Code::Unauthenticated,
        Outcome::DataLoss => Code::DataLoss,
        Outcome::Unavailable => Code::Unavailable,
        Outcome::Internal => Code::Internal,
        Outcome::Cancelled => Code::Cancelled,
        Outcome::DeadlineExceeded => Code::DeadlineExceeded,
    }
}

fn timestamp(t: Time) -> prost_types::Timestamp {
    let (seconds, nanos) = t.seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

/// A Store's or Rotate's answer: the metadata, with the warnings about the value.
fn changed(c: Changed) -> pb::SecretMetadata {
    pb::SecretMetadata {
        warnings: c.warnings,
        ..metadata(&c.secret)
    }
}

fn usage(u: &SecretActivity) -> pb::SecretUsage {
    pb::SecretUsage {
        leases_issued: u.leases_issued,
        redemptions: u.redemptions,
        failed_redemptions: u.failed_redemptions,
        last_leased_at: u.last_leased_at.map(timestamp),
        last_redeemed_at: u.last_redeemed_at.map(timestamp),
        last_redeemed_by: u
            .last_redeemed_by
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

fn usage_bucket(row: &DayRow) -> pb::UsageBucket {
    pb::UsageBucket {
        day: Some(timestamp(day_start(row.key.day))),
        tenant: row.key.tenant.to_string(),
        name: row.name.to_string(),
        principal: row.key.principal.clone(),
        leases: row.counts.leases,
        redemptions: row.counts.redemptions,
        failed_redemptions: row.counts.failed_redemptions,
        secret_id: row.key.secret_id.to_string(),
    }
}

fn seconds_nanos(t: prost_types::Timestamp) -> (i64, i32) {
    (t.seconds, t.nanos)
}

fn metadata(d: &Described) -> pb::SecretMetadata {
    let r = &d.secret;
    let now = Time::now();
    pb::SecretMetadata {
        id: r.id.to_string(),
        tenant: r.tenant.to_string(),
        name: r.name.to_string(),
        provider: r.provider.to_string(),
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        version: r.version,
        state: match r.phase(now) {
            Phase::Active => pb::SecretState::Active,
            Phase::Expired => pb::SecretState::Expired,
            Phase::PendingDeletion => pb::SecretState::PendingDeletion,
            Phase::Revoked => pb::SecretState::Revoked,
        } as i32,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        hint: r.hint.clone(),
        revoked_at: r.revoked_at.map(timestamp),
        warnings: Vec::new(),
        allowed_readers: r
            .life
            .allowed_readers
            .iter()
            .map(ToString::to_string)
            .collect(),
        expires_at: r.life.expires_at.map(timestamp),
        rotate_after: r.life.rotate_after_us.map(|us| prost_types::Duration {
            seconds: (us / 1_000_000) as i64,
            nanos: ((us % 1_000_000) * 1_000) as i32,
        }),
        rotation_due: r.rotation_due(now),
        destroy_at: r.life.destroy_at.map(timestamp),
        previous_version: r.life.grace.map_or(0, |g| g.version),
        previous_until: r.life.grace.map(|g| timestamp(g.until)),
        usage: d.usage.as_ref().map(usage),
    }
}

fn audit_entry(r: &AuditRecord) -> pb::AuditEntry {
    let e = &r.entry;
    let text = |v: Option<String>| v.unwrap_or_default();
    pb::AuditEntry {
        seq: r.seq,
        time: Some(timestamp(r.time)),
        principal: text(e.principal.as_ref().map(ToString::to_string)),
        peer: text(e.peer.clone()),
        action: e.action.as_str().to_string(),
        tenant: text(e.tenant.as_ref().map(ToString::to_string)),
        name: text(e.name.as_ref().map(ToString::to_string)),
        version: e.version.unwrap_or(0),
        lease_id: text(e.lease_id.map(|l| l.to_string())),
        outcome: e.outcome.as_str().to_string(),
        reason: e.reason.clone(),
        code: e.outcome.code(),
        secret_id: text(e.secret_id.map(|s| s.to_string())),
        prev_hash: hex::encode(r.prev_hash),
        hash: hex::encode(r.hash),
    }
}

/// Decodes `bytes` as every request message byokd accepts, and runs the request validation
/// on whatever decodes.
#[doc(hidden)]
pub fn validate_requests(bytes: &[u8]) {
    use crate::model::{Action, Labels, LeaseId, PrincipalId, Provider, Reason, check_value_len};
    use prost::Message;
    if let Ok(r) = pb::StoreRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = Provider::from_request(r.provider);
        let _ = Labels::from_request(r.labels);
        let _ = check_value_len("value", r.value.len());
    }
    if let Ok(r) = pb::RotateRequest::decode(bytes) {
        names(&r.tenant, &r.name);
    }
    if let Ok(r) = pb::PurgeRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = Reason::parse(r.reason);
    }
    if let Ok(r) = pb::GetUsageRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        for t in [r.from, r.to].into_iter().flatten() {
            let _ = Time::from_seconds_nanos(t.seconds, t.nanos);
        }
    }
    if let Ok(r) = pb::UpdateSecretRequest::decode(bytes) {
        names(&r.tenant, &r.name);
        let _ = Provider::from_request(r.provider);
        let _ = Labels::from_request(r.labels);
        for id in r.allowed_readers {
            let _ = PrincipalId::parse_field("allowed_readers", id);
        }
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

/// Validation of a request's tenant and name (for [`validate_requests`]).
fn names(tenant: &str, name: &str) {
    let _ = crate::model::TenantId::from_request(tenant);
    let _ = crate::model::SecretName::from_request(name);
}
