// @neondatabase/serverless's neon() (SQL over HTTP, POST /sql) against pgwake's [http] listener.
// Usage: node neon_http.mjs PORT ENDPOINT PASSWORD
// Prints one line per check; the Rust test compares the whole output.
import { neon, neonConfig } from '@neondatabase/serverless';

const [port, endpoint, password] = process.argv.slice(2);
const scheme = process.env.PGWAKE_TLS === '1' ? 'https' : 'http';
neonConfig.fetchEndpoint = () => `${scheme}://127.0.0.1:${port}/sql`;
const url = (pw) => `postgresql://postgres:${encodeURIComponent(pw)}@${endpoint}.pgwake.test/postgres`;
const sql = neon(url(password));
const out = (...a) => console.log(...a);
const code = async (p) => {
  try {
    await p;
    return 'no error';
  } catch (e) {
    return e.code ?? e.message;
  }
};

const [r] = await sql`select ${41}::int + 1 as n, ${'hé'}::text as t, null::text as z`;
out('params', r.n, r.t, r.z);
const [ty] = await sql`select 9007199254740993::int8 as big, 1.50::numeric as num,
  '{"a":[1,2]}'::jsonb as j, array[1,2,3] as arr, '\\x0102'::bytea as b,
  '2024-01-02T03:04:05Z'::timestamptz as ts, ${[4, 5]}::int[] as parr`;
out('types', ty.big, ty.num, JSON.stringify(ty.j), JSON.stringify(ty.arr),
  ty.b.toString('hex'), ty.ts.toISOString(), JSON.stringify(ty.parr));
const full = await sql.query('select 1 as a union all select 2', [], { fullResults: true, arrayMode: true });
out('full', full.command, full.rowCount, full.fields[0].name, full.fields[0].dataTypeID, JSON.stringify(full.rows));

await sql`create table if not exists items (x int)`;
const res = await sql.transaction([sql`insert into items values (1)`, sql`select count(*)::int as n from items`]);
out('batch', res.length, res[1][0].n);
out('batch error', await code(sql.transaction([sql`insert into items values (2)`, sql`select 1/0`])));
out('rolled back', (await sql`select count(*)::int as n from items`)[0].n);
out('read only', await code(sql.transaction([sql`insert into items values (3)`], { readOnly: true })));
const [big] = await sql`select repeat('x', 5 * 1024 * 1024) as s`;
out('5MB', big.s.length);
out('error', await code(sql`select 1/0`));
out('syntax', await code(sql`selec 1`));
out('wrong password', await code(neon(url(password + 'x'))`select 1`));
