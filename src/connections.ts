// Every HTTP connection costs a file descriptor, and so do the pool's
// connections, the LISTEN connection and the spill files. Past the process's
// file limit nothing can be opened: not a new client, not a Postgres
// connection, not a spill file. So the server takes connections only up to
// the limit less a reserve; one more is closed at once and counted, and the
// service keeps flushing and answering on the connections it has.

import fs from 'node:fs';
import type { Server } from 'node:http';
import { Counter, Gauge, type Registry } from 'prom-client';
import { systemClock, type Clock } from './clock.js';
import type { Logger } from './logger.js';

// Descriptors kept for what is not an HTTP connection: the pool and the
// LISTEN connection (PG_POOL_SIZE + 1), plus this many for Node's own (the
// event loop, stdio, logs, spill files, the embedded Postgres's pipes).
const RESERVED_BEYOND_POOL = 128;
// The README recommends 65,536 (section "Limits and security"); below this
// a start-up line says how to raise it: ~16k descriptors hold a fleet's
// streams and watches with room, and Debian's default of 1,024 does not.
const WARN_BELOW_FILE_LIMIT = 16_384;
// Drops are logged at most once per 10 s: a flood would drown the log.
const DROP_LOG_INTERVAL_MS = 10_000;

/** The soft limit on open files of this process (`ulimit -n`), where /proc says; undefined elsewhere. */
export function openFileLimit(limitsFile = '/proc/self/limits'): number | undefined {
  let text: string;
  try {
    text = fs.readFileSync(limitsFile, 'utf8');
  } catch {
    return undefined;
  }
  const match = /^Max open files\s+(\d+|unlimited)\s/m.exec(text);
  if (!match || match[1] === 'unlimited') return undefined;
  return Number(match[1]);
}

/**
 * Caps the server's connections at the file limit less the pool and a
 * reserve, counts the connections it closes past the cap, and says at start
 * when the limit is below the recommended one.
 */
export function limitConnections(
  server: Server,
  options: { fileLimit: number | undefined; poolSize: number; registry: Registry; log: Logger; clock?: Clock },
): void {
  const { fileLimit, poolSize, registry, log } = options;
  const clock = options.clock ?? systemClock;
  if (fileLimit === undefined) return;
  const max = Math.max(1, fileLimit - poolSize - 1 - RESERVED_BEYOND_POOL);
  server.maxConnections = max;
  new Gauge({
    name: 'metabatch_http_max_connections',
    help: 'HTTP connections the server takes at most: the file limit less the pool and a reserve.',
    registers: [registry],
  }).set(max);
  const dropped = new Counter({
    name: 'metabatch_http_connections_dropped_total',
    help: 'Connections closed at once because the server held metabatch_http_max_connections already.',
    registers: [registry],
  });
  let lastLoggedAt = Number.NEGATIVE_INFINITY;
  let unlogged = 0;
  server.on('drop', () => {
    dropped.inc();
    unlogged++;
    const now = clock.Date.now();
    if (now - lastLoggedAt < DROP_LOG_INTERVAL_MS) return;
    log.warn(
      { dropped: unlogged, max_connections: max, file_limit: fileLimit },
      'connections refused: the server holds as many as its file limit allows; raise the file limit (see README, Limits and security)',
    );
    lastLoggedAt = now;
    unlogged = 0;
  });
  if (fileLimit < WARN_BELOW_FILE_LIMIT) {
    log.warn(
      { file_limit: fileLimit, max_connections: max },
      `the file limit (ulimit -n) is ${fileLimit}: at most ${max} HTTP connections; raise it to 65536 (README, Limits and security)`,
    );
  }
}
