// One Postgres for the whole run: DATABASE_URL's server when set, otherwise
// an embedded one under the system temp directory (reachable by the postgres
// OS user wherever the checkout lives). A migrated template database is
// cloned by each test file (test/support/db.ts).

import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs/promises';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { createPool, migrate } from '../../src/database.js';
import { EmbeddedPostgres } from '../../src/embedded.js';
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
  let embedded: EmbeddedPostgres | undefined;
  let dataDir: string | undefined;
  let serverUrl = process.env.DATABASE_URL;
  if (!serverUrl) {
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-test-'));
    embedded = new EmbeddedPostgres({ dataDir, log, database: 'postgres' });
    serverUrl = await embedded.start();
  }
  const admin = new pg.Client({ connectionString: withDatabase(serverUrl, 'postgres') });
  await admin.connect();
  try {
    await admin.query(`DROP DATABASE IF EXISTS ${TEMPLATE_DATABASE}`);
    await admin.query(`CREATE DATABASE ${TEMPLATE_DATABASE}`);
  } finally {
    await admin.end();
  }
  const pool = createPool(withDatabase(serverUrl, TEMPLATE_DATABASE), log, { max: 1 });
  await migrate(pool, log);
  await pool.end();
  project.provide('serverUrl', serverUrl);
  return async () => {
    await embedded?.stop();
    if (dataDir) await fs.rm(dataDir, { recursive: true, force: true });
  };
}

export function withDatabase(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}
