"""Logs in through pgwake with asyncpg (its own SCRAM, no libpq), for tests/auth_drivers.rs.

Reads PGW_HOST, PGW_PORT, PGW_USER, PGW_PASSWORD, PGW_ENDPOINT; with PGW_CA, TLS verified
against that CA (asyncpg has no channel binding). Prints "ok <current_user> <tls>" or
"error <SQLSTATE>"."""
import asyncio
import os
import ssl

import asyncpg


async def main():
    env = os.environ
    tls = None
    if env.get("PGW_CA"):
        tls = ssl.create_default_context(cafile=env["PGW_CA"])
    try:
        conn = await asyncpg.connect(
            host=env["PGW_HOST"],
            port=int(env["PGW_PORT"]),
            user=env["PGW_USER"],
            password=env["PGW_PASSWORD"],
            database="postgres",
            ssl=tls if tls is not None else False,
            server_settings={"options": "endpoint=" + env["PGW_ENDPOINT"]},
            timeout=60,
        )
    except asyncpg.PostgresError as e:
        print("error", e.sqlstate)
        return
    try:
        user = await conn.fetchval("select current_user")
        in_tls = conn._transport.get_extra_info("sslcontext") is not None
        print("ok", user, "true" if in_tls else "false")
    finally:
        await conn.close()


asyncio.run(main())
