// The benchmark's naive mode: the same app (auth, validation, limits), but
// each report is written at once with one UPDATE and one NOTIFY, as coder did
// before batching (UpdateWorkspaceAgentMetadata plus a publish per report).
// Prints "listening <url>".

import type pg from 'pg';
import { Registry } from 'prom-client';
import { encodeAgentId } from '../agentIdChunks.js';
import { buildApp } from '../app.js';
import { AgentStore } from '../agentStore.js';
import { AgentAuthenticator } from '../auth.js';
import type { AddResult } from '../batcher.js';
import { DEFAULT_NOTIFY_CHANNEL } from '../config.js';
import { createPool } from '../database.js';
import { microsToIso } from '../timestamps.js';
import { createLogger } from '../logger.js';
import { WatchMetrics } from '../metrics.js';
import type { MetadataSink } from '../routes/ingest.js';
import { MetadataStore } from '../store.js';
import { WatchHub } from '../watch.js';

const updateOneAgent = `
UPDATE workspace_agent_metadata AS wam
SET value = m.value, error = m.error, collected_at = m.collected_at
FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[]) AS m(key, value, error, collected_at)
WHERE wam.workspace_agent_id = $1 AND wam.key = m.key`;

const notifyOne = `SELECT pg_notify($1, $2)`;

class NaiveSink implements MetadataSink {
  readonly retryAfterSeconds = 1;
  constructor(
    private readonly pool: pg.Pool,
    private readonly channel: string,
  ) {}

  async add(...[agentId, keys, values, errors, collectedAts]: Parameters<MetadataSink['add']>): Promise<AddResult> {
    const times = collectedAts.map((at) => (typeof at === 'number' ? microsToIso(at) : at));
    await this.pool.query(updateOneAgent, [agentId, keys, values, errors, times]);
    await this.pool.query(notifyOne, [this.channel, encodeAgentId(agentId)]);
    return { accepted: keys.length, dropped: 0 };
  }

  /** Nothing is held: every report was written when it came. */
  async close(): Promise<void> {}
}

const log = createLogger('warn');
const registry = new Registry();
const pool = createPool(process.env.DATABASE_URL!, log, { registry, asyncCommit: true });
const store = new MetadataStore(pool);
const agents = new AgentStore(pool);
const hub = new WatchHub({ source: store, metrics: new WatchMetrics(registry), logger: log });
const app = buildApp({
  logger: log,
  store,
  batcher: new NaiveSink(pool, process.env.NOTIFY_CHANNEL ?? DEFAULT_NOTIFY_CHANNEL),
  agents,
  auth: new AgentAuthenticator(agents),
  registry,
  readiness: { database: { check: async () => true, error: undefined }, flushesFailing: () => false },
  watchHub: hub,
  adminToken: undefined,
});
const address = await app.listen({ host: '127.0.0.1', port: Number(process.env.PORT ?? 0) });
process.stdout.write(`listening ${address}\n`);
process.on(
  'SIGTERM',
  () =>
    void app
      .close()
      .then(() => pool.end())
      .then(() => process.exit(0)),
);
