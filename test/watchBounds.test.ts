// The bounds of SSE watch streams, over real HTTP on the service as
// production wires it (a fake clock drives the watch hub): streams per agent
// token, per admin token and per replica (429 naming the bound, counted), and
// a stalled client of big events closed once it is over 1 MiB behind while a
// reading one gets every event whole.

import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MAX_STREAMS_PER_AGENT } from '../src/streams.js';
import { createTestDatabase, type TestDatabase } from './support/db.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';
import { openSse, stalledWatch, type SseStream } from './support/sse.js';

let db: TestDatabase;
let h: ServiceHarness;

beforeAll(async () => {
  db = await createTestDatabase();
  h = await startTestService(db, { env: { MAX_WATCHES: '7', MAX_WATCHES_PER_ADMIN: '2' } });
});
afterAll(async () => {
  await h.close();
  await db.drop();
});

const opened: SseStream[] = [];
afterEach(async () => {
  opened.splice(0).forEach((s) => s.close());
  await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(0), { timeout: 5000 });
});

async function watch(path: string, token: string, body?: unknown): Promise<SseStream> {
  const stream = await openSse(`${h.base}${path}`, token, body === undefined ? {} : { method: 'POST', body });
  opened.push(stream);
  return stream;
}
const one = (id: string, token: string) => watch(`/v1/agents/${id}/metadata/watch`, token);
const many = (id: string, token: string) => watch(`/v1/agents/metadata/watch?agent_id=${id}`, token);
const posted = (id: string, token: string) => watch('/v1/agents/metadata/watch', token, { agent_ids: [id] });
const refused = (bound: string) => h.metric('metabatch_watch_refused_total', { bound });

describe('watch streams per token and per replica', () => {
  it('gives an agent token 4 streams, the admin token MAX_WATCHES_PER_ADMIN, the replica MAX_WATCHES; 429 beyond, naming the bound', async () => {
    expect(MAX_STREAMS_PER_AGENT).toBe(4);
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const mine = [await one(a.id, a.token), await one(a.id, a.token), await many(a.id, a.token)];
    mine.push(await posted(a.id, a.token));
    expect(mine.map((s) => s.status)).toEqual([200, 200, 200, 200]);
    for (const extra of [await one(a.id, a.token), await many(a.id, a.token), await posted(a.id, a.token)]) {
      expect(extra.status).toBe(429);
      expect(extra.error).toEqual({
        error: 'too many watch streams for this agent token (at most 4); close one first',
      });
    }
    expect(await refused('agent')).toBe(3);
    expect(await h.metric('metabatch_watchers')).toBe(4);
    // A closed stream gives its place back.
    mine[0]!.close();
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(3));
    expect((await one(a.id, a.token)).status).toBe(200);

    expect((await one(a.id, ADMIN_TOKEN)).status).toBe(200);
    expect((await many(b.id, ADMIN_TOKEN)).status).toBe(200);
    const admin = await posted(b.id, ADMIN_TOKEN);
    expect(admin.status).toBe(429);
    expect(admin.error).toEqual({
      error: 'too many watch streams for the admin token (at most 2, MAX_WATCHES_PER_ADMIN); close one first',
    });
    expect(await refused('admin')).toBe(1);

    expect((await one(b.id, b.token)).status).toBe(200);
    const full = await one(b.id, b.token);
    expect(full.status).toBe(429);
    expect(full.error).toEqual({
      error: 'too many watch streams on this replica (at most 7, MAX_WATCHES): retry against another replica or later',
    });
    expect(await refused('replica')).toBe(1);
    // Refused opens never counted as open.
    expect(await h.metric('metabatch_watchers')).toBe(7);
  });
});

describe('a client that stops reading', () => {
  it('is closed at the next resend once over 1 MiB behind, and counted; a reading client gets each ~8 MB event whole', async () => {
    const keys = Array.from({ length: 1000 }, (_, i) => `k${String(i).padStart(4, '0')}`);
    const { id, token } = await h.agent(keys);
    // JSON doubles each quote: ~8 MB events, more than loopback's socket buffers take (~4 MB).
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET value = repeat('"', 2000), error = repeat('"', 2000), collected_at = now()
       WHERE workspace_agent_id = $1`,
      [id],
    );
    const reader = await one(id, ADMIN_TOKEN);
    await reader.next('data');
    const stalled = await stalledWatch(h.base, `/v1/agents/${id}/metadata/watch`, token);
    try {
      await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(2));
      await vi.waitFor(async () => expect(await h.metric('metabatch_watch_events_sent_total')).toBeGreaterThan(1));
      expect(await h.metric('metabatch_watch_closed_total', { reason: 'slow' })).toBe(0);
      await h.advance(5000);
      await vi.waitFor(async () => expect(await h.metric('metabatch_watch_closed_total', { reason: 'slow' })).toBe(1));
      expect(await h.metric('metabatch_watchers')).toBe(1);
      await vi.waitFor(() => expect(reader.events.filter((e) => e.type === 'data')).toHaveLength(2), {
        timeout: 10_000,
      });
      for (const event of reader.events) {
        const list = event.data as { value: string; error: string }[];
        expect(list).toHaveLength(1000);
        expect(list.every((item) => item.value.length === 2000 && item.error.length === 2000)).toBe(true);
      }
      // Once it reads, it finds its connection ended.
      const closed = new Promise((resolve) => stalled.once('close', resolve));
      stalled.resume();
      await closed;
    } finally {
      stalled.destroy();
    }
  });
});
