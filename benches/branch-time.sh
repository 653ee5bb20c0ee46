#!/usr/bin/env bash
# branch-time.sh - how long a local branch of a ~1 GB parent takes (issue 17), next to a plain
# copy of the same directory, in ONE run on the same filesystem.
#
# Usage: branch-time.sh [--size-mb N] [--rounds N] [--dir DIR] [--out FILE] [--pgwake-bin PATH]
#
# Setup: a pgwake (local backend, one endpoint "main", management API on) with its data root
# in a mktemp -d under --dir (default /tmp: the filesystem decides whether reflinks are
# possible; its type is in the report), `main` filled with a table of about --size-mb MB
# (1000-byte rows, stored uncompressed). Then, --rounds times, in this order:
#   cp -a         `cp -a --reflink=never` of main's suspended data directory, then `sync -f`
#                 (what a plain copy costs, made durable like pgwake's)
#   suspended     POST /v1/endpoints {"parent": "main"} with main suspended: pgwake's file
#                 copy (`cp -a --reflink=auto`, syncfs, rename, record)
#   running       the same with main running (woken by a query first): pg_basebackup -X
#                 stream, fast checkpoint
# each timed by the wall clock around the command or the HTTP request; the copies are deleted
# (remove_data) after each round. Page cache warm (the parent was just written and read).
# The pgwake binary only orchestrates; the time is in cp and pg_basebackup, so a debug build
# is fine (default: ${CARGO_TARGET_DIR:-target}/debug/pgwake, built if missing).
#
# Options:
#   --size-mb N        the parent's table size in MB (default 1000)
#   --rounds N         repetitions (default 2)
#   --dir DIR          where the temporary data root goes (default /tmp)
#   --out FILE         the report (default benches/results/branch-time-<date>.md)
#   --ports PX,API     proxy and management API ports on 127.0.0.1 (default 25492,25493)
#   --pgwake-bin PATH  pgwake binary
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

SIZE_MB=1000
ROUNDS=2
BASE=/tmp
OUT=""
PORTS="25492,25493"
PGWAKE_BIN=${PGWAKE_BIN:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mb) SIZE_MB=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --dir) BASE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --ports) PORTS=$2; shift 2 ;;
    --pgwake-bin) PGWAKE_BIN=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
IFS=, read -r PX_PORT API_PORT <<<"$PORTS"
[[ "$SIZE_MB" =~ ^[1-9][0-9]*$ ]] || die "--size-mb wants a positive number"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive number"
command -v curl >/dev/null || die "curl not found"
OUT=${OUT:-$HERE/results/branch-time-$(date +%Y-%m-%d).md}
if [ -z "$PGWAKE_BIN" ]; then
  PGWAKE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/debug/pgwake
  [ -x "$PGWAKE_BIN" ] || (cd "$REPO" && cargo build --bin pgwake)
fi

TMP=$(mktemp -d "$BASE/bench-branch.XXXXXX")
chmod 755 "$TMP"
PGWAKE_PID=""
cleanup() {
  if [ -n "$PGWAKE_PID" ]; then
    kill -TERM "$PGWAKE_PID" 2>/dev/null || true
    wait "$PGWAKE_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

TOKEN=bench-branch-token
API="http://127.0.0.1:$API_PORT"
cat >"$TMP/pgwake.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PX_PORT"
[compute]
idle_timeout = "30m"
wake_timeout = "600s"
[manager]
listen = "127.0.0.1:$API_PORT"
[api]
management_token = "$TOKEN"
[local]
data_root = "$TMP/data"
create_data_root = true
[local.settings]
shared_buffers = "128MB"

[[endpoint]]
id = "main"
backend = "local"
EOF
PGWAKE_LOG=warn "$PGWAKE_BIN" --config "$TMP/pgwake.toml" >"$TMP/pgwake.log" 2>&1 &
PGWAKE_PID=$!
for _ in $(seq 1 600); do
  curl -sf "$API/v1/endpoints" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "$API/v1/endpoints" >/dev/null || die "pgwake did not start: $(tail -5 "$TMP/pgwake.log")"

main_sql() {
  psql -X -A -t -v ON_ERROR_STOP=1 \
    "host=127.0.0.1 port=$PX_PORT user=postgres dbname=postgres options=endpoint=main" -c "$1"
}
suspend_main() {
  for _ in $(seq 1 600); do
    curl -sf -X POST "$API/v1/endpoints/main/suspend" | grep -q '"suspended":true' && return
    [ "$(curl -sf "$API/v1/endpoints/main" | sed -n 's/.*"phase":"\([a-z]*\)".*/\1/p')" = suspended ] && return
    sleep 0.1
  done
  die "main did not suspend"
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
branch() {
  local t0 t1 code
  t0=$(now)
  code=$(curl -s -o "$TMP/answer.json" -w '%{http_code}' -X POST "$API/v1/endpoints" \
    -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d "{\"parent\": \"main\", \"id\": \"$1\"}")
  t1=$(now)
  [ "$code" = 201 ] || die "branch $1: $code $(cat "$TMP/answer.json")"
  secs "$t0" "$t1"
}
delete() {
  curl -sf -X DELETE -H "Authorization: Bearer $TOKEN" "$API/v1/endpoints/$1?remove_data=true" >/dev/null
}

ROWS=$((SIZE_MB * 1000))
log "filling main with $ROWS rows of 1000 bytes"
main_sql "create table big (i bigint, pad text); insert into big select g, repeat(md5(g::text), 31) || 'xxxxxxxx' from generate_series(1, $ROWS) g; checkpoint; checkpoint;" >/dev/null
DB_MB=$(main_sql "select pg_database_size('postgres') / 1000000")
suspend_main
DIR_MB=$(du -sm "$TMP/data/main" | cut -f1)
FS=$(stat -f -c %T "$TMP")
log "main: database $DB_MB MB, data directory $DIR_MB MB, filesystem $FS"

RESULTS=()
for r in $(seq 1 "$ROUNDS"); do
  suspend_main
  t0=$(now)
  cp -a --reflink=never "$TMP/data/main" "$TMP/plain-copy"
  sync -f "$TMP/plain-copy"
  t1=$(now)
  CP=$(secs "$t0" "$t1")
  rm -rf "$TMP/plain-copy"
  SUSP=$(branch "b-suspended-$r")
  main_sql "select count(*) from big where i % 100000 = 0" >/dev/null
  RUN=$(branch "b-running-$r")
  delete "b-suspended-$r"
  delete "b-running-$r"
  log "round $r: cp -a ${CP}s, suspended branch ${SUSP}s, running branch ${RUN}s"
  RESULTS+=("| $r | $CP | $SUSP | $RUN |")
done

mkdir -p "$(dirname "$OUT")"
{
  echo "# branch-time.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Parent: database $DB_MB MB, data directory $DIR_MB MB; filesystem $FS ($BASE);"
  echo "$(nproc) CPUs, load average before the report: $(cut -d' ' -f1-3 /proc/loadavg);"
  echo "pgwake $PGWAKE_BIN; $("$PG_BIN/postgres" -V). Seconds, wall clock, page cache warm."
  echo
  echo "| round | cp -a --reflink=never + sync | branch, parent suspended (file copy) | branch, parent running (pg_basebackup) |"
  echo "|---|---|---|---|"
  printf '%s\n' "${RESULTS[@]}"
} | tee "$OUT"
