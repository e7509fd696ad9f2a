#!/usr/bin/env node
// The `metabatch` command: serve (the default), migrate, agents, database-url,
// watch, bench. Every command reads the same env vars. `serve` is here with
// its signal handling; the others live in src/commands/.

import { destination } from 'pino';
import { agentsCommand, AGENTS_USAGE } from './commands/agents.js';
import { UsageError, withDatabase } from './commands/common.js';
import { watchCommand } from './commands/watch.js';
import type { Config } from './config.js';
import { ConfigError, loadConfig } from './config.js';
import { createPool, migrate } from './database.js';
import { createLogger, type Logger } from './logger.js';
import { startService, type Service } from './main.js';

const USAGE = `usage: metabatch [command]

  serve                              run the service (default)
  migrate                            apply the schema in sql/ and exit
  agents create|list|show|delete|rotate-token …
                                     manage agents (metabatch agents --help)
  database-url                       print the URL of the database (psql "$(metabatch database-url)")
  watch [--agent ID]                 print a line per batch; with --agent, that agent's metadata
  bench [--quick] [--json FILE] …    run the benchmark (see README)

Configuration comes from env vars (README): DATABASE_URL, DATA_DIR, HOST, PORT,
BATCH_SIZE, FLUSH_INTERVAL_MS, CHANNEL_MULTIPLIER, FINAL_FLUSH_TIMEOUT_MS,
MAX_HELD_KEYS, NOTIFY_CHANNEL, ADMIN_TOKEN, LOG_LEVEL.`;

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
      if (rest[0] === '--help' || rest[0] === 'help') {
        process.stdout.write(`${AGENTS_USAGE}\n`);
        return 0;
      }
      return agentsCommand(config, log, rest);
    case 'database-url':
      return withDatabase(config, log, async (url) => {
        process.stdout.write(`${url}\n`);
        return 0;
      });
    case 'watch':
      return watchCommand(config, log, rest);
    case 'bench': {
      const { runBench } = await import('./bench/run.js');
      return runBench(rest);
    }
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}`);
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
