//! Compiles proto/ into Rust with protox (pure Rust, no system `protoc`) and writes the
//! descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

/// Messages that carry a secret value or a lease token: their generated `Debug` is replaced
/// by a redacting one in `src/api.rs`, so no log line can print them.
const SENSITIVE_MESSAGES: &[&str] = &[
    ".byokd.v1.StoreRequest",
    ".byokd.v1.RotateRequest",
    ".byokd.v1.GetRequest",
    ".byokd.v1.SecretValue",
    ".byokd.v1.LeaseGrant",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["byokd/v1/vault.proto"], ["proto"])?;
    std::fs::write(out_dir.join("byokd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_debug(SENSITIVE_MESSAGES)
        // A malformed request message is the caller's mistake: INVALID_ARGUMENT (src/api.rs).
        .codec_path("crate::api::Codec")
        .compile_fds(fds)?;
    // byokd-bench's no-op baseline service; reuses the byokd.v1 messages, and is not part of
    // the descriptor set byokd serves.
    let mut bench = protox::compile(["byokd/bench/v1/baseline.proto"], ["proto"])?;
    // Generate only the bench package; byokd.v1 is already generated above.
    bench.file.retain(|f| f.package() == "byokd.bench.v1");
    tonic_prost_build::configure()
        .extern_path(".byokd.v1", "crate::api::v1")
        .compile_fds(bench)?;
    Ok(())
}
