// The real Fastify app over a real store and batcher (fake clock), driven
// with app.inject.

import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { buildApp, type AppDependencies } from '../../src/app.js';
import { AgentAuthenticator } from '../../src/auth.js';
import type { Health } from '../../src/routes/health.js';
import { WatchMetrics } from '../../src/metrics.js';
import { WatchHub } from '../../src/watch.js';
import { createLogger, type Logger } from '../../src/logger.js';
import type { TestDatabase } from './db.js';
import { createHarness, type Harness } from './harness.js';

export const ADMIN_TOKEN = 'test-admin-token-0123456789';

export interface AppHarness extends Harness {
  app: FastifyInstance;
  health: Health;
  hub: WatchHub;
  /** Creates an agent through the API with these keys declared; returns its id and token. */
  agent(keys?: string[]): Promise<{ id: string; token: string }>;
  post(agentId: string, token: string | undefined, body: unknown): Promise<LightMyRequestResponse>;
}

export async function createAppHarness(
  db: TestDatabase,
  options: {
    adminToken?: string | null;
    logger?: Logger;
    batcher?: Parameters<typeof createHarness>[1];
    timeouts?: AppDependencies['timeouts'];
  } = {},
): Promise<AppHarness> {
  const h = await createHarness(db, options.batcher);
  const adminToken = options.adminToken === null ? undefined : (options.adminToken ?? ADMIN_TOKEN);
  const health: Health = {
    shuttingDown: false,
    pingDatabase: async () => {
      await db.pool.query('SELECT 1');
    },
    flushesSucceeding: () => !h.batcher.flushesFailing,
  };
  const logger = options.logger ?? createLogger('silent');
  const hub = new WatchHub({ source: h.store, metrics: new WatchMetrics(h.registry), logger, clock: h.clock });
  const app = buildApp({
    logger,
    store: h.store,
    batcher: h.batcher,
    auth: new AgentAuthenticator(h.store),
    registry: h.registry,
    health,
    watchHub: hub,
    adminToken,
    timeouts: options.timeouts,
  });
  await app.ready();
  const harness: AppHarness = {
    ...h,
    app,
    health,
    hub,
    async agent(keys = ['cpu', 'mem']) {
      const created = await app.inject({
        method: 'POST',
        url: '/v1/agents',
        headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
        payload: { name: 'web-1' },
      });
      if (created.statusCode !== 201) throw new Error(`create agent: ${created.statusCode} ${created.body}`);
      const { id, token } = created.json<{ id: string; token: string }>();
      const declared = await app.inject({
        method: 'PUT',
        url: `/v1/agents/${id}/metadata-definitions`,
        headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
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
    async close() {
      hub.close();
      await app.close();
      await h.close();
    },
  };
  return harness;
}
