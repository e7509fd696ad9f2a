// The database: where it is (DATABASE_URL, or an embedded Postgres), the
// connection pool, and the schema. Migrations are the numbered files in sql/,
// applied by postgrator at start-up under an advisory lock so that several
// replicas starting together apply each migration once.

import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type { Logger } from 'pino';
import Postgrator from 'postgrator';
import { Counter, type Registry } from 'prom-client';
import type { DatabaseTimeObserver } from './background.js';
import { DEFAULTS } from './config.js';
import { EmbeddedPostgres } from './embedded.js';

export const SQL_DIR = fileURLToPath(new URL('../sql/', import.meta.url));

// Any constant shared by every metabatch process; 'mb' 'mi' in ASCII.
const MIGRATION_LOCK_ID = 0x6d62_6d69;

// A dead database must fail a flush, not hang it: the batcher retries.
const CONNECT_TIMEOUT_MS = 5000;
const QUERY_TIMEOUT_MS = 30_000;

export interface OpenDatabaseOptions {
  /** A Postgres of one's own; when unset, an embedded Postgres under `dataDir`. */
  databaseUrl: string | undefined;
  dataDir: string;
  log: Logger;
  /** The embedded cluster's database to create and connect to; default `metabatch`. */
  database?: string;
  /**
   * Use the embedded Postgres a running `metabatch serve` already runs on
   * `dataDir`, if any (the CLI's commands). Otherwise a second process on one
   * DATA_DIR is refused.
   */
  reuseRunning?: boolean;
}

export interface Database {
  /** Where the service connects: for the embedded Postgres, as its own role (no superuser). */
  url: string;
  /** The embedded Postgres's superuser on the same database (for creating databases); undefined for DATABASE_URL. */
  adminUrl?: string;
  /** Whether an embedded Postgres was started for it (and is stopped by close). */
  embedded: boolean;
  /** Stops the embedded Postgres this started; nothing otherwise. Idempotent. */
  close(): Promise<void>;
}

/** The database to use: DATABASE_URL, or an embedded Postgres under DATA_DIR. */
export async function openDatabase(options: OpenDatabaseOptions): Promise<Database> {
  const none = async () => undefined;
  if (options.databaseUrl) return { url: options.databaseUrl, embedded: false, close: none };
  const embedded = new EmbeddedPostgres({
    dataDir: options.dataDir,
    log: options.log.child({ component: 'embedded-postgres' }),
    ...(options.database ? { database: options.database } : {}),
  });
  if (options.reuseRunning) {
    const running = await embedded.runningUrl();
    if (running) return { url: running, embedded: false, close: none };
  }
  const url = await embedded.start();
  return { url, adminUrl: embedded.adminUrl, embedded: true, close: () => embedded.stop() };
}

/** The same server's URL with another database name. */
export function databaseUrlFor(serverUrl: string, database: string): string {
  const parsed = new URL(serverUrl);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}

/**
 * Creates `name` on the server of `serverUrl` (dropping one of that name
 * first), optionally from a template, optionally owned by another role.
 */
export async function recreateDatabase(
  serverUrl: string,
  name: string,
  template?: string,
  owner?: string,
): Promise<string> {
  await dropDatabase(serverUrl, name);
  const admin = new pg.Client({ connectionString: databaseUrlFor(serverUrl, 'postgres') });
  await admin.connect();
  try {
    const from = template ? ` TEMPLATE ${admin.escapeIdentifier(template)}` : '';
    const ownedBy = owner ? ` OWNER ${admin.escapeIdentifier(owner)}` : '';
    await admin.query(`CREATE DATABASE ${admin.escapeIdentifier(name)}${from}${ownedBy}`);
  } finally {
    await admin.end();
  }
  return databaseUrlFor(serverUrl, name);
}

/** Drops `name` on the server of `serverUrl`, sessions and all. */
export async function dropDatabase(serverUrl: string, name: string): Promise<void> {
  const admin = new pg.Client({ connectionString: databaseUrlFor(serverUrl, 'postgres') });
  await admin.connect();
  try {
    await admin.query(`DROP DATABASE IF EXISTS ${admin.escapeIdentifier(name)} WITH (FORCE)`);
  } finally {
    await admin.end();
  }
}

export interface PoolOptions {
  /** Connections at most; default `DEFAULTS.poolSize`. */
  max?: number;
  /** Registers metabatch_database_statements_total, counting every statement the pool's connections send. */
  registry?: Registry;
  /**
   * synchronous_commit=off for these connections: a commit does not wait for
   * its WAL to reach disk. A Postgres crash can then lose the last few hundred
   * milliseconds of commits (never corrupt anything), far less than what the
   * batcher holds in memory between flushes anyway; in exchange no flush waits
   * for an fsync. The service sets it; see README "Guarantees".
   */
  asyncCommit?: boolean;
  /** Attributes query and connection-wait time to the background process running (background.ts). */
  background?: DatabaseTimeObserver;
}

export function createPool(databaseUrl: string, log: Logger, options: PoolOptions = {}): pg.Pool {
  const pool = new pg.Pool({
    connectionString: databaseUrl,
    max: options.max ?? DEFAULTS.poolSize,
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    query_timeout: QUERY_TIMEOUT_MS,
    application_name: 'metabatch',
    options: [
      // Every statement of metabatch looks rows up by key: nested loops over
      // the primary key cost what the batch costs, whatever the table's
      // size, and visit rows in the order given (the flush's locking order,
      // store.ts). Hash joins, which the planner picked for large batches,
      // read the whole table, so their cost grew with history.
      '-c enable_hashjoin=off -c enable_mergejoin=off',
      ...(options.asyncCommit ? ['-c synchronous_commit=off'] : []),
    ].join(' '),
  });
  // An idle client whose backend dies (failover, pg_terminate_backend) emits
  // here; unhandled, it would crash the process.
  pool.on('error', (err) => log.warn({ err }, 'idle database connection lost'));
  instrument(pool, options);
  return pool;
}

/**
 * Counts every statement (metabatch_database_statements_total), and the time
 * a background process spends in queries and waiting for a connection.
 */
function instrument(pool: pg.Pool, { registry, background }: PoolOptions): void {
  if (!registry && !background) return;
  const statements =
    registry &&
    new Counter({
      name: 'metabatch_database_statements_total',
      help: 'SQL statements sent to Postgres by the connection pool.',
      registers: [registry],
    });
  pool.on('connect', (client) => {
    const query = client.query.bind(client) as (...args: unknown[]) => unknown;
    client.query = ((...args: unknown[]) => {
      statements?.inc();
      const name = background?.current();
      if (!background || !name) return query(...args);
      const done = since((seconds) => background.queryDone(name, seconds));
      const callback = args.at(-1);
      if (typeof callback === 'function') {
        args[args.length - 1] = (...results: unknown[]) => {
          done();
          (callback as (...results: unknown[]) => void)(...results);
        };
        return query(...args);
      }
      const result = query(...args) as Promise<unknown> | undefined;
      result?.then(done, done);
      return result;
    }) as typeof client.query;
  });
  if (!background) return;
  // pool.query connects through this too (pg-pool calls this.connect).
  const connect = pool.connect.bind(pool) as (callback?: (...args: unknown[]) => void) => Promise<unknown> | undefined;
  pool.connect = ((callback?: (...args: unknown[]) => void) => {
    const name = background.current();
    if (!name) return connect(callback);
    const waited = since((seconds) => background.connectionWaited(name, seconds));
    if (callback) {
      return connect((...args) => {
        waited();
        callback(...args);
      });
    }
    return connect()!.then(
      (client) => (waited(), client),
      (err: unknown) => {
        waited();
        throw err;
      },
    );
  }) as typeof pool.connect;
}

/** A function that, called later, reports the seconds since now. */
function since(report: (seconds: number) => void): () => void {
  const start = performance.now();
  return () => report((performance.now() - start) / 1000);
}

/** Applies every pending migration of sql/; returns the names applied. */
export async function migrate(pool: pg.Pool, log: Logger): Promise<string[]> {
  const client = await pool.connect();
  try {
    await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_ID]);
    try {
      const postgrator = new Postgrator({
        migrationPattern: `${SQL_DIR}*.sql`,
        driver: 'pg',
        schemaTable: 'metabatch_migrations',
        execQuery: (query) => client.query(query),
      });
      const applied = await postgrator.migrate();
      const names = applied.map((m) => m.filename.replace(/^.*\//, ''));
      if (names.length > 0) log.info({ applied: names }, 'database migrated');
      return names;
    } finally {
      await client.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK_ID]);
    }
  } finally {
    client.release();
  }
}

/**
 * Warns when the pool connects as a superuser: a DATABASE_URL the operator
 * chose can be one, and then any statement of the service could do anything
 * to the cluster (README, "Postgres", says which grants suffice). Resolves to
 * whether it is one.
 */
export async function warnIfSuperuser(pool: pg.Pool, log: Logger): Promise<boolean> {
  const { rows } = await pool.query<{ role: string; superuser: boolean }>(
    `SELECT current_user AS role, rolsuper AS superuser FROM pg_roles WHERE rolname = current_user`,
  );
  const row = rows[0];
  if (!row?.superuser) return false;
  log.warn(
    { role: row.role },
    `connected to Postgres as ${row.role}, a superuser: give the service a role that owns its tables and is not a superuser (README, "Postgres")`,
  );
  return true;
}

// Errors that say the database (or the way to it) is not there, as opposed to
// a statement it refused: sockets, Postgres's connection exceptions (class
// 08), shutdown and start-up (57P01-57P03), too many connections (53300), and
// pg's own timeouts and terminated connections.
const CONNECTION_ERROR_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ETIMEDOUT',
  'EPIPE',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
]);
const CONNECTION_SQLSTATES = /^(08...|57P0[1-3]|53300)$/;
const CONNECTION_MESSAGES =
  /Connection terminated|timeout exceeded when trying to connect|Query read timeout|Client has encountered a connection error/i;

/** Whether `err` means Postgres could not be reached, rather than that it refused a statement. */
export function isConnectionError(err: unknown): boolean {
  const { code, message } = (err ?? {}) as { code?: unknown; message?: unknown };
  if (typeof code === 'string' && (CONNECTION_ERROR_CODES.has(code) || CONNECTION_SQLSTATES.test(code))) return true;
  return typeof message === 'string' && CONNECTION_MESSAGES.test(message);
}
