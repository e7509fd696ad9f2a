// Live watch over real HTTP (SSE) and a real LISTEN: the list at once, the
// update after a POST and a flush, `age` counting, one LISTEN connection for
// every watcher, a bounded buffer for a client that stops reading.

import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { subscribe, type Subscription } from '../src/client.js';
import { ADMIN_TOKEN, createAppHarness, type AppHarness } from './support/app.js';
import { createTestDatabase, type TestDatabase } from './support/db.js';

let db: TestDatabase;
let h: AppHarness;
let listener: Subscription;
let base: string;
/** Batches the hub's listener received. */
const hubBatches: string[][] = [];

beforeAll(async () => {
  db = await createTestDatabase();
  h = await createAppHarness(db, { batcher: { startAt: Date.now() } });
  // As main.ts wires it: one shared LISTEN feeds the hub.
  listener = await subscribe({
    databaseUrl: db.url,
    applicationName: 'watch-test-listener',
    onBatch: (ids) => {
      hubBatches.push(ids);
      h.hub.onBatch(ids);
    },
    onResync: () => h.hub.resync(),
  });
  base = await h.app.listen({ host: '127.0.0.1', port: 0 });
});
afterAll(async () => {
  await listener.close();
  await h.close();
  await db.drop();
});

type View = { key: string; value: string; age: number }[];

interface Stream {
  /** The next `event: data` list (pings are skipped). */
  next(): Promise<View>;
  /** The first of the next few lists in which `key` has `value` (periodic resends may come first). */
  until(key: string, value: string): Promise<View>;
  close(): void;
}

const streams: Stream[] = [];
afterEach(() => streams.splice(0).forEach((s) => s.close()));

async function watch(agentId: string, token: string): Promise<Stream> {
  const controller = new AbortController();
  const res = await fetch(`${base}/v1/agents/${agentId}/metadata/watch`, {
    headers: { authorization: `Bearer ${token}` },
    signal: controller.signal,
  });
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toBe('text/event-stream');
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  const stream: Stream = {
    async next() {
      for (;;) {
        const end = buffer.indexOf('\n\n');
        if (end >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = /^event: data\ndata: (.*)$/s.exec(event);
          if (data) return JSON.parse(data[1]!);
          continue;
        }
        const { value, done } = await reader.read();
        if (done) throw new Error('stream ended');
        buffer += value;
      }
    },
    async until(key, value) {
      for (let i = 0; i < 5; i++) {
        const list = await stream.next();
        if (list.find((r) => r.key === key)?.value === value) return list;
      }
      throw new Error(`no list with ${key}=${value} in 5 events`);
    },
    close: () => controller.abort(),
  };
  streams.push(stream);
  return stream;
}

async function post(agentId: string, token: string, metadata: object[]): Promise<void> {
  const res = await h.post(agentId, token, { metadata });
  expect(res.statusCode).toBe(202);
}

describe('GET /v1/agents/{id}/metadata/watch', () => {
  it('sends the list at once, the update after a POST and a flush, and keeps age counting', async () => {
    const { id, token } = await h.agent(['cpu', 'mem']);
    const stream = await watch(id, token);
    const first = await stream.next();
    expect(first.map((r) => [r.key, r.value])).toEqual([
      ['cpu', ''],
      ['mem', ''],
    ]);

    await post(id, token, [{ key: 'cpu', value: '12%', collected_at: new Date(h.clock.now).toISOString() }]);
    await h.advance(5000); // the batch flushes and NOTIFYs
    await vi.waitFor(() => expect(hubBatches.flat()).toContain(id));
    // The hub sends on its next 1 s tick after its listener marked the agent.
    await h.advance(1000);
    const update = await stream.until('cpu', '12%');
    const age = update.find((r) => r.key === 'cpu')!.age;
    expect(age).toBeGreaterThanOrEqual(0);

    // With nothing new, the list is sent again within 5 s, with age grown.
    await h.advance(5000);
    const again = await stream.next();
    expect(again.find((r) => r.key === 'cpu')!.value).toBe('12%');
    expect(again.find((r) => r.key === 'cpu')!.age).toBeGreaterThanOrEqual(age + 5);
  });

  it('gives two clients of one agent the same data', async () => {
    const { id, token } = await h.agent(['cpu']);
    const a = await watch(id, token);
    const b = await watch(id, ADMIN_TOKEN);
    await a.next();
    await b.next();
    await post(id, token, [{ key: 'cpu', value: 'same', collected_at: new Date(h.clock.now).toISOString() }]);
    await h.advance(5000);
    await vi.waitFor(() => expect(hubBatches.flat()).toContain(id));
    await h.advance(1000);
    const [fromA, fromB] = await Promise.all([a.until('cpu', 'same'), b.until('cpu', 'same')]);
    expect(fromA).toEqual(fromB);
    expect(fromA[0]!.value).toBe('same');
  });

  it('serves 200 watchers with one LISTEN connection and a bounded number of pool connections', async () => {
    const { id, token } = await h.agent(['cpu']);
    const first = await watch(id, token);
    await first.next();
    // The other 199 get the list the first one read: no query each.
    const reads = h.store.metadataReads;
    const watchers = [first, ...(await Promise.all(Array.from({ length: 199 }, () => watch(id, token))))];
    await Promise.all(watchers.slice(1).map((w) => w.next()));
    expect(h.store.metadataReads).toBe(reads);
    expect(h.hub.watcherCount).toBeGreaterThanOrEqual(200);
    const { rows } = await db.pool.query(
      `SELECT count(*) FILTER (WHERE query ILIKE 'LISTEN%' OR application_name LIKE '%listener%')::int AS listeners,
              count(*)::int AS total
       FROM pg_stat_activity WHERE datname = current_database()`,
    );
    expect(rows[0].listeners).toBe(2); // the hub's, and the harness's NOTIFY counter
    expect(rows[0].total).toBeLessThanOrEqual(2 + 10 + 10); // listeners, the app's pool, the test's pool
    watchers.forEach((w) => w.close());
    await vi.waitFor(() => expect(h.hub.watcherCount).toBe(0));
  });

  it('keeps at most one pending event for a client that stops reading, dropping and counting the rest', async () => {
    const keys = Array.from({ length: 100 }, (_, i) => `k${String(i).padStart(3, '0')}`);
    const { id, token } = await h.agent(keys);
    await post(
      id,
      token,
      keys.map((key) => ({ key, value: 'x'.repeat(2000) })),
    );
    await h.advance(5000);
    // A raw socket that sends the request and never reads.
    const socket = net.connect(Number(new URL(base).port), '127.0.0.1');
    await new Promise((resolve) => socket.once('connect', resolve));
    socket.pause();
    socket.write(`GET /v1/agents/${id}/metadata/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n\r\n`);
    await vi.waitFor(() => expect(h.hub.watcherCount).toBe(1));
    const sent = () => metric('metabatch_watch_events_sent_total');
    const dropped = () => metric('metabatch_watch_events_dropped_total');
    const droppedBefore = await dropped();
    const sentBefore = await sent();
    // 200 events of ~230 kB each: ~46 MB if they were all buffered.
    for (let i = 0; i < 200; i++) {
      h.hub.onBatch([id]);
      await h.hub.tick();
    }
    await vi.waitFor(async () => expect(await dropped()).toBeGreaterThan(droppedBefore + 100));
    expect((await sent()) - sentBefore).toBeLessThan(100);
    expect(process.memoryUsage().rss).toBeLessThan(1024 * 1024 * 1024);
    socket.destroy();
    await vi.waitFor(() => expect(h.hub.watcherCount).toBe(0));
  });

  it('answers 401, 403 and 404 as the read API does', async () => {
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const url = (agentId: string) => `${base}/v1/agents/${agentId}/metadata/watch`;
    expect((await fetch(url(a.id))).status).toBe(401);
    expect((await fetch(url(a.id), { headers: { authorization: `Bearer ${b.token}` } })).status).toBe(403);
    const unknown = await fetch(url('123e4567-e89b-12d3-a456-426614174000'), {
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    expect(unknown.status).toBe(404);
    expect(await unknown.json()).toEqual({ error: 'agent 123e4567-e89b-12d3-a456-426614174000 not found' });
    expect(h.hub.watcherCount).toBe(0);
  });
});

async function metric(name: string): Promise<number> {
  const m = h.registry.getSingleMetric(name);
  const { values } = await m!.get();
  return values[0]?.value ?? 0;
}
