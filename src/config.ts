// Every default of metabatch lives here. Each setting comes from one env var,
// is validated at start-up, and a bad value stops the process with one line
// that names the variable and what is allowed.

export interface Config {
  /** Postgres to use; undefined means an embedded Postgres under `dataDir`. */
  databaseUrl: string | undefined;
  dataDir: string;
  host: string;
  port: number;
  /** Unique (agent, key) entries that force a flush. */
  batchSize: number;
  flushIntervalMs: number;
  /** Channel capacity is batchSize * channelMultiplier. */
  channelMultiplier: number;
  finalFlushTimeoutMs: number;
  /** Distinct keys the batcher may hold while the database is failing. */
  maxHeldKeys: number;
  notifyChannel: string;
  adminToken: string | undefined;
  logLevel: string;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

type Env = Record<string, string | undefined>;

// The original's defaults (seeds/002): 500 entries fit 30-100 agents of 5-15
// keys; a 5x channel gives headroom for bursts while a batch is flushed; 5 s
// balances database load against UI latency; 15 s bounds the final flush.
const DEFAULT_BATCH_SIZE = 500;
const DEFAULT_CHANNEL_MULTIPLIER = 5;
const DEFAULT_FLUSH_INTERVAL_MS = 5000;
const DEFAULT_FINAL_FLUSH_TIMEOUT_MS = 15_000;
// While Postgres is down the batch is kept and merged into. Ten batches of
// distinct keys (5,000 by default) hold every key of ~500 agents of 10 keys,
// and cost at most ~21 MB even if every value and error were at the 2048-byte
// limit; far less in practice.
const HELD_KEYS_MULTIPLIER = 10;

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

function text(env: Env, name: string): string | undefined {
  const raw = env[name];
  return raw === undefined || raw === '' ? undefined : raw;
}

/** Reads and validates the whole configuration; throws ConfigError on the first bad value. */
export function loadConfig(env: Env = process.env): Config {
  const databaseUrl = text(env, 'DATABASE_URL');
  if (databaseUrl !== undefined && !/^postgres(ql)?:\/\//.test(databaseUrl)) {
    throw new ConfigError('DATABASE_URL must be a postgres:// or postgresql:// URL');
  }
  const batchSize = integer(env, 'BATCH_SIZE', DEFAULT_BATCH_SIZE, 1, 100_000);
  const channelMultiplier = integer(env, 'CHANNEL_MULTIPLIER', DEFAULT_CHANNEL_MULTIPLIER, 1, 1000);
  if (batchSize * channelMultiplier > 10_000_000) {
    throw new ConfigError('BATCH_SIZE * CHANNEL_MULTIPLIER must be at most 10000000');
  }
  const notifyChannel = text(env, 'NOTIFY_CHANNEL') ?? 'workspace_agent_metadata_batch';
  // An identifier Postgres accepts unquoted in LISTEN, and at most 63 bytes.
  if (!/^[a-z_][a-z0-9_]{0,62}$/.test(notifyChannel)) {
    throw new ConfigError('NOTIFY_CHANNEL must be 1-63 characters of a-z, 0-9 and _, not starting with a digit');
  }
  const logLevel = text(env, 'LOG_LEVEL') ?? 'info';
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new ConfigError(`LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')} (got ${JSON.stringify(logLevel)})`);
  }
  const adminToken = text(env, 'ADMIN_TOKEN');
  if (adminToken !== undefined && adminToken.length < 16) {
    throw new ConfigError('ADMIN_TOKEN must be at least 16 characters');
  }
  return {
    databaseUrl,
    dataDir: text(env, 'DATA_DIR') ?? '.metabatch',
    host: text(env, 'HOST') ?? '127.0.0.1',
    port: integer(env, 'PORT', 8080, 0, 65535),
    batchSize,
    flushIntervalMs: integer(env, 'FLUSH_INTERVAL_MS', DEFAULT_FLUSH_INTERVAL_MS, 1, 3_600_000),
    channelMultiplier,
    finalFlushTimeoutMs: integer(env, 'FINAL_FLUSH_TIMEOUT_MS', DEFAULT_FINAL_FLUSH_TIMEOUT_MS, 1, 3_600_000),
    maxHeldKeys: integer(env, 'MAX_HELD_KEYS', batchSize * HELD_KEYS_MULTIPLIER, batchSize, 100_000_000),
    notifyChannel,
    adminToken,
    logLevel,
  };
}
