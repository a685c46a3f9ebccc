#!/usr/bin/env bash
# Server CPU time per request of two byokd builds, compared side by side: both servers run at
# once (fresh, release, on loopback), and short bursts of each workload go to one and then
# the other, alternating which goes first, so that the machine's load (which moves the figure
# by half on a shared 2-core machine within minutes) weighs on both alike. Prints each pair
# and, per workload, the median of the per-pair ratios NEW/BASE (below 1: NEW is cheaper).
# Usage: scripts/cpu-compare.sh BASE_BIN NEW_BIN [pairs, default 8] [burst, default 3s]
#        [workloads, default "get lease+get store"]
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A bin=([base]="$1" [new]="$2")
pairs="${3:-8}"
burst="${4:-3s}"
workloads="${5:-get lease+get store}"
# shellcheck source=scripts/bench-server.sh
. scripts/bench-server.sh
declare -A pid url key
dirs=()
for side in base new; do
  BYOKD_EXTRA_CONFIG="$(quotas_lifted "${bin[$side]}")" start_server "${bin[$side]}"
  pid[$side]="$server"
  url[$side]="$target"
  key[$side]="$token"
  dirs+=("$work")
  # Keep this server and its directory past the next start_server.
  server=""
  work=""
done
cleanup() {
  kill "${pid[base]}" "${pid[new]}" 2>/dev/null || true
  wait "${pid[base]}" "${pid[new]}" 2>/dev/null || true
  rm -rf "${dirs[@]}"
}
trap cleanup EXIT
ticks="$(getconf CLK_TCK)"
json="${dirs[0]}/burst.json"
# One burst of workload $2 against side $1: the server's CPU per request, in microseconds.
burst() {
  local before after
  before="$(awk '{print $14 + $15}' "/proc/${pid[$1]}/stat")"
  target/release/byokd-bench --target "${url[$1]}" --token "${key[$1]}" --workload "$2" \
    --concurrency 64 --connections 4 --duration "$burst" --json "$json" > /dev/null 2>&1
  after="$(awk '{print $14 + $15}' "/proc/${pid[$1]}/stat")"
  python3 -c 'import json, sys
n = json.load(open(sys.argv[1]))[0]["requests"]
print(f"{(float(sys.argv[3]) - float(sys.argv[2])) / float(sys.argv[4]) * 1e6 / n:.1f}")' \
    "$json" "$before" "$after" "$ticks"
}
for w in $workloads; do
  burst base "$w" > /dev/null
  burst new "$w" > /dev/null
  results=""
  for i in $(seq "$pairs"); do
    if (( i % 2 )); then b="$(burst base "$w")"; n="$(burst new "$w")"
    else n="$(burst new "$w")"; b="$(burst base "$w")"; fi
    echo "$w pair $i: base $b us/request, new $n us/request"
    results="$results $b:$n"
  done
  python3 - "$w" "$results" <<'PY'
import statistics, sys
pairs = [tuple(map(float, p.split(":"))) for p in sys.argv[2].split()]
base = [b for b, _ in pairs]
new = [n for _, n in pairs]
ratio = statistics.median(n / b for b, n in pairs)
print(f"{sys.argv[1]:10} base median {statistics.median(base):6.1f} us/request"
      f"   new median {statistics.median(new):6.1f} us/request   new/base {ratio:.3f}"
      f" (median of {len(pairs)} pairs)")
PY
done
