//! What one request's work may cost: work nobody waits for stops, and is audited (requests
//! whose deadline passes or whose caller goes away are recorded as DEADLINE_EXCEEDED or
//! CANCELLED); a verification of the audit trail runs in resumable pages instead of one
//! unbounded request; audit scans run off the async workers, a few at a time.

use std::time::{Duration, Instant};

use byokd::api::v1::{self as pb};
use tonic::Code;

use crate::harness::*;

/// Fills the trail with `n` entries (denied lookups, many at a time).
async fn fill_trail(server: &TestServer, n: usize) {
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ADMIN)).await;
                for i in (w..n).step_by(16) {
                    let _ = c.describe(secret_ref("t1", &format!("missing{i}"))).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// The process's CPU time so far (user and system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn verify_req(from_seq: u64, max_entries: u64) -> pb::VerifyAuditRequest {
    pb::VerifyAuditRequest {
        from_seq,
        max_entries,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_stop_their_work_and_are_audited() {
    let dir = TestDir::with_config(
        "[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    );
    let server = dir.start();
    fill_trail(&server, 20_000).await;
    let mut admin = server.as_(ADMIN).await;

    // How long one whole verification takes here.
    let started = Instant::now();
    let whole = admin
        .verify_audit(verify_req(0, 0))
        .await
        .unwrap()
        .into_inner();
    let one = started.elapsed();
    assert!(whole.ok && whole.entries_checked >= 20_000 && whole.next_seq == 0);

    // Callers that give up long before that: a deadline they set, and a call dropped.
    let pid = server.pid();
    let before = cpu_time(pid);
    let deadline = (one / 50).max(Duration::from_millis(5));
    for _ in 0..8 {
        let mut request = tonic::Request::new(verify_req(0, 0));
        request.set_timeout(deadline);
        let status = admin.verify_audit(request).await.expect_err("too slow");
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    for _ in 0..4 {
        let call = admin.verify_audit(verify_req(0, 0));
        assert!(tokio::time::timeout(deadline, call).await.is_err());
    }
    // Twelve abandoned verifications cost less than one whole one (carried on, they would
    // keep both cores busy for the whole wait).
    tokio::time::sleep(2 * one).await;
    let spent = cpu_time(pid) - before;
    eprintln!("{spent:?} of CPU for 12 abandoned verifications; a whole one takes {one:?}");
    assert!(
        spent < one,
        "{spent:?} of CPU for 12 abandoned verifications; a whole one takes {one:?}"
    );

    let entries = audit_all(
        &server,
        pb::AuditRequest {
            action: "VerifyAudit".into(),
            ..Default::default()
        },
    )
    .await;
    let count = |outcome: &str| entries.iter().filter(|e| e.outcome == outcome).count();
    // A caller whose own timer resets the stream before the server's fires is recorded as
    // gone: the eight with a deadline are mostly, not always, DEADLINE_EXCEEDED.
    assert_eq!(
        count("DEADLINE_EXCEEDED") + count("CANCELLED"),
        12,
        "{entries:?}"
    );
    assert!(count("DEADLINE_EXCEEDED") >= 4, "{entries:?}");
    assert!(count("CANCELLED") >= 4, "{entries:?}");
    for e in entries.iter().filter(|e| e.outcome != "OK") {
        assert_eq!(e.principal, "admin");
        assert!(e.reason.contains("before the answer"), "{e:?}");
    }
    assert_chain_verifies(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_verification_runs_in_resumable_pages() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut admin = server.as_(ADMIN).await;
    for i in 0..30 {
        store(&mut admin, "t1", &format!("s{i}"), b"v").await;
    }
    let head = admin
        .verify_audit(verify_req(0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(head.ok && head.next_seq == 0);

    // Pages of 10, with the head recorded earlier: the last page checks it.
    let mut from = 0;
    let mut pages = 0;
    let mut checked = 0;
    loop {
        let page = admin
            .verify_audit(pb::VerifyAuditRequest {
                from_seq: from,
                max_entries: 10,
                expected_head_seq: head.head_seq,
                expected_head_hash: head.head_hash.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.ok, "{page:?}");
        assert!(page.entries_checked <= 10);
        checked += page.entries_checked;
        pages += 1;
        if page.next_seq == 0 {
            break;
        }
        assert_eq!(page.next_seq, from.max(1) + page.entries_checked);
        from = page.next_seq;
    }
    assert!(pages >= 3, "{pages} pages");
    assert!(checked >= head.head_seq, "{checked} of {}", head.head_seq);

    // A recorded head the trail no longer reaches is found on the page that covers it.
    let wrong = admin
        .verify_audit(pb::VerifyAuditRequest {
            from_seq: 1,
            max_entries: 1_000,
            expected_head_seq: head.head_seq,
            expected_head_hash: "00".repeat(32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !wrong.ok && wrong.first_bad_seq == head.head_seq,
        "{wrong:?}"
    );
}

/// The median of `n` Describe calls' latencies.
async fn describe_p50(client: &mut Client, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        client.describe(secret_ref("t2", "s")).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanning_auditors_leave_other_callers_their_latency() {
    let dir = TestDir::with_config(
        "[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    );
    let server = dir.start();
    fill_trail(&server, 20_000).await;
    let mut other = server.as_(ADMIN).await;
    store(&mut other, "t2", "s", b"v").await;
    let idle = describe_p50(&mut other, 40).await;

    // Eight auditors scan the whole trail for entries that are not there, again and again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scanners: Vec<_> = (0..8)
        .map(|_| {
            let addr = server.addr;
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ADMIN)).await;
                let mut scans = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.audit(pb::AuditRequest {
                        outcome: "DATA_LOSS".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                    scans += 1;
                }
                scans
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = describe_p50(&mut other, 40).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut scans = 0;
    for s in scanners {
        scans += s.await.unwrap();
    }
    eprintln!("Describe p50 {idle:?} idle, {loaded:?} beside {scans} scans");
    assert!(scans >= 8);
    assert!(
        loaded < idle * 10 + Duration::from_millis(10),
        "Describe p50 {idle:?} idle, {loaded:?} beside 8 scanning auditors"
    );
}

/// The median time of `n` scrapes of `/metrics`.
async fn scrape_p50(ops: &str, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        scrape(ops).await;
        times.push(started.elapsed());
    }
    times.sort();
    times[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_costs_the_same_however_many_leases_are_held() {
    // Leases outlive the test however slow the machine (none expires and is collected).
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [lease]\ndefault_ttl = \"15m\"\n\
         [limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    );
    let server = dir.start();
    let ops = ops_addr(&server);
    let mut admin = server.as_(ADMIN).await;
    store(&mut admin, "t1", "s", b"sk-leased-0123456789").await;
    let few = scrape_p50(&ops, 7).await;

    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ADMIN)).await;
                for _ in 0..1250 {
                    c.lease(lease_req("t1", "s", 1)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let text = scrape(&ops).await;
    assert_eq!(sample(&text, "byokd_leases_held"), 20_000.0);
    let many = scrape_p50(&ops, 7).await;
    eprintln!("scrape p50: {few:?} with no lease, {many:?} with 20,000");
    assert!(
        many < few * 3 + Duration::from_millis(20),
        "scrape p50: {few:?} with no lease, {many:?} with 20,000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_writes_only_while_it_copies_the_records_not_the_trail() {
    let dir = TestDir::with_config(
        "[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    );
    // A backup killed before it finished left its temporary file: deleted at start.
    std::fs::create_dir_all(dir.data()).unwrap();
    let stale = dir.data().join(".backup-left-by-kill-9");
    std::fs::write(&stale, b"half a backup").unwrap();
    let server = dir.start();
    assert!(!stale.exists(), "a stale backup file is deleted at start");
    fill_trail(&server, 40_000).await;
    let mut admin = server.as_(ADMIN).await;
    store(&mut admin, "t1", "s", b"sk-backed-up-0123456789").await;

    // A writer stores all along; a backup is taken meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let addr = server.addr;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut c = connect(addr, Some(ADMIN)).await;
            let mut slowest = Duration::ZERO;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                c.store(store_req("t2", &format!("w{i}"), b"sk-written-0123456789"))
                    .await
                    .unwrap();
                slowest = slowest.max(started.elapsed());
                i += 1;
            }
            (slowest, i)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut chunks = admin
        .backup(pb::BackupRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut bytes = 0;
    while let Some(chunk) = chunks.message().await.unwrap() {
        bytes += chunk.data.len();
    }
    let backup = started.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (slowest, writes) = writer.await.unwrap();
    eprintln!("backup of {bytes} bytes took {backup:?}; slowest write {slowest:?} of {writes}");
    assert!(bytes > 40_000 * 100);
    assert!(
        slowest < backup / 3,
        "a write waited {slowest:?} during a backup of {backup:?}"
    );
    // No temporary file is left once the backup is streamed.
    let left: Vec<_> = std::fs::read_dir(dir.data())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".backup-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The server's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stops_growing_at_the_quota_of_values_in_all() {
    // The store keeps the values written since start in memory (BENCHMARKS.md): the quota of
    // value bytes in all is what bounds it.
    let dir = TestDir::with_config(
        "[quotas]\nmax_value_mb_total = 8\n\
         [limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    );
    let server = dir.start();
    let pid = server.pid();
    let mut admin = server.as_(ADMIN).await;
    store(&mut admin, "t0", "warm", &value_64k(0)).await;
    let before = rss(pid);
    // 48 MiB offered by 8 tenants; 8 MiB taken.
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ADMIN)).await;
                let (mut stored, mut refused) = (0, 0);
                for i in 0..96 {
                    match c
                        .store(store_req(
                            &format!("t{}", t + 1),
                            &format!("v{i}"),
                            &value_64k(i),
                        ))
                        .await
                    {
                        Ok(_) => stored += 1,
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            refused += 1;
                        }
                    }
                }
                (stored, refused)
            })
        })
        .collect();
    let (mut stored, mut refused) = (0, 0);
    for t in tasks {
        let (s, r) = t.await.unwrap();
        stored += s;
        refused += r;
    }
    let grown = rss(pid).saturating_sub(before);
    eprintln!(
        "{stored} stored, {refused} refused, RSS grew {} MiB",
        grown >> 20
    );
    assert!(
        stored <= 128 && refused >= 640,
        "{stored} stored, {refused} refused"
    );
    assert!(
        grown < 40 << 20,
        "RSS grew {} MiB for 8 MiB of values",
        grown >> 20
    );
}
