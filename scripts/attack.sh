#!/usr/bin/env bash
# Runs byokd-attack's abuse patterns against fresh release servers, each with an
# authenticated victim leasing and redeeming meanwhile, and prints one JSON line per run
# (label first): the victim alone (baseline), stalled streams, a flood without credentials
# (without a victim too, for the audit trail's growth), idle connections under a limit of
# 400 open files (with 256 KiB audit segments, so that the victim's entries need new files),
# health Watch streams held open, Audit pages never read (no flow-control credit), and
# requests to made-up paths (first; ONLY_PATHS=1 runs only those); each line ends with the
# server's resident memory after the run and its peak, and (with an ops listener) one
# scrape's time and size. With BYOKD_BEFORE=path/to/byokd, each run is repeated on that build, the
# two alternating, so that both see the same machine load (see BENCHMARKS.md).
#
#   scripts/attack.sh [DURATION] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-8s}"
rounds="${2:-2}"
# shellcheck source=scripts/bench-server.sh
. scripts/bench-server.sh
builds=("after:target/release/byokd")
if [ -n "${BYOKD_BEFORE:-}" ]; then builds=("before:$BYOKD_BEFORE" "${builds[@]}"); fi
run() {
  local label="$1" bin="$2"; shift 2
  start_server "$bin"
  local addr="${target#http://}"
  local report
  report="$(target/release/byokd-attack --target "$addr" --token "$token" \
    --duration "$duration" --data-dir "$work/data" "$@")"
  # The server's resident memory now, and its peak.
  local rss hwm
  rss="$(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$server/status")"
  hwm="$(awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$server/status")"
  # With an ops listener: one scrape's time and size.
  local ops scrape="null"
  ops="$(sed -n 's/^byokd metrics and health on //p' "$work/out")"
  if [ -n "$ops" ]; then
    scrape="$(curl -s -o /dev/null -w '{"seconds":%{time_total},"bytes":%{size_download}}' \
      "http://$ops/metrics")"
  fi
  printf '%s %s {"rss_mb":%s,"peak_rss_mb":%s,"scrape":%s}\n' "$label" "$report" "$rss" "$hwm" "$scrape"
  stop_server
}
for _ in $(seq "$rounds"); do
  for build in "${builds[@]}"; do
    label="${build%%:*}"
    bin="${build#*:}"
    BYOKD_EXTRA_CONFIG=$'[metrics]\nlisten = "127.0.0.1:0"' \
      run "$label" "$bin" --victims 0 paths --concurrency 64
    [ -n "${ONLY_PATHS:-}" ] && continue
    run "$label" "$bin" --victims 4 stall --connections 0
    run "$label" "$bin" --victims 4 stall --connections 1 --streams 600
    run "$label" "$bin" --victims 4 flood --concurrency 16
    run "$label" "$bin" --victims 0 flood --concurrency 16
    BYOKD_OPEN_FILES=400 BYOKD_EXTRA_CONFIG=$'[store]\naudit_segment_kb = 256' \
      run "$label" "$bin" --victims 4 idle --connections 600
    run "$label" "$bin" --victims 4 watch --connections 200 --streams 64
    run "$label" "$bin" --victims 4 unread --connections 64 --streams 64
  done
done
