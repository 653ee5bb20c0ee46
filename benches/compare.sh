#!/usr/bin/env bash
# compare.sh - side-by-side Postgres forwarding benchmark in ONE interleaved run.
#
# Usage: compare.sh [options] [NAME=[user[:password]@]host:port[/dbname][?OPTS] ...]
#
# pgwake/benches copy of /work/shared/bench/compare.sh. The only change: an extra
# target may end in ?OPTS, libpq startup "options" for that target alone, e.g.
#   pgwake=postgres@127.0.0.1:4432/bench?endpoint=bench
# OPTS is '&'-separated; each item is appended to the options string (space
# separated), an "options=" prefix is dropped and %20 becomes a space, so
#   ?endpoint=bench&options=-c%20work_mem=64MB  ->  "endpoint=bench -c work_mem=64MB".
# That target's pgbench/psql runs get PGOPTIONS=<options>, its pgwire.py runs
# --options <options>; every other target runs with PGOPTIONS and --options empty.
#
# Starts a throwaway PostgreSQL 15 cluster (pgbench scale 10, db "bench") and the
# peers found on this machine (haproxy as plain L4 forwarder, pgbouncer and pgcat
# in session mode), then measures every target - "direct", the peers and each
# extra NAME=... target (e.g. the proxy under test) - with:
#   select-only     pgbench -S           -c 1/8/32 -j<=2, DURATION s each
#   select1         pgbench -f SELECT 1  -c 1/8/32 -j<=2, DURATION s each
#   connect         pgbench -C -S -c 4 -j 2 (new connection per transaction)
#   connect-serial  pgwire.py: 200 sequential connect+auth+SELECT 1 (median ms)
#   bulk-copy       psql COPY (SELECT repeat('x',1000) FROM generate_series(1,1e6))
#                   TO STDOUT > /dev/null  (~1 GB), MB/s
# Targets are interleaved within every cell (rotating start), so noise hits all
# of them alike; ratios to "direct" are the numbers to read.  Prints one markdown
# table, keeps raw pgbench output + results.tsv in --out, stops everything it
# started (by PID / pg_ctl) and removes its temporary directory.
#
# Extra targets (NAME=...): they must reach the same data (database "bench" with pgbench
# tables, or whatever /dbname you give) and accept user "postgres" (trust) unless
# you give user[:password]@.  Their first connection is timed separately (it may
# include a wake-on-connect cold start) before any load is sent.
#
# Options:
#   -T, --duration S     seconds per pgbench run (default: auto from --budget, 5..15)
#   --budget S           target wall time for the whole run (default 480)
#   --clients "1 8 32"   client counts for the TPS tests
#   --peers LIST         comma list from haproxy,pgbouncer,pgcat (default: all
#                        that are installed); --peers none for no peers
#   --external-pg H:P    use an already running Postgres as "direct" (needs db
#                        "bench"; pgbench tables are created if missing)
#   --tests LIST         comma list (default select-only,select1,connect,connect-serial,bulk-copy)
#   --bulk-reps N        repetitions of the bulk COPY per target (default 2)
#   --scale N            pgbench scale (default 10)
#   --ports A,B,C,D      ports for postgres,haproxy,pgbouncer,pgcat
#                        (default 55432,55433,55434,55435)
#   --out DIR            results directory (default /tmp/bench-results/<timestamp>)
#   --keep               keep the temporary cluster/config directory
#   --sslmode MODE       libpq sslmode for all clients (default disable)
# Env: PGCAT_BIN (default: pgcat on PATH, else /tmp/pgcat-install/bin/pgcat)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

DURATION=""
BUDGET=480
CLIENTS="1 8 32"
PEERS="auto"
EXTERNAL=""
TESTS="select-only,select1,connect,connect-serial,bulk-copy"
BULK_REPS=2
BULK_ROWS=1000000
CONN_N=200
SCALE=10
PORTS="55432,55433,55434,55435"
OUT=""
KEEP=0
SSLMODE=disable
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -T|--duration) DURATION=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --peers) PEERS=$2; shift 2 ;;
    --no-peers) PEERS=none; shift ;;
    --external-pg) EXTERNAL=$2; shift 2 ;;
    --tests) TESTS=$2; shift 2 ;;
    --bulk-reps) BULK_REPS=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    --ports) PORTS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --sslmode) SSLMODE=$2; shift 2 ;;
    -h|--help) sed -n '2,55p' "$0"; exit 0 ;;
    *=*) EXTRA+=("$1"); shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
IFS=, read -r PG_PORT HAPROXY_PORT PGBOUNCER_PORT PGCAT_PORT <<<"$PORTS"
export PGSSLMODE=$SSLMODE PGGSSENCMODE=disable PGCONNECT_TIMEOUT=60
has_test() { [[ ",$TESTS," == *",$1,"* ]]; }

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/bench-results/$STAMP}
mkdir -p "$OUT/raw"
WORK=$(mktemp -d /tmp/bench-cmp.XXXXXX)
chmod 755 "$WORK"
PIDS=()
PG_STARTED=0
T0=$(date +%s)

cleanup() {
  local rc=$?
  set +e
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
  if [ "$PG_STARTED" = 1 ]; then "$HERE/pg-down.sh" -D "$WORK/pgdata" >/dev/null 2>&1; fi
  if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- targets
T_NAME=() T_HOST=() T_PORT=() T_USER=() T_PASS=() T_DB=() T_OPTS=()
# add_target NAME HOST PORT USER PASS DB [OPTIONS]   (OPTIONS: libpq startup "options")
add_target() { T_NAME+=("$1") T_HOST+=("$2") T_PORT+=("$3") T_USER+=("$4") T_PASS+=("$5") T_DB+=("$6") T_OPTS+=("${7:-}"); }
drop_target() { # remove target by name
  local n=() h=() p=() u=() pw=() d=() o=() i
  for i in "${!T_NAME[@]}"; do
    [ "${T_NAME[$i]}" = "$1" ] && continue
    n+=("${T_NAME[$i]}") h+=("${T_HOST[$i]}") p+=("${T_PORT[$i]}") u+=("${T_USER[$i]}") pw+=("${T_PASS[$i]}") d+=("${T_DB[$i]}") o+=("${T_OPTS[$i]}")
  done
  T_NAME=("${n[@]}") T_HOST=("${h[@]}") T_PORT=("${p[@]}") T_USER=("${u[@]}") T_PASS=("${pw[@]}") T_DB=("${d[@]}") T_OPTS=("${o[@]}")
}
FAILED=()

# ---------------------------------------------------------------- postgres
if [ -n "$EXTERNAL" ]; then
  PG_HOST=${EXTERNAL%:*} PG_PORT=${EXTERNAL##*:}
  log "using external Postgres $PG_HOST:$PG_PORT"
  have=$(psql -X -Atq -h "$PG_HOST" -p "$PG_PORT" -U "$BENCH_PG_USER" -d bench -c \
    "SELECT CASE WHEN to_regclass('pgbench_branches') IS NULL THEN 0 ELSE (SELECT count(*) FROM pgbench_branches) END") \
    || die "cannot query database bench on $EXTERNAL"
  if [ "$have" = 0 ]; then
    pgbench -i -q -s "$SCALE" -h "$PG_HOST" -p "$PG_PORT" -U "$BENCH_PG_USER" bench >"$OUT/raw/pgbench-init.txt" 2>&1
  fi
else
  PG_HOST=127.0.0.1
  port_in_use "$PG_PORT" && die "port $PG_PORT in use (use --ports)"
  PG_STARTED=1
  "$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pgdata" --scale "$SCALE" --set shared_buffers=256MB >/dev/null
fi
add_target direct "$PG_HOST" "$PG_PORT" "$BENCH_PG_USER" "" bench

# ---------------------------------------------------------------- peers
if [ "$PEERS" = auto ]; then
  PEERS=""
  command -v haproxy >/dev/null 2>&1 && PEERS+="haproxy,"
  command -v pgbouncer >/dev/null 2>&1 && PEERS+="pgbouncer,"
  PGCAT_BIN=${PGCAT_BIN:-$(command -v pgcat || echo /tmp/pgcat-install/bin/pgcat)}
  [ -x "$PGCAT_BIN" ] && PEERS+="pgcat,"
  PEERS=${PEERS%,}
elif [ "$PEERS" = none ]; then
  PEERS=""
fi
PGCAT_BIN=${PGCAT_BIN:-$(command -v pgcat || echo /tmp/pgcat-install/bin/pgcat)}

start_haproxy() {
  local d=$WORK/haproxy
  mkdir -p "$d"
  haproxy_l4_config "$HAPROXY_PORT" "$PG_HOST:$PG_PORT" >"$d/haproxy.cfg"
  haproxy -db -f "$d/haproxy.cfg" >"$OUT/raw/haproxy.log" 2>&1 &
  PIDS+=($!)
  add_target haproxy 127.0.0.1 "$HAPROXY_PORT" "$BENCH_PG_USER" "" bench
}

start_pgbouncer() {
  local d=$WORK/pgbouncer
  mkdir -p "$d"
  printf '"%s" ""\n' "$BENCH_PG_USER" >"$d/userlist.txt"
  cat >"$d/pgbouncer.ini" <<EOF
[databases]
bench = host=$PG_HOST port=$PG_PORT dbname=bench
* = host=$PG_HOST port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $d/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 100
ignore_startup_parameters = extra_float_digits
logfile = $d/pgbouncer.log
log_connections = 0
log_disconnections = 0
admin_users = $BENCH_PG_USER
EOF
  pg_own "$d"
  (as_pg_exec pgbouncer "$d/pgbouncer.ini") >"$OUT/raw/pgbouncer.stderr" 2>&1 &
  PIDS+=($!)
  add_target pgbouncer 127.0.0.1 "$PGBOUNCER_PORT" "$BENCH_PG_USER" "" bench
}

start_pgcat() {
  local d=$WORK/pgcat
  mkdir -p "$d"
  cat >"$d/pgcat.toml" <<EOF
[general]
host = "127.0.0.1"
port = $PGCAT_PORT
admin_username = "pgcat"
admin_password = "pgcat"
worker_threads = 2
log_client_connections = false
log_client_disconnections = false

[pools.bench]
pool_mode = "session"

[pools.bench.users.0]
username = "$BENCH_PG_USER"
password = "pgcat-client-pw"
pool_size = 100
min_pool_size = 0

[pools.bench.shards.0]
servers = [["$PG_HOST", $PG_PORT, "primary"]]
database = "bench"
EOF
  "$PGCAT_BIN" --log-level warn --no-color "$d/pgcat.toml" >"$OUT/raw/pgcat.log" 2>&1 &
  PIDS+=($!)
  # pgcat always asks clients for an md5 password (the backend side stays trust)
  add_target pgcat 127.0.0.1 "$PGCAT_PORT" "$BENCH_PG_USER" "pgcat-client-pw" bench
}

for p in ${PEERS//,/ }; do
  case "$p" in
    haproxy) port_in_use "$HAPROXY_PORT" && die "port $HAPROXY_PORT in use"; start_haproxy ;;
    pgbouncer) port_in_use "$PGBOUNCER_PORT" && die "port $PGBOUNCER_PORT in use"; start_pgbouncer ;;
    pgcat) port_in_use "$PGCAT_PORT" && die "port $PGCAT_PORT in use"; start_pgcat ;;
    *) die "unknown peer $p" ;;
  esac
done

# ---------------------------------------------------------------- extra targets
for spec in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  name=${spec%%=*} rest=${spec#*=}
  user=$BENCH_PG_USER pass="" db=bench
  if [[ "$rest" == *@* ]]; then
    cred=${rest%@*} rest=${rest##*@}
    user=${cred%%:*}
    [[ "$cred" == *:* ]] && pass=${cred#*:}
  fi
  opts=""
  if [[ "$rest" == *\?* ]]; then # ?k=v&... -> libpq startup options for this target only
    IFS='&' read -r -a items <<<"${rest#*\?}"
    rest=${rest%%\?*}
    for it in "${items[@]}"; do
      [ -n "$it" ] || continue
      it=${it#options=}
      opts+="${opts:+ }${it//%20/ }"
    done
  fi
  if [[ "$rest" == */* ]]; then db=${rest#*/} rest=${rest%%/*}; fi
  [[ "$rest" =~ ^(.+):([0-9]+)$ ]] || die "bad target spec '$spec' (want NAME=[user[:pw]@]host:port[/db][?options])"
  add_target "$name" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "$user" "$pass" "$db" "$opts"
  [ -n "$opts" ] && log "target $name: startup options '$opts'"
done

# ---------------------------------------------------------------- readiness
RES=$OUT/results.tsv
printf 'test\tclients\ttarget\tvalue\tunit\tlat_ms\tnote\n' >"$RES"
for name in "${T_NAME[@]}"; do
  for i in "${!T_NAME[@]}"; do [ "${T_NAME[$i]}" = "$name" ] && break; done
  # first connection: generous timeout, it may include a wake-on-connect cold start
  wait_port "${T_HOST[$i]}" "${T_PORT[$i]}" 20 || true
  if r=$(PGPASSWORD="${T_PASS[$i]}" python3 "$HERE/pgwire.py" probe --once --timeout 60 \
      --host "${T_HOST[$i]}" --port "${T_PORT[$i]}" --user "${T_USER[$i]}" --db "${T_DB[$i]}" \
      --options "${T_OPTS[$i]}"); then
    first_ms=$(python3 -c 'import json,sys; print("%.1f" % (json.loads(sys.argv[1])["ready_s"]*1000))' "$r")
    log "target $name ok (${T_HOST[$i]}:${T_PORT[$i]}), first connect+SELECT 1 ${first_ms} ms"
    printf 'first-connect\t1\t%s\t\tms\t%s\tfirst connection after start\n' "$name" "$first_ms" >>"$RES"
  else
    log "target $name FAILED readiness check: $r"
    FAILED+=("$name: readiness check failed: $r")
    drop_target "$name"
  fi
done
[ "${#T_NAME[@]}" -gt 0 ] || die "no usable target"

NT=${#T_NAME[@]}
NC=$(wc -w <<<"$CLIENTS")
if [ -z "$DURATION" ]; then
  cells=0
  has_test select-only && cells=$((cells + NC))
  has_test select1 && cells=$((cells + NC))
  has_test connect && cells=$((cells + 1))
  fixed=$((30 + NT * 3))                                   # setup + warm-up
  has_test connect-serial && fixed=$((fixed + NT * 2))
  has_test bulk-copy && fixed=$((fixed + NT * BULK_REPS * 4))
  if [ "$cells" -gt 0 ]; then
    DURATION=$(((BUDGET - fixed) / (cells * NT)))
    [ "$DURATION" -gt 15 ] && DURATION=15
    [ "$DURATION" -lt 5 ] && DURATION=5
  else
    DURATION=15
  fi
fi
log "targets: ${T_NAME[*]}; ${DURATION}s per pgbench run; results in $OUT"

cat >"$WORK/select1.sql" <<'EOF'
SELECT 1;
EOF

# ---------------------------------------------------------------- runners
pg_env() { # index -> env assignments for libpq
  local i=$1
  if [ -n "${T_PASS[$i]}" ]; then echo "PGPASSWORD=${T_PASS[$i]}"; else echo "PGPASSWORD="; fi
}
pg_opts() { # index -> PGOPTIONS assignment (empty for targets without ?options)
  echo "PGOPTIONS=${T_OPTS[$1]}"
}

run_pgbench() { # index test clients duration args...
  local i=$1 test=$2 c=$3 dur=$4; shift 4
  local j=$((c < 2 ? c : 2))
  local f="$OUT/raw/$test.c$c.${T_NAME[$i]}.$(date +%H%M%S).txt"
  local rc=0
  env "$(pg_env "$i")" "$(pg_opts "$i")" pgbench -n -h "${T_HOST[$i]}" -p "${T_PORT[$i]}" -U "${T_USER[$i]}" \
    -T "$dur" -c "$c" -j "$j" "$@" "${T_DB[$i]}" >"$f" 2>&1 || rc=$?
  local tps lat failed conn note=""
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$f" | head -1)
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$f" | head -1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$f" | head -1)
  conn=$(sed -n 's/^average connection time = \([0-9.]*\) ms.*/\1/p' "$f" | head -1)
  [ -n "$conn" ] && note="avg conn time ${conn} ms"
  if [ "$rc" != 0 ] || [ -z "$tps" ]; then
    note="FAILED rc=$rc, see $(basename "$f")"
    FAILED+=("${T_NAME[$i]} $test c=$c: pgbench rc=$rc ($(tail -1 "$f"))")
  elif [ -n "$failed" ] && [ "$failed" != 0 ]; then
    note="$note failed txns=$failed"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$test" "$c" "${T_NAME[$i]}" "${tps:-NA}" "$unit" "${lat:-NA}" "$note" >>"$RES"
  log "  $test c=$c ${T_NAME[$i]}: tps=${tps:-NA} lat=${lat:-NA}ms $note"
}

rot=0
each_target() { # run "$@" with target index appended as first arg, rotating start
  local k i
  for ((k = 0; k < NT; k++)); do
    i=$(((k + rot) % NT))
    "$@" "$i"
  done
  rot=$((rot + 1))
}

# warm-up: 2 s of pgbench -S per target (fills caches / pools), not recorded
warm() { env "$(pg_env "$1")" "$(pg_opts "$1")" pgbench -n -h "${T_HOST[$1]}" -p "${T_PORT[$1]}" -U "${T_USER[$1]}" -T 2 -c 8 -j 2 -S "${T_DB[$1]}" >/dev/null 2>&1 || true; }
log "warm-up"
each_target warm

cell_pgbench() { local test=$1 c=$2 i=$3; shift 3; run_pgbench "$i" "$test" "$c" "$DURATION" "${ARGS[@]}"; }

unit=tps
for c in $CLIENTS; do
  if has_test select-only; then ARGS=(-S); each_target cell_pgbench select-only "$c"; fi
  if has_test select1; then ARGS=(-f "$WORK/select1.sql"); each_target cell_pgbench select1 "$c"; fi
done
if has_test connect; then
  unit="tps"
  ARGS=(-C -S)
  each_target cell_pgbench connect 4
fi

if has_test connect-serial; then
  serial() {
    local i=$1 r
    if r=$(env "$(pg_env "$i")" python3 "$HERE/pgwire.py" connect -n "$CONN_N" --host "${T_HOST[$i]}" \
        --port "${T_PORT[$i]}" --user "${T_USER[$i]}" --db "${T_DB[$i]}" --options "${T_OPTS[$i]}"); then
      python3 - "$r" "${T_NAME[$i]}" >>"$RES" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print("connect-serial\t1\t%s\t%.1f\tconn/s\t%.3f\tp99 %.2f ms, n=%d" % (sys.argv[2], r["per_s"], r["median"], r["p99"], r["n"]))
PY
      log "  connect-serial ${T_NAME[$i]}: $(tail -1 "$RES" | cut -f4-7)"
    else
      FAILED+=("${T_NAME[$i]} connect-serial: $r")
    fi
  }
  each_target serial
fi

if has_test bulk-copy; then
  BYTES=$((BULK_ROWS * 1001))
  bulk() {
    local i=$1 t0 t1 rc=0
    t0=$(date +%s%N)
    env "$(pg_env "$i")" "$(pg_opts "$i")" psql -X -q -h "${T_HOST[$i]}" -p "${T_PORT[$i]}" -U "${T_USER[$i]}" -d "${T_DB[$i]}" \
      -c "COPY (SELECT repeat('x',1000) FROM generate_series(1,$BULK_ROWS)) TO STDOUT" >/dev/null \
      2>>"$OUT/raw/bulk.stderr" || rc=$?
    t1=$(date +%s%N)
    if [ "$rc" = 0 ]; then
      awk -v b="$BYTES" -v ns="$((t1 - t0))" -v n="${T_NAME[$i]}" \
        'BEGIN { s = ns / 1e9; printf "bulk-copy\t1\t%s\t%.1f\tMB/s\t%.1f\t%.0f MB; latency column = elapsed ms\n", n, b / 1e6 / s, s * 1000, b / 1e6 }' >>"$RES"
      log "  bulk-copy ${T_NAME[$i]}: $(tail -1 "$RES" | cut -f4-6)"
    else
      FAILED+=("${T_NAME[$i]} bulk-copy: psql rc=$rc")
    fi
  }
  for ((r = 0; r < BULK_REPS; r++)); do each_target bulk; done
fi

# ---------------------------------------------------------------- report
{
  echo "# compare.sh $STAMP"
  echo
  echo "host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  echo "postgres: $("$PG_BIN/postgres" --version)${EXTERNAL:+ (external $EXTERNAL)}"
  [[ ",$PEERS," == *",haproxy,"* ]] && echo "haproxy: $(haproxy -v | head -1)"
  [[ ",$PEERS," == *",pgbouncer,"* ]] && echo "pgbouncer: $(pgbouncer --version | head -1) (session mode)"
  [[ ",$PEERS," == *",pgcat,"* ]] && echo "pgcat: $("$PGCAT_BIN" --version) (session mode, $PGCAT_BIN)"
  echo "targets: $(for i in "${!T_NAME[@]}"; do printf '%s=%s:%s%s ' "${T_NAME[$i]}" "${T_HOST[$i]}" "${T_PORT[$i]}" "${T_OPTS[$i]:+ (options '${T_OPTS[$i]}')}"; done)"
  echo "pgbench: ${DURATION}s per run, -j min(2,c), sslmode=$SSLMODE; targets interleaved; wall $(($(date +%s) - T0)) s"
  echo
  python3 "$HERE/report.py" "$RES"
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo
    echo "Failures:"
    for f in "${FAILED[@]}"; do echo "- $f"; done
  fi
} | tee "$OUT/report.md"
log "results: $OUT/report.md"
