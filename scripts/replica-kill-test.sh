#!/usr/bin/env bash
# The replica kill test (tests/it/replica_kill.rs): two byokd replicas on one PostgreSQL
# database under Store, Rotate and Lease+Get load on both; one of them killed with kill -9
# (default 25 times, alternating), the other serving meanwhile; after each restart, every
# acknowledged write reads through both replicas, no redeemed single-use lease works again,
# and VerifyAudit agrees on both. CI runs the same test with 3 kills. PostgreSQL comes as for
# the test suite (scripts/test.sh provides it). Reproduce a run's choices with the
# BYOKD_REPLICA_SEED it prints.
# Usage: scripts/replica-kill-test.sh [kills]
set -euo pipefail
cd "$(dirname "$0")/.."
export BYOKD_REPLICA_KILLS="${1:-25}"
exec ./scripts/test.sh --release --test it replica_kill:: -- --nocapture
