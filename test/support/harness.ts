// A batcher wired to a real Postgres (its own database), real NOTIFY and a
// real listener, with an injected fake clock that tests advance by hand.

import FakeTimers from '@sinonjs/fake-timers';
import { Registry } from 'prom-client';
import { vi } from 'vitest';
import { Batcher, type BatcherOptions, type MetadataBatch, type UpdateResult } from '../../src/batcher.js';
import { subscribe, type Subscription } from '../../src/client.js';
import { DEFAULT_NOTIFY_CHANNEL } from '../../src/config.js';
import { createLogger } from '../../src/logger.js';
import { BatcherMetrics } from '../../src/metrics.js';
import { Publisher } from '../../src/publisher.js';
import { MetadataStore } from '../../src/store.js';
import type { TestDatabase } from './db.js';

export const CHANNEL = DEFAULT_NOTIFY_CHANNEL;

export type FakeClock = ReturnType<typeof FakeTimers.createClock>;

/** The real store, counting calls; it can be made to fail or to wait at a gate. */
export class ObservedStore extends MetadataStore {
  calls: MetadataBatch[] = [];
  failures = 0;
  gate: Promise<void> | undefined;

  metadataReads = 0;

  override async getMetadata(agentId: string) {
    this.metadataReads++;
    return super.getMetadata(agentId);
  }

  override async updateMetadata(batch: MetadataBatch): Promise<UpdateResult> {
    this.calls.push(batch);
    if (this.gate) await this.gate;
    if (this.failures > 0) {
      this.failures--;
      throw new Error('connection refused (simulated)');
    }
    return super.updateMetadata(batch);
  }
}

/** The real publisher, counting calls; it can be made to fail. */
export class ObservedPublisher extends Publisher {
  calls: string[][] = [];
  failures = 0;
  gate: Promise<void> | undefined;

  override async publish(agentIds: readonly string[]): Promise<number> {
    this.calls.push([...agentIds]);
    if (this.gate) await this.gate;
    if (this.failures > 0) {
      this.failures--;
      throw new Error('publish failed (simulated)');
    }
    return super.publish(agentIds);
  }
}

export interface Harness {
  clock: FakeClock;
  registry: Registry;
  batcher: Batcher;
  store: ObservedStore;
  publisher: ObservedPublisher;
  /** Each NOTIFY payload received by a real LISTEN, decoded. */
  payloads: string[][];
  listener: Subscription;
  /** Advances the fake clock and waits until the loop is idle. */
  advance(ms: number): Promise<void>;
  /** The value of a metric (with labels) in this harness's registry. */
  metric(name: string, labels?: Record<string, string>): Promise<number>;
  /** Waits until `count` payloads have arrived. */
  waitForPayloads(count: number): Promise<void>;
  close(): Promise<void>;
}

export async function createHarness(
  db: TestDatabase,
  options: Partial<Omit<BatcherOptions, 'store' | 'metrics'>> & {
    startAt?: number;
    /**
     * Who NOTIFYs: the store, in the flush's own UPDATE statement, as the
     * service wires it (default); or a separate Publisher (library use),
     * before any `announcers` given.
     */
    announce?: 'publisher' | 'store';
  } = {},
): Promise<Harness> {
  const { startAt, announce = 'store', announcers = [], ...batcherOptions } = options;
  const clock = FakeTimers.createClock(startAt ?? Date.parse('2026-11-23T00:00:00Z'));
  const registry = new Registry();
  const store = new ObservedStore(db.pool, announce === 'store' ? { notifyChannel: CHANNEL } : {});
  const publisher = new ObservedPublisher(db.pool, CHANNEL);
  const payloads: string[][] = [];
  const listener = await subscribe({ databaseUrl: db.url, onBatch: (ids) => payloads.push(ids) });
  const batcher = new Batcher({
    store,
    announcers: [...(announce === 'publisher' ? [publisher] : []), ...announcers],
    metrics: new BatcherMetrics(registry),
    logger: createLogger('silent'),
    clock,
    // The original's fixed schedule, unless a test asks for jitter.
    flushJitter: 0,
    ...batcherOptions,
  });
  return {
    clock,
    registry,
    batcher,
    store,
    publisher,
    payloads,
    listener,
    async advance(ms) {
      await batcher.idle();
      clock.tick(ms);
      await batcher.idle();
    },
    metric: (name, labels) => metricValue(registry, name, labels),
    async waitForPayloads(count) {
      await vi.waitFor(() => {
        if (payloads.length < count) throw new Error(`${payloads.length} of ${count} payloads so far`);
      });
    },
    async close() {
      await listener.close();
    },
  };
}

export async function metricValue(
  registry: Registry,
  name: string,
  labels: Record<string, string> = {},
): Promise<number> {
  // A histogram's series: name_count or name_sum of the histogram `name`.
  let base = name;
  let series: string | undefined;
  if (!registry.getSingleMetric(name)) {
    series = name;
    base = name.replace(/_(count|sum)$/, '');
  }
  const metric = registry.getSingleMetric(base);
  if (!metric) throw new Error(`no metric ${name}`);
  const { values } = await metric.get();
  const wanted = Object.entries(labels);
  const match = values.find((v) => {
    const have = v.labels as Record<string, string | number | undefined>;
    if (series !== undefined && (v as { metricName?: string }).metricName !== series) return false;
    return Object.keys(have).length === wanted.length && wanted.every(([k, want]) => have[k] === want);
  });
  return match?.value ?? 0;
}

/** The rows of these agents, as `agent|key|value|error|collected_at`. */
export async function rowsOf(db: TestDatabase, agentIds: readonly string[]): Promise<string[]> {
  const { rows } = await db.pool.query<{ row: string }>(
    `SELECT workspace_agent_id || '|' || key || '|' || value || '|' || error || '|' ||
            to_char(collected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS row
     FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[]) ORDER BY 1`,
    [agentIds],
  );
  return rows.map((r) => r.row);
}
