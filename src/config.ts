// Every default of metabatch lives here: the service reads each setting from
// one env var, validates it at start-up, and stops with one line that names
// the variable and what is allowed; the library's constructors take their
// defaults from `DEFAULTS`, so a default is written once.

import { isIP } from 'node:net';

/** The NOTIFY channel of the original (coder's `workspace_agent_metadata_batch`). */
export const DEFAULT_NOTIFY_CHANNEL = 'workspace_agent_metadata_batch';

export const DEFAULTS = {
  dataDir: '.metabatch',
  host: '127.0.0.1',
  port: 8080,
  // The original's: 500 entries fit 30-100 agents of 5-15 keys each.
  batchSize: 500,
  // The original's: 5 s balances database load against how fresh a UI is.
  flushIntervalMs: 5000,
  // Each replica's flush period varies by ±10 %, and its first flush comes at
  // a random point of the first period, so that replicas started together do
  // not hit Postgres in lockstep (as Telegraf's flush_jitter). 0: the
  // original's fixed schedule.
  flushJitter: 0.1,
  // The original's: 5x the batch gives headroom for bursts while a batch is
  // being flushed (the channel is where reports wait meanwhile).
  channelMultiplier: 5,
  // The original's: a fresh 15 s bounds the flush at shutdown, retries included.
  finalFlushTimeoutMs: 15_000,
  // While flushes fail the batch is kept and merged into. Ten batches of
  // distinct keys (5,000 by default) hold every key of ~500 agents of 10
  // keys, and cost at most ~21 MB even with every value and error at the
  // 2048-byte limit; far less in practice.
  heldKeysPerBatch: 10,
  notifyChannel: DEFAULT_NOTIFY_CHANNEL,
  logLevel: 'info',
  // Ten connections serve the flush, the API, the token lookups and the
  // watchers' reads with room to spare; more would only queue inside Postgres.
  poolSize: 10,
  // Retries of a failed flush (and of a failed NOTIFY): 100 ms retries a blip
  // (a failover, a killed backend) at once; 30 s keeps a long outage to two
  // attempts a minute.
  retry: { initialMs: 100, maxMs: 30_000 },
  // Reconnects of a LISTEN connection: the same start, a small cap, since a
  // listener that missed batches is stale until it is back.
  reconnect: { initialMs: 100, maxMs: 5000 },
  // Failed authentications per client address (authFailures.ts); successes
  // cost nothing. A fleet behind one NAT address fails only when tokens are
  // revoked or wrong, and a createReporter stops at its first 401/403, so its
  // failures come once per agent: a burst of 1,000 lets a thousand agents be
  // refused at once (a mass rotation or deletion, a fleet pointed at the
  // wrong service) without throttling their neighbours, and 20 a second
  // sustained covers a hundred agents restarting every 5 s with a stale
  // token. A guesser past the burst gets 20 tries a second per address
  // (before: 1,500 a second, each a query).
  authFailureRate: 20,
  authFailureBurst: 1000,
  // Addresses whose failures are remembered: one is ~200 bytes, so ~10 MB at
  // most. Beyond it the least recently failing address starts afresh (counted).
  authFailureAddresses: 50_000,
  // SSE watch streams one replica holds open, every token together. Each is
  // a socket: at a file limit of 20,000 descriptors (our CI machines; the
  // README recommends 65,536, src/connections.ts warns below 16,384) a quarter
  // of them leaves the rest to ingest connections, WebSocket streams, idle
  // keep-alives and the pool. A stream's own memory is small (at most one
  // 64 KiB slice of an event in Node, events shared: watchStream.ts), so
  // 5,000 cost a few hundred MB at worst.
  maxWatches: 5000,
  // Watch streams of the admin token on one replica: one secret, shared by the
  // live page and every operator's tool, so a leak of streams there (a page
  // reopening in a loop) takes at most two fifths of MAX_WATCHES and leaves
  // the rest to agents (each bound by MAX_STREAMS_PER_AGENT in streams.ts).
  // Twice the 1,000 streams a dashboard fleet was measured with
  // (test/fleet.test.ts), so that load keeps its headroom.
  maxWatchesPerAdmin: 2000,
} as const;

export interface Config {
  /** Postgres to use; undefined means an embedded Postgres under `dataDir`. */
  databaseUrl: string | undefined;
  dataDir: string;
  host: string;
  port: number;
  /** Unique (agent, key) entries that force a flush. */
  batchSize: number;
  flushIntervalMs: number;
  /** The flush period varies by ± this fraction (0 to 0.5). */
  flushJitter: number;
  /** Connections of the pool at most (each replica also holds one LISTEN connection). */
  poolSize: number;
  /** Channel capacity is batchSize * channelMultiplier. */
  channelMultiplier: number;
  finalFlushTimeoutMs: number;
  /** Distinct keys the batcher may hold while flushes are failing; new keys beyond it are refused. */
  maxHeldKeys: number;
  notifyChannel: string;
  adminToken: string | undefined;
  logLevel: string;
  /** Failed authentications a client address gets back each second. */
  authFailureRate: number;
  /** Failed authentications a client address may have in a row before it gets 429. */
  authFailureBurst: number;
  /** Proxies whose X-Forwarded-For names the client (comma-separated addresses, CIDRs, or loopback, linklocal, uniquelocal). */
  trustProxy: string | undefined;
  /** SSE watch streams open on this replica at most (429 beyond). */
  maxWatches: number;
  /** SSE watch streams of the admin token on this replica at most (429 beyond). */
  maxWatchesPerAdmin: number;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

type Env = Record<string, string | undefined>;

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

function integer(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw.trim());
  if (!/^\s*\d+\s*$/.test(raw) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new ConfigError(`${name} must be a whole number from ${min} to ${max} (got ${JSON.stringify(raw)})`);
  }
  return value;
}

function fraction(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw.trim());
  if (!/^\s*\d+(\.\d+)?\s*$/.test(raw) || value < min || value > max) {
    throw new ConfigError(`${name} must be a number from ${min} to ${max} (got ${JSON.stringify(raw)})`);
  }
  return value;
}

function text(env: Env, name: string): string | undefined {
  const raw = env[name];
  return raw === undefined || raw === '' ? undefined : raw;
}

// What proxy-addr (Fastify's trustProxy) names besides addresses and CIDRs.
const PROXY_NAMES = new Set(['loopback', 'linklocal', 'uniquelocal']);

function proxies(env: Env): string | undefined {
  const raw = text(env, 'TRUST_PROXY');
  if (raw === undefined) return undefined;
  const parts = raw.split(',').map((part) => part.trim());
  for (const part of parts) {
    const [address = '', bits, ...rest] = part.split('/');
    const ok =
      PROXY_NAMES.has(part) ||
      (isIP(address) !== 0 && rest.length === 0 && (bits === undefined || /^\d{1,3}$/.test(bits)));
    if (!ok) {
      throw new ConfigError(
        `TRUST_PROXY must be a comma-separated list of addresses, CIDRs, loopback, linklocal or uniquelocal (got ${JSON.stringify(raw)})`,
      );
    }
  }
  return parts.join(',');
}

/** Reads and validates the whole configuration; throws ConfigError on the first bad value. */
export function loadConfig(env: Env = process.env): Config {
  const databaseUrl = text(env, 'DATABASE_URL');
  if (databaseUrl !== undefined && !/^postgres(ql)?:\/\//.test(databaseUrl)) {
    throw new ConfigError('DATABASE_URL must be a postgres:// or postgresql:// URL');
  }
  const batchSize = integer(env, 'BATCH_SIZE', DEFAULTS.batchSize, 1, 100_000);
  const channelMultiplier = integer(env, 'CHANNEL_MULTIPLIER', DEFAULTS.channelMultiplier, 1, 1000);
  if (batchSize * channelMultiplier > 10_000_000) {
    throw new ConfigError('BATCH_SIZE * CHANNEL_MULTIPLIER must be at most 10000000');
  }
  const notifyChannel = text(env, 'NOTIFY_CHANNEL') ?? DEFAULTS.notifyChannel;
  // An identifier Postgres accepts unquoted in LISTEN, and at most 63 bytes.
  if (!/^[a-z_][a-z0-9_]{0,62}$/.test(notifyChannel)) {
    throw new ConfigError('NOTIFY_CHANNEL must be 1-63 characters of a-z, 0-9 and _, not starting with a digit');
  }
  const logLevel = text(env, 'LOG_LEVEL') ?? DEFAULTS.logLevel;
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new ConfigError(`LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')} (got ${JSON.stringify(logLevel)})`);
  }
  const adminToken = text(env, 'ADMIN_TOKEN');
  if (adminToken !== undefined && adminToken.length < 16) {
    throw new ConfigError('ADMIN_TOKEN must be at least 16 characters');
  }
  return {
    databaseUrl,
    dataDir: text(env, 'DATA_DIR') ?? DEFAULTS.dataDir,
    host: text(env, 'HOST') ?? DEFAULTS.host,
    port: integer(env, 'PORT', DEFAULTS.port, 0, 65535),
    batchSize,
    flushIntervalMs: integer(env, 'FLUSH_INTERVAL_MS', DEFAULTS.flushIntervalMs, 1, 3_600_000),
    flushJitter: fraction(env, 'FLUSH_JITTER', DEFAULTS.flushJitter, 0, 0.5),
    poolSize: integer(env, 'PG_POOL_SIZE', DEFAULTS.poolSize, 1, 1000),
    channelMultiplier,
    finalFlushTimeoutMs: integer(env, 'FINAL_FLUSH_TIMEOUT_MS', DEFAULTS.finalFlushTimeoutMs, 1, 3_600_000),
    maxHeldKeys: integer(env, 'MAX_HELD_KEYS', batchSize * DEFAULTS.heldKeysPerBatch, batchSize, 100_000_000),
    notifyChannel,
    adminToken,
    logLevel,
    authFailureRate: fraction(env, 'AUTH_FAILURE_RATE', DEFAULTS.authFailureRate, 0.01, 1_000_000),
    authFailureBurst: integer(env, 'AUTH_FAILURE_BURST', DEFAULTS.authFailureBurst, 1, 10_000_000),
    trustProxy: proxies(env),
    maxWatches: integer(env, 'MAX_WATCHES', DEFAULTS.maxWatches, 1, 1_000_000),
    maxWatchesPerAdmin: integer(env, 'MAX_WATCHES_PER_ADMIN', DEFAULTS.maxWatchesPerAdmin, 1, 1_000_000),
  };
}
