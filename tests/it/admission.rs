//! Admission under attack, on loopback: stalled streams, idle connections and floods without
//! credentials do not starve an authenticated caller, do not break the store, and do not fill
//! the audit trail. The attacks are `byokd-attack`'s (bounded in count and time); each test
//! checks what the victim got done meanwhile and what the server counted.

use std::time::Duration;

use byokd::api::v1::{self as pb};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::*;

/// Runs `byokd-attack ARGS` against `server` as the admin victim; its report.
fn attack(server: &TestServer, dir: &TestDir, args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_byokd-attack"))
        .args(["--target", &server.addr.to_string(), "--token", ADMIN])
        .arg("--data-dir")
        .arg(dir.data())
        .args(args)
        .output()
        .expect("run byokd-attack");
    assert!(
        out.status.success(),
        "byokd-attack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

fn victim_ok(report: &Value) -> u64 {
    report["victim_ok"].as_u64().expect("victim_ok")
}

fn answers(report: &Value, code: &str) -> u64 {
    report["attack_answers"][code].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_without_a_token_take_no_slot_and_are_cut_off() {
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\nmax_concurrent_requests = 64\nrequest_body_timeout = \"1s\"\n",
    );
    let server = dir.start();
    let ops = ops_addr(&server);

    // One connection gets 64 streams at most.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (_client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let streams = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| {
            use std::future::Future;
            if let std::task::Poll::Ready(ended) = std::pin::Pin::new(&mut connection).poll(cx) {
                panic!("connection ended: {ended:?}");
            }
            // usize::MAX until the server's SETTINGS arrive.
            match connection.max_concurrent_send_streams() {
                usize::MAX => std::task::Poll::Pending,
                n => std::task::Poll::Ready(n),
            }
        }),
    )
    .await
    .expect("the server's settings");
    assert_eq!(streams, 64);

    // Two connections keep as many header-only streams open as they may: before, each took a
    // slot of max_concurrent_requests until the request timed out.
    let report = attack(
        &server,
        &dir,
        &[
            "--duration",
            "4s",
            "--victims",
            "2",
            "stall",
            "--connections",
            "2",
            "--streams",
            "256",
        ],
    );
    assert!(victim_ok(&report) >= 20, "{report}");
    assert_eq!(report["victim_errors"], serde_json::json!({}), "{report}");
    // A health check on the main port during an attack too.
    assert_eq!(
        health(&server.addr.to_string(), "").await.unwrap(),
        ServingStatus::Serving
    );
    // The stalled streams were answered: cut off at the body deadline or refused at once.
    let cut = answers(&report, "DEADLINE_EXCEEDED");
    let refused = answers(&report, "RESOURCE_EXHAUSTED");
    assert!(cut > 0 && refused > 0, "{report}");
    let text = scrape(&ops).await;
    assert!(
        sample(
            &text,
            "byokd_admission_refused_total{reason=\"body_timeout\"}"
        ) >= cut as f64,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "byokd_admission_refused_total{reason=\"unauthenticated_rate\"}"
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed_and_the_store_keeps_its_descriptors() {
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\nhandshake_timeout = \"1s\"\n\
         [store]\naudit_segment_kb = 64\n",
    );
    // A small open-files limit: 400 idle connections would exhaust it.
    let server = dir.start_with_open_files(400);
    let ops = ops_addr(&server);
    assert!(
        server
            .log()
            .contains("connections are refused once this many files are open"),
        "the store keeps a reserve"
    );
    let segments_before = audit_segments(&dir);
    let report = attack(
        &server,
        &dir,
        &[
            "--duration",
            "5s",
            "--victims",
            "2",
            "idle",
            "--connections",
            "600",
        ],
    );
    let opened = report["attack_counts"]["connections_opened"]
        .as_u64()
        .unwrap();
    let closed = report["attack_counts"]["connections_closed_by_server"]
        .as_u64()
        .unwrap();
    assert_eq!(opened, 600, "{report}");
    assert_eq!(closed, opened, "every idle connection closed: {report}");
    assert!(victim_ok(&report) >= 20, "{report}");
    assert_eq!(report["victim_errors"], serde_json::json!({}), "{report}");
    // The victim's entries started new segments meanwhile: the store opened files.
    assert!(audit_segments(&dir) > segments_before, "no segment rolled");
    let text = scrape(&ops).await;
    for reason in ["open_files", "handshake_timeout"] {
        assert!(
            sample(
                &text,
                &format!("byokd_connections_dropped_total{{reason=\"{reason}\"}}")
            ) > 0.0,
            "{reason}: {text}"
        );
    }
    assert_eq!(health(&ops, "").await.unwrap(), ServingStatus::Serving);
    server
        .as_(ORCHESTRATOR)
        .await
        .store(store_req("acme", "after-idle", b"sk-after-idle-0123456789"))
        .await
        .expect("the store still writes");
}

fn audit_segments(dir: &TestDir) -> usize {
    std::fs::read_dir(dir.data().join("db").join("audit"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some(std::ffi::OsStr::new("log")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_without_credentials_is_refused_and_recorded_per_host_not_per_request() {
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\nunauthenticated_rate_limit = { per_second = 5, burst = 10 }\n\
         refused_audit_interval = \"1s\"\n",
    );
    let server = dir.start();
    let ops = ops_addr(&server);
    let report = attack(
        &server,
        &dir,
        &[
            "--duration",
            "3s",
            "--victims",
            "1",
            "flood",
            "--concurrency",
            "8",
        ],
    );
    assert!(victim_ok(&report) >= 10, "{report}");
    assert_eq!(report["victim_errors"], serde_json::json!({}), "{report}");
    // Within the rate: answered (and audited) one by one; beyond: refused at once.
    let audited = answers(&report, "UNAUTHENTICATED");
    let refused = answers(&report, "RESOURCE_EXHAUSTED");
    assert!(audited <= 10 + 5 * 4, "{report}");
    assert!(refused > 10 * audited, "{report}");
    assert_eq!(
        sample(
            &scrape(&ops).await,
            "byokd_admission_refused_total{reason=\"unauthenticated_rate\"}"
        ),
        refused as f64
    );
    // Security still sees the refused requests: one entry per host and interval, with counts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let throttled = loop {
        let entries = audit_all(
            &server,
            pb::AuditRequest {
                action: "Throttled".into(),
                ..Default::default()
            },
        )
        .await;
        let counted: u64 = entries
            .iter()
            .map(|e| {
                e.reason
                    .strip_prefix("refused ")
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .expect("a count")
            })
            .sum();
        if counted == refused {
            break entries;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{counted} of {refused} refusals recorded: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        throttled
            .iter()
            .all(|e| e.peer == "127.0.0.1" && e.outcome == "RESOURCE_EXHAUSTED"),
        "{throttled:?}"
    );
    assert!(throttled.len() <= 6, "one per interval: {throttled:?}");
    let unauthenticated = audit_all(
        &server,
        pb::AuditRequest {
            outcome: "UNAUTHENTICATED".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(unauthenticated.len() as u64, audited);
}
