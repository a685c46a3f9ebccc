#!/usr/bin/env bash
# One tenant's writer against a small data volume: mounts a tmpfs of MB megabytes (needs
# root), starts a fresh release server with its data there, stores 64 KiB values into one
# tenant as fast as they are answered for SECONDS, and prints one JSON line: when the volume
# was full (free space under 1 MB; null if never), its free space at the end, whether another
# tenant could still store and a revocation still went through, and whether the server
# started again on the volume. With BYOKD_BEFORE=path/to/byokd, the same for that build first.
#
#   scripts/fill-volume.sh [MB] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
mb="${1:-300}"
seconds="${2:-10}"
# shellcheck source=scripts/bench-server.sh
. scripts/bench-server.sh
mnt="$(mktemp -d)"
finish() {
  stop_server
  umount "$mnt" 2> /dev/null || true
  rmdir "$mnt" 2> /dev/null || true
}
trap finish EXIT
call() { # METHOD JSON: one grpcurl call as the admin; prints the answer or the error
  grpcurl -plaintext -H "authorization: Bearer $token" -d "$2" "${target#http://}" \
    "byokd.v1.Vault/$1" 2>&1 || true
}
value() { head -c 48 /dev/urandom | base64 -w0; }
fill() {
  local label="$1" bin="$2"
  mount -t tmpfs -o "size=${mb}m,mode=0700" tmpfs "$mnt"
  BYOKD_DATA_DIR="$mnt/data" start_server "$bin"
  call Store "{\"tenant\":\"other\",\"name\":\"keep\",\"provider\":\"p\",\"value\":\"$(value)\"}" > /dev/null
  # Free space every 100 ms while the writer runs.
  (
    start=$(date +%s%N)
    while kill -0 "$server" 2> /dev/null; do
      echo "$((($(date +%s%N) - start) / 1000000)) $(df -k --output=avail "$mnt" | tail -1)"
      sleep 0.1
    done
  ) > "$work/free" &
  local sampler=$!
  target/release/byokd-bench --target "$target" --token "$token" --workload store \
    --value-bytes 65536 --concurrency 16 --connections 2 --duration "${seconds}s" \
    --secrets 1 --json "$work/bench.json" > /dev/null 2>&1 || true
  kill "$sampler" 2> /dev/null || true
  local full_ms free_mb stored errors other revoke restarted
  full_ms="$(awk '$2 < 1024 { print $1; exit }' "$work/free")"
  free_mb="$(($(df -k --output=avail "$mnt" | tail -1) / 1024))"
  stored="$(jq '.[0].requests - .[0].errors' "$work/bench.json" 2> /dev/null || echo null)"
  errors="$(jq '.[0].errors' "$work/bench.json" 2> /dev/null || echo null)"
  other="$(call Store "{\"tenant\":\"other\",\"name\":\"after\",\"provider\":\"p\",\"value\":\"$(value)\"}" | grep -q '"version"' && echo true || echo false)"
  revoke="$(call Revoke '{"secret":{"tenant":"other","name":"keep"},"reason":"make room"}' | grep -qi 'revoked\|secret' && echo true || echo false)"
  stop_server
  if BYOKD_DATA_DIR="$mnt/data" start_server "$bin" && [ "$target" != "http://" ] \
    && kill -0 "$server" 2> /dev/null; then restarted=true; else restarted=false; fi
  stop_server
  umount "$mnt"
  printf '%s {"volume_mb":%s,"full_after_ms":%s,"free_mb_at_end":%s,"stored":%s,"refused_or_failed":%s,"other_tenant_stores":%s,"revocation_works":%s,"restarts_on_it":%s}\n' \
    "$label" "$mb" "${full_ms:-null}" "$free_mb" "$stored" "$errors" "$other" "$revoke" "$restarted"
}
if [ -n "${BYOKD_BEFORE:-}" ]; then fill before "$BYOKD_BEFORE"; fi
fill after target/release/byokd
