//! Promises of README.md and SECURITY.md that no other test reached: ABORTED under contention,
//! the data directory's modes, no value or token in any stored file, the vault-wide scope of
//! RotateMasterKey and Backup.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use byokd::api::v1::{self as pb};
use sha2::{Digest, Sha256};
use tokio::sync::Barrier;
use tonic::Code;

use crate::harness::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Rotations of one secret race; each group commit lets one through and the rest retry
/// against the new version. Past its retries a request answers ABORTED ("retry"), audited as
/// such, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_keeps_losing_the_race_is_aborted_and_audited() {
    let dir = TestDir::with_config(
        "[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    );
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(
        &mut orch,
        "acme",
        "contended",
        b"sk-contended-0123456789abcdef",
    )
    .await;
    let racers = 48;
    let barrier = Arc::new(Barrier::new(racers));
    let tasks: Vec<_> = (0..racers)
        .map(|i| {
            let (addr, barrier) = (server.addr, barrier.clone());
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                barrier.wait().await;
                c.rotate(pb::RotateRequest {
                    tenant: "acme".into(),
                    name: "contended".into(),
                    value: format!("sk-contended-{i:03}-0123456789").into_bytes(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().version)
            })
        })
        .collect();
    let (mut rotated, mut aborted) = (Vec::new(), 0);
    for t in tasks {
        match t.await.expect("racer") {
            Ok(version) => rotated.push(version),
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                assert_eq!(
                    status.message(),
                    "too much contention on this secret; retry"
                );
                aborted += 1;
            }
        }
    }
    assert!(aborted > 0, "no rotation was aborted among {racers}");
    // Each acknowledged rotation made exactly one version; the aborted ones none.
    rotated.sort_unstable();
    let expected: Vec<u32> = (2..2 + rotated.len() as u32).collect();
    assert_eq!(rotated, expected);
    let meta = orch
        .describe(secret_ref("acme", "contended"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.version as usize, 1 + rotated.len());
    let entries = audit_all(
        &server,
        pb::AuditRequest {
            action: "Rotate".into(),
            outcome: "ABORTED".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(entries.len(), aborted);
    assert!(
        entries
            .iter()
            .all(|e| e.name == "contended" && e.code == 10)
    );
}

/// The data directory is created 0700; the trail's files, the master key and everything else
/// byokd writes in it are readable by its owner only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_its_files_are_private() {
    let dir = TestDir::with_config("[store]\naudit_segment_kb = 64\n");
    let server = dir.start();
    store_many(&server, 800, |i| {
        format!("sk-modes-{i:04}-0123456789abcdef").into_bytes()
    })
    .await;
    assert!(server.stop().await.success());
    assert_eq!(mode(&dir.data()), 0o700, "the data directory");
    let audit = dir.data().join("db").join("audit");
    let files = files_under(&dir.data());
    let segments: Vec<_> = files.iter().filter(|p| p.starts_with(&audit)).collect();
    assert!(
        segments
            .iter()
            .any(|p| p.extension() == Some("idx".as_ref())),
        "sealed segments: {segments:?}"
    );
    for file in &files {
        let m = mode(file);
        assert_eq!(m & 0o077, 0, "{} is {m:o}", file.display());
    }
    for file in segments {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(&dir.data().join("master.key")), 0o600);
}

/// Values (stored and rotated) and lease tokens are in no file of the data directory: values
/// are sealed, tokens kept as hashes. (The backup file is checked in ops.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_value_or_token_is_in_any_file_of_the_data_directory() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut plain: Vec<Vec<u8>> = Vec::new();
    for i in 0..20 {
        let value = format!("sk-plain-marker-{i:03}-QWERTYUIOPASDFGH").into_bytes();
        store(&mut orch, "acme", &format!("p{i}"), &value).await;
        plain.push(value);
    }
    for i in 0..5 {
        let value = format!("sk-plain-rotated-{i:03}-ZXCVBNMLKJHGFDSA").into_bytes();
        remember_secret(&value);
        orch.rotate(pb::RotateRequest {
            tenant: "acme".into(),
            name: format!("p{i}"),
            value: value.clone(),
            ..Default::default()
        })
        .await
        .expect("rotate");
        plain.push(value);
    }
    let mut agent = server.as_(AGENT).await;
    for i in 0..10 {
        let grant = lease_ok(&mut orch, lease_req("acme", &format!("p{i}"), 2)).await;
        if i % 2 == 0 {
            agent.get(get_req(&grant.token)).await.expect("get");
        }
        plain.push(grant.token.into_bytes());
    }
    for (_, token, _, _) in PRINCIPALS {
        plain.push(token.as_bytes().to_vec());
    }
    assert!(server.stop().await.success());
    let files = files_under(&dir.data());
    assert!(files.len() > 3, "{files:?}");
    for file in files {
        let bytes = std::fs::read(&file).expect("read");
        for secret in &plain {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{} holds {:?}",
                file.display(),
                String::from_utf8_lossy(secret)
            );
        }
    }
}

/// RotateMasterKey and Backup act on the whole vault: an admin scoped to one tenant may do
/// neither, and both refusals are audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_wide_operations_need_an_admin_of_every_tenant() {
    let token = "tok-acme-admin";
    remember_secret(token.as_bytes());
    let dir = TestDir::with_config(&format!(
        "[[principal]]\nid = \"acme-admin\"\ntoken_sha256 = \"{}\"\nroles = [\"admin\"]\ntenants = [\"acme\"]\n",
        hex::encode(Sha256::digest(token.as_bytes()))
    ));
    let server = dir.start();
    let mut scoped = server.as_(token).await;
    assert_status(
        scoped
            .rotate_master_key(pb::RotateMasterKeyRequest {})
            .await,
        Code::PermissionDenied,
        "access to all tenants",
    );
    let backup = scoped.backup(pb::BackupRequest {}).await;
    let refused = match backup {
        Err(status) => status,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            tokio_stream::StreamExt::next(&mut stream)
                .await
                .expect("an answer")
                .expect_err("a tenant-scoped admin's backup")
        }
    };
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("access to all tenants"),
        "{refused:?}"
    );
    // The global admin may.
    server
        .as_(ADMIN)
        .await
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .expect("global admin");
    let denied = audit_all(
        &server,
        pb::AuditRequest {
            principal: "acme-admin".into(),
            outcome: "PERMISSION_DENIED".into(),
            ..Default::default()
        },
    )
    .await;
    let actions: Vec<&str> = denied.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["RotateMasterKey", "Backup"]);
}
