#!/usr/bin/env bash
# Runs byokd's test suite. Installs what the tests need beyond Rust if it is missing:
# grpcurl (for the README walk-through test), jq (used by that walk-through) and moto_server
# (a local AWS KMS API for the KMS master key tests), grpcio for the Python client example.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v grpcurl >/dev/null 2>&1 || ! command -v moto_server >/dev/null 2>&1 \
  || ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  hash -r
fi
if ! command -v jq >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq jq
fi

cargo test --locked "$@"
