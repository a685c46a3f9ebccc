//! Leases: issuing limits, redemption rules, the single answer for every failed redemption,
//! and atomic use under concurrency.

use std::time::Duration;

use byokd::api::v1::{self as pb};
use tonic::Code;

use crate::harness::*;

const VALUE: &[u8] = b"sk-proj-LEASEDVALUE-0123456789abcdefghij-z9y8";
const NO_LEASE: &str = "lease not found or no longer valid";

fn ttl(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

#[tokio::test]
async fn a_lease_gives_the_value_for_each_of_its_uses_then_nothing() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let meta = store(&mut orch, "acme", "k", VALUE).await;
    let before = std::time::SystemTime::now();
    let grant = lease_ok(&mut orch, lease_req("acme", "k", 3)).await;
    assert_eq!((grant.max_uses, grant.version), (3, 1));
    assert!(grant.token.starts_with("byokd_lt_") && grant.token.len() > 40);
    let expires = grant.expires_at.unwrap();
    let expires =
        std::time::UNIX_EPOCH + Duration::new(expires.seconds as u64, expires.nanos as u32);
    let ttl = expires.duration_since(before).unwrap();
    assert!(
        ttl >= Duration::from_secs(59) && ttl <= Duration::from_secs(75),
        "default ttl is 60 s: {ttl:?}"
    );

    let mut agent = server.as_(AGENT).await;
    for remaining in [2, 1, 0] {
        let v = agent.get(get_req(&grant.token)).await.unwrap().into_inner();
        assert_eq!(v.value, VALUE);
        assert_eq!(
            (
                v.tenant.as_str(),
                v.name.as_str(),
                v.provider.as_str(),
                v.version,
                v.lease_id.as_str(),
                v.remaining_uses
            ),
            (
                "acme",
                "k",
                "anthropic",
                1,
                grant.lease_id.as_str(),
                remaining
            )
        );
    }
    let used_up = assert_status(
        agent.get(get_req(&grant.token)).await,
        Code::NotFound,
        NO_LEASE,
    );
    // No oracle: an unknown, a malformed and a used-up token get the very same answer.
    let unknown = agent
        .get(get_req(&format!("byokd_lt_{}", "A".repeat(43))))
        .await
        .unwrap_err();
    let malformed = agent.get(get_req("not-a-token")).await.unwrap_err();
    for other in [&unknown, &malformed] {
        assert_eq!(
            (other.code(), other.message()),
            (used_up.code(), used_up.message())
        );
    }
    // The default is a single use.
    let once = lease_ok(&mut orch, lease_req("acme", "k", 0)).await;
    assert_eq!(once.max_uses, 1);
    agent.get(get_req(&once.token)).await.unwrap();
    assert_status(
        agent.get(get_req(&once.token)).await,
        Code::NotFound,
        NO_LEASE,
    );

    let reasons: Vec<String> = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .filter(|e| e.outcome != "OK")
    .map(|e| e.reason)
    .collect();
    assert_eq!(
        reasons,
        [
            "lease used up",
            "no such lease",
            "malformed token",
            "lease used up"
        ]
    );
    let _ = meta;
}

#[tokio::test]
async fn lease_requests_are_checked() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", VALUE).await;
    let cases = [
        (
            pb::LeaseRequest {
                ttl: ttl(15 * 60 + 1, 0),
                ..lease_req("acme", "k", 1)
            },
            Code::InvalidArgument,
            "ttl must be at most 15m",
        ),
        (
            pb::LeaseRequest {
                ttl: ttl(-5, 0),
                ..lease_req("acme", "k", 1)
            },
            Code::InvalidArgument,
            "ttl: must be positive",
        ),
        (
            pb::LeaseRequest {
                ttl: ttl(0, 0),
                ..lease_req("acme", "k", 1)
            },
            Code::InvalidArgument,
            "ttl: must be positive",
        ),
        (
            lease_req("acme", "k", 1001),
            Code::InvalidArgument,
            "max_uses must be at most 1000",
        ),
        (
            pb::LeaseRequest {
                audience: "nobody".into(),
                ..lease_req("acme", "k", 1)
            },
            Code::InvalidArgument,
            "audience: no such principal",
        ),
        (
            pb::LeaseRequest {
                audience: "bad id!".into(),
                ..lease_req("acme", "k", 1)
            },
            Code::InvalidArgument,
            "audience: only letters",
        ),
        (
            lease_req("acme", "missing", 1),
            Code::NotFound,
            "secret not found",
        ),
        (
            lease_req("acme", "bad name", 1),
            Code::InvalidArgument,
            "name: only letters",
        ),
        (
            lease_req("initech", "k", 1),
            Code::PermissionDenied,
            "no access to tenant initech",
        ),
    ];
    for (req, code, message) in cases {
        assert_status(orch.lease(req).await, code, message);
    }
    let max = orch
        .lease(pb::LeaseRequest {
            ttl: ttl(15 * 60, 0),
            ..lease_req("acme", "k", 1000)
        })
        .await
        .unwrap();
    assert_eq!(max.into_inner().max_uses, 1000);
}

#[tokio::test]
async fn an_expired_lease_gives_nothing() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", VALUE).await;
    let grant = lease_ok(
        &mut orch,
        pb::LeaseRequest {
            ttl: ttl(0, 300_000_000),
            ..lease_req("acme", "k", 5)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_status(
        redeem(&server, AGENT, &grant.token).await,
        Code::NotFound,
        NO_LEASE,
    );
    let last = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(last.last().unwrap().reason, "lease expired");
}

#[tokio::test]
async fn an_audience_restricted_lease_serves_only_its_audience() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", VALUE).await;
    let grant = lease_ok(
        &mut orch,
        pb::LeaseRequest {
            audience: "agent".into(),
            ..lease_req("acme", "k", 1)
        },
    )
    .await;
    assert_status(
        redeem(&server, AGENT2, &grant.token).await,
        Code::NotFound,
        NO_LEASE,
    );
    // The refused attempt did not consume the single use.
    assert_eq!(
        redeem(&server, AGENT, &grant.token).await.unwrap().value,
        VALUE
    );
    let gets = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gets[0].reason, "caller is not the lease's audience");
    assert_eq!(gets[0].principal, "agent2");
}

#[tokio::test]
async fn a_reader_cannot_redeem_a_lease_of_a_tenant_it_lacks() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "globex", "k", VALUE).await;
    let grant = lease_ok(&mut orch, lease_req("globex", "k", 1)).await;
    // agent2 is a reader of acme only.
    assert_status(
        redeem(&server, AGENT2, &grant.token).await,
        Code::NotFound,
        NO_LEASE,
    );
    assert_eq!(
        redeem(&server, AGENT, &grant.token).await.unwrap().value,
        VALUE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redemptions_of_a_single_use_lease_have_exactly_one_winner() {
    // 155 losing redemptions from one peer: more than the brute-force limit lets through.
    let dir = TestDir::with_config(
        "[limits]\nfailed_get_rate_limit = { per_second = 1000, burst = 1000 }\n",
    );
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", VALUE).await;
    for round in 0..5 {
        let grant = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
        let mut clients = Vec::new();
        for _ in 0..32 {
            clients.push(connect(server.addr, Some(AGENT)).await);
        }
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                let token = grant.token.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    c.get(get_req(&token)).await
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(v) => {
                    assert_eq!(v.into_inner().value, VALUE);
                    wins += 1;
                }
                Err(status) => assert_eq!(
                    (status.code(), status.message()),
                    (Code::NotFound, NO_LEASE)
                ),
            }
        }
        assert_eq!(wins, 1, "round {round}");
    }
    let ok_gets = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .filter(|e| e.outcome == "OK")
    .count();
    assert_eq!(ok_gets, 5);
}

#[tokio::test]
async fn a_multi_use_lease_under_concurrency_serves_exactly_its_uses() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", VALUE).await;
    let grant = lease_ok(&mut orch, lease_req("acme", "k", 7)).await;
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let addr = server.addr;
            let token = grant.token.clone();
            tokio::spawn(async move { connect(addr, Some(AGENT)).await.get(get_req(&token)).await })
        })
        .collect();
    let mut remaining = Vec::new();
    for t in tasks {
        if let Ok(v) = t.await.unwrap() {
            remaining.push(v.into_inner().remaining_uses);
        }
    }
    remaining.sort_unstable();
    assert_eq!(remaining, [0, 1, 2, 3, 4, 5, 6]);
}

#[tokio::test]
async fn expired_leases_are_collected_in_the_background() {
    let dir = TestDir::with_config("[lease]\ngc_interval = \"200ms\"\n");
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", VALUE).await;
    let short = lease_ok(
        &mut orch,
        pb::LeaseRequest {
            ttl: ttl(0, 100_000_000),
            ..lease_req("acme", "k", 1)
        },
    )
    .await;
    let long = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
    // Revoking by id finds a lease until it has been collected.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match orch.revoke(revoke_lease(&short.lease_id)).await {
            Err(status) if status.code() == Code::NotFound => break,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expired lease was not collected: {other:?}"),
        }
    }
    assert!(
        !orch
            .revoke(revoke_lease(&long.lease_id))
            .await
            .unwrap()
            .into_inner()
            .already_revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_redemption_gets_exactly_the_same_answer() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    for (tenant, name) in [
        ("acme", "k"),
        ("acme", "rotated"),
        ("acme", "revoked"),
        ("globex", "k"),
    ] {
        store(&mut orch, tenant, name, VALUE).await;
    }
    let used = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
    redeem(&server, AGENT, &used.token).await.unwrap();
    let unknown = {
        let fresh = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
        let mut t = fresh.token.clone();
        let last = t.pop().unwrap();
        t.push(if last == 'A' { 'B' } else { 'A' });
        t
    };
    let expired = lease_ok(
        &mut orch,
        pb::LeaseRequest {
            ttl: ttl(0, 200_000_000),
            ..lease_req("acme", "k", 5)
        },
    )
    .await;
    let audience = lease_ok(
        &mut orch,
        pb::LeaseRequest {
            audience: "agent".into(),
            ..lease_req("acme", "k", 5)
        },
    )
    .await;
    let other_tenant = lease_ok(&mut orch, lease_req("globex", "k", 5)).await;
    let rotated = lease_ok(&mut orch, lease_req("acme", "rotated", 5)).await;
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "rotated".into(),
        value: b"sk-proj-ROTATED-0123456789abcdefghij".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let revoked_lease = lease_ok(&mut orch, lease_req("acme", "k", 5)).await;
    orch.revoke(revoke_lease(&revoked_lease.lease_id))
        .await
        .unwrap();
    let revoked_secret = lease_ok(&mut orch, lease_req("acme", "revoked", 5)).await;
    orch.revoke(revoke_secret("acme", "revoked", "gone"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let cases: [(&str, &str, &str); 10] = [
        ("used up", AGENT, &used.token),
        ("unknown", AGENT, &unknown),
        ("malformed", AGENT, "not-a-lease-token"),
        ("empty", AGENT, ""),
        ("expired", AGENT, &expired.token),
        ("another audience", AGENT2, &audience.token),
        ("another tenant", AGENT2, &other_tenant.token),
        ("rotated", AGENT, &rotated.token),
        ("lease revoked", AGENT, &revoked_lease.token),
        ("secret revoked", AGENT, &revoked_secret.token),
    ];
    for (why, principal, token) in cases {
        let status = redeem(&server, principal, token).await.expect_err(why);
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, NO_LEASE),
            "{why}"
        );
        assert!(status.details().is_empty(), "{why}: details");
        assert!(
            status
                .metadata()
                .keys()
                .all(|k| matches!(k, tonic::metadata::KeyRef::Ascii(k) if k.as_str() == "content-type" || k.as_str() == "date")),
            "{why}: {:?}",
            status.metadata()
        );
    }
    // The reasons are in the audit trail, not in the answers.
    let failed = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            outcome: "NOT_FOUND".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failed.len(), 10, "{failed:?}");
    let reasons: std::collections::BTreeSet<&str> =
        failed.iter().map(|e| e.reason.as_str()).collect();
    assert!(reasons.len() >= 6, "{reasons:?}");
}
