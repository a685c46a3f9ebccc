//! `byokd-bench`: drives a running byokd with N concurrent streams over M connections and
//! reports requests/s and latency per workload, as a table and as JSON, each as a ratio to a
//! no-op baseline measured in the same run (these machines are noisy: only ratios from one
//! run compare).
//!
//! ```text
//! byokd-bench --target http://127.0.0.1:50051 --token TOKEN --workload baseline,get,lease+get \
//!     --concurrency 64 --duration 10s [--connections 4] [--rate 2000] [--rounds 3] [--json out.json]
//! ```
//!
//! `--target` may name several replicas (comma-separated): the connections go to each in
//! turn, and stream i uses connection i mod connections, so the streams spread evenly.
//!
//! With `--rounds N` the workloads run N times in turn (each for `--duration`) and each one's
//! ratio is the median of its ratios to the baseline of the same round.
//!
//! The token's principal needs the roles of the workloads (an admin has them all). The
//! baseline is a no-op tonic service (`byokd.bench.v1.Baseline/Echo`, Get-sized messages)
//! that byokd-bench starts in a child process of its own, served like byokd on loopback.

use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use byokd::api::bench::v1::baseline_client::BaselineClient;
use byokd::api::bench::v1::baseline_server::{Baseline, BaselineServer};
use byokd::api::v1::vault_client::VaultClient;
use byokd::api::v1::{self as pb};
use clap::Parser;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// Secrets stored by this process so far (for unique names).
static STORED: AtomicU64 = AtomicU64::new(0);

#[derive(Parser, Clone)]
#[command(
    name = "byokd-bench",
    about = "Load generator for byokd, with a no-op baseline in the same run"
)]
struct Args {
    /// byokd's address, e.g. http://127.0.0.1:50051; several replicas' addresses,
    /// comma-separated, spread the connections (and so the streams) over them in turn.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Bearer token of a principal with the roles the workloads need.
    #[arg(long, env = "BYOKD_TOKEN", default_value = "")]
    token: String,
    /// Workloads, comma-separated: baseline, get, lease+get, store, rotate, mixed, or all.
    #[arg(long, default_value = "all")]
    workload: String,
    /// Concurrent request streams.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the streams share (at least one per target).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long each workload runs (per round).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Run the list of workloads this many times in turn and report each workload's ratio to
    /// the baseline as the median of the rounds' ratios: the machine's load drifts over a run,
    /// and interleaving exposes the workloads and the baseline to the same drift.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Stop each workload after this many requests instead (0: by duration only).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Pace the whole run at this many requests per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Secrets prepared for the get, lease+get and rotate workloads.
    #[arg(long, default_value_t = 100)]
    secrets: usize,
    /// Size of each secret value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: serve the baseline at this address and print it.
    #[arg(long, hide = true)]
    serve_baseline: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Baseline,
    Get,
    LeaseGet,
    Store,
    Rotate,
    Mixed,
}

impl Workload {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "baseline" => Workload::Baseline,
            "get" => Workload::Get,
            "lease+get" => Workload::LeaseGet,
            "store" => Workload::Store,
            "rotate" => Workload::Rotate,
            "mixed" => Workload::Mixed,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Baseline => "baseline",
            Workload::Get => "get",
            Workload::LeaseGet => "lease+get",
            Workload::Store => "store",
            Workload::Rotate => "rotate",
            Workload::Mixed => "mixed",
        }
    }
}

/// mimalloc instead of glibc's malloc: the server allocates per request on many threads,
/// where glibc's arenas cost a measurable share of a `Get` (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("byokd-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match &args.serve_baseline {
        Some(addr) => runtime.block_on(serve_baseline(addr.clone(), args.value_bytes)),
        None => runtime.block_on(run(args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("byokd-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The outcome of one workload.
struct Report {
    workload: Workload,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    /// Latencies of successful requests, sorted.
    latencies: Vec<Duration>,
    /// Requests/s relative to the baseline in each round (empty without a baseline).
    ratios: Vec<f64>,
}

impl Report {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i].as_secs_f64() * 1000.0
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let workloads: Vec<Workload> = if args.workload == "all" {
        vec![
            Workload::Baseline,
            Workload::Get,
            Workload::LeaseGet,
            Workload::Store,
            Workload::Rotate,
            Workload::Mixed,
        ]
    } else {
        args.workload
            .split(',')
            .map(|w| Workload::parse(w.trim()).ok_or_else(|| format!("unknown workload {w:?}")))
            .collect::<Result<_, _>>()?
    };
    let mut runner = Runner {
        tenant: format!("bench-{}", std::process::id()),
        baseline: None,
        prepared: None,
    };
    let mut rounds: Vec<Vec<Report>> = Vec::new();
    for round in 0..args.rounds {
        if args.rounds > 1 {
            eprintln!("== round {} of {}", round + 1, args.rounds);
        }
        let mut reports = Vec::new();
        for &workload in &workloads {
            reports.push(runner.run(&args, workload).await?);
        }
        rounds.push(reports);
    }
    drop(runner);
    print_reports(&merge(rounds), &args)
}

/// What stays between the workloads of a run: the baseline server (started at its first run)
/// and the secrets prepared for the read workloads.
struct Runner {
    tenant: String,
    baseline: Option<(Killed, String)>,
    prepared: Option<Vec<String>>,
}

impl Runner {
    /// Runs `workload` once for `args.duration`.
    async fn run(&mut self, args: &Args, workload: Workload) -> Result<Report, BoxError> {
        // The baseline's requests carry the same bearer token as byokd's: the client encodes
        // it and the no-op server receives it, like every real call.
        let auth = Auth(format!("Bearer {}", args.token).parse()?);
        Ok(if workload == Workload::Baseline {
            let addr = match &self.baseline {
                Some((_, addr)) => addr.clone(),
                None => {
                    let (child, addr) = start_baseline(args.value_bytes)?;
                    self.baseline = Some((Killed(child), addr.clone()));
                    addr
                }
            };
            let channels = channels(&format!("http://{addr}"), args.connections).await?;
            drive(args, workload, move |i| {
                let client = BaselineClient::with_interceptor(
                    channels[i % channels.len()].clone(),
                    auth.clone(),
                );
                move |_: u64| {
                    let mut client = client.clone();
                    async move {
                        client
                            .echo(pb::GetRequest {
                                token: "x".repeat(52),
                            })
                            .await
                            .map(drop)
                    }
                }
            })
            .await
        } else {
            let channels = channels(&args.target, args.connections).await?;
            let vault = |i: usize| {
                VaultClient::with_interceptor(channels[i % channels.len()].clone(), auth.clone())
            };
            let names = match &self.prepared {
                Some(names) => names.clone(),
                None => {
                    let names =
                        prepare(&mut vault(0), &self.tenant, args.secrets, args.value_bytes)
                            .await?;
                    self.prepared = Some(names.clone());
                    names
                }
            };
            let names = Arc::new(names);
            let (tenant, value_bytes) = (self.tenant.clone(), args.value_bytes);
            drive(args, workload, move |i| {
                let client = vault(i);
                let (names, tenant) = (names.clone(), tenant.clone());
                let lease = Arc::new(tokio::sync::Mutex::new(None::<(String, u32)>));
                move |n: u64| {
                    let (mut client, names, tenant, lease) =
                        (client.clone(), names.clone(), tenant.clone(), lease.clone());
                    async move {
                        one_request(
                            workload,
                            &mut client,
                            &tenant,
                            &names,
                            i,
                            n,
                            value_bytes,
                            &lease,
                        )
                        .await
                    }
                }
            })
            .await
        })
    }
}

/// One request (or, for lease+get, the pair) of `workload`.
#[allow(clippy::too_many_arguments)]
async fn one_request(
    workload: Workload,
    client: &mut Vault,
    tenant: &str,
    names: &[String],
    worker: usize,
    n: u64,
    value_bytes: usize,
    lease: &tokio::sync::Mutex<Option<(String, u32)>>,
) -> Result<(), Status> {
    let pick = |salt: u64| {
        names[((n.wrapping_mul(2654435761) ^ salt) as usize + worker) % names.len()].clone()
    };
    let workload = match workload {
        Workload::Mixed => match n % 100 {
            0..=89 => Workload::LeaseGet,
            90..=94 => Workload::Store,
            95..=98 => Workload::Rotate,
            _ => {
                let req = pb::AuditRequest {
                    tenant: tenant.into(),
                    page_size: 100,
                    ..Default::default()
                };
                return client.audit(req).await.map(drop);
            }
        },
        other => other,
    };
    match workload {
        Workload::Get => {
            let mut held = lease.lock().await;
            if held.as_ref().is_none_or(|(_, left)| *left == 0) {
                let grant = client
                    .lease(lease_request(tenant, &pick(1), 1000))
                    .await?
                    .into_inner();
                *held = Some((grant.token, grant.max_uses));
            }
            let Some((token, left)) = held.as_mut() else {
                return Err(Status::internal("no lease"));
            };
            match client
                .get(pb::GetRequest {
                    token: token.clone(),
                })
                .await
            {
                Ok(v) => {
                    *left = v.into_inner().remaining_uses;
                    Ok(())
                }
                // Rotated by another workload, or expired: lease again next time.
                Err(s) if s.code() == Code::NotFound => {
                    *left = 0;
                    Ok(())
                }
                Err(s) => Err(s),
            }
        }
        Workload::LeaseGet => {
            let grant = client
                .lease(lease_request(tenant, &pick(2), 1))
                .await?
                .into_inner();
            client
                .get(pb::GetRequest { token: grant.token })
                .await
                .map(drop)
        }
        Workload::Store => {
            // Unique across workloads of one run (store, then mixed) and across runs.
            let unique = STORED.fetch_add(1, Ordering::Relaxed);
            let name = format!("w{worker}-{n}-{unique}-{}", std::process::id());
            client
                .store(store_request(tenant, &name, value_bytes))
                .await
                .map(drop)
        }
        Workload::Rotate => {
            let req = pb::RotateRequest {
                tenant: tenant.into(),
                name: pick(3),
                value: value(value_bytes),
                ..Default::default()
            };
            match client.rotate(req).await {
                // Several streams rotating one secret at once: byokd retries, then says ABORTED.
                Err(s) if s.code() == Code::Aborted => Ok(()),
                other => other.map(drop),
            }
        }
        Workload::Baseline | Workload::Mixed => Ok(()),
    }
}

/// Runs `workload`: `concurrency` streams, each made by `make(stream)` and called with a
/// request number, for the duration or request count, paced if `--rate` says so.
async fn drive<M, F, Fut>(args: &Args, workload: Workload, make: M) -> Report
where
    M: Fn(usize) -> F,
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), Status>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let interval = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate as f64));
    let limit = args.requests;
    let concurrency = args.concurrency.max(1);
    let workers: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let call = make(i);
            let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                // Paced streams start spread over one interval, not all at once.
                let mut next = Instant::now()
                    + interval.map_or(Duration::ZERO, |every| {
                        every.mul_f64(i as f64 / concurrency as f64)
                    });
                while !stop.load(Ordering::Relaxed) {
                    if let Some(every) = interval {
                        tokio::time::sleep_until(next.into()).await;
                        next += every;
                    }
                    let t = Instant::now();
                    match call(n).await {
                        Ok(()) => latencies.push(t.elapsed()),
                        Err(status) => {
                            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "\nfirst error: {:?}: {}",
                                    status.code(),
                                    status.message()
                                );
                            }
                        }
                    }
                    n += 1;
                    if done.fetch_add(1, Ordering::Relaxed) + 1 >= limit && limit > 0 {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                latencies
            })
        })
        .collect();
    let deadline = started + args.duration;
    let mut last = 0;
    while !stop.load(Ordering::Relaxed) && (limit > 0 || Instant::now() < deadline) {
        tokio::time::sleep(
            Duration::from_secs(1).min(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ),
        )
        .await;
        let now = done.load(Ordering::Relaxed);
        eprint!(
            "\r{:>10}: {:>9} requests, {:>8.0}/s now, {} errors   ",
            workload.name(),
            now,
            (now - last) as f64,
            errors.load(Ordering::Relaxed)
        );
        let _ = std::io::stderr().flush();
        last = now;
        if limit == 0 && Instant::now() >= deadline {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for w in workers {
        if let Ok(l) = w.await {
            latencies.extend(l);
        }
    }
    let elapsed = started.elapsed();
    eprintln!();
    latencies.sort_unstable();
    Report {
        workload,
        requests: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latencies,
        ratios: Vec::new(),
    }
}

/// One report per workload from the rounds' reports: requests, errors, time and latencies
/// added up, and each round's ratio to that round's baseline.
fn merge(rounds: Vec<Vec<Report>>) -> Vec<Report> {
    let mut merged: Vec<Report> = Vec::new();
    for round in rounds {
        let baseline = round
            .iter()
            .find(|r| r.workload == Workload::Baseline)
            .map(Report::rps);
        for r in round {
            let ratio = baseline.map(|b| r.rps() / b);
            match merged.iter_mut().find(|m| m.workload == r.workload) {
                Some(m) => {
                    m.requests += r.requests;
                    m.errors += r.errors;
                    m.elapsed += r.elapsed;
                    m.latencies.extend(r.latencies);
                    m.ratios.extend(ratio);
                }
                None => merged.push(Report {
                    ratios: ratio.into_iter().collect(),
                    ..r
                }),
            }
        }
    }
    for m in &mut merged {
        m.latencies.sort_unstable();
    }
    merged
}

/// The median of `values` (None if empty).
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn print_reports(reports: &[Report], args: &Args) -> Result<(), BoxError> {
    println!(
        "| workload | requests | errors | req/s | ratio to baseline | p50 ms | p90 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for r in reports {
        let ratio = median(&r.ratios);
        println!(
            "| {} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.workload.name(),
            r.requests,
            r.errors,
            r.rps(),
            match (ratio, r.ratios.len()) {
                (None, _) => "-".to_string(),
                (Some(x), 1) => format!("{x:.2}"),
                (Some(x), _) => {
                    let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = r.ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    format!("{x:.2} ({lo:.2}-{hi:.2})")
                }
            },
            r.percentile_ms(0.5),
            r.percentile_ms(0.9),
            r.percentile_ms(0.99),
            r.percentile_ms(1.0)
        );
        json.push(serde_json::json!({
            "workload": r.workload.name(),
            "requests": r.requests,
            "errors": r.errors,
            "rps": r.rps(),
            "p50_ms": r.percentile_ms(0.5),
            "p90_ms": r.percentile_ms(0.9),
            "p99_ms": r.percentile_ms(0.99),
            "max_ms": r.percentile_ms(1.0),
            "ratio_to_baseline": ratio,
            "ratios_per_round": r.ratios,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "rate": args.rate,
        }));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

/// `count` connections (at least one per target), to the comma-separated `targets` in turn.
async fn channels(targets: &str, count: usize) -> Result<Vec<Channel>, BoxError> {
    let targets: Vec<&str> = targets.split(',').map(str::trim).collect();
    let mut out = Vec::new();
    for i in 0..count.max(targets.len()) {
        out.push(
            Endpoint::from_shared(targets[i % targets.len()].to_string())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

/// Stores the secrets the read workloads use; returns their names.
async fn prepare(
    client: &mut Vault,
    tenant: &str,
    count: usize,
    value_bytes: usize,
) -> Result<Vec<String>, BoxError> {
    let mut names = Vec::new();
    for i in 0..count.max(1) {
        let name = format!("s{i}");
        client
            .store(store_request(tenant, &name, value_bytes))
            .await?;
        names.push(name);
    }
    Ok(names)
}

fn value(len: usize) -> Vec<u8> {
    (0..len.max(1)).map(|i| b'a' + (i % 26) as u8).collect()
}

fn store_request(tenant: &str, name: &str, value_bytes: usize) -> pb::StoreRequest {
    pb::StoreRequest {
        tenant: tenant.into(),
        name: name.into(),
        provider: "bench".into(),
        value: value(value_bytes),
        labels: Default::default(),
        ..Default::default()
    }
}

fn lease_request(tenant: &str, name: &str, max_uses: u32) -> pb::LeaseRequest {
    pb::LeaseRequest {
        tenant: tenant.into(),
        name: name.into(),
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        max_uses,
        audience: String::new(),
    }
}

#[derive(Clone)]
struct Auth(MetadataValue<Ascii>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Vault = VaultClient<InterceptedService<Channel, Auth>>;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this program as the baseline server; returns it and its address.
fn start_baseline(value_bytes: usize) -> Result<(Child, String), BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--serve-baseline",
            "127.0.0.1:0",
            "--value-bytes",
            &value_bytes.to_string(),
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("baseline stdout")?;
    let line = BufReader::new(stdout)
        .lines()
        .next()
        .ok_or("baseline did not start")??;
    let addr = line
        .strip_prefix("baseline listening on ")
        .ok_or("baseline did not start")?
        .to_string();
    Ok((child, addr))
}

struct NoOp {
    value_bytes: usize,
}

#[tonic::async_trait]
impl Baseline for NoOp {
    async fn echo(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::SecretValue>, Status> {
        let _ = request.into_inner();
        Ok(Response::new(pb::SecretValue {
            value: value(self.value_bytes),
            tenant: "bench".into(),
            name: "s0".into(),
            provider: "bench".into(),
            version: 1,
            lease_id: "00000000-0000-0000-0000-000000000000".into(),
            remaining_uses: 999,
        }))
    }
}

/// The no-op server: the same tonic server defaults byokd uses, plaintext on loopback.
async fn serve_baseline(addr: String, value_bytes: usize) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("baseline listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(BaselineServer::new(NoOp { value_bytes }))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}
