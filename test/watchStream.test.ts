// What a watch stream costs when its client stops reading, on the hub with a
// fake clock and sinks that record what a socket would be handed: events in
// slices handed over only as the socket drains, and a stream more than 1 MiB
// behind when a newer tick's event arrives is closed and counted.

import FakeTimers from '@sinonjs/fake-timers';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../src/logger.js';
import { WatchMetrics } from '../src/metrics.js';
import type { MetadataOfAgents, MetadataRow } from '../src/store.js';
import { WatchHub, type WatchSink } from '../src/watch.js';
import { metricValue } from './support/harness.js';

const START = Date.parse('2026-11-23T00:00:00Z');

function rows(count: number, valueChars: number, value = 'v'): MetadataRow[] {
  return Array.from({ length: count }, (_, i) => ({
    key: `k${String(i).padStart(4, '0')}`,
    display_name: '',
    script: '',
    interval: 0,
    timeout: 0,
    display_order: 0,
    value: value.repeat(valueChars),
    error: '',
    collected_at: new Date(START),
  }));
}

/** A socket: what it was handed, whether it takes more, and whether it was dropped. */
class Sink implements WatchSink {
  writes: string[] = [];
  destroyed = false;
  ended = false;
  constructor(public reading: boolean) {}
  write(chunk: string): boolean {
    this.writes.push(chunk);
    return this.reading;
  }
  onceDrained(): void {
    // A stalled client never drains; a reading one never needed to wait.
  }
  end(): void {
    this.ended = true;
  }
  destroy(): void {
    this.destroyed = true;
  }
  /** The data events received whole. */
  events(): string[] {
    return this.writes
      .join('')
      .split('\n\n')
      .filter((event) => event.startsWith('event: data\n'));
  }
}

function setup(list: MetadataRow[]) {
  const clock = FakeTimers.createClock(START);
  const registry = new Registry();
  let current = list;
  const source = {
    async getMetadataOfAgents(ids: readonly string[]): Promise<MetadataOfAgents> {
      await Promise.resolve();
      return { agents: new Map(ids.map((id) => [id, current])), missing: [] };
    },
  };
  const hub = new WatchHub({ source, metrics: new WatchMetrics(registry), logger: createLogger('silent'), clock });
  const watch = async (reading: boolean) => {
    const stream = hub.open(['a'], { format: 'list' });
    const read = await source.getMetadataOfAgents(['a']);
    const sink = new Sink(reading);
    hub.attach(stream, sink, read.agents);
    return sink;
  };
  const seconds = async (n: number) => {
    for (let i = 0; i < n; i++) {
      await clock.tickAsync(1000);
      await hub.tick();
    }
  };
  const change = (next: MetadataRow[]) => {
    current = next;
    hub.onBatch(['a']);
  };
  return { registry, hub, watch, seconds, change };
}

describe('a watch stream whose client stops reading', () => {
  it('hands the socket one slice of at most 64 Ki characters at a time, and a reading client each event whole', async () => {
    // 1,000 keys of 2,000 characters: events of ~2.1 MB.
    const { watch, seconds } = setup(rows(1000, 2000));
    const reader = await watch(true);
    const stalled = await watch(false);
    expect(stalled.writes).toHaveLength(1);
    expect(stalled.writes[0]!.length).toBe(64 * 1024);
    await seconds(5);
    expect(reader.writes.every((w) => w.length <= 64 * 1024)).toBe(true);
    const events = reader.events();
    expect(events).toHaveLength(2);
    for (const event of events) expect(JSON.parse(event.slice('event: data\ndata: '.length))).toHaveLength(1000);
  });

  it('closes a stream still more than 1 MiB behind when a newer tick’s event arrives, and counts it', async () => {
    const { registry, hub, watch, seconds, change } = setup(rows(1000, 2000));
    const reader = await watch(true);
    const stalled = await watch(false);
    // Within its first tick the stream may fall behind: it gets a second to catch up.
    await seconds(1);
    expect(stalled.destroyed).toBe(false);
    change(rows(1000, 2000, 'w'));
    await seconds(1);
    expect(stalled.destroyed).toBe(true);
    expect(stalled.writes).toHaveLength(1);
    expect(await metricValue(registry, 'metabatch_watch_closed_total', { reason: 'slow' })).toBe(1);
    expect(hub.streamCount).toBe(1);
    expect(reader.destroyed).toBe(false);
    expect(reader.events()).toHaveLength(2);
  });

  it('keeps a slow stream of small events open: the newest event per agent waits, older ones are dropped', async () => {
    // 100 keys of 1,000 characters: events of ~120 kB, two waiting at most.
    const { registry, hub, watch, seconds, change } = setup(rows(100, 1000));
    const stalled = await watch(false);
    for (let round = 0; round < 20; round++) {
      change(rows(100, 1000, String(round % 10)));
      await seconds(1);
    }
    expect(stalled.destroyed).toBe(false);
    expect(hub.streamCount).toBe(1);
    expect(stalled.writes).toHaveLength(1);
    expect(await metricValue(registry, 'metabatch_watch_events_dropped_total')).toBeGreaterThanOrEqual(18);
    expect(await metricValue(registry, 'metabatch_watch_closed_total', { reason: 'slow' })).toBe(0);
  });
});
