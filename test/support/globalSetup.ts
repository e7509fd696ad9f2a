// One Postgres for the whole run: DATABASE_URL's server when set, otherwise
// an embedded one under the system temp directory (reachable by the postgres
// OS user wherever the checkout lives). A migrated template database is
// cloned by each test file (test/support/db.ts).

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TestProject } from 'vitest/node';
import { createPool, migrate, openDatabase, recreateDatabase } from '../../src/database.js';
import { createLogger } from '../../src/logger.js';

export const TEMPLATE_DATABASE = 'metabatch_test_template';

declare module 'vitest' {
  export interface ProvidedContext {
    /** URL of the server, database part to be replaced. */
    serverUrl: string;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const log = createLogger('warn');
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-test-'));
  const server = await openDatabase({ databaseUrl: process.env.DATABASE_URL, dataDir, log, database: 'postgres' });
  const pool = createPool(await recreateDatabase(server.url, TEMPLATE_DATABASE), log, { max: 1 });
  await migrate(pool, log);
  await pool.end();
  project.provide('serverUrl', server.url);
  return async () => {
    await server.close();
    await fs.rm(dataDir, { recursive: true, force: true });
  };
}
