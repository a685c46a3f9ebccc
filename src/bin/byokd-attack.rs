//! `byokd-attack`: runs one abuse pattern against a byokd on loopback while an authenticated
//! victim keeps leasing and redeeming a secret, and reports as one JSON line what the victim
//! got done and what the attack got back. For the hardening tests and for before/after
//! figures (see BENCHMARKS.md).
//!
//! ```text
//! byokd-attack --target 127.0.0.1:50051 --token ADMIN_TOKEN --duration 10s [--data-dir DIR] ATTACK
//!   stall --connections 1 --streams 512   HTTP/2 streams that send headers (no token) and never a body
//!   idle --connections 2000               TCP connections that never send a byte
//!   flood --concurrency 16                requests without credentials, as fast as they are answered
//!   watch --connections 8 --streams 64    health Watch streams (no credentials), held open
//!   unread --connections 8 --streams 64   Audit pages (the victim's token) on connections that
//!                                         grant no flow-control credit: nothing can be sent
//!   paths --concurrency 64                requests to made-up methods of served services, each
//!                                         path new, no credentials
//! ```
//!
//! With `--data-dir`, it also reports how fast the audit trail grew (`db/audit`) meanwhile.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use byokd::api::v1::vault_client::VaultClient;
use byokd::api::v1::{self as pb};
use clap::{Parser, Subcommand};
use tokio::sync::Mutex;
use tonic::Request;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "byokd-attack",
    about = "Abuse patterns against byokd on loopback, with an authenticated victim"
)]
struct Args {
    /// byokd's address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    target: SocketAddr,
    /// Bearer token of the victim: a principal that may store, lease and get in `--tenant`.
    #[arg(long, env = "BYOKD_TOKEN")]
    token: String,
    /// Tenant of the victim's secret.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// How long the attack (and the victim) run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent victim loops (each: Lease, then Get).
    #[arg(long, default_value_t = 4)]
    victims: usize,
    /// The server's data directory: report the audit trail's growth.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    attack: Attack,
}

#[derive(Subcommand, Clone, Copy)]
enum Attack {
    /// HTTP/2 streams with headers only, no token, no body: each held open until the server
    /// ends it, then opened again.
    Stall {
        /// Connections.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Streams per connection.
        #[arg(long, default_value_t = 512)]
        streams: usize,
    },
    /// TCP connections that never send anything.
    Idle {
        /// Connections.
        #[arg(long, default_value_t = 2000)]
        connections: usize,
    },
    /// Requests without credentials, each sent as soon as the last was answered.
    Flood {
        /// Concurrent request loops.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Health `Watch` streams, no credentials, held open (never read) as long as the server
    /// keeps them; renewed as it ends them.
    Watch {
        /// Connections.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Streams per connection.
        #[arg(long, default_value_t = 64)]
        streams: usize,
    },
    /// Requests without credentials to made-up methods (a new path each time) under the
    /// services byokd serves, as fast as they are answered.
    Paths {
        /// Concurrent streams (on one connection).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Audit pages of up to 1000 entries, with the victim's token, on connections that grant
    /// no flow-control credit (initial window 0): the server can send no response byte.
    Unread {
        /// Connections.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Streams per connection.
        #[arg(long, default_value_t = 64)]
        streams: usize,
    },
}

/// Counts by gRPC code name (or transport error).
type Codes = Arc<Mutex<BTreeMap<String, u64>>>;

async fn count(codes: &Codes, code: impl Into<String>) {
    *codes.lock().await.entry(code.into()).or_default() += 1;
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("byokd-attack: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("byokd-attack: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<String, BoxError> {
    let channel = Channel::from_shared(format!("http://{}", args.target))?
        .connect()
        .await?;
    let name = format!("attack-victim-{}", std::process::id());
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {}", args.token).parse()?;
    let mut victim = VaultClient::new(channel.clone());
    let mut store = Request::new(pb::StoreRequest {
        tenant: args.tenant.clone(),
        name: name.clone(),
        provider: "anthropic".into(),
        value: b"sk-attack-victim-0123456789abcdefghij".to_vec(),
        labels: Default::default(),
        ..Default::default()
    });
    store.metadata_mut().insert("authorization", token.clone());
    victim.store(store).await?;

    let audit_before = args.data_dir.as_deref().map(audit_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let attack_codes: Codes = Arc::default();
    let victim_codes: Codes = Arc::default();
    let victim_ok = Arc::new(AtomicU64::new(0));
    let extra = Arc::new(Mutex::new(BTreeMap::<&'static str, u64>::new()));

    let mut tasks = Vec::new();
    for _ in 0..args.victims {
        let (client, token, tenant, name) = (
            VaultClient::new(channel.clone()),
            token.clone(),
            args.tenant.clone(),
            name.clone(),
        );
        let (stop, codes, ok) = (stop.clone(), victim_codes.clone(), victim_ok.clone());
        tasks.push(tokio::spawn(async move {
            victim_loop(client, token, tenant, name, stop, codes, ok).await;
        }));
    }
    let started = Instant::now();
    match args.attack {
        Attack::Stall {
            connections,
            streams,
        } => {
            for _ in 0..connections {
                let (stop, codes, extra) = (stop.clone(), attack_codes.clone(), extra.clone());
                let target = args.target;
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = stall(target, streams, stop, codes.clone(), extra).await {
                        count(&codes, format!("connection error: {e}")).await;
                    }
                }));
            }
        }
        Attack::Idle { connections } => {
            let (stop, extra) = (stop.clone(), extra.clone());
            let target = args.target;
            tasks.push(tokio::spawn(async move {
                idle(target, connections, stop, extra).await;
            }));
        }
        Attack::Watch {
            connections,
            streams,
        }
        | Attack::Unread {
            connections,
            streams,
        } => {
            let hold = match args.attack {
                Attack::Watch { .. } => Hold {
                    path: "/grpc.health.v1.Health/Watch",
                    message: Vec::new(),
                    token: None,
                    window: None,
                },
                _ => Hold {
                    path: "/byokd.v1.Vault/Audit",
                    message: prost::Message::encode_to_vec(&pb::AuditRequest {
                        page_size: 1000,
                        ..Default::default()
                    }),
                    token: Some(format!("Bearer {}", args.token)),
                    window: Some(0),
                },
            };
            let hold = Arc::new(hold);
            for _ in 0..connections {
                let (stop, codes, extra) = (stop.clone(), attack_codes.clone(), extra.clone());
                let (target, hold) = (args.target, hold.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = held(target, &hold, streams, stop, codes.clone(), extra).await {
                        count(&codes, format!("connection error: {e}")).await;
                    }
                }));
            }
        }
        Attack::Paths { concurrency } => {
            let (stop, codes) = (stop.clone(), attack_codes.clone());
            let target = args.target;
            tasks.push(tokio::spawn(async move {
                if let Err(e) = paths(target, concurrency, stop, codes.clone()).await {
                    count(&codes, format!("connection error: {e}")).await;
                }
            }));
        }
        Attack::Flood { concurrency } => {
            for _ in 0..concurrency {
                let (stop, codes) = (stop.clone(), attack_codes.clone());
                let client = VaultClient::new(channel.clone());
                let (tenant, name) = (args.tenant.clone(), name.clone());
                tasks.push(tokio::spawn(async move {
                    flood(client, tenant, name, stop, codes).await;
                }));
            }
        }
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Release);
    let elapsed = started.elapsed().as_secs_f64();
    let audit_per_s = match (args.data_dir.as_deref(), audit_before) {
        (Some(dir), Some(before)) => {
            Some((audit_bytes(dir).saturating_sub(before)) as f64 / elapsed)
        }
        _ => None,
    };
    for task in tasks {
        // Attack tasks may hold streams the server never ends: do not wait for them.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    let ok = victim_ok.load(Ordering::Relaxed);
    let report = serde_json::json!({
        "attack": match args.attack {
            Attack::Stall { .. } => "stall",
            Attack::Idle { .. } => "idle",
            Attack::Flood { .. } => "flood",
            Attack::Watch { .. } => "watch",
            Attack::Paths { .. } => "paths",
            Attack::Unread { .. } => "unread",
        },
        "seconds": elapsed,
        "victim_ok": ok,
        "victim_ok_per_s": ok as f64 / elapsed,
        "victim_errors": *victim_codes.lock().await,
        "attack_answers": *attack_codes.lock().await,
        "attack_counts": *extra.lock().await,
        "audit_bytes_per_s": audit_per_s,
    });
    Ok(report.to_string())
}

/// Leases the victim's secret and redeems it, over and over.
async fn victim_loop(
    mut client: VaultClient<Channel>,
    token: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    tenant: String,
    name: String,
    stop: Arc<AtomicBool>,
    codes: Codes,
    ok: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Acquire) {
        let mut lease = Request::new(pb::LeaseRequest {
            tenant: tenant.clone(),
            name: name.clone(),
            ttl: None,
            max_uses: 1,
            audience: String::new(),
        });
        lease.metadata_mut().insert("authorization", token.clone());
        let grant = match client.lease(lease).await {
            Ok(grant) => grant.into_inner(),
            Err(status) => {
                count(&codes, byokd::rpcmetrics::code_name(status.code())).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut get = Request::new(pb::GetRequest { token: grant.token });
        get.metadata_mut().insert("authorization", token.clone());
        match client.get(get).await {
            Ok(_) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                count(&codes, byokd::rpcmetrics::code_name(status.code())).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One connection's stalled streams: headers only, renewed as the server ends them.
async fn stall(
    target: SocketAddr,
    streams: usize,
    stop: Arc<AtomicBool>,
    codes: Codes,
    extra: Arc<Mutex<BTreeMap<&'static str, u64>>>,
) -> Result<(), BoxError> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut open = tokio::task::JoinSet::new();
    let mut opened = 0u64;
    while !stop.load(Ordering::Acquire) {
        while open.len() < streams && !stop.load(Ordering::Acquire) {
            // Waits while the server's stream limit is reached.
            let mut ready = match tokio::time::timeout(
                Duration::from_millis(200),
                client.clone().ready(),
            )
            .await
            {
                Ok(ready) => ready?,
                Err(_) => break,
            };
            let request = http::Request::post(format!("http://{target}/byokd.v1.Vault/Get"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())?;
            let (response, body) = ready.send_request(request, false)?;
            opened += 1;
            let codes = codes.clone();
            open.spawn(async move {
                // The body is never sent; `body` is held until the server answers.
                let _held = body;
                let code = match response.await {
                    Ok(response) => status_in_headers(&response)
                        .unwrap_or("answered")
                        .to_string(),
                    Err(e) => match e.reason() {
                        Some(reason) => format!("reset: {reason:?}"),
                        None => "stream error".to_string(),
                    },
                };
                count(&codes, code).await;
            });
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), open.join_next()).await;
    }
    *extra.lock().await.entry("streams_opened").or_default() += opened;
    open.abort_all();
    Ok(())
}

/// Requests to made-up methods, `concurrency` at a time on one connection, each path new.
async fn paths(
    target: SocketAddr,
    concurrency: usize,
    stop: Arc<AtomicBool>,
    codes: Codes,
) -> Result<(), BoxError> {
    const SERVICES: [&str; 3] = [
        "byokd.v1.Vault",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];
    let tcp = tokio::net::TcpStream::connect(target).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let next = Arc::new(AtomicU64::new(0));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, stop, codes, next) =
            (client.clone(), stop.clone(), codes.clone(), next.clone());
        loops.spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Ok(mut ready) = client.clone().ready().await else {
                    count(&codes, "connection closed").await;
                    return;
                };
                let service = SERVICES[(i % 3) as usize];
                let Ok(request) =
                    http::Request::post(format!("http://{target}/{service}/Made{i}Up"))
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .body(())
                else {
                    return;
                };
                let Ok((response, _)) = ready.send_request(request, true) else {
                    count(&codes, "send failed").await;
                    continue;
                };
                let code = match response.await {
                    Ok(response) => status_in_headers(&response)
                        .unwrap_or("answered")
                        .to_string(),
                    Err(_) => "stream error".to_string(),
                };
                count(&codes, code).await;
            }
        });
    }
    while loops.join_next().await.is_some() {}
    Ok(())
}

/// Streams that send their request whole and then hold the response.
struct Hold {
    path: &'static str,
    /// The request message (a gRPC frame is put around it).
    message: Vec<u8>,
    /// The authorization header, if any.
    token: Option<String>,
    /// The initial stream window granted to the server, if not the default.
    window: Option<u32>,
}

/// One connection's held streams: each sends its request and keeps its response unread,
/// renewed as the server ends them. Counts what the response headers said (a status:
/// refused at once; none: held).
async fn held(
    target: SocketAddr,
    hold: &Hold,
    streams: usize,
    stop: Arc<AtomicBool>,
    codes: Codes,
    extra: Arc<Mutex<BTreeMap<&'static str, u64>>>,
) -> Result<(), BoxError> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    let mut builder = h2::client::Builder::new();
    if let Some(window) = hold.window {
        builder.initial_window_size(window);
    }
    let (client, connection) = builder.handshake::<_, bytes::Bytes>(tcp).await?;
    let closed = Arc::new(AtomicBool::new(false));
    {
        let closed = closed.clone();
        tokio::spawn(async move {
            let _ = connection.await;
            closed.store(true, Ordering::Release);
        });
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(hold.message.len())?.to_be_bytes());
    frame.extend_from_slice(&hold.message);
    let frame = bytes::Bytes::from(frame);
    let mut open = tokio::task::JoinSet::new();
    let mut opened = 0u64;
    while !stop.load(Ordering::Acquire) && !closed.load(Ordering::Acquire) {
        while open.len() < streams && !stop.load(Ordering::Acquire) {
            let mut ready = match tokio::time::timeout(
                Duration::from_millis(200),
                client.clone().ready(),
            )
            .await
            {
                Ok(ready) => ready?,
                Err(_) => break,
            };
            let mut request = http::Request::post(format!("http://{target}{}", hold.path))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if let Some(token) = &hold.token {
                request = request.header("authorization", token);
            }
            let (response, mut body) = ready.send_request(request.body(())?, false)?;
            body.send_data(frame.clone(), true)?;
            opened += 1;
            let (codes, stop) = (codes.clone(), stop.clone());
            open.spawn(async move {
                match response.await {
                    Ok(response) => {
                        if let Some(code) = status_in_headers(&response) {
                            count(&codes, code).await;
                            return;
                        }
                        count(&codes, "held").await;
                        // Never read: held until the server ends it or the attack stops.
                        let body = response.into_body();
                        while !stop.load(Ordering::Acquire) && !body.is_end_stream() {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    Err(e) => {
                        let code = match e.reason() {
                            Some(reason) => format!("reset: {reason:?}"),
                            None => "stream error".to_string(),
                        };
                        count(&codes, code).await;
                    }
                }
            });
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), open.join_next()).await;
    }
    let mut extra = extra.lock().await;
    *extra.entry("streams_opened").or_default() += opened;
    if closed.load(Ordering::Acquire) {
        *extra.entry("connections_closed_by_server").or_default() += 1;
    }
    open.abort_all();
    Ok(())
}

/// Connections that send nothing; counts how many the server closed.
async fn idle(
    target: SocketAddr,
    connections: usize,
    stop: Arc<AtomicBool>,
    extra: Arc<Mutex<BTreeMap<&'static str, u64>>>,
) {
    use tokio::io::AsyncReadExt;
    let closed = Arc::new(AtomicU64::new(0));
    let mut opened = 0u64;
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..connections {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(mut stream) = tokio::net::TcpStream::connect(target).await else {
            *extra.lock().await.entry("connect_failed").or_default() += 1;
            continue;
        };
        opened += 1;
        let (closed, stop) = (closed.clone(), stop.clone());
        held.spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => {
                        if matches!(read, Ok(0) | Err(_)) {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                    }
                }
            }
        });
    }
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while held.join_next().await.is_some() {}
    let mut extra = extra.lock().await;
    *extra.entry("connections_opened").or_default() += opened;
    *extra.entry("connections_closed_by_server").or_default() += closed.load(Ordering::Relaxed);
}

/// Requests without credentials, back to back.
async fn flood(
    mut client: VaultClient<Channel>,
    tenant: String,
    name: String,
    stop: Arc<AtomicBool>,
    codes: Codes,
) {
    while !stop.load(Ordering::Acquire) {
        let code = match client
            .describe(pb::SecretRef {
                tenant: tenant.clone(),
                name: name.clone(),
            })
            .await
        {
            Ok(_) => "OK",
            Err(status) => byokd::rpcmetrics::code_name(status.code()),
        };
        count(&codes, code).await;
    }
}

/// The gRPC status name of a response answered in its headers (a trailers-only answer, as
/// refusals are), if it was.
fn status_in_headers<B>(response: &http::Response<B>) -> Option<&'static str> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(|c| byokd::rpcmetrics::code_name(tonic::Code::from_i32(c)))
}

/// Bytes in the audit trail's directory.
fn audit_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("db").join("audit"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
