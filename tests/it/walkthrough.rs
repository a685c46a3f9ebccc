//! The README's grpcurl walk-through, run as printed against a server started as the README
//! says, so the documentation cannot drift from the product.

use crate::harness::*;

const README: &str = include_str!("../../README.md");

#[test]
fn readme_grpcurl_walkthrough_works_as_printed() {
    let (stdout, stderr) = run_documented_script(&sh_blocks(README, "walkthrough"));
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
