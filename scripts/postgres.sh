# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/bench-replicas.sh: provides PostgreSQL.
# BYOKD_TEST_DATABASE_URL if it is set (a role that may create databases). Otherwise the
# machine's PostgreSQL cluster, started if it is down and installed from Debian's packages if
# there is none, with a role byokd_test (its password kept in the tools directory,
# ${BYOKD_TEST_TOOLS_DIR:-~/.cache/byokd-tests}) for use over 127.0.0.1, and TLS with a test CA
# (BYOKD_TEST_PG_CA): provide_postgres exports BYOKD_TEST_DATABASE_URL (and BYOKD_TEST_PG_CA).
# Also defines apt_install (Debian packages, with sudo when not root).

apt_install() {
  local sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq "$@"
}

# Runs psql as the cluster's superuser (peer authentication on the local socket).
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
provide_postgres() {
  if [ -z "${BYOKD_TEST_DATABASE_URL:-}" ]; then
    if ! command -v pg_lsclusters >/dev/null 2>&1; then
      apt_install postgresql
    fi
    cluster="$(pg_lsclusters -h | sort -k1,1V | tail -n 1)"
    if [ -z "$cluster" ]; then
      version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
      pg_createcluster "$version" main >/dev/null
      cluster="$(pg_lsclusters -h | sort -k1,1V | tail -n 1)"
    fi
    read -r pg_version pg_name pg_port pg_status _ <<< "$cluster"
    if [ "$pg_status" != online ]; then
      pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$pg_name" start
    fi
    # The role's password, made once and kept beside the test tools (so that a later
    # `cargo test` can reuse BYOKD_TEST_DATABASE_URL as this run prints it).
    pg_secret="${BYOKD_TEST_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/byokd-tests}/pg-password"
    if [ ! -s "$pg_secret" ]; then
      mkdir -p "$(dirname "$pg_secret")"
      (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$pg_secret")
    fi
    pg_password="$(cat "$pg_secret")"
    printf '%s\n' \
      "SELECT 'CREATE ROLE byokd_test LOGIN CREATEDB' WHERE NOT EXISTS" \
      "  (SELECT FROM pg_roles WHERE rolname = 'byokd_test') \\gexec" \
      "ALTER ROLE byokd_test PASSWORD :'password';" \
      | as_postgres psql -q -p "$pg_port" -v ON_ERROR_STOP=1 -v password="$pg_password"
    export BYOKD_TEST_DATABASE_URL="postgres://byokd_test:$pg_password@127.0.0.1:$pg_port/postgres"
    # TLS, for the tests of sslmode=verify-full: a test CA and a certificate it signs for the
    # name localhost (made once, kept in the cluster owner's home), which the cluster serves.
    # shellcheck disable=SC2016 # expanded by the postgres user's shell
    pg_tls="$(as_postgres sh -c 'echo "$HOME"')/byokd-test-tls"
    if ! as_postgres test -s "$pg_tls/server.pem"; then
      # shellcheck disable=SC2016 # a script for the postgres user, given its directory as $1
      as_postgres sh -euc '
        mkdir -p "$1" && cd "$1"
        ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        openssl req -x509 $ec -days 3650 -subj "/CN=byokd test CA" -keyout ca.key -out ca.pem \
          -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
        openssl req $ec -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
        printf "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n" > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
          -extfile server.ext -out server.pem 2>/dev/null
        chmod 600 ca.key server.key && chmod 644 ca.pem server.pem && chmod 755 .' _ "$pg_tls"
    fi
    for setting in "ssl = on" "ssl_cert_file = '$pg_tls/server.pem'" "ssl_key_file = '$pg_tls/server.key'"; do
      as_postgres psql -q -p "$pg_port" -v ON_ERROR_STOP=1 -c "ALTER SYSTEM SET $setting"
    done
    as_postgres psql -q -p "$pg_port" -v ON_ERROR_STOP=1 -c "SELECT pg_reload_conf()" >/dev/null
    export BYOKD_TEST_PG_CA="$pg_tls/ca.pem"
  fi
}
