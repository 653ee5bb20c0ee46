#!/usr/bin/env bash
# Installs what pgwake's demo and tests need on a fresh Debian machine, and nothing that is
# already there: PostgreSQL server + client (postgres, initdb, psql, pgbench), haproxy (the
# PROXY-protocol test's load balancer), and the client drivers of the driver tests: psycopg and
# asyncpg (pip), pgjdbc (Debian's libpostgresql-jdbc-java, with a JDK), node-postgres (npm ci
# in tests/drivers, from its package-lock.json) with the serverless driver and drizzle-orm.
# Safe to run again.
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

if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import asyncpg' >/dev/null 2>&1; then
  echo "setup-deps: installing asyncpg" >&2
  python3 -m pip install --quiet --disable-pip-version-check asyncpg \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages asyncpg
fi

if [ ! -f /usr/share/java/postgresql.jar ] || ! command -v java >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1 \
  || ! command -v npm >/dev/null 2>&1; then
  echo "setup-deps: installing pgjdbc, a JDK and Node.js" >&2
  $SUDO apt-get update -qq
  pkgs="libpostgresql-jdbc-java"
  command -v java >/dev/null 2>&1 || pkgs="$pkgs default-jdk-headless"
  command -v node >/dev/null 2>&1 || pkgs="$pkgs nodejs"
  command -v npm >/dev/null 2>&1 || pkgs="$pkgs npm"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $pkgs >/dev/null
fi

drivers="$(dirname "$0")/../tests/drivers"
if [ ! -f "$drivers/node_modules/.package-lock.json" ] \
  || [ "$drivers/package-lock.json" -nt "$drivers/node_modules/.package-lock.json" ]; then
  echo "setup-deps: installing the JavaScript drivers (npm ci in tests/drivers)" >&2
  (cd "$drivers" && npm ci --no-audit --no-fund --silent)
fi

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
