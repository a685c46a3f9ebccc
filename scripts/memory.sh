#!/usr/bin/env bash
# Resident memory against bytes written: stores MB megabytes of 64 KiB values into a fresh
# release server (one tenant, quotas out of the way) and prints its resident memory (VmRSS)
# after each quarter of the writes, then after IDLE seconds without requests, as JSON lines.
# BYOKD_EXTRA_CONFIG is appended to the server's config (e.g. $'[store]\ncache_size_mb = 64');
# BYOKD_VALUE_MB_TOTAL sets [quotas] max_value_mb_total (default: the server's);
# BYOKD_SERVER_BIN measures another build; BYOKD_WORKLOAD=rotate writes by rotating 16 secrets
# instead of storing new ones.
#
#   scripts/memory.sh [MB] [IDLE]
set -euo pipefail
cd "$(dirname "$0")/.."
mb="${1:-2048}"
idle="${2:-30}"
# shellcheck source=scripts/bench-server.sh
. scripts/bench-server.sh
bin="${BYOKD_SERVER_BIN:-target/release/byokd}"
extra="${BYOKD_EXTRA_CONFIG:-}"
# Builds before quotas have no [quotas] section (and would refuse it).
if grep -q max_value_mb_per_tenant "$bin"; then
  extra="$(printf '%s\n[quotas]\nmax_secrets_per_tenant = 100000000\nmax_value_mb_per_tenant = 100000000\n%s\n' \
    "$extra" "${BYOKD_VALUE_MB_TOTAL:+max_value_mb_total = $BYOKD_VALUE_MB_TOTAL}")"
fi
BYOKD_EXTRA_CONFIG="$extra" start_server "$bin"
rss() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$server/status"; }
per=$((mb * 16 / 4)) # 16 values of 64 KiB per MiB, in four steps
echo "{\"attempted_mb\":0,\"rss_mb\":$(rss)}"
for step in 1 2 3 4; do
  target/release/byokd-bench --target "$target" --token "$token" \
    --workload "${BYOKD_WORKLOAD:-store}" --requests "$per" --duration 1h --value-bytes 65536 \
    --concurrency 16 --connections 2 --secrets 16 > /dev/null 2>&1 || true # refusals (a quota) are fine here
  echo "{\"attempted_mb\":$((mb * step / 4)),\"rss_mb\":$(rss)}"
done
sleep "$idle"
echo "{\"idle_s\":$idle,\"attempted_mb\":$mb,\"rss_mb\":$(rss),\"data_mb\":$(du -sm "$work/data" | cut -f1)}"
