# shellcheck shell=bash
# Sourced by scripts/bench.sh and scripts/cpu-per-request.sh: builds the release binaries and
# starts a fresh byokd on a loopback port in a temporary directory, with an admin principal and
# the abuse limits out of the way (the benchmarks measure throughput, not the limits).
# Sets: work (the directory, removed on exit), server (its pid, killed on exit), target (its
# URL), token (the admin's bearer token).
cargo build --release --locked --bin byokd --bin byokd-bench
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
token="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
digest="$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
cat > "$work/byokd.toml" <<TOML
data_dir = "data"
[limits]
principal_rate_limit = { per_second = 1000000, burst = 1000000 }
failed_get_rate_limit = { per_second = 1000000, burst = 1000000 }
[[principal]]
id = "bench"
token_sha256 = "$digest"
roles = ["admin"]
tenants = ["*"]
TOML
chmod 600 "$work/byokd.toml"
BYOKD_LOG=warn target/release/byokd serve --config "$work/byokd.toml" --listen 127.0.0.1:0 > "$work/out" 2> "$work/log" &
server=$!
for _ in $(seq 100); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.1; done
# shellcheck disable=SC2034 # used by the sourcing script
target="http://$(sed -n 's/^byokd listening on //p' "$work/out")"
