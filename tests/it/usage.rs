//! The secrets' use (issue 18, item 1): `SecretMetadata.usage` and `GetUsage`, counted as
//! each Lease and Get commits and recounted here from the audit trail, on both engines.

use std::collections::BTreeMap;

use crate::harness::*;
use crate::key_life::{on_both_engines, on_postgres, on_sled};
use byokd::api::v1 as pb;
use tonic::Code;

on_both_engines!(
    usage_counts_every_lease_and_get_and_agrees_with_the_trail,
    get_usage_reports_days_secrets_and_principals_to_auditors_and_writers,
);

/// What the trail says a secret was used for.
async fn recount(server: &TestServer, tenant: &str, id: &str) -> pb::SecretUsage {
    let entries = audit_all(
        server,
        pb::AuditRequest {
            tenant: tenant.into(),
            ..Default::default()
        },
    )
    .await;
    recount_uses(&entries, id)
}

fn usage_of(meta: &pb::SecretMetadata) -> pb::SecretUsage {
    meta.usage.clone().expect("usage is answered")
}

async fn usage_counts_every_lease_and_get_and_agrees_with_the_trail(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let stored = orch
        .store(store_req("acme", "counted", b"counted-value-00001"))
        .await
        .expect("store")
        .into_inner();
    assert_eq!(usage_of(&stored), pb::SecretUsage::default());
    // Two uses for the agent, a third refused; a lease for agent2 that the agent cannot use.
    let twice = lease_ok(&mut orch, lease_req("acme", "counted", 2)).await;
    for _ in 0..2 {
        redeem(server, AGENT, &twice.token).await.expect("get");
    }
    assert_status(
        redeem(server, AGENT, &twice.token).await,
        Code::NotFound,
        "",
    );
    let mut for_agent2 = lease_req("acme", "counted", 1);
    for_agent2.audience = "agent2".into();
    let for_agent2 = lease_ok(&mut orch, for_agent2).await;
    assert_status(
        redeem(server, AGENT, &for_agent2.token).await,
        Code::NotFound,
        "",
    );
    redeem(server, AGENT2, &for_agent2.token)
        .await
        .expect("audience");
    // What does not count: a Describe, a Lease refused, a Get of a token no lease has.
    store(&mut orch, "acme", "other", b"counted-value-00002").await;
    orch.revoke(revoke_secret("acme", "other", "gone"))
        .await
        .expect("revoke");
    assert_status(
        orch.lease(lease_req("acme", "other", 1)).await,
        Code::FailedPrecondition,
        "",
    );
    assert_status(
        redeem(
            server,
            AGENT,
            "bl_not-a-real-token-0000000000000000000000000",
        )
        .await,
        Code::NotFound,
        "",
    );
    let described = orch
        .describe(secret_ref("acme", "counted"))
        .await
        .expect("describe")
        .into_inner();
    let usage = usage_of(&described);
    assert_eq!(
        (
            usage.leases_issued,
            usage.redemptions,
            usage.failed_redemptions
        ),
        (2, 3, 2)
    );
    assert_eq!(usage.last_redeemed_by, "agent2");
    assert!(micros(&usage.last_leased_at) <= micros(&usage.last_redeemed_at));
    // The trail says the same, to the microsecond.
    assert_eq!(recount(server, "acme", &described.id).await, usage);
    // A Rotate keeps the secret (and its use); List answers it too.
    let rotated = orch
        .rotate(pb::RotateRequest {
            tenant: "acme".into(),
            name: "counted".into(),
            value: b"counted-value-00003".to_vec(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(usage_of(&rotated), usage);
    lease_and_get(server, "acme", "counted")
        .await
        .expect("new version");
    let listed = orch
        .list(pb::ListRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let counted = listed
        .secrets
        .iter()
        .find(|s| s.name == "counted")
        .expect("listed");
    let after = usage_of(counted);
    assert_eq!(
        (
            after.leases_issued,
            after.redemptions,
            after.last_redeemed_by.as_str()
        ),
        (3, 4, "agent")
    );
    let revoked = listed.secrets.iter().find(|s| s.name == "other").unwrap();
    assert_eq!(usage_of(revoked), pb::SecretUsage::default());
    assert_eq!(recount(server, "acme", &counted.id).await, after);
    assert_eq!(after.failed_redemptions, 2);
}

fn usage_req(tenant: &str, name: &str, by_principal: bool) -> pb::GetUsageRequest {
    pb::GetUsageRequest {
        tenant: tenant.into(),
        name: name.into(),
        group_by_principal: by_principal,
        ..Default::default()
    }
}

/// The report's counts summed by (secret id, principal): (leases, redemptions, failed).
fn summed(report: &pb::UsageReport) -> BTreeMap<(String, String), (u64, u64, u64)> {
    let mut sums = BTreeMap::new();
    for b in &report.buckets {
        let day = b.day.as_ref().expect("day");
        assert_eq!(
            (day.seconds % 86_400, day.nanos),
            (0, 0),
            "a bucket's day is midnight UTC"
        );
        let sum: &mut (u64, u64, u64) = sums
            .entry((b.secret_id.clone(), b.principal.clone()))
            .or_default();
        sum.0 += b.leases;
        sum.1 += b.redemptions;
        sum.2 += b.failed_redemptions;
    }
    sums
}

async fn get_usage_reports_days_secrets_and_principals_to_auditors_and_writers(
    server: &TestServer,
) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut admin = server.as_(ADMIN).await;
    let first = store(&mut orch, "acme", "billed", b"billed-value-000001").await;
    let grant = lease_ok(&mut orch, lease_req("acme", "billed", 3)).await;
    redeem(server, AGENT, &grant.token).await.expect("get");
    redeem(server, AGENT2, &grant.token).await.expect("get");
    lease_and_get(server, "acme", "billed").await.expect("get");
    let other = store(&mut orch, "acme", "elsewhere", b"billed-value-000002").await;
    lease_and_get(server, "acme", "elsewhere")
        .await
        .expect("get");
    // A name purged and stored again is another secret: buckets of its own.
    admin
        .purge(pb::PurgeRequest {
            tenant: "acme".into(),
            name: "billed".into(),
            reason: "erasure".into(),
        })
        .await
        .expect("purge");
    let second = store(&mut orch, "acme", "billed", b"billed-value-000003").await;
    lease_and_get(server, "acme", "billed").await.expect("get");
    let mut auditor = server.as_(ACME_AUDITOR).await;
    let report = auditor
        .get_usage(usage_req("acme", "billed", false))
        .await
        .expect("usage")
        .into_inner();
    assert!(
        report
            .buckets
            .iter()
            .all(|b| b.name == "billed" && b.tenant == "acme" && b.principal.is_empty())
    );
    let sums = summed(&report);
    assert_eq!(
        sums,
        BTreeMap::from([
            ((first.id.clone(), String::new()), (2, 3, 0)),
            ((second.id.clone(), String::new()), (1, 1, 0)),
        ])
    );
    // Per principal: whose Leases and Gets they were.
    let by_principal = orch
        .get_usage(usage_req("acme", "billed", true))
        .await
        .expect("a writer reads usage too")
        .into_inner();
    let of_first: BTreeMap<String, (u64, u64, u64)> = summed(&by_principal)
        .into_iter()
        .filter(|((id, _), _)| *id == first.id)
        .map(|((_, who), sum)| (who, sum))
        .collect();
    assert_eq!(
        of_first,
        BTreeMap::from([
            ("agent".to_string(), (0, 2, 0)),
            ("agent2".to_string(), (0, 1, 0)),
            ("orchestrator".to_string(), (2, 0, 0)),
        ])
    );
    // The whole tenant: every secret used; the buckets are ordered.
    let tenant = auditor
        .get_usage(usage_req("acme", "", false))
        .await
        .expect("usage")
        .into_inner();
    let sums = summed(&tenant);
    assert_eq!(sums[&(other.id.clone(), String::new())], (1, 1, 0));
    assert_eq!(sums[&(first.id.clone(), String::new())], (2, 3, 0));
    let order: Vec<_> = tenant
        .buckets
        .iter()
        .map(|b| (micros(&b.day), b.name.clone(), b.secret_id.clone()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    // A range before any use: no bucket.
    let old = pb::GetUsageRequest {
        from: Some(prost_types::Timestamp {
            seconds: 86_400 * 10,
            nanos: 0,
        }),
        to: Some(prost_types::Timestamp {
            seconds: 86_400 * 20,
            nanos: 0,
        }),
        ..usage_req("acme", "", true)
    };
    let empty = auditor.get_usage(old.clone()).await.expect("usage");
    assert!(empty.into_inner().buckets.is_empty());
    // Refusals: a reader, another tenant's writer, a range backwards or over a year, a key
    // pasted as the name.
    assert_status(
        server
            .as_(AGENT)
            .await
            .get_usage(usage_req("acme", "", false))
            .await,
        Code::PermissionDenied,
        "",
    );
    assert_status(
        server
            .as_(GLOBEX_WRITER)
            .await
            .get_usage(usage_req("acme", "billed", false))
            .await,
        Code::PermissionDenied,
        "",
    );
    let backwards = pb::GetUsageRequest {
        from: old.to,
        to: old.from,
        ..old.clone()
    };
    assert_status(
        auditor.get_usage(backwards).await,
        Code::InvalidArgument,
        "from: after to",
    );
    let too_long = pb::GetUsageRequest {
        to: Some(prost_types::Timestamp {
            seconds: 86_400 * 400,
            nanos: 0,
        }),
        ..old
    };
    assert_status(
        auditor.get_usage(too_long).await,
        Code::InvalidArgument,
        "from: a report covers at most 366 days",
    );
    let pasted = format!("sk-ant-api03-{}", &"aB3dE5gH7jK9mN1pQ2rS".repeat(5)[..95]);
    remember_secret(pasted.as_bytes());
    assert_status(
        auditor.get_usage(usage_req("acme", &pasted, false)).await,
        Code::InvalidArgument,
        "looks like an API key",
    );
    // Each request is audited with the target it named, denied or not.
    let audited = audit_all(
        server,
        pb::AuditRequest {
            tenant: "acme".into(),
            action: "GetUsage".into(),
            ..Default::default()
        },
    )
    .await;
    let outcomes: Vec<_> = audited.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "OK").count(),
        4,
        "{outcomes:?}"
    );
    assert!(outcomes.contains(&"PERMISSION_DENIED"));
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == "INVALID_ARGUMENT")
            .count(),
        3
    );
    assert!(audited.iter().all(|e| !e.name.contains("sk-ant")));
}
