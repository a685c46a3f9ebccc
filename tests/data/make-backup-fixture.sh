#!/usr/bin/env bash
# Makes tests/data/backup-ce6c08c.bak and its local master key with the byokd binary given
# (built from commit ce6c08c for the committed fixture): three secrets, one revoked, a lease
# used, then `byokd backup`. The principals' tokens are the integration tests' (tok-admin,
# tok-orchestrator, tok-agent). Needs grpcurl. Usage: make-backup-fixture.sh BYOKD_BINARY
set -euo pipefail
bin=$(readlink -f "$1")
out=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
pid=
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
digest() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
principal() {
  printf '\n[[principal]]\nid = "%s"\ntoken_sha256 = "%s"\nroles = [%s]\ntenants = ["*"]\n' \
    "$1" "$(digest "$2")" "$3"
}
{
  echo 'data_dir = "data"'
  principal admin tok-admin '"admin"'
  principal orchestrator tok-orchestrator '"writer", "leaser"'
  principal agent tok-agent '"reader"'
} > byokd.toml
chmod 600 byokd.toml
"$bin" serve --config byokd.toml --listen 127.0.0.1:0 > out.txt 2> err.txt &
pid=$!
for _ in $(seq 1 100); do
  addr=$(sed -n 's/^byokd listening on //p' out.txt)
  [ -n "$addr" ] && break
  sleep 0.1
done
call() { grpcurl -plaintext -H "authorization: Bearer $1" -d "$2" "$addr" "byokd.v1.Vault/$3"; }
for i in 1 2 3 revoked; do
  value=$(printf 'sk-fixture-%s-0123456789abcdefghij' "$i" | base64 -w0)
  call tok-orchestrator "{\"tenant\":\"acme\",\"name\":\"fixture-$i\",\"provider\":\"openai\",\"value\":\"$value\"}" Store > /dev/null
done
token=$(call tok-orchestrator '{"tenant":"acme","name":"fixture-1","max_uses":2}' Lease \
  | sed -n 's/.*"token": "\(.*\)".*/\1/p')
call tok-agent "{\"token\":\"$token\"}" Get > /dev/null
call tok-orchestrator '{"secret":{"tenant":"acme","name":"fixture-revoked"},"reason":"fixture"}' Revoke > /dev/null
rm -f "$out/backup-ce6c08c.bak"
BYOKD_TOKEN=tok-admin "$bin" backup --config byokd.toml --target "http://$addr" \
  --out "$out/backup-ce6c08c.bak"
cp data/master.key "$out/backup-ce6c08c.master.key"
