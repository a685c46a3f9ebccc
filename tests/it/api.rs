//! Every RPC's contract: results, validation and authorization errors, audit entries.

use std::collections::HashMap;

use byokd::api::v1::{self as pb};
use tonic::Code;

use crate::harness::*;

const KEY: &[u8] = b"sk-ant-api03-AAAAbbbbCCCCddddEEEEffff0123456789-a1b2";

#[tokio::test]
async fn store_describe_and_list_return_metadata_never_the_value() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut req = store_req("acme", "user-1.anthropic", KEY);
    req.labels = HashMap::from([("user".to_string(), "1".to_string())]);
    let meta = orch.store(req).await.unwrap().into_inner();
    assert!(!meta.id.is_empty());
    assert_eq!(
        (meta.tenant.as_str(), meta.name.as_str()),
        ("acme", "user-1.anthropic")
    );
    assert_eq!(meta.provider, "anthropic");
    assert_eq!(meta.labels.get("user").map(String::as_str), Some("1"));
    assert_eq!(meta.version, 1);
    assert_eq!(meta.state, pb::SecretState::Active as i32);
    assert_eq!(meta.created_at, meta.updated_at);
    assert!(meta.created_at.is_some() && meta.revoked_at.is_none());
    assert_eq!(meta.hint, "sk-a…a1b2");

    let described = orch
        .describe(secret_ref("acme", "user-1.anthropic"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described, meta);
    let listed = orch
        .list(pb::ListRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.secrets, vec![meta.clone()]);
    assert!(listed.next_page_token.is_empty());
    // Same name in another tenant is another secret.
    let other = store(&mut orch, "globex", "user-1.anthropic", KEY).await;
    assert_ne!(other.id, meta.id);
    assert_status(
        orch.describe(secret_ref("acme", "nope")).await,
        Code::NotFound,
        "secret not found",
    );
}

#[tokio::test]
async fn store_refuses_taken_names_and_bad_input_naming_the_field() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", KEY).await;
    assert_status(
        orch.store(store_req("acme", "k", b"other-value")).await,
        Code::AlreadyExists,
        "already exists",
    );

    let long = "x".repeat(129);
    let many_labels: HashMap<String, String> =
        (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let cases: Vec<(pb::StoreRequest, &str)> = vec![
        (store_req("", "k2", KEY), "tenant: required"),
        (store_req("acme", "", KEY), "name: required"),
        (store_req("acme", "has space", KEY), "name: only letters"),
        (store_req("acme", "a/b", KEY), "name: only letters"),
        (store_req("acme", &long, KEY), "name: at most 128"),
        (store_req(&long, "k2", KEY), "tenant: at most 128"),
        (store_req("acme", "k2", b""), "value: required"),
        (
            store_req("acme", "k2", &vec![b'x'; 64 * 1024 + 1]),
            "value: at most 65536 bytes",
        ),
        (
            pb::StoreRequest {
                provider: String::new(),
                ..store_req("acme", "k2", KEY)
            },
            "provider: required",
        ),
        (
            pb::StoreRequest {
                labels: many_labels,
                ..store_req("acme", "k2", KEY)
            },
            "labels: at most 32",
        ),
        (
            pb::StoreRequest {
                labels: HashMap::from([("bad key!".into(), "v".into())]),
                ..store_req("acme", "k2", KEY)
            },
            "labels: keys",
        ),
    ];
    for (req, message) in cases {
        let status = assert_status(orch.store(req).await, Code::InvalidArgument, message);
        // The message names the field and the rule, never echoes the value.
        assert!(!status.message().contains("sk-ant"), "{status:?}");
    }
    // The boundary itself is accepted.
    store(&mut orch, "acme", "max-size", &vec![b'x'; 64 * 1024]).await;
    // A message far beyond any valid request is cut off by the transport.
    let huge = orch
        .store(store_req("acme", "huge", &vec![b'x'; 1024 * 1024]))
        .await;
    let status = huge.expect_err("oversized message must fail");
    assert!(
        matches!(
            status.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );
    assert_status(
        orch.describe(secret_ref("acme", "k2")).await,
        Code::NotFound,
        "",
    );
}

#[tokio::test]
async fn callers_without_valid_credentials_or_rights_are_refused_and_audited() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut anonymous = server.client(None).await;
    assert_status(
        anonymous.store(store_req("acme", "k", KEY)).await,
        Code::Unauthenticated,
        "missing bearer token",
    );
    let mut wrong = server.as_("tok-nobody").await;
    assert_status(
        wrong.describe(secret_ref("acme", "k")).await,
        Code::Unauthenticated,
        "invalid bearer token",
    );
    let mut malformed = server.client(None).await;
    let mut req = tonic::Request::new(secret_ref("acme", "k"));
    req.metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    assert_status(
        malformed.describe(req).await,
        Code::Unauthenticated,
        "malformed authorization",
    );

    // Roles.
    let mut agent = server.as_(AGENT).await;
    assert_status(
        agent.store(store_req("acme", "k", KEY)).await,
        Code::PermissionDenied,
        "may not store secrets",
    );
    assert_status(
        agent.lease(lease_req("acme", "k", 1)).await,
        Code::PermissionDenied,
        "may not lease",
    );
    let mut auditor = server.as_(AUDITOR).await;
    assert_status(
        auditor.get(get_req("byokd_lt_x")).await,
        Code::PermissionDenied,
        "may not redeem",
    );
    let mut orch = server.as_(ORCHESTRATOR).await;
    assert_status(
        orch.get(get_req("byokd_lt_x")).await,
        Code::PermissionDenied,
        "may not redeem",
    );
    assert_status(
        orch.audit(pb::AuditRequest::default()).await,
        Code::PermissionDenied,
        "may not read the audit trail",
    );
    // Tenants.
    assert_status(
        orch.store(store_req("initech", "k", KEY)).await,
        Code::PermissionDenied,
        "no access to tenant initech",
    );
    let mut globex = server.as_(GLOBEX_WRITER).await;
    store(&mut orch, "acme", "k", KEY).await;
    assert_status(
        globex.describe(secret_ref("acme", "k")).await,
        Code::PermissionDenied,
        "no access to tenant acme",
    );
    assert_status(
        globex
            .list(pb::ListRequest {
                tenant: "acme".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "no access",
    );
    assert_status(
        globex
            .rotate(pb::RotateRequest {
                tenant: "acme".into(),
                name: "k".into(),
                value: KEY.to_vec(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "no access",
    );
    assert_status(
        globex.revoke(revoke_secret("acme", "k", "")).await,
        Code::PermissionDenied,
        "no access",
    );

    let entries = audit_all(&server, pb::AuditRequest::default()).await;
    let unauthenticated: Vec<_> = entries
        .iter()
        .filter(|e| e.outcome == "UNAUTHENTICATED")
        .collect();
    assert_eq!(unauthenticated.len(), 3);
    for e in &unauthenticated {
        assert!(e.principal.is_empty());
        assert!(e.peer.starts_with("127.0.0.1:"), "{e:?}");
        assert_eq!(e.code, Code::Unauthenticated as i32);
    }
    assert_eq!(unauthenticated[0].action, "Store");
    assert_eq!(unauthenticated[1].reason, "unknown bearer token");
    let denied: Vec<_> = entries
        .iter()
        .filter(|e| e.outcome == "PERMISSION_DENIED")
        .collect();
    assert_eq!(denied.len(), 10);
    let initech = denied
        .iter()
        .find(|e| e.tenant == "initech")
        .expect("tenant denial audited");
    assert_eq!(
        (initech.principal.as_str(), initech.action.as_str()),
        ("orchestrator", "Store")
    );
    assert!(
        denied
            .iter()
            .any(|e| e.principal == "globex-writer" && e.action == "Revoke" && e.name == "k")
    );
}

#[tokio::test]
async fn list_pages_through_a_tenant_in_name_order() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    for name in ["e", "a", "d", "b", "c"] {
        store(&mut orch, "acme", name, KEY).await;
    }
    store(&mut orch, "globex", "z", KEY).await;
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = orch
            .list(pb::ListRequest {
                tenant: "acme".into(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.secrets.len() <= 2);
        names.extend(page.secrets.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(pages, 3);
    let empty = orch
        .list(pb::ListRequest {
            tenant: "globex-empty".into(),
            ..Default::default()
        })
        .await;
    assert_status(empty, Code::PermissionDenied, "no access");
    assert_status(
        orch.list(pb::ListRequest {
            tenant: "acme".into(),
            page_size: 1001,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_size: at most 1000",
    );
    assert_status(
        orch.list(pb::ListRequest {
            tenant: "acme".into(),
            page_token: "%%%".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
}

#[tokio::test]
async fn rotate_makes_a_new_version_current_and_ends_old_leases() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let v1 = store(&mut orch, "acme", "k", b"first-value-0000000000000000-1111").await;
    let old = lease_ok(&mut orch, lease_req("acme", "k", 5)).await;
    assert_eq!(old.version, 1);
    let mut agent = server.as_(AGENT).await;
    agent.get(get_req(&old.token)).await.unwrap();

    let rotate = |value: &[u8]| pb::RotateRequest {
        tenant: "acme".into(),
        name: "k".into(),
        value: value.to_vec(),
        ..Default::default()
    };
    let v2 = orch
        .rotate(rotate(b"second-value-000000000000000-2222"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v2.id.as_str(), v2.version), (v1.id.as_str(), 2));
    assert_eq!(v2.created_at, v1.created_at);
    assert!(micros(&v2.updated_at) > micros(&v1.updated_at));
    assert_eq!(v2.hint, "seco…2222");
    // The old lease had uses left, but its version is gone.
    assert_status(
        agent.get(get_req(&old.token)).await,
        Code::NotFound,
        "lease not found or no longer valid",
    );
    let value = lease_and_get(&server, "acme", "k").await.unwrap();
    assert_eq!(
        (value.value.as_slice(), value.version),
        (&b"second-value-000000000000000-2222"[..], 2)
    );

    assert_status(
        orch.rotate(pb::RotateRequest {
            name: "missing".into(),
            ..rotate(KEY)
        })
        .await,
        Code::NotFound,
        "secret not found",
    );
    assert_status(
        orch.rotate(rotate(b"")).await,
        Code::InvalidArgument,
        "value: required",
    );
    orch.revoke(revoke_secret("acme", "k", "test"))
        .await
        .unwrap();
    assert_status(
        orch.rotate(rotate(KEY)).await,
        Code::FailedPrecondition,
        "secret is revoked",
    );
}

#[tokio::test]
async fn revoking_a_secret_leaves_a_tombstone_and_ends_every_lease() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", KEY).await;
    let a = lease_ok(&mut orch, lease_req("acme", "k", 3)).await;
    let b = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;

    let revoked = orch
        .revoke(revoke_secret("acme", "k", "user deleted the key"))
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.already_revoked);
    let tomb = revoked.secret.unwrap();
    assert_eq!(tomb.state, pb::SecretState::Revoked as i32);
    assert!(tomb.revoked_at.is_some());
    let mut agent = server.as_(AGENT).await;
    for token in [&a.token, &b.token] {
        assert_status(
            agent.get(get_req(token)).await,
            Code::NotFound,
            "lease not found or no longer valid",
        );
    }
    let described = orch
        .describe(secret_ref("acme", "k"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.state, pb::SecretState::Revoked as i32);
    assert_eq!(described.hint, tomb.hint);

    // Twice is not an error.
    let again = orch
        .revoke(revoke_secret("acme", "k", "again"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_revoked);
    assert_status(
        orch.lease(lease_req("acme", "k", 1)).await,
        Code::FailedPrecondition,
        "secret is revoked",
    );
    assert_status(
        orch.store(store_req("acme", "k", KEY)).await,
        Code::AlreadyExists,
        "already exists",
    );
    assert_status(
        orch.revoke(revoke_secret("acme", "nope", "")).await,
        Code::NotFound,
        "secret not found",
    );
    assert_status(
        orch.revoke(pb::RevokeRequest {
            target: None,
            reason: String::new(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "target",
    );
    assert_status(
        orch.revoke(revoke_secret("acme", "k", &"r".repeat(257)))
            .await,
        Code::InvalidArgument,
        "reason: at most 256",
    );

    let entries = audit_all(
        &server,
        pb::AuditRequest {
            tenant: "acme".into(),
            name: "k".into(),
            action: "Revoke".into(),
            ..Default::default()
        },
    )
    .await;
    let summary: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.outcome.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("OK", "user deleted the key"),
            ("OK", "again"),
            ("INVALID_ARGUMENT", "reason: at most 256 characters"),
        ]
    );
    assert_eq!(entries[0].version, 1);
}

#[tokio::test]
async fn revoking_a_lease_ends_just_that_lease() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", KEY).await;
    let a = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
    let b = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
    let r = orch
        .revoke(revoke_lease(&a.lease_id))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.already_revoked && r.secret.is_none());
    assert!(
        orch.revoke(revoke_lease(&a.lease_id))
            .await
            .unwrap()
            .into_inner()
            .already_revoked
    );
    let mut agent = server.as_(AGENT).await;
    assert_status(
        agent.get(get_req(&a.token)).await,
        Code::NotFound,
        "lease not found or no longer valid",
    );
    assert_eq!(
        agent
            .get(get_req(&b.token))
            .await
            .unwrap()
            .into_inner()
            .value,
        KEY
    );

    assert_status(
        orch.revoke(revoke_lease("not-a-uuid")).await,
        Code::InvalidArgument,
        "lease_id: not a valid id",
    );
    assert_status(
        orch.revoke(revoke_lease("6f1c1f4e-52a7-4b8e-9d56-3b1c2d4e5f60"))
            .await,
        Code::NotFound,
        "lease not found",
    );
    // A principal of another tenant cannot see it, let alone revoke it.
    let c = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
    let mut globex = server.as_(GLOBEX_WRITER).await;
    assert_status(
        globex.revoke(revoke_lease(&c.lease_id)).await,
        Code::NotFound,
        "lease not found",
    );
    assert_eq!(
        agent
            .get(get_req(&c.token))
            .await
            .unwrap()
            .into_inner()
            .value,
        KEY
    );
}

#[tokio::test]
async fn audit_records_every_rpc_without_values_or_tokens() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let meta = store(&mut orch, "acme", "k", KEY).await;
    orch.describe(secret_ref("acme", "k")).await.unwrap();
    orch.list(pb::ListRequest {
        tenant: "acme".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let grant = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
    let mut agent = server.as_(AGENT).await;
    agent.get(get_req(&grant.token)).await.unwrap();
    assert_status(agent.get(get_req(&grant.token)).await, Code::NotFound, "");
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "k".into(),
        value: b"rotated-value-xyz".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    orch.revoke(revoke_secret("acme", "k", "done"))
        .await
        .unwrap();
    server
        .as_(ACME_AUDITOR)
        .await
        .audit(pb::AuditRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let entries = audit_all(&server, pb::AuditRequest::default()).await;
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.action.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("Store", "OK"),
            ("Describe", "OK"),
            ("List", "OK"),
            ("Lease", "OK"),
            ("Get", "OK"),
            ("Get", "NOT_FOUND"),
            ("Rotate", "OK"),
            ("Revoke", "OK"),
            ("Audit", "OK"),
        ]
    );
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
    assert!(
        entries
            .windows(2)
            .all(|w| micros(&w[0].time) <= micros(&w[1].time))
    );
    let get = &entries[4];
    assert_eq!(
        (
            get.principal.as_str(),
            get.tenant.as_str(),
            get.name.as_str(),
            get.version,
            get.lease_id.as_str(),
            get.secret_id.as_str()
        ),
        (
            "agent",
            "acme",
            "k",
            1,
            grant.lease_id.as_str(),
            meta.id.as_str()
        )
    );
    assert_eq!(entries[5].reason, "lease used up");
    assert_eq!(entries[6].version, 2);
    let dump = format!("{entries:?}");
    assert!(!dump.contains(&grant.token));
    assert!(!dump.contains("sk-ant-api03") && !dump.contains("rotated-value"));

    // Filters.
    let by_agent = audit_all(
        &server,
        pb::AuditRequest {
            principal: "agent".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_agent.len(), 2);
    let gets = audit_all(
        &server,
        pb::AuditRequest {
            action: "get".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gets.len(), 2);
    let since = entries[6].time;
    let until = entries[8].time;
    let window = audit_all(
        &server,
        pb::AuditRequest {
            since,
            until,
            ..Default::default()
        },
    )
    .await;
    assert!(
        window
            .iter()
            .all(|e| micros(&e.time) >= micros(&since) && micros(&e.time) < micros(&until)),
        "{window:?}"
    );
    assert!(window.iter().any(|e| e.seq == 7) && !window.iter().any(|e| e.seq == 9));
    let mut auditor = server.as_(AUDITOR).await;
    let page = auditor
        .audit(pb::AuditRequest {
            page_size: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 4);
    let next = auditor
        .audit(pb::AuditRequest {
            page_size: 4,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.entries[0].seq, 5);
    assert_status(
        auditor
            .audit(pb::AuditRequest {
                action: "Delete".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "action",
    );
    assert_status(
        auditor
            .audit(pb::AuditRequest {
                page_token: "zz".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_status(
        auditor
            .audit(pb::AuditRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_size",
    );

    // A tenant-scoped auditor must name its tenant.
    let mut scoped = server.as_(ACME_AUDITOR).await;
    assert_status(
        scoped.audit(pb::AuditRequest::default()).await,
        Code::PermissionDenied,
        "set tenant",
    );
    assert_status(
        scoped
            .audit(pb::AuditRequest {
                tenant: "globex".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "no access to tenant globex",
    );
}

#[tokio::test]
async fn concurrent_stores_of_one_name_create_it_once() {
    let dir = TestDir::new();
    let server = dir.start();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let addr = server.addr;
            let value = format!("value-{i}-0123456789abcdef").into_bytes();
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                c.store(store_req("acme", "contended", &value))
                    .await
                    .map(|_| value)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(value) => winners.push(value),
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let got = lease_and_get(&server, "acme", "contended").await.unwrap();
    assert_eq!(got.value, winners[0]);
}
