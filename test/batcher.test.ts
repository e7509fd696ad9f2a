// The original's batcher tests (coder's metadata_batcher_internal_test.go,
// listed in docs/original.md) with the same numbers,
// against a real Postgres and a real LISTEN, the loop's time driven by a fake
// clock; then the cases the original never tested.

import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { closedAfterEach, testDatabase } from './support/db.js';
import type { MetadataBatch } from '../src/batch.js';
import { createLogger } from '../src/logger.js';
import { MetadataStore } from '../src/store.js';
import { failUpdates } from './support/faults.js';
import { CHANNEL, createHarness, rowsOf } from './support/harness.js';
import { seededRandom } from './support/random.js';

const db = testDatabase();
const harness = closedAfterEach((options: Parameters<typeof createHarness>[1] = {}) => createHarness(db, options));

const at = (iso: string) => new Date(iso);
const sorted = (ids: readonly string[]) => [...ids].sort();

describe.each(['publisher', 'store'] as const)('TestMetadataBatcher (NOTIFY by the %s)', (announce) => {
  it('flushes nothing on an empty tick, then 2, 5 and 500 entries (totals 0, 2, 7, 507)', async () => {
    const h = await harness({ announce });
    const [agent1, agent2] = await db.createAgents(2, ['key1', 'key2', 'key3']);
    const t2 = at('2026-11-23T00:00:02Z');
    const t3 = at('2026-11-23T00:00:03Z');
    const t4 = at('2026-11-23T00:00:04Z');

    // Flush 1: an empty tick calls nothing and counts nothing.
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(0);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(0);

    // Flush 2: the timer was re-armed.
    h.batcher.add(agent1!, ['key1', 'key2'], ['value1', 'value2'], ['', ''], [t2, t2]);
    await h.batcher.idle();
    expect(h.batcher.channelLength).toBe(0);
    expect(h.batcher.currentBatchLen).toBe(2);
    expect(await h.metric('metabatch_metadata_dropped_keys_total')).toBe(0);
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(1);
    expect(await rowsOf(db, [agent1!])).toEqual([
      `${agent1}|key1|value1||2026-11-23T00:00:02.000Z`,
      `${agent1}|key2|value2||2026-11-23T00:00:02.000Z`,
      `${agent1}|key3|||0001-01-01T00:00:00.000Z`,
    ]);
    await h.waitForPayloads(1);
    expect(h.payloads).toEqual([[agent1]]);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(2);

    // Flush 3: two agents, five entries.
    h.batcher.add(
      agent1!,
      ['key1', 'key2', 'key3'],
      ['new_value1', 'new_value2', 'new_value3'],
      ['', '', ''],
      [t3, t3, t3],
    );
    h.batcher.add(agent2!, ['key1', 'key2'], ['agent2_value1', 'agent2_value2'], ['', ''], [t3, t3]);
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(5);
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(2);
    expect(h.store.calls[1]!.keys).toHaveLength(5);
    await h.waitForPayloads(2);
    expect(sorted(h.payloads[1]!)).toEqual(sorted([agent1!, agent2!]));
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(2);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(7);

    // Flush 4: 500 new agents reach capacity with no clock advance.
    const bulk = await db.createAgents(500);
    for (const id of bulk) h.batcher.add(id, ['key1'], ['bulk_value'], [''], [t4]);
    await h.batcher.idle();
    expect(h.store.calls).toHaveLength(3);
    expect(h.store.calls[2]!.keys).toHaveLength(500);
    await h.waitForPayloads(4);
    expect(h.payloads.slice(2).map((p) => p.length)).toEqual([363, 137]);
    expect(sorted(h.payloads.slice(2).flat())).toEqual(sorted(bulk));
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'capacity' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(507);
    const { rows } = await db.pool.query(
      `SELECT count(*)::int AS n FROM workspace_agent_metadata WHERE value = 'bulk_value' AND workspace_agent_id = ANY($1::uuid[])`,
      [bulk],
    );
    expect(rows[0].n).toBe(500);
  });
});

describe('TestMetadataBatcher_DropsWhenFull', () => {
  it('drops exactly the one update that finds the channel full, then flushes the rest (6 flushes)', async () => {
    const h = await harness({ batchSize: 2 }); // channel of 10
    const agents = await db.createAgents(13);
    let release!: () => void;
    h.store.gate = new Promise((resolve) => (release = resolve));
    const t = at('2026-11-23T00:00:01Z');

    h.batcher.add(agents[0]!, ['key1'], ['v'], [''], [t]);
    h.batcher.add(agents[1]!, ['key1'], ['v'], [''], [t]);
    // The capacity flush starts and blocks in the store.
    await vi.waitFor(() => expect(h.store.calls).toHaveLength(1));
    for (const id of agents.slice(2, 12))
      expect(h.batcher.add(id, ['key1'], ['v'], [''], [t])).toEqual({ accepted: 1, dropped: 0 });
    expect(h.batcher.channelLength).toBe(10);
    expect(h.batcher.add(agents[12]!, ['key1'], ['v'], [''], [t])).toEqual({ accepted: 0, dropped: 1 });
    expect(await h.metric('metabatch_metadata_dropped_keys_total')).toBe(1);

    h.store.gate = undefined;
    release();
    await h.batcher.idle();
    expect(h.store.calls).toHaveLength(6);
    await h.waitForPayloads(6);
    expect(h.payloads).toHaveLength(6);
    expect(await h.metric('metabatch_metadata_dropped_keys_total')).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(12);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'capacity' })).toBe(6);
    expect(await rowsOf(db, [agents[12]!])).toEqual([`${agents[12]}|key1|||0001-01-01T00:00:00.000Z`]);
  });
});

describe('TestMetadataBatcher_Deduplication', () => {
  const t1 = at('2026-11-23T00:00:01.000Z');
  const t2 = at('2026-11-23T00:00:01.001Z');
  it.each([
    {
      name: 'same key updated twice keeps newest',
      adds: [
        { keys: ['key1'], values: ['first_value'], t: t1 },
        { keys: ['key1'], values: ['second_value'], t: t2 },
      ],
      want: ['key1|second_value||2026-11-23T00:00:01.001Z'],
    },
    {
      name: 'mixed keys with partial overlap',
      adds: [
        { keys: ['key1', 'key2'], values: ['value1', 'value2'], t: t1 },
        { keys: ['key1', 'key3'], values: ['new_value1', 'value3'], t: t2 },
      ],
      want: [
        'key1|new_value1||2026-11-23T00:00:01.001Z',
        'key2|value2||2026-11-23T00:00:01.000Z',
        'key3|value3||2026-11-23T00:00:01.001Z',
      ],
    },
  ])('$name', async ({ adds, want }) => {
    const h = await harness();
    const [agent] = await db.createAgents(1, ['key1', 'key2', 'key3']);
    for (const add of adds) {
      h.batcher.add(
        agent!,
        add.keys,
        add.values,
        add.keys.map(() => ''),
        add.keys.map(() => add.t),
      );
    }
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(want.length);
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(1);
    const rows = (await rowsOf(db, [agent!]))
      .map((r) => r.slice(agent!.length + 1))
      .filter((r) => !r.endsWith('0001-01-01T00:00:00.000Z'));
    expect(rows).toEqual(want);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(want.length);
    await h.waitForPayloads(1);
    expect(h.payloads).toEqual([[agent]]);
  });
});

describe('TestMetadataBatcher_TimestampOrdering', () => {
  it('keeps the newest collected_at whatever the arrival order', async () => {
    const h = await harness();
    const [agent] = await db.createAgents(1);
    const t1 = at('2026-11-23T00:00:01Z');
    const t2 = at('2026-11-23T00:00:02Z');
    const t3 = at('2026-11-23T00:00:03Z');
    h.batcher.add(agent!, ['key1'], ['newer_value'], [''], [t2]);
    h.batcher.add(agent!, ['key1'], ['older_value'], [''], [t1]);
    h.batcher.add(agent!, ['key1'], ['newest_value'], [''], [t3]);
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(1);
    await h.advance(5000);
    expect(await rowsOf(db, [agent!])).toEqual([`${agent}|key1|newest_value||2026-11-23T00:00:03.000Z`]);
    await h.waitForPayloads(1);
    expect(h.payloads).toHaveLength(1);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(1);
  });

  it('lets the later arrival win a tie', async () => {
    const h = await harness();
    const [agent] = await db.createAgents(1);
    const t = at('2026-11-23T00:00:01Z');
    h.batcher.add(agent!, ['key1'], ['first'], [''], [t]);
    h.batcher.add(agent!, ['key1'], ['second'], [''], [t]);
    await h.advance(5000);
    expect(await rowsOf(db, [agent!])).toEqual([`${agent}|key1|second||2026-11-23T00:00:01.000Z`]);
  });
});

describe.each(['publisher', 'store'] as const)('TestMetadataBatcher_PubsubChunking (NOTIFY by the %s)', (announce) => {
  it('flushes 499 + 101 adds as a capacity batch of 500 (2 payloads) and a scheduled one of 100 (3 in all)', async () => {
    const h = await harness({ announce });
    const agents = await db.createAgents(600);
    const t = at('2026-11-23T00:00:01Z');
    for (const id of agents.slice(0, 499)) h.batcher.add(id, ['key1'], ['v'], [''], [t]);
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(499);
    expect(h.store.calls).toHaveLength(0);

    for (const id of agents.slice(499)) h.batcher.add(id, ['key1'], ['v'], [''], [t]);
    await h.batcher.idle();
    expect(h.store.calls).toHaveLength(1);
    expect(sorted(h.store.calls[0]!.agentIds)).toEqual(sorted(agents.slice(0, 500)));
    await h.waitForPayloads(2);
    expect(h.payloads.map((p) => p.length)).toEqual([363, 137]);
    expect(h.batcher.currentBatchLen).toBe(100);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'capacity' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(500);

    // The capacity flush restarted the timer: nothing at 4999 ms, the rest at 5000.
    await h.advance(4999);
    expect(h.store.calls).toHaveLength(1);
    await h.advance(1);
    expect(h.store.calls).toHaveLength(2);
    expect(sorted(h.store.calls[1]!.agentIds)).toEqual(sorted(agents.slice(500)));
    await h.waitForPayloads(3);
    expect(h.payloads).toHaveLength(3);
    expect(sorted(h.payloads.flat())).toEqual(sorted(agents));
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'capacity' })).toBe(1);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(600);
    expect(await h.metric('metabatch_metadata_notify_payloads_total')).toBe(3);
    expect(h.publisher.calls).toHaveLength(announce === 'publisher' ? 2 : 0);
  });
});

describe('TestMetadataBatcher_ConcurrentAddsToSameAgent', () => {
  it('keeps the newest of 20 concurrent writers, whatever order they run in', async () => {
    const h = await harness();
    const [agent] = await db.createAgents(1, ['key1', 'key2', 'key3']);
    const initial = Date.parse('2026-11-23T00:00:00Z');
    // A seeded shuffle: the same order on every run, so a failure replays.
    const order = fc.sample(
      fc.shuffledSubarray(
        Array.from({ length: 20 }, (_, i) => i),
        { minLength: 20 },
      ),
      {
        numRuns: 1,
        seed: 20261124,
      },
    )[0]!;
    await Promise.all(
      order.map(async (i) => {
        await new Promise((resolve) => setImmediate(resolve));
        const value = `value_from_goroutine_${i}`;
        const t = new Date(initial + i);
        h.batcher.add(agent!, ['key1', 'key2', 'key3'], [value, value, value], ['', '', ''], [t, t, t]);
      }),
    );
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(3);
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(1);
    expect(await rowsOf(db, [agent!])).toEqual(
      ['key1', 'key2', 'key3'].map((k) => `${agent}|${k}|value_from_goroutine_19||2026-11-23T00:00:00.019Z`),
    );
    await h.waitForPayloads(1);
    expect(h.payloads).toHaveLength(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(3);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
  });
});

describe('flush jitter', () => {
  it('starts at a random point of the first period, then varies each period by ±FLUSH_JITTER', async () => {
    // The jitter's random draws, in order: the first period's length and where it is cut, then one per period.
    const draws = [0.3, 0.5, 0.9, 0.1, 0.5];
    const h = await harness({ flushJitter: 0.1, random: () => draws.shift()! });
    const [agent] = await db.createAgents(1);
    const flushTimes: number[] = [];
    const start = h.clock.now;
    for (let i = 0; i < 4; i++) {
      h.batcher.add(agent!, ['key1'], [`v${i}`], [''], [new Date(h.clock.now)]);
      const before = h.store.calls.length;
      while (h.store.calls.length === before) await h.advance(100);
      flushTimes.push(h.clock.now - start);
    }
    // 5000 × (1 + 0.1 × (2 × 0.3 − 1)) = 4800, cut at 0.5: the first flush at 2400;
    // then 5000 × 1.08 = 5400, 5000 × 0.92 = 4600, 5000 × 1.0 = 5000 later.
    expect(flushTimes).toEqual([2400, 2400 + 5400, 2400 + 5400 + 4600, 2400 + 5400 + 4600 + 5000]);
  });

  it('spreads the flushes of replicas started together (a seeded random source)', async () => {
    const replicas = await Promise.all(
      [1, 2, 3].map((seed) => harness({ flushJitter: 0.1, random: seededRandom(seed) })),
    );
    const [agent] = await db.createAgents(1);
    const firstFlush = await Promise.all(
      replicas.map(async (h) => {
        h.batcher.add(agent!, ['key1'], ['v'], [''], [new Date(h.clock.now)]);
        const start = h.clock.now;
        while (h.store.calls.length === 0) await h.advance(10);
        return h.clock.now - start;
      }),
    );
    // Every first flush within one period (4.5–5.5 s), and no two in the same 100 ms.
    expect(firstFlush.every((t) => t > 0 && t <= 5500)).toBe(true);
    const sorted = [...firstFlush].sort((a, b) => a - b);
    expect(sorted[1]! - sorted[0]!).toBeGreaterThan(100);
    expect(sorted[2]! - sorted[1]!).toBeGreaterThan(100);
  });
});

describe('the Publisher path (library use)', () => {
  it('runs one flush at a time: reports added during a slow NOTIFY, then close(), and every acknowledged key is in the table', async () => {
    const h = await harness({ announce: 'publisher', batchSize: 2, backoff: { random: () => 1 } });
    const agents = await db.createAgents(5);
    const t = at('2026-11-23T00:00:01Z');
    const acknowledged = new Map<string, string>();
    const add = (i: number, value: string) => {
      expect(h.batcher.add(agents[i]!, ['key1'], [value], [''], [t])).toEqual({ accepted: 1, dropped: 0 });
      acknowledged.set(agents[i]!, value);
    };
    const macrotasks = async (n = 5) => {
      for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve));
    };
    let releaseNotify!: () => void;
    h.publisher.gate = new Promise((resolve) => (releaseNotify = resolve));
    add(0, 'first');
    add(1, 'first');
    // The capacity flush's UPDATE has committed; its NOTIFY waits.
    await vi.waitFor(() => expect(h.publisher.calls).toHaveLength(1));
    // Meanwhile more reports arrive, enough for another capacity flush, whose
    // rows another transaction holds locked: its UPDATE waits in Postgres.
    const locker = await db.pool.connect();
    await locker.query('BEGIN');
    await locker.query(`SELECT 1 FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[]) FOR UPDATE`, [
      agents.slice(2, 4),
    ]);
    add(2, 'second');
    add(3, 'second');
    await macrotasks();
    add(4, 'third');
    h.publisher.gate = undefined;
    releaseNotify();
    // The first flush is done once its batch is counted.
    await vi.waitFor(async () =>
      expect(await h.metric('metabatch_metadata_batches_total', { reason: 'capacity' })).toBe(1),
    );
    // Shutdown, while the database blinks once; then the lock goes.
    h.store.failures = 1;
    const closing = h.batcher.close();
    await macrotasks();
    await locker.query('COMMIT');
    locker.release();
    await vi.waitFor(async () =>
      expect(await h.metric('metabatch_metadata_batches_total', { reason: 'capacity' })).toBe(2),
    );
    let settled = false;
    void closing.finally(() => (settled = true));
    for (let i = 0; i < 100 && !settled; i++) {
      await macrotasks();
      await h.clock.tickAsync(100);
    }
    const result = await closing;
    expect(result).toMatchObject({ flushed: true });
    const { rows } = await db.pool.query<{ id: string; value: string }>(
      `SELECT workspace_agent_id::text AS id, value FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[])`,
      [agents],
    );
    expect(new Map(rows.map((r) => [r.id, r.value]))).toEqual(acknowledged);
  });
});

describe('beyond the original', () => {
  it('refuses arrays of unequal length and queues nothing', async () => {
    const h = await harness();
    const [agent] = await db.createAgents(1);
    expect(() => h.batcher.add(agent!, ['key1', 'key2'], ['v'], [''], [new Date()])).toThrow(
      /all inputs must have the same number of items; keys: 2, values: 1, errors: 1, collectedAt: 1/,
    );
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(0);
    expect(h.batcher.channelLength).toBe(0);
  });

  it('flushes what it holds at close() with reason shutdown, draining the channel first', async () => {
    const h = await harness({ batchSize: 2 });
    const agents = await db.createAgents(5);
    const t = at('2026-11-23T00:00:01Z');
    let release!: () => void;
    h.store.gate = new Promise((resolve) => (release = resolve));
    for (const id of agents.slice(0, 2)) h.batcher.add(id, ['key1'], ['before'], [''], [t]);
    await vi.waitFor(() => expect(h.store.calls).toHaveLength(1));
    // Three more wait in the channel while the capacity flush is in flight.
    for (const id of agents.slice(2)) h.batcher.add(id, ['key1'], ['queued'], [''], [t]);
    expect(h.batcher.channelLength).toBe(3);
    const closing = h.batcher.close();
    expect(h.batcher.close()).toBe(closing);
    h.store.gate = undefined;
    release();
    const result = await closing;
    expect(result.flushed).toBe(true);
    expect(h.store.calls).toHaveLength(2);
    expect(h.store.calls[1]!.keys).toHaveLength(3);
    expect((await rowsOf(db, agents)).filter((r) => r.includes('|queued|'))).toHaveLength(3);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'shutdown' })).toBe(1);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'capacity' })).toBe(1);
    await h.waitForPayloads(2);
    expect(() => h.batcher.add(agents[0]!, ['key1'], ['late'], [''], [t])).toThrow(/shutting down/);
  });

  it('keeps a batch whose UPDATE failed, merges into it, and retries with growing backoff', async () => {
    const h = await harness({ backoff: { random: () => 1 } });
    const [agent] = await db.createAgents(1, ['key1', 'key2']);
    h.store.failures = 3;
    h.batcher.add(
      agent!,
      ['key1', 'key2'],
      ['a1', 'a2'],
      ['', ''],
      [at('2026-11-23T00:00:01Z'), at('2026-11-23T00:00:01Z')],
    );
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(1);
    expect(h.batcher.currentBatchLen).toBe(2);
    expect(h.batcher.flushesFailing).toBe(true);
    expect(await h.metric('metabatch_metadata_flushes_failing')).toBe(1);
    expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(1);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(0);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(0);

    // A newer value for a held key merges; memory grows with keys, not reports.
    h.batcher.add(agent!, ['key1'], ['b1'], [''], [at('2026-11-23T00:00:02Z')]);
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(2);

    // Retries at 100, 200, 400 ms (random() = 1: the full delay).
    await h.advance(99);
    expect(h.store.calls).toHaveLength(1);
    await h.advance(1);
    expect(h.store.calls).toHaveLength(2);
    await h.advance(199);
    expect(h.store.calls).toHaveLength(2);
    await h.advance(1);
    expect(h.store.calls).toHaveLength(3);
    await h.advance(400);
    expect(h.store.calls).toHaveLength(4);
    expect(h.batcher.flushesFailing).toBe(false);
    expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(3);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await rowsOf(db, [agent!])).toEqual([
      `${agent}|key1|b1||2026-11-23T00:00:02.000Z`,
      `${agent}|key2|a2||2026-11-23T00:00:01.000Z`,
    ]);
    await h.waitForPayloads(1);
    expect(h.payloads).toEqual([[agent]]);

    // The first success reset the backoff: the next failure waits 100 ms again.
    h.store.failures = 1;
    h.batcher.add(agent!, ['key2'], ['c2'], [''], [at('2026-11-23T00:00:03Z')]);
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(5);
    await h.advance(100);
    expect(h.store.calls).toHaveLength(6);
    expect(h.batcher.flushesFailing).toBe(false);
  });

  it('counts a failed NOTIFY, still counts the batch, and announces it again later', async () => {
    const h = await harness({ announce: 'publisher', backoff: { random: () => 1 } });
    const [agent] = await db.createAgents(1);
    h.publisher.failures = 1;
    h.batcher.add(agent!, ['key1'], ['v'], [''], [at('2026-11-23T00:00:01Z')]);
    await h.advance(5000);
    expect(h.publisher.calls).toHaveLength(1);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'notify' })).toBe(1);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(1);
    expect(await rowsOf(db, [agent!])).toEqual([`${agent}|key1|v||2026-11-23T00:00:01.000Z`]);
    expect(h.payloads).toHaveLength(0);
    await h.advance(100);
    expect(h.publisher.calls).toHaveLength(2);
    await h.waitForPayloads(1);
    expect(h.payloads).toEqual([[agent]]);
    // The retry carried no new batch.
    expect(h.store.calls).toHaveLength(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(1);
  });

  it('keeps and retries a batch whose statement fails with a full NOTIFY queue (54000), counting it as a publish error too', async () => {
    const h = await harness({ backoff: { random: () => 1 } });
    const [marked, other] = await db.createAgents(2);
    const t = at('2026-11-23T00:00:01Z');
    // Postgres raises "too many notifications in the NOTIFY queue" for one agent's row.
    const restore = await failUpdates(db, { code: '54000', agentId: marked! });
    h.batcher.add(marked!, ['key1'], ['held'], [''], [t]);
    h.batcher.add(other!, ['key1'], ['held too'], [''], [t]);
    await h.advance(5000);
    expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(1);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'notify' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(0);
    expect(h.batcher.currentBatchLen).toBe(2);
    // The whole statement rolled back: nothing written, nothing announced.
    expect(await rowsOf(db, [marked!, other!])).toEqual(
      [`${marked}|key1|||0001-01-01T00:00:00.000Z`, `${other}|key1|||0001-01-01T00:00:00.000Z`].sort(),
    );
    expect(h.payloads).toEqual([]);
    await restore();
    await h.advance(100);
    expect(await rowsOf(db, [marked!, other!])).toEqual(
      [`${marked}|key1|held||2026-11-23T00:00:01.000Z`, `${other}|key1|held too||2026-11-23T00:00:01.000Z`].sort(),
    );
    await h.waitForPayloads(1);
    expect(sorted(h.payloads[0]!)).toEqual(sorted([marked!, other!]));
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(2);
    expect(h.batcher.flushesFailing).toBe(false);
  });

  it('never deadlocks with another replica flushing the same rows in the opposite order', async () => {
    const keys = Array.from({ length: 10 }, (_, i) => `k${i}`);
    const agents = await db.createAgents(50, keys);
    const store = new MetadataStore(db.pool, { notifyChannel: CHANNEL });
    const batchOf = (reversed: boolean, value: string, at: Date) => {
      const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAtMicros: [] };
      for (const agent of reversed ? [...agents].reverse() : agents) {
        for (const key of reversed ? [...keys].reverse() : keys) {
          batch.agentIds.push(agent);
          batch.keys.push(key);
          batch.values.push(value);
          batch.errors.push('');
          batch.collectedAtMicros.push(at.getTime() * 1000);
        }
      }
      return batch;
    };
    const deadlocks = async () =>
      (
        await db.pool.query<{ n: string }>(
          `SELECT deadlocks AS n FROM pg_stat_database WHERE datname = current_database()`,
        )
      ).rows[0]!.n;
    const before = await deadlocks();
    // Four flushes at a time, two in each order, twenty times: without one
    // locking order this deadlocks in about a third of the flushes.
    for (let round = 0; round < 20; round++) {
      const at = new Date(Date.parse('2026-11-23T00:00:00Z') + round);
      const results = await Promise.allSettled(
        [false, true, false, true].map((reversed, i) => store.updateMetadata(batchOf(reversed, `r${round}-${i}`, at))),
      );
      expect(results.filter((r) => r.status === 'rejected').map((r) => String(r.reason))).toEqual([]);
    }
    // Postgres publishes a backend's counters when it goes idle.
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(await deadlocks()).toBe(before);
  });

  it('writes a batch of several slices whose agents interleave, every value exactly, and tells undeclared from stale', async () => {
    const keys = Array.from({ length: 10 }, (_, i) => `k${i}`);
    const agents = await db.createAgents(250, keys);
    const [stale] = agents;
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET value = 'newer', collected_at = '2026-11-23T00:00:10Z' WHERE workspace_agent_id = $1 AND key = 'k0'`,
      [stale],
    );
    const tricky = ['say "hi"', 'back\\slash', '{a,b}', 'NULL', '', ' spaced ', 'é✓😀', 'a\\"b'];
    const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAtMicros: [] };
    const expected = new Map<string, string>();
    // Key by key across all agents: an agent's rows are 250 apart, in three slices of the literals.
    for (const key of keys) {
      for (const [i, agent] of agents.entries()) {
        const value = `${tricky[i % tricky.length]}#${key}`;
        batch.agentIds.push(agent);
        batch.keys.push(key);
        batch.values.push(value);
        batch.errors.push(i % 7 === 0 ? `err "${i}"` : '');
        batch.collectedAtMicros.push(Date.parse('2026-11-23T00:00:05Z') * 1000 + i);
        expected.set(`${agent}|${key}`, value);
      }
    }
    batch.agentIds.push(agents[1]!);
    batch.keys.push('undeclared');
    batch.values.push('v');
    batch.errors.push('');
    batch.collectedAtMicros.push(Date.parse('2026-11-23T00:00:05Z') * 1000);
    const result = await new MetadataStore(db.pool, { notifyChannel: CHANNEL }).updateMetadata(batch);
    expect(result).toMatchObject({ undeclared: 1, stale: 1, announced: 1 });
    const { rows } = await db.pool.query<{ id: string; key: string; value: string; error: string; at: string }>(
      `SELECT workspace_agent_id::text AS id, key, value, error, to_char(collected_at AT TIME ZONE 'UTC', 'US') AS at
       FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[])`,
      [agents],
    );
    expect(rows).toHaveLength(2500);
    for (const row of rows) {
      const i = agents.indexOf(row.id);
      if (row.id === stale && row.key === 'k0') {
        expect(row.value).toBe('newer');
        continue;
      }
      expect(row.value).toBe(expected.get(`${row.id}|${row.key}`));
      expect(row.error).toBe(i % 7 === 0 ? `err "${i}"` : '');
      expect(Number(row.at)).toBe(i);
    }
  });

  it('never moves a row back in time, and announces only agents whose rows changed', async () => {
    const h = await harness();
    const [fresh, stale, undeclared] = await db.createAgents(3);
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET value = 'newer', collected_at = '2026-11-23T00:00:10Z' WHERE workspace_agent_id = $1`,
      [stale],
    );
    const t = at('2026-11-23T00:00:05Z');
    h.batcher.add(fresh!, ['key1'], ['v'], [''], [t]);
    h.batcher.add(stale!, ['key1'], ['older'], [''], [t]);
    h.batcher.add(undeclared!, ['nokey'], ['v'], [''], [t]);
    await h.advance(5000);
    expect(await rowsOf(db, [stale!])).toEqual([`${stale}|key1|newer||2026-11-23T00:00:10.000Z`]);
    expect(await rowsOf(db, [fresh!])).toEqual([`${fresh}|key1|v||2026-11-23T00:00:05.000Z`]);
    expect(await h.metric('metabatch_metadata_stale_keys_total')).toBe(1);
    expect(await h.metric('metabatch_metadata_undeclared_keys_total')).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(3);
    await h.waitForPayloads(1);
    expect(h.payloads).toEqual([[fresh]]);
  });

  it('refuses new keys once MAX_HELD_KEYS are held while the database fails; held keys still merge', async () => {
    const h = await harness({ batchSize: 2, maxHeldKeys: 4, backoff: { random: () => 1 } });
    const agents = await db.createAgents(6);
    const t = at('2026-11-23T00:00:01Z');
    h.store.failures = 100;
    for (const id of agents.slice(0, 4)) expect(h.batcher.add(id, ['key1'], ['v'], [''], [t]).dropped).toBe(0);
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(4);
    expect(h.batcher.flushesFailing).toBe(true);
    expect(h.batcher.add(agents[4]!, ['key1'], ['v'], [''], [t])).toEqual({ accepted: 0, dropped: 1 });
    // One failure so far: the next retry is within 100 ms, so the client is told 1 s.
    expect(h.batcher.retryAfterSeconds).toBe(1);
    expect(await h.metric('metabatch_metadata_held_limit_refused_keys_total')).toBe(1);
    expect(h.batcher.add(agents[0]!, ['key1'], ['newer'], [''], [at('2026-11-23T00:00:02Z')])).toEqual({
      accepted: 1,
      dropped: 0,
    });
    await h.batcher.idle();
    expect(h.batcher.currentBatchLen).toBe(4);
    h.store.failures = 0;
    await h.advance(30_000);
    expect(h.batcher.flushesFailing).toBe(false);
    expect(await rowsOf(db, [agents[0]!])).toEqual([`${agents[0]}|key1|newer||2026-11-23T00:00:02.000Z`]);
  });

  it('never refuses keys for MAX_HELD_KEYS while flushes succeed, and says why it refuses what it refuses', async () => {
    const lines: string[] = [];
    const logger = createLogger('debug', { write: (line: string) => lines.push(line) });
    // A channel of 10, and a held limit of 4 that must not apply: nothing fails.
    const h = await harness({ batchSize: 2, maxHeldKeys: 4, logger });
    const agents = await db.createAgents(13);
    const t = at('2026-11-23T00:00:01Z');
    // The first capacity flush waits on a row lock: the channel fills behind it.
    const locker = await db.pool.connect();
    await locker.query('BEGIN');
    await locker.query(`SELECT 1 FROM workspace_agent_metadata WHERE workspace_agent_id = $1 FOR UPDATE`, [agents[0]]);
    for (const id of agents.slice(0, 2)) h.batcher.add(id, ['key1'], ['v'], [''], [t]);
    await vi.waitFor(() => expect(h.store.calls).toHaveLength(1));
    const results = agents.slice(2).map((id) => h.batcher.add(id, ['key1'], ['v'], [''], [t]));
    await locker.query('COMMIT');
    locker.release();
    // Two in the batch being flushed, ten in the channel, one refused: the channel was full.
    expect(results.map((r) => r.accepted)).toEqual([...Array<number>(10).fill(1), 0]);
    expect(await h.metric('metabatch_metadata_held_limit_refused_keys_total')).toBe(0);
    expect(await h.metric('metabatch_metadata_dropped_keys_total')).toBe(1);
    const refusals = lines
      .map((line) => JSON.parse(line) as { msg: string; reason?: string })
      .filter((l) => l.msg === 'metadata updates refused');
    expect(refusals.map((l) => l.reason)).toEqual(['channel full (1)']);
    await h.batcher.idle();
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(12);
  });

  it('gives up the final flush at FINAL_FLUSH_TIMEOUT_MS and hands back what it holds', async () => {
    const h = await harness({ finalFlushTimeoutMs: 15_000 });
    const [agent] = await db.createAgents(1);
    h.store.failures = 1_000_000;
    h.batcher.add(agent!, ['key1'], ['v'], [''], [at('2026-11-23T00:00:01Z')]);
    await h.batcher.idle();
    let settled = false;
    const closing = h.batcher.close().finally(() => (settled = true));
    await h.clock.tickAsync(14_000);
    expect(settled).toBe(false);
    await h.clock.tickAsync(1_000);
    const result = await closing;
    expect(result.flushed).toBe(false);
    expect(result.held.agentIds).toEqual([agent]);
    expect(result.held.values).toEqual(['v']);
    expect(h.store.calls.length).toBeGreaterThan(3);
  });
});
