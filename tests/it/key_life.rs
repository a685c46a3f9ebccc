//! The life of a user's key beyond store, lease, rotate and revoke (issue 18): key-shape
//! checks, per-agent binding, metadata changes and filters, expiry and rotation reminders
//! (and the background sweep that records them), recovery window, restore and purge, rotation
//! grace. Every case runs on both engines: a sled server and a server on
//! a fresh PostgreSQL database.

use crate::harness::*;
use byokd::api::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

/// A server on one engine, with what it needs kept until the test ends.
pub(crate) struct OnEngine {
    pub(crate) server: TestServer,
    pub(crate) dir: TestDir,
    pub(crate) _key_dir: Option<tempfile::TempDir>,
    // Dropped last: the server closes its connections first.
    pub(crate) _db: Option<PgDatabase>,
}

/// A sled server with `extra` in its configuration.
pub(crate) fn on_sled(extra: &str) -> OnEngine {
    let dir = TestDir::with_config(extra);
    OnEngine {
        server: dir.start(),
        dir,
        _key_dir: None,
        _db: None,
    }
}

/// A server on a fresh PostgreSQL database with `extra` in its configuration; `None`
/// without PostgreSQL (which fails under CI).
pub(crate) fn on_postgres(extra: &str) -> Option<OnEngine> {
    let db = PgDatabase::create()?;
    let key_dir = tempfile::tempdir().expect("tempdir");
    let dir = TestDir::with_config(&format!(
        "{}\n{extra}",
        db.replica_config(&key_dir.path().join("master.key"))
    ));
    Some(OnEngine {
        server: dir.start(),
        dir,
        _key_dir: Some(key_dir),
        _db: Some(db),
    })
}

/// One `#[tokio::test]` per engine for each `case(&TestServer)`, on servers with `config`
/// added to their configuration (none if not given).
macro_rules! on_both_engines {
    ($($case:ident),* $(,)?) => {
        on_both_engines!(config ""; $($case),*);
    };
    (config $config:expr; $($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sled() {
                let s = super::on_sled($config);
                super::$case(&s.server).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                let Some(s) = super::on_postgres($config) else {
                    return;
                };
                super::$case(&s.server).await;
            }
        }
    )*};
}

pub(crate) use on_both_engines;

/// A sweep every second, and the metrics listener.
const SWEEPING: &str = "[lease]\ngc_interval = \"1s\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n";

on_both_engines!(
    key_shapes_warn_or_refuse_values,
    keys_pasted_into_other_fields_never_reach_the_trail,
    allowed_readers_bind_a_secret_to_its_agents,
    update_secret_changes_metadata_under_guard,
    lists_filter_and_secrets_expire_and_fall_due,
);

on_both_engines!(config super::SWEEPING;
    the_sweep_records_expiry_and_due_rotations_once_and_counts,
    a_recovery_window_keeps_a_secret_restorable_then_destroys_it,
    purge_destroys_now_and_frees_the_name,
    a_rotation_grace_keeps_previous_leases_working_until_it_ends,
);

/// A backup's bytes, taken through the `Backup` RPC.
async fn backup_bytes(admin: &mut Client) -> Vec<u8> {
    let mut backup = Vec::new();
    let mut stream = admin
        .backup(pb::BackupRequest {})
        .await
        .expect("backup")
        .into_inner();
    while let Some(chunk) = stream.next().await {
        backup.extend(chunk.expect("chunk").data);
    }
    backup
}

/// A made-up key shaped like `provider`'s (see `src/model/keyshape.rs`).
fn shaped_key(provider: &str, seed: u64) -> String {
    let alnum: String = format!("{seed:016}aB3dE5gH7jK9mN1pQ2rS4tU6vW8xY0zA")
        .chars()
        .cycle()
        .take(200)
        .collect();
    let key = match provider {
        "anthropic" => format!("sk-ant-api03-{}", &alnum[..95]),
        "openai" => format!("sk-proj-{}", &alnum[..120]),
        "google" => format!("AIza{}", &alnum[..35]),
        "groq" => format!("gsk_{}", &alnum[..52]),
        other => panic!("no sample for {other}"),
    };
    remember_secret(key.as_bytes());
    key
}

fn store_as(provider: &str, tenant: &str, name: &str, value: &[u8]) -> pb::StoreRequest {
    pb::StoreRequest {
        provider: provider.into(),
        ..store_req(tenant, name, value)
    }
}

async fn key_shapes_warn_or_refuse_values(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let seed = unique();
    // A value shaped like the provider's keys: no warning.
    let good = shaped_key("anthropic", seed);
    let meta = orch
        .store(store_as("anthropic", "acme", "fits", good.as_bytes()))
        .await
        .expect("store")
        .into_inner();
    assert!(meta.warnings.is_empty(), "{:?}", meta.warnings);
    // The wrong provider's shape: stored, with a warning that does not quote it.
    let openai = shaped_key("openai", seed);
    let meta = orch
        .store(store_as("anthropic", "acme", "misfit", openai.as_bytes()))
        .await
        .expect("store")
        .into_inner();
    assert_eq!(meta.warnings.len(), 1, "{:?}", meta.warnings);
    assert!(
        meta.warnings[0].contains("anthropic"),
        "{:?}",
        meta.warnings
    );
    assert!(!meta.warnings[0].contains(&openai[..16]));
    assert_eq!(
        lease_and_get(server, "acme", "misfit")
            .await
            .expect("get")
            .value,
        openai.as_bytes()
    );
    // A provider byokd does not know: never a warning.
    let meta = orch
        .store(store_as("acme-llm", "acme", "unknown", b"whatever-value-1"))
        .await
        .expect("store")
        .into_inner();
    assert!(meta.warnings.is_empty());
    // Strict: refused, and nothing is stored.
    let strict = pb::StoreRequest {
        strict_format: true,
        ..store_as("google", "acme", "strict", openai.as_bytes())
    };
    assert_status(
        orch.store(strict).await,
        Code::InvalidArgument,
        "value: does not look like google's API keys",
    );
    assert_status(
        orch.describe(secret_ref("acme", "strict")).await,
        Code::NotFound,
        "",
    );
    let google = shaped_key("google", seed);
    let strict = pb::StoreRequest {
        strict_format: true,
        ..store_as("gemini", "acme", "strict", google.as_bytes())
    };
    assert!(
        orch.store(strict)
            .await
            .expect("store")
            .into_inner()
            .warnings
            .is_empty()
    );
    // Rotate checks against the secret's provider.
    let rotated = orch
        .rotate(pb::RotateRequest {
            tenant: "acme".into(),
            name: "fits".into(),
            value: google.clone().into_bytes(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.version, 2);
    assert_eq!(rotated.warnings.len(), 1, "{:?}", rotated.warnings);
    let refused = orch
        .rotate(pb::RotateRequest {
            tenant: "acme".into(),
            name: "fits".into(),
            value: google.into_bytes(),
            strict_format: true,
            ..Default::default()
        })
        .await;
    assert_status(refused, Code::InvalidArgument, "anthropic's API keys");
    let described = orch
        .describe(secret_ref("acme", "fits"))
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.version, 2, "the strict Rotate changed nothing");
    assert!(
        described.warnings.is_empty(),
        "warnings answer Store and Rotate only"
    );
}

async fn keys_pasted_into_other_fields_never_reach_the_trail(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut admin = server.as_(ADMIN).await;
    let seed = unique();
    store(&mut orch, "acme", "real", b"a-real-value-000001").await;
    let keys = [
        shaped_key("anthropic", seed),
        shaped_key("openai", seed + 1),
        shaped_key("groq", seed + 2),
        shaped_key("google", seed + 3),
        shaped_key("anthropic", seed + 4),
        shaped_key("openai", seed + 5),
        shaped_key("groq", seed + 6),
        shaped_key("google", seed + 7),
    ];
    let looks = "looks like an API key; send it as the value";
    // Name, tenant, label key and value, provider.
    let name = orch
        .store(store_req("acme", &keys[0], b"value-000000001"))
        .await;
    assert_status(name, Code::InvalidArgument, &format!("name: {looks}"));
    let tenant = orch
        .store(store_req(&keys[1], "n", b"value-000000001"))
        .await;
    assert_status(tenant, Code::InvalidArgument, &format!("tenant: {looks}"));
    let mut labeled = store_req("acme", "labeled", b"value-000000001");
    labeled
        .labels
        .insert("note".into(), format!("key is {}", keys[2]));
    assert_status(orch.store(labeled).await, Code::InvalidArgument, looks);
    let mut labeled = store_req("acme", "labeled", b"value-000000001");
    labeled.labels.insert(keys[3].clone(), "v".into());
    assert_status(orch.store(labeled).await, Code::InvalidArgument, looks);
    // Reasons, of a secret's and of a lease's revocation.
    let reason = orch
        .revoke(revoke_secret(
            "acme",
            "real",
            &format!("leaked: {}", keys[4]),
        ))
        .await;
    assert_status(reason, Code::InvalidArgument, &format!("reason: {looks}"));
    let grant = lease_ok(&mut orch, lease_req("acme", "real", 1)).await;
    let mut revoke = revoke_lease(&grant.lease_id);
    revoke.reason = keys[5].clone();
    assert_status(orch.revoke(revoke).await, Code::InvalidArgument, looks);
    // An audience; and a name in a Describe, a Lease and an audit query.
    let mut req = lease_req("acme", "real", 1);
    req.audience = keys[6].clone();
    assert_status(
        orch.lease(req).await,
        Code::InvalidArgument,
        &format!("audience: {looks}"),
    );
    assert_status(
        orch.describe(secret_ref("acme", &keys[7])).await,
        Code::InvalidArgument,
        looks,
    );
    assert_status(
        orch.lease(lease_req("acme", &keys[0], 1)).await,
        Code::InvalidArgument,
        looks,
    );
    let query = server
        .as_(AUDITOR)
        .await
        .audit(pb::AuditRequest {
            name: keys[1].clone(),
            ..Default::default()
        })
        .await;
    assert_status(query, Code::InvalidArgument, looks);
    // The secret and the lease are as they were.
    assert_eq!(
        redeem(server, AGENT, &grant.token)
            .await
            .expect("get")
            .value,
        b"a-real-value-000001"
    );
    // Every refusal is audited, without the key: not in the trail, not in a backup.
    let entries = audit_all(server, pb::AuditRequest::default()).await;
    let refused: Vec<_> = entries
        .iter()
        .filter(|e| e.outcome == "INVALID_ARGUMENT")
        .collect();
    assert_eq!(refused.len(), 10, "{refused:#?}");
    let trail = format!("{entries:?}");
    let backup = backup_bytes(&mut admin).await;
    assert!(backup.len() > 100);
    for key in &keys {
        assert!(!trail.contains(key.as_str()), "a key reached the trail");
        let found = backup.windows(key.len()).any(|w| w == key.as_bytes());
        assert!(!found, "a key reached a backup");
    }
}

fn update(tenant: &str, name: &str, mask: &[&str]) -> pb::UpdateSecretRequest {
    pb::UpdateSecretRequest {
        tenant: tenant.into(),
        name: name.into(),
        update_mask: Some(prost_types::FieldMask {
            paths: mask.iter().map(|p| p.to_string()).collect(),
        }),
        ..Default::default()
    }
}

fn in_secs(seconds: i64) -> Option<prost_types::Timestamp> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    Some(prost_types::Timestamp {
        seconds: now.as_secs() as i64 + seconds,
        nanos: 0,
    })
}

pub(crate) fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

async fn allowed_readers_bind_a_secret_to_its_agents(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let bound = pb::StoreRequest {
        allowed_readers: vec!["agent2".into(), "agent2".into()],
        ..store_req("acme", "bound", b"bound-value-000001")
    };
    let meta = orch.store(bound).await.expect("store").into_inner();
    assert_eq!(meta.allowed_readers, ["agent2"]);
    // Only an allowed reader redeems; anyone else gets what any failed Get gets.
    let grant = lease_ok(&mut orch, lease_req("acme", "bound", 3)).await;
    let refused = redeem(server, AGENT, &grant.token).await;
    assert_status(
        refused,
        Code::NotFound,
        "lease not found or no longer valid",
    );
    let got = redeem(server, AGENT2, &grant.token)
        .await
        .expect("allowed reader");
    assert_eq!(got.value, b"bound-value-000001");
    assert_eq!(got.remaining_uses, 2, "the refused Get used nothing");
    // An audience must be one of them.
    let mut to_agent = lease_req("acme", "bound", 1);
    to_agent.audience = "agent".into();
    let refused = orch.lease(to_agent.clone()).await;
    assert_status(
        refused,
        Code::InvalidArgument,
        "audience: not one of the secret's allowed_readers",
    );
    let mut to_agent2 = lease_req("acme", "bound", 1);
    to_agent2.audience = "agent2".into();
    lease_ok(&mut orch, to_agent2).await;
    // Readers must be principals byokd knows.
    let unknown = pb::StoreRequest {
        allowed_readers: vec!["nobody".into()],
        ..store_req("acme", "unknown-reader", b"bound-value-000002")
    };
    assert_status(
        orch.store(unknown).await,
        Code::InvalidArgument,
        "allowed_readers: no such principal",
    );
    // The binding is read at redemption: cleared, the outstanding lease works for the agent;
    // set again, it stops.
    let cleared = orch
        .update_secret(update("acme", "bound", &["allowed_readers"]))
        .await
        .expect("update")
        .into_inner();
    assert!(cleared.allowed_readers.is_empty());
    let got = redeem(server, AGENT, &grant.token)
        .await
        .expect("any reader now");
    assert_eq!(got.remaining_uses, 1);
    orch.lease(to_agent).await.expect("any audience now");
    let rebound = pb::UpdateSecretRequest {
        allowed_readers: vec!["agent2".into()],
        ..update("acme", "bound", &["allowed_readers"])
    };
    orch.update_secret(rebound).await.expect("update");
    assert_status(
        redeem(server, AGENT, &grant.token).await,
        Code::NotFound,
        "",
    );
    // The refusals are audited against the lease.
    let gets = audit_all(
        server,
        pb::AuditRequest {
            tenant: "acme".into(),
            name: "bound".into(),
            action: "Get".into(),
            outcome: "NOT_FOUND".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gets.len(), 2);
    assert!(
        gets.iter()
            .all(|e| e.lease_id == grant.lease_id && e.principal == "agent")
    );
}

async fn update_secret_changes_metadata_under_guard(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut first = store_req("acme", "meta", b"meta-value-00000001");
    first.labels.insert("user".into(), "42".into());
    let stored = orch.store(first).await.expect("store").into_inner();
    let mut change = update("acme", "meta", &["labels", "provider"]);
    change.labels.insert("tier".into(), "pro".into());
    change.provider = "openai".into();
    let updated = orch
        .update_secret(change)
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.provider, "openai");
    assert_eq!(updated.labels.len(), 1);
    assert_eq!(updated.labels["tier"], "pro");
    assert_eq!(updated.version, 1);
    assert_eq!(updated.hint, stored.hint);
    assert!(micros(&updated.updated_at) >= micros(&stored.updated_at));
    // Bad requests.
    let cases = [
        (
            update("acme", "meta", &[]),
            Code::InvalidArgument,
            "update_mask: name the fields",
        ),
        (
            update("acme", "meta", &["value"]),
            Code::InvalidArgument,
            "update_mask: unknown field",
        ),
        (
            update("acme", "meta", &["provider"]),
            Code::InvalidArgument,
            "provider: required",
        ),
        (update("acme", "nope", &["labels"]), Code::NotFound, ""),
        (
            pb::UpdateSecretRequest {
                expires_at: in_secs(-10),
                ..update("acme", "meta", &["expires_at"])
            },
            Code::InvalidArgument,
            "expires_at: must be in the future",
        ),
        (
            pb::UpdateSecretRequest {
                rotate_after: secs(0),
                ..update("acme", "meta", &["rotate_after"])
            },
            Code::InvalidArgument,
            "rotate_after",
        ),
    ];
    for (req, code, message) in cases {
        assert_status(orch.update_secret(req).await, code, message);
    }
    let denied = server
        .as_(AGENT)
        .await
        .update_secret(update("acme", "meta", &["labels"]))
        .await;
    assert_status(denied, Code::PermissionDenied, "");
    let other_tenant = server
        .as_(GLOBEX_WRITER)
        .await
        .update_secret(update("acme", "meta", &["labels"]))
        .await;
    assert_status(other_tenant, Code::PermissionDenied, "");
    // Guarded like every change: updates racing rotations all land (retried, as a client
    // does, when contention answers ABORTED), none undoes another.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = server.as_(ORCHESTRATOR).await;
        tasks.push(tokio::spawn(async move {
            let mut req = update("acme", "meta", &["labels"]);
            req.labels.insert("n".into(), i.to_string());
            retry_aborted(|| {
                let (mut c, req) = (c.clone(), req.clone());
                async move { c.update_secret(req).await }
            })
            .await
        }));
    }
    for i in 0..4 {
        let c = server.as_(ORCHESTRATOR).await;
        tasks.push(tokio::spawn(async move {
            let value = format!("meta-value-rotated-{i:02}").into_bytes();
            remember_secret(&value);
            let req = pb::RotateRequest {
                tenant: "acme".into(),
                name: "meta".into(),
                value,
                ..Default::default()
            };
            retry_aborted(|| {
                let (mut c, req) = (c.clone(), req.clone());
                async move { c.rotate(req).await }
            })
            .await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("every change lands");
    }
    let after = orch
        .describe(secret_ref("acme", "meta"))
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(after.version, 5, "no update rolled a rotation back");
    assert_eq!(after.provider, "openai");
    assert!(after.labels["n"].parse::<u32>().expect("a number") < 8);
    // Audited with the fields changed.
    let entries = audit_all(
        server,
        pb::AuditRequest {
            tenant: "acme".into(),
            name: "meta".into(),
            action: "UpdateSecret".into(),
            ..Default::default()
        },
    )
    .await;
    let ok: Vec<_> = entries.iter().filter(|e| e.outcome == "OK").collect();
    assert_eq!(ok.len(), 9);
    assert_eq!(ok[0].reason, "changed: labels, provider");
    assert!(ok[1..].iter().all(|e| e.reason == "changed: labels"));
    let refused = entries
        .iter()
        .filter(|e| e.outcome != "OK" && e.outcome != "ABORTED")
        .count();
    assert_eq!(refused, 5 + 2, "every refusal naming it is audited too");
    // A revoked secret's metadata stays as it was.
    orch.revoke(revoke_secret("acme", "meta", "test"))
        .await
        .expect("revoke");
    let revoked = orch
        .update_secret(update("acme", "meta", &["labels"]))
        .await;
    assert_status(revoked, Code::FailedPrecondition, "");
}

/// `call`'s answer, called again while it answers ABORTED (contention), at most 20 times.
async fn retry_aborted<T, F: std::future::Future<Output = Result<T, tonic::Status>>>(
    mut call: impl FnMut() -> F,
) -> Result<(), tonic::Status> {
    let mut left = 20;
    loop {
        match call().await {
            Err(s) if s.code() == Code::Aborted && left > 0 => left -= 1,
            other => return other.map(|_| ()),
        }
    }
}

async fn list_names(client: &mut Client, req: pb::ListRequest) -> Vec<String> {
    let mut names = Vec::new();
    let mut req = req;
    loop {
        let page = client.list(req.clone()).await.expect("list").into_inner();
        names.extend(page.secrets.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            return names;
        }
        req.page_token = page.next_page_token;
    }
}

async fn lists_filter_and_secrets_expire_and_fall_due(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let labeled = |name: &str, provider: &str, labels: &[(&str, &str)]| {
        let value = format!("{name}-value-000000001");
        let mut req = store_as(provider, "globex", name, value.as_bytes());
        for (k, v) in labels {
            req.labels.insert(k.to_string(), v.to_string());
        }
        req
    };
    orch.store(labeled(
        "s1",
        "anthropic",
        &[("tier", "pro"), ("user", "1")],
    ))
    .await
    .expect("s1");
    orch.store(labeled("s2", "openai", &[("tier", "free")]))
        .await
        .expect("s2");
    let expiring = pb::StoreRequest {
        expires_at: in_secs(2),
        ..labeled("s3", "anthropic", &[("tier", "free")])
    };
    let s3 = orch.store(expiring).await.expect("s3").into_inner();
    assert_eq!(s3.state, pb::SecretState::Active as i32);
    let due = pb::StoreRequest {
        rotate_after: secs(1),
        ..labeled("s4", "anthropic", &[])
    };
    let s4 = orch.store(due).await.expect("s4").into_inner();
    assert_eq!(s4.rotate_after, secs(1));
    assert!(!s4.rotation_due);
    orch.store(labeled("s5", "anthropic", &[]))
        .await
        .expect("s5");
    orch.revoke(revoke_secret("globex", "s5", "gone"))
        .await
        .expect("revoke");
    // A lease issued before the expiry, redeemed after it.
    let early = lease_ok(&mut orch, lease_req("globex", "s3", 2)).await;
    redeem(server, AGENT, &early.token)
        .await
        .expect("before expiry");

    let list = |f: fn(&mut pb::ListRequest)| {
        let mut req = pb::ListRequest {
            tenant: "globex".into(),
            page_size: 1,
            ..Default::default()
        };
        f(&mut req);
        req
    };
    let mut c = orch.clone();
    assert_eq!(
        list_names(&mut c, list(|r| r.provider = "anthropic".into())).await,
        ["s1", "s3", "s4", "s5"]
    );
    assert_eq!(
        list_names(&mut c, list(|r| r.label_selector = "tier=free".into())).await,
        ["s2", "s3"]
    );
    assert_eq!(
        list_names(
            &mut c,
            list(|r| r.label_selector = "tier=pro,user=1".into())
        )
        .await,
        ["s1"]
    );
    assert_eq!(
        list_names(
            &mut c,
            list(|r| r.states = vec![pb::SecretState::Revoked as i32])
        )
        .await,
        ["s5"]
    );
    let expiring_soon = |r: &mut pb::ListRequest| r.expiring_before = in_secs(3600);
    assert_eq!(list_names(&mut c, list(expiring_soon)).await, ["s3"]);
    for (bad, message) in [
        (list(|r| r.states = vec![99]), "states"),
        (list(|r| r.label_selector = "tier".into()), "label_selector"),
    ] {
        assert_status(c.list(bad).await, Code::InvalidArgument, message);
    }

    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    // s3 has expired, s4's rotation is due.
    let expired = |r: &mut pb::ListRequest| r.states = vec![pb::SecretState::Expired as i32];
    assert_eq!(list_names(&mut c, list(expired)).await, ["s3"]);
    assert_eq!(
        list_names(&mut c, list(|r| r.rotation_due = true)).await,
        ["s4"]
    );
    let active = |r: &mut pb::ListRequest| r.states = vec![pb::SecretState::Active as i32];
    assert_eq!(list_names(&mut c, list(active)).await, ["s1", "s2", "s4"]);
    let s4 = orch
        .describe(secret_ref("globex", "s4"))
        .await
        .expect("describe")
        .into_inner();
    assert!(s4.rotation_due);
    // Expired: no lease, and the lease issued before stops working.
    let refused = orch.lease(lease_req("globex", "s3", 1)).await;
    assert_status(refused, Code::FailedPrecondition, "secret expired");
    assert_status(
        redeem(server, AGENT, &early.token).await,
        Code::NotFound,
        "",
    );
    // A Rotate makes it active again, without the expiry that passed; and s4's new version
    // is not due.
    for name in ["s3", "s4"] {
        let value = format!("{name}-value-000000002").into_bytes();
        remember_secret(&value);
        let rotated = orch
            .rotate(pb::RotateRequest {
                tenant: "globex".into(),
                name: name.into(),
                value,
                ..Default::default()
            })
            .await
            .expect("rotate")
            .into_inner();
        assert_eq!(rotated.state, pb::SecretState::Active as i32);
        assert!(!rotated.rotation_due);
    }
    let s3 = lease_and_get(server, "globex", "s3")
        .await
        .expect("active again");
    assert_eq!(s3.value, b"s3-value-000000002");
    let described = orch
        .describe(secret_ref("globex", "s3"))
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.expires_at, None);
    // Expiry and reminders are refused where they make no sense.
    let past = pb::StoreRequest {
        expires_at: in_secs(-1),
        ..labeled("s6", "anthropic", &[])
    };
    assert_status(orch.store(past).await, Code::InvalidArgument, "expires_at");
    let long = pb::StoreRequest {
        rotate_after: secs(3651 * 86_400),
        ..labeled("s6", "anthropic", &[])
    };
    assert_status(
        orch.store(long).await,
        Code::InvalidArgument,
        "rotate_after",
    );
}

/// The entries with `action` about `tenant`/`name`, waiting up to 20 s for `at_least`.
pub(crate) async fn entries_of(
    server: &TestServer,
    tenant: &str,
    name: &str,
    action: &str,
    at_least: usize,
) -> Vec<pb::AuditEntry> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let entries = audit_all(
            server,
            pb::AuditRequest {
                tenant: tenant.into(),
                name: name.into(),
                action: action.into(),
                ..Default::default()
            },
        )
        .await;
        if entries.len() >= at_least || std::time::Instant::now() > deadline {
            return entries;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn the_sweep_records_expiry_and_due_rotations_once_and_counts(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    // A consumer of the trail that tells end users.
    let mut watch = server
        .as_(ACME_AUDITOR)
        .await
        .watch_audit(pb::WatchAuditRequest {
            tenant: "acme".into(),
            action: "Expire".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let expiring = pb::StoreRequest {
        expires_at: in_secs(2),
        ..store_req("acme", "e1", b"expiring-value-0001")
    };
    orch.store(expiring).await.expect("e1");
    let later = pb::StoreRequest {
        expires_at: in_secs(3 * 86_400),
        ..store_req("acme", "e2", b"expiring-value-0002")
    };
    orch.store(later).await.expect("e2");
    let due = pb::StoreRequest {
        rotate_after: secs(1),
        ..store_req("acme", "r1", b"rotating-value-0001")
    };
    orch.store(due).await.expect("r1");
    store(&mut orch, "acme", "p1", b"plain-value-000001").await;
    store(&mut orch, "acme", "v1", b"revoked-value-0001").await;
    orch.revoke(revoke_secret("acme", "v1", "test"))
        .await
        .expect("revoke");

    let expired = entries_of(server, "acme", "e1", "Expire", 1).await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].principal, "", "recorded by byokd itself");
    assert_eq!(expired[0].version, 1);
    let watched = tokio::time::timeout(std::time::Duration::from_secs(10), watch.next())
        .await
        .expect("the watcher is told")
        .expect("an entry")
        .expect("ok");
    assert_eq!(
        (watched.name.as_str(), watched.action.as_str()),
        ("e1", "Expire")
    );
    let due = entries_of(server, "acme", "r1", "RotationDue", 1).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].version, 1);
    // Later sweeps record nothing twice.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(entries_of(server, "acme", "e1", "Expire", 0).await.len(), 1);
    assert_eq!(
        entries_of(server, "acme", "r1", "RotationDue", 0)
            .await
            .len(),
        1
    );
    assert!(
        entries_of(server, "acme", "e2", "Expire", 0)
            .await
            .is_empty()
    );
    assert!(
        entries_of(server, "acme", "p1", "RotationDue", 0)
            .await
            .is_empty()
    );
    // The gauges.
    let metrics = scrape(&ops_addr(server)).await;
    assert_eq!(sample(&metrics, "byokd_secrets{state=\"expired\"}"), 1.0);
    assert_eq!(sample(&metrics, "byokd_secrets{state=\"active\"}"), 3.0);
    assert_eq!(sample(&metrics, "byokd_secrets{state=\"revoked\"}"), 1.0);
    assert_eq!(sample(&metrics, "byokd_secrets_rotation_due"), 1.0);
    assert_eq!(sample(&metrics, "byokd_secrets_expiring_soon"), 1.0);
    // A new version is due again once its own interval has passed.
    let value = b"rotating-value-0002".to_vec();
    remember_secret(&value);
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "r1".into(),
        value,
        ..Default::default()
    })
    .await
    .expect("rotate");
    let due = entries_of(server, "acme", "r1", "RotationDue", 2).await;
    assert_eq!(due.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2]);
    assert_chain_verifies(server).await;
}

pub(crate) fn revoke_within(tenant: &str, name: &str, window: i64) -> pb::RevokeRequest {
    pb::RevokeRequest {
        recovery_window: secs(window),
        ..revoke_secret(tenant, name, "user deleted the key")
    }
}

pub(crate) async fn describe(client: &mut Client, tenant: &str, name: &str) -> pb::SecretMetadata {
    client
        .describe(secret_ref(tenant, name))
        .await
        .expect("describe")
        .into_inner()
}

async fn a_recovery_window_keeps_a_secret_restorable_then_destroys_it(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let stored = store(&mut orch, "acme", "w1", b"windowed-value-0001").await;
    let early = lease_ok(&mut orch, lease_req("acme", "w1", 3)).await;
    let revoked = orch
        .revoke(revoke_within("acme", "w1", 3600))
        .await
        .expect("revoke")
        .into_inner();
    assert!(!revoked.already_revoked);
    let tombstone = revoked.secret.expect("metadata");
    assert_eq!(tombstone.state, pb::SecretState::PendingDeletion as i32);
    let window = micros(&tombstone.destroy_at) - micros(&tombstone.revoked_at);
    assert!(
        (3_599_000_000..=3_601_000_000).contains(&window),
        "{window}"
    );
    // Within the window: no lease works, none is issued.
    assert_status(
        redeem(server, AGENT, &early.token).await,
        Code::NotFound,
        "",
    );
    let refused = orch.lease(lease_req("acme", "w1", 1)).await;
    assert_status(refused, Code::FailedPrecondition, "");
    let again = orch.revoke(revoke_within("acme", "w1", 60)).await;
    assert!(again.expect("revoke again").into_inner().already_revoked);
    let metrics = scrape(&ops_addr(server)).await;
    let pending = "byokd_secrets{state=\"pending_deletion\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut metrics = metrics;
    while sample(&metrics, pending) != 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        metrics = scrape(&ops_addr(server)).await;
    }
    assert_eq!(sample(&metrics, pending), 1.0);
    // Restored: active, its value kept, the leases the revocation ended still ended.
    let restored = orch
        .restore(secret_ref("acme", "w1"))
        .await
        .expect("restore")
        .into_inner();
    assert_eq!(restored.state, pb::SecretState::Active as i32);
    assert_eq!((&restored.id, restored.version), (&stored.id, 1));
    assert!(restored.destroy_at.is_none() && restored.revoked_at.is_none());
    assert_status(
        redeem(server, AGENT, &early.token).await,
        Code::NotFound,
        "",
    );
    let value = lease_and_get(server, "acme", "w1").await.expect("get");
    assert_eq!(value.value, b"windowed-value-0001");
    let twice = orch.restore(secret_ref("acme", "w1")).await;
    assert_status(twice, Code::FailedPrecondition, "not pending deletion");
    // Revoked again with a short window: destroyed by the sweep when it ends.
    orch.revoke(revoke_within("acme", "w1", 1))
        .await
        .expect("revoke");
    let destroyed = entries_of(server, "acme", "w1", "Destroy", 1).await;
    assert_eq!(destroyed.len(), 1, "{destroyed:?}");
    assert_eq!(destroyed[0].reason, "recovery window ended");
    assert_eq!(destroyed[0].principal, "");
    assert_eq!(destroyed[0].secret_id, stored.id);
    let gone = describe(&mut orch, "acme", "w1").await;
    assert_eq!(gone.state, pb::SecretState::Revoked as i32);
    assert!(gone.destroy_at.is_none());
    let late = orch.restore(secret_ref("acme", "w1")).await;
    assert_status(late, Code::FailedPrecondition, "not pending deletion");
    // A Revoke without a window during one destroys at once.
    store(&mut orch, "acme", "w2", b"windowed-value-0002").await;
    orch.revoke(revoke_within("acme", "w2", 3600))
        .await
        .expect("revoke");
    let now = orch
        .revoke(revoke_secret("acme", "w2", "now"))
        .await
        .expect("revoke now")
        .into_inner();
    assert_eq!(
        now.secret.expect("metadata").state,
        pb::SecretState::Revoked as i32
    );
    let late = orch.restore(secret_ref("acme", "w2")).await;
    assert_status(late, Code::FailedPrecondition, "");
    // Bounds, and who may.
    let long = orch
        .revoke(revoke_within("acme", "w2", 30 * 86_400 + 1))
        .await;
    assert_status(
        long,
        Code::InvalidArgument,
        "recovery_window: at most 30 days",
    );
    store(&mut orch, "acme", "w3", b"windowed-value-0003").await;
    let grant = lease_ok(&mut orch, lease_req("acme", "w3", 1)).await;
    let on_lease = pb::RevokeRequest {
        recovery_window: secs(60),
        ..revoke_lease(&grant.lease_id)
    };
    let on_lease = orch.revoke(on_lease).await;
    assert_status(on_lease, Code::InvalidArgument, "recovery_window");
    let denied = server
        .as_(AGENT)
        .await
        .restore(secret_ref("acme", "w2"))
        .await;
    assert_status(denied, Code::PermissionDenied, "");
    let restores = entries_of(server, "acme", "w1", "Restore", 0).await;
    assert_eq!(restores.iter().filter(|e| e.outcome == "OK").count(), 1);
}

async fn purge_destroys_now_and_frees_the_name(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut admin = server.as_(ADMIN).await;
    let mut req = store_req("acme", "erase", b"erased-value-000001");
    req.labels
        .insert("email".into(), "user42-label-marker".into());
    let stored = orch.store(req).await.expect("store").into_inner();
    let early = lease_ok(&mut orch, lease_req("acme", "erase", 2)).await;
    let purge = |name: &str| pb::PurgeRequest {
        tenant: "acme".into(),
        name: name.into(),
        reason: "erasure request 42".into(),
    };
    let denied = orch.purge(purge("erase")).await;
    assert_status(denied, Code::PermissionDenied, "");
    let purged = admin
        .purge(purge("erase"))
        .await
        .expect("purge")
        .into_inner();
    assert_eq!(purged.secret_id, stored.id);
    assert_eq!(purged.versions_destroyed, 1);
    assert_status(
        orch.describe(secret_ref("acme", "erase")).await,
        Code::NotFound,
        "",
    );
    assert_status(
        redeem(server, AGENT, &early.token).await,
        Code::NotFound,
        "",
    );
    let names = list_names(
        &mut orch,
        pb::ListRequest {
            tenant: "acme".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!names.contains(&"erase".to_string()));
    // The name is free: a new secret with a new id; the old lease stays dead.
    let again = store(&mut orch, "acme", "erase", b"erased-value-000002").await;
    assert_ne!(again.id, stored.id);
    assert!(again.labels.is_empty());
    assert_status(
        redeem(server, AGENT, &early.token).await,
        Code::NotFound,
        "",
    );
    let value = lease_and_get(server, "acme", "erase").await.expect("get");
    assert_eq!(value.value, b"erased-value-000002");
    // The trail keeps the id and the Purge; nothing of the secret is left in a backup.
    let entries = entries_of(server, "acme", "erase", "Purge", 1).await;
    let ok: Vec<_> = entries.iter().filter(|e| e.outcome == "OK").collect();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].secret_id, stored.id);
    assert_eq!(ok[0].reason, "erasure request 42");
    let backup = backup_bytes(&mut admin).await;
    let marker = b"user42-label-marker";
    assert!(!backup.windows(marker.len()).any(|w| w == marker));
    // A tombstone purges too (nothing left to destroy); an absent name is not found.
    store(&mut orch, "acme", "old", b"erased-value-000003").await;
    orch.revoke(revoke_secret("acme", "old", "gone"))
        .await
        .expect("revoke");
    let tombstone = admin.purge(purge("old")).await.expect("purge").into_inner();
    assert_eq!(tombstone.versions_destroyed, 0);
    assert_status(admin.purge(purge("old")).await, Code::NotFound, "");
}

async fn a_rotation_grace_keeps_previous_leases_working_until_it_ends(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "g1", b"graced-value-v1-0001").await;
    let old = lease_ok(&mut orch, lease_req("acme", "g1", 3)).await;
    let rotate = |name: &str, value: &[u8], grace: i64| {
        remember_secret(value);
        pb::RotateRequest {
            tenant: "acme".into(),
            name: name.into(),
            value: value.to_vec(),
            previous_grace: secs(grace),
            ..Default::default()
        }
    };
    let rotated = orch
        .rotate(rotate("g1", b"graced-value-v2-0002", 2))
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!((rotated.version, rotated.previous_version), (2, 1));
    assert!(rotated.previous_until.is_some());
    // The lease issued before: the previous value; new leases: the new one.
    let got = redeem(server, AGENT, &old.token).await.expect("in grace");
    assert_eq!(
        (got.value.as_slice(), got.version),
        (&b"graced-value-v1-0001"[..], 1)
    );
    let new = lease_ok(&mut orch, lease_req("acme", "g1", 1)).await;
    assert_eq!(new.version, 2);
    let got = redeem(server, AGENT, &new.token).await.expect("new");
    assert_eq!(got.value, b"graced-value-v2-0002");
    let long = orch
        .rotate(rotate("g1", b"graced-value-v3-0003", 15 * 60 + 1))
        .await;
    assert_status(
        long,
        Code::InvalidArgument,
        "previous_grace: at most 15 minutes",
    );
    // When the grace ends, the previous version's data key is destroyed (audited).
    let destroyed = entries_of(server, "acme", "g1", "Destroy", 1).await;
    assert_eq!(destroyed.len(), 1);
    assert_eq!(
        (destroyed[0].version, destroyed[0].reason.as_str()),
        (1, "rotation grace ended")
    );
    assert_status(redeem(server, AGENT, &old.token).await, Code::NotFound, "");
    let after = describe(&mut orch, "acme", "g1").await;
    assert_eq!((after.version, after.previous_version), (2, 0));
    // A Revoke during a grace ends it at once.
    store(&mut orch, "acme", "g2", b"graced-value-v1-0004").await;
    let old = lease_ok(&mut orch, lease_req("acme", "g2", 3)).await;
    orch.rotate(rotate("g2", b"graced-value-v2-0005", 600))
        .await
        .expect("rotate");
    redeem(server, AGENT, &old.token).await.expect("in grace");
    orch.revoke(revoke_within("acme", "g2", 3600))
        .await
        .expect("revoke");
    let restored = orch
        .restore(secret_ref("acme", "g2"))
        .await
        .expect("restore")
        .into_inner();
    assert_eq!((restored.version, restored.previous_version), (2, 0));
    assert_status(redeem(server, AGENT, &old.token).await, Code::NotFound, "");
    let value = lease_and_get(server, "acme", "g2").await.expect("get");
    assert_eq!(value.value, b"graced-value-v2-0005");
    // Without a grace, today's behaviour: the previous version's leases end at once.
    let old = lease_ok(&mut orch, lease_req("acme", "g2", 1)).await;
    orch.rotate(rotate("g2", b"graced-value-v3-0006", 0))
        .await
        .expect("rotate");
    assert_status(redeem(server, AGENT, &old.token).await, Code::NotFound, "");
    assert_chain_verifies(server).await;
}
