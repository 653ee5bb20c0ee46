#!/usr/bin/env python3
"""coldstart-pgwake.py - wake-on-connect latency through pgwake vs the bare-postgres floor,
measured in ONE interleaved run.

Per run (order alternates between runs, so noise hits both alike):
  W  pgwake, local endpoint "cold" (idle_timeout 1s): wait until the endpoint is suspended
     (its postmaster.pid is gone AND pgwake logged one more "compute suspended"), settle
     --settle s, then time one client connect -> first SELECT 1 result through pgwake
     (pgwire.probe --once, startup options endpoint=cold; the same as
     `pgwire.py probe --once --options endpoint=cold`).  Also recorded: pgwake's own
     "compute running" elapsed_ms (start of the wake -> compute ready), and one more
     connect+SELECT 1 right after (warm, through pgwake).
  B  coldstart.py's method B on an equivalent cluster: `postgres -D DIR &` (spawned the way
     pgwake spawns it: setuid/setgid in the child, not through setpriv) -> connect +
     SELECT 1 polled every --interval (default 2 ms = pgwake's internal readiness-probe
     period; coldstart.py uses 5 ms) -> kill -INT -> exit; then one more connect+SELECT 1
     (warm, direct) before the kill.

Equivalence: both clusters come from the same initdb (pgwake's: -U postgres --auth=trust
-E UTF8 --locale=C) of the same binaries (--pg-bin, also given to pgwake as local.bin_dir),
have initdb's default postgresql.conf (shared_buffers 128MB, max_connections 100), and the
same command line (-p PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=);
pgwake's [local.settings] is empty.  The first wake (initdb) and one start/stop of B are
warm-ups and not counted.

Prints (markdown) min/median/p90/p99/max for every series, the difference and ratio of the
medians, load average before/after, per-run samples and pgwake's WARN/ERROR log lines.

Usage: coldstart-pgwake.py [--runs 20] [--pgwake-bin PATH] [--port 55437] [--bare-port 55441]
                           [--pg-bin DIR] [--interval 0.002] [--settle 0.2]
                           [--suspend-deadline 30] [--out FILE.md] [--json FILE] [--keep]
Needs root or the postgres OS user (runs servers as PG_OS_USER=postgres when root).
"""
import argparse
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True
sys.path.insert(0, HERE)
import pgwire  # noqa: E402

PG_OS_USER = os.environ.get("PG_OS_USER", "postgres")
ENDPOINT = "cold"


def as_pg(cmd):
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=" + PG_OS_USER, "--regid=" + PG_OS_USER, "--init-groups", "--"] + cmd
    return cmd


def loadavg():
    return "%.2f, %.2f, %.2f" % os.getloadavg()


class PgwakeLog:
    """Follows pgwake's --log-json output file."""

    def __init__(self, path):
        self.path = path
        self.pos = 0
        self.records = []

    def poll(self):
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        # only complete lines
        cut = data.rfind(b"\n") + 1
        self.pos += cut
        for line in data[:cut].splitlines():
            try:
                self.records.append(json.loads(line))
            except ValueError:
                self.records.append({"level": "RAW", "fields": {"message": line.decode(errors="replace")}})

    def count(self, message):
        self.poll()
        return sum(1 for r in self.records if r.get("fields", {}).get("message") == message)

    def last(self, message):
        self.poll()
        for r in reversed(self.records):
            if r.get("fields", {}).get("message") == message:
                return r
        return None


def wait_for(cond, deadline_s, what, step=0.005):
    t_end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > t_end:
            raise RuntimeError("timed out after %.0f s waiting for %s" % (deadline_s, what))
        time.sleep(step)


def stats_row(label, vals):
    s = pgwire.summarize(vals)
    if not vals:
        return "| %s | 0 | | | | | |" % label
    return "| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f |" % (
        label, s["n"], s["min"], s["median"], s["p90"], s["p99"], s["max"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pgwake-bin", default=os.environ.get("PGWAKE_BIN"))
    ap.add_argument("--port", type=int, default=55437, help="pgwake listen port")
    ap.add_argument("--bare-port", type=int, default=55441, help="port of the bare cluster (B)")
    ap.add_argument("--pg-bin", default=os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
    ap.add_argument("--interval", type=float, default=0.002, help="B: poll interval (s)")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="pause after a suspend / stop before the next timed start (s)")
    ap.add_argument("--suspend-deadline", type=float, default=30.0)
    ap.add_argument("--out", default=None, help="also write the markdown summary here")
    ap.add_argument("--json", default=None, help="write raw samples here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()

    if not a.pgwake_bin:
        for b in (os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target")), "release", "pgwake"),):
            if os.access(b, os.X_OK):
                a.pgwake_bin = b
                break
    if not a.pgwake_bin or not os.access(a.pgwake_bin, os.X_OK):
        sys.exit("no pgwake binary (--pgwake-bin / PGWAKE_BIN)")
    postgres = os.path.join(a.pg_bin, "postgres")
    initdb = os.path.join(a.pg_bin, "initdb")

    tmp = tempfile.mkdtemp(prefix="bench-coldwake.")
    os.chmod(tmp, 0o755)
    data_root = os.path.join(tmp, "data")          # pgwake creates and chowns it
    wake_dir = os.path.join(data_root, ENDPOINT)
    bare_dir = os.path.join(tmp, "bare")
    bare_log = os.path.join(tmp, "bare.log")
    wlog_path = os.path.join(tmp, "pgwake.log")
    cfg = os.path.join(tmp, "pgwake.toml")
    with open(cfg, "w") as f:
        f.write("""# coldstart-pgwake.py
[proxy]
listen = "127.0.0.1:%d"

[compute]
wake_timeout = "60s"

[local]
data_root = "%s"
create_data_root = true
bin_dir = "%s"

# empty on purpose: initdb's defaults, like the bare cluster
[local.settings]

[[endpoint]]
id = "%s"
backend = "local"
idle_timeout = "1s"
""" % (a.port, data_root, a.pg_bin, ENDPOINT))

    host, user, db = "127.0.0.1", "postgres", "postgres"
    opts = "endpoint=" + ENDPOINT
    wake = None
    bare = None
    samples = {k: [] for k in ("W_ready", "W_internal", "W_warm", "W_suspend",
                               "B_listen", "B_ready", "B_warm", "B_stop")}
    per_run = []
    failures = []
    b_errors = {}
    load = {"start": loadavg()}
    wlog = PgwakeLog(wlog_path)
    t_begin = time.time()
    try:
        subprocess.run([a.pgwake_bin, "--check-config", cfg], check=True, stdout=subprocess.DEVNULL)
        lf = open(wlog_path, "ab")
        wake = subprocess.Popen([a.pgwake_bin, "--log-json", "--config", cfg], stdout=lf,
                                stderr=subprocess.STDOUT,
                                env=dict(os.environ, PGWAKE_LOG=os.environ.get("PGWAKE_LOG", "info")))
        lf.close()

        # bare cluster, initdb exactly as pgwake does it
        os.makedirs(bare_dir, mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(bare_dir, PG_OS_USER, PG_OS_USER)
        subprocess.run(as_pg([initdb, "-D", bare_dir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                              "--locale=C"]), cwd="/", check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
        open(bare_log, "a").close()
        if os.geteuid() == 0:
            shutil.chown(bare_log, PG_OS_USER)
        # the same command line pgwake uses; spawned like pgwake does it (fork, setgid/setuid in
        # the child, no supplementary groups, own process group) rather than through setpriv,
        # which would add an exec and an initgroups (~2-3 ms here) to the floor
        bare_cmd = [postgres, "-D", bare_dir, "-p", str(a.bare_port),
                    "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        bare_kw = {"cwd": "/", "stderr": subprocess.STDOUT, "process_group": 0}
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_OS_USER)
            bare_kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])

        def wake_once(timeout=60.0):
            return pgwire.probe(host, a.port, user, db, once=True, timeout=timeout, options=opts)

        def suspended_after(n_before):
            return (not os.path.exists(os.path.join(wake_dir, "postmaster.pid"))
                    and wlog.count("compute suspended") > n_before)

        # warm-up W: first wake includes initdb; wait for the suspend it is followed by
        wait_for(lambda: pgwire.probe(host, a.port, user, db, timeout=0.2, once=True,
                                      options="endpoint=nonexistent")["listen_s"] is not None,
                 20, "pgwake to listen", step=0.02)
        t0 = time.perf_counter()
        n_susp = wlog.count("compute suspended")
        r = wake_once(timeout=120.0)
        if r["ready_s"] is None:
            raise RuntimeError("warm-up wake failed: %r" % r)
        initdb_wake_ms = (time.perf_counter() - t0) * 1000
        print("warm-up wake (incl. initdb): %.0f ms" % initdb_wake_ms, file=sys.stderr)
        wait_for(lambda: suspended_after(n_susp), a.suspend_deadline, "the first suspend")

        # warm-up B
        lf = open(bare_log, "ab")
        bare = subprocess.Popen(bare_cmd, stdout=lf, **bare_kw)
        r = pgwire.probe(host, a.bare_port, user, db, interval=a.interval, timeout=30)
        if r["ready_s"] is None:
            raise RuntimeError("bare warm-up start failed: %r" % r)
        bare.send_signal(signal.SIGINT)
        bare.wait(timeout=60)
        bare = None
        lf.close()

        for i in range(a.runs):
            row = {"run": i + 1, "load1": os.getloadavg()[0]}
            for m in (("W", "B") if i % 2 == 0 else ("B", "W")):
                if m == "W":
                    # Suspended = no postmaster.pid and every start logged so far was followed
                    # by a "compute suspended" (the 1 s idle timer after the last client left).
                    try:
                        wait_for(lambda: not os.path.exists(os.path.join(wake_dir, "postmaster.pid"))
                                 and wlog.count("compute suspended") >= wlog.count("compute running"),
                                 a.suspend_deadline, "endpoint %s to be suspended" % ENDPOINT)
                    except RuntimeError as e:
                        failures.append("run %d W: %s" % (i + 1, e))
                        continue
                    n_susp = wlog.count("compute suspended")
                    n_run = wlog.count("compute running")
                    time.sleep(a.settle)
                    row["W_t0_wall"] = time.time()
                    t0 = time.perf_counter()
                    r = wake_once()
                    if r["ready_s"] is None:
                        failures.append("run %d W: cold connect failed: %s %s" % (
                            i + 1, r.get("errors"), r.get("last_error")))
                        continue
                    ready_ms = r["ready_s"] * 1000
                    t1 = time.perf_counter()
                    r2 = wake_once(timeout=10.0)
                    warm_ms = (time.perf_counter() - t1) * 1000 if r2["ready_s"] is not None else None
                    if warm_ms is None:
                        failures.append("run %d W: warm connect failed: %s" % (i + 1, r2.get("last_error")))
                    # pgwake's own view of the start
                    wait_for(lambda: wlog.count("compute running") > n_run, 5, "'compute running' log line")
                    rec = wlog.last("compute running")
                    internal = rec["fields"].get("elapsed_ms") if rec else None
                    if wlog.count("compute running") != n_run + 1:
                        failures.append("run %d W: expected exactly one start, log shows %d" % (
                            i + 1, wlog.count("compute running") - n_run))
                    # wait for this wake's suspend so the next W starts from the same state, and
                    # take pgwake's stop time from its log
                    try:
                        wait_for(lambda: suspended_after(n_susp), a.suspend_deadline, "suspend after run")
                        susp = wlog.last("compute suspended")["fields"].get("elapsed_ms")
                    except RuntimeError as e:
                        failures.append("run %d W: %s" % (i + 1, e))
                        susp = None
                    samples["W_ready"].append(ready_ms)
                    if internal is not None:
                        samples["W_internal"].append(float(internal))
                    if warm_ms is not None:
                        samples["W_warm"].append(warm_ms)
                    if susp is not None:
                        samples["W_suspend"].append(float(susp))
                    row.update(W_ready=ready_ms, W_internal=internal, W_warm=warm_ms, W_suspend=susp)
                else:
                    time.sleep(a.settle)
                    lf = open(bare_log, "ab")
                    row["B_t0_wall"] = time.time()
                    t0 = time.perf_counter()
                    bare = subprocess.Popen(bare_cmd, stdout=lf, **bare_kw)
                    r = pgwire.probe(host, a.bare_port, user, db, interval=a.interval, timeout=30, t0=t0)
                    if r["ready_s"] is None:
                        failures.append("run %d B: never ready: %r" % (i + 1, r))
                    else:
                        for k, v in r["errors"].items():
                            b_errors[k] = b_errors.get(k, 0) + v
                        t1 = time.perf_counter()
                        r2 = pgwire.probe(host, a.bare_port, user, db, once=True, timeout=10)
                        warm_ms = (time.perf_counter() - t1) * 1000 if r2["ready_s"] is not None else None
                        samples["B_listen"].append(r["listen_s"] * 1000)
                        samples["B_ready"].append(r["ready_s"] * 1000)
                        if warm_ms is not None:
                            samples["B_warm"].append(warm_ms)
                        row.update(B_ready=r["ready_s"] * 1000, B_listen=r["listen_s"] * 1000, B_warm=warm_ms)
                    t2 = time.perf_counter()
                    bare.send_signal(signal.SIGINT)
                    bare.wait(timeout=60)
                    samples["B_stop"].append((time.perf_counter() - t2) * 1000)
                    row["B_stop"] = samples["B_stop"][-1]
                    bare = None
                    lf.close()
            per_run.append(row)
            print("run %2d/%d  pgwake=%s ms  bare=%s ms  load1=%.2f" % (
                i + 1, a.runs, "%.1f" % row["W_ready"] if "W_ready" in row else "FAIL",
                "%.1f" % row["B_ready"] if "B_ready" in row else "FAIL", row["load1"]), file=sys.stderr)
        load["end"] = loadavg()
    finally:
        if bare is not None and bare.poll() is None:
            bare.send_signal(signal.SIGINT)
            try:
                bare.wait(timeout=30)
            except subprocess.TimeoutExpired:
                bare.kill()
                bare.wait()
        if wake is not None and wake.poll() is None:
            wake.send_signal(signal.SIGTERM)  # drains, then stops the compute cleanly
            try:
                wake.wait(timeout=90)
            except subprocess.TimeoutExpired:
                wake.kill()
                wake.wait()
        wlog.poll()
        wall = time.time() - t_begin
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept %s" % tmp, file=sys.stderr)

    # ------------------------------------------------------------------ report
    out = []
    p = out.append
    ver = subprocess.run(as_pg([postgres, "--version"]), cwd="/", capture_output=True, text=True).stdout.strip()
    p("# coldstart-pgwake.py, %s" % time.strftime("%Y-%m-%d %H:%M:%S"))
    p("")
    p("host: %d cores, %s; %s; pgwake `%s`; %d runs interleaved (order alternating), wall %.0f s" % (
        os.cpu_count(), os.uname().release, ver, a.pgwake_bin, a.runs, wall))
    p("load average (1/5/15 min): start `%s`, end `%s`; per-run 1-min load: min %.2f, max %.2f" % (
        load["start"], load.get("end", "?"),
        min(r["load1"] for r in per_run) if per_run else 0, max(r["load1"] for r in per_run) if per_run else 0))
    p("warm-up wake including initdb (not counted): %.0f ms" % initdb_wake_ms)
    p("")
    p("Cold start, ms (warm page cache, empty cluster, initdb defaults: shared_buffers 128MB):")
    p("")
    p("| measurement | n | min | median | p90 | p99 | max |")
    p("|---|---:|---:|---:|---:|---:|---:|")
    p(stats_row("**pgwake**: client connect -> first `SELECT 1` result, endpoint suspended", samples["W_ready"]))
    p(stats_row("pgwake log: wake start -> compute ready (`compute running` elapsed_ms, 1 ms units)",
                samples["W_internal"]))
    p(stats_row("**bare** `postgres &` -> first `SELECT 1` result (%.0f ms poll)" % (a.interval * 1000),
                samples["B_ready"]))
    p(stats_row("bare `postgres &` -> port accepts TCP", samples["B_listen"]))
    p(stats_row("warm connect+`SELECT 1` through pgwake (right after the wake)", samples["W_warm"]))
    p(stats_row("warm connect+`SELECT 1` direct to bare (right after ready)", samples["B_warm"]))
    p(stats_row("pgwake suspend (fast shutdown, log elapsed_ms)", samples["W_suspend"]))
    p(stats_row("bare `kill -INT` -> exited", samples["B_stop"]))
    p("")
    sw, sb = pgwire.summarize(samples["W_ready"]), pgwire.summarize(samples["B_ready"])
    if sw["n"] and sb["n"]:
        p("pgwake - bare: median %+.1f ms (%.2fx), p99 %+.1f ms (%.2fx)" % (
            sw["median"] - sb["median"], sw["median"] / sb["median"], sw["p99"] - sb["p99"], sw["p99"] / sb["p99"]))
    p("")
    p("bare poll attempts that failed, all runs: %s (ConnectionRefusedError = not listening yet, "
      "57P03 = starting up)" % (", ".join("%s=%d" % kv for kv in sorted(b_errors.items())) or "none"))
    p("")
    p("Failures: %s" % ("none" if not failures else ""))
    for f in failures:
        p("- %s" % f)
    warn = [r for r in wlog.records if r.get("level") in ("WARN", "ERROR", "RAW")]
    p("")
    p("pgwake log: %d lines, %d WARN/ERROR/non-JSON" % (len(wlog.records), len(warn)))
    for r in warn[:20]:
        p("- `%s`" % json.dumps(r.get("fields", {}))[:300])
    p("")
    p("<details><summary>per run (ms)</summary>")
    p("")
    p("| run | load1 | pgwake ready | pgwake internal | pgwake warm | pgwake suspend | bare ready | bare listen | bare warm | bare stop |")
    p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def fm(v):
        return "" if v is None else ("%.1f" % v)
    for r in per_run:
        p("| %d | %.2f | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["run"], r["load1"], fm(r.get("W_ready")), fm(r.get("W_internal")), fm(r.get("W_warm")),
            fm(r.get("W_suspend")), fm(r.get("B_ready")), fm(r.get("B_listen")), fm(r.get("B_warm")),
            fm(r.get("B_stop"))))
    p("")
    p("</details>")
    text = "\n".join(out)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"samples_ms": samples, "per_run": per_run, "failures": failures,
                       "load": load}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
