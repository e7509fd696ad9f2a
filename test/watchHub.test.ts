// The watch hub's schedule and bounds, driven by a fake clock with sinks
// that record what a client would receive. (test/watch.test.ts runs the same
// hub over real HTTP and a real LISTEN.)

import FakeTimers from '@sinonjs/fake-timers';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../src/logger.js';
import { WatchMetrics } from '../src/metrics.js';
import type { MetadataOfAgents, MetadataRow } from '../src/store.js';
import { isStale, toView, WatchHub, type WatchSink } from '../src/watch.js';
import { metricValue } from './support/harness.js';

const START = Date.parse('2026-11-23T00:00:00Z');

function row(key: string, value: string, collectedAt: number, interval = 0, timeout = 0): MetadataRow {
  return {
    key,
    display_name: key,
    script: '',
    interval,
    timeout,
    display_order: 0,
    value,
    error: '',
    collected_at: new Date(collectedAt),
  };
}

/** A database of rows, counting the reads. */
class Source {
  rows = new Map<string, MetadataRow[]>();
  reads: string[][] = [];
  /** Runs while a read is in flight (a batch arriving meanwhile). */
  duringRead: (() => void) | undefined;
  async getMetadataOfAgents(ids: readonly string[]): Promise<MetadataOfAgents> {
    this.reads.push([...ids]);
    await Promise.resolve();
    this.duringRead?.();
    const agents = new Map<string, MetadataRow[]>();
    for (const id of ids) if (this.rows.has(id)) agents.set(id, this.rows.get(id)!);
    return { agents, missing: ids.filter((id) => !this.rows.has(id)) };
  }
}

/** A client: what it received, and whether it is reading. */
class Client implements WatchSink {
  received: string[] = [];
  reading = true;
  ended = false;
  private drained: (() => void) | undefined;
  write(chunk: string): boolean {
    this.received.push(chunk);
    return this.reading;
  }
  onceDrained(callback: () => void): void {
    this.drained = callback;
  }
  end(): void {
    this.ended = true;
  }
  resume(): void {
    this.reading = true;
    const drained = this.drained;
    this.drained = undefined;
    drained?.();
  }
  events(type = 'data'): { agent_id?: string; metadata?: { value: string; age: number }[] }[] {
    return this.received
      .filter((chunk) => chunk.startsWith(`event: ${type}\n`))
      .map((chunk) => JSON.parse(chunk.slice(chunk.indexOf('data: ') + 6)) as { agent_id?: string });
  }
}

function setup() {
  const clock = FakeTimers.createClock(START);
  const registry = new Registry();
  const source = new Source();
  const hub = new WatchHub({ source, metrics: new WatchMetrics(registry), logger: createLogger('silent'), clock });
  /** Advances one second at a time, letting each tick's read finish. */
  const seconds = async (n: number) => {
    for (let i = 0; i < n; i++) {
      await clock.tickAsync(1000);
      await hub.tick(); // a tick still reading makes this a no-op; otherwise it waits for the read
    }
  };
  const watch = async (ids: string[], options: { all?: boolean; format?: 'list' | 'agent' } = {}) => {
    const stream = hub.open(ids, { format: options.format ?? 'agent', all: options.all ?? false });
    const { rows, unread } = hub.cached([...stream.agents]);
    const read = await source.getMetadataOfAgents(unread);
    for (const [id, list] of read.agents) rows.set(id, list);
    const client = new Client();
    hub.attach(stream, client, rows, read.missing);
    return { stream, client };
  };
  return { clock, registry, source, hub, seconds, watch };
}

describe('WatchHub', () => {
  it('sends each changed agent within a second under a continuous stream of batches: a fixed tick, never a debounce', async () => {
    const { source, hub, clock, watch } = setup();
    source.rows.set('a', [row('cpu', 'v0', START)]);
    const { client } = await watch(['a']);
    expect(client.events()).toHaveLength(1);
    // A batch names the agent every 100 ms for 10 s, and one more arrives
    // during each read: it is never quiet.
    source.duringRead = () => hub.onBatch(['a']);
    for (let step = 1; step <= 100; step++) {
      source.rows.set('a', [row('cpu', `v${step}`, START + step * 100)]);
      hub.onBatch(['a']);
      await clock.tickAsync(100);
    }
    await clock.tickAsync(1000);
    const values = client.events().map((e) => e.metadata![0]!.value);
    // One event at once, then one per 1 s tick, each with the newest value
    // then (a batch during each read keeps the agent dirty, so the last tick
    // sends v100 once more).
    expect(values).toHaveLength(1 + 11);
    expect(values.at(-1)).toBe('v100');
    const steps = values.map((value) => Number(value.slice(1)));
    expect(steps).toEqual([...steps].sort((x, y) => x - y));
    expect(new Set(steps).size).toBe(11);
  });

  it('reads every dirty agent of every stream in one query per tick, and agents nobody watches never', async () => {
    const { source, hub, seconds, watch } = setup();
    for (const id of ['a', 'b', 'c', 'd']) source.rows.set(id, [row('cpu', id, START)]);
    await watch(['a', 'b']);
    await watch(['b', 'c']);
    await watch(['a', 'c']);
    source.reads.length = 0;
    hub.onBatch(['a', 'b', 'c', 'd']);
    await seconds(1);
    expect(source.reads).toEqual([['a', 'b', 'c']]);
  });

  it('resends every 5 s so age stays true, and pings every 15 s on its own schedule', async () => {
    const { source, seconds, watch } = setup();
    source.rows.set('a', [row('cpu', 'v', START - 2000)]);
    const { client } = await watch(['a']);
    await seconds(14);
    expect(client.events().map((e) => e.metadata![0]!.age)).toEqual([2, 7, 12]);
    expect(client.received.filter((c) => c === ': ping\n\n')).toHaveLength(0);
    await seconds(1);
    expect(client.received.filter((c) => c === ': ping\n\n')).toHaveLength(1);
    await seconds(15);
    expect(client.received.filter((c) => c === ': ping\n\n')).toHaveLength(2);
  });

  it('holds at most the newest event per agent for a slow client, counts the rest as dropped, and sends them when it reads again', async () => {
    const { source, hub, registry, seconds, watch } = setup();
    const ids = Array.from({ length: 50 }, (_, i) => `agent-${i}`);
    for (const id of ids) source.rows.set(id, [row('cpu', 'v0', START)]);
    const { client } = await watch(ids);
    client.reading = false; // from the next write on, its socket is full
    const written = client.received.length;
    for (let round = 1; round <= 20; round++) {
      for (const id of ids) source.rows.set(id, [row('cpu', `v${round}`, START + round)]);
      hub.onBatch(ids);
      await seconds(1);
    }
    // One write filled its socket; nothing more was written while it was not
    // reading, and at most one event per agent waits.
    expect(client.received.length).toBe(written + 1);
    expect(await metricValue(registry, 'metabatch_watch_events_dropped_total')).toBeGreaterThan(19 * 49);
    client.resume();
    const after = client.events().slice(-50);
    expect(new Set(after.map((e) => e.agent_id))).toEqual(new Set(ids));
    expect(after.every((e) => e.metadata![0]!.value === 'v20')).toBe(true);
  });

  it('tells streams that an agent was deleted and forgets it there; a one-agent stream ends', async () => {
    const { source, hub, seconds, watch } = setup();
    source.rows.set('a', [row('cpu', 'a', START)]);
    source.rows.set('b', [row('cpu', 'b', START)]);
    const many = await watch(['a', 'b']);
    const one = await watch(['a'], { format: 'list' });
    hub.onDeleted('a');
    expect(many.client.events('deleted')).toEqual([{ agent_id: 'a' }]);
    expect(many.stream.agents).toEqual(new Set(['b']));
    expect(one.client.events('deleted')).toEqual([{ agent_id: 'a' }]);
    expect(one.client.ended).toBe(true);
    expect(hub.streamCount).toBe(1);
    // An agent found missing by a read (a control message missed) leaves the same way.
    source.rows.delete('b');
    hub.onBatch(['b']);
    await seconds(1);
    expect(many.client.events('deleted')).toEqual([{ agent_id: 'a' }, { agent_id: 'b' }]);
  });

  it('adds an agent created later to the streams of every agent, and only to those', async () => {
    const { source, hub, seconds, watch } = setup();
    source.rows.set('a', [row('cpu', 'a', START)]);
    const all = await watch(['a'], { all: true });
    const some = await watch(['a']);
    source.rows.set('new', [row('cpu', 'fresh', START)]);
    hub.onCreated('new');
    await seconds(1);
    expect(all.client.events().map((e) => e.agent_id)).toEqual(['a', 'new']);
    expect(some.client.events().map((e) => e.agent_id)).toEqual(['a']);
  });
});

describe('stale and pending', () => {
  it('follows coder’s rule at its boundaries: interval > 0 and age > max(interval + 2 × timeout, 5)', () => {
    expect(isStale(0, 0, 1_000_000)).toBe(false); // not periodic: never stale
    expect(isStale(1, 0, 5)).toBe(false); // the floor of 5 s
    expect(isStale(1, 0, 6)).toBe(true);
    expect(isStale(10, 5, 20)).toBe(false); // 10 + 2 × 5
    expect(isStale(10, 5, 21)).toBe(true);
    expect(isStale(2, 1, 5)).toBe(false); // 2 + 2 = 4 < 5
    expect(isStale(2, 1, 6)).toBe(true);
  });

  it('marks a key never reported pending, never stale, and a reported one with its age', () => {
    const never = toView(row('cpu', '', Date.parse('0001-01-01T00:00:00Z'), 1, 0), START);
    expect(never).toMatchObject({ pending: true, stale: false });
    const old = toView(row('cpu', 'v', START - 6000, 1, 0), START);
    expect(old).toMatchObject({ age: 6, stale: true });
    expect(old).not.toHaveProperty('pending');
    expect(toView(row('cpu', 'v', START - 5000, 1, 0), START)).toMatchObject({ age: 5, stale: false });
  });
});
