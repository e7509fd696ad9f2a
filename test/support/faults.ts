// Real faults, made on the Postgres side: a flush UPDATE that fails (a
// trigger raising a chosen SQLSTATE), rows held locked by another
// transaction (a flush that waits), and an outage of the test database
// (connections refused and cut).

import pg from 'pg';
import { databaseUrlFor } from '../../src/database.js';
import type { TestDatabase } from './db.js';
import { inject, vi } from 'vitest';

const installTrigger = `
CREATE TABLE IF NOT EXISTS test_fault (agent_id uuid, code text NOT NULL);
CREATE OR REPLACE FUNCTION test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE failing text;
BEGIN
  SELECT code INTO failing FROM test_fault WHERE agent_id IS NULL OR agent_id = NEW.workspace_agent_id LIMIT 1;
  IF failing IS NOT NULL THEN
    RAISE EXCEPTION 'injected fault for agent %', NEW.workspace_agent_id USING ERRCODE = failing;
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_fault ON workspace_agent_metadata;
CREATE TRIGGER test_fault BEFORE UPDATE ON workspace_agent_metadata FOR EACH ROW EXECUTE FUNCTION test_fault();`;

/**
 * Makes UPDATEs of the metadata rows fail with SQLSTATE `code` (of one
 * agent, or of every agent) until the returned function is called.
 * P0001 is a plain raised exception: the database stays reachable.
 */
export async function failUpdates(
  db: TestDatabase,
  options: { code?: string; agentId?: string } = {},
): Promise<() => Promise<void>> {
  await db.pool.query(installTrigger);
  await db.pool.query(`INSERT INTO test_fault (agent_id, code) VALUES ($1, $2)`, [
    options.agentId ?? null,
    options.code ?? 'P0001',
  ]);
  return async () => {
    await db.pool.query(`DELETE FROM test_fault`);
  };
}

/** Holds the rows of these agents locked in an open transaction until the returned function is called. */
export async function lockRows(db: TestDatabase, agentIds: readonly string[]): Promise<() => Promise<void>> {
  const client = await db.pool.connect();
  await client.query('BEGIN');
  await client.query(`SELECT 1 FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[]) FOR UPDATE`, [
    agentIds,
  ]);
  return async () => {
    await client.query('COMMIT');
    client.release();
  };
}

/** Cuts every connection to the test database and refuses new ones until the returned function is called. */
export async function outage(db: TestDatabase): Promise<() => Promise<void>> {
  const admin = new pg.Client({ connectionString: databaseUrlFor(inject('serverUrl'), 'postgres') });
  await admin.connect();
  const name = admin.escapeIdentifier(db.name);
  await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS false`);
  await admin.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1`, [db.name]);
  return async () => {
    try {
      await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS true`);
    } finally {
      await admin.end();
    }
  };
}

/** Waits until a statement of the test database waits for a lock (a flush behind `lockRows`). */
export async function waitForBlockedUpdate(db: TestDatabase): Promise<void> {
  await vi.waitFor(async () => {
    const { rows } = await db.pool.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`,
    );
    if (rows[0]!.n === 0) throw new Error('no statement waits for a lock yet');
  });
}
