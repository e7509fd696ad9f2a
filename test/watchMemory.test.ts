// What stalled watch clients cost the real process (`metabatch serve`): 300
// raw sockets that send a watch request for an agent with ~4 MB events and
// never read. Each stream hands its socket one slice at a time and events are
// shared, so the service's RSS grows by at most about 1 MiB a stream; the
// streams are then closed (counted as slow) within two resends.

import fs from 'node:fs/promises';
import type net from 'node:net';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { testDatabase } from './support/db.js';
import { call, replicaMetric, replicasOf, type Replica } from './support/replicas.js';
import { stalledWatch } from './support/sse.js';

const db = testDatabase();
const ADMIN = 'watch-memory-test-admin-token';
const replicas = replicasOf(db, ['only'], { ADMIN_TOKEN: ADMIN, LOG_LEVEL: 'info' });
const STREAMS = 300;
const MiB = 1024 * 1024;

const sockets: net.Socket[] = [];
afterAll(() => sockets.forEach((s) => s.destroy()));

async function rss(pid: number): Promise<number> {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)![1]) * 1024;
}

describe('300 watch clients that never read', () => {
  it('grow the service’s RSS by at most ~1 MiB each, and are closed as slow within two resends', async () => {
    const [only] = replicas as [Replica];
    const pid = only.service.child.pid!;
    const { id } = (await call(only.base, 'POST', '/v1/agents', ADMIN, { name: 'big' })).body! as { id: string };
    const definitions = Array.from({ length: 1000 }, (_, i) => ({ key: `k${String(i).padStart(4, '0')}` }));
    expect((await call(only.base, 'PUT', `/v1/agents/${id}/metadata-definitions`, ADMIN, { definitions })).status).toBe(
      200,
    );
    // 1,000 keys with a 2,000-byte value and error each: events of ~4.2 MB.
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET value = repeat('v', 2000), error = repeat('e', 2000), collected_at = now()
       WHERE workspace_agent_id = $1`,
      [id],
    );
    const path = `/v1/agents/${id}/metadata/watch`;
    // Warm up: the read and one watch that reads its first event, so the heap has served one such event.
    const read = await fetch(`${only.base}/v1/agents/${id}/metadata`, {
      headers: { authorization: `Bearer ${ADMIN}` },
    });
    const list = (await read.json()) as unknown[];
    expect(list).toHaveLength(1000);
    const warm = await fetch(`${only.base}${path}`, { headers: { authorization: `Bearer ${ADMIN}` } });
    const reader = warm.body!.getReader();
    for (let got = 0; got < 4 * MiB;) got += (await reader.read()).value!.length;
    await reader.cancel();
    await vi.waitFor(async () => expect(await replicaMetric(only.base, 'metabatch_watchers')).toBe(0));
    const sentBefore = await replicaMetric(only.base, 'metabatch_watch_events_sent_total');
    const before = await rss(pid);

    for (let i = 0; i < STREAMS; i++) sockets.push(await stalledWatch(only.base, path, ADMIN));
    await vi.waitFor(
      async () => {
        expect(await replicaMetric(only.base, 'metabatch_watchers')).toBe(STREAMS);
        // Every stream has begun its first event.
        expect(await replicaMetric(only.base, 'metabatch_watch_events_sent_total')).toBeGreaterThanOrEqual(
          sentBefore + STREAMS,
        );
      },
      { timeout: 20_000, interval: 200 },
    );
    const opened = await rss(pid);
    expect((opened - before) / MiB).toBeLessThan(STREAMS);

    await vi.waitFor(
      async () => {
        expect(await replicaMetric(only.base, 'metabatch_watch_closed_total{reason="slow"}')).toBe(STREAMS);
        expect(await replicaMetric(only.base, 'metabatch_watchers')).toBe(0);
      },
      { timeout: 20_000, interval: 200 },
    );
    expect(((await rss(pid)) - before) / MiB).toBeLessThan(STREAMS);
    console.log(
      `RSS ${Math.round(before / MiB)} MiB before, ${Math.round(opened / MiB)} MiB with ${STREAMS} stalled streams`,
    );
  }, 60_000);
});
