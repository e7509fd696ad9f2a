// `metabatch watch [--agent ID]`: a line per batch NOTIFY, and with --agent
// that agent's metadata whenever a batch names it (and after a reconnect).

import { parseArgs } from 'node:util';
import { isUuid } from '../agentIdChunks.js';
import { subscribe } from '../client.js';
import type { Config } from '../config.js';
import { createPool } from '../database.js';
import type { Logger } from '../logger.js';
import { MetadataStore } from '../store.js';
import { toView } from '../watch.js';
import { UsageError, withDatabase } from './common.js';

export async function watchCommand(config: Config, log: Logger, args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { agent: { type: 'string' } }, strict: true });
  const agentId = values.agent?.toLowerCase();
  if (agentId !== undefined && !isUuid(agentId))
    throw new UsageError(`--agent must be a UUID (got ${JSON.stringify(values.agent)})`);
  // Listen for Ctrl-C first, so that one arriving during start-up is not fatal.
  const interrupted = new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  return withDatabase(config, log, async (url) => {
    const pool = createPool(url, log, { max: 2 });
    const store = new MetadataStore(pool);
    const printAgent = async () => {
      if (!agentId) return;
      const rows = await store.getMetadata(agentId);
      if (rows === undefined) {
        process.stdout.write(`${new Date().toISOString()} agent ${agentId} not found\n`);
        return;
      }
      const now = Date.now();
      for (const row of rows.map((r) => toView(r, now))) {
        const age = row.pending ? 'never reported' : `age=${row.age}s${row.stale ? ' (stale)' : ''}`;
        process.stdout.write(
          `  ${row.key}=${JSON.stringify(row.value)}${row.error ? ` error=${JSON.stringify(row.error)}` : ''} ${age}\n`,
        );
      }
    };
    const subscription = await subscribe({
      databaseUrl: url,
      channel: config.notifyChannel,
      onBatch: (ids) => {
        process.stdout.write(`${new Date().toISOString()} batch agents=${ids.length} ${ids.join(' ')}\n`);
        if (agentId && ids.includes(agentId))
          printAgent().catch((err: Error) => log.warn({ err }, 'could not read the agent'));
      },
      onResync: () => {
        process.stdout.write(`${new Date().toISOString()} reconnected: batches may have been missed\n`);
        printAgent().catch((err: Error) => log.warn({ err }, 'could not read the agent'));
      },
      onError: (err) => log.warn({ err }, 'listener problem'),
    });
    process.stderr.write(`listening on ${config.notifyChannel}; Ctrl-C to stop\n`);
    await printAgent();
    await interrupted;
    await subscription.close();
    await pool.end();
    return 0;
  });
}
