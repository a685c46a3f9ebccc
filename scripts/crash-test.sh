#!/usr/bin/env bash
# The full crash test (tests/it/crash.rs): a mixed load of stores, rotations, revocations,
# single- and multi-use leases, master-key rotations and retention pruning, kill -9 at random
# points (default 25 times), restart, and checks that every acknowledged write and lease use
# survived, the head pinned before each kill is still there, a resumed WatchAudit sees every
# acknowledged write's entry without a gap, and the indexes match a scan. CI runs the same test
# with 3 kills. Reproduce a run's choices with the BYOKD_CRASH_SEED it prints.
# Usage: scripts/crash-test.sh [kills]
set -euo pipefail
cd "$(dirname "$0")/.."
export BYOKD_CRASH_KILLS="${1:-25}"
cargo test --release --locked --test it crash::acknowledged -- --nocapture
