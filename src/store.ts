// Everything metabatch reads from and writes to Postgres. The hot path is
// `updateMetadata`: one `UPDATE … FROM unnest(arrays)` per flush, guarded so
// an older collected_at never overwrites a newer one.

import crypto, { createHash, randomBytes, randomUUID } from 'node:crypto';
import type { Pool, PoolClient } from 'pg';
import { MAX_AGENT_IDS_PER_CHUNK } from './agentIdChunks.js';
import type { MetadataBatch, MetadataWriter, UpdateResult } from './batcher.js';

/**
 * The flush: one UPDATE from the batch's parallel arrays, which never moves a
 * row back in time (an older collected_at loses; a tie, a retried batch, wins).
 */
export const guardedUpdate = `
UPDATE workspace_agent_metadata AS wam
SET value = m.value, error = m.error, collected_at = m.collected_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
  AS m(workspace_agent_id, key, value, error, collected_at)
WHERE wam.workspace_agent_id = m.workspace_agent_id
  AND wam.key = m.key
  AND wam.collected_at <= m.collected_at`;

// Written rows grouped per agent: the statement returns one row per changed
// agent instead of one per entry.
export const updateMetadataReturningAgents = `
WITH updated AS (${guardedUpdate} RETURNING wam.workspace_agent_id)
SELECT workspace_agent_id::text AS agent_id, count(*)::int AS written FROM updated GROUP BY 1`;

// The same UPDATE that also announces the changed agents, in the original's
// payload format (22-character unpadded base64 per id, at most 363 per
// payload), built in SQL: one statement, one round trip per flush, and the
// NOTIFYs are delivered exactly when the UPDATE commits.
const updateMetadataAndNotify = `
WITH updated AS (${guardedUpdate} RETURNING wam.workspace_agent_id), changed AS (
  SELECT workspace_agent_id AS id, count(*)::int AS written FROM updated GROUP BY 1
), payloads AS (
  SELECT string_agg(rtrim(encode(uuid_send(id), 'base64'), '='), '') AS payload
  FROM (SELECT id, (row_number() OVER () - 1) / ${MAX_AGENT_IDS_PER_CHUNK} AS chunk FROM changed) AS numbered
  GROUP BY chunk
)
SELECT id::text AS agent_id, written, (SELECT count(pg_notify($6, payload))::int FROM payloads) AS payloads
FROM changed`;

// Only when some entries were not written: which of them have no row at all.
const countUndeclared = `
SELECT count(*)::int AS undeclared
FROM unnest($1::uuid[], $2::text[]) AS m(workspace_agent_id, key)
WHERE NOT EXISTS (
  SELECT 1 FROM workspace_agent_metadata w
  WHERE w.workspace_agent_id = m.workspace_agent_id AND w.key = m.key
)`;

const insertAgent = `
INSERT INTO workspace_agents (id, name, token_hash) VALUES ($1, $2, $3)
RETURNING id::text, name, created_at`;

const selectAgentByTokenHash = `SELECT id::text FROM workspace_agents WHERE token_hash = $1`;

const selectAgentExists = `SELECT 1 FROM workspace_agents WHERE id = $1`;

const lockAgent = `SELECT 1 FROM workspace_agents WHERE id = $1 FOR UPDATE`;

const deleteUndeclaredKeys = `
DELETE FROM workspace_agent_metadata WHERE workspace_agent_id = $1 AND NOT (key = ANY($2::text[]))`;

// Declaring keeps the value of a key already declared, and updates its description.
const upsertDefinitions = `
INSERT INTO workspace_agent_metadata
  (workspace_agent_id, key, display_name, script, interval, timeout, display_order)
SELECT $1, d.key, d.display_name, d.script, d.interval, d.timeout, d.display_order
FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::int[])
  AS d(key, display_name, script, interval, timeout, display_order)
ON CONFLICT (workspace_agent_id, key) DO UPDATE SET
  display_name = excluded.display_name, script = excluded.script, interval = excluded.interval,
  timeout = excluded.timeout, display_order = excluded.display_order`;

const selectMetadata = `
SELECT key, display_name, script, interval::float8 AS interval, timeout::float8 AS timeout,
       display_order, value, error, collected_at
FROM workspace_agent_metadata WHERE workspace_agent_id = $1 ORDER BY display_order, key`;

const selectMetadataOfAgents = `
SELECT workspace_agent_id::text AS agent_id, key, display_name, script, interval::float8 AS interval,
       timeout::float8 AS timeout, display_order, value, error, collected_at
FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[]) ORDER BY display_order, key`;

export interface Agent {
  id: string;
  name: string;
  created_at: Date;
}

export interface CreatedAgent extends Agent {
  /** Shown once; only its hash is stored. */
  token: string;
}

export interface MetadataDefinition {
  key: string;
  display_name: string;
  script: string;
  interval: number;
  timeout: number;
  display_order: number;
}

export interface MetadataRow extends MetadataDefinition {
  value: string;
  error: string;
  collected_at: Date;
}

// crypto.hash() is the one-shot form (Node >= 20.12), several times cheaper
// per call than a Hash object; this runs on every report.
const oneShotHash = (crypto as { hash?: (algorithm: string, data: string, encoding: 'base64') => string }).hash;

/** SHA-256 of an agent token: what the table stores. */
export function hashToken(token: string): Buffer {
  return createHash('sha256').update(token).digest();
}

/** SHA-256 of an agent token in base64: what the token cache keys on. */
export function hashTokenBase64(token: string): string {
  return oneShotHash ? oneShotHash('sha256', token, 'base64') : hashToken(token).toString('base64');
}

export interface MetadataStoreOptions {
  /** When set, each flush's UPDATE also NOTIFYs this channel, in the same statement. */
  notifyChannel?: string;
}

export class MetadataStore implements MetadataWriter {
  private readonly notifyChannel: string | undefined;

  constructor(
    private readonly pool: Pool,
    options: MetadataStoreOptions = {},
  ) {
    this.notifyChannel = options.notifyChannel;
  }

  async updateMetadata(batch: MetadataBatch): Promise<UpdateResult> {
    const params: unknown[] = [batch.agentIds, batch.keys, batch.values, batch.errors, batch.collectedAts];
    const announce = this.notifyChannel !== undefined;
    if (announce) params.push(this.notifyChannel);
    const { rows } = await this.pool.query<{ agent_id: string; written: number; payloads?: number }>(
      announce ? updateMetadataAndNotify : updateMetadataReturningAgents,
      params,
    );
    let written = 0;
    const changedAgentIds = rows.map((row) => {
      written += row.written;
      return row.agent_id;
    });
    let undeclared = 0;
    if (written < batch.keys.length) {
      const result = await this.pool.query<{ undeclared: number }>(countUndeclared, [batch.agentIds, batch.keys]);
      undeclared = result.rows[0]?.undeclared ?? 0;
    }
    const result: UpdateResult = { changedAgentIds, undeclared, stale: batch.keys.length - written - undeclared };
    if (announce) result.announced = rows[0]?.payloads ?? 0;
    return result;
  }

  async createAgent(name: string): Promise<CreatedAgent> {
    // 32 random bytes: unguessable, so a fast hash is enough to store it.
    const token = `mbt_${randomBytes(32).toString('base64url')}`;
    const { rows } = await this.pool.query<Agent>(insertAgent, [randomUUID(), name, hashToken(token)]);
    return { ...rows[0]!, token };
  }

  /** The agent a token belongs to, by the token's hash. */
  async agentIdForTokenHash(tokenHash: Buffer): Promise<string | undefined> {
    const { rows } = await this.pool.query<{ id: string }>(selectAgentByTokenHash, [tokenHash]);
    return rows[0]?.id;
  }

  async agentExists(agentId: string): Promise<boolean> {
    const { rowCount } = await this.pool.query(selectAgentExists, [agentId]);
    return rowCount === 1;
  }

  /**
   * Replaces the keys an agent declares: new keys get rows, kept keys keep
   * their values, keys no longer declared are deleted. Returns the stored
   * list, or undefined for an unknown agent.
   */
  async putDefinitions(
    agentId: string,
    definitions: readonly MetadataDefinition[],
  ): Promise<MetadataRow[] | undefined> {
    return this.transaction(async (client) => {
      const { rowCount } = await client.query(lockAgent, [agentId]);
      if (rowCount !== 1) return undefined;
      const keys = definitions.map((d) => d.key);
      await client.query(deleteUndeclaredKeys, [agentId, keys]);
      await client.query(upsertDefinitions, [
        agentId,
        keys,
        definitions.map((d) => d.display_name),
        definitions.map((d) => d.script),
        definitions.map((d) => d.interval),
        definitions.map((d) => d.timeout),
        definitions.map((d) => d.display_order),
      ]);
      const { rows } = await client.query<MetadataRow>(selectMetadata, [agentId]);
      return rows;
    });
  }

  /** An agent's rows sorted by display_order then key, or undefined for an unknown agent. */
  async getMetadata(agentId: string): Promise<MetadataRow[] | undefined> {
    const { rows } = await this.pool.query<MetadataRow>(selectMetadata, [agentId]);
    if (rows.length > 0) return rows;
    return (await this.agentExists(agentId)) ? [] : undefined;
  }

  /** The rows of several agents in one query, each list sorted as `getMetadata` sorts it. */
  async getMetadataOfAgents(agentIds: readonly string[]): Promise<Map<string, MetadataRow[]>> {
    const byAgent = new Map<string, MetadataRow[]>(agentIds.map((id) => [id, []]));
    const { rows } = await this.pool.query<MetadataRow & { agent_id: string }>(selectMetadataOfAgents, [agentIds]);
    for (const { agent_id, ...row } of rows) byAgent.get(agent_id)?.push(row);
    return byAgent;
  }

  private async transaction<T>(work: (client: PoolClient) => Promise<T>): Promise<T> {
    const client = await this.pool.connect();
    let broken: Error | undefined;
    try {
      await client.query('BEGIN');
      const result = await work(client);
      await client.query('COMMIT');
      return result;
    } catch (err) {
      // A connection that cannot even roll back is destroyed, not pooled.
      await client.query('ROLLBACK').catch((rollbackError: Error) => (broken = rollbackError));
      throw err;
    } finally {
      client.release(broken);
    }
  }
}
