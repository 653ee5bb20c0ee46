"""Logs in through pgwake with psycopg 3 (libpq), for tests/auth_drivers.rs.

Reads PGW_HOST, PGW_PORT, PGW_USER, PGW_PASSWORD, PGW_ENDPOINT; with PGW_CA, TLS
(sslmode=verify-full against that CA, channel_binding=require; PGW_SERVERNAME: the host name
for SNI, then the endpoint comes from it; PGW_SSLNEGOTIATION=direct: direct TLS, or
"skip" when libpq is older than 17). Prints "ok <current_user> <tls>" or
"error <SQLSTATE>"."""
import os

import psycopg

env = os.environ
params = dict(
    user=env["PGW_USER"],
    password=env["PGW_PASSWORD"],
    dbname="postgres",
    port=env["PGW_PORT"],
    connect_timeout="60",
)
if env.get("PGW_SERVERNAME"):
    params.update(host=env["PGW_SERVERNAME"], hostaddr=env["PGW_HOST"])
else:
    params.update(host=env["PGW_HOST"], options="endpoint=" + env["PGW_ENDPOINT"])
if env.get("PGW_CA"):
    params.update(sslmode="verify-full", sslrootcert=env["PGW_CA"], channel_binding="require")
    if env.get("PGW_SSLNEGOTIATION") == "direct":
        # PostgreSQL 17's direct TLS: psycopg-binary bundles a libpq new enough.
        if psycopg.pq.version() < 170000:
            print("skip libpq", psycopg.pq.version())
            raise SystemExit(0)
        params.update(sslnegotiation="direct")
else:
    params.update(sslmode="disable")
try:
    conn = psycopg.connect(**params)
except psycopg.Error as e:
    sqlstate = e.sqlstate
    # libpq keeps no SQLSTATE for a failed connection attempt, only the server's message.
    if sqlstate is None and "password authentication failed for user" in str(e):
        sqlstate = "28P01"
    if sqlstate is None:
        raise
    print("error", sqlstate)
else:
    with conn:
        user = conn.execute("select current_user").fetchone()[0]
        print("ok", user, "true" if conn.pgconn.ssl_in_use else "false")
