# shellcheck shell=bash
# Sourced by scripts/bench.sh, scripts/cpu-per-request.sh and scripts/attack.sh: builds the
# release binaries and defines start_server, which starts a fresh byokd on a loopback port in
# a temporary directory, with an admin principal and the per-principal limits out of the way
# (the benchmarks measure throughput, not those limits), stop_server, and quotas_lifted.
# start_server [BIN] (default target/release/byokd; BYOKD_OPEN_FILES=N runs it under that
# limit on open files; BYOKD_EXTRA_CONFIG is appended to its config; BYOKD_DATA_DIR puts its data elsewhere) sets: work (the directory), server (its pid), target (its URL), token
# (the admin's bearer token). Both are undone on exit.
cargo build --release --locked --bin byokd --bin byokd-bench --bin byokd-attack
work=""
server=""
stop_server() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    # A server that cannot finish its shutdown (an older build on a full disk) is killed.
    for _ in $(seq 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  if [ -n "$work" ]; then rm -rf "$work"; fi
  server=""
  work=""
}
trap stop_server EXIT
# A [quotas] section lifting every tenant quota, for the throughput benchmarks (a store
# workload fills one tenant): printed only for a build that has quotas (an older build would
# refuse the section), found, as in memory.sh, by the setting's name in the binary.
quotas_lifted() {
  if grep -q max_leases_per_tenant "${1:-target/release/byokd}"; then
    printf '\n[quotas]\nmax_secrets_per_tenant = 1000000000\nmax_value_mb_per_tenant = 1000000\n'
    printf 'max_leases_per_tenant = 1000000000\nmax_value_mb_total = 1000000\n'
  fi
}
start_server() {
  local bin="${1:-target/release/byokd}"
  work="$(mktemp -d)"
  token="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  local digest
  digest="$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
  cat > "$work/byokd.toml" <<TOML
data_dir = "${BYOKD_DATA_DIR:-data}"
[limits]
principal_rate_limit = { per_second = 1000000, burst = 1000000 }
failed_get_rate_limit = { per_second = 1000000, burst = 1000000 }
[[principal]]
id = "bench"
token_sha256 = "$digest"
roles = ["admin"]
tenants = ["*"]
${BYOKD_EXTRA_CONFIG:-}
TOML
  chmod 600 "$work/byokd.toml"
  (
    if [ -n "${BYOKD_OPEN_FILES:-}" ]; then ulimit -n "$BYOKD_OPEN_FILES"; fi
    BYOKD_LOG=warn exec "$bin" serve --config "$work/byokd.toml" --listen 127.0.0.1:0
  ) > "$work/out" 2> "$work/log" &
  server=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.1; done
  # shellcheck disable=SC2034 # used by the sourcing script
  target="http://$(sed -n 's/^byokd listening on //p' "$work/out")"
}
