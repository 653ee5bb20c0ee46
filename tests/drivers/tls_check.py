"""Connects with psycopg over TLS and checks the session: python3 tls_check.py CONNINFO
Prints the libpq version and 'tls ok'. PSYCOPG_IMPL=binary selects psycopg-binary's own libpq
(newer than Debian's, with sslnegotiation=direct)."""
import sys

import psycopg

with psycopg.connect(sys.argv[1]) as conn:
    assert conn.pgconn.ssl_in_use, "TLS in use"
    assert conn.execute("select 40 + %s", (2,)).fetchone() == (42,)
print(psycopg.pq.version(), "tls ok")
