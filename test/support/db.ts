// A database of its own for each test file, cloned from the migrated
// template: files stay independent, NOTIFY channels included.

import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, inject } from 'vitest';
import { createPool, databaseUrlFor, dropDatabase, recreateDatabase } from '../../src/database.js';
import { createLogger } from '../../src/logger.js';
import { provisionAgents } from '../../src/provision.js';
import { TEMPLATE_DATABASE } from './globalSetup.js';

export interface TestDatabase {
  /** The database's name on the test server. */
  name: string;
  /** As the role the service connects as: on the embedded server, the database's owner, no superuser. */
  url: string;
  pool: pg.Pool;
  /** Creates agents with the given keys declared, straight in SQL. */
  createAgents(count: number, keys?: string[]): Promise<string[]>;
  drop(): Promise<void>;
}

export async function createTestDatabase(): Promise<TestDatabase> {
  const serverUrl = inject('serverUrl');
  const serviceUrl = inject('serviceUrl');
  const name = `t_${randomBytes(6).toString('hex')}`;
  // Owned by the role that owns the template's tables (and so its clones').
  const owner = decodeURIComponent(new URL(serviceUrl).username);
  await recreateDatabase(serverUrl, name, TEMPLATE_DATABASE, owner);
  const url = databaseUrlFor(serviceUrl, name);
  const pool = createPool(url, createLogger('silent'), { max: 10 });
  return {
    name,
    url,
    pool,
    async createAgents(count, keys = ['key1']) {
      return (await provisionAgents(pool, count, keys)).map((agent) => agent.id);
    },
    async drop() {
      await pool.end();
      await dropDatabase(serverUrl, name);
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
    get name() {
      return get().name;
    },
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
