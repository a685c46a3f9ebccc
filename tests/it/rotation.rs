//! Master-key rotation: a new version at once, a background rewrap that reads never notice,
//! that survives kill -9, and that moves between local keys and AWS KMS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use byokd::api::v1::{self as pb};
use tonic::Code;

use crate::harness::*;

pub(crate) fn value(i: usize) -> Vec<u8> {
    format!("sk-rotation-{i:04}-0123456789abcdefghijkl").into_bytes()
}

pub(crate) async fn assert_all_readable(server: &TestServer, n: usize) {
    for i in 0..n {
        assert_eq!(
            lease_and_get(server, "acme", &format!("k{i}"))
                .await
                .unwrap()
                .value,
            value(i),
            "k{i}"
        );
    }
}

pub(crate) async fn rotate(server: &TestServer) -> pb::RotateMasterKeyResponse {
    server
        .as_(ADMIN)
        .await
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn status(server: &TestServer, job_id: &str) -> pb::RotationStatus {
    server
        .as_(ADMIN)
        .await
        .get_rotation_status(pb::GetRotationStatusRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn wait_done(server: &TestServer, job_id: &str) -> pb::RotationStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(server, job_id).await;
        if s.done {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotation did not finish: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_under_load_keeps_reads_working_and_retires_the_old_key() {
    let dir = TestDir::with_config("[master_key]\nrewrap_batch = 4\n");
    let server = dir.start();
    store_many(&server, 60, value).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (addr, stop, reads, failures) =
                (server.addr, stop.clone(), reads.clone(), failures.clone());
            tokio::spawn(async move {
                let mut orch = connect(addr, Some(ORCHESTRATOR)).await;
                let mut agent = connect(addr, Some(AGENT)).await;
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("k{}", i % 60);
                    let grant = orch
                        .lease(lease_req("acme", &name, 1))
                        .await
                        .unwrap()
                        .into_inner();
                    match agent.get(get_req(&grant.token)).await {
                        Ok(v) if v.get_ref().value == value(i % 60) => {
                            reads.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => failures.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 4;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = rotate(&server).await;
    assert_eq!(started.new_key_version, 2);
    let done = wait_done(&server, &started.job_id).await;
    assert_eq!((done.rewrapped, done.total), (60, 60));
    // New secrets are wrapped by the new version straight away.
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "new",
        &value(999),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(
        reads.load(Ordering::Relaxed) > 20,
        "reads ran during the rotation"
    );
    assert!(
        server
            .log()
            .contains("the retired keys are no longer needed")
    );

    let entries = audit_all(&server, pb::AuditRequest::default()).await;
    let started_entry = entries
        .iter()
        .find(|e| e.action == "RotateMasterKey")
        .unwrap();
    assert_eq!(
        (
            started_entry.outcome.as_str(),
            started_entry.version,
            started_entry.principal.as_str()
        ),
        ("OK", 2, "admin")
    );
    let rewrap = entries.iter().find(|e| e.action == "Rewrap").unwrap();
    assert!(
        rewrap
            .reason
            .contains("60 data keys rewrapped to master key version 2"),
        "{rewrap:?}"
    );
    assert!(server.stop().await.success());

    // The old key file is no longer needed at all.
    let v2 = dir.data().join("master.key.v2");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&v2).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::remove_file(dir.data().join("master.key")).unwrap();
    let server = dir.start();
    assert!(
        !server.log().contains("is not the current one"),
        "master.key.v2 was rotated from the configured master.key: no warning"
    );
    assert_all_readable(&server, 60).await;
    assert_eq!(
        lease_and_get(&server, "acme", "new").await.unwrap().value,
        value(999)
    );
    assert_chain_verifies(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_interrupted_by_kill_9_resumes_where_it_stopped() {
    // Paced (10 ms after each rewrap of one key): the job outlasts the polls below however
    // fast the disk, and the kill lands inside it.
    let dir = TestDir::with_config("[master_key]\nrewrap_batch = 1\nrewrap_pause = \"10ms\"\n");
    let server = dir.start();
    store_many(&server, 200, value).await;
    let started = rotate(&server).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let progress = loop {
        let s = status(&server, &started.job_id).await;
        assert!(
            !s.done,
            "the job finished before it could be interrupted: {s:?}"
        );
        if s.rewrapped >= 5 {
            break s.rewrapped;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    server.kill9();

    let server = dir.start();
    assert!(
        server
            .log()
            .contains("resuming the unfinished master key rotation")
    );
    let done = wait_done(&server, &started.job_id).await;
    assert!(done.rewrapped >= 200, "{done:?}");
    assert!(done.rewrapped >= progress);
    assert!(server.stop().await.success());
    std::fs::remove_file(dir.data().join("master.key")).unwrap();
    let server = dir.start();
    assert_all_readable(&server, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_a_local_key_to_kms_and_back_is_a_rotation() {
    let moto = Moto::start();
    let kms_key = moto.create_key().await;
    let dir = TestDir::new();
    let server = dir.start();
    store_many(&server, 20, value).await;
    // The audit key is the seed's, not the master key's: the chain written under the local
    // key verifies, against this head, under KMS alone and back again.
    let head = head_of(&server).await;
    assert!(server.stop().await.success());

    // To KMS: configure the KMS key, restart, rotate.
    dir.rewrite_config(&moto.master_key_config(&kms_key, ""));
    let server = dir.start();
    assert!(
        server
            .log()
            .contains("the configured master key is not the current one")
    );
    let job = rotate(&server).await;
    assert_eq!(wait_done(&server, &job.job_id).await.rewrapped, 20);
    assert!(server.stop().await.success());
    std::fs::remove_file(dir.data().join("master.key")).unwrap();
    let server = dir.start();
    assert!(server.log().contains(&format!("aws-kms:{kms_key}")));
    assert_all_readable(&server, 20).await;
    assert_verifies_against(&server, &head).await;

    // And back to a local key, after which KMS is no longer needed.
    dir.rewrite_config("[master_key]\nkind = \"local\"\npath = \"local-again.key\"\n");
    drop(server);
    let server = dir.start();
    let job = rotate(&server).await;
    assert_eq!(job.new_key_version, 3);
    assert_eq!(wait_done(&server, &job.job_id).await.rewrapped, 20);
    assert!(dir.path().join("local-again.key.v3").exists());
    assert!(server.stop().await.success());
    drop(moto);
    let server = dir.start();
    assert_all_readable(&server, 20).await;
    assert_verifies_against(&server, &head).await;
}

async fn head_of(server: &TestServer) -> (u64, String) {
    let report = verify_against(server, (0, "")).await;
    assert!(report.ok, "{report:?}");
    (report.head_seq, report.head_hash)
}

async fn assert_verifies_against(server: &TestServer, head: &(u64, String)) {
    let report = verify_against(server, (head.0, &head.1)).await;
    assert!(report.ok && report.head_seq > head.0, "{report:?}");
}

#[tokio::test]
async fn rotation_is_for_admins_and_one_at_a_time() {
    let dir = TestDir::with_config("[master_key]\nrewrap_batch = 1\nrewrap_pause = \"10ms\"\n");
    let server = dir.start();
    assert_status(
        server
            .as_(ORCHESTRATOR)
            .await
            .rotate_master_key(pb::RotateMasterKeyRequest {})
            .await,
        Code::PermissionDenied,
        "may not rotate the master key",
    );
    assert_status(
        server
            .as_(AUDITOR)
            .await
            .get_rotation_status(pb::GetRotationStatusRequest::default())
            .await,
        Code::PermissionDenied,
        "may not rotate",
    );
    assert_status(
        server
            .as_(ADMIN)
            .await
            .get_rotation_status(pb::GetRotationStatusRequest::default())
            .await,
        Code::NotFound,
        "no rotation job",
    );
    store_many(&server, 300, value).await;
    let first = rotate(&server).await;
    // 300 paced rewraps take at least 3 s: far longer than one more request.
    let second = server
        .as_(ADMIN)
        .await
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await;
    assert_status(second, Code::FailedPrecondition, "still running");
    assert_status(
        server
            .as_(ADMIN)
            .await
            .get_rotation_status(pb::GetRotationStatusRequest {
                job_id: "00000000-0000-4000-8000-000000000000".into(),
            })
            .await,
        Code::NotFound,
        "no rotation job",
    );
    assert_status(
        server
            .as_(ADMIN)
            .await
            .get_rotation_status(pb::GetRotationStatusRequest {
                job_id: "nope".into(),
            })
            .await,
        Code::InvalidArgument,
        "job_id: not a rotation job id",
    );
    wait_done(&server, &first.job_id).await;
}
