#!/usr/bin/env node
// The `metabatch` command: serve (the default), migrate, agents create,
// watch, bench. Every command reads the same env vars.

import { parseArgs } from 'node:util';
import type { Config } from './config.js';
import { ConfigError, loadConfig } from './config.js';
import { createPool, migrate, openDatabase } from './database.js';
import { destination } from 'pino';
import { createLogger, type Logger } from './logger.js';
import { startService, type Service } from './main.js';
import { subscribe } from './client.js';
import { AgentStore } from './agentStore.js';
import { MetadataStore } from './store.js';
import { toView } from './watch.js';
import { isUuid } from './agentIdChunks.js';

const USAGE = `usage: metabatch [command]

  serve                              run the service (default)
  migrate                            apply the schema in sql/ and exit
  agents create --name N [--key K]…  create an agent, declare its keys, print its id and token
  database-url                       print the URL of the database (psql "$(metabatch database-url)")
  watch [--agent ID]                 print a line per batch; with --agent, that agent's metadata
  bench [--quick] [--json FILE] …    run the benchmark (see README)

Configuration comes from env vars (README): DATABASE_URL, DATA_DIR, HOST, PORT,
BATCH_SIZE, FLUSH_INTERVAL_MS, CHANNEL_MULTIPLIER, FINAL_FLUSH_TIMEOUT_MS,
MAX_HELD_KEYS, NOTIFY_CHANNEL, ADMIN_TOKEN, LOG_LEVEL.`;

class UsageError extends Error {}

async function main(argv: string[]): Promise<number> {
  const [command = 'serve', ...rest] = argv;
  if (command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const config = loadConfig();
  // The service logs to stdout; the other commands keep stdout for their output.
  const log = createLogger(config.logLevel, command === 'serve' ? undefined : destination(2));
  switch (command) {
    case 'serve':
      return serve(config, log);
    case 'migrate':
      return withDatabase(config, log, async (url) => {
        const pool = createPool(url, log, { max: 1 });
        try {
          const applied = await migrate(pool, log);
          process.stdout.write(applied.length > 0 ? `applied ${applied.join(', ')}\n` : 'schema is up to date\n');
        } finally {
          await pool.end();
        }
        return 0;
      });
    case 'agents':
      return agents(config, log, rest);
    case 'database-url':
      return withDatabase(config, log, async (url) => {
        process.stdout.write(`${url}\n`);
        return 0;
      });
    case 'watch':
      return watch(config, log, rest);
    case 'bench': {
      const { runBench } = await import('./bench/run.js');
      return runBench(rest);
    }
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}`);
  }
}

/** Runs `work` against DATABASE_URL, the running service's embedded Postgres, or one started for the occasion. */
async function withDatabase(config: Config, log: Logger, work: (url: string) => Promise<number>): Promise<number> {
  const database = await openDatabase({
    databaseUrl: config.databaseUrl,
    dataDir: config.dataDir,
    log,
    reuseRunning: true,
  });
  try {
    return await work(database.url);
  } finally {
    await database.close();
  }
}

async function serve(config: Config, log: Logger): Promise<number> {
  // Signals are handled from the first moment: one that arrives during
  // start-up stops the service as soon as it is up (and its Postgres with it).
  // Handled here rather than with close-with-grace: its second signal calls
  // process.exit(1) at once, with no time to write the spill file, and it
  // cannot tell npm's forwarded copy of one signal (within a millisecond)
  // from a second one.
  let firstSignalAt: number | undefined;
  let resolveExit!: (code: number) => void;
  const exit = new Promise<number>((resolve) => (resolveExit = resolve));
  let service: Service | undefined;
  const stop = () => {
    service!.stop().then(
      (result) => resolveExit(result.flushed ? 0 : 1),
      (err: unknown) => {
        log.error({ err }, 'shutdown failed');
        resolveExit(1);
      },
    );
  };
  const onSignal = (signal: NodeJS.Signals) => {
    const now = Date.now();
    if (firstSignalAt === undefined) {
      firstSignalAt = now;
      log.info({ signal }, 'signal received: shutting down gracefully (send it again to exit at once)');
      if (service) stop();
      return;
    }
    // npm and the process group can deliver one Ctrl-C twice within a millisecond.
    if (now - firstSignalAt <= 1000) return;
    log.warn({ signal }, 'second signal: exiting at once');
    if (!service) return resolveExit(1);
    service.abort().then(
      () => resolveExit(1),
      () => resolveExit(1),
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('unhandledRejection', (err) => log.error({ err }, 'unhandled rejection (kept running)'));
  process.on('uncaughtException', (err) => {
    log.fatal({ err }, 'uncaught exception: shutting down');
    onSignal('SIGTERM');
  });
  service = await startService(config, log);
  if (firstSignalAt !== undefined) stop();
  return exit;
}

async function agents(config: Config, log: Logger, args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  if (sub !== 'create') throw new UsageError('usage: metabatch agents create --name N [--key K]…');
  const { values } = parseArgs({
    args: rest,
    options: { name: { type: 'string' }, key: { type: 'string', multiple: true }, json: { type: 'boolean' } },
    strict: true,
  });
  const name = values.name?.trim();
  if (!name) throw new UsageError('agents create needs --name N');
  if (name.length > 127) throw new UsageError('--name must be at most 127 characters');
  const keys = values.key ?? [];
  for (const key of keys) {
    if (key.length < 1 || key.length > 127)
      throw new UsageError(`--key must be 1 to 127 characters (got ${JSON.stringify(key)})`);
  }
  if (new Set(keys).size !== keys.length) throw new UsageError('--key values must differ');
  return withDatabase(config, log, async (url) => {
    const pool = createPool(url, log, { max: 2 });
    try {
      await migrate(pool, log);
      const store = new MetadataStore(pool, { notifyChannel: config.notifyChannel });
      const agent = await new AgentStore(pool).create(name);
      await store.putDefinitions(
        agent.id,
        keys.map((key, index) => ({
          key,
          display_name: key,
          script: '',
          interval: 0,
          timeout: 0,
          display_order: index,
        })),
      );
      if (values.json) {
        process.stdout.write(`${JSON.stringify({ id: agent.id, name: agent.name, token: agent.token, keys })}\n`);
      } else {
        process.stdout.write(
          `id: ${agent.id}\nname: ${agent.name}\ntoken: ${agent.token}\nkeys: ${keys.join(', ') || '(none)'}\n`,
        );
        process.stderr.write('The token is shown only this once: give it to the agent now.\n');
      }
    } finally {
      await pool.end();
    }
    return 0;
  });
}

async function watch(config: Config, log: Logger, args: string[]): Promise<number> {
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
        // The original's "never collected" is the year 1.
        const age = row.collected_at.startsWith('0001-') ? 'never reported' : `age=${row.age}s`;
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

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
    // Anything still open (an HTTP keep-alive, a timer) must not hold the exit.
    setTimeout(() => process.exit(code), 2000).unref();
  },
  (err: unknown) => {
    if (err instanceof ConfigError || err instanceof UsageError) {
      process.stderr.write(`metabatch: ${err.message}\n`);
      process.exit(2);
    }
    process.stderr.write(`metabatch: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
