// Live watch over real HTTP (SSE) on the service as production wires it:
// the list at once, the update after a POST and a flush, `age` counting, a
// ping every 15 s whatever else is sent, one LISTEN connection for every
// watcher, a resync after that connection is killed, a retry after a failed
// read, and a bounded buffer for a client that stops reading.

import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { createTestDatabase, type TestDatabase } from './support/db.js';
import { outage } from './support/faults.js';
import { openSse, stalledWatch } from './support/sse.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';

let db: TestDatabase;
let h: ServiceHarness;

beforeAll(async () => {
  db = await createTestDatabase();
  h = await startTestService(db);
});
afterAll(async () => {
  await h.close();
  await db.drop();
});

type View = { key: string; value: string; age: number }[];

interface Stream {
  /** The next `event: data` list (pings are skipped). */
  next(): Promise<View>;
  /** The first of the next few lists in which `key` has `value` (periodic resends may come first). */
  until(key: string, value: string): Promise<View>;
  /** Everything received so far, as sent. */
  raw(): string;
  close(): void;
}

const streams: Stream[] = [];
afterEach(() => streams.splice(0).forEach((s) => s.close()));

async function watch(agentId: string, token: string): Promise<Stream> {
  const sse = await openSse<View>(`${h.base}/v1/agents/${agentId}/metadata/watch`, token);
  expect(sse.status).toBe(200);
  expect(sse.headers.get('content-type')).toBe('text/event-stream');
  expect(sse.headers.get('x-accel-buffering')).toBe('no');
  const stream: Stream = {
    next: async () => (await sse.read('data')).data,
    async until(key, value) {
      for (let i = 0; i < 5; i++) {
        const list = await stream.next();
        if (list.find((r) => r.key === key)?.value === value) return list;
      }
      throw new Error(`no list with ${key}=${value} in 5 events`);
    },
    raw: () => sse.raw(),
    close: () => sse.close(),
  };
  streams.push(stream);
  return stream;
}

async function post(agentId: string, token: string, metadata: object[]): Promise<void> {
  const res = await h.post(agentId, token, { metadata });
  expect(res.statusCode).toBe(202);
}

/** Flushes what was posted and waits until the service's own LISTEN has heard of it. */
async function flushAndHear(): Promise<void> {
  const heard = await h.metric('metabatch_listener_batches_total');
  await h.advance(5000);
  await vi.waitFor(async () => expect(await h.metric('metabatch_listener_batches_total')).toBeGreaterThan(heard));
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
    await flushAndHear();
    // The hub sends on its next 1 s tick after its listener marked the agent.
    await h.advance(1000);
    const update = await stream.until('cpu', '12%');
    const age = update.find((r) => r.key === 'cpu')!.age;
    expect(age).toBe(6);

    // With nothing new, the list is sent again within 5 s, with age grown.
    await h.advance(5000);
    const again = await stream.next();
    expect(again.find((r) => r.key === 'cpu')).toMatchObject({ value: '12%', age: 11 });
  });

  it('sends a ping every 15 s on its own schedule, between the 5 s resends', async () => {
    const { id, token } = await h.agent(['cpu']);
    const stream = await watch(id, token);
    await stream.next();
    for (let second = 1; second <= 14; second++) await h.advance(1000);
    // Two resends by now, no ping yet.
    await vi.waitFor(() => expect(stream.raw().match(/^event: data$/gm)).toHaveLength(3));
    expect(stream.raw()).not.toContain(': ping');
    await h.advance(1000);
    await vi.waitFor(() => expect(stream.raw()).toContain(': ping\n\n'));
    for (let second = 16; second <= 30; second++) await h.advance(1000);
    await vi.waitFor(() => expect(stream.raw().match(/^: ping$/gm)).toHaveLength(2));
  });

  it('gives two clients of one agent the same data', async () => {
    const { id, token } = await h.agent(['cpu']);
    const a = await watch(id, token);
    const b = await watch(id, ADMIN_TOKEN);
    await a.next();
    await b.next();
    await post(id, token, [{ key: 'cpu', value: 'same', collected_at: new Date(h.clock.now).toISOString() }]);
    await flushAndHear();
    await h.advance(1000);
    const [fromA, fromB] = await Promise.all([a.until('cpu', 'same'), b.until('cpu', 'same')]);
    expect(fromA).toEqual(fromB);
    expect(fromA[0]!.value).toBe('same');
  });

  it('serves 200 watchers with one LISTEN connection, and the 199 after the first with no query of their own', async () => {
    const batches = await h.metric('metabatch_listener_batches_total');
    const { id, token } = await h.agent(['cpu']);
    // The service has heard the batch that declaring the keys announced: it cannot mark the agent for a re-read later.
    await vi.waitFor(async () => expect(await h.metric('metabatch_listener_batches_total')).toBe(batches + 1));
    const first = await watch(id, token);
    await first.next();
    const statements = await h.statements();
    // An agent token holds at most 4 streams (test/watchBounds.test.ts): the others are the admin's.
    const watchers = [first, ...(await Promise.all(Array.from({ length: 199 }, () => watch(id, ADMIN_TOKEN))))];
    await Promise.all(watchers.slice(1).map((w) => w.next()));
    expect(await h.statements()).toBe(statements);
    expect(await h.metric('metabatch_watchers')).toBe(200);
    const { rows } = await db.pool.query<{ listeners: number; total: number }>(
      `SELECT count(*) FILTER (WHERE application_name = 'metabatch-listener')::int AS listeners,
              count(*) FILTER (WHERE application_name = 'metabatch')::int AS pool
       FROM pg_stat_activity WHERE datname = current_database()`,
    );
    expect(rows[0]).toMatchObject({ listeners: 1 });
    expect((rows[0] as unknown as { pool: number }).pool).toBeLessThanOrEqual(10);
    watchers.forEach((w) => w.close());
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(0));
  });

  it('re-reads every watched agent after its LISTEN connection is killed, and sends what changed meanwhile', async () => {
    const { id, token } = await h.agent(['cpu']);
    const stream = await watch(id, token);
    await stream.next();
    // A change no NOTIFY announces (as if it were missed during the outage).
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET value = 'missed', collected_at = now() WHERE workspace_agent_id = $1`,
      [id],
    );
    const reconnects = await h.metric('metabatch_listener_reconnects_total');
    const { rows } = await db.pool.query(
      `SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
       WHERE application_name = 'metabatch-listener' AND datname = current_database()`,
    );
    expect(rows).toEqual([{ ok: true }]);
    await vi.waitFor(async () => expect(await h.metric('metabatch_listener_reconnects_total')).toBe(reconnects + 1), {
      timeout: 10_000,
    });
    await h.advance(1000);
    expect((await stream.until('cpu', 'missed'))[0]!.value).toBe('missed');
  });

  it('retries a read that failed on the next tick', async () => {
    const { id, token } = await h.agent(['cpu']);
    const stream = await watch(id, token);
    await stream.next();
    await post(id, token, [
      { key: 'cpu', value: 'after the outage', collected_at: new Date(h.clock.now).toISOString() },
    ]);
    await flushAndHear();
    const errors = await h.metric('metabatch_watch_refetch_errors_total');
    const restore = await outage(db);
    try {
      await h.advance(1000);
      await vi.waitFor(async () => expect(await h.metric('metabatch_watch_refetch_errors_total')).toBe(errors + 1));
    } finally {
      await restore();
    }
    await h.advance(1000);
    expect((await stream.until('cpu', 'after the outage'))[0]!.value).toBe('after the outage');
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
    const socket = await stalledWatch(h.base, `/v1/agents/${id}/metadata/watch`, token);
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(1));
    const sent = () => h.metric('metabatch_watch_events_sent_total');
    const dropped = () => h.metric('metabatch_watch_events_dropped_total');
    const droppedBefore = await dropped();
    const sentBefore = await sent();
    // 200 events of ~230 kB each: ~46 MB if they were all buffered.
    for (let i = 0; i < 200; i++) {
      h.service.watchHub.onBatch([id]);
      await h.service.watchHub.tick();
    }
    await vi.waitFor(async () => expect(await dropped()).toBeGreaterThan(droppedBefore + 100));
    expect((await sent()) - sentBefore).toBeLessThan(100);
    socket.destroy();
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(0));
  });

  it('answers 401, 403 and 404 as the read API does', async () => {
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const url = (agentId: string) => `${h.base}/v1/agents/${agentId}/metadata/watch`;
    expect((await fetch(url(a.id))).status).toBe(401);
    expect((await fetch(url(a.id), { headers: { authorization: `Bearer ${b.token}` } })).status).toBe(403);
    const unknown = await fetch(url('123e4567-e89b-12d3-a456-426614174000'), {
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    expect(unknown.status).toBe(404);
    expect(await unknown.json()).toEqual({ error: 'agent 123e4567-e89b-12d3-a456-426614174000 not found' });
    expect(await h.metric('metabatch_watchers')).toBe(0);
  });
});
