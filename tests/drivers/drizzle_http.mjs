// drizzle-orm on drizzle-orm/neon-http (over @neondatabase/serverless's neon()) against pgwake.
// Usage: node drizzle_http.mjs PORT ENDPOINT PASSWORD
import { neon, neonConfig } from '@neondatabase/serverless';
import { drizzle } from 'drizzle-orm/neon-http';
import { pgTable, serial, text, jsonb, timestamp } from 'drizzle-orm/pg-core';
import { eq, sql } from 'drizzle-orm';

const [port, endpoint, password] = process.argv.slice(2);
neonConfig.fetchEndpoint = () => `http://127.0.0.1:${port}/sql`;
const db = drizzle({ client: neon(`postgresql://postgres:${encodeURIComponent(password)}@${endpoint}.pgwake.test/postgres`) });

const notes = pgTable('notes', {
  id: serial('id').primaryKey(),
  title: text('title').notNull(),
  meta: jsonb('meta'),
  created: timestamp('created', { withTimezone: true }).defaultNow(),
});

await db.execute(sql`create table if not exists notes (id serial primary key, title text not null, meta jsonb, created timestamptz default now())`);
const [inserted] = await db.insert(notes).values({ title: 'hello', meta: { tags: ['a', 'b'] } }).returning();
const rows = await db.select().from(notes).where(eq(notes.id, inserted.id));
console.log('drizzle', rows.length, rows[0].title, JSON.stringify(rows[0].meta), rows[0].created instanceof Date);
await db.update(notes).set({ title: 'bye' }).where(eq(notes.id, inserted.id));
const [{ n }] = await db.select({ n: sql`count(*)::int` }).from(notes).where(eq(notes.title, 'bye'));
console.log('updated', n);
