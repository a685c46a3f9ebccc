#!/usr/bin/env bash
# Builds and runs each fuzz target for a bounded time (default 30 s each; CI uses less),
# starting from its committed seed corpus (fuzz/seeds/<target>/, also run by `cargo test`:
# src/fuzzing.rs). New inputs the fuzzer finds go to a scratch corpus, not into the repo;
# a crash leaves its input in fuzz/artifacts/<target>/.
# cargo-fuzz wants a nightly compiler for its sanitizer flags; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them, so no other toolchain is needed. cargo-fuzz has no --locked:
# the fuzz crate's dependencies are fetched with --locked first, so a Cargo.lock that does
# not match fails the run instead of being rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
cargo fetch --locked --manifest-path fuzz/Cargo.toml
export RUSTC_BOOTSTRAP=1
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in stored_record request_validation audit_files backup_file config_file; do
  echo "--- fuzz $target for ${seconds}s"
  mkdir -p "$scratch/$target"
  cargo fuzz run --sanitizer none "$target" "$scratch/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048
done
git diff --quiet -- fuzz/Cargo.lock || { echo "fuzz/Cargo.lock changed: commit it" >&2; exit 1; }
