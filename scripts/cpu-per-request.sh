#!/usr/bin/env bash
# Server CPU time per request, per workload: a fresh release byokd on this machine, each
# workload warmed up for 2 s and then run for the given duration at concurrency 64, with the
# server's user+system CPU time (from /proc) divided by the requests served. Unlike requests/s,
# this hardly depends on what else the machine is doing, so it compares builds across runs.
# The client's CPU per request is reported too (for `baseline` it includes the no-op server,
# a child of the client; byokd's own CPU is then 0).
# Usage: scripts/cpu-per-request.sh [duration, default 8s] [workloads, default "get lease+get store"]
# BYOKD_SERVER_BIN=path/to/byokd measures another build (run them alternating to compare).
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-8s}"
workloads="${2:-get lease+get store}"
# shellcheck source=scripts/bench-server.sh
. scripts/bench-server.sh
bin="${BYOKD_SERVER_BIN:-target/release/byokd}"
BYOKD_EXTRA_CONFIG="${BYOKD_EXTRA_CONFIG:-}$(quotas_lifted "$bin")" start_server "$bin"
ticks="$(getconf CLK_TCK)"
cpu() { awk '{print $14 + $15}' "/proc/$server/stat"; }
for w in $workloads; do
  target/release/byokd-bench --target "$target" --token "$token" --workload "$w" \
    --concurrency 64 --connections 4 --duration 2s > /dev/null 2>&1
  before="$(cpu)"
  # The client's CPU (with its baseline server child, if any) from the rusage of the run.
  client="$(python3 -c '
import resource, subprocess, sys
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.ru_utime + r.ru_stime)' target/release/byokd-bench --target "$target" --token "$token" \
    --workload "$w" --concurrency 64 --connections 4 --duration "$duration" --json "$work/run.json")"
  after="$(cpu)"
  python3 - "$work/run.json" "$before" "$after" "$ticks" "$client" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))[0]
server_s = (float(sys.argv[3]) - float(sys.argv[2])) / float(sys.argv[4])
client_s = float(sys.argv[5])
n = run["requests"]
print(f"{run['workload']:10} {run['rps']:9.0f} req/s   server CPU {server_s * 1e6 / n:6.1f} us/request"
      f"   client CPU {client_s * 1e6 / n:6.1f} us/request")
PY
done
