#!/usr/bin/env bash
# Runs byokd-bench against a fresh release byokd on this machine and writes the results to
# bench-results/ (JSON per run). Usage: scripts/bench.sh [duration per workload and round,
# default 10s] [rounds, default 3]
#
#   1. every workload at concurrency 64 (4 connections), with the no-op baseline, in rounds:
#      each workload's ratio is the median of its ratios to the same round's baseline;
#   2. store at concurrency 1: one flush per write, the reference for group commit;
#   3. get paced at half the rate reached in step 1: p99 at half of peak.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10s}"
rounds="${2:-3}"
# shellcheck source=scripts/bench-server.sh
. scripts/bench-server.sh
BYOKD_EXTRA_CONFIG="${BYOKD_EXTRA_CONFIG:-}$(quotas_lifted)" start_server
out="bench-results"
mkdir -p "$out"
bench() { target/release/byokd-bench --target "$target" --token "$token" "$@"; }

echo "== all workloads, concurrency 64"
bench --workload all --concurrency 64 --connections 4 --duration "$duration" --rounds "$rounds" --json "$out/all.json"
echo "== store, concurrency 1 (one flush per write)"
bench --workload baseline,store --concurrency 1 --connections 1 --duration "$duration" --rounds "$rounds" --json "$out/store-sequential.json"
peak="$(python3 -c "import json; print(int(next(r['rps'] for r in json.load(open('$out/all.json')) if r['workload']=='get')))")"
half=$((peak / 2))
echo "== get paced at half its peak ($half/s)"
bench --workload get --concurrency 64 --connections 4 --duration "$duration" --rate "$half" --json "$out/get-half-peak.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
runs = {r["workload"]: r for r in json.load(open(f"{out}/all.json"))}
seq = {r["workload"]: r for r in json.load(open(f"{out}/store-sequential.json"))}
half = json.load(open(f"{out}/get-half-peak.json"))[0]
print()
print(f"get        / baseline: {runs['get']['ratio_to_baseline']:.2f}  (target >= 0.50)")
print(f"lease+get  / baseline: {runs['lease+get']['ratio_to_baseline']:.2f}  (target >= 0.25)")
print(f"store c=64 / store c=1: {runs['store']['rps'] / seq['store']['rps']:.1f}x  (target >= 3x)")
print(f"get p99 at half peak ({half['rps']:.0f}/s): {half['p99_ms']:.2f} ms  (target <= 5 ms)")
PY
