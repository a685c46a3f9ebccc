//! The tamper-evident audit trail: verification (online and offline) against every kind of
//! tampering, live streaming, indexed queries, export and retention.

use std::process::Command;
use std::time::Duration;

use byokd::api::v1::{self as pb};
use byokd::model::{AuditRecord, Outcome};
use byokd::store::{SledStore, Store};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::harness::*;

/// A stopped server's data directory with a little history: 12 audit entries.
async fn history() -> TestDir {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    for i in 0..4 {
        store(
            &mut orch,
            "acme",
            &format!("k{i}"),
            b"sk-history-0123456789abcdef",
        )
        .await;
    }
    for i in 0..4 {
        lease_and_get(&server, "acme", &format!("k{i}"))
            .await
            .unwrap();
    }
    assert!(server.stop().await.success());
    dir
}

/// Applies `edit` to the stored audit entries of a stopped server's directory.
async fn tamper(dir: &TestDir, edit: impl FnOnce(&SledStore, Vec<AuditRecord>)) {
    let store = SledStore::open(&dir.data().join("db")).unwrap();
    let entries = store.audit_entries(0, usize::MAX).await.unwrap();
    edit(&store, entries);
    store.close().await.unwrap();
}

/// `byokd audit verify` on the directory: (exit code, stdout).
fn verify_offline(dir: &TestDir, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(["audit", "verify", "--config"])
        .arg(dir.config())
        .args(extra)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

async fn verify_online(
    server: &TestServer,
    req: pb::VerifyAuditRequest,
) -> pb::VerifyAuditResponse {
    server
        .as_(AUDITOR)
        .await
        .verify_audit(req)
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn an_untouched_trail_verifies_online_and_offline() {
    let dir = history().await;
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("intact: 12 entries checked"), "{text}");
    assert!(text.contains("head: seq 12 hash "), "{text}");

    let server = dir.start();
    assert!(
        server.log().contains("audit head"),
        "the head is logged at startup"
    );
    let report = verify_online(&server, pb::VerifyAuditRequest::default()).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(
        (
            report.entries_checked,
            report.first_bad_seq,
            report.head_seq
        ),
        (12, 0, 12)
    );
    assert_eq!(report.head_hash.len(), 64);
    // A range, and a recorded head that is still there.
    let head = (report.head_seq, report.head_hash.clone());
    let range = verify_online(
        &server,
        pb::VerifyAuditRequest {
            from_seq: 5,
            to_seq: 9,
            ..Default::default()
        },
    )
    .await;
    assert!(range.ok && range.entries_checked == 5, "{range:?}");
    let anchored = verify_online(
        &server,
        pb::VerifyAuditRequest {
            expected_head_seq: head.0,
            expected_head_hash: head.1,
            ..Default::default()
        },
    )
    .await;
    assert!(anchored.ok, "{anchored:?}");
    // The verifications were audited too, and the chain still holds.
    let entries = audit_all(
        &server,
        pb::AuditRequest {
            action: "VerifyAudit".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(entries.len(), 3);
    assert!(
        entries[0].reason.starts_with("chain intact"),
        "{:?}",
        entries[0]
    );
    for e in &entries {
        assert_eq!(e.hash.len(), 64);
    }

    let mut scoped = server.as_(ACME_AUDITOR).await;
    assert_status(
        scoped.verify_audit(pb::VerifyAuditRequest::default()).await,
        Code::PermissionDenied,
        "needs access to all tenants",
    );
    let mut auditor = server.as_(AUDITOR).await;
    assert_status(
        auditor
            .verify_audit(pb::VerifyAuditRequest {
                from_seq: 5,
                to_seq: 2,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "to_seq",
    );
    assert_status(
        auditor
            .verify_audit(pb::VerifyAuditRequest {
                expected_head_seq: 3,
                expected_head_hash: "xyz".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "expected_head_hash",
    );
}

#[tokio::test]
async fn editing_a_field_is_detected_at_that_entry() {
    let dir = history().await;
    tamper(&dir, |store, entries| {
        let mut edited = entries[4].clone();
        edited.entry.outcome = Outcome::PermissionDenied;
        store
            .danger_overwrite_audit_entry(5, Some(&edited))
            .unwrap();
    })
    .await;
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("BROKEN at entry 5: entry 5 was altered"),
        "{text}"
    );
    let server = dir.start();
    let report = verify_online(&server, pb::VerifyAuditRequest::default()).await;
    assert!(!report.ok);
    assert_eq!(
        (report.first_bad_seq, report.entries_checked),
        (5, 4),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_forged_hash_does_not_help_without_the_key() {
    let dir = history().await;
    tamper(&dir, |store, entries| {
        // Edit a field and "fix" the hash with a plain SHA-256: without the audit key the
        // link cannot be recomputed.
        use sha2::{Digest, Sha256};
        let mut edited = entries[6].clone();
        edited.entry.reason = "nothing to see".into();
        edited.hash = Sha256::digest(edited.entry.reason.as_bytes()).into();
        store
            .danger_overwrite_audit_entry(7, Some(&edited))
            .unwrap();
    })
    .await;
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(3));
    assert!(text.contains("BROKEN at entry 7"), "{text}");
}

#[tokio::test]
async fn deleting_an_entry_is_detected_at_that_entry() {
    let dir = history().await;
    tamper(&dir, |store, _| {
        store.danger_overwrite_audit_entry(6, None).unwrap()
    })
    .await;
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("BROKEN at entry 6: entry 6 is missing or out of place"),
        "{text}"
    );
    // The first entry too.
    let dir = history().await;
    tamper(&dir, |store, _| {
        store.danger_overwrite_audit_entry(1, None).unwrap()
    })
    .await;
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(3));
    assert!(text.contains("BROKEN at entry 1"), "{text}");
}

#[tokio::test]
async fn swapping_two_entries_is_detected_at_the_first() {
    let dir = history().await;
    tamper(&dir, |store, entries| {
        store
            .danger_overwrite_audit_entry(4, Some(&entries[7]))
            .unwrap();
        store
            .danger_overwrite_audit_entry(8, Some(&entries[3]))
            .unwrap();
    })
    .await;
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(3));
    assert!(text.contains("BROKEN at entry 4"), "{text}");
    // Swapped and renumbered, each entry is its own seq again: the links still break.
    let dir = history().await;
    tamper(&dir, |store, entries| {
        let (mut a, mut b) = (entries[7].clone(), entries[3].clone());
        a.seq = 4;
        b.seq = 8;
        store.danger_overwrite_audit_entry(4, Some(&a)).unwrap();
        store.danger_overwrite_audit_entry(8, Some(&b)).unwrap();
    })
    .await;
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(3));
    assert!(text.contains("BROKEN at entry 4"), "{text}");
}

#[tokio::test]
async fn truncating_the_tail_is_detected_against_a_recorded_head() {
    let dir = history().await;
    let (_, text) = verify_offline(&dir, &[]);
    let head = text
        .lines()
        .find_map(|l| l.strip_prefix("head: seq "))
        .map(|l| l.replace(" hash ", ":"))
        .unwrap();
    assert!(head.starts_with("12:"), "{head}");
    tamper(&dir, |store, _| {
        store.danger_overwrite_audit_entry(12, None).unwrap();
        store.danger_overwrite_audit_entry(11, None).unwrap();
    })
    .await;
    // The records still reflect the entries cut off: verification says so without a head,
    // and the server refuses to start (rather than append after the shortened trail).
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("the records reflect entries through 12"),
        "{text}"
    );
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("the trail ends before entry 11, but the records reflect entries through 12"),
        "{log}"
    );

    // An attacker who edits the records' applied position too leaves a consistent, shorter
    // trail: only a recorded head tells.
    SledStore::danger_set_applied_position(&dir.data().join("db"), 10).unwrap();
    assert_eq!(verify_offline(&dir, &[]).0, Some(0));
    let (code, text) = verify_offline(&dir, &["--expect-head", &head]);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(
            "BROKEN at entry 11: the trail ends at entry 10, before the recorded head 12"
        ),
        "{text}"
    );
    // Online: after a restart the server appends again, so the recorded head's seq exists
    // with other contents; verification still fails.
    let server = dir.start();
    let (seq, hash) = head.split_once(':').unwrap();
    let report = verify_online(
        &server,
        pb::VerifyAuditRequest {
            expected_head_seq: seq.parse().unwrap(),
            expected_head_hash: hash.into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!report.ok, "{report:?}");
    assert!(
        report.first_bad_seq == 11 || report.first_bad_seq == 12,
        "{report:?}"
    );
}

#[tokio::test]
async fn offline_verification_needs_the_right_master_key() {
    let dir = history().await;
    std::fs::write(dir.data().join("master.key"), [9u8; 32]).unwrap();
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("wrong master key"), "{text}");
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(["audit", "verify", "--data-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an initialised byokd data directory")
    );
}

#[tokio::test]
async fn export_writes_json_lines_a_siem_can_ingest() {
    let dir = history().await;
    let out = Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(["audit", "export", "--format", "jsonl", "--config"])
        .arg(dir.config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    let get = &lines[5];
    for field in [
        "seq",
        "time",
        "principal",
        "peer",
        "action",
        "tenant",
        "name",
        "secret_id",
        "version",
        "lease_id",
        "outcome",
        "code",
        "prev_hash",
        "hash",
    ] {
        assert!(get.get(field).is_some(), "{field} missing in {get}");
    }
    assert_eq!(get["action"], "Get");
    assert_eq!(get["outcome"], "OK");
    let time = get["time"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(time).is_ok() && time.ends_with('Z'),
        "{time}"
    );
    assert_eq!(lines[1]["prev_hash"], lines[0]["hash"]);
    // --since keeps the tail.
    let since = lines[8]["time"].as_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(["audit", "export", "--since", since, "--config"])
        .arg(dir.config())
        .output()
        .unwrap();
    let tail: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        tail.first().map(|l| l["seq"].clone()),
        Some(lines[8]["seq"].clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_audit_replays_then_follows_live_in_order_without_gaps() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(
        &mut orch,
        "acme",
        "before",
        b"sk-before-0123456789abcdefghijk",
    )
    .await;

    let mut all = server
        .as_(AUDITOR)
        .await
        .watch_audit(pb::WatchAuditRequest {
            from_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut acme_gets = server
        .as_(ACME_AUDITOR)
        .await
        .watch_audit(pb::WatchAuditRequest {
            tenant: "acme".into(),
            action: "Get".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Writers run concurrently while the streams are open.
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                for j in 0..5 {
                    c.store(store_req(
                        "acme",
                        &format!("w{i}-{j}"),
                        b"sk-live-0123456789abcdefghijk",
                    ))
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for i in 0..3 {
        lease_and_get(&server, "acme", &format!("w{i}-0"))
            .await
            .unwrap();
    }
    // 1 Store + 2 WatchAudit + 40 Stores + 3 x (Lease, Get) = 49 entries.
    let mut seqs = Vec::new();
    while seqs.len() < 49 {
        let entry = tokio::time::timeout(Duration::from_secs(20), all.next())
            .await
            .expect("entry in time")
            .unwrap()
            .unwrap();
        seqs.push(entry.seq);
    }
    assert_eq!(seqs, (1..=49).collect::<Vec<u64>>());
    let mut gets = Vec::new();
    while gets.len() < 3 {
        let entry = tokio::time::timeout(Duration::from_secs(20), acme_gets.next())
            .await
            .expect("get in time")
            .unwrap()
            .unwrap();
        assert_eq!(
            (entry.action.as_str(), entry.tenant.as_str()),
            ("Get", "acme")
        );
        gets.push(entry.seq);
    }
    assert!(gets.windows(2).all(|w| w[0] < w[1]));

    // A scoped auditor must name its tenant; bad filters are refused.
    assert_status(
        server
            .as_(ACME_AUDITOR)
            .await
            .watch_audit(pb::WatchAuditRequest::default())
            .await,
        Code::PermissionDenied,
        "set tenant",
    );
    assert_status(
        server
            .as_(AUDITOR)
            .await
            .watch_audit(pb::WatchAuditRequest {
                outcome: "MAYBE".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "outcome",
    );

    // Shutdown ends the stream and says where to resume.
    let resume_after = *seqs.last().unwrap();
    let stopping = tokio::spawn(async move { server.stop().await });
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), all.next())
            .await
            .expect("stream ends")
            .unwrap()
        {
            Ok(entry) => assert!(entry.seq > resume_after),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let resume: u64 = ended
        .metadata()
        .get("byokd-resume-from-seq")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(resume > resume_after, "{resume}");
    assert!(stopping.await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_misses_nothing_and_blocks_no_writer() {
    let dir = TestDir::new();
    let server = dir.start();
    // A consumer with a small HTTP/2 window, so that not reading soon pushes back on the server.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(8 * 1024))
        .initial_connection_window_size(Some(8 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow =
        byokd::api::v1::vault_client::VaultClient::with_interceptor(channel, auth(AUDITOR))
            .watch_audit(pb::WatchAuditRequest {
                action: "Describe".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    // Far more entries than the live feed buffers (1024), written while nobody reads.
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                for _ in 0..200 {
                    let _ = c.describe(secret_ref("acme", "none")).await;
                }
            })
        })
        .collect();
    for w in writers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("writers are not blocked")
            .unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 1600 {
        let entry = tokio::time::timeout(Duration::from_secs(30), slow.next())
            .await
            .expect("entry")
            .unwrap()
            .unwrap();
        assert_eq!(entry.action, "Describe");
        seqs.push(entry.seq);
    }
    // The stream opened at seq 1 (its own WatchAudit entry); the Describes follow, gap-free.
    assert_eq!(seqs, (2..=1601).collect::<Vec<u64>>());
    assert!(
        server.log().contains("catching up from the store"),
        "the live feed overflowed"
    );
}

#[tokio::test]
async fn repeated_failures_from_one_peer_are_one_query_away() {
    let dir = TestDir::new();
    let server = dir.start();
    for token in ["guess-1", "guess-2", "guess-3"] {
        let _ = server
            .as_(token)
            .await
            .describe(secret_ref("acme", "k"))
            .await;
    }
    let _ = server.client(None).await.get(get_req("byokd_lt_x")).await;
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "k",
        b"sk-peer-0123456789abcdefghijk",
    )
    .await;
    let failures = audit_all(
        &server,
        pb::AuditRequest {
            peer: "127.0.0.1".into(),
            outcome: "UNAUTHENTICATED".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failures.len(), 4);
    assert!(
        failures
            .iter()
            .all(|e| e.peer.starts_with("127.0.0.1:") && e.principal.is_empty())
    );
    assert_eq!(failures[3].action, "Get");
    // An exact address:port narrows to one connection.
    let one = audit_all(
        &server,
        pb::AuditRequest {
            peer: failures[0].peer.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(one.len(), 1);
    assert_status(
        server
            .as_(AUDITOR)
            .await
            .audit(pb::AuditRequest {
                peer: "not a peer".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "peer",
    );
}

#[tokio::test]
async fn retention_prunes_old_entries_and_the_chain_still_verifies() {
    let dir = TestDir::with_config("[audit]\nretention = \"1s\"\nprune_interval = \"300ms\"\n");
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    for i in 0..5 {
        store(
            &mut orch,
            "acme",
            &format!("k{i}"),
            b"sk-retained-0123456789abcdefgh",
        )
        .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let prunes = loop {
        let prunes = audit_all(
            &server,
            pb::AuditRequest {
                action: "Prune".into(),
                ..Default::default()
            },
        )
        .await;
        // Every store is past retention only once the last is a second old: wait for the
        // prune that covers them all, however slowly they landed.
        let anchor = verify_online(&server, pb::VerifyAuditRequest::default())
            .await
            .anchor_seq;
        if !prunes.is_empty() && anchor >= 5 {
            break prunes;
        }
        assert!(std::time::Instant::now() < deadline, "nothing was pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        prunes[0]
            .reason
            .starts_with("retention: pruned entries 1..="),
        "{:?}",
        prunes[0]
    );
    let report = verify_online(&server, pb::VerifyAuditRequest::default()).await;
    assert!(report.ok, "{report:?}");
    assert!(report.anchor_seq >= 5, "{report:?}");
    assert!(
        server
            .as_(ORCHESTRATOR)
            .await
            .describe(secret_ref("acme", "k0"))
            .await
            .is_ok()
    );
    // A stream cannot start inside the pruned range, and says where the trail starts.
    assert_status(
        server
            .as_(AUDITOR)
            .await
            .watch_audit(pb::WatchAuditRequest {
                from_seq: 1,
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "were pruned by retention",
    );
    assert!(server.stop().await.success());
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, Some(0), "{text}");
}
