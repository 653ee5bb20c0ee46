#!/usr/bin/env bash
# copy-reps.sh - repeated 1 GB COPYs to the client through one pgwake, each checked for its
# full size and bounded in time: finds bulk-relay stalls (issue 16: the old splice relay
# could park with data still queued and never wake up) and shows per-repetition throughput.
#
# Usage: copy-reps.sh [--pgwake-bin PATH] [--reps N] [--timeout S] [--port-base P]
#
# Starts a throwaway Postgres (pg-up.sh, port P) and pgwake (static endpoint "bench",
# port P+1), runs N times (default 10)
#   psql -c "COPY (SELECT repeat('x',1000) FROM generate_series(1,1000000)) TO STDOUT" | wc -c
# under `timeout S` (default 40), prints bytes and ms per repetition, and on a short or
# stalled one prints the sockets (ss -tni) and stops with exit code 1.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BIN=$HERE/../target/release/pgwake
REPS=10
TIMEOUT=40
BASE=25480
while [ $# -gt 0 ]; do
  case "$1" in
    --pgwake-bin) BIN=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --port-base) BASE=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ -x "$BIN" ] || die "no pgwake binary at $BIN"
PG_PORT=$BASE
PORT=$((BASE + 1))
WORK=$(mktemp -d /tmp/bench-copy.XXXXXX)
chmod 755 "$WORK"
PID=""
cleanup() {
  set +e
  stop_pid "$PID" 20
  "$HERE/pg-down.sh" -D "$WORK/pg" --rm >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pg" >/dev/null
static_pgwake_config "$PORT" "127.0.0.1:$PG_PORT" "$WORK/data" >"$WORK/pgwake.toml"
PGWAKE_LOG=warn "$BIN" --config "$WORK/pgwake.toml" >"$WORK/pgwake.log" 2>&1 &
PID=$!
wait_port 127.0.0.1 "$PORT" 20 || die "pgwake did not listen"
WANT=1001000000
echo "# copy-reps: $BIN; $(uptime | sed 's/.*load/load/')"
for r in $(seq 1 "$REPS"); do
  s=$(date +%s%N)
  got=$(PGOPTIONS=endpoint=bench timeout "$TIMEOUT" psql -X -q -h 127.0.0.1 -p "$PORT" \
    -U postgres -d postgres \
    -c "COPY (SELECT repeat('x',1000) FROM generate_series(1,1000000)) TO STDOUT" | wc -c)
  e=$(date +%s%N)
  ms=$(((e - s) / 1000000))
  echo "rep $r: $got bytes in $ms ms ($(awk -v b="$got" -v ms="$ms" 'BEGIN { printf "%.0f", b / 1e3 / ms }') MB/s)"
  if [ "$got" != "$WANT" ]; then
    echo "STALLED or short at rep $r (want $WANT bytes within $TIMEOUT s)"
    ss -tni "( sport = :$PORT or dport = :$PORT or sport = :$PG_PORT )" | head -20
    exit 1
  fi
done
