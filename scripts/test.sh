#!/usr/bin/env bash
# Runs byokd's test suite. Installs what the tests need beyond Rust if it is missing:
# grpcurl (for the README walk-through test), jq (used by that walk-through) and moto_server
# (a local AWS KMS API for the KMS master key tests), grpcio for the Python client example.
# The Python tools go into a virtual environment under
# ${BYOKD_TEST_TOOLS_DIR:-~/.cache/byokd-tests} (a system Python may refuse `pip install`
# outside one: PEP 668), whose bin/ comes first on PATH for the tests. strace (to count the
# server's syncs) comes from apt.
#
# PostgreSQL, for the tests of the PostgreSQL engine: BYOKD_TEST_DATABASE_URL if it is set
# (a role that may create databases; each test creates its own and drops it). Otherwise the
# machine's PostgreSQL cluster, started if it is down and installed from Debian's packages if
# there is none, with a role byokd_test (its password kept in the tools directory) for the
# tests to use over 127.0.0.1, and TLS with a test CA (BYOKD_TEST_PG_CA; with an external
# BYOKD_TEST_DATABASE_URL, set it to a CA whose certificate the server serves for the name
# localhost). Under CI=true a test that finds no PostgreSQL (or no CA) fails instead of
# skipping.
#
# The run has a time limit (BYOKD_TEST_TIMEOUT, default 40m, as for `timeout`): past it the
# tests still running are named (libtest reports those running over 60 s) and the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/postgres.sh
source scripts/postgres.sh

if ! command -v grpcurl >/dev/null 2>&1 || ! command -v moto_server >/dev/null 2>&1 \
  || ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  venv="${BYOKD_TEST_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/byokd-tests}/venv"
  if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$(cat tests/requirements.txt)" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
    cp tests/requirements.txt "$venv/.requirements"
  fi
  export PATH="$venv/bin:$PATH"
  hash -r
fi
if ! command -v jq >/dev/null 2>&1; then
  apt_install jq
fi
if ! command -v strace >/dev/null 2>&1; then
  apt_install strace
fi

provide_postgres
# Databases left by a run that was killed.
psql "$BYOKD_TEST_DATABASE_URL" -qAt -c \
  "SELECT datname FROM pg_database WHERE datname LIKE 'byokd_test_%'" 2>/dev/null \
  | while read -r db; do psql "$BYOKD_TEST_DATABASE_URL" -q -c "DROP DATABASE IF EXISTS \"$db\"" || true; done

limit=${BYOKD_TEST_TIMEOUT:-40m}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
timeout --kill-after=30s "$limit" cargo test --locked "$@" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
set -e
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "test.sh: the tests did not finish within $limit; these were still running:" >&2
  sed -n 's/^test \(.*\) has been running for over .*/\1/p' "$out" | sort -u \
    | while read -r name; do
        grep -q "^test $name \.\.\. " "$out" || echo "  $name" >&2
      done
fi
exit "$status"
