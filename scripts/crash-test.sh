#!/usr/bin/env bash
# The full crash test: store, rotate and get load, kill -9 at random points (default 25
# times), restart, and check that every acknowledged write and consumed lease use survived and
# the audit chain verifies. CI runs the same test with 3 kills. Reproduce a run with the
# BYOKD_CRASH_SEED it prints. Usage: scripts/crash-test.sh [kills]
set -euo pipefail
cd "$(dirname "$0")/.."
export BYOKD_CRASH_KILLS="${1:-25}"
cargo test --release --locked --test it crash::acknowledged -- --nocapture
