// Logs in through pgwake with node-postgres (pure JavaScript SCRAM), for tests/auth_drivers.rs.
// Reads PGW_HOST, PGW_PORT, PGW_USER, PGW_PASSWORD, PGW_ENDPOINT; with PGW_CA, TLS verified
// against that CA (PGW_SERVERNAME: the SNI name, then the endpoint comes from it) and
// SCRAM-SHA-256-PLUS when offered. Prints "ok <current_user> <tls>" or "error <SQLSTATE>".
'use strict'
const fs = require('fs')
const { Client } = require('pg')

const env = process.env
const config = {
  host: env.PGW_HOST,
  port: Number(env.PGW_PORT),
  user: env.PGW_USER,
  password: env.PGW_PASSWORD,
  database: 'postgres',
  connectionTimeoutMillis: 60000,
}
if (!env.PGW_SERVERNAME) config.options = 'endpoint=' + env.PGW_ENDPOINT
if (env.PGW_CA) {
  config.ssl = { ca: fs.readFileSync(env.PGW_CA), rejectUnauthorized: true }
  if (env.PGW_SERVERNAME) config.ssl.servername = env.PGW_SERVERNAME
  config.enableChannelBinding = true
}

async function main() {
  const client = new Client(config)
  try {
    await client.connect()
  } catch (e) {
    if (!e.code) throw e
    console.log('error ' + e.code)
    return
  }
  const res = await client.query('select current_user as u')
  const tls = client.connection.stream.encrypted === true
  console.log('ok ' + res.rows[0].u + ' ' + tls)
  await client.end()
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
