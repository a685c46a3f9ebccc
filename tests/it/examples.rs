//! The client examples and the ops runbook, run against a real server so that they cannot
//! drift from the product: the Rust example (examples/rust_client.rs), the Python example
//! (examples/python, grpcio stubs generated from proto/) and every grpcurl command of
//! docs/RUNBOOK.md.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::*;

const RUNBOOK: &str = include_str!("../../docs/RUNBOOK.md");

/// The built example binary: cargo builds examples with the tests, next to `deps/`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let target = exe.parent().and_then(|d| d.parent()).expect("target dir");
    target.join("examples").join(name)
}

fn assert_example_ok(out: std::process::Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.trim_end().ends_with("example ok"),
        "{what}\nstdout:\n{stdout}"
    );
    assert!(stdout.contains("NOT_FOUND"), "{what}\nstdout:\n{stdout}");
}

#[test]
fn the_rust_client_example_runs_the_orchestrator_and_agent_paths() {
    let dir = TestDir::new();
    let server = dir.start();
    let out = Command::new(example("rust_client"))
        .args([
            "--target",
            &format!("http://{}", server.addr),
            "--orchestrator-token",
            ORCHESTRATOR,
            "--agent-token",
            AGENT,
        ])
        .output()
        .expect("run examples/rust_client (built by cargo test)");
    assert_example_ok(out, "rust_client");
    // What it did is in the audit trail: a redeemed Get and a refused one.
    let log = server.log();
    assert!(!log.contains("sk-ant-api03-rust-example"));
}

#[test]
fn the_python_example_runs_against_the_real_server() {
    let dir = TestDir::new();
    let server = dir.start();
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/python/byokd_example.py"
        ))
        .args([
            "--target",
            &server.addr.to_string(),
            "--orchestrator-token",
            ORCHESTRATOR,
            "--agent-token",
            AGENT,
        ])
        .output()
        .expect("python3 with grpcio (pip install -r examples/python/requirements.txt)");
    assert_example_ok(out, "the Python example");
}

#[test]
fn every_runbook_command_runs_as_printed() {
    let script = sh_blocks(RUNBOOK, "runbook");
    run_documented_script(&script);
    // Every RPC of the service appears in a command that ran.
    for rpc in [
        "Store",
        "Describe",
        "List",
        "Lease",
        "Get",
        "Rotate",
        "Revoke",
        "Audit",
        "VerifyAudit",
        "WatchAudit",
        "RotateMasterKey",
        "GetRotationStatus",
        "Backup",
        "UpdateSecret",
        "Restore",
        "Purge",
        "GetUsage",
    ] {
        assert!(
            script.contains(&format!("byokd.v1.Vault/{rpc}")),
            "the runbook has no command for {rpc}"
        );
    }
    assert!(script.contains("grpc.health.v1.Health/Check"));
}
