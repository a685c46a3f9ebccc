//! byokd from Rust (tonic): the orchestrator stores and leases a user's key; the agent, on a
//! connection of its own as if in another process, redeems the lease at call time.
//!
//! ```text
//! cargo run --example rust_client -- --target http://127.0.0.1:50051 \
//!     --orchestrator-token "$ORCH_TOKEN" --agent-token "$AGENT_TOKEN"
//! ```
//!
//! The orchestrator's principal needs the writer and leaser roles, the agent's the reader role
//! (one admin token, e.g. the bootstrap token, can play both). Prints "example ok" last and
//! exits 0 only if everything behaved as expected. Never prints the secret itself.

use std::time::Duration;

use byokd::api::v1::vault_client::VaultClient;
use byokd::api::v1::{self as pb};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Adds `authorization: Bearer <token>` to every call, and a deadline.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        request.set_timeout(Duration::from_secs(10));
        Ok(request)
    }
}

type Client = VaultClient<InterceptedService<Channel, Bearer>>;

async fn client(target: &str, token: &str) -> Result<Client, Box<dyn std::error::Error>> {
    // For TLS: Endpoint::tls_config(ClientTlsConfig::new().ca_certificate(..)) and an
    // https:// target.
    let channel = Endpoint::from_shared(target.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let bearer = Bearer(format!("Bearer {token}").parse()?);
    Ok(VaultClient::with_interceptor(channel, bearer))
}

/// The orchestrator: stores the end user's key, then mints a single-use, short-lived lease
/// for the agent. Returns the lease token (a capability: pass it only to that agent).
async fn orchestrate(orch: &mut Client, tenant: &str, name: &str) -> Result<String, Status> {
    let stored = orch
        .store(pb::StoreRequest {
            tenant: tenant.into(),
            name: name.into(),
            provider: "anthropic".into(),
            value: b"sk-ant-api03-rust-example-0123456789abcdef".to_vec(),
            labels: [("user".to_string(), "42".to_string())].into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "stored {tenant}/{name}: version {}, hint {}",
        stored.version, stored.hint
    );
    let grant = orch
        .lease(pb::LeaseRequest {
            tenant: tenant.into(),
            name: name.into(),
            ttl: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            max_uses: 1,
            audience: String::new(),
        })
        .await?
        .into_inner();
    println!("leased: {} (single use, 30 s)", grant.lease_id);
    Ok(grant.token)
}

/// The agent: redeems the lease for the value at call time, uses it, and drops it.
async fn agent(agent: &mut Client, token: &str) -> Result<usize, Status> {
    let secret = agent
        .get(pb::GetRequest {
            token: token.into(),
        })
        .await?
        .into_inner();
    println!(
        "agent got the {} key, version {}, {} bytes, {} uses left",
        secret.provider,
        secret.version,
        secret.value.len(),
        secret.remaining_uses
    );
    // ... call the model provider with secret.value here, then let it go out of scope.
    Ok(secret.value.len())
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let target = arg(&args, "--target")
        .or_else(|| std::env::var("BYOKD_TARGET").ok())
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let fallback = std::env::var("BYOKD_TOKEN").ok();
    let orch_token = arg(&args, "--orchestrator-token")
        .or(fallback.clone())
        .ok_or("--orchestrator-token or BYOKD_TOKEN is required")?;
    let agent_token = arg(&args, "--agent-token")
        .or(fallback)
        .ok_or("--agent-token or BYOKD_TOKEN is required")?;
    let tenant = arg(&args, "--tenant").unwrap_or_else(|| "acme".into());
    let name = format!(
        "rust-example-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );

    let mut orch = client(&target, &orch_token).await?;
    let token = orchestrate(&mut orch, &tenant, &name).await?;
    let mut agent_client = client(&target, &agent_token).await?;
    let len = agent(&mut agent_client, &token).await?;
    if len != b"sk-ant-api03-rust-example-0123456789abcdef".len() {
        return Err("the value came back with the wrong length".into());
    }
    // A single-use lease is spent: a replay fails, with the same NOT_FOUND as any bad token.
    match agent(&mut agent_client, &token).await {
        Err(status) if status.code() == Code::NotFound => {
            println!("second redemption refused: NOT_FOUND (as expected)")
        }
        other => {
            return Err(format!("second redemption: expected NOT_FOUND, got {other:?}").into());
        }
    }
    // Errors are gRPC status codes with a message meant for the caller.
    match orch
        .lease(pb::LeaseRequest {
            tenant: tenant.clone(),
            name: "no-such-secret".into(),
            ..Default::default()
        })
        .await
    {
        Err(status) if status.code() == Code::NotFound => {
            println!(
                "lease of an unknown secret: NOT_FOUND: {}",
                status.message()
            )
        }
        other => return Err(format!("expected NOT_FOUND, got {other:?}").into()),
    }
    orch.revoke(pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::Secret(pb::SecretRef {
            tenant,
            name,
        })),
        reason: "example done".into(),
        ..Default::default()
    })
    .await?;
    println!("example ok");
    Ok(())
}
