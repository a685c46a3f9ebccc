//! Scale: startup time, memory, disk size and `Get` latency of a large vault against a small one,
//! measured in the same run.
//!
//! `cargo bench --bench scale` (release build). Environment:
//! - `BYOKD_SCALE_SECRETS` (default 1,000,000) and `BYOKD_SCALE_AUDIT` (default 10,000,000):
//!   the large vault. The small one has 1,000 secrets and their audit entries.
//! - `BYOKD_SCALE_DIR`: keep the large vault's data there and reuse it on the next run
//!   (populating 1M secrets and 10M audit entries takes about 25 minutes on 2 cores).
//! - `BYOKD_SCALE_CONFIG`: TOML appended to both servers' config, e.g.
//!   `$'[store]\ncache_size_mb = 1024'`.
//!
//! Each vault is populated through the real server over gRPC (Store at concurrency 64, then
//! Describe calls until the audit trail has the asked-for number of entries), then the server
//! is restarted twice, after a clean stop and after `kill -9`, and measured: time from process
//! start to serving, resident memory after start and after the Get run, the data directory's
//! size, and Get latency at a fixed rate (multi-use leases on 1,000 secrets spread over the
//! whole keyspace, each redeemed once untimed, then at 2,000/s from 16 streams for 10 s).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use byokd::api::v1::{self as pb};
use common::{Client, Server};

const SMALL_SECRETS: u64 = 1_000;
const TENANTS: u64 = 1_000;
const WRITERS: u64 = 64;
const CONNECTIONS: usize = 4;
const LEASED: u64 = 1_000;
const GET_STREAMS: u64 = 16;
const GET_RATE: f64 = 2_000.0;
const GET_RUN: Duration = Duration::from_secs(10);

fn reference(i: u64) -> (String, String) {
    (format!("tenant-{:04}", i % TENANTS), format!("key-{i:08}"))
}

fn write_config(dir: &Path) {
    let mut config = format!(
        "data_dir = \"data\"\n[lease]\nmax_uses = 1000000\n[limits]\nprincipal_rate_limit = {{ per_second = 1000000, burst = 1000000 }}\nfailed_get_rate_limit = {{ per_second = 1000000, burst = 1000000 }}\n{}",
        common::principal_toml()
    );
    // E.g. "[store]\ncache_size_mb = 1024" to compare cache sizes on the same data.
    if let Ok(extra) = std::env::var("BYOKD_SCALE_CONFIG") {
        config.push_str(&extra.replace("\\n", "\n"));
        config.push('\n');
    }
    common::write_config(dir, &config);
}

/// Runs `op(i)` for i in 0..n from WRITERS tasks over the server's connections, with progress.
async fn drive<F, Fut>(label: &str, clients: &[Client], n: u64, op: F)
where
    F: Fn(Client, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (client, op, done, next) = (
                clients[w as usize % clients.len()].clone(),
                op.clone(),
                done.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    if let Err(status) = op(client.clone(), i).await {
                        panic!("{:?}: {}", status.code(), status.message());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let progress = {
        let done = done.clone();
        let label = label.to_string();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let d = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {label}: {d}/{n} ({:.0}/s)",
                    d as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    for t in tasks {
        t.await.expect("writer");
    }
    progress.abort();
    eprintln!(
        "  {label}: {n} in {:.0} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
}

/// Stores `secrets` secrets, then Describes until `audit` audit entries exist.
async fn populate(server: &Server, secrets: u64, audit: u64) {
    let clients = server.clients(CONNECTIONS).await;
    drive("store", &clients, secrets, |mut client, i| async move {
        let (tenant, name) = reference(i);
        client
            .store(pb::StoreRequest {
                tenant,
                name,
                provider: "anthropic".into(),
                value: format!("sk-ant-api03-{i:08}-{}", "x".repeat(80)).into_bytes(),
                labels: Default::default(),
                ..Default::default()
            })
            .await
            .map(drop)
    })
    .await;
    let padding = audit.saturating_sub(secrets);
    drive(
        "describe",
        &clients,
        padding,
        move |mut client, i| async move {
            let (tenant, name) = reference((i * 7_919) % secrets);
            client
                .describe(pb::SecretRef { tenant, name })
                .await
                .map(drop)
        },
    )
    .await;
}

struct Measured {
    startup_clean: Duration,
    startup_crash: Duration,
    rss_start: f64,
    rss_after: f64,
    peak: f64,
    disk_mib: f64,
    get_rps: f64,
    p50: f64,
    p99: f64,
    max: f64,
    errors: u64,
}

fn disk_mib(dir: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if meta.is_dir() {
            std::fs::read_dir(p)
                .map(|d| d.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0)
        } else {
            use std::os::unix::fs::MetadataExt;
            meta.blocks() * 512
        }
    }
    walk(&dir.join("data")) as f64 / (1024.0 * 1024.0)
}

/// Get latencies at a fixed rate, from multi-use leases on LEASED secrets across the keyspace.
async fn get_run(server: &Server, secrets: u64) -> (f64, Vec<Duration>, u64) {
    let clients = server.clients(CONNECTIONS).await;
    let mut tokens = Vec::new();
    let mut lease_client = clients[0].clone();
    for k in 0..LEASED.min(secrets) {
        let (tenant, name) = reference((k * (secrets / LEASED.min(secrets)) + k % 7) % secrets);
        let grant = lease_client
            .lease(pb::LeaseRequest {
                tenant,
                name,
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                max_uses: 1_000_000,
                audience: String::new(),
            })
            .await
            .expect("lease")
            .into_inner();
        tokens.push(grant.token);
    }
    // One untimed Get per lease first: the run measures steady state, not the first read of
    // each secret's pages after a restart.
    for token in &tokens {
        lease_client
            .get(pb::GetRequest {
                token: token.clone(),
            })
            .await
            .expect("warm-up get");
    }
    let tokens = Arc::new(tokens);
    let errors = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(GET_STREAMS as f64 / GET_RATE);
    let started = Instant::now();
    let tasks: Vec<_> = (0..GET_STREAMS)
        .map(|w| {
            let (mut client, tokens, errors) = (
                clients[w as usize % clients.len()].clone(),
                tokens.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut next = Instant::now() + interval.mul_f64(w as f64 / GET_STREAMS as f64);
                let mut i = (w * 7_919) as usize;
                while started.elapsed() < GET_RUN {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                    let token = tokens[i % tokens.len()].clone();
                    i = i.wrapping_mul(31).wrapping_add(17);
                    let t = Instant::now();
                    match client.get(pb::GetRequest { token }).await {
                        Ok(_) => latencies.push(t.elapsed()),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("get stream"));
    }
    let rps = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (rps, all, errors.load(Ordering::Relaxed))
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn measure(dir: &Path, secrets: u64, audit: u64) -> Measured {
    let marker = dir.join("populated");
    let wanted = format!("{secrets} {audit}");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(dir.join("data"));
        std::fs::create_dir_all(dir).expect("dir");
        write_config(dir);
        eprintln!(
            "populating {secrets} secrets, {audit} audit entries in {}",
            dir.display()
        );
        let server = Server::start(dir, &[]);
        populate(&server, secrets, audit).await;
        server.stop();
        std::fs::write(&marker, &wanted).expect("marker");
    }
    write_config(dir);
    // After a clean stop.
    let server = Server::start(dir, &[]);
    let startup_clean = server.startup;
    server.crash();
    // After kill -9; this instance is measured.
    let server = Server::start(dir, &[]);
    let startup_crash = server.startup;
    let (rss_start, _) = server.memory();
    let (get_rps, latencies, errors) = get_run(&server, secrets).await;
    let (rss_after, peak) = server.memory();
    server.stop();
    Measured {
        startup_clean,
        startup_crash,
        rss_start,
        rss_after,
        peak,
        disk_mib: disk_mib(dir),
        get_rps,
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        max: quantile(&latencies, 1.0),
        errors,
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn main() {
    let secrets = env_u64("BYOKD_SCALE_SECRETS", 1_000_000);
    let audit = env_u64("BYOKD_SCALE_AUDIT", 10_000_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let small_dir = tempfile::tempdir().expect("tempdir");
    let temp_large = tempfile::tempdir().expect("tempdir");
    let large_dir: PathBuf = std::env::var_os("BYOKD_SCALE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| temp_large.path().to_path_buf());
    let large = runtime.block_on(measure(&large_dir, secrets, audit));
    let small = runtime.block_on(measure(small_dir.path(), SMALL_SECRETS, SMALL_SECRETS));
    let row = |name: &str, s: f64, l: f64, unit: &str| {
        println!("| {name} | {s:.2} {unit} | {l:.2} {unit} | {:.2}x |", l / s);
    };
    println!(
        "\n| measure | {SMALL_SECRETS} secrets | {secrets} secrets, {audit} audit entries | large / small |"
    );
    println!("|---|---|---|---|");
    row(
        "startup after clean stop",
        small.startup_clean.as_secs_f64() * 1000.0,
        large.startup_clean.as_secs_f64() * 1000.0,
        "ms",
    );
    row(
        "startup after kill -9",
        small.startup_crash.as_secs_f64() * 1000.0,
        large.startup_crash.as_secs_f64() * 1000.0,
        "ms",
    );
    row("RSS after start", small.rss_start, large.rss_start, "MiB");
    row("RSS after Get run", small.rss_after, large.rss_after, "MiB");
    row("peak RSS (VmHWM)", small.peak, large.peak, "MiB");
    row("data directory", small.disk_mib, large.disk_mib, "MiB");
    row("Get/s (paced at 2000/s)", small.get_rps, large.get_rps, "");
    row("Get p50", small.p50, large.p50, "ms");
    row("Get p99", small.p99, large.p99, "ms");
    row("Get max", small.max, large.max, "ms");
    println!("Get errors: small {}, large {}", small.errors, large.errors);
    println!(
        "{{\"bench\":\"scale\",\"secrets\":{secrets},\"audit\":{audit},\"startup_ms\":[{:.1},{:.1}],\"startup_after_kill_ms\":[{:.1},{:.1}],\"rss_mib\":[{:.1},{:.1}],\"peak_rss_mib\":[{:.1},{:.1}],\"disk_mib\":[{:.1},{:.1}],\"get_p99_ms\":[{:.3},{:.3}]}}",
        small.startup_clean.as_secs_f64() * 1000.0,
        large.startup_clean.as_secs_f64() * 1000.0,
        small.startup_crash.as_secs_f64() * 1000.0,
        large.startup_crash.as_secs_f64() * 1000.0,
        small.rss_after,
        large.rss_after,
        small.peak,
        large.peak,
        small.disk_mib,
        large.disk_mib,
        small.p99,
        large.p99
    );
}
