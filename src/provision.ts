// Many agents at once, with known tokens and declared keys, straight in SQL:
// what the benchmark and the tests need (thousands of agents in a second),
// where the API would create them one request at a time.

import { randomUUID } from 'node:crypto';
import type pg from 'pg';
import { hashToken, newAgentToken } from './tokens.js';

export interface ProvisionedAgent {
  id: string;
  /** The agent's bearer token (only its hash is stored). */
  token: string;
}

// Rows per INSERT: large enough to be quick, small enough for one statement's memory.
const SLICE = 5000;

/** Creates `count` agents named `<prefix>-<n>`, each declaring `keys`. */
export async function provisionAgents(
  pool: pg.Pool,
  count: number,
  keys: readonly string[],
  prefix = 'agent',
): Promise<ProvisionedAgent[]> {
  const agents = Array.from({ length: count }, () => ({
    id: randomUUID(),
    token: newAgentToken(),
  }));
  for (let i = 0; i < agents.length; i += SLICE) {
    const slice = agents.slice(i, i + SLICE);
    await pool.query(
      `INSERT INTO workspace_agents (id, name, token_hash) SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[])`,
      [slice.map((a) => a.id), slice.map((_, j) => `${prefix}-${i + j}`), slice.map((a) => hashToken(a.token))],
    );
    await pool.query(
      `INSERT INTO workspace_agent_metadata (workspace_agent_id, key, display_name, script, interval, timeout)
       SELECT a.id, k.key, k.key, '', 0, 0 FROM unnest($1::uuid[]) AS a(id) CROSS JOIN unnest($2::text[]) AS k(key)`,
      [slice.map((a) => a.id), keys],
    );
  }
  return agents;
}
