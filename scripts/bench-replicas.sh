#!/usr/bin/env bash
# byokd on PostgreSQL against sled, on this machine: get, lease+get and store at c=64 for sled,
# postgres x1, x2 and x3 (byokd-bench spreads its connections over the replicas), and store at
# c=1 on postgres x1, each as a ratio to byokd-bench's no-op baseline in the same run. Then
# each workload again alone, for the CPU it costs per request, split into byokd (all
# replicas), PostgreSQL (every process of the cluster) and the client (byokd-bench).
# PostgreSQL comes as for the tests (scripts/postgres.sh); each configuration gets a schema of
# its own in a scratch database, dropped at the end. Results: bench-results/replicas-<time>/.
# Usage: scripts/bench-replicas.sh [duration per workload, default 5s]
# BYOKD_BIN runs another byokd build (default target/release/byokd); BYOKD_BENCH_CONFIGS
# names the configurations to run (default: sled x1 x1c1 x2 x3).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
source scripts/postgres.sh
provide_postgres
cargo build --release --locked --bin byokd --bin byokd-bench
dur="${1:-5s}"
out="bench-results/replicas-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
work="$(mktemp -d)"
db="byokd_bench_$$"
pids=()
stop_servers() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_servers
  psql "$BYOKD_TEST_DATABASE_URL" -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$work"
}
trap cleanup EXIT
psql "$BYOKD_TEST_DATABASE_URL" -q -c "CREATE DATABASE $db"
db_url="${BYOKD_TEST_DATABASE_URL%/*}/$db"
token="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
digest="$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
head -c 32 /dev/urandom > "$work/master.key"
chmod 600 "$work/master.key"

# start ENGINE COUNT: starts COUNT servers (one for sled) and sets targets (comma-separated).
start() {
  local engine=$1 count=$2 i dir store
  targets=""
  case $engine in
    sled) store='[store]
kind = "sled"' ;;
    *) store="[store]
kind = \"postgres\"
url = \"$db_url\"
schema = \"$engine\"" ;;
  esac
  for i in $(seq "$count"); do
    dir="$work/$engine-$i"
    mkdir -p "$dir"
    cat > "$dir/byokd.toml" <<TOML
data_dir = "$dir/data"
$store
[master_key]
kind = "local"
path = "$work/master.key"
[limits]
principal_rate_limit = { per_second = 1000000, burst = 1000000 }
failed_get_rate_limit = { per_second = 1000000, burst = 1000000 }
[quotas]
max_secrets_per_tenant = 1000000000
max_leases_per_tenant = 1000000000
max_value_mb_per_tenant = 1000000
max_value_mb_total = 1000000
[[principal]]
id = "bench"
token_sha256 = "$digest"
roles = ["admin"]
tenants = ["*"]
TOML
    chmod 600 "$dir/byokd.toml"
    BYOKD_LOG=warn "${BYOKD_BIN:-target/release/byokd}" serve --config "$dir/byokd.toml" \
      --listen 127.0.0.1:0 > "$dir/out" 2> "$dir/log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q "listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
    targets="${targets:+$targets,}http://$(sed -n 's/^byokd listening on //p' "$dir/out")"
  done
}

# CPU time (clock ticks) of the processes named by pid on stdin, summed.
ticks() {
  local pid total=0 stat
  while read -r pid; do
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
    stat="${stat##*) }"
    # After the command: fields 12 and 13 are utime and stime.
    total=$((total + $(echo "$stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}
byokd_ticks() { printf '%s\n' "${pids[@]}" | ticks; }
pg_ticks() { pgrep -u postgres | ticks; }
hz="$(getconf CLK_TCK)"

bench() {
  target/release/byokd-bench --target "$targets" --token "$token" --duration "$dur" \
    --connections 6 "$@"
}

summary="$out/summary.md"
{
  echo "| engine | workload | c | ratio to baseline | req/s | byokd us/req | PostgreSQL us/req | client us/req |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$summary"
run() {
  local engine=$1 count=$2 name=$3 workloads=$4 concurrency=$5 w
  start "$engine" "$count"
  bench --workload "baseline,$workloads" --concurrency "$concurrency" \
    --json "$out/$name-c$concurrency.json" > "$out/$name-c$concurrency.txt"
  for w in ${workloads//,/ }; do
    local b0 p0 c0 b1 p1 c1 requests
    b0=$(byokd_ticks); p0=$(pg_ticks)
    TIMEFORMAT='%U %S'
    c0=$( { time bench --workload "$w" --concurrency "$concurrency" \
      --json "$out/$name-$w-c$concurrency-alone.json" > /dev/null ; } 2>&1 | tail -n 1)
    b1=$(byokd_ticks); p1=$(pg_ticks)
    c1=$(echo "$c0" | awk '{printf "%d", ($1 + $2) * 1000000}')
    requests=$(jq '.[0].requests' "$out/$name-$w-c$concurrency-alone.json")
    jq -r --arg e "$name" --arg c "$concurrency" \
      --arg b "$(( (b1 - b0) * 1000000 / hz / requests ))" \
      --arg p "$(( (p1 - p0) * 1000000 / hz / requests ))" \
      --arg cl "$(( c1 / requests ))" --arg w "$w" \
      '.[] | select(.workload == $w) | "| \($e) | \($w) | \($c) | \(.ratio_to_baseline * 100 | round / 100) | \(.rps | round) | \($b) | \($p) | \($cl) |"' \
      "$out/$name-c$concurrency.json" >> "$summary"
  done
  stop_servers
}

for config in ${BYOKD_BENCH_CONFIGS:-sled x1 x1c1 x2 x3}; do
  case $config in
    sled) run sled 1 sled get,lease+get,store 64 ;;
    x1) run x1 1 "postgres-x1" get,lease+get,store 64 ;;
    x1c1) run x1c1 1 "postgres-x1" store 1 ;;
    x2) run x2 2 "postgres-x2" get,lease+get,store 64 ;;
    x3) run x3 3 "postgres-x3" get,lease+get,store 64 ;;
  esac
done
cat "$summary"
echo "results: $out"
