//! Operations: online backup and restore, the metrics endpoint, and health as probes see it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use byokd::api::v1::{self as pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::harness::*;

/// `byokd restore` of `backup` into `dir`'s data directory, accepting that later
/// revocations come back.
pub(crate) fn restore(dir: &TestDir, backup: &Path) -> (i32, String) {
    restore_with(dir, backup, &["--without-later-revocations"])
}

/// `byokd restore` of `backup` into `dir`'s data directory, with `later` (what to do about
/// changes made after the backup).
fn restore_with(dir: &TestDir, backup: &Path, later: &[&str]) -> (i32, String) {
    let (config, backup) = (dir.config(), backup.to_string_lossy());
    let mut args = vec![
        "restore",
        "--config",
        config.to_str().expect("UTF-8 path"),
        "--in",
        &backup,
    ];
    args.extend_from_slice(later);
    byokd(dir.path(), &args, ADMIN)
}

/// Keeps the data directory's local master key aside, deletes the data directory, and puts
/// the key back: what an operator holding the key separately from the data would do.
fn wipe_data_keeping_key(dir: &TestDir) {
    let key = std::fs::read(dir.data().join("master.key")).expect("master key");
    std::fs::remove_dir_all(dir.data()).expect("wipe");
    std::fs::create_dir(dir.data()).expect("data dir");
    let path = dir.data().join("master.key");
    std::fs::write(&path, key).expect("key back");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn value(i: usize) -> Vec<u8> {
    format!("sk-backup-{i:04}-0123456789abcdefghijklmnop").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_wipe_restore_every_secret_is_readable_and_the_chain_verifies() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut expected = BTreeMap::new();
    for i in 0..40 {
        let tenant = if i % 2 == 0 { "acme" } else { "globex" };
        let name = format!("key-{i}");
        store(&mut orch, tenant, &name, &value(i)).await;
        expected.insert((tenant, name), value(i));
    }
    // Rotated and revoked secrets come back as they were.
    let rotated = b"sk-backup-rotated-0123456789abcdefghij".to_vec();
    remember_secret(&rotated);
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "key-0".into(),
        value: rotated.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    expected.insert(("acme", "key-0".into()), rotated);
    orch.revoke(revoke_secret("globex", "key-1", "user deleted it"))
        .await
        .unwrap();
    expected.remove(&("globex", "key-1".into()));
    // A lease taken before the backup must not be redeemable after the restore.
    let old_lease = lease_ok(&mut orch, lease_req("acme", "key-2", 10)).await;

    // Writes keep going while the backup runs; they must not break it.
    let writer = {
        let mut orch = server.as_(ORCHESTRATOR).await;
        tokio::spawn(async move {
            for i in 0..30 {
                let v = format!("sk-during-backup-{i:03}-0123456789abcdef").into_bytes();
                remember_secret(&v);
                orch.store(store_req("acme", &format!("during-{i}"), &v))
                    .await
                    .unwrap();
            }
        })
    };
    let backup = dir.path().join("vault.bak");
    let (code, out) = backup_cli(&server, &dir, &backup).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("backup written to"), "{out}");
    assert!(out.contains("keep that key"), "{out}");
    writer.await.unwrap();
    // The file holds engine-neutral records (kinds, not one engine's keys), and no lease.
    let mut reader =
        byokd::backup::BackupReader::new(std::fs::File::open(&backup).unwrap()).unwrap();
    assert_eq!(reader.format(), byokd::backup::FORMAT);
    let mut kinds = std::collections::BTreeSet::new();
    while let Some((tag, _)) = reader.next_entry().unwrap() {
        let tag = String::from_utf8(tag).unwrap();
        kinds.insert(tag.split('/').next().unwrap().to_string());
    }
    let want = ["anchor", "audit", "envelope", "meta", "secret"];
    assert!(
        kinds.iter().all(|k| want.contains(&k.as_str())),
        "{kinds:?}"
    );
    assert!(kinds.len() >= 4, "{kinds:?}");
    // No plaintext value is in the backup file.
    let bytes = std::fs::read(&backup).unwrap();
    for v in expected.values() {
        assert!(
            !bytes.windows(v.len()).any(|w| w == v.as_slice()),
            "plaintext in the backup"
        );
    }
    // The backup refuses to overwrite a file.
    let (code, out) = byokd(
        dir.path(),
        &[
            "backup",
            "--config",
            &dir.config().to_string_lossy(),
            "--target",
            &format!("http://{}", server.addr),
            "--out",
            &backup.to_string_lossy(),
        ],
        ADMIN,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refusing to overwrite"), "{out}");
    assert!(server.stop().await.success());

    // Restore into a non-empty data directory is refused.
    let (code, out) = restore(&dir, &backup);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("already holds a database"), "{out}");

    wipe_data_keeping_key(&dir);
    let (code, out) = restore(&dir, &backup);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit chain verified"), "{out}");
    // 40 stored, one revoked (its value destroyed): 39 versions, plus what was written
    // during the backup and made it in.
    assert!(out.contains("secret versions decrypted"), "{out}");

    let server = dir.start();
    for ((tenant, name), v) in &expected {
        let got = lease_and_get(&server, tenant, name)
            .await
            .unwrap_or_else(|e| panic!("{tenant}/{name}: {e:?}"));
        assert_eq!(&got.value, v, "{tenant}/{name}");
    }
    let revoked = server
        .as_(ORCHESTRATOR)
        .await
        .describe(secret_ref("globex", "key-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.state, pb::SecretState::Revoked as i32);
    assert_status(
        server.as_(AGENT).await.get(get_req(&old_lease.token)).await,
        Code::NotFound,
        "no longer valid",
    );
    assert_chain_verifies(&server).await;
    let backups = audit_all(
        &server,
        pb::AuditRequest {
            action: "Backup".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(backups.len(), 1, "the backup's own entry is in it");
    assert_eq!(backups[0].principal, "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_tampered_backup_a_wrong_master_key_and_non_admins() {
    let dir = TestDir::new();
    let server = dir.start();
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "k",
        b"sk-restore-refusals-0123456789abcd",
    )
    .await;
    let backup = dir.path().join("vault.bak");
    let args = |out: &Path| {
        vec![
            "backup".to_string(),
            "--config".into(),
            dir.config().to_string_lossy().to_string(),
            "--target".into(),
            format!("http://{}", server.addr),
            "--out".into(),
            out.to_string_lossy().to_string(),
        ]
    };
    let a = args(&backup);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, out) = byokd(dir.path(), &a, ORCHESTRATOR);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("PermissionDenied"), "{out}");
    assert!(!backup.exists());
    let (code, out) = byokd(dir.path(), &a, ADMIN);
    assert_eq!(code, 0, "{out}");
    assert!(server.stop().await.success());
    let restore = |file: &Path| restore(&dir, file);

    // One flipped byte anywhere in the middle: refused, nothing left behind.
    wipe_data_keeping_key(&dir);
    let mut bytes = std::fs::read(&backup).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let tampered = dir.path().join("tampered.bak");
    std::fs::write(&tampered, &bytes).unwrap();
    let (code, out) = restore(&tampered);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("corrupt") || out.contains("restore"), "{out}");
    assert!(!dir.data().join("db").exists());
    assert!(!dir.data().join("db.restoring").exists());

    // Truncated.
    let cut = dir.path().join("cut.bak");
    std::fs::write(&cut, &std::fs::read(&backup).unwrap()[..middle]).unwrap();
    let (code, out) = restore(&cut);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("truncated"), "{out}");
    assert!(!dir.data().join("db").exists());

    // A different master key: the key check refuses, nothing is served.
    let key = dir.data().join("master.key");
    let right = std::fs::read(&key).unwrap();
    std::fs::write(&key, [7u8; 32]).unwrap();
    let (code, out) = restore(&backup);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("master key"), "{out}");
    assert!(!dir.data().join("db").exists());

    // With the right key it restores.
    std::fs::write(&key, right).unwrap();
    let (code, out) = restore(&backup);
    assert_eq!(code, 0, "{out}");
    let server = dir.start();
    assert_eq!(
        lease_and_get(&server, "acme", "k").await.unwrap().value,
        b"sk-restore-refusals-0123456789abcd"
    );
}

/// Rewrites a backup through `edit` (tag, value) -> value, with a good checksum: what someone
/// who can write the backup file, but holds no key, can make of it.
fn rewrite_backup(from: &Path, to: &Path, edit: impl Fn(&[u8], Vec<u8>) -> Vec<u8>) {
    use byokd::backup::{BackupReader, BackupWriter};
    let mut reader = BackupReader::new(std::fs::File::open(from).unwrap()).unwrap();
    let header = reader.header().clone();
    let mut writer = BackupWriter::new(std::fs::File::create(to).unwrap(), &header).unwrap();
    while let Some((tag, value)) = reader.next_entry().unwrap() {
        let value = edit(&tag, value);
        writer.entry(&tag, &value).unwrap();
    }
    writer.finish().unwrap();
}

/// A backup whose checksum is right but whose audit chain or values are not is refused:
/// restore checks the chain up to the head the backup names and opens every value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_backup_whose_chain_or_values_do_not_check_out() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    for i in 0..5 {
        store(&mut orch, "acme", &format!("chained-{i}"), &value(i)).await;
    }
    let backup = dir.path().join("vault.bak");
    assert_eq!(backup_cli(&server, &dir, &backup).await.0, 0);
    assert!(server.stop().await.success());

    // An audit entry edited: a name changed, same length, so that it still decodes.
    let edited = dir.path().join("edited-entry.bak");
    rewrite_backup(&backup, &edited, |key, value| {
        let (from, to): (&[u8], &[u8]) = (b"chained-3", b"chained-X");
        match value.windows(from.len()).position(|w| w == from) {
            Some(at) if key == b"audit" => [&value[..at], to, &value[at + from.len()..]].concat(),
            _ => value,
        }
    });
    wipe_data_keeping_key(&dir);
    let (code, out) = restore(&dir, &edited);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit chain broken at entry"), "{out}");
    assert!(!dir.data().join("db").exists());

    // A sealed value altered: a byte of its AES-GCM tag (the record ends with the tag, then
    // the version's creation time, a varint of 8 bytes).
    let altered = dir.path().join("altered-value.bak");
    rewrite_backup(&backup, &altered, |key, mut value| {
        if key == b"envelope" {
            let at = value.len() - 12;
            value[at] ^= 0x01;
        }
        value
    });
    let (code, out) = restore(&dir, &altered);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("a stored value did not decrypt under the configured master key"),
        "{out}"
    );
    assert!(!dir.data().join("db").exists());

    // The untouched backup restores.
    let (code, out) = restore(&dir, &backup);
    assert_eq!(code, 0, "{out}");
}

/// A backup file written by byokd at ce6c08c (before the storage contract changes), with its
/// local master key: it still restores, its values open, its revocation holds and its audit
/// chain verifies against the head it names. (Made by `tests/data/make-backup-fixture.sh`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_written_by_an_earlier_version_still_restores() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let fixture = data.join("backup-ce6c08c.bak");
    let header = byokd::backup::BackupReader::new(std::fs::File::open(&fixture).unwrap())
        .unwrap()
        .header()
        .clone();
    let dir = TestDir::new();
    std::fs::create_dir(dir.data()).unwrap();
    let key = dir.data().join("master.key");
    std::fs::copy(data.join("backup-ce6c08c.master.key"), &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out) = restore(&dir, &fixture);
    assert_eq!(code, 0, "{out}");
    let server = dir.start();
    for i in 1..=3 {
        let value = format!("sk-fixture-{i}-0123456789abcdefghij").into_bytes();
        remember_secret(&value);
        assert_eq!(
            lease_and_get(&server, "acme", &format!("fixture-{i}"))
                .await
                .unwrap()
                .value,
            value
        );
    }
    assert_status(
        server
            .as_(ORCHESTRATOR)
            .await
            .lease(lease_req("acme", "fixture-revoked", 1))
            .await,
        Code::FailedPrecondition,
        "secret is revoked",
    );
    let report = verify_against(&server, (header.audit_head_seq, &header.audit_head_hash)).await;
    assert!(
        report.ok && header.audit_head_seq > 5,
        "{report:?} {header:?}"
    );
}

/// `GET /metrics` on the ops address, as Prometheus would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_byokd_does_not_serve_add_no_metric_labels() {
    let dir = TestDir::with_config("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let server = dir.start();
    let ops = ops_addr(&server);
    let methods = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("byokd_rpc_requests_total{method=\""))
            .filter_map(|l| l.split('"').next().map(str::to_string))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let before = methods(&scrape(&ops).await);
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // Made-up methods under every service byokd serves, no token.
    let mut answered = 0;
    for i in 0..300 {
        let service = [
            "byokd.v1.Vault",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ][i % 3];
        let mut ready = client.clone().ready().await.unwrap();
        let request = http::Request::post(format!("http://{}/{service}/Made{i}Up", server.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut body) = ready.send_request(request, false).unwrap();
        // A refusal (past the rate for requests without credentials) may close the stream
        // before its body goes out.
        let _ = body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true);
        if response.await.is_ok() {
            answered += 1;
        }
    }
    assert_eq!(answered, 300);
    let text = scrape(&ops).await;
    assert!(!text.contains("Made"), "a made-up method became a label");
    let unknown: f64 = text
        .lines()
        .filter(|l| l.starts_with("byokd_rpc_requests_total{method=\"unknown\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(unknown, 300.0, "{text}");
    // One label more, not one per path.
    let after = methods(&text);
    assert!(
        after.len() <= before.len() + 1 && after.contains("unknown"),
        "{before:?} -> {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_with_plausible_values() {
    let dir = TestDir::with_config("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let server = dir.start();
    let ops = ops_addr(&server);
    let mut orch = server.as_(ORCHESTRATOR).await;
    for i in 0..5 {
        store(&mut orch, "acme", &format!("m{i}"), &value(i)).await;
    }
    for i in 0..3 {
        lease_and_get(&server, "acme", &format!("m{i}"))
            .await
            .unwrap();
    }
    let open = lease_ok(&mut orch, lease_req("acme", "m4", 5)).await;
    let mut agent = server.as_(AGENT).await;
    assert_status(
        agent.get(get_req("byokd_lease_not-a-real-token")).await,
        Code::NotFound,
        "",
    );
    agent.get(get_req(&open.token)).await.unwrap();
    assert_status(
        orch.describe(secret_ref("acme", "missing")).await,
        Code::NotFound,
        "",
    );

    let text = scrape(&ops).await;
    let store_ok = "byokd_rpc_requests_total{method=\"/byokd.v1.Vault/Store\",code=\"OK\"}";
    assert_eq!(sample(&text, store_ok), 5.0);
    assert_eq!(
        sample(
            &text,
            "byokd_rpc_requests_total{method=\"/byokd.v1.Vault/Describe\",code=\"NOT_FOUND\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "byokd_rpc_requests_total{method=\"/byokd.v1.Vault/Get\",code=\"NOT_FOUND\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "byokd_rpc_duration_seconds_count{method=\"/byokd.v1.Vault/Store\",code=\"OK\"}"
        ),
        5.0
    );
    let store_secs = sample(
        &text,
        "byokd_rpc_duration_seconds_sum{method=\"/byokd.v1.Vault/Store\",code=\"OK\"}",
    );
    assert!(store_secs > 0.0 && store_secs < 60.0, "{store_secs}");
    assert_eq!(sample(&text, "byokd_leases_issued_total"), 4.0);
    assert_eq!(
        sample(&text, "byokd_lease_redemptions_total{result=\"ok\"}"),
        4.0
    );
    assert_eq!(
        sample(&text, "byokd_lease_redemptions_total{result=\"failed\"}"),
        1.0
    );
    // Three single-use leases (used up) and a five-use one: none collected yet.
    assert_eq!(sample(&text, "byokd_leases_held"), 4.0);
    let free = sample(&text, "byokd_data_volume_free_bytes");
    assert!(free > 0.0 && free <= sample(&text, "byokd_data_volume_size_bytes"));
    assert_eq!(
        sample(&text, "byokd_data_volume_reserve_bytes"),
        64.0 * 1024.0 * 1024.0
    );
    assert!(sample(&text, "byokd_store_size_bytes") > 0.0);
    // Every RPC above was audited.
    assert!(sample(&text, "byokd_audit_head_seq") >= 14.0);
    assert!(sample(&text, "byokd_store_flush_duration_seconds_count") >= 5.0);
    let hits = sample(&text, "byokd_data_key_cache_hits_total");
    let misses = sample(&text, "byokd_data_key_cache_misses_total");
    assert_eq!(hits + misses, 4.0, "one lookup per successful Get");
    let ratio = sample(&text, "byokd_data_key_cache_hit_ratio");
    assert!((0.0..=1.0).contains(&ratio));
    assert_eq!(sample(&text, "byokd_serving"), 1.0);
    // No label carries request data.
    assert!(
        !text.contains("missing") && !text.contains("acme"),
        "{text}"
    );

    // Unknown paths are one label, not one per path.
    let mut stream = tokio::net::TcpStream::connect(&ops).await.unwrap();
    stream
        .write_all(b"GET /nope HTTP/1.1\r\nHost: byokd\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_on_the_ops_address_and_not_serving_at_shutdown() {
    let dir = TestDir::with_config("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let server = dir.start();
    let ops = ops_addr(&server);
    for service in ["", "byokd.v1.Vault", "liveness"] {
        assert_eq!(
            health(&ops, service).await.unwrap(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    assert_eq!(
        health(&ops, "no.such.Service").await.unwrap_err().code(),
        Code::NotFound
    );
    // A watcher on the main port sees NOT_SERVING as soon as shutdown begins.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "byokd.v1.Vault".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(server.stop());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a status change")
        .expect("stream")
        .expect("message");
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert!(stopping.await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_while_the_kms_master_key_is_unreachable() {
    let mut moto = Moto::start();
    let key = moto.create_key().await;
    let dir = TestDir::with_config(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\nhealth_interval = \"200ms\"\n",
        moto.master_key_config(&key, "operation_timeout = \"2s\"\n")
    ));
    let server = dir.start();
    let ops = ops_addr(&server);
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "k",
        b"sk-health-kms-0123456789abcdefgh",
    )
    .await;
    assert_eq!(health(&ops, "").await.unwrap(), ServingStatus::Serving);
    let text = scrape(&ops).await;
    assert!(
        sample(
            &text,
            "byokd_kms_calls_total{operation=\"Encrypt\",result=\"ok\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &text,
            "byokd_kms_calls_total{operation=\"Decrypt\",result=\"ok\"}"
        ) >= 1.0
    );

    moto.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if health(&ops, "").await.unwrap() == ServingStatus::NotServing {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still SERVING with KMS down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        health(&ops, "byokd.v1.Vault").await.unwrap(),
        ServingStatus::NotServing
    );
    // Alive all the same: a KMS outage is no reason to restart the process.
    assert_eq!(
        health(&ops, "liveness").await.unwrap(),
        ServingStatus::Serving
    );
    let text = scrape(&ops).await;
    assert_eq!(sample(&text, "byokd_serving"), 0.0);
    assert!(
        sample(
            &text,
            // The probe asks for the key's state first.
            "byokd_kms_calls_total{operation=\"DescribeKey\",result=\"unavailable\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_the_store_can_no_longer_write() {
    let Some(disk) = SmallDisk::mount_or_skip(24, "the disk-full path is untested") else {
        return;
    };
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\nhealth_interval = \"200ms\"\n[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n\
         [store]\nmin_free_mb = 0\n",
    );
    std::fs::create_dir(disk.0.path().join("data")).unwrap();
    std::os::unix::fs::symlink(disk.0.path().join("data"), dir.data()).unwrap();
    // Room to give back once the disk is full: more than sled needs to start its next log
    // segment (1 MiB was not always enough).
    let ballast = disk.0.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 4 << 20]).unwrap();
    let server = dir.start();
    let ops = ops_addr(&server);
    assert_eq!(health(&ops, "").await.unwrap(), ServingStatus::Serving);
    let mut orch = server.as_(ORCHESTRATOR).await;
    // Fill the disk until a write fails.
    let big = vec![b'x'; 4096];
    let mut failed = None;
    for i in 0..20_000 {
        if let Err(status) = orch
            .store(store_req("acme", &format!("fill-{i}"), &big))
            .await
        {
            failed = Some(status);
            break;
        }
    }
    let failed = failed.expect("a 24 MiB disk fills up");
    assert!(
        matches!(failed.code(), Code::Unavailable | Code::Internal),
        "{failed:?}"
    );
    assert!(
        !failed.message().contains("No space"),
        "no detail to callers"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health(&ops, "").await.unwrap() != ServingStatus::NotServing {
        assert!(
            std::time::Instant::now() < deadline,
            "still SERVING with a failed store"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sample(&scrape(&ops).await, "byokd_serving"), 0.0);
    // A write that failed after part of it was durable (sled's flush) leaves durability
    // unknown: only a restart clears it, and liveness says so. One that failed before it
    // wrote anything (the trail's append) is refused only while the disk is full.
    let failed_for_good = server.log().contains("refusing further writes");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let live = health(&ops, "liveness").await.unwrap();
        if failed_for_good && live == ServingStatus::NotServing {
            break;
        }
        if !failed_for_good {
            assert_eq!(live, ServingStatus::Serving);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "liveness still SERVING"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !failed_for_good {
        std::fs::remove_file(&ballast).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while orch
            .store(store_req("acme", "after-room", b"sk-after-room-0123456789"))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "still refusing writes; the server's log ends with:\n{}",
                server
                    .log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        while health(&ops, "").await.unwrap() != ServingStatus::Serving {
            assert!(std::time::Instant::now() < deadline, "still NOT_SERVING");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_does_not_undo_revocations_made_after_the_backup() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    for name in ["leaked", "rotated", "kept", "erased", "undone"] {
        store(
            &mut orch,
            "acme",
            name,
            format!("sk-{name}-0123456789abcdef").as_bytes(),
        )
        .await;
    }
    let backup = dir.path().join("vault.bak");
    let (code, out) = backup_cli(&server, &dir, &backup).await;
    assert_eq!(code, 0, "{out}");
    // After the backup: a leaked key is revoked, another rotated.
    orch.revoke(revoke_secret("acme", "leaked", "posted in a public repo"))
        .await
        .unwrap();
    let newer = b"sk-rotated-newer-0123456789abcdef".to_vec();
    remember_secret(&newer);
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "rotated".into(),
        value: newer,
        ..Default::default()
    })
    .await
    .unwrap();
    // An erasure request is purged; a deletion is undone within its recovery window.
    let purged = server
        .as_(ADMIN)
        .await
        .purge(pb::PurgeRequest {
            tenant: "acme".into(),
            name: "erased".into(),
            reason: "erasure request".into(),
        })
        .await
        .unwrap();
    assert_eq!(purged.into_inner().versions_destroyed, 1);
    orch.revoke(pb::RevokeRequest {
        recovery_window: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        ..revoke_secret("acme", "undone", "user deleted it")
    })
    .await
    .unwrap();
    orch.restore(secret_ref("acme", "undone")).await.unwrap();
    assert!(server.stop().await.success());
    let export = dir.path().join("trail-now.jsonl");
    std::fs::write(&export, export_jsonl(&dir)).unwrap();

    wipe_data_keeping_key(&dir);
    // Saying nothing about later revocations is refused.
    let (code, out) = restore_with(&dir, &backup, &[]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("--revocations-from"), "{out}");
    assert!(!dir.data().join("db").exists());
    let (code, out) = restore_with(
        &dir,
        &backup,
        &["--revocations-from", &export.to_string_lossy()],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("revoked again (revoked after the backup): acme/leaked"),
        "{out}"
    );
    assert!(out.contains("rotated after the backup"), "{out}");
    assert!(out.contains("acme/rotated"), "{out}");
    assert!(
        out.contains("purged again (purged after the backup): acme/erased"),
        "{out}"
    );
    assert!(!out.contains("acme/undone"), "{out}");

    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let leaked = orch
        .describe(secret_ref("acme", "leaked"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leaked.state, pb::SecretState::Revoked as i32);
    assert_status(
        orch.lease(lease_req("acme", "leaked", 1)).await,
        Code::FailedPrecondition,
        "",
    );
    lease_and_get(&server, "acme", "kept").await.unwrap();
    // The purged secret stays erased; the undone deletion stays undone.
    assert_status(
        orch.describe(secret_ref("acme", "erased")).await,
        Code::NotFound,
        "",
    );
    lease_and_get(&server, "acme", "undone").await.unwrap();
    let replayed = audit_all(
        &server,
        pb::AuditRequest {
            action: "Revoke".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        replayed
            .iter()
            .any(|e| e.name == "leaked" && e.reason.contains("revoked after the backup")),
        "{replayed:?}"
    );
    assert_chain_verifies(&server).await;
}
