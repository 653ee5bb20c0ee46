#!/usr/bin/env bash
# rounds-pgwake.sh - pgwake vs haproxy per cell, decided over repeated interleaved rounds.
#
# Usage: rounds-pgwake.sh [--rounds N] [-T SECONDS] [--port-base P] [--out DIR]
#                         [--pgwake-bin PATH] [compare.sh options, e.g. --tests, --bulk-reps]
#
# One 10-second compare-pgwake.sh run cannot settle "pgwake >= haproxy" on a 2-core machine:
# the same cell moves by 10-20% from run to run for both proxies. This runs N short rounds
# (default 9 rounds of -T 5) against ONE Postgres (pg-up.sh, scale 10, shared_buffers=256MB,
# as compare.sh starts it), each round a full compare-pgwake.sh --external-pg --peers
# haproxy, whose cells interleave direct, haproxy and pgwake with a rotating start. Then
# rounds-summary.py pairs pgwake with haproxy within each round and gives, per cell, the
# median ratio, how many rounds pgwake was ahead, a distribution-free confidence interval for
# the median ratio and a verdict (ahead / level / behind), plus every COPY repetition
# against direct's. About 2.5 minutes per round with the defaults.
#
# --out DIR (default /tmp/bench-results/rounds-<timestamp>) gets round-K/ (compare.sh's
# report.md, results.tsv, raw/, pgwake.log) and summary.md. Everything started here is
# stopped, and the Postgres directory removed, at the end.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

ROUNDS=9
DURATION=5
BASE=25460
OUT=""
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    -T|--duration) DURATION=$2; shift 2 ;;
    --port-base) BASE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
OUT=${OUT:-/tmp/bench-results/rounds-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/bench-rounds.XXXXXX)
chmod 755 "$WORK"
PG_PORT=$BASE
cleanup() {
  local rc=$?
  set +e
  "$HERE/pg-down.sh" -D "$WORK/pg" --rm >/dev/null 2>&1
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pg" --scale 10 --set shared_buffers=256MB >/dev/null
log "load before: $(uptime | sed 's/.*load average: //')"
for r in $(seq 1 "$ROUNDS"); do
  log "round $r of $ROUNDS"
  "$HERE/compare-pgwake.sh" --external-pg "127.0.0.1:$PG_PORT" --peers haproxy -T "$DURATION" \
    --ports "$PG_PORT,$((BASE + 1)),$((BASE + 2)),$((BASE + 3))" --port "$((BASE + 4))" \
    --out "$OUT/round-$r" ${PASS[@]+"${PASS[@]}"} >"$OUT/round-$r.log" 2>&1 ||
    { tail -20 "$OUT/round-$r.log" >&2; die "round $r failed (log: $OUT/round-$r.log)"; }
done
{
  echo "# rounds-pgwake: $ROUNDS rounds of -T $DURATION ${PASS[*]}"
  echo "load after: $(uptime | sed 's/.*load average: //'); $(nproc) cores; $(git -C "$HERE" rev-parse --short HEAD 2>/dev/null)"
  echo
  python3 "$HERE/rounds-summary.py" "$OUT"/round-*/
} | tee "$OUT/summary.md"
