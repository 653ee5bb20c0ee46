#!/usr/bin/env bash
# spare-ab.sh - what spare compute connections ([proxy] spare_max_age) change in connect
# latency and connect-heavy throughput, measured A/B on one binary and one Postgres.
#
# Usage: spare-ab.sh [--blocks N] [-n CONNS] [--pause-ms MS] [-T SECONDS] [--port-base P]
#                    [--pgwake-bin PATH]
#
# Two pgwake processes of the same binary in front of the same Postgres: "spare" with the
# default spare_max_age, "nospare" with spare_max_age = "0s". Each block measures direct,
# spare and nospare in a rotating order:
#   - serial: pgwire.py connect -n CONNS (default 100): sequential connect+auth+SELECT 1+close,
#     median ms per connection, back to back;
#   - paused: the same with MS (default 5) idle between connections, as a client that
#     connects now and then (a serverless function) does;
#   - -C: pgbench -C -S with 4 clients for T seconds (default 5), tps.
# Per block it pairs spare with nospare (and each with direct), then prints the median over
# the blocks (default 15), the blocks in which spare was ahead, and the spare counters from
# pgwake's /metrics at the end. Everything started here is stopped at the end.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BLOCKS=15
CONNS=100
PAUSE=5
DURATION=5
BASE=25470
PGWAKE_BIN=${PGWAKE_BIN:-$HERE/../target/release/pgwake}
while [ $# -gt 0 ]; do
  case "$1" in
    --blocks) BLOCKS=$2; shift 2 ;;
    -n) CONNS=$2; shift 2 ;;
    --pause-ms) PAUSE=$2; shift 2 ;;
    -T) DURATION=$2; shift 2 ;;
    --port-base) BASE=$2; shift 2 ;;
    --pgwake-bin) PGWAKE_BIN=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ -x "$PGWAKE_BIN" ] || die "no pgwake binary at $PGWAKE_BIN (cargo build --release, or --pgwake-bin)"

bench_workdir spare

PG_PORT=$BASE
"$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pg" --scale 10 >/dev/null

# name port admin-port spare_max_age
start_pgwake() {
  local name=$1 port=$2 admin=$3 age=$4
  static_pgwake_config "$port" "127.0.0.1:$PG_PORT" "$WORK/data-$name" \
    | sed "s/^\[proxy\]$/[proxy]\nspare_max_age = \"$age\"/" >"$WORK/$name.toml"
  printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin" >>"$WORK/$name.toml"
  "$PGWAKE_BIN" --check-config "$WORK/$name.toml" >/dev/null
  PGWAKE_LOG=warn "$PGWAKE_BIN" --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  wait_port 127.0.0.1 "$port" 20 || { cat "$WORK/$name.log" >&2; die "$name did not listen"; }
}
start_pgwake spare $((BASE + 1)) $((BASE + 3)) 10s
start_pgwake nospare $((BASE + 2)) $((BASE + 4)) 0s

NAMES=(direct spare nospare)
PORTS=("$PG_PORT" $((BASE + 1)) $((BASE + 2)))
OPTS=("" "endpoint=bench" "endpoint=bench")
RES="$WORK/results.tsv"
log "load before: $(uptime | sed 's/.*load average: //')"
for b in $(seq 1 "$BLOCKS"); do
  for test in serial paused; do
    pause=0
    [ "$test" = paused ] && pause=$PAUSE
    for k in 0 1 2; do
      i=$(( (b + k) % 3 ))
      r=$(python3 "$HERE/pgwire.py" connect -n "$CONNS" --pause-ms "$pause" --host 127.0.0.1 \
        --port "${PORTS[$i]}" --user "$BENCH_PG_USER" --db bench --options "${OPTS[$i]}")
      ms=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["median"])' "$r")
      printf '%s\t%s\t%s\t%s\n' "$b" "$test" "${NAMES[$i]}" "$ms" >>"$RES"
    done
  done
  for k in 0 1 2; do
    i=$(( (b + k) % 3 ))
    tps=$(PGOPTIONS="${OPTS[$i]}" "$PG_BIN/pgbench" -n -C -S -c 4 -j 2 -T "$DURATION" \
      -h 127.0.0.1 -p "${PORTS[$i]}" -U "$BENCH_PG_USER" bench 2>/dev/null \
      | awk '/^tps/ {print $3; exit}')
    printf '%s\tconnect\t%s\t%s\n' "$b" "${NAMES[$i]}" "$tps" >>"$RES"
  done
  log "block $b of $BLOCKS: $(grep -c "^$b	" "$RES") cells"
done
log "load after: $(uptime | sed 's/.*load average: //')"

echo "# spare-ab: $BLOCKS blocks, serial -n $CONNS (paused: ${PAUSE} ms between), -C -c 4 -T $DURATION; $(nproc) cores; $("$PGWAKE_BIN" --version)"
python3 - "$RES" <<'PY'
import collections, statistics, sys
v = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    b, test, name, x = line.split("\t")
    if x.strip():
        v[(test, int(b))][name] = float(x)
for test, unit, better in (("serial", "median ms per connection, back to back", "lower"),
                           ("paused", "median ms per connection, idle between", "lower"),
                           ("connect", "pgbench -C -S -c 4, tps", "higher")):
    blocks = [d for (t, _), d in sorted(v.items()) if t == test and len(d) == 3]
    if not blocks:
        continue
    def med(name):
        return statistics.median(d[name] for d in blocks)
    # spare's advantage as a speed ratio (>1: spare faster), per block
    if better == "lower":
        gain = [d["nospare"] / d["spare"] for d in blocks]
        vs_direct = {n: statistics.median(d["direct"] / d[n] for d in blocks) for n in ("spare", "nospare")}
    else:
        gain = [d["spare"] / d["nospare"] for d in blocks]
        vs_direct = {n: statistics.median(d[n] / d["direct"] for d in blocks) for n in ("spare", "nospare")}
    ahead = sum(g > 1 for g in gain)
    print(f"\n## {test} ({unit}), {len(blocks)} blocks\n")
    print("| target | median | speed / direct (median of blocks) |")
    print("|---|---:|---:|")
    print(f"| direct | {med('direct'):.3f} | 1.00 |")
    for n in ("spare", "nospare"):
        print(f"| {n} | {med(n):.3f} | {vs_direct[n]:.3f} |")
    print(f"\nspare / nospare speed: median {statistics.median(gain):.3f}, spare ahead in {ahead}/{len(gain)} blocks; per block: "
          + " ".join(f"{g:.2f}" for g in gain))
PY
echo
echo "spare counters (pgwake with spares):"
curl -s "http://127.0.0.1:$((BASE + 3))/metrics" | grep '^pgwake_spare_connections_total' || echo "(none)"
