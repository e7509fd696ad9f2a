// A database of its own for each test file, cloned from the migrated
// template: files stay independent, NOTIFY channels included.

import { randomBytes, randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, inject } from 'vitest';
import { createPool } from '../../src/database.js';
import { createLogger } from '../../src/logger.js';
import { TEMPLATE_DATABASE, withDatabase } from './globalSetup.js';

export interface TestDatabase {
  url: string;
  pool: pg.Pool;
  /** Creates agents with the given keys declared, straight in SQL. */
  createAgents(count: number, keys?: string[]): Promise<string[]>;
  drop(): Promise<void>;
}

export async function createTestDatabase(): Promise<TestDatabase> {
  const serverUrl = inject('serverUrl');
  const name = `t_${randomBytes(6).toString('hex')}`;
  const admin = new pg.Client({ connectionString: withDatabase(serverUrl, 'postgres') });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name} TEMPLATE ${TEMPLATE_DATABASE}`);
  } finally {
    await admin.end();
  }
  const url = withDatabase(serverUrl, name);
  const pool = createPool(url, createLogger('silent'), { max: 10 });
  return {
    url,
    pool,
    async createAgents(count, keys = ['key1']) {
      const ids = Array.from({ length: count }, () => randomUUID());
      await pool.query(
        `INSERT INTO workspace_agents (id, name, token_hash)
         SELECT id, 'agent-' || n, decode(md5(id::text), 'hex') FROM unnest($1::uuid[]) WITH ORDINALITY AS a(id, n)`,
        [ids],
      );
      await pool.query(
        `INSERT INTO workspace_agent_metadata (workspace_agent_id, key, display_name, script, interval, timeout)
         SELECT a.id, k.key, k.key, '', 0, 0 FROM unnest($1::uuid[]) AS a(id) CROSS JOIN unnest($2::text[]) AS k(key)`,
        [ids, keys],
      );
      return ids;
    },
    async drop() {
      await pool.end();
      const dropper = new pg.Client({ connectionString: withDatabase(serverUrl, 'postgres') });
      await dropper.connect();
      try {
        await dropper.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await dropper.end();
      }
    },
  };
}

/**
 * This test file's database, created before its tests and dropped after
 * them. Use it at the top level of a test file.
 */
export function testDatabase(): TestDatabase {
  let current: TestDatabase | undefined;
  beforeAll(async () => {
    current = await createTestDatabase();
  });
  afterAll(async () => {
    await current?.drop();
  });
  const get = (): TestDatabase => {
    if (!current) throw new Error('the test database exists only while the tests run');
    return current;
  };
  return {
    get url() {
      return get().url;
    },
    get pool() {
      return get().pool;
    },
    createAgents: (count, keys) => get().createAgents(count, keys),
    drop: () => get().drop(),
  };
}

/** Wraps a factory so that whatever it made in a test is closed after that test. */
export function closedAfterEach<A extends unknown[], T extends { close(): Promise<void> }>(
  create: (...args: A) => Promise<T>,
): (...args: A) => Promise<T> {
  const open: T[] = [];
  afterEach(async () => {
    await Promise.all(open.splice(0).map((item) => item.close()));
  });
  return async (...args) => {
    const item = await create(...args);
    open.push(item);
    return item;
  };
}
