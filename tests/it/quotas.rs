//! Storage quotas: what one tenant may hold (secrets, value bytes, lease records), and the
//! free space kept on the data volume so that revocations and reads keep working, and byokd
//! still starts, when it fills up.

use std::time::{Duration, Instant};

use byokd::api::v1::{self as pb};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::*;

fn lease_for(tenant: &str, name: &str, seconds: i64) -> pb::LeaseRequest {
    let mut req = lease_req(tenant, name, 1);
    req.ttl = Some(prost_types::Duration { seconds, nanos: 0 });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_refuse_growth_and_give_it_back_on_revocation() {
    let dir = TestDir::with_config(
        "[quotas]\nmax_secrets_per_tenant = 20\nmax_value_mb_per_tenant = 1\nmax_leases_per_tenant = 5\n\
         max_value_mb_total = 2\n\
         [lease]\ngc_interval = \"200ms\"\n",
    );
    let server = dir.start();
    let mut admin = server.as_(ADMIN).await;

    // Secrets: twenty, then refused, for this tenant only.
    for i in 0..20 {
        store(
            &mut admin,
            "t1",
            &format!("s{i}"),
            b"sk-small-value-0123456789",
        )
        .await;
    }
    assert_status(
        admin
            .store(store_req("t1", "s20", b"sk-one-too-many-0123456789"))
            .await,
        Code::ResourceExhausted,
        "tenant t1 is at its quota of 20 secrets",
    );
    store(&mut admin, "t2", "s0", b"sk-other-tenant-0123456789").await;
    // A revocation gives its place back.
    admin
        .revoke(revoke_secret("t1", "s0", "make room"))
        .await
        .unwrap();
    store(&mut admin, "t1", "s20", b"sk-after-revoke-0123456789").await;

    // Value bytes: fifteen 64 KiB values fit in 1 MiB, a sixteenth does not; rotating one
    // to a short value makes room.
    for i in 0..15 {
        store(&mut admin, "t3", &format!("big{i}"), &value_64k(i)).await;
    }
    assert_status(
        admin.store(store_req("t3", "big15", &value_64k(15))).await,
        Code::ResourceExhausted,
        "value bytes",
    );
    admin
        .rotate(pb::RotateRequest {
            tenant: "t3".into(),
            name: "big0".into(),
            value: b"sk-short-now-0123456789".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    store(&mut admin, "t3", "big15", &value_64k(15)).await;
    // Tenants together stop at the vault's total (2 MiB here).
    for i in 0..8 {
        store(&mut admin, "t4", &format!("big{i}"), &value_64k(i)).await;
    }
    let mut refused = None;
    for i in 0..16 {
        if let Err(status) = admin
            .store(store_req("t5", &format!("big{i}"), &value_64k(i)))
            .await
        {
            refused = Some((i, status));
            break;
        }
    }
    let (at, status) = refused.expect("the total is reached");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("in all"), "{status:?}");
    assert!((4..10).contains(&at), "refused at {at}");

    // Leases: five records, used or not, until they expire and are collected.
    for _ in 0..5 {
        let grant = lease_ok(&mut admin, lease_for("t1", "s1", 1)).await;
        redeem(&server, ADMIN, &grant.token).await.unwrap();
    }
    assert_status(
        admin.lease(lease_for("t1", "s1", 1)).await,
        Code::ResourceExhausted,
        "quota of 5 leases",
    );
    lease_ok(&mut admin, lease_for("t2", "s0", 1)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin.lease(lease_for("t1", "s1", 1)).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(Instant::now() < deadline, "leases never collected");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    // Every refusal is audited.
    let refused = audit_all(
        &server,
        pb::AuditRequest {
            outcome: "RESOURCE_EXHAUSTED".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(refused.len() >= 3, "{refused:?}");
    assert!(refused.iter().any(|e| e.reason.contains("quota")));

    // The usage is counted again at start.
    server.stop().await;
    let server = dir.start();
    let mut admin = server.as_(ADMIN).await;
    assert_status(
        admin
            .store(store_req("t1", "s21", b"sk-after-restart-0123456789"))
            .await,
        Code::ResourceExhausted,
        "quota of 20 secrets",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_volume_keeps_revocations_working_and_a_full_one_does_not_stop_the_start() {
    let Some(disk) = SmallDisk::mount_or_skip(32, "the full-volume path is untested") else {
        return;
    };
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\nhealth_interval = \"200ms\"\n\
         [store]\nmin_free_mb = 8\n\
         [limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    );
    std::fs::create_dir(disk.0.path().join("data")).unwrap();
    std::os::unix::fs::symlink(disk.0.path().join("data"), dir.data()).unwrap();
    // Room for the operator to make at the end.
    let room = disk.0.path().join("room");
    std::fs::write(&room, vec![1u8; 6 << 20]).unwrap();
    let server = dir.start();
    let ops = ops_addr(&server);
    let mut admin = server.as_(ADMIN).await;
    store(&mut admin, "t1", "keep", b"sk-keep-me-0123456789").await;
    let grant = lease_ok(&mut admin, lease_req("t1", "keep", 5)).await;

    // Fill until byokd refuses to grow: a refusal, not a failure.
    let value = vec![b'x'; 16 * 1024];
    let mut refused = None;
    for i in 0..10_000 {
        if let Err(status) = admin
            .store(store_req("t2", &format!("fill-{i}"), &value))
            .await
        {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("the reserve is reached");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("nearly full"), "{refused:?}");
    assert!(server.log().contains("the data volume is nearly full"));
    let text = scrape(&ops).await;
    assert!(
        sample(&text, "byokd_data_volume_free_bytes")
            < sample(&text, "byokd_data_volume_reserve_bytes")
    );
    assert_eq!(health(&ops, "").await.unwrap(), ServingStatus::Serving);
    assert_status(
        admin.lease(lease_req("t1", "keep", 1)).await,
        Code::ResourceExhausted,
        "nearly full",
    );
    // What must not fail still works, audited in the reserve (revocations may give some
    // room back).
    admin
        .describe(secret_ref("t2", "fill-0"))
        .await
        .expect("reads");
    redeem(&server, ADMIN, &grant.token)
        .await
        .expect("redemptions");
    for i in 0..20 {
        admin
            .revoke(revoke_secret("t2", &format!("fill-{i}"), "make room"))
            .await
            .expect("revocations");
    }
    // Something else fills the volume to the last byte; byokd restarts on it anyway.
    server.stop().await;
    let ballast = disk.0.path().join("ballast");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.write_all(&[0u8; 1]);
        let _ = file.sync_all();
    }
    let server = dir.start();
    let ops = ops_addr(&server);
    let mut admin = server.as_(ADMIN).await;
    assert!(
        server.log().contains("deleted the space reserve"),
        "the start says the volume is full"
    );
    // The space given back holds the audit entries of reads and revocations; growth waits.
    admin
        .describe(secret_ref("t1", "keep"))
        .await
        .expect("reads");
    admin
        .revoke(revoke_secret("t2", "fill-30", "make room"))
        .await
        .expect("revocations");
    assert_status(
        admin
            .store(store_req("t1", "after", b"sk-after-room-0123456789"))
            .await,
        Code::ResourceExhausted,
        "nearly full",
    );
    // Room again: byokd grows again without a restart.
    std::fs::remove_file(&ballast).unwrap();
    std::fs::remove_file(&room).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while health(&ops, "").await.unwrap() != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Free space is read again within DISK_CHECK_INTERVAL.
    while admin
        .store(store_req("t1", "after", b"sk-after-room-0123456789"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "still refusing with room again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = scrape(&ops).await;
    assert!(
        sample(&text, "byokd_data_volume_free_bytes")
            > sample(&text, "byokd_data_volume_reserve_bytes")
    );
    drop(server);
}
