// One Postgres for the whole run: DATABASE_URL's server when set, otherwise
// an embedded one under the system temp directory (reachable by its OS
// account wherever the checkout lives). A migrated template database is
// cloned by each test file (test/support/db.ts). On the embedded one, the
// tests connect as production does: as the service's own role, which owns the
// template (migrated by it, as `metabatch serve` migrates) and every clone,
// and is no superuser. `serverUrl` stays the superuser, to create databases.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TestProject } from 'vitest/node';
import { createPool, migrate, openDatabase, recreateDatabase } from '../../src/database.js';
import { createLogger } from '../../src/logger.js';

export const TEMPLATE_DATABASE = 'metabatch_test_template';

declare module 'vitest' {
  export interface ProvidedContext {
    /** URL of the server as a superuser, database part to be replaced. */
    serverUrl: string;
    /** URL of the server as the role the service connects as (the owner of each test database), database part to be replaced. */
    serviceUrl: string;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const log = createLogger('warn');
  // Not made here: the embedded Postgres makes it, traversable by its OS account.
  const dataDir = path.join(os.tmpdir(), `metabatch-test-${randomBytes(6).toString('hex')}`);
  // The embedded Postgres makes the template, owned by the service's role.
  const server = await openDatabase({
    databaseUrl: process.env.DATABASE_URL,
    dataDir,
    log,
    database: TEMPLATE_DATABASE,
  });
  try {
    const templateUrl = server.adminUrl ? server.url : await recreateDatabase(server.url, TEMPLATE_DATABASE);
    const pool = createPool(templateUrl, log, { max: 1 });
    await migrate(pool, log).finally(() => pool.end());
  } catch (err) {
    // No teardown runs after a failed setup: stop the embedded Postgres here.
    await server.close();
    throw err;
  }
  project.provide('serverUrl', server.adminUrl ?? server.url);
  project.provide('serviceUrl', server.url);
  return async () => {
    await server.close();
    await fs.rm(dataDir, { recursive: true, force: true });
  };
}
