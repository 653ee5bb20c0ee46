"""Drives pgwake with psycopg 3 (libpq underneath): python3 psycopg_check.py CONNINFO"""
import sys

import psycopg

conninfo = sys.argv[1]
with psycopg.connect(conninfo, autocommit=False) as conn:
    with conn.cursor() as cur:
        cur.execute("select %s::int + 1, current_setting('application_name')", (41,))
        assert cur.fetchone() == (42, "psycopg-test"), "parameterized query"
        cur.execute("create temp table t (i int, s text)")
        with cur.copy("copy t from stdin") as copy:
            for i in range(1000):
                copy.write_row((i, "row %d" % i))
        cur.execute("select count(*), sum(i) from t")
        assert cur.fetchone() == (1000, 499500), "copy in"
    conn.rollback()
    # Server-side prepared statements (extended protocol, named) survive through the proxy.
    for i in range(10):
        r = conn.execute("select %s::text", (str(i),), prepare=True).fetchone()
        assert r == (str(i),)
print("psycopg ok")
