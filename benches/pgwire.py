#!/usr/bin/env python3
"""Minimal Postgres wire-protocol client (python3 stdlib only).

Used by the bench scripts to time "connect + authenticate + SELECT 1" without
the fork/exec cost of psql.  Supports trust, cleartext, md5 and SCRAM-SHA-256
(no TLS, no channel binding).

Subcommands
  probe    retry connect+SELECT 1 every --interval until it succeeds (or
           --timeout); prints JSON {listen_s, ready_s, attempts, errors}
           measured from the moment the command started.  With --once it makes
           a single attempt (useful to time a wake-on-connect through a proxy).
  connect  N sequential connect+SELECT 1+Terminate round trips; prints JSON
           with min/median/p90/p99/max milliseconds.

--options STR sends STR as the startup parameter "options" (what libpq sends for
options=STR / PGOPTIONS), e.g. --options endpoint=bench to pick a pgwake
endpoint.  Default: $PGOPTIONS, like libpq; --options '' sends none.
(pgwake/benches copy of /work/shared/bench/pgwire.py; only the PGOPTIONS default,
connect's --pause-ms and this paragraph differ.)

Examples
  pgwire.py probe   --host 127.0.0.1 --port 55432 --user postgres --db postgres
  pgwire.py connect --host 127.0.0.1 --port 55433 -n 200
  PGPASSWORD=bench_scram pgwire.py probe --once --user bench_scram --db postgres
  pgwire.py probe --once --timeout 60 --port 4432 --options endpoint=cold
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time


class PgError(Exception):
    def __init__(self, fields):
        self.fields = fields
        self.code = fields.get("C", "")
        super().__init__("%s %s: %s" % (fields.get("S", "ERROR"), self.code, fields.get("M", "")))


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def _read_msg(sock):
    hdr = _recv_exact(sock, 5)
    typ = hdr[0:1]
    (ln,) = struct.unpack("!I", hdr[1:5])
    body = _recv_exact(sock, ln - 4) if ln > 4 else b""
    return typ, body


def _msg(typ, body):
    return typ + struct.pack("!I", len(body) + 4) + body


def _parse_error(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def _scram(sock, user, password, mechs):
    if "SCRAM-SHA-256" not in mechs:
        raise RuntimeError("server offers SASL mechanisms %r, only SCRAM-SHA-256 is supported" % mechs)
    if password is None:
        raise RuntimeError("server asks for SCRAM-SHA-256 but no password (PGPASSWORD / --password)")
    nonce = base64.b64encode(os.urandom(18)).decode()
    client_first_bare = "n=,r=" + nonce
    data = ("n,," + client_first_bare).encode()
    sock.sendall(_msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data))
    typ, body = _read_msg(sock)
    if typ == b"E":
        raise PgError(_parse_error(body))
    (code,) = struct.unpack("!I", body[:4])
    if code != 11:
        raise RuntimeError("expected SASLContinue, got auth code %d" % code)
    server_first = body[4:].decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise RuntimeError("SCRAM nonce mismatch")
    salt = base64.b64decode(attrs["s"])
    iters = int(attrs["i"])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iters)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = "c=biws,r=" + attrs["r"]
    auth_msg = ",".join([client_first_bare, server_first, without_proof]).encode()
    client_sig = hmac.new(stored_key, auth_msg, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, client_sig))
    final = without_proof + ",p=" + base64.b64encode(proof).decode()
    sock.sendall(_msg(b"p", final.encode()))
    typ, body = _read_msg(sock)
    if typ == b"E":
        raise PgError(_parse_error(body))
    (code,) = struct.unpack("!I", body[:4])
    if code != 12:
        raise RuntimeError("expected SASLFinal, got auth code %d" % code)
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expect = base64.b64encode(hmac.new(server_key, auth_msg, hashlib.sha256).digest()).decode()
    got = dict(kv.split("=", 1) for kv in body[4:].decode().split(","))
    if got.get("v") != expect:
        raise RuntimeError("SCRAM server signature mismatch")


def select1(host, port, user, db, password=None, timeout=5.0, on_connected=None, options=None):
    """One full round: TCP connect, startup, auth, SELECT 1, Terminate.

    Calls on_connected() right after the TCP connect succeeded.
    Raises OSError (connect refused etc.), PgError (server error, e.g. 57P03
    'the database system is starting up') or RuntimeError.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if on_connected:
            on_connected()
        params = b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0"
        params += b"application_name\0pgwire.py\0"
        if options:
            params += b"options\0" + options.encode() + b"\0"
        params += b"\0"
        body = struct.pack("!I", 196608) + params
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        # authentication / startup phase
        while True:
            typ, body = _read_msg(sock)
            if typ == b"E":
                raise PgError(_parse_error(body))
            if typ == b"R":
                (code,) = struct.unpack("!I", body[:4])
                if code == 0:
                    continue
                if code == 3:  # cleartext
                    if password is None:
                        raise RuntimeError("server asks for a password but none given")
                    sock.sendall(_msg(b"p", password.encode() + b"\0"))
                elif code == 5:  # md5
                    if password is None:
                        raise RuntimeError("server asks for a password but none given")
                    salt = body[4:8]
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
                    outer = "md5" + hashlib.md5(inner + salt).hexdigest()
                    sock.sendall(_msg(b"p", outer.encode() + b"\0"))
                elif code == 10:  # SASL
                    mechs = [m.decode() for m in body[4:].split(b"\0") if m]
                    _scram(sock, user, password, mechs)
                else:
                    raise RuntimeError("unsupported auth request %d" % code)
            elif typ == b"Z":
                break
            # S (ParameterStatus), K (BackendKeyData), N (Notice): ignore
        sock.sendall(_msg(b"Q", b"SELECT 1\0"))
        row = None
        while True:
            typ, body = _read_msg(sock)
            if typ == b"E":
                raise PgError(_parse_error(body))
            if typ == b"D":
                (ncol,) = struct.unpack("!H", body[:2])
                (ln,) = struct.unpack("!i", body[2:6])
                row = body[6:6 + ln].decode()
            if typ == b"Z":
                break
        if row != "1":
            raise RuntimeError("SELECT 1 returned %r" % row)
        sock.sendall(_msg(b"X", b""))
    finally:
        sock.close()


def probe(host, port, user, db, password=None, interval=0.005, timeout=30.0, once=False,
          t0=None, options=None):
    """Retry select1() until it succeeds. Times are seconds since t0 (perf_counter)."""
    if t0 is None:
        t0 = time.perf_counter()
    res = {"listen_s": None, "ready_s": None, "attempts": 0, "errors": {}}

    def connected():
        if res["listen_s"] is None:
            res["listen_s"] = time.perf_counter() - t0

    deadline = t0 + timeout
    while True:
        res["attempts"] += 1
        try:
            # a single attempt may legitimately wait for a whole wake-on-connect
            per_try = timeout if once else max(0.5, min(timeout, 10.0))
            select1(host, port, user, db, password, timeout=per_try,
                    on_connected=connected, options=options)
            res["ready_s"] = time.perf_counter() - t0
            return res
        except (OSError, PgError, RuntimeError, ConnectionError) as e:
            key = getattr(e, "code", None) or type(e).__name__
            res["errors"][key] = res["errors"].get(key, 0) + 1
            res["last_error"] = str(e)
            if once or time.perf_counter() >= deadline:
                return res
            time.sleep(interval)


def pct(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    import math
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


def summarize(vals):
    s = sorted(vals)
    n = len(s)
    med = (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2) if n else None
    return {"n": n, "min": s[0] if s else None, "median": med, "p90": pct(s, 90),
            "p99": pct(s, 99), "max": s[-1] if s else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "connect"):
        p = sub.add_parser(name)
        p.add_argument("--host", default=os.environ.get("PGHOST", "127.0.0.1"))
        p.add_argument("--port", type=int, default=int(os.environ.get("PGPORT", "5432")))
        p.add_argument("--user", default=os.environ.get("PGUSER", "postgres"))
        p.add_argument("--db", default=os.environ.get("PGDATABASE", "postgres"))
        p.add_argument("--password", default=os.environ.get("PGPASSWORD"))
        p.add_argument("--options", default=os.environ.get("PGOPTIONS") or None,
                       help="startup 'options' parameter, e.g. endpoint=ID (default: $PGOPTIONS)")
        if name == "probe":
            p.add_argument("--interval", type=float, default=0.005)
            p.add_argument("--timeout", type=float, default=30.0)
            p.add_argument("--once", action="store_true")
        else:
            p.add_argument("-n", type=int, default=200)
            p.add_argument("--pause-ms", type=float, default=0.0,
                           help="idle time between connections, not timed (a client that"
                                " connects now and then, not back to back)")
    a = ap.parse_args()
    if a.cmd == "probe":
        r = probe(a.host, a.port, a.user, a.db, a.password, a.interval, a.timeout, a.once,
                  options=a.options)
        print(json.dumps(r))
        sys.exit(0 if r["ready_s"] is not None else 1)
    else:
        lat = []
        errors = 0
        last = None
        t_start = time.perf_counter()
        for _ in range(a.n):
            t = time.perf_counter()
            try:
                select1(a.host, a.port, a.user, a.db, a.password, options=a.options)
                lat.append((time.perf_counter() - t) * 1000.0)
            except Exception as e:  # noqa: BLE001 - count and report
                errors += 1
                last = str(e)
            if a.pause_ms > 0:
                time.sleep(a.pause_ms / 1000.0)
        wall = time.perf_counter() - t_start
        out = {"unit": "ms", "errors": errors, "wall_s": wall,
               "per_s": (len(lat) / wall) if wall > 0 else None}
        out.update(summarize(lat))
        if last:
            out["last_error"] = last
        print(json.dumps(out))
        sys.exit(0 if errors == 0 else 1)


if __name__ == "__main__":
    main()
