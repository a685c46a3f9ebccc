//! The command line: configuration errors, the embedded default, shutdown, and logs that
//! never carry a secret.

use std::process::Command;

use byokd::api::v1::{self as pb};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::harness::*;

fn byokd(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(args)
        .current_dir(cwd)
        .env_remove("BYOKD_CONFIG")
        .output()
        .expect("run byokd")
}

#[test]
fn invalid_configuration_is_a_clear_error_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("listen = 5\n", "invalid type"),
        (
            "listen = \"127.0.0.1:1\"\nmystery = true\n",
            "unknown field `mystery`",
        ),
        (
            "[lease]\nmax_ttl = \"soon\"\n",
            "line 2: max_ttl = \"soon\"",
        ),
        (
            "[[principal]]\nid = \"p\"\ntoken_sha256 = \"00\"\nroles = [\"admin\"]\ntenants = [\"*\"]\n",
            "token_sha256 must be 64 hex digits",
        ),
        (
            "[store]\nkind = \"cassandra\"\n",
            "store.kind: unknown engine \"cassandra\"; the engines are: sled",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = byokd(&["serve", "--config", &path.to_string_lossy()], dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
    let out = byokd(
        &["serve", "--config", "/nonexistent/byokd.toml"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config file /nonexistent/byokd.toml")
    );
    // The environment variable names the file when the flag does not.
    let out = Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(["serve"])
        .current_dir(dir.path())
        .env("BYOKD_CONFIG", dir.path().join("bad.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = byokd(&["serve", "--no-such-flag"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn new_token_prints_a_token_and_its_config_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = byokd(&["new-token"], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text.lines().next().unwrap().rsplit(' ').next().unwrap();
    assert!(token.starts_with("byokd_pt_"));
    let line = format!(
        "token_sha256 = \"{}\"",
        hex::encode(Sha256::digest(token.as_bytes()))
    );
    assert!(text.contains(&line), "{text}");
}

#[tokio::test]
async fn with_no_config_it_starts_on_the_embedded_default_with_a_bootstrap_admin() {
    let cwd = tempfile::tempdir().unwrap();
    let server = TestServer::start(cwd.path(), &["serve"]);
    let token = server.bootstrap_token().expect("bootstrap token printed");
    assert!(cwd.path().join("byokd-data/master.key").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(cwd.path().join("byokd-data/master.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let mut admin = server.as_(&token).await;
    store(&mut admin, "t", "k", b"bootstrap-stored-value-000000").await;
    let grant = lease_ok(&mut admin, lease_req("t", "k", 1)).await;
    assert_eq!(
        admin
            .get(get_req(&grant.token))
            .await
            .unwrap()
            .into_inner()
            .value,
        b"bootstrap-stored-value-000000"
    );
    assert!(!server.log().contains(&token), "the token is never logged");
    assert!(server.stop().await.success());

    // Restarting keeps the same token and prints none.
    let server = TestServer::start(cwd.path(), &["serve"]);
    assert_eq!(server.bootstrap_token(), None);
    server
        .as_(&token)
        .await
        .describe(secret_ref("t", "k"))
        .await
        .unwrap();
    assert!(server.stop().await.success());

    // Resetting prints a new token; the old one stops working.
    let server = TestServer::start(cwd.path(), &["serve", "--reset-bootstrap-token"]);
    let new_token = server.bootstrap_token().expect("new token printed");
    assert_ne!(new_token, token);
    assert_status(
        server
            .as_(&token)
            .await
            .describe(secret_ref("t", "k"))
            .await,
        Code::Unauthenticated,
        "",
    );
    server
        .as_(&new_token)
        .await
        .describe(secret_ref("t", "k"))
        .await
        .unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly_and_json_logs_are_json() {
    let dir = TestDir::with_config("log_format = \"json\"\n");
    let server = dir.start();
    store(
        &mut server.as_(ORCHESTRATOR).await,
        "acme",
        "k",
        b"value-before-shutdown-0000",
    )
    .await;
    let log_path = server.log_path.clone();
    let status = server.stop().await;
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(log_path).unwrap();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    assert!(
        log.contains("shutdown requested") && log.contains("store closed"),
        "{log}"
    );
    assert!(
        !log.contains("did not finish in time"),
        "idle connections do not hold up shutdown"
    );
    let server = dir.start();
    assert_eq!(
        lease_and_get(&server, "acme", "k").await.unwrap().value,
        b"value-before-shutdown-0000"
    );
}

#[tokio::test]
async fn no_secret_value_or_token_ever_reaches_the_logs() {
    let dir = TestDir::new();
    let server = dir.start();
    let secret = b"sk-ant-api03-NEVERLOGGEDx9Qz7-0123456789abcdefghij";
    let rotated = b"sk-ant-api03-ROTATEDNEVERLOGGEDk2Lm-9876543210zyxw";
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", secret).await;
    let grant = lease_ok(&mut orch, lease_req("acme", "k", 2)).await;
    let mut agent = server.as_(AGENT).await;
    agent.get(get_req(&grant.token)).await.unwrap();
    // Failure paths log more: a bad token, a wrong principal token, bad input carrying the value.
    let _ = agent.get(get_req(&format!("{}x", grant.token))).await;
    let _ = server
        .as_("tok-guess-NEVERLOGGED")
        .await
        .describe(secret_ref("acme", "k"))
        .await;
    let _ = orch
        .store(pb::StoreRequest {
            name: "bad name".into(),
            ..store_req("acme", "x", secret)
        })
        .await;
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "k".into(),
        value: rotated.to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let _ = agent.get(get_req(&grant.token)).await;
    let log = server.log();
    assert!(
        log.len() > 1000,
        "logging is on at trace level: {} bytes",
        log.len()
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for needle in [
        String::from_utf8_lossy(secret).into_owned(),
        String::from_utf8_lossy(rotated).into_owned(),
        "NEVERLOGGED".to_string(),
        b64.encode(secret),
        grant.token.clone(),
        grant.token[9..].to_string(),
        ORCHESTRATOR.to_string(),
        AGENT.to_string(),
    ] {
        assert!(!log.contains(&needle), "log contains {needle:?}");
    }
}

/// `byokd-bench` runs every workload against a real server and reports each as JSON, with
/// its ratio to the no-op baseline of the same run.
#[test]
fn byokd_bench_runs_every_workload_and_reports_json() {
    let dir = TestDir::with_config(
        "[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\nfailed_get_rate_limit = { per_second = 1000000, burst = 1000000 }\n[lease]\nmax_uses = 1000000\n",
    );
    let server = dir.start();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_byokd-bench"))
        .args([
            "--target",
            &format!("http://{}", server.addr),
            "--token",
            ADMIN,
            "--workload",
            "all",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--duration",
            "1s",
            "--rounds",
            "2",
            "--json",
            &json.to_string_lossy(),
        ])
        .output()
        .expect("run byokd-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("p99"), "a table: {stdout}");
    let runs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: Vec<&str> = runs.iter().filter_map(|r| r["workload"].as_str()).collect();
    assert_eq!(
        names,
        ["baseline", "get", "lease+get", "store", "rotate", "mixed"]
    );
    for run in &runs {
        let name = run["workload"].as_str().unwrap();
        assert!(run["requests"].as_u64().unwrap() > 0, "{run}");
        assert!(run["rps"].as_f64().unwrap() > 0.0, "{run}");
        let (p50, p99) = (
            run["p50_ms"].as_f64().unwrap(),
            run["p99_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99, "{run}");
        let ratio = run["ratio_to_baseline"].as_f64().unwrap();
        assert!(ratio > 0.0, "{run}");
        // The median of the two rounds' ratios, each to its own round's baseline.
        let rounds: Vec<f64> = run["ratios_per_round"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect();
        assert_eq!(rounds.len(), 2, "{run}");
        assert!(
            (ratio - (rounds[0] + rounds[1]) / 2.0).abs() < 1e-9,
            "{run}"
        );
        if name == "baseline" {
            assert_eq!(ratio, 1.0);
        }
        // mixed leases secrets that its own rotations may replace in between: NOT_FOUND by
        // design; every other workload is error-free.
        if name != "mixed" {
            assert_eq!(run["errors"].as_u64().unwrap(), 0, "{run}");
        }
    }
}
