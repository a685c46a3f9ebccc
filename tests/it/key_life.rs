//! The life of a user's key beyond store, lease, rotate and revoke (issue 18): key-shape
//! checks, per-agent binding. Every case runs on both engines: a sled server and a server on
//! a fresh PostgreSQL database.

use crate::harness::*;
use byokd::api::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

/// A server on one engine, with what it needs kept until the test ends.
pub(crate) struct OnEngine {
    pub(crate) server: TestServer,
    _dir: TestDir,
    _key_dir: Option<tempfile::TempDir>,
    // Dropped last: the server closes its connections first.
    _db: Option<PgDatabase>,
}

/// A sled server with `extra` in its configuration.
pub(crate) fn on_sled(extra: &str) -> OnEngine {
    let dir = TestDir::with_config(extra);
    OnEngine {
        server: dir.start(),
        _dir: dir,
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
        _dir: dir,
        _key_dir: Some(key_dir),
        _db: Some(db),
    })
}

/// One `#[tokio::test]` per engine for each `case(&TestServer)`.
macro_rules! on_both_engines {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sled() {
                let s = super::on_sled("");
                super::$case(&s.server).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                let Some(s) = super::on_postgres("") else {
                    return;
                };
                super::$case(&s.server).await;
            }
        }
    )*};
}

on_both_engines!(
    key_shapes_warn_or_refuse_values,
    keys_pasted_into_other_fields_never_reach_the_trail,
);

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
        "value: does not look like a google API key",
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
        })
        .await;
    assert_status(refused, Code::InvalidArgument, "anthropic API key");
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
    let mut backup = Vec::new();
    let mut stream = admin
        .backup(pb::BackupRequest {})
        .await
        .expect("backup")
        .into_inner();
    while let Some(chunk) = stream.next().await {
        backup.extend(chunk.expect("chunk").data);
    }
    assert!(backup.len() > 100);
    for key in &keys {
        assert!(!trail.contains(key.as_str()), "a key reached the trail");
        let found = backup.windows(key.len()).any(|w| w == key.as_bytes());
        assert!(!found, "a key reached a backup");
    }
}
