#!/usr/bin/env bash
# auth-pgwake.sh - cost of checking the password at the proxy (issue 11), in ONE interleaved run.
#
# Usage: auth-pgwake.sh [-T SECONDS] [--clients "1 4"] [--rounds N] [--out FILE] [--keep] [options]
#
# What it measures: new connections per second (`pgbench -n -C`, a new connection for every
# transaction, each transaction `SELECT 1`), all as the SCRAM role bench_scram of one
# Postgres 15 (pg-up.sh: scram-sha-256 for that role over TCP), reached three ways:
#   direct        libpq straight to Postgres: Postgres runs SCRAM with the client
#   passthrough   through pgwake, endpoint "pass" (static, auth = "passthrough"): Postgres
#                 runs SCRAM with the client through the proxy (today's behaviour without
#                 a roles file)
#   scram         through pgwake, endpoint "bench" (static, roles_file with the role's
#                 verifier from pg_authid): pgwake runs SCRAM with the client and checks the
#                 proof BEFORE connecting to Postgres, then logs in to Postgres with the
#                 ClientKey recovered from the proof (a second SCRAM exchange, proxy<->Postgres)
# all plaintext (sslmode=disable), pgbench -c C -j min(2,C) for C in --clients, targets
# interleaved in every cell with a rotating start, --rounds repetitions of every cell: read
# the ratios (medians), not the absolute numbers. The client's own PBKDF2 (4096 iterations)
# is in every target alike.
#
# Checks before measuring: each target logs in as bench_scram; a wrong password to the scram
# target fails with 28P01 and pgwake's log shows "login failed at the proxy" (so the scram
# target really is checked at the proxy); the passthrough target's wrong password is refused
# by Postgres instead.
#
# Setup: one mktemp -d /tmp/bench-auth.* directory (removed at exit unless --keep): Postgres
# via pg-up.sh (as root it runs as the postgres OS user), a release pgwake (--log-json) with
# the two static endpoints; `cargo build --release --bin pgwake` runs first unless
# --pgwake-bin / PGWAKE_BIN. Loopback only; everything started is stopped at exit.
#
# Options:
#   -T, --duration S   seconds per pgbench run (default 10)
#   --clients LIST     pgbench client counts (default "1 4")
#   --rounds N         repetitions of every cell, interleaved (default 2)
#   --out FILE         the report (default benches/results/auth-pgwake-<date>.md); raw
#                      pgbench outputs and pgwake's log go to /tmp/bench-results/auth-<stamp>/
#   --keep             keep the temporary directory
#   --ports PG,PGWAKE  listen ports on 127.0.0.1 (default 25482,25486: below the ephemeral range)
#   --pgwake-bin PATH  pgwake binary (default $PGWAKE_BIN; else build and use
#                      ${CARGO_TARGET_DIR:-target}/release/pgwake)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

DURATION=10
CLIENTS="1 4"
ROUNDS=2
OUT=""
KEEP=0
PORTS="25482,25486"
PGWAKE_BIN=${PGWAKE_BIN:-}
while [ $# -gt 0 ]; do
  case "$1" in
    -T|--duration) DURATION=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --ports) PORTS=$2; shift 2 ;;
    --pgwake-bin) PGWAKE_BIN=$2; shift 2 ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
IFS=, read -r PG_PORT PGWAKE_PORT <<<"$PORTS"
[[ "$DURATION" =~ ^[0-9]+$ ]] || die "-T wants whole seconds"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive number"
command -v pgbench >/dev/null || die "pgbench not found"

# libpq must see only what each target sets
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD PGOPTIONS PGSERVICE PGSSLMODE \
  PGPASSFILE PGCHANNELBINDING PGTARGETSESSIONATTRS
export PGGSSENCMODE=disable PGCONNECT_TIMEOUT=60 PGAPPNAME=auth-pgwake

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$HERE/results/auth-pgwake-$(date +%Y-%m-%d).md}
RAW=/tmp/bench-results/auth-$STAMP
mkdir -p "$RAW" "$(dirname "$OUT")"
T0=$(date +%s)

if [ -z "$PGWAKE_BIN" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
  log "cargo build --release --bin pgwake (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd "$REPO" && cargo build --release --quiet --bin pgwake) || die "cargo build failed"
  PGWAKE_BIN=$CARGO_TARGET_DIR/release/pgwake
fi
[ -x "$PGWAKE_BIN" ] || die "no pgwake binary at $PGWAKE_BIN"
for p in "$PG_PORT" "$PGWAKE_PORT"; do port_in_use "$p" && die "port $p in use (use --ports)"; done

WORK=$(mktemp -d /tmp/bench-auth.XXXXXX)
chmod 755 "$WORK" # the postgres OS user must reach its data directory below
PG_STARTED=0
PGWAKE_PID=""
cleanup() {
  local rc=$?
  set +e
  [ -n "$PGWAKE_PID" ] && stop_pid "$PGWAKE_PID" 40
  if [ "$PG_STARTED" = 1 ]; then
    "$HERE/pg-down.sh" -D "$WORK/pgdata" >/dev/null 2>&1
    cp "$WORK/pgdata/server.log" "$RAW/postgres.log" 2>/dev/null
  fi
  if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- postgres
PG_STARTED=1
"$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pgdata" --scale 1 >/dev/null
VERIFIER=$(psql -X -At -h 127.0.0.1 -p "$PG_PORT" -U "$BENCH_PG_USER" -d postgres \
  -c "select rolpassword from pg_authid where rolname = '$BENCH_SCRAM_USER'")
[[ "$VERIFIER" == SCRAM-SHA-256\$* ]] || die "no SCRAM verifier for $BENCH_SCRAM_USER: $VERIFIER"
printf '"%s" "%s"\n' "$BENCH_SCRAM_USER" "$VERIFIER" >"$WORK/bench.roles"
chmod 600 "$WORK/bench.roles"

# ---------------------------------------------------------------- pgwake
cat >"$WORK/pgwake.toml" <<EOF
# auth-pgwake.sh: SCRAM at the proxy vs passthrough, in front of one static Postgres
[proxy]
listen = "127.0.0.1:$PGWAKE_PORT"

[local]
# unused (no local endpoint); kept out of the repository
data_root = "$WORK/data"

[[endpoint]]
id = "bench"
backend = "static"
address = "127.0.0.1:$PG_PORT"
auth = "scram"
roles_file = "$WORK/bench.roles"

[[endpoint]]
id = "pass"
backend = "static"
address = "127.0.0.1:$PG_PORT"
auth = "passthrough"
EOF
"$PGWAKE_BIN" --check-config "$WORK/pgwake.toml" >/dev/null
LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"
PGWAKE_LOG=info "$PGWAKE_BIN" --log-json --config "$WORK/pgwake.toml" >"$RAW/pgwake.log" 2>&1 &
PGWAKE_PID=$!
wait_port 127.0.0.1 "$PGWAKE_PORT" 20 || { tail -20 "$RAW/pgwake.log" >&2; die "pgwake did not listen on $PGWAKE_PORT"; }
log "pgwake pid $PGWAKE_PID on 127.0.0.1:$PGWAKE_PORT -> static 127.0.0.1:$PG_PORT ($PGWAKE_BIN)"

# ---------------------------------------------------------------- targets
COMMON="PGUSER=$BENCH_SCRAM_USER PGDATABASE=bench PGSSLMODE=disable PGHOST=127.0.0.1"
T_NAME=(direct passthrough scram)
T_ENV=(
  "$COMMON PGPORT=$PG_PORT"
  "$COMMON PGPORT=$PGWAKE_PORT PGOPTIONS=endpoint=pass"
  "$COMMON PGPORT=$PGWAKE_PORT PGOPTIONS=endpoint=bench"
)
NT=${#T_NAME[@]}
run_as_target() { # index password cmd...
  local i=$1 pw=$2; shift 2
  local -a e
  read -r -a e <<<"${T_ENV[$i]}"
  env "${e[@]}" "PGPASSWORD=$pw" "$@"
}

for i in "${!T_NAME[@]}"; do
  who=$(run_as_target "$i" "$BENCH_SCRAM_PASSWORD" psql -X -At -c 'select current_user' 2>&1) \
    || die "target ${T_NAME[$i]} failed its first connection: $who"
  [ "$who" = "$BENCH_SCRAM_USER" ] || die "target ${T_NAME[$i]}: logged in as $who"
done
if err=$(run_as_target 2 wrong psql -X -At -c 'select 1' 2>&1); then
  die "the scram target accepted a wrong password"
fi
[[ "$err" == *"password authentication failed"* ]] || die "scram target, wrong password: $err"
grep -q '"login failed at the proxy"' "$RAW/pgwake.log" \
  || die "the wrong password was not refused at the proxy (see $RAW/pgwake.log)"
if err=$(run_as_target 1 wrong psql -X -At -c 'select 1' 2>&1); then
  die "the passthrough target accepted a wrong password"
fi
log "checks ok: every target logs in; a wrong password is refused at the proxy (scram) and by Postgres (passthrough)"

cat >"$WORK/select1.sql" <<'EOF'
SELECT 1;
EOF

# ---------------------------------------------------------------- runs
RES=$RAW/results.tsv
printf 'test\tclients\ttarget\tvalue\tunit\tlat_ms\tnote\n' >"$RES"
FAILED=()
run_pgbench() { # clients index
  local c=$1 i=$2 rc=0
  local j=$((c < 2 ? c : 2))
  local f="$RAW/connect.c$c.${T_NAME[$i]}.$(date +%H%M%S%N).txt"
  run_as_target "$i" "$BENCH_SCRAM_PASSWORD" pgbench -n -C -T "$DURATION" -c "$c" -j "$j" \
    -f "$WORK/select1.sql" bench >"$f" 2>&1 || rc=$?
  local tps lat conn failed note=""
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$f" | head -1)
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$f" | head -1)
  conn=$(sed -n 's/^average connection time = \([0-9.]*\) ms.*/\1/p' "$f" | head -1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$f" | head -1)
  [ -n "$conn" ] && note="avg conn time ${conn} ms"
  if [ "$rc" != 0 ] || [ -z "$tps" ]; then
    note="FAILED rc=$rc, see $(basename "$f")"
    FAILED+=("${T_NAME[$i]} c=$c: pgbench rc=$rc ($(tail -1 "$f"))")
  elif [ -n "$failed" ] && [ "$failed" != 0 ]; then
    note="$note failed txns=$failed"
  fi
  printf 'connect-select1\t%s\t%s\t%s\ttps\t%s\t%s\n' "$c" "${T_NAME[$i]}" "${tps:-NA}" "${lat:-NA}" "$note" >>"$RES"
  log "  connect-select1 c=$c ${T_NAME[$i]}: tps=${tps:-NA} lat=${lat:-NA}ms $note"
}

log "warm-up (2 s of pgbench -C per target); then ${DURATION}s per run, $ROUNDS round(s)"
for i in "${!T_NAME[@]}"; do
  run_as_target "$i" "$BENCH_SCRAM_PASSWORD" pgbench -n -C -T 2 -c 2 -j 2 -f "$WORK/select1.sql" bench \
    >/dev/null 2>&1 || true
done
rot=0
for ((r = 0; r < ROUNDS; r++)); do
  for c in $CLIENTS; do
    for ((k = 0; k < NT; k++)); do run_pgbench "$c" $(((k + rot) % NT)); done
    rot=$((rot + 1))
  done
done

LOAD_AFTER=$(uptime)
log "load after: $LOAD_AFTER"
PGWAKE_CPU=$(awk '{printf "%.1f s user, %.1f s sys", $14/100, $15/100}' "/proc/$PGWAKE_PID/stat" 2>/dev/null || echo "?")
stop_pid "$PGWAKE_PID" 40
PGWAKE_PID=""

# ---------------------------------------------------------------- report
{
  echo "# auth-pgwake.sh $STAMP"
  echo
  echo "What it measures: new connections per second, \`pgbench -n -C\` (a new connection for"
  echo "every transaction, each \`SELECT 1\`), as SCRAM role \`$BENCH_SCRAM_USER\`, plaintext:"
  echo "\`direct\` to Postgres; \`passthrough\` through pgwake, SCRAM run by Postgres; \`scram\`"
  echo "through pgwake, SCRAM checked at the proxy before it connects, then a ClientKey login"
  echo "to Postgres. Targets interleaved in every cell, $ROUNDS round(s); the value is tps"
  echo "(= connections/s), the latency pgbench's average per transaction (connect included)."
  echo
  echo "host: $(nproc) cores, $(uname -r); postgres: $("$PG_BIN/postgres" --version); client: $(pgbench --version)"
  echo "pgwake: \`$PGWAKE_BIN\` ($("$PGWAKE_BIN" --version)); CPU over the run: $PGWAKE_CPU"
  echo "pgbench: ${DURATION}s per run, -j min(2,c), clients: $CLIENTS; wall $(($(date +%s) - T0)) s"
  echo "load before: \`${LOAD_BEFORE#*load average: }\`, after: \`${LOAD_AFTER#*load average: }\` (1/5/15 min)"
  echo
  python3 "$HERE/report.py" "$RES" --baseline direct
  echo
  echo "Ratios (connections/s, medians of the rounds):"
  echo
  python3 - "$RES" <<'PY'
import csv, statistics, sys
vals, order = {}, []
for r in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    if r["value"] in ("", "NA"):
        continue
    k = (r["test"], r["clients"])
    if k not in order:
        order.append(k)
    vals.setdefault(k + (r["target"],), []).append(float(r["value"]))
def ratio(k, a, b):
    x, y = vals.get(k + (a,)), vals.get(k + (b,))
    return "%.2f" % (statistics.median(x) / statistics.median(y)) if x and y else "n/a"
print("| test | clients | scram / passthrough | scram / direct | passthrough / direct |")
print("|---|---:|---:|---:|---:|")
for k in order:
    print("| %s | %s | %s | %s | %s |" % (k[0], k[1], ratio(k, "scram", "passthrough"),
                                         ratio(k, "scram", "direct"), ratio(k, "passthrough", "direct")))
PY
  echo
  echo "pgwake log: $(grep -c . "$RAW/pgwake.log") lines; WARN/ERROR lines: $(grep -c -E '"level":"(WARN|ERROR)"' "$RAW/pgwake.log" || true);"
  echo "logins refused at the proxy: $(grep -c '"login failed at the proxy"' "$RAW/pgwake.log" || true) (the one wrong-password check)"
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo
    echo "Failures:"
    for f in "${FAILED[@]}"; do echo "- $f"; done
  fi
} | tee "$OUT"
log "report: $OUT; raw: $RAW"
[ "${#FAILED[@]}" = 0 ]
