// Migrations on a real, empty database: applied once, idempotent, and safe
// when several processes start together.

import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inject } from 'vitest';
import { createPool, databaseUrlFor, migrate } from '../src/database.js';
import { createLogger } from '../src/logger.js';

const name = `m_${randomBytes(6).toString('hex')}`;
let admin: pg.Client;

beforeAll(async () => {
  admin = new pg.Client({ connectionString: databaseUrlFor(inject('serverUrl'), 'postgres') });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
});
afterAll(async () => {
  await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  await admin.end();
});

describe('migrations', () => {
  it('apply each numbered file once, even when four processes migrate at the same time', async () => {
    const log = createLogger('silent');
    const pools = Array.from({ length: 4 }, () =>
      createPool(databaseUrlFor(inject('serverUrl'), name), log, { max: 1 }),
    );
    try {
      const applied = await Promise.all(pools.map((pool) => migrate(pool, log)));
      expect(applied.flat().sort()).toEqual([
        '001.do.workspace-agents.sql',
        '002.do.workspace-agent-metadata.sql',
        '003.do.agents-by-creation.sql',
      ]);
      expect(await migrate(pools[0]!, log)).toEqual([]);
      const { rows } = await pools[0]!.query(
        `SELECT column_name FROM information_schema.columns WHERE table_name = 'workspace_agent_metadata' ORDER BY ordinal_position`,
      );
      expect(rows.map((r) => r.column_name)).toEqual([
        'workspace_agent_id',
        'display_name',
        'key',
        'script',
        'value',
        'error',
        'timeout',
        'interval',
        'collected_at',
        'display_order',
      ]);
      const pk = await pools[0]!.query(
        `SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = 'workspace_agent_metadata'::regclass AND i.indisprimary ORDER BY a.attname`,
      );
      expect(pk.rows.map((r) => r.attname)).toEqual(['key', 'workspace_agent_id']);
      // Deleting an agent deletes its rows.
      await pools[0]!.query(
        `INSERT INTO workspace_agents (id, name, token_hash) VALUES ('123e4567-e89b-12d3-a456-426614174000', 'a', '\\x00')`,
      );
      await pools[0]!.query(
        `INSERT INTO workspace_agent_metadata (workspace_agent_id, key, display_name, script, timeout, interval) VALUES ('123e4567-e89b-12d3-a456-426614174000', 'cpu', 'CPU', '', 0, 0)`,
      );
      await pools[0]!.query(`DELETE FROM workspace_agents`);
      expect((await pools[0]!.query(`SELECT count(*)::int AS n FROM workspace_agent_metadata`)).rows[0].n).toBe(0);
    } finally {
      await Promise.all(pools.map((pool) => pool.end()));
    }
  });
});
