// @neondatabase/serverless (the real driver from npm) against pgwake's [http] listener.
// Usage: node neon_ws.mjs PORT ENDPOINT PASSWORD [scram]
// Prints one line per check; the Rust test compares the whole output.
import { Pool, Client, neonConfig } from '@neondatabase/serverless';
import ws from 'ws';

const [port, endpoint, password, mode] = process.argv.slice(2);
neonConfig.webSocketConstructor = ws;
// wss:// when pgwake's [http] tls is on (the test sets PGWAKE_TLS and NODE_EXTRA_CA_CERTS).
neonConfig.useSecureWebSocket = process.env.PGWAKE_TLS === '1';
// The host in the connection string is not resolvable: the driver only hands it to wsProxy.
neonConfig.wsProxy = () => `127.0.0.1:${port}/v2?endpoint=${endpoint}`;
const url = (pw) => `postgresql://postgres:${encodeURIComponent(pw)}@${endpoint}.pgwake.test/postgres`;

const out = (...a) => console.log(...a);

// Client: pipelined startup + cleartext password + first query (pipelineConnect = "password").
const client = new Client(url(password));
await client.connect();
out('select1', (await client.query('select 1 as one')).rows[0].one);
const r = await client.query('select $1::int8 + 1 as n, $2::text as t, $3::jsonb as j', [41, 'hé', { a: [1, 2] }]);
out('params', r.rows[0].n, r.rows[0].t, JSON.stringify(r.rows[0].j));
await client.end();

// Pool: a transaction that commits and one that rolls back.
const pool = new Pool({ connectionString: url(password) });
const c = await pool.connect();
await c.query('create temp table t (x int)');
await c.query('begin');
await c.query('insert into t values (1), (2)');
await c.query('commit');
await c.query('begin');
await c.query('insert into t values (3)');
await c.query('rollback');
out('tx', (await c.query('select count(*)::int as n from t')).rows[0].n);
try {
  await c.query('select 1/0');
} catch (e) {
  out('error', e.code);
}
out('5MB', (await c.query(`select repeat('x', 5 * 1024 * 1024) as s`)).rows[0].s.length);
out('after error', (await c.query('select 2 as two')).rows[0].two);
c.release();
await pool.end();

// A wrong password: refused by pgwake (SCRAM endpoints check it before any wake).
if (mode !== 'scram') process.exit(0);
const bad = new Client(url(password + 'x'));
// The refused connection also closes: an 'error' event nobody else listens to.
bad.on('error', () => {});
try {
  await bad.connect();
  await bad.query('select 1');
  out('wrong password accepted');
} catch (e) {
  out('wrong password', e.code);
}
