//! Raw damage to the audit trail's files: only a write torn by a crash is cut off; anything
//! else stops byokd from writing (it refuses to start, or stops once it finds the damage)
//! until an operator restores a backup or runs `byokd audit repair`, which records what was
//! lost.

use std::path::Path;
use std::time::Duration;

use byokd::api::v1::{self as pb};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::*;

/// Small segments, so that a thousand entries make several (sealed) segments.
const SMALL_SEGMENTS: &str = "[store]\naudit_segment_kb = 64\n";
/// Enough failed redemptions allowed to try every used lease again.
const MANY_FAILURES: &str =
    "[limits]\nfailed_get_rate_limit = { per_second = 1000, burst = 1000 }\n";

fn cli(dir: &TestDir, args: &[&str]) -> (i32, String) {
    let config = dir.config().to_string_lossy().into_owned();
    let mut all = args.to_vec();
    all.extend(["--config", &config]);
    byokd(dir.path(), &all, "")
}

/// A stopped server's directory with `stores` secrets, each leased and redeemed once
/// (consumed single-use leases), and the tokens of those leases.
async fn history(extra: &str, stores: usize) -> (TestDir, Vec<String>) {
    let dir = TestDir::with_config(extra);
    let server = dir.start();
    store_many(&server, stores, |i| {
        format!("sk-damage-{i:04}-0123456789abcdef").into_bytes()
    })
    .await;
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut used = Vec::new();
    for i in (0..stores).step_by((stores / 30).max(1)) {
        let grant = lease_ok(&mut orch, lease_req("acme", &format!("k{i}"), 1)).await;
        redeem(&server, AGENT, &grant.token).await.expect("get");
        used.push(grant.token);
    }
    assert!(server.stop().await.success());
    (dir, used)
}

async fn health_of(server: &TestServer) -> ServingStatus {
    health(&server.addr.to_string(), "")
        .await
        .expect("health check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_active_segment_stops_the_start_until_a_recorded_repair() {
    let (dir, used) = history(MANY_FAILURES, 70).await;
    let logs = trail_files(&dir, "log");
    assert_eq!(logs.len(), 1, "{logs:?}");
    let len = std::fs::metadata(&logs[0]).expect("segment").len();
    flip_byte(&logs[0], len / 3);

    // Refused, naming the file, the offset and what to do.
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    let name = logs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(log.contains(&name) && log.contains("at offset"), "{log}");
    assert!(log.contains("byokd audit repair"), "{log}");
    // Nothing was cut: the file is as the damage left it.
    assert_eq!(std::fs::metadata(&logs[0]).unwrap().len(), len);

    // Offline verification reports it broken; a repair without --apply changes nothing.
    let (code, text) = cli(&dir, &["audit", "verify"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("BROKEN") && text.contains(&name), "{text}");
    let (code, text) = cli(&dir, &["audit", "repair"]);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("DAMAGED") && text.contains("--apply"),
        "{text}"
    );
    assert_eq!(dir.start_failing().0.code(), Some(1));

    let (code, text) = cli(&dir, &["audit", "repair", "--apply"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("repaired: recorded as audit entry"), "{text}");
    let quarantine = dir.data().join("audit-quarantine");
    let kept: Vec<_> = std::fs::read_dir(&quarantine)
        .expect("quarantine")
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        kept.iter()
            .any(|p| p.file_name().unwrap().to_string_lossy() == name
                && std::fs::metadata(p).unwrap().len() == len),
        "{kept:?}"
    );
    // A second run finds nothing to do.
    let (code, text) = cli(&dir, &["audit", "repair", "--apply"]);
    assert_eq!(
        (code, text.contains("nothing to repair")),
        (0, true),
        "{text}"
    );

    let server = dir.start();
    assert_chain_verifies(&server).await;
    let repairs = audit_all(
        &server,
        pb::AuditRequest {
            action: "Repair".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert!(
        repairs[0].reason.contains("entries from") && repairs[0].reason.contains("lost"),
        "{repairs:?}"
    );
    // No consumed lease came back to life, whatever entry recorded its use.
    for token in &used {
        assert_status(
            redeem(&server, AGENT, token).await,
            Code::NotFound,
            "no longer valid",
        );
    }
    // And the vault works on.
    lease_and_get(&server, "acme", "k1")
        .await
        .expect("lease and get");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_sealed_segment_stops_writes_once_found() {
    let (dir, _) = history(SMALL_SEGMENTS, 1300).await;
    let logs = trail_files(&dir, "log");
    assert!(logs.len() >= 3, "{logs:?}");
    let len = std::fs::metadata(&logs[1]).unwrap().len();
    flip_byte(&logs[1], len / 2);
    let name = logs[1].file_name().unwrap().to_string_lossy().into_owned();

    // Open checks only a sealed segment's end; the scrub reads it whole and stops writes.
    let server = dir.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for attempt in 0.. {
        let mut orch = server.as_(ORCHESTRATOR).await;
        let name = format!("during-{attempt}");
        let result = orch
            .store(store_req("acme", &name, b"sk-after-damage-0123456789"))
            .await;
        if let Err(status) = result {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(!status.message().contains(&name), "no detail to callers");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still writing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = server.log();
    assert!(
        log.contains("audit trail is damaged") && log.contains(&name),
        "{log}"
    );
    // Readiness says so within the health interval (10 s by default).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while health_of(&server).await != ServingStatus::NotServing {
        assert!(std::time::Instant::now() < deadline, "still SERVING");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(server);

    let (code, text) = cli(&dir, &["audit", "verify"]);
    assert_eq!(code, 3, "{text}");
    let (code, text) = cli(&dir, &["audit", "repair"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains(&name), "{text}");
    let (code, text) = cli(&dir, &["audit", "repair", "--apply"]);
    assert_eq!(code, 0, "{text}");
    let server = dir.start();
    assert_chain_verifies(&server).await;
    server
        .as_(ORCHESTRATOR)
        .await
        .store(store_req(
            "acme",
            "after-repair",
            b"sk-after-repair-0123456789",
        ))
        .await
        .expect("writes again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_deleted_sealed_segment_is_refused_at_start() {
    let (dir, _) = history(SMALL_SEGMENTS, 1300).await;
    let logs = trail_files(&dir, "log");
    assert!(logs.len() >= 3, "{logs:?}");
    let copy = tempfile::tempdir().unwrap();
    let backup = |to: &Path| {
        for e in std::fs::read_dir(dir.data().join("db").join("audit")).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    };
    backup(copy.path());
    let restore_copy = || {
        let audit = dir.data().join("db").join("audit");
        std::fs::remove_dir_all(&audit).unwrap();
        std::fs::create_dir(&audit).unwrap();
        for e in std::fs::read_dir(copy.path()).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, audit.join(p.file_name().unwrap())).unwrap();
        }
    };

    // Truncated by 100 bytes.
    let len = std::fs::metadata(&logs[1]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&logs[1])
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    let name = logs[1].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        log.contains("audit trail is damaged") && log.contains(&name),
        "{log}"
    );

    // A middle segment deleted.
    restore_copy();
    std::fs::remove_file(&logs[1]).unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("are missing"), "{log}");
    let (code, text) = cli(&dir, &["audit", "verify"]);
    assert_eq!(code, 3, "{text}");

    // The first segment deleted.
    restore_copy();
    std::fs::remove_file(&logs[0]).unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("a segment is missing"), "{log}");

    // The last (active) segment deleted: the records reflect entries the trail lost.
    restore_copy();
    std::fs::remove_file(logs.last().unwrap()).unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("the records reflect entries through"), "{log}");

    // Untouched, it starts.
    restore_copy();
    let server = dir.start();
    assert_chain_verifies(&server).await;
}
