#!/usr/bin/env bash
# tls-pgwake.sh - TLS termination cost of pgwake vs Postgres's own TLS, in ONE interleaved run.
#
# Usage: tls-pgwake.sh [-T SECONDS] [--clients "1 8 32"] [--out DIR] [--keep] [options]
#
# What it measures: the same Postgres 15 (ssl=on, pgbench scale 10) reached four ways,
#   direct-tls  libpq sslmode=require straight to Postgres (OpenSSL in the backend)
#   pgwake-tls  sslmode=require to pgwake, host=bench.db.localtest hostaddr=127.0.0.1:
#               libpq sends the host as SNI, pgwake terminates TLS (rustls) and picks
#               endpoint "bench" from it ([tls] domains = ["db.localtest"]), then
#               forwards over plain TCP to the same Postgres (static endpoint)
#   direct      sslmode=disable straight to Postgres              (reference)
#   pgwake      sslmode=disable to pgwake, options=endpoint=bench (reference, spliced)
# with
#   select-only  pgbench -n -S -c C -j min(2,C) -T D            for C in --clients
#   select1      pgbench -n -f 'SELECT 1' -c C -j min(2,C) -T D  for C in --clients
#   connect      pgbench -n -C -S -c 4 -j 2 -T D  (a new connection per transaction, so
#                every transaction pays a TCP connect + TLS handshake + startup)
#   bulk-copy    psql -c "COPY (SELECT repeat('x',1000) FROM generate_series(1,1000000))
#                TO STDOUT" > /dev/null  (~1 GB to the client), --bulk-reps times, MB/s
# Targets are interleaved in every cell with a rotating start, so machine noise hits all
# of them alike: read the ratios to direct-tls, not the absolute numbers.
#
# Setup (all under one mktemp -d /tmp/bench-tls.* directory, removed at exit unless --keep):
#   - a throwaway CA (openssl) signing two server certs: *.db.localtest + db.localtest for
#     pgwake, localhost + 127.0.0.1 for Postgres; same key type for both (--key-type);
#     private keys stay in the temp directory (mode 0600; Postgres's owned by postgres)
#   - Postgres via pg-up.sh (as root it runs as the postgres OS user) with ssl=on
#   - a release pgwake (--log-json) with [tls] and one static endpoint "bench";
#     `cargo build --release --bin pgwake` runs first unless --pgwake-bin / PGWAKE_BIN
# Every TLS target is first checked once with sslmode=verify-full against the throwaway CA
# (proves the certificates and the SNI route; verify-ca for --route options, which has no
# host name to check); the measurements use sslmode=require with
# no root/client certificate files, i.e. no verification, as the issue asks.
#
# Options:
#   -T, --duration S   seconds per pgbench run (default 10)
#   --clients LIST     client counts for select-only/select1 (default "1 8 32")
#   --out DIR          results (default /tmp/bench-results/tls-<timestamp>): report.md,
#                      results.tsv, raw/ (pgbench/psql outputs, pgwake.log, postgres.log)
#   --keep             keep the temporary directory (certs, cluster, pgwake.toml)
#   --tests LIST       comma list (default select-only,select1,connect,bulk-copy)
#   --targets LIST     comma list (default direct-tls,pgwake-tls,direct,pgwake)
#   --bulk-reps N      bulk COPY repetitions per target (default 2)
#   --route sni|options  how pgwake-tls names its endpoint (default sni; options sends
#                      host=127.0.0.1 and options=endpoint=bench, i.e. no SNI)
#   --key-type ec|rsa  server keys: ECDSA P-256 (default) or RSA 2048
#   --ports PG,PGWAKE  listen ports on 127.0.0.1 (default 25462,25466: below the ephemeral
#                      range, which the many client sockets of a run draw from)
#   --pgwake-bin PATH  pgwake binary (default $PGWAKE_BIN; else build and use
#                      ${CARGO_TARGET_DIR:-target}/release/pgwake)
#   --pgwake-log LVL   PGWAKE_LOG filter (default info)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

DURATION=10
CLIENTS="1 8 32"
OUT=""
KEEP=0
TESTS="select-only,select1,connect,bulk-copy"
TARGETS="direct-tls,pgwake-tls,direct,pgwake"
BULK_REPS=2
BULK_ROWS=1000000
ROUTE=sni
KEY_TYPE=ec
PORTS="25462,25466"
PGWAKE_BIN=${PGWAKE_BIN:-}
LOGLVL=info
SCALE=10
while [ $# -gt 0 ]; do
  case "$1" in
    -T|--duration) DURATION=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --tests) TESTS=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    --bulk-reps) BULK_REPS=$2; shift 2 ;;
    --route) ROUTE=$2; shift 2 ;;
    --key-type) KEY_TYPE=$2; shift 2 ;;
    --ports) PORTS=$2; shift 2 ;;
    --pgwake-bin) PGWAKE_BIN=$2; shift 2 ;;
    --pgwake-log) LOGLVL=$2; shift 2 ;;
    -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
IFS=, read -r PG_PORT PGWAKE_PORT <<<"$PORTS"
[[ "$DURATION" =~ ^[0-9]+$ ]] || die "-T wants whole seconds"
case "$ROUTE" in sni|options) ;; *) die "--route sni|options" ;; esac
case "$KEY_TYPE" in ec|rsa) ;; *) die "--key-type ec|rsa" ;; esac
has_test() { [[ ",$TESTS," == *",$1,"* ]]; }
command -v openssl >/dev/null || die "openssl CLI not found"
command -v pgbench >/dev/null || die "pgbench not found"

# libpq must see only what each target sets
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD PGOPTIONS PGSERVICE PGSSLMODE \
  PGSSLROOTCERT PGSSLCERT PGSSLKEY PGSSLCRL PGSSLSNI PGREQUIRESSL PGTARGETSESSIONATTRS
export PGGSSENCMODE=disable PGCONNECT_TIMEOUT=60 PGAPPNAME=tls-pgwake

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-/tmp/bench-results/tls-$STAMP}
mkdir -p "$OUT/raw"
T0=$(date +%s)

# ---------------------------------------------------------------- pgwake binary
if [ -z "$PGWAKE_BIN" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
  log "cargo build --release --bin pgwake (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd "$REPO" && cargo build --release --quiet --bin pgwake) || die "cargo build failed"
  PGWAKE_BIN=$CARGO_TARGET_DIR/release/pgwake
fi
[ -x "$PGWAKE_BIN" ] || die "no pgwake binary at $PGWAKE_BIN"

for p in "$PG_PORT" "$PGWAKE_PORT"; do port_in_use "$p" && die "port $p in use (use --ports)"; done

WORK=$(mktemp -d /tmp/bench-tls.XXXXXX)
chmod 755 "$WORK" # the postgres OS user must reach its data and key files below
PG_STARTED=0
PGWAKE_PID=""
cleanup() {
  local rc=$?
  set +e
  [ -n "$PGWAKE_PID" ] && stop_pid "$PGWAKE_PID" 40
  if [ "$PG_STARTED" = 1 ]; then
    "$HERE/pg-down.sh" -D "$WORK/pgdata" >/dev/null 2>&1
    cp "$WORK/pgdata/server.log" "$OUT/raw/postgres.log" 2>/dev/null
  fi
  if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- certificates
TLS=$WORK/tls
mkdir -p "$TLS/pg"
newkey() { # file
  if [ "$KEY_TYPE" = ec ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  else
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null
  fi
  chmod 600 "$1"
}
issue() { # key cert cn san
  openssl req -new -key "$1" -subj "/CN=$3" -out "$1.csr"
  local ku=digitalSignature
  [ "$KEY_TYPE" = rsa ] && ku=digitalSignature,keyEncipherment
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,%s\nextendedKeyUsage=serverAuth\n' "$4" "$ku" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -CAcreateserial \
    -days 2 -sha256 -extfile "$1.ext" -out "$2" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
log "throwaway CA and server certificates ($KEY_TYPE) in $TLS"
newkey "$TLS/ca.key"
openssl req -x509 -new -key "$TLS/ca.key" -subj "/CN=tls-pgwake bench CA" -days 2 -sha256 \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$TLS/ca.crt"
newkey "$TLS/pgwake.key"
issue "$TLS/pgwake.key" "$TLS/pgwake.crt" "*.db.localtest" "DNS:*.db.localtest,DNS:db.localtest"
newkey "$TLS/pg/server.key"
issue "$TLS/pg/server.key" "$TLS/pg/server.crt" "localhost" "DNS:localhost,IP:127.0.0.1"
chmod 755 "$TLS" "$TLS/pg"
pg_own "$TLS/pg" # Postgres wants its key owned by the server user, mode 0600

# ---------------------------------------------------------------- postgres
PG_STARTED=1
"$HERE/pg-up.sh" -p "$PG_PORT" -D "$WORK/pgdata" --scale "$SCALE" --set shared_buffers=256MB \
  --set ssl=on --set "ssl_cert_file=$TLS/pg/server.crt" --set "ssl_key_file=$TLS/pg/server.key" >/dev/null

# ---------------------------------------------------------------- pgwake
cat >"$WORK/pgwake.toml" <<EOF
# tls-pgwake.sh: TLS termination in front of one static Postgres
[proxy]
listen = "127.0.0.1:$PGWAKE_PORT"

[tls]
certificates = [{ cert = "$TLS/pgwake.crt", key = "$TLS/pgwake.key" }]
domains = ["db.localtest"]

[local]
# unused (no local endpoint); kept out of the repository
data_root = "$WORK/data"

[[endpoint]]
id = "bench"
backend = "static"
address = "127.0.0.1:$PG_PORT"
EOF
"$PGWAKE_BIN" --check-config "$WORK/pgwake.toml" >/dev/null
LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"
PGWAKE_LOG=$LOGLVL "$PGWAKE_BIN" --log-json --config "$WORK/pgwake.toml" >"$OUT/raw/pgwake.log" 2>&1 &
PGWAKE_PID=$!
wait_port 127.0.0.1 "$PGWAKE_PORT" 20 || { tail -20 "$OUT/raw/pgwake.log" >&2; die "pgwake did not listen on $PGWAKE_PORT"; }
log "pgwake pid $PGWAKE_PID on 127.0.0.1:$PGWAKE_PORT -> static 127.0.0.1:$PG_PORT ($PGWAKE_BIN)"

# ---------------------------------------------------------------- targets
# Each target is a list of libpq environment settings (no spaces in values).
NOFILE=$WORK/none # sslrootcert/sslcert that do not exist: no verification, no client cert
COMMON="PGUSER=$BENCH_PG_USER PGDATABASE=bench PGSSLROOTCERT=$NOFILE PGSSLCERT=$NOFILE PGSSLKEY=$NOFILE"
T_NAME=() T_ENV=()
for t in ${TARGETS//,/ }; do
  case "$t" in
    direct-tls) e="PGHOST=127.0.0.1 PGPORT=$PG_PORT PGSSLMODE=require" ;;
    direct) e="PGHOST=127.0.0.1 PGPORT=$PG_PORT PGSSLMODE=disable" ;;
    pgwake-tls)
      if [ "$ROUTE" = sni ]; then
        e="PGHOST=bench.db.localtest PGHOSTADDR=127.0.0.1 PGPORT=$PGWAKE_PORT PGSSLMODE=require"
      else
        e="PGHOST=127.0.0.1 PGPORT=$PGWAKE_PORT PGSSLMODE=require PGOPTIONS=endpoint=bench"
      fi ;;
    pgwake) e="PGHOST=127.0.0.1 PGPORT=$PGWAKE_PORT PGSSLMODE=disable PGOPTIONS=endpoint=bench" ;;
    *) die "unknown target $t (direct-tls, pgwake-tls, direct, pgwake)" ;;
  esac
  T_NAME+=("$t") T_ENV+=("$COMMON $e")
done
NT=${#T_NAME[@]}
[ "$NT" -gt 0 ] || die "no targets"
tenv() { # index -> prints env assignments, one per line
  tr ' ' '\n' <<<"${T_ENV[$1]}"
}
run_as_target() { # index cmd... : run cmd with exactly that target's libpq environment
  local i=$1; shift
  local -a e
  mapfile -t e < <(tenv "$i")
  env "${e[@]}" "$@"
}

RES=$OUT/results.tsv
printf 'test\tclients\ttarget\tvalue\tunit\tlat_ms\tnote\n' >"$RES"
FAILED=()
SSLINFO=()

# readiness: verify-full once per TLS target (proves certs + SNI route), and record the
# negotiated protocol/cipher as psql reports it
for i in "${!T_NAME[@]}"; do
  name=${T_NAME[$i]}
  verify=()
  if [[ "$name" == *-tls ]]; then
    mode=verify-full # host name 127.0.0.1 (no SNI) cannot match the *.db.localtest cert
    [ "$name" = pgwake-tls ] && [ "$ROUTE" = options ] && mode=verify-ca
    verify=("PGSSLMODE=$mode" "PGSSLROOTCERT=$TLS/ca.crt")
  fi
  if r=$(run_as_target "$i" env "${verify[@]}" psql -X -At -v ON_ERROR_STOP=1 \
      -c 'SELECT 1' -c '\conninfo' 2>&1); then
    info=$(grep -o 'SSL connection (.*)' <<<"$r" || echo "no SSL")
    SSLINFO+=("$name: $info")
    log "target $name ok: $info${verify:+ (checked with ${verify[0]})}"
  else
    die "target $name failed its first connection: $r"
  fi
done

cat >"$WORK/select1.sql" <<'EOF'
SELECT 1;
EOF

# ---------------------------------------------------------------- runners
run_pgbench() { # index test clients args...
  local i=$1 test=$2 c=$3; shift 3
  local j=$((c < 2 ? c : 2)) rc=0
  local f="$OUT/raw/$test.c$c.${T_NAME[$i]}.$(date +%H%M%S).txt"
  run_as_target "$i" pgbench -n -T "$DURATION" -c "$c" -j "$j" "$@" bench >"$f" 2>&1 || rc=$?
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
  printf '%s\t%s\t%s\t%s\ttps\t%s\t%s\n' "$test" "$c" "${T_NAME[$i]}" "${tps:-NA}" "${lat:-NA}" "$note" >>"$RES"
  log "  $test c=$c ${T_NAME[$i]}: tps=${tps:-NA} lat=${lat:-NA}ms $note"
}

rot=0
each_target() { # run "$@" with the target index appended, rotating the start
  local k
  for ((k = 0; k < NT; k++)); do "$@" $(((k + rot) % NT)); done
  rot=$((rot + 1))
}

warm() { run_as_target "$1" pgbench -n -T 2 -c 8 -j 2 -S bench >/dev/null 2>&1 || true; }
log "warm-up (2 s of pgbench -S -c 8 per target); then ${DURATION}s per pgbench run"
each_target warm
rot=0 # the first measured cell runs in target order (report.py lists targets in that order)

cell() { local test=$1 c=$2 i=$3; run_pgbench "$i" "$test" "$c" "${ARGS[@]}"; }
for c in $CLIENTS; do
  if has_test select-only; then ARGS=(-S); each_target cell select-only "$c"; fi
  if has_test select1; then ARGS=(-f "$WORK/select1.sql"); each_target cell select1 "$c"; fi
done
if has_test connect; then ARGS=(-C -S); each_target cell connect 4; fi

if has_test bulk-copy; then
  BYTES=$((BULK_ROWS * 1001))
  bulk() {
    local i=$1 t0 t1 rc=0
    t0=$(date +%s%N)
    run_as_target "$i" psql -X -q -c \
      "COPY (SELECT repeat('x',1000) FROM generate_series(1,$BULK_ROWS)) TO STDOUT" >/dev/null \
      2>>"$OUT/raw/bulk.stderr" || rc=$?
    t1=$(date +%s%N)
    if [ "$rc" = 0 ]; then
      awk -v b="$BYTES" -v ns="$((t1 - t0))" -v n="${T_NAME[$i]}" \
        'BEGIN { s = ns / 1e9; printf "bulk-copy\t1\t%s\t%.1f\tMB/s\t%.1f\t%.0f MB; latency column = elapsed ms\n", n, b / 1e6 / s, s * 1000, b / 1e6 }' >>"$RES"
      log "  bulk-copy ${T_NAME[$i]}: $(tail -1 "$RES" | cut -f4-6)"
    else
      FAILED+=("${T_NAME[$i]} bulk-copy: psql rc=$rc (see raw/bulk.stderr)")
    fi
  }
  for ((r = 0; r < BULK_REPS; r++)); do each_target bulk; done
fi

LOAD_AFTER=$(uptime)
log "load after: $LOAD_AFTER"
PGWAKE_RSS=$(awk '/VmHWM/ {print $2 " " $3}' "/proc/$PGWAKE_PID/status" 2>/dev/null || echo "?")
PGWAKE_CPU=$(awk '{printf "%.1f s user, %.1f s sys", $14/100, $15/100}' "/proc/$PGWAKE_PID/stat" 2>/dev/null || echo "?")
stop_pid "$PGWAKE_PID" 40
PGWAKE_PID=""

# ---------------------------------------------------------------- report
{
  echo "# tls-pgwake.sh $STAMP"
  echo
  echo "What it measures: TLS termination in pgwake (rustls, endpoint picked by SNI, plain TCP"
  echo "to the compute) against Postgres's own TLS (ssl=on, OpenSSL), same server, same client"
  echo "(libpq sslmode=require, no certificate verification), targets interleaved in every cell."
  echo "\`pgbench -S\` and \`SELECT 1\` reuse one connection per client: per-query cost of the"
  echo "TLS record layer plus forwarding. \`-C\` opens a connection per transaction: TCP + TLS"
  echo "handshake + startup every time. COPY streams ~1 GB to psql: bulk throughput over TLS."
  echo "Plaintext \`direct\`/\`pgwake\` rows are references (pgwake splices those)."
  echo
  echo "host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  echo "postgres: $("$PG_BIN/postgres" --version), ssl=on; client: $(pgbench --version); $(openssl version | cut -d' ' -f1-2)"
  echo "pgwake: \`$PGWAKE_BIN\` ($("$PGWAKE_BIN" --version)); peak RSS $PGWAKE_RSS; CPU over the run: $PGWAKE_CPU"
  echo "keys: $KEY_TYPE ($([ "$KEY_TYPE" = ec ] && echo ECDSA P-256 || echo RSA 2048)) for both servers; pgwake-tls route: $ROUTE"
  echo "pgbench: ${DURATION}s per run, -j min(2,c), clients: $CLIENTS; bulk COPY reps: $BULK_REPS; wall $(($(date +%s) - T0)) s"
  echo "load before: \`${LOAD_BEFORE#*load average: }\`, after: \`${LOAD_AFTER#*load average: }\` (1/5/15 min)"
  echo
  for s in "${SSLINFO[@]}"; do echo "- $s"; done
  echo
  python3 "$HERE/report.py" "$RES" --baseline direct-tls
  echo
  echo "Ratios (throughput, medians of repetitions):"
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
print("| test | clients | pgwake-tls / direct-tls | pgwake / direct (plaintext) | direct-tls / direct (TLS cost in Postgres) |")
print("|---|---:|---:|---:|---:|")
for k in order:
    print("| %s | %s | %s | %s | %s |" % (k[0], k[1], ratio(k, "pgwake-tls", "direct-tls"),
                                         ratio(k, "pgwake", "direct"), ratio(k, "direct-tls", "direct")))
PY
  echo
  echo "pgwake log ($(wc -l <"$OUT/raw/pgwake.log") lines, PGWAKE_LOG=$LOGLVL):"
  python3 - "$OUT/raw/pgwake.log" <<'PY'
import collections, json, sys
levels, msgs, modes, other = collections.Counter(), collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1], errors="replace"):
    try:
        r = json.loads(line)
    except ValueError:
        other += 1
        continue
    lv = r.get("level", "?")
    levels[lv] += 1
    f = dict(r.get("fields", {}))
    if f.get("message") == "session closed":
        modes[("TLS" if f.get("tls") else "plaintext", f.get("mode", "?"))] += 1
    if lv in ("WARN", "ERROR"):
        msgs[(lv, f.pop("message", ""), str(f.get("error", ""))[:160])] += 1
print("lines per level: " + (", ".join("%s=%d" % kv for kv in sorted(levels.items())) or "none")
      + (", non-JSON=%d" % other if other else ""))
print("sessions closed by client transport and forwarding mode: "
      + (", ".join("%s %s=%d" % (t, m, n) for (t, m), n in sorted(modes.items())) or "none"))
for (lv, m, e), n in msgs.most_common(20):
    print("- %s %s %s (x%d)" % (lv, m, e, n))
PY
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo
    echo "Failures:"
    for f in "${FAILED[@]}"; do echo "- $f"; done
  fi
} | tee "$OUT/report.md"
log "results: $OUT/report.md"
[ "${#FAILED[@]}" = 0 ]
