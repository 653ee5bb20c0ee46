#!/usr/bin/env bash
# cpu-per-txn.sh - CPU time and syscalls per transaction of each proxy process (issue 16).
#
# Usage: cpu-per-txn.sh [--pgwake NAME=BIN[:RELAY_THREADS]]... [--no-haproxy] [--clients 8,32]
#                       [-t TXNS] [--rounds N] [--strace] [--copy ROWS] [--connect] [--port-base P]
#
# Starts a throwaway Postgres (pg-up.sh), haproxy as a plain L4 forwarder (unless
# --no-haproxy) and one pgwake per --pgwake (a static endpoint "bench"; RELAY_THREADS, if
# given, becomes [proxy] relay_threads, e.g. 0 for sessions on the main runtime). Then, per
# round, per client count, per proxy (interleaved), runs
#   pgbench -n -t TXNS -c C -j 2 -f select1.sql
# through the proxy and reads utime+stime of the proxy process (all threads,
# /proc/PID/stat) before and after: CPU us per transaction. Less sensitive to other load on
# the machine than tps, which is printed too, with the load average. With --strace, also one
# `strace -c -f -p PID` per proxy around `pgbench -n -t 5000 -c 8`: syscalls and futex calls
# per transaction. --connect adds pgbench -C (a new connection per transaction), so the
# figures are per connection. With --copy ROWS, the workload is instead one
#   psql -c "COPY (SELECT repeat('x',1000) FROM generate_series(1,ROWS)) TO STDOUT" >/dev/null
# per round and proxy (compare.sh's bulk-copy with ROWS=1000000): MB/s and CPU ms per 100 MB
# of the proxy, and with --strace, syscalls per MB. Everything started here is stopped at
# the end.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

PGWAKES=()
HAPROXY=1
CLIENTS=8,32
TXNS=4000
ROUNDS=2
STRACE=0
COPY_ROWS=0
CONNECT=()
BASE=25450
while [ $# -gt 0 ]; do
  case "$1" in
    --pgwake) PGWAKES+=("$2"); shift 2 ;;
    --no-haproxy) HAPROXY=0; shift ;;
    --clients) CLIENTS=$2; shift 2 ;;
    -t) TXNS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --strace) STRACE=1; shift ;;
    --copy) COPY_ROWS=$2; shift 2 ;;
    --connect) CONNECT=(-C); shift ;;
    --port-base) BASE=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ ${#PGWAKES[@]} -gt 0 ] || PGWAKES=("pgwake=$HERE/../target/release/pgwake")
[ "$HAPROXY" = 0 ] || command -v haproxy >/dev/null || die "haproxy not installed (--no-haproxy)"
[ "$STRACE" = 0 ] || command -v strace >/dev/null || die "strace not installed"

PG_PORT=$BASE
bench_workdir cpu
NAMES=()
PORTS=()
OPTS=()

"$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pg" --set max_connections=100 >/dev/null
echo 'SELECT 1;' >"$WORK/select1.sql"

port=$((BASE + 1))
if [ "$HAPROXY" = 1 ]; then
  haproxy_l4_config "$port" "127.0.0.1:$PG_PORT" >"$WORK/haproxy.cfg"
  haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
  PIDS+=($!); NAMES+=(haproxy); PORTS+=("$port"); OPTS+=("")
  wait_port 127.0.0.1 "$port" 10 || die "haproxy did not listen"
  port=$((port + 1))
fi
for spec in "${PGWAKES[@]}"; do
  name=${spec%%=*}
  rest=${spec#*=}
  bin=${rest%%:*}
  threads=""
  [ "$rest" != "$bin" ] && threads=${rest#*:}
  [ -x "$bin" ] || die "no pgwake binary at $bin"
  static_pgwake_config "$port" "127.0.0.1:$PG_PORT" "$WORK/$name-data" "$threads" >"$WORK/$name.toml"
  PGWAKE_LOG=warn "$bin" --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!); NAMES+=("$name"); PORTS+=("$port"); OPTS+=("endpoint=bench")
  wait_port 127.0.0.1 "$port" 20 || { cat "$WORK/$name.log" >&2; die "$name did not listen"; }
  port=$((port + 1))
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# pgbench through target $1 with clients $2 and transactions per client $3; prints tps.
run_pgbench() {
  local i=$1
  PGOPTIONS=${OPTS[$i]} pgbench -n -h 127.0.0.1 -p "${PORTS[$i]}" -U postgres -c "$2" -j 2 ${CONNECT[@]+"${CONNECT[@]}"} \
    -t "$3" -f "$WORK/select1.sql" postgres 2>&1 | awk '/^tps/ {printf "%.0f", $3}'
}

# COPY through target $1 to /dev/null; prints "bytes seconds".
run_copy() {
  local i=$1 t0 t1
  t0=$(date +%s%N)
  PGOPTIONS=${OPTS[$i]} psql -X -q -h 127.0.0.1 -p "${PORTS[$i]}" -U postgres -d postgres \
    -c "COPY (SELECT repeat('x',1000) FROM generate_series(1,$COPY_ROWS)) TO STDOUT" |
    wc -c | tr -d '\n'
  t1=$(date +%s%N)
  echo " $(((t1 - t0) / 1000))"
}

# Runs "${@:2}" (a workload through proxy $1) under `strace -c -f -p` of that proxy, with
# the workload's output on stdout; the counts go to $WORK/strace-NAME.txt.
under_strace() {
  local i=$1 spid
  shift
  strace -c -f -p "${PIDS[$i]}" -o "$WORK/strace-${NAMES[$i]}.txt" &
  spid=$!
  sleep 0.5
  "$@"
  kill -INT "$spid"
  wait "$spid" 2>/dev/null || true
}

# From proxy $1's strace counts over $2 units (transactions, MB): "calls per unit <TAB> futex
# per unit <TAB> every call made at least $3 times per unit", with $4 decimals.
strace_per() {
  awk -v n="$2" -v min="$3" -v d="$4" '
    $1 ~ /^[0-9.]+$/ && NF >= 5 { calls = $4; sc = $NF; if (sc == "total") { total = calls; next }
                                  per[sc] = calls / n }
    END { top = ""; for (k in per) if (per[k] >= min) top = top sprintf("%s %.*f ", k, d, per[k])
          printf "%.*f\t%.*f\t%s\n", d, total / n, d + 1, per["futex"] + 0, top }' \
    "$WORK/strace-${NAMES[$1]}.txt"
}

if [ "$COPY_ROWS" -gt 0 ]; then
  echo "# cpu-per-copy: $(uptime | sed 's/.*load/load/'); $(nproc) cores; COPY of $COPY_ROWS rows"
  echo "# ${PGWAKES[*]}"
  printf 'round\tproxy\tMB\tMB_per_s\tcpu_ms_per_100MB\n'
  for r in $(seq 1 "$ROUNDS"); do
    for i in "${!NAMES[@]}"; do
      pid=${PIDS[$i]}
      before=$(ticks "$pid")
      read -r bytes us < <(run_copy "$i")
      after=$(ticks "$pid")
      awk -v b="$bytes" -v us="$us" -v d="$((after - before))" -v hz="$HZ" -v r="$r" \
        -v name="${NAMES[$i]}" \
        'BEGIN { printf "%s\t%s\t%.0f\t%.0f\t%.1f\n", r, name, b / 1e6, b / us, d / hz * 1e3 / (b / 1e8) }'
    done
  done
  echo "# load after: $(uptime | sed 's/.*load average: //')"
  if [ "$STRACE" = 1 ]; then
    printf '\nproxy\tMB\tsyscalls_per_MB\tfutex_per_MB\ttop calls per MB\n'
    for i in "${!NAMES[@]}"; do
      under_strace "$i" run_copy "$i" >"$WORK/copy.out"
      read -r bytes _ <"$WORK/copy.out"
      mb=$(awk -v b="$bytes" 'BEGIN { printf "%.0f", b / 1e6 }')
      printf '%s\t%s\t%s\n' "${NAMES[$i]}" "$mb" "$(strace_per "$i" "$mb" 0.5 1)"
    done
  fi
  exit 0
fi

echo "# cpu-per-txn: $(uptime | sed 's/.*load/load/'); $(nproc) cores; pgbench -t $TXNS ${CONNECT[*]} -f select1.sql"
echo "# ${PGWAKES[*]}"
printf 'round\tclients\tproxy\ttps\tcpu_us_per_txn\n'
for r in $(seq 1 "$ROUNDS"); do
  for c in ${CLIENTS//,/ }; do
    for i in "${!NAMES[@]}"; do
      pid=${PIDS[$i]}
      before=$(ticks "$pid")
      tps=$(run_pgbench "$i" "$c" "$TXNS")
      after=$(ticks "$pid")
      awk -v n="$((c * TXNS))" -v d="$((after - before))" -v hz="$HZ" -v r="$r" -v c="$c" \
        -v name="${NAMES[$i]}" -v tps="$tps" \
        'BEGIN { printf "%s\t%s\t%s\t%s\t%.1f\n", r, c, name, tps, d / hz * 1e6 / n }'
    done
  done
done
echo "# load after: $(uptime | sed 's/.*load average: //')"

if [ "$STRACE" = 1 ]; then
  printf '\nproxy\ttxns\tsyscalls_per_txn\tfutex_per_txn\ttop calls per txn\n'
  for i in "${!NAMES[@]}"; do
    under_strace "$i" run_pgbench "$i" 8 5000 >/dev/null
    printf '%s\t40000\t%s\n' "${NAMES[$i]}" "$(strace_per "$i" 40000 0.05 2)"
  done
fi
