// The listener SDK against real Postgres: batches flushed by a real batcher
// arrive decoded; a killed backend is replaced, onResync fires first.

import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { subscribe, type Subscription } from '../src/client.js';
import { createTestDatabase, type TestDatabase } from './support/db.js';
import { createHarness, type Harness } from './support/harness.js';
import { ownTimers } from './support/ownTimers.js';

let db: TestDatabase;
let h: Harness;
const subscriptions: Subscription[] = [];

beforeAll(async () => {
  db = await createTestDatabase();
  h = await createHarness(db);
});
afterAll(async () => {
  await h.close();
  await db.drop();
});
afterEach(async () => {
  await Promise.all(subscriptions.splice(0).map((s) => s.close()));
});

async function listen(events: string[], applicationName = 'sdk-test'): Promise<{ batches: string[][] }> {
  const batches: string[][] = [];
  const subscription = await subscribe({
    databaseUrl: db.url,
    applicationName,
    onBatch: (ids) => {
      batches.push(ids);
      events.push('batch');
    },
    onResync: () => events.push('resync'),
  });
  subscriptions.push(subscription);
  return { batches };
}

const sorted = (ids: readonly string[]) => [...ids].sort();

describe('subscribe()', () => {
  it('hands over the ids of a flushed batch, and 600 agents as the full set over two payloads', async () => {
    const events: string[] = [];
    const { batches } = await listen(events);
    const [one] = await db.createAgents(1);
    h.batcher.add(one!, ['key1'], ['v'], [''], [new Date('2026-11-23T00:00:01Z')]);
    await h.advance(5000);
    await vi.waitFor(() => expect(batches).toHaveLength(1));
    expect(batches[0]).toEqual([one]);

    // One flush of 600 agents (batch size 1000): two payloads, 363 + 237.
    const big = await createHarness(db, { batchSize: 1000 });
    try {
      const many = await db.createAgents(600);
      for (const id of many) big.batcher.add(id, ['key1'], ['v'], [''], [new Date('2026-11-23T00:00:02Z')]);
      await big.advance(5000);
      await vi.waitFor(() => expect(batches).toHaveLength(3));
      expect(batches.slice(1).map((b) => b.length)).toEqual([363, 237]);
      expect(sorted(batches.slice(1).flat())).toEqual(sorted(many));
    } finally {
      await big.close();
    }
    expect(events).not.toContain('resync');
  });

  it('reconnects by itself after its backend is killed, calls onResync, then delivers the next batch', async () => {
    const events: string[] = [];
    const { batches } = await listen(events, 'sdk-test-kill');
    const killed = await db.pool.query(
      `SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE application_name = 'sdk-test-kill' AND datname = current_database()`,
    );
    expect(killed.rows).toEqual([{ ok: true }]);
    await vi.waitFor(() => expect(events).toContain('resync'), { timeout: 10_000 });
    const [agent] = await db.createAgents(1);
    h.batcher.add(agent!, ['key1'], ['after'], [''], [new Date('2026-11-23T00:00:03Z')]);
    await h.advance(5000);
    await vi.waitFor(() => expect(batches.flat()).toContain(agent));
    expect(events.slice(events.indexOf('resync'))).toEqual(['resync', 'batch']);
    const backends = await db.pool.query(
      `SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'sdk-test-kill' AND datname = current_database()`,
    );
    expect(backends.rows[0].n).toBe(1);
  });

  it('reports a payload it cannot decode and carries on', async () => {
    const errors: Error[] = [];
    const batches: string[][] = [];
    subscriptions.push(
      await subscribe({ databaseUrl: db.url, onBatch: (ids) => batches.push(ids), onError: (err) => errors.push(err) }),
    );
    await db.pool.query(`SELECT pg_notify('workspace_agent_metadata_batch', 'not base64 ids')`);
    await db.pool.query(`SELECT pg_notify('workspace_agent_metadata_batch', 'AAAAAAAAAAAAAAAAAAAAAA')`);
    await vi.waitFor(() => expect(batches).toEqual([['00000000-0000-0000-0000-000000000000']]));
    expect(errors.map((e) => e.message)).toEqual(['invalid payload size 14, must be a multiple of 22']);
  });

  it('closes idempotently, ends its connection and leaves no timers behind', async () => {
    // Only the subscription's own timers (pg-listen's health check, pg's), not the process's:
    // other code's timers come and go meanwhile.
    const timers = ownTimers();
    try {
      const subscription = await timers.run(() =>
        subscribe({ databaseUrl: db.url, applicationName: 'sdk-test-close', onBatch: () => undefined }),
      );
      expect(timers.pending()).toBeGreaterThan(0);
      const closing = timers.run(() => subscription.close());
      expect(subscription.close()).toBe(closing);
      await closing;
      expect(timers.pending()).toBe(0);
    } finally {
      timers.dispose();
    }
    await vi.waitFor(async () => {
      const { rows } = await db.pool.query(
        `SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'sdk-test-close'`,
      );
      expect(rows[0].n).toBe(0);
    });
  });
});
