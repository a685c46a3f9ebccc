//! The AWS KMS master key against a real KMS API (moto_server): the same lifecycle as with a
//! local key, encryption-context binding, startup checks, outages, and the data key cache.

use byokd::api::v1::{self as pb};
use byokd::crypto::SymmetricKey;
use byokd::keyring::{AwsKmsMasterKey, KeyringError, MasterKey, WrapContext};
use byokd::model::{SecretId, TenantId};
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_lifecycle_runs_through_an_aws_kms_master_key() {
    let moto = Moto::start();
    let key = moto.create_key().await;
    let dir = TestDir::with_config(&moto.master_key_config(&key, ""));
    let server = dir.start();
    assert!(
        server.log().contains(&format!("aws-kms:{key}")),
        "the KMS key is in use"
    );
    lifecycle(&server).await;
    // And it survives a restart: the key check goes through KMS.
    assert!(server.stop().await.success());
    let server = dir.start();
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "after",
        b"sk-after-restart-0123456789abcd",
    )
    .await;
    assert_eq!(
        lease_and_get(&server, "acme", "after").await.unwrap().value,
        b"sk-after-restart-0123456789abcd"
    );
}

#[tokio::test]
async fn the_same_lifecycle_runs_through_a_local_master_key() {
    let dir = TestDir::new();
    lifecycle(&dir.start()).await;
}

#[tokio::test]
async fn kms_rejects_a_data_key_whose_encryption_context_was_tampered_with() {
    let moto = Moto::start();
    let key_id = moto.create_key().await;
    // The test process keeps AWS credentials out of its environment, so byokd's KMS master
    // key gets a client configured with the test credentials.
    let kms = AwsKmsMasterKey::from_client(moto.client().await, &key_id);
    let data_key = SymmetricKey::generate().unwrap();
    let context = WrapContext::SecretVersion {
        tenant: TenantId::parse("acme").unwrap(),
        secret_id: SecretId::generate(),
        version: 1,
    };
    let blob = match kms.wrap(&data_key, &context).await {
        Ok(blob) => blob,
        Err(e) => panic!("KMS Encrypt failed: {e}"),
    };
    let back = kms.unwrap(&blob, &context).await.unwrap();
    assert_eq!(back.expose_secret(), data_key.expose_secret());
    let WrapContext::SecretVersion { secret_id, .. } = context.clone() else {
        unreachable!()
    };
    let tampered = [
        WrapContext::SecretVersion {
            tenant: TenantId::parse("globex").unwrap(),
            secret_id,
            version: 1,
        },
        WrapContext::SecretVersion {
            tenant: TenantId::parse("acme").unwrap(),
            secret_id,
            version: 2,
        },
        WrapContext::SecretVersion {
            tenant: TenantId::parse("acme").unwrap(),
            secret_id: SecretId::generate(),
            version: 1,
        },
        WrapContext::KeyCheck,
    ];
    for other in tampered {
        assert!(
            matches!(kms.unwrap(&blob, &other).await, Err(KeyringError::Unwrap)),
            "{other:?}"
        );
    }
    // Through the server: a wrapped key moved to another record fails to decrypt.
    let dir = TestDir::with_config(&moto.master_key_config(&key_id, ""));
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let a = store(&mut orch, "acme", "a", b"sk-kms-a-0123456789abcdefghijkl").await;
    let b = store(&mut orch, "acme", "b", b"sk-kms-b-0123456789abcdefghijkl").await;
    assert!(server.stop().await.success());
    {
        use byokd::store::{SledStore, Store, Transaction, Write};
        let store = SledStore::open(&dir.data().join("db")).unwrap();
        let (a_id, b_id) = (
            SecretId::parse("id", &a.id).unwrap(),
            SecretId::parse("id", &b.id).unwrap(),
        );
        let mut moved = store.envelope(b_id, 1).await.unwrap().unwrap();
        moved.wrapped_key = store.envelope(a_id, 1).await.unwrap().unwrap().wrapped_key;
        store
            .commit(Transaction {
                writes: vec![Write::PutEnvelope(moved)],
                ..Default::default()
            })
            .await
            .unwrap();
        store.close().await.unwrap();
    }
    let server = dir.start();
    let status = lease_and_get(&server, "acme", "b").await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::DataLoss, "decryption failed")
    );
    assert_eq!(
        lease_and_get(&server, "acme", "a").await.unwrap().value,
        b"sk-kms-a-0123456789abcdefghijkl"
    );
}

#[tokio::test]
async fn startup_refuses_an_unreachable_kms_or_an_unknown_key() {
    let moto = Moto::start();
    let key = moto.create_key().await;
    let dir = TestDir::with_config(
        &moto.master_key_config(&key, "operation_timeout = \"2s\"\nmax_attempts = 1\n"),
    );
    drop(dir.start());

    // Unreachable: the same data directory, KMS gone.
    let mut moto = moto;
    moto.stop();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("cannot reach AWS KMS key"), "{log}");

    // A key that does not exist, for a new data directory.
    let moto = Moto::start();
    let fresh =
        TestDir::with_config(&moto.master_key_config("00000000-0000-0000-0000-000000000000", ""));
    let (status, log) = fresh.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("cannot be used"), "{log}");
    assert!(log.contains("NotFoundException"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_outage_is_unavailable_and_cached_keys_keep_serving() {
    let mut moto = Moto::start();
    let key = moto.create_key().await;
    let dir = TestDir::with_config(
        &moto.master_key_config(&key, "operation_timeout = \"2s\"\nmax_attempts = 2\n"),
    );
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "hot", b"sk-hot-0123456789abcdefghijklmn").await;
    // Warm the cache.
    lease_and_get(&server, "acme", "hot").await.unwrap();
    moto.stop();
    // A cached data key still serves; anything that needs KMS is UNAVAILABLE, not a crash.
    assert_eq!(
        lease_and_get(&server, "acme", "hot").await.unwrap().value,
        b"sk-hot-0123456789abcdefghijklmn"
    );
    let status = orch
        .store(store_req(
            "acme",
            "cold",
            b"sk-cold-0123456789abcdefghijklm",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains(&key),
        "no key id in the answer: {status:?}"
    );
    let failed = audit_all(
        &server,
        pb::AuditRequest {
            outcome: "UNAVAILABLE".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].action, "Store");
}

#[tokio::test]
async fn the_data_key_cache_saves_unwraps_and_forgets_rotated_and_revoked_keys() {
    let moto = Moto::start();
    let key = moto.create_key().await;
    let unwraps = |server: &TestServer| {
        server
            .log()
            .matches("data key unwrapped by the master key")
            .count()
    };

    let dir = TestDir::with_config(&moto.master_key_config(&key, ""));
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", b"sk-cache-0123456789abcdefghijklm").await;
    for _ in 0..4 {
        lease_and_get(&server, "acme", "k").await.unwrap();
    }
    assert_eq!(unwraps(&server), 1, "one KMS call, then the cache");
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "k".into(),
        value: b"sk-cache-rotated-0123456789abcdef".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        lease_and_get(&server, "acme", "k").await.unwrap().value,
        b"sk-cache-rotated-0123456789abcdef"
    );
    assert_eq!(unwraps(&server), 2, "the new version is unwrapped once");
    let grant = lease_ok(&mut orch, lease_req("acme", "k", 5)).await;
    orch.revoke(revoke_secret("acme", "k", "gone"))
        .await
        .unwrap();
    assert_status(
        redeem(&server, AGENT, &grant.token).await,
        Code::NotFound,
        "no longer valid",
    );
    assert!(server.log().matches("data key from the cache").count() >= 3);

    let dir = TestDir::with_config(&moto.master_key_config(&key, "cache_size = 0\n"));
    let server = dir.start();
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "k",
        b"sk-nocache-0123456789abcdefghijk",
    )
    .await;
    for _ in 0..4 {
        lease_and_get(&server, "acme", "k").await.unwrap();
    }
    assert_eq!(unwraps(&server), 4, "without a cache, every Get unwraps");
}

/// The KMS key disabled, then scheduled for deletion, under a running server and across a
/// restart: readiness turns NOT_SERVING and the log names the key's state (and the deletion
/// date: the operator's deadline), a restart on the existing data directory is refused with
/// that reason, and once the key is usable again everything stored before is readable.
/// (moto 5 does not refuse Encrypt/Decrypt with such a key, as AWS does, so requests are not
/// checked here; how AWS's DisabledException and KMSInvalidStateException map is unit-tested
/// in keyring/aws.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_or_deleted_kms_key_stops_its_vault_until_it_is_usable_again() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let moto = Moto::start();
    let key = moto.create_key().await;
    let kms = moto.client().await;
    let dir = TestDir::with_config(&moto.master_key_config(
        &key,
        "operation_timeout = \"2s\"\nmax_attempts = 1\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\nhealth_interval = \"200ms\"\n",
    ));
    let value = b"sk-kms-state-0123456789abcdefghij";
    let mut server = dir.start();
    store(&mut server.as_(ORCHESTRATOR).await, "acme", "k", value).await;
    let serving = async |server: &TestServer, want: ServingStatus| {
        let ops = ops_addr(server);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while health(&ops, "").await.expect("health") != want {
            assert!(
                std::time::Instant::now() < deadline,
                "readiness is not {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    serving(&server, ServingStatus::Serving).await;
    for (state, says) in [
        ("disabled", "the KMS key is Disabled"),
        ("pending deletion", "the KMS key is pending deletion on "),
    ] {
        if state == "disabled" {
            kms.disable_key()
                .key_id(&key)
                .send()
                .await
                .expect("disable");
        } else {
            kms.schedule_key_deletion()
                .key_id(&key)
                .pending_window_in_days(7)
                .send()
                .await
                .expect("schedule deletion");
        }
        serving(&server, ServingStatus::NotServing).await;
        assert!(
            server.log().contains(says),
            "the log names the state: {says}"
        );
        assert!(server.stop().await.success());
        let (status, log) = dir.start_failing();
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(
            log.contains("cannot be used") && log.contains(says),
            "restart with the key {state}: {log}"
        );
        if state == "pending deletion" {
            kms.cancel_key_deletion()
                .key_id(&key)
                .send()
                .await
                .expect("cancel");
        }
        kms.enable_key().key_id(&key).send().await.expect("enable");
        server = dir.start();
        serving(&server, ServingStatus::Serving).await;
        assert_eq!(
            lease_and_get(&server, "acme", "k").await.unwrap().value,
            value
        );
    }
}
