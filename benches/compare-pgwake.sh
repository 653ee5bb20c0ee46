#!/usr/bin/env bash
# compare-pgwake.sh - warm forwarding overhead of pgwake vs direct / haproxy / pgbouncer,
# all in ONE interleaved compare.sh run against the same Postgres.
#
# Usage: compare-pgwake.sh [--pgwake-bin PATH] [--port P] [compare.sh options...]
#
# 1. starts a release pgwake (--log-json) on 127.0.0.1:P (default 25436) whose only
#    endpoint "bench" is backend = "static", address = compare.sh's own Postgres
#    (127.0.0.1:25432, or the first port of --ports, or --external-pg H:P);
# 2. runs compare.sh --peers haproxy,pgbouncer (unless you give --peers) with the extra
#    target  pgwake=postgres@127.0.0.1:P/bench?endpoint=bench  (libpq options
#    endpoint=bench for that target only; the listener is plain TCP, sslmode=disable);
# 3. appends to compare.sh's report.md: load average before/after, the pgwake build and
#    a summary of pgwake's log (lines per level, every WARN/ERROR message with a count);
# 4. stops pgwake (SIGTERM, by PID) and removes its temporary directory.
#
# Options (the rest goes to compare.sh unchanged, e.g. -T 10, --tests, --out DIR):
#   --pgwake-bin PATH  pgwake binary (default $PGWAKE_BIN, else
#                      $CARGO_TARGET_DIR or target/release/pgwake)
#   --port P           pgwake listen port (default 25436; compare.sh gets --ports
#                      25432,25433,25434,25435 unless given: all below the ephemeral range)
#   --pgwake-log LVL   PGWAKE_LOG filter (default info)
#   --relay-threads N  [proxy] relay_threads (default unset: one per core; 0 = sessions on
#                      the main runtime, as before relay threads)
# compare.sh's --out (default /tmp/bench-results/pgwake-<timestamp>) gets report.md,
# results.tsv, raw/ and pgwake.log.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

PGWAKE_BIN=${PGWAKE_BIN:-}
# Ports below the ephemeral range (32768-60999): a run's thousands of client sockets draw
# their local ports from it, and one still closing could keep the next run from binding.
PORT=25436
LOGLVL=info
RELAY_THREADS=""
PASS=()
PG_ADDR=127.0.0.1:25432
OUT=""
HAVE_PEERS=0
HAVE_PORTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --pgwake-bin) PGWAKE_BIN=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --pgwake-log) LOGLVL=$2; shift 2 ;;
    --relay-threads) RELAY_THREADS=$2; shift 2 ;;
    --ports) PG_ADDR=127.0.0.1:${2%%,*}; HAVE_PORTS=1; PASS+=("$1" "$2"); shift 2 ;;
    --external-pg) PG_ADDR=$2; HAVE_PORTS=1; PASS+=("$1" "$2"); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --peers|--no-peers) HAVE_PEERS=1; PASS+=("$1"); [ "$1" = --peers ] && { PASS+=("$2"); shift; }; shift ;;
    -h|--help) sed -n "2,27p" "$0"; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
if [ -z "$PGWAKE_BIN" ]; then
  for b in "${CARGO_TARGET_DIR:-$HERE/../target}/release/pgwake"; do
    [ -x "$b" ] && { PGWAKE_BIN=$b; break; }
  done
fi
[ -x "${PGWAKE_BIN:-}" ] || die "no pgwake binary; build it (cargo build --release) or pass --pgwake-bin"
[ "$HAVE_PEERS" = 1 ] || PASS+=(--peers haproxy,pgbouncer)
[ "$HAVE_PORTS" = 1 ] || PASS+=(--ports 25432,25433,25434,25435)
OUT=${OUT:-/tmp/bench-results/pgwake-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
port_in_use "$PORT" && die "port $PORT in use (use --port)"

WORK=$(mktemp -d /tmp/bench-pgwake.XXXXXX)
chmod 755 "$WORK"
PGWAKE_PID=""
cleanup() {
  local rc=$?
  set +e
  # SIGTERM: pgwake drains (sessions are gone by now) and exits
  [ -n "$PGWAKE_PID" ] && stop_pid "$PGWAKE_PID" 40
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

static_pgwake_config "$PORT" "$PG_ADDR" "$WORK/data" "$RELAY_THREADS" >"$WORK/pgwake.toml"
"$PGWAKE_BIN" --check-config "$WORK/pgwake.toml" >/dev/null

LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"
PGWAKE_LOG=$LOGLVL "$PGWAKE_BIN" --log-json --config "$WORK/pgwake.toml" >"$OUT/pgwake.log" 2>&1 &
PGWAKE_PID=$!
wait_port 127.0.0.1 "$PORT" 20 || { tail -20 "$OUT/pgwake.log" >&2; die "pgwake did not listen on $PORT"; }
log "pgwake pid $PGWAKE_PID on 127.0.0.1:$PORT -> static $PG_ADDR ($PGWAKE_BIN)"

rc=0
"$HERE/compare.sh" --out "$OUT" "${PASS[@]}" "pgwake=postgres@127.0.0.1:$PORT/bench?endpoint=bench" || rc=$?
LOAD_AFTER=$(uptime)
log "load after: $LOAD_AFTER"
PGWAKE_RSS=$(awk '/VmHWM/ {print $2 " " $3}' "/proc/$PGWAKE_PID/status" 2>/dev/null || echo "?")
PGWAKE_CPU=$(awk '{printf "%.1f s user, %.1f s sys", $14/100, $15/100}' "/proc/$PGWAKE_PID/stat" 2>/dev/null || echo "?")
stop_pid "$PGWAKE_PID" 40
PGWAKE_PID=""

[ -f "$OUT/report.md" ] || die "compare.sh produced no report (rc=$rc)"
{
  echo
  echo "## Run conditions"
  echo
  echo "- load before: \`${LOAD_BEFORE#*load average: }\` (1/5/15 min), after: \`${LOAD_AFTER#*load average: }\`"
  echo "- pgwake: \`$PGWAKE_BIN\` ($("$PGWAKE_BIN" --version)); endpoint \`bench\` static -> $PG_ADDR; relay_threads ${RELAY_THREADS:-unset (one per core)}; peak RSS $PGWAKE_RSS; CPU over the run: $PGWAKE_CPU"
  echo
  echo "## pgwake log ($(wc -l <"$OUT/pgwake.log") lines, PGWAKE_LOG=$LOGLVL)"
  echo
  python3 - "$OUT/pgwake.log" <<'PY'
import collections, json, sys
levels = collections.Counter()
msgs = collections.Counter()
other = 0
for line in open(sys.argv[1], errors="replace"):
    try:
        r = json.loads(line)
    except ValueError:
        other += 1
        continue
    lv = r.get("level", "?")
    levels[lv] += 1
    if lv in ("WARN", "ERROR"):
        f = dict(r.get("fields", {}))
        m = f.pop("message", "")
        err = f.get("error", "")
        msgs[(lv, m, str(err)[:160])] += 1
print("lines per level: " + (", ".join("%s=%d" % kv for kv in sorted(levels.items())) or "none")
      + (", non-JSON=%d" % other if other else ""))
if msgs:
    print()
    print("| level | message | error | count |")
    print("|---|---|---|---:|")
    for (lv, m, e), n in msgs.most_common(20):
        print("| %s | %s | %s | %d |" % (lv, m, e.replace("|", "\\|"), n))
PY
} | tee -a "$OUT/report.md"
log "report: $OUT/report.md"
exit "$rc"
