#!/usr/bin/env bash
# hold-pgwake.sh - memory per idle proxied session and 10,000 sessions held, pgwake next to
# haproxy, in ONE run against the same server.
#
# Usage: hold-pgwake.sh [--sessions "5000,10000"] [--out DIR] [--pgwake-bin PATH] [--no-haproxy]
#
# What runs (all on 127.0.0.1, under one mktemp -d /tmp/bench-hold.* directory, removed at exit):
#   - Postgres (pg-up.sh) and, in front of it, pgbouncer in transaction mode with
#     max_client_conn 12000: the "compute" both proxies forward to. 10,000 real Postgres
#     backends would need ~30 GiB here; pgbouncer speaks the same protocol, answers every
#     query from a real Postgres and holds 10,000 client sessions in a few hundred MiB. The
#     proxies cannot tell the difference: each session is one client socket, one compute
#     socket and the relay between them.
#   - a release pgwake whose only endpoint "bench" is backend = "static" -> pgbouncer;
#   - haproxy (mode tcp, maxconn as high as the fd limit allows) -> pgbouncer, for comparison.
# For each proxy, `pgwake-bench --hold N,...` opens N sessions (128 connects in flight), runs
# `select 1` on each, then again on every session once all N are open, reads the proxy's
# VmRSS and fd count from /proc, closes them all and waits for the proxy to let go. The
# figure is (RSS with N open - RSS before) / N, in KiB per idle session.
#
# Needs: a hard RLIMIT_NOFILE > 2 x N + 64 (the script raises the soft limit for
# everything it starts: 10,000 sessions are 10,000 client fds, 20,000 in each proxy and
# 10,000 in pgbouncer), ~30,000 free ephemeral ports, postgresql, pgbouncer, haproxy.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

SESSIONS="5000,10000"
OUT=""
PGWAKE_BIN=${PGWAKE_BIN:-}
BENCH_BIN=${BENCH_BIN:-}
HAPROXY=1
# Below the ephemeral range (32768-60999): 20,000 client sockets would otherwise take these
# ports as their local ends and a proxy restarted between runs could not bind.
PG_PORT=25472
BOUNCER_PORT=25473
PGWAKE_PORT=25474
HAPROXY_PORT=25475
while [ $# -gt 0 ]; do
  case "$1" in
    --sessions) SESSIONS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --pgwake-bin) PGWAKE_BIN=$2; shift 2 ;;
    --bench-bin) BENCH_BIN=$2; shift 2 ;;
    --no-haproxy) HAPROXY=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
done
TARGET_DIR=${CARGO_TARGET_DIR:-$HERE/../target}
if [ -z "$PGWAKE_BIN" ] || [ -z "$BENCH_BIN" ]; then
  log "cargo build --release -p pgwake -p pgwake-bench --bins"
  (cd "$HERE/.." && cargo build --release -p pgwake -p pgwake-bench --bins)
  PGWAKE_BIN=${PGWAKE_BIN:-$TARGET_DIR/release/pgwake}
  BENCH_BIN=${BENCH_BIN:-$TARGET_DIR/release/pgwake-bench}
fi
command -v pgbouncer >/dev/null || die "pgbouncer not installed (apt install pgbouncer)"
[ "$HAPROXY" = 0 ] || command -v haproxy >/dev/null || die "haproxy not installed (or --no-haproxy)"
# Each session costs a proxy two fds; beyond the hard limit nothing can be held. Raising the
# hard limit needs CAP_SYS_RESOURCE, which containers often lack: then say what fits.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FD_LIMIT=$(ulimit -n)
MAX_SESSIONS=$(tr ',' '\n' <<<"$SESSIONS" | sort -n | tail -1)
if [ $((MAX_SESSIONS * 2 + 64)) -gt "$FD_LIMIT" ]; then
  log "WARNING: fd limit $FD_LIMIT < 2 x $MAX_SESSIONS sessions + 64: the proxies will run out of fds"
fi
for p in $PG_PORT $BOUNCER_PORT $PGWAKE_PORT $HAPROXY_PORT; do
  port_in_use "$p" && die "port $p in use"
done

OUT=${OUT:-/tmp/bench-results/hold-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw"
WORK=$(mktemp -d /tmp/bench-hold.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  local rc=$?
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}" 30; done
  "$HERE/pg-down.sh" -D "$WORK/pgdata" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT INT TERM

log "postgres on 127.0.0.1:$PG_PORT"
"$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pgdata" --set max_connections=100 >/dev/null

log "pgbouncer (transaction mode, max_client_conn 12000) on 127.0.0.1:$BOUNCER_PORT"
mkdir -p "$WORK/pgbouncer"
printf '"postgres" ""\n' >"$WORK/pgbouncer/userlist.txt"
cat >"$WORK/pgbouncer/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
listen_backlog = 4096
unix_socket_dir =
auth_type = trust
auth_file = $WORK/pgbouncer/userlist.txt
pool_mode = transaction
max_client_conn = 12000
default_pool_size = 8
ignore_startup_parameters = extra_float_digits,options
logfile = $WORK/pgbouncer/pgbouncer.log
log_connections = 0
log_disconnections = 0
EOF
pg_own "$WORK/pgbouncer"
(as_pg_exec pgbouncer "$WORK/pgbouncer/pgbouncer.ini") >"$OUT/raw/pgbouncer.stderr" 2>&1 &
PIDS+=($!)
wait_port 127.0.0.1 "$BOUNCER_PORT" 20 || die "pgbouncer did not start (see $OUT/raw/pgbouncer.stderr)"

cat >"$WORK/pgwake.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PGWAKE_PORT"
max_connections = 12000
[[endpoint]]
id = "bench"
backend = "static"
address = "127.0.0.1:$BOUNCER_PORT"
EOF
"$PGWAKE_BIN" --check-config "$WORK/pgwake.toml" >/dev/null

# run_hold NAME PORT PID N: one pgwake-bench hold run of N sessions against a proxy process.
run_hold() {
  local name=$1 port=$2 pid=$3 n=$4
  log "$name: hold $n sessions"
  "$BENCH_BIN" --proxy "127.0.0.1:$port" --endpoint bench --proxy-pid "$pid" \
    --skip cold,warm,stampede,parallel,throughput --hold "$n" --timeout 60s \
    --out "$OUT/$name-$n" >"$OUT/$name-$n.md" 2>"$OUT/raw/$name-$n-bench.log" ||
    die "$name: pgwake-bench failed (see $OUT/raw/$name-$n-bench.log)"
}

# haproxy refuses to start when maxconn needs more fds than the hard limit allows.
HAPROXY_MAXCONN=$(((FD_LIMIT - 100) / 2))
cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn $HAPROXY_MAXCONN
defaults
    mode tcp
    maxconn $HAPROXY_MAXCONN
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend pg_in
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend pg_out
backend pg_out
    server pg1 127.0.0.1:$BOUNCER_PORT
EOF

# A fresh proxy process for every N: freed memory stays in the allocator's arenas after a
# run, so a second run on the same process would start from a baseline that already holds it.
PROXIES=pgwake
[ "$HAPROXY" = 1 ] && PROXIES+=" haproxy"
for n in ${SESSIONS//,/ }; do
  for name in $PROXIES; do
    case $name in
      pgwake)
        PGWAKE_LOG=warn "$PGWAKE_BIN" --config "$WORK/pgwake.toml" >>"$OUT/raw/pgwake.log" 2>&1 &
        port=$PGWAKE_PORT ;;
      haproxy)
        haproxy -db -f "$WORK/haproxy.cfg" >>"$OUT/raw/haproxy.log" 2>&1 &
        port=$HAPROXY_PORT ;;
    esac
    pid=$!
    PIDS+=("$pid")
    wait_port 127.0.0.1 "$port" 20 || die "$name did not start (see $OUT/raw/$name.log)"
    run_hold "$name" "$port" "$pid" "$n"
    stop_pid "$pid" 30
  done
done

{
  echo "# Idle sessions held: proxy memory per session"
  echo
  echo "$(date -u +%F) on $(nproc) CPUs, $(uname -sr); $("$PGWAKE_BIN" --version 2>/dev/null || echo pgwake);"
  echo "$(haproxy -v 2>/dev/null | head -1); $(pgbouncer --version | head -1) (transaction mode) as the compute."
  echo "Command: benches/hold-pgwake.sh --sessions $SESSIONS (RLIMIT_NOFILE $FD_LIMIT)"
  echo
  echo "| proxy | sessions held | RSS before KiB | RSS held KiB | KiB per session | fds held | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for n in ${SESSIONS//,/ }; do
    for name in $PROXIES; do
      # pgwake-bench's rows: | hold-N | n | p50 ... | errors | and
      # | hold-N | before | held | after | fds before | fds held | per session |
      errs=$(grep "^| hold-$n |" "$OUT/$name-$n.md" | head -1 | awk -F'|' '{print $11+0}')
      grep "^| hold-$n |" "$OUT/$name-$n.md" | tail -1 | awk -F'|' -v p="$name" -v n="$n" -v e="$errs" \
        '{printf "| %s | %s | %d | %d | %.1f | %d | %d |\n", p, n, $3, $4, $8, $7, e}'
    done
  done
  for n in ${SESSIONS//,/ }; do
    for name in $PROXIES; do
      echo
      echo "## $name, $n sessions"
      echo
      cat "$OUT/$name-$n.md"
    done
  done
} >"$OUT/report.md"
log "report: $OUT/report.md"
cat "$OUT/report.md"
