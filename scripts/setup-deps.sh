#!/usr/bin/env bash
# Installs what pgwake's demo and tests need on a fresh Debian machine, and nothing that is
# already there: PostgreSQL server + client (postgres, initdb, psql, pgbench), haproxy (the
# PROXY-protocol test's load balancer), psycopg for
# the third-driver test and the JavaScript drivers (tests/drivers, `npm ci`). Safe to run again.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

have_server() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if ! have_server || ! command -v psql >/dev/null 2>&1 || ! command -v pgbench >/dev/null 2>&1 \
  || ! command -v haproxy >/dev/null 2>&1; then
  echo "setup-deps: installing postgresql and haproxy" >&2
  $SUDO apt-get update -qq
  # The package's postinst may fail to start its own cluster in a container; pgwake does not
  # use that cluster, so that is fine.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql postgresql-client postgresql-contrib haproxy >/dev/null
fi

if command -v python3 >/dev/null 2>&1 && ! PSYCOPG_IMPL=binary python3 -c 'import psycopg' >/dev/null 2>&1; then
  echo "setup-deps: installing psycopg" >&2
  python3 -m pip install --quiet --disable-pip-version-check "psycopg[binary]" \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "psycopg[binary]"
fi

# The serverless driver test (tests/serverless.rs) runs @neondatabase/serverless under node.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup-deps: installing nodejs and npm" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
drivers="$(cd "$(dirname "$0")/.." && pwd)/tests/drivers"
if [ ! -d "$drivers/node_modules" ] || [ "$drivers/package-lock.json" -nt "$drivers/node_modules" ]; then
  echo "setup-deps: npm ci in tests/drivers" >&2
  (cd "$drivers" && npm ci --no-audit --no-fund --silent) && touch "$drivers/node_modules"
fi

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
