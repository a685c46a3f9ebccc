//! Refused requests: every denied attempt is audited with the target it named; live audit
//! streams are capped; and the low findings of the second hardening round (sequence numbers
//! past the head, rotation status scope and job ids, data directory permissions, the
//! failed-Get limit's key, malformed messages).

use std::time::Duration;

use byokd::api::v1::{self as pb};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::harness::*;

const VALUE: &[u8] = b"sk-refusals-0123456789abcdefghij";

/// The last audit entry of `action`, as the global auditor sees it.
async fn last_entry(server: &TestServer, action: &str) -> pb::AuditEntry {
    audit_all(
        server,
        pb::AuditRequest {
            action: action.into(),
            ..Default::default()
        },
    )
    .await
    .pop()
    .unwrap_or_else(|| panic!("no {action} entry"))
}

#[track_caller]
fn targets(entry: &pb::AuditEntry, outcome: &str, tenant: &str, name: &str) {
    assert_eq!(
        (
            entry.outcome.as_str(),
            entry.tenant.as_str(),
            entry.name.as_str()
        ),
        (outcome, tenant, name),
        "{entry:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_requests_are_audited_with_the_target_they_named() {
    let dir = TestDir::with_config(
        "[limits]\nfailed_get_rate_limit = { per_second = 0.01, burst = 2 }\n",
    );
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "target", VALUE).await;
    store(&mut orch, "globex", "other", VALUE).await;
    let grant = lease_ok(&mut orch, lease_req("acme", "target", 1)).await;

    // No token, a bad token, a role or a tenant the principal lacks: the target is recorded.
    let mut anonymous = server.client(None).await;
    assert_status(
        anonymous.store(store_req("acme", "target", VALUE)).await,
        Code::Unauthenticated,
        "",
    );
    targets(
        &last_entry(&server, "Store").await,
        "UNAUTHENTICATED",
        "acme",
        "target",
    );
    let mut wrong = server.as_("tok-nobody-at-all").await;
    assert_status(
        wrong.describe(secret_ref("acme", "target")).await,
        Code::Unauthenticated,
        "",
    );
    targets(
        &last_entry(&server, "Describe").await,
        "UNAUTHENTICATED",
        "acme",
        "target",
    );
    let mut agent = server.as_(AGENT).await;
    assert_status(
        agent.lease(lease_req("acme", "target", 1)).await,
        Code::PermissionDenied,
        "",
    );
    targets(
        &last_entry(&server, "Lease").await,
        "PERMISSION_DENIED",
        "acme",
        "target",
    );
    let mut globex = server.as_(GLOBEX_WRITER).await;
    assert_status(
        globex
            .list(pb::ListRequest {
                tenant: "acme".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "",
    );
    targets(
        &last_entry(&server, "List").await,
        "PERMISSION_DENIED",
        "acme",
        "",
    );
    let mut acme_auditor = server.as_(ACME_AUDITOR).await;
    assert_status(
        acme_auditor
            .audit(pb::AuditRequest {
                tenant: "globex".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "",
    );
    targets(
        &last_entry(&server, "Audit").await,
        "PERMISSION_DENIED",
        "globex",
        "",
    );

    // A valid lease token presented without credentials: the lease it names.
    assert_status(
        anonymous.get(get_req(&grant.token)).await,
        Code::Unauthenticated,
        "",
    );
    let entry = last_entry(&server, "Get").await;
    targets(&entry, "UNAUTHENTICATED", "acme", "target");
    assert_eq!(entry.lease_id, grant.lease_id);
    // A lease of another tenant revoked by id.
    assert_status(
        globex.revoke(revoke_lease(&grant.lease_id)).await,
        Code::NotFound,
        "",
    );
    let entry = last_entry(&server, "Revoke").await;
    targets(&entry, "NOT_FOUND", "acme", "target");
    assert_eq!(entry.lease_id, grant.lease_id);
    // A Get refused for too many failed redemptions, with a valid token.
    for _ in 0..2 {
        let _ = agent.get(get_req("byokd_lt_not-a-real-token")).await;
    }
    assert_status(
        agent.get(get_req(&grant.token)).await,
        Code::ResourceExhausted,
        "",
    );
    let entry = last_entry(&server, "Get").await;
    targets(&entry, "RESOURCE_EXHAUSTED", "acme", "target");
    assert_eq!(entry.lease_id, grant.lease_id);

    // An invalid target is recorded as invalid, never verbatim.
    let long = "n".repeat(300);
    assert_status(
        anonymous.describe(secret_ref("acme", &long)).await,
        Code::Unauthenticated,
        "",
    );
    let entry = last_entry(&server, "Describe").await;
    targets(&entry, "UNAUTHENTICATED", "acme", "");
    assert!(entry.reason.contains("invalid name"), "{entry:?}");
    assert!(!entry.reason.contains(&long[..200]), "{entry:?}");

    // The tenant's own auditor sees the attempts on its tenant.
    let seen = {
        let mut out = Vec::new();
        let mut req = pb::AuditRequest {
            tenant: "acme".into(),
            ..Default::default()
        };
        loop {
            let page = acme_auditor.audit(req.clone()).await.unwrap().into_inner();
            out.extend(page.entries);
            if page.next_page_token.is_empty() {
                break out;
            }
            req.page_token = page.next_page_token;
        }
    };
    for outcome in [
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
    ] {
        assert!(
            seen.iter().any(|e| e.outcome == outcome),
            "{outcome} missing from {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_audit_streams_are_capped_per_principal_and_in_all() {
    let dir = TestDir::with_config(
        "[limits]\nmax_watch_streams_per_principal = 2\nmax_watch_streams = 3\n",
    );
    let server = dir.start();
    let watch = |tenant: &str| pb::WatchAuditRequest {
        tenant: tenant.into(),
        ..Default::default()
    };
    let mut acme = server.as_(ACME_AUDITOR).await;
    let first = acme.watch_audit(watch("acme")).await.unwrap().into_inner();
    let second = acme.watch_audit(watch("acme")).await.unwrap().into_inner();
    assert_status(
        acme.watch_audit(watch("acme")).await,
        Code::ResourceExhausted,
        "for this principal",
    );
    let mut global = server.as_(AUDITOR).await;
    let third = global.watch_audit(watch("")).await.unwrap().into_inner();
    assert_status(
        global.watch_audit(watch("")).await,
        Code::ResourceExhausted,
        "in all",
    );
    // A stream that ends gives its place back.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        match acme.watch_audit(watch("acme")).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(std::time::Instant::now() < deadline, "place not given back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // The streams still work.
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "watched",
        VALUE,
    )
    .await;
    let entry = tokio::time::timeout(Duration::from_secs(10), again.next())
        .await
        .expect("an entry")
        .expect("stream open")
        .expect("entry");
    assert_eq!(entry.tenant, "acme");
    drop((second, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_past_the_head_are_out_of_range_not_a_broken_chain() {
    let dir = TestDir::new();
    let server = dir.start();
    store(&mut server.as_(ORCHESTRATOR).await, "acme", "k", VALUE).await;
    let mut auditor = server.as_(AUDITOR).await;
    let head = auditor
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .head_seq;
    assert_status(
        auditor
            .verify_audit(pb::VerifyAuditRequest {
                from_seq: head + 1000,
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "past the audit trail's head",
    );
    let entry = last_entry(&server, "VerifyAudit").await;
    assert_eq!(entry.outcome, "OUT_OF_RANGE", "{entry:?}");
    assert!(!entry.reason.contains("broken"), "{entry:?}");
    // From the entry right after the head: nothing to check, and intact.
    let report = auditor
        .verify_audit(pb::VerifyAuditRequest {
            from_seq: head + 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
    let started = std::time::Instant::now();
    assert_status(
        auditor
            .watch_audit(pb::WatchAuditRequest {
                from_seq: head + 1_000_000,
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "past the audit trail's head",
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_status_needs_all_tenants_and_a_valid_job_id() {
    remember_secret(b"tok-acme-admin-0123");
    let dir = TestDir::with_config(&format!(
        "[[principal]]\nid = \"acme-admin\"\ntoken_sha256 = \"{}\"\nroles = [\"admin\"]\ntenants = [\"acme\"]\n",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            b"tok-acme-admin-0123"
        ))
    ));
    let server = dir.start();
    assert_status(
        server
            .as_("tok-acme-admin-0123")
            .await
            .get_rotation_status(pb::GetRotationStatusRequest::default())
            .await,
        Code::PermissionDenied,
        "needs access to all tenants",
    );
    let long = "j".repeat(10_000);
    let status = assert_status(
        server
            .as_(ADMIN)
            .await
            .get_rotation_status(pb::GetRotationStatusRequest {
                job_id: long.clone(),
            })
            .await,
        Code::InvalidArgument,
        "job_id",
    );
    assert!(status.message().len() < 200, "{status:?}");
    let entry = last_entry(&server, "GetRotationStatus").await;
    assert!(
        entry.reason.len() < 200 && !entry.reason.contains(&long[..100]),
        "{entry:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readable_data_directory_is_made_private_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    // A data directory made by hand, and a file an older byokd (or sled) left 0644.
    std::fs::create_dir(dir.data()).unwrap();
    std::fs::set_permissions(dir.data(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = dir.start();
    store(&mut server.as_(ORCHESTRATOR).await, "acme", "k", VALUE).await;
    assert!(server.stop().await.success());
    let stray = dir.data().join("db").join("conf");
    std::fs::set_permissions(&stray, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.data(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = dir.start();
    assert!(
        server
            .log()
            .contains("took group and other permissions off")
    );
    store(&mut server.as_(ORCHESTRATOR).await, "acme", "k2", VALUE).await;
    let mut pending = vec![dir.data()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
        seen += 1;
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(seen > 5, "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principals_bad_guesses_do_not_lock_out_anothers_gets_from_the_same_host() {
    let dir = TestDir::with_config(
        "[limits]\nfailed_get_rate_limit = { per_second = 0.01, burst = 3 }\n",
    );
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", VALUE).await;
    let mut agent = server.as_(AGENT).await;
    for _ in 0..5 {
        let _ = agent.get(get_req("byokd_lt_guessing-guessing")).await;
    }
    let grant = lease_ok(&mut orch, lease_req("acme", "k", 2)).await;
    // The guesser is cut off, even with a valid token...
    assert_status(
        agent.get(get_req(&grant.token)).await,
        Code::ResourceExhausted,
        "",
    );
    // ... the other principal on the same host is not.
    assert_eq!(
        redeem(&server, AGENT2, &grant.token).await.unwrap().value,
        VALUE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_message_is_invalid_argument() {
    let dir = TestDir::new();
    let server = dir.start();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}/byokd.v1.Vault/Describe", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {ORCHESTRATOR}"))
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    // A gRPC frame whose message is not protobuf (a field tag of 0 is invalid).
    let message = [0u8, 0, 0, 0, 3, 0x00, 0xff, 0xff];
    body.send_data(bytes::Bytes::copy_from_slice(&message), true)
        .unwrap();
    let response = response.await.unwrap();
    let status = match response.headers().get("grpc-status") {
        Some(code) => code.to_str().unwrap().to_string(),
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.unwrap().expect("trailers");
            trailers["grpc-status"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(status, (Code::InvalidArgument as i32).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_text_refuses_line_separators_and_invisible_formatting() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut admin = server.as_(ADMIN).await;
    store(&mut admin, "t1", "s", b"v").await;
    for reason in [
        "leaked\u{2028}{\"action\":\"Get\"}",
        "ok\u{2029}",
        "rotated by \u{202E}nimda",
        "a\u{2066}b\u{2069}",
        "zero\u{200B}width",
        "bom\u{FEFF}",
        "next\u{85}line",
        "tag\u{E0041}",
    ] {
        assert_status(
            admin.revoke(revoke_secret("t1", "s", reason)).await,
            Code::InvalidArgument,
            "reason",
        );
    }
    let mut labelled = store_req("t1", "l", b"v");
    labelled.labels.insert("team".into(), "a\u{200D}b".into());
    assert_status(admin.store(labelled).await, Code::InvalidArgument, "labels");
    // Text in other scripts is fine.
    admin
        .revoke(revoke_secret("t1", "s", "Schlüssel geleakt — 鍵が漏れた"))
        .await
        .expect("a reason in any script");
    server.stop().await;

    // The export has one entry per line, whichever characters a reader splits lines on.
    let text = export_jsonl(&dir);
    let pieces: Vec<&str> = text
        .split(['\n', '\r', '\u{2028}', '\u{2029}', '\u{85}'])
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(pieces.len(), text.lines().count());
    let entries: Vec<serde_json::Value> = pieces
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is one entry"))
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e["reason"] == "Schlüssel geleakt — 鍵が漏れた")
    );
    assert!(
        entries
            .iter()
            .filter(|e| e["outcome"] == "INVALID_ARGUMENT")
            .count()
            >= 9
    );
}
