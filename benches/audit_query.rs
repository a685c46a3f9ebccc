//! Filtered audit queries over a large trail: indexed vs. a full scan of the same trail.
//!
//! `cargo bench --bench audit_query` (release build). Environment:
//! `BYOKD_BENCH_ENTRIES` (default 1,000,000) entries are written through the store's real
//! write path (group commit, hash chain, indexes) into a temporary directory, then each query
//! shape is timed for its first page of 100 entries. The baseline is the same filter answered
//! by scanning the trail from the start, measured in the same run: machines here are noisy,
//! so the ratio is the figure to compare.

use std::sync::Arc;
use std::time::{Duration, Instant};

use byokd::chain::ChainKey;
use byokd::crypto::SymmetricKey;
use byokd::model::{Action, AuditDraft, Outcome, PrincipalId, SecretName, TenantId};
use byokd::store::AuditFilter;
use byokd::store::{SledStore, Store, Transaction};

const TENANTS: u64 = 1000;
const NAMES_PER_TENANT: u64 = 10;
const PRINCIPALS: u64 = 200;
const PEERS: u64 = 50;
const WRITERS: u64 = 64;
const PAGE: usize = 100;
const SAMPLES: usize = 50;

/// A filter of one query shape, for a sample parameter.
type FilterFor = Box<dyn Fn(u64) -> AuditFilter>;

fn entry(i: u64) -> AuditDraft {
    let actions = [
        Action::Get,
        Action::Lease,
        Action::Get,
        Action::Describe,
        Action::Store,
    ];
    let mut d = AuditDraft::new(
        actions[(i % actions.len() as u64) as usize],
        Some(PrincipalId::parse(format!("principal-{}", i % PRINCIPALS)).unwrap()),
        Some(format!(
            "10.0.{}.{}:{}",
            (i % PEERS) / 250,
            i % PEERS,
            40000 + i % 1000
        )),
    );
    let secret = (i * 7919) % (TENANTS * NAMES_PER_TENANT);
    d.tenant = Some(TenantId::parse(format!("tenant-{}", secret / NAMES_PER_TENANT)).unwrap());
    d.name = Some(SecretName::parse(format!("key-{}", secret % NAMES_PER_TENANT)).unwrap());
    d.version = Some(1);
    d.outcome = if i.is_multiple_of(97) {
        Outcome::PermissionDenied
    } else {
        Outcome::Ok
    };
    d
}

fn main() {
    let entries: u64 = std::env::var("BYOKD_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("open store"));
    runtime.block_on(async {
        let key = Arc::new(ChainKey::derive(&SymmetricKey::generate().expect("key")));
        store.start_audit_chain(key).await.expect("start chain");
        let started = Instant::now();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut i = w;
                    while i < entries {
                        store.commit(Transaction::audit_only(entry(i))).await.expect("commit");
                        i += WRITERS;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer");
        }
        let took = started.elapsed();
        eprintln!(
            "wrote {entries} audit entries in {:.1} s ({:.0} durable entries/s with {WRITERS} writers)",
            took.as_secs_f64(),
            entries as f64 / took.as_secs_f64()
        );
    });

    let mid_time = runtime
        .block_on(store.audit_entry(entries / 2))
        .expect("read")
        .expect("entry")
        .time;
    let shapes: Vec<(&str, FilterFor)> = vec![
        (
            "tenant+name",
            Box::new(|s| AuditFilter {
                tenant: Some(TenantId::parse(format!("tenant-{}", s % TENANTS)).unwrap()),
                name: Some(SecretName::parse(format!("key-{}", s % NAMES_PER_TENANT)).unwrap()),
                ..Default::default()
            }),
        ),
        (
            "principal",
            Box::new(|s| AuditFilter {
                principal: Some(
                    PrincipalId::parse(format!("principal-{}", s % PRINCIPALS)).unwrap(),
                ),
                ..Default::default()
            }),
        ),
        (
            "tenant",
            Box::new(|s| AuditFilter {
                tenant: Some(TenantId::parse(format!("tenant-{}", s % TENANTS)).unwrap()),
                ..Default::default()
            }),
        ),
        (
            "peer+outcome",
            Box::new(|s| AuditFilter {
                peer: Some(format!("10.0.0.{}", s % PEERS)),
                outcome: Some(Outcome::PermissionDenied),
                ..Default::default()
            }),
        ),
        (
            "tenant+name since mid-trail",
            Box::new(move |s| AuditFilter {
                tenant: Some(TenantId::parse(format!("tenant-{}", s % TENANTS)).unwrap()),
                name: Some(SecretName::parse(format!("key-{}", s % NAMES_PER_TENANT)).unwrap()),
                since: Some(mid_time),
                ..Default::default()
            }),
        ),
    ];
    println!("| query (first page of {PAGE}) | indexed median | scan median | scan / indexed |");
    println!("|---|---|---|---|");
    let mut json = Vec::new();
    for (label, filter) in &shapes {
        let indexed = time_samples(|s| {
            let page = runtime
                .block_on(store.audit_query(&filter(s), 1, u64::MAX, PAGE))
                .expect("query");
            assert!(!page.entries.is_empty(), "{label}: no results");
        });
        let scanned = time_samples(|s| {
            let found = runtime.block_on(full_scan(&*store, &filter(s)));
            assert!(found > 0, "{label}: no results by scan");
        });
        let ratio = scanned.as_secs_f64() / indexed.as_secs_f64();
        println!(
            "| {label} | {:.2} ms | {:.1} ms | {ratio:.0}x |",
            ms(indexed),
            ms(scanned)
        );
        json.push(format!(
            "{{\"query\":\"{label}\",\"entries\":{entries},\"indexed_ms\":{:.3},\"scan_ms\":{:.3},\"speedup\":{ratio:.1}}}",
            ms(indexed),
            ms(scanned)
        ));
    }
    println!("{}", json.join("\n"));
    runtime.block_on(store.close()).expect("close");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median time of `f` over `SAMPLES` different parameters.
fn time_samples(f: impl Fn(u64)) -> Duration {
    let mut times: Vec<Duration> = (0..SAMPLES as u64)
        .map(|s| {
            let started = Instant::now();
            f(s * 31 + 7);
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// The baseline: the first page of `filter` by reading the trail from the start, as a store
/// without indexes would.
async fn full_scan(store: &dyn Store, filter: &AuditFilter) -> usize {
    let mut found = 0;
    let mut next = 1;
    loop {
        let chunk = store.audit_entries(next, 1024).await.expect("scan");
        let Some(last) = chunk.last() else {
            return found;
        };
        next = last.seq + 1;
        found += chunk.iter().filter(|r| filter.matches(r)).count();
        if found >= PAGE {
            return found;
        }
    }
}
