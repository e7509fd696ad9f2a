// The service as production wires it (`startService`) on this test file's
// database, listening on a free port, with one collaborator replaced: a
// fake clock drives the batcher, the watch hub and the health check, so
// tests advance time by hand while Postgres and HTTP stay real.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import FakeTimers from '@sinonjs/fake-timers';
import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { expect, vi } from 'vitest';
import { subscribe, type Subscription } from '../../src/client.js';
import { loadConfig } from '../../src/config.js';
import type { DEFAULT_TIMEOUTS } from '../../src/limits.js';
import { createLogger, type Logger } from '../../src/logger.js';
import { startService, type Service } from '../../src/main.js';
import type { TestDatabase } from './db.js';
import { metricValue, type FakeClock } from './harness.js';

export const ADMIN_TOKEN = 'test-admin-token-0123456789';

export interface ServiceHarness {
  service: Service;
  app: FastifyInstance;
  /** http://127.0.0.1:<port> */
  base: string;
  clock: FakeClock;
  db: TestDatabase;
  /** Each NOTIFY payload a listener of the test's own received, decoded. */
  payloads: string[][];
  /** Advances the fake clock and waits until the batcher is idle. */
  advance(ms: number): Promise<void>;
  metric(name: string, labels?: Record<string, string>): Promise<number>;
  /**
   * Statements the service's pool has sent, once its background reads (the
   * declared keys a report queued) are done: a count a test can compare.
   */
  statements(): Promise<number>;
  waitForPayloads(count: number): Promise<void>;
  /** Creates an agent through the API with these keys declared (which announces it on the batch channel). */
  agent(keys?: string[]): Promise<{ id: string; token: string }>;
  post(agentId: string, token: string | undefined, body: unknown): Promise<LightMyRequestResponse>;
  /** The agent's stored rows by key, read through the API with the admin token (which must answer 200). */
  stored(agentId: string): Promise<Record<string, StoredRow>>;
  /** Stops the service (as SIGTERM does) and the test's listener. */
  close(): Promise<void>;
}

/** A stored row as the read API answers it. */
export interface StoredRow {
  value: string;
  error: string;
  collected_at: string;
}

export interface ServiceHarnessOptions {
  /** Env vars beyond the test's DATABASE_URL, PORT and ADMIN_TOKEN (null: ADMIN_TOKEN unset). */
  env?: Record<string, string | null>;
  logger?: Logger;
  timeouts?: Partial<typeof DEFAULT_TIMEOUTS>;
  /** The fake clock's start; default now. */
  startAt?: number;
}

export async function startTestService(db: TestDatabase, options: ServiceHarnessOptions = {}): Promise<ServiceHarness> {
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-service-'));
  const env: Record<string, string | undefined> = {
    DATABASE_URL: db.url,
    DATA_DIR: dataDir,
    HOST: '127.0.0.1',
    PORT: '0',
    ADMIN_TOKEN,
    // The original's fixed flush schedule, so that advancing FLUSH_INTERVAL_MS flushes.
    FLUSH_JITTER: '0',
  };
  for (const [name, value] of Object.entries(options.env ?? {})) env[name] = value ?? undefined;
  const clock = FakeTimers.createClock(options.startAt ?? Date.now());
  const service = await startService(loadConfig(env), options.logger ?? createLogger('silent'), {
    clock,
    ...(options.timeouts ? { timeouts: options.timeouts } : {}),
  });
  const payloads: string[][] = [];
  let listener: Subscription | undefined;
  try {
    listener = await subscribe({
      databaseUrl: db.url,
      applicationName: 'test-listener',
      onBatch: (ids) => payloads.push(ids),
    });
  } catch (err) {
    await service.stop();
    throw err;
  }
  const { app, batcher } = service;
  const adminHeaders = { authorization: `Bearer ${ADMIN_TOKEN}` };
  return {
    service,
    app,
    base: service.address,
    clock,
    db,
    payloads,
    async advance(ms) {
      await batcher.idle();
      clock.tick(ms);
      await batcher.idle();
    },
    metric: (name, labels) => metricValue(service.registry, name, labels),
    async statements() {
      await service.declaredKeys.idle();
      return metricValue(service.registry, 'metabatch_database_statements_total');
    },
    async waitForPayloads(count) {
      await vi.waitFor(() => {
        if (payloads.length < count) throw new Error(`${payloads.length} of ${count} payloads so far`);
      });
    },
    async agent(keys = ['cpu', 'mem']) {
      const created = await app.inject({
        method: 'POST',
        url: '/v1/agents',
        headers: adminHeaders,
        payload: { name: 'web-1' },
      });
      if (created.statusCode !== 201) throw new Error(`create agent: ${created.statusCode} ${created.body}`);
      const { id, token } = created.json<{ id: string; token: string }>();
      const declared = await app.inject({
        method: 'PUT',
        url: `/v1/agents/${id}/metadata-definitions`,
        headers: adminHeaders,
        payload: { definitions: keys.map((key) => ({ key })) },
      });
      if (declared.statusCode !== 200) throw new Error(`declare keys: ${declared.statusCode} ${declared.body}`);
      return { id, token };
    },
    post(agentId, token, body) {
      return app.inject({
        method: 'POST',
        url: `/v1/agents/${agentId}/metadata`,
        headers: token === undefined ? {} : { authorization: `Bearer ${token}` },
        payload: body as string | object,
      });
    },
    async stored(agentId) {
      const res = await app.inject({
        url: `/v1/agents/${agentId}/metadata`,
        headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      });
      expect(res.statusCode).toBe(200);
      return Object.fromEntries(res.json<(StoredRow & { key: string })[]>().map((r) => [r.key, r]));
    },
    async close() {
      // A final flush that retries waits on the fake clock: move it along.
      let stopped = false;
      const stopping = service.stop().finally(() => (stopped = true));
      while (!stopped) {
        await new Promise((resolve) => setImmediate(resolve));
        await clock.tickAsync(100);
      }
      await stopping;
      await listener.close();
      await fs.rm(dataDir, { recursive: true, force: true });
    },
  };
}
