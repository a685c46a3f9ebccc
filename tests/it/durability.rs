//! What survives: restarts, kill -9, the wrong master key, and tampering with the store.

use std::time::Duration;

use byokd::api::v1::{self as pb};
use byokd::model::{SecretId, SecretName, TenantId};
use byokd::store::{SledStore, Store, Transaction, Write};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::*;

fn value(i: usize) -> Vec<u8> {
    format!("sk-durable-{i:04}-0123456789abcdefghijklmnop").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_and_consumed_uses_survive_kill_9() {
    let dir = TestDir::new();
    let server = dir.start();
    // Concurrent acknowledged writes, then no clean shutdown at all.
    store_many(&server, 40, value).await;
    let mut orch = server.as_(ORCHESTRATOR).await;
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "k0".into(),
        value: value(1000),
        ..Default::default()
    })
    .await
    .unwrap();
    let grant = lease_ok(&mut orch, lease_req("acme", "k1", 2)).await;
    let single = lease_ok(&mut orch, lease_req("acme", "k2", 1)).await;
    let mut agent = server.as_(AGENT).await;
    assert_eq!(
        redeem(&server, AGENT, &grant.token)
            .await
            .unwrap()
            .remaining_uses,
        1
    );
    agent.get(get_req(&single.token)).await.unwrap();
    server.kill9();

    let server = dir.start();
    for i in 1..40 {
        assert_eq!(
            lease_and_get(&server, "acme", &format!("k{i}"))
                .await
                .unwrap()
                .value,
            value(i),
            "k{i}"
        );
    }
    let rotated = lease_and_get(&server, "acme", "k0").await.unwrap();
    assert_eq!((rotated.value, rotated.version), (value(1000), 2));
    // One use was consumed before the crash: exactly one is left after it.
    let mut agent = server.as_(AGENT).await;
    assert_eq!(
        redeem(&server, AGENT, &grant.token)
            .await
            .unwrap()
            .remaining_uses,
        0
    );
    assert_status(
        agent.get(get_req(&grant.token)).await,
        Code::NotFound,
        "no longer valid",
    );
    assert_status(
        agent.get(get_req(&single.token)).await,
        Code::NotFound,
        "no longer valid",
    );
    // The audit trail continues without a gap.
    let entries = audit_all(&server, pb::AuditRequest::default()).await;
    assert!(
        entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1)
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.action == "Store" && e.outcome == "OK")
            .count(),
        40
    );
}

#[tokio::test]
async fn a_clean_restart_keeps_everything() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let meta = store(&mut orch, "acme", "k", &value(1)).await;
    let grant = lease_ok(&mut orch, lease_req("acme", "k", 3)).await;
    assert!(server.stop().await.success());

    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let described = orch
        .describe(secret_ref("acme", "k"))
        .await
        .unwrap()
        .into_inner();
    // The same metadata, and the lease counted in its use.
    assert_eq!(
        pb::SecretMetadata {
            usage: meta.usage.clone(),
            ..described.clone()
        },
        meta
    );
    let usage = described.usage.expect("usage");
    assert_eq!((usage.leases_issued, usage.redemptions), (1, 0));
    let v = redeem(&server, AGENT, &grant.token).await.unwrap();
    assert_eq!((v.value, v.remaining_uses), (value(1), 2));
}

#[tokio::test]
async fn the_server_refuses_to_start_on_the_wrong_or_a_missing_master_key() {
    let dir = TestDir::new();
    let server = dir.start();
    store(&mut server.as_(ORCHESTRATOR).await, "acme", "k", &value(1)).await;
    assert!(server.stop().await.success());
    let key_path = dir.data().join("master.key");
    let original = std::fs::read(&key_path).unwrap();
    assert_eq!(original.len(), 32);

    std::fs::write(&key_path, [7u8; 32]).unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("wrong master key"), "{log}");

    std::fs::write(&key_path, [7u8; 31]).unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("must hold exactly 32 bytes"), "{log}");

    std::fs::remove_file(&key_path).unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("is missing"), "{log}");
    // The refusal did not create a fresh key.
    assert!(!key_path.exists());

    std::fs::write(&key_path, &original).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = dir.start();
    assert_eq!(
        lease_and_get(&server, "acme", "k").await.unwrap().value,
        value(1)
    );
}

/// Stops the server, lets `f` edit the store directly, and starts it again.
async fn with_store_offline<F>(dir: &TestDir, server: TestServer, f: F) -> TestServer
where
    F: AsyncFnOnce(&SledStore),
{
    assert!(server.stop().await.success());
    let store = SledStore::open(&dir.data().join("db")).unwrap();
    f(&store).await;
    store.close().await.unwrap();
    // sled releases its directory lock when the last handle is gone.
    drop(store);
    dir.start()
}

fn id_of(meta: &pb::SecretMetadata) -> SecretId {
    SecretId::parse("id", &meta.id).unwrap()
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_record_or_altered_does_not_decrypt() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let a = store(&mut orch, "acme", "a", &value(1)).await;
    let b = store(&mut orch, "acme", "b", &value(2)).await;
    let c = store(&mut orch, "acme", "c", &value(3)).await;
    let (a_id, b_id, c_id) = (id_of(&a), id_of(&b), id_of(&c));

    let server = with_store_offline(&dir, server, async |store| {
        let env_a = store.envelope(a_id, 1).await.unwrap().unwrap();
        let env_b = store.envelope(b_id, 1).await.unwrap().unwrap();
        // Swap the sealed values and wrapped keys of a and b, keeping each record's own
        // secret id and version: exactly what an attacker with write access to the database
        // could do.
        let mut new_a = env_a.clone();
        new_a.wrapped_key = env_b.wrapped_key.clone();
        new_a.nonce = env_b.nonce;
        new_a.ciphertext = env_b.ciphertext.clone();
        let mut new_b = env_b;
        new_b.wrapped_key = env_a.wrapped_key;
        new_b.nonce = env_a.nonce;
        new_b.ciphertext = env_a.ciphertext;
        // And flip one bit of c's ciphertext.
        let mut new_c = store.envelope(c_id, 1).await.unwrap().unwrap();
        new_c.ciphertext[0] ^= 1;
        store
            .commit(Transaction {
                writes: vec![
                    Write::PutEnvelope(new_a),
                    Write::PutEnvelope(new_b),
                    Write::PutEnvelope(new_c),
                ],
                ..Default::default()
            })
            .await
            .unwrap();
    })
    .await;

    for name in ["a", "b", "c"] {
        let status = lease_and_get(&server, "acme", name).await.unwrap_err();
        // Says that it failed, not why.
        assert_eq!(
            (status.code(), status.message()),
            (Code::DataLoss, "decryption failed"),
            "{name}"
        );
    }
    // The failures are audited and the cause is in the server log, not in the response.
    let gets = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gets.iter().filter(|e| e.outcome == "DATA_LOSS").count(), 3);
    assert!(server.log().contains("Unwrap"), "cause logged");
    // An untouched secret is unaffected.
    store(&mut server.as_(ORCHESTRATOR).await, "acme", "d", &value(4)).await;
    assert_eq!(
        lease_and_get(&server, "acme", "d").await.unwrap().value,
        value(4)
    );
}

#[tokio::test]
async fn rotate_and_revoke_destroy_the_old_data_keys() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let meta = store(&mut orch, "acme", "k", &value(1)).await;
    let other = store(&mut orch, "acme", "other", &value(9)).await;
    for i in 2..=3 {
        orch.rotate(pb::RotateRequest {
            tenant: "acme".into(),
            name: "k".into(),
            value: value(i),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let id = id_of(&meta);
    let server = with_store_offline(&dir, server, async |store| {
        assert!(store.envelope(id, 1).await.unwrap().is_none());
        assert!(store.envelope(id, 2).await.unwrap().is_none());
        assert!(store.envelope(id, 3).await.unwrap().is_some());
    })
    .await;
    server
        .as_(ORCHESTRATOR)
        .await
        .revoke(revoke_secret("acme", "k", "gone"))
        .await
        .unwrap();
    let other_id = id_of(&other);
    let _server = with_store_offline(&dir, server, async |store| {
        assert!(store.envelope(id, 3).await.unwrap().is_none());
        assert!(store.envelope(other_id, 1).await.unwrap().is_some());
        let tomb = store
            .secret(
                &TenantId::parse("acme").unwrap(),
                &SecretName::parse("k").unwrap(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tomb.version, 3);
    })
    .await;
}

/// The disk refuses a write (here: a file-size limit on the server, which needs no
/// privileges; `ops.rs` fills a real tmpfs where it can mount one). The request that met it
/// fails without detail, readiness turns NOT_SERVING, and after a restart without the limit
/// every acknowledged write is there, with its audit entry, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_disk_refuses_fails_and_loses_nothing_acknowledged() {
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\nhealth_interval = \"200ms\"\n\
         [limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n\
         [store]\nmin_free_mb = 0\n",
    );
    let server = dir.start_with_file_size_limit(3 << 20);
    let ops = ops_addr(&server);
    let mut orch = server.as_(ORCHESTRATOR).await;
    let big = |i: usize| format!("sk-big-{i:05}-{}", "x".repeat(4000)).into_bytes();
    let mut acknowledged = Vec::new();
    let failed = loop {
        let i = acknowledged.len();
        assert!(i < 5_000, "no write failed under a 3 MiB file limit");
        match orch
            .store(store_req("acme", &format!("big-{i}"), &big(i)))
            .await
        {
            Ok(_) => acknowledged.push(i),
            Err(status) => break (i, status),
        }
    };
    let (failed_at, status) = failed;
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Internal),
        "{status:?}"
    );
    assert!(
        !status.message().contains("File too large") && !status.message().contains("os error"),
        "no detail to callers: {status:?}"
    );
    assert!(acknowledged.len() > 100, "{}", acknowledged.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health(&ops, "").await.unwrap() != ServingStatus::NotServing {
        assert!(std::time::Instant::now() < deadline, "still SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = server.log();
    assert!(log.contains("File too large"), "the cause is logged");
    server.kill9();

    let server = dir.start();
    assert_chain_verifies(&server).await;
    let mut orch = server.as_(ORCHESTRATOR).await;
    let stored = audit_all(
        &server,
        pb::AuditRequest {
            action: "Store".into(),
            outcome: "OK".into(),
            ..Default::default()
        },
    )
    .await;
    for &i in &acknowledged {
        let name = format!("big-{i}");
        orch.describe(secret_ref("acme", &name))
            .await
            .unwrap_or_else(|e| panic!("{name} was acknowledged: {e:?}"));
        assert!(stored.iter().any(|e| e.name == name), "{name}'s entry");
    }
    assert_eq!(
        lease_and_get(&server, "acme", "big-0").await.unwrap().value,
        big(0)
    );
    // The write that failed: never acknowledged, so either outcome is allowed, but never an
    // effect without its entry.
    let name = format!("big-{failed_at}");
    let exists = orch.describe(secret_ref("acme", &name)).await.is_ok();
    assert_eq!(exists, stored.iter().any(|e| e.name == name), "{name}");
    // And it writes again.
    store(
        &mut orch,
        "acme",
        "after-limit",
        b"sk-after-limit-0123456789",
    )
    .await;
}

/// "If the entry cannot be written, the request fails": requests that write nothing but
/// their audit entry (failed redemptions) until the trail's segment cannot grow. The request
/// whose entry was refused fails, and none answered without its entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_audit_entry_cannot_be_written_fails() {
    let dir = TestDir::with_config(
        "[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n\
         failed_get_rate_limit = { per_second = 1000000, burst = 1000000 }\n\
         [store]\nmin_free_mb = 0\n",
    );
    let server = dir.start_with_file_size_limit(1 << 20);
    let mut agent = server.as_(AGENT).await;
    let mut answered = 0u64;
    let refused = loop {
        assert!(
            answered < 20_000,
            "no request failed under a 1 MiB file limit"
        );
        let token = format!("byokd_lt_unknown{answered:08}");
        match agent.get(get_req(&token)).await {
            Err(status) if status.code() == Code::NotFound => answered += 1,
            Err(status) => break status,
            Ok(_) => panic!("an unknown token answered"),
        }
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(!refused.message().contains("large"), "{refused:?}");
    let log = server.log();
    assert!(log.contains("File too large"), "the cause is logged");
    assert!(answered > 1000, "{answered}");
    drop(server);

    // Every answered request has its entry.
    let server = dir.start();
    assert_chain_verifies(&server).await;
    let failed_gets = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        failed_gets.len() as u64 >= answered,
        "{}",
        failed_gets.len()
    );
}

/// A kill -9 cannot tell a write that reached the disk from one in the page cache, so the
/// sync itself is counted: every acknowledged write is `fdatasync`ed (the trail) before it
/// answers, lease-only ones included (their changes reach sled without a flush and survive a
/// power loss only through the trail). One write at a time: no two share a sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_is_synced_before_its_answer() {
    let dir = TestDir::new();
    let trace = dir.path().join("syncs.txt");
    let Some(server) = dir.start_traced("fdatasync,fsync", &trace) else {
        must_not_skip("strace cannot trace here; the syncs are not counted");
        return;
    };
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", b"sk-synced-0123456789abcdef").await;
    let syncs = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
            .count()
    };
    // Background work (the first seal, the scrub) settles first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = syncs();
    let mut agent = server.as_(AGENT).await;
    for _ in 0..20 {
        let grant = lease_ok(&mut orch, lease_req("acme", "k", 2)).await;
        agent.get(get_req(&grant.token)).await.expect("get");
    }
    let synced = syncs() - before;
    assert!(synced >= 40, "{synced} syncs for 40 lease-only writes");
}
