// Agents' metadata in Postgres: the flush, the declared keys, and the reads.
// The hot path is `updateMetadata`: one `UPDATE … FROM unnest(arrays)` per
// flush, guarded so an older collected_at never overwrites a newer one.
// (Agents themselves are in agentStore.ts.)

import type { Pool, PoolClient } from 'pg';
import { decodeAgentIdChunk, encodeAgentId, MAX_AGENT_IDS_PER_CHUNK } from './agentIdChunks.js';
import { flushParameters } from './arrayLiterals.js';
import type { MetadataBatch, MetadataWriter, UpdateResult } from './batcher.js';

// The flush's rows from its six array parameters (arrayLiterals.ts: each
// row names its agent by index into the first), the timestamps from epoch
// microseconds, exactly (whole seconds and the remaining microseconds each
// fit a double), sorted by the primary key.
// With the pool's planner settings (database.ts: no hash or merge joins) the
// UPDATE looks each row up by the primary key in this order, so:
// - its cost is the batch's, not the table's: a hash join over the whole
//   table (what the planner picked for large batches) grew with history;
// - it locks rows in one global order, (agent id, key): two replicas
//   flushing overlapping rows wait for each other instead of deadlocking.
const batchRows = `
m AS MATERIALIZED (
  SELECT ($1::uuid[])[u.agent] AS workspace_agent_id, u.key, u.value, u.error,
         timestamptz 'epoch' + (u.us / 1000000) * interval '1 second' + (u.us % 1000000) * interval '1 microsecond'
           AS collected_at
  FROM unnest($2::int[], $3::text[], $4::text[], $5::text[], $6::bigint[]) AS u(agent, key, value, error, us)
  ORDER BY 1, u.key
)`;

/**
 * The guarded UPDATE: never moves a row back in time (an older collected_at
 * loses; a tie, a retried batch, wins). Alone, it is the benchmark's bare
 * baseline; the flush adds RETURNING and the NOTIFYs.
 */
const guardedUpdateOfBatch = `
UPDATE workspace_agent_metadata AS wam
SET value = m.value, error = m.error, collected_at = m.collected_at
FROM m
WHERE wam.workspace_agent_id = m.workspace_agent_id
  AND wam.key = m.key
  AND wam.collected_at <= m.collected_at`;

export const guardedUpdate = `WITH ${batchRows} ${guardedUpdateOfBatch}`;

const flushedBatch = `${batchRows}, updated AS (${guardedUpdateOfBatch} RETURNING wam.workspace_agent_id)`;

// Written rows grouped per agent: the statement returns one row per changed
// agent instead of one per entry.
export const updateMetadataReturningAgents = `
WITH ${flushedBatch}
SELECT workspace_agent_id::text AS agent_id, count(*)::int AS written FROM updated GROUP BY 1`;

// The same flush that also announces the changed agents, in the original's
// payload format (22-character unpadded base64 per id, at most 363 per
// payload), built in SQL: one statement, one round trip per flush, and the
// NOTIFYs are delivered exactly when the UPDATE commits. It answers one row:
// the rows written, the payloads sent, and the payloads' agent ids in one
// string (22 bytes an agent rather than a row per agent), which name the
// changed agents for the sinks after the NOTIFY (announcers.ts).
const updateMetadataAndNotify = `
WITH ${flushedBatch}, changed AS (
  SELECT workspace_agent_id AS id, count(*)::int AS written FROM updated GROUP BY 1
), payloads AS (
  SELECT string_agg(rtrim(encode(uuid_send(id), 'base64'), '='), '') AS payload
  FROM (SELECT id, (row_number() OVER () - 1) / ${MAX_AGENT_IDS_PER_CHUNK} AS chunk FROM changed) AS numbered
  GROUP BY chunk
)
SELECT (SELECT coalesce(sum(written), 0)::int FROM changed) AS written, sent.payloads, sent.agents
FROM (SELECT count(pg_notify($7, payload))::int AS payloads, coalesce(string_agg(payload, ''), '') AS agents
      FROM payloads) AS sent`;

// Only when some entries were not written: which of them have no row at all
// (the flush's first three parameters: agents, rows' agent indexes, keys).
const countUndeclared = `
SELECT count(*)::int AS undeclared
FROM unnest($2::int[], $3::text[]) AS m(agent, key)
WHERE NOT EXISTS (
  SELECT 1 FROM workspace_agent_metadata w
  WHERE w.workspace_agent_id = ($1::uuid[])[m.agent] AND w.key = m.key
)`;

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

// The rows of several agents in one query, and which of them do not exist
// (the row of an unknown agent has a null exists column); optionally only
// some keys, and the script only when asked for (it can be 64 KB). Each row
// also carries its agent's token hash, read in the same snapshot: a watch
// stream opened with an older token gets none of these rows (watch.ts).
const selectMetadataOfAgents = `
SELECT q.id::text AS agent_id, a.id IS NOT NULL AS exists, encode(a.token_hash, 'base64') AS token_hash,
       m.key, m.display_name,
       CASE WHEN $3::bool THEN m.script ELSE '' END AS script,
       m.interval::float8 AS interval, m.timeout::float8 AS timeout, m.display_order, m.value, m.error, m.collected_at
FROM unnest($1::uuid[]) AS q(id)
LEFT JOIN workspace_agents a ON a.id = q.id
LEFT JOIN workspace_agent_metadata m ON m.workspace_agent_id = a.id AND ($2::text[] IS NULL OR m.key = ANY($2::text[]))
ORDER BY m.display_order, m.key`;

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

export interface MetadataReadOptions {
  /** Only these keys. */
  keys?: readonly string[];
  /** Fill `script` (left empty otherwise). */
  includeScript?: boolean;
}

export interface MetadataOfAgents {
  /** Each agent that exists, with its rows (possibly none), in the order asked. */
  agents: Map<string, MetadataRow[]>;
  /** The agents asked for that do not exist. */
  missing: string[];
  /** Each existing agent's token hash (SHA-256, base64) as of the same read. */
  tokenHashes?: Map<string, string>;
}

export interface MetadataStoreOptions {
  /**
   * When set, each flush's UPDATE also NOTIFYs this channel, in the same
   * statement, and a change of an agent's declared keys names the agent on it.
   */
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
    const params = await flushParameters(batch);
    if (this.notifyChannel !== undefined) {
      params.push(this.notifyChannel);
      const { rows } = await this.pool.query<{ written: number; payloads: number; agents: string }>(
        updateMetadataAndNotify,
        params,
      );
      const { written, payloads, agents } = rows[0]!;
      let changedAgentIds: string[] | undefined;
      return {
        // The agents the NOTIFY named, exactly, decoded when first read (about
        // 18 ms of CPU for 20,000): the batcher reads them only for its sinks.
        get changedAgentIds() {
          return (changedAgentIds ??= decodeAgentIdChunk(agents));
        },
        ...(await this.countSkipped(params, batch.keys.length, written)),
        announced: payloads,
      };
    }
    const { rows } = await this.pool.query<{ agent_id: string; written: number }>(
      updateMetadataReturningAgents,
      params,
    );
    let written = 0;
    const changedAgentIds = rows.map((row) => {
      written += row.written;
      return row.agent_id;
    });
    return { changedAgentIds, ...(await this.countSkipped(params, batch.keys.length, written)) };
  }

  /** The entries of a flush not written: those with no row (undeclared), and the rest (stale). */
  private async countSkipped(
    params: readonly string[],
    entries: number,
    written: number,
  ): Promise<{ undeclared: number; stale: number }> {
    let undeclared = 0;
    if (written < entries) {
      const result = await this.pool.query<{ undeclared: number }>(countUndeclared, params.slice(0, 3));
      undeclared = result.rows[0]?.undeclared ?? 0;
    }
    return { undeclared, stale: entries - written - undeclared };
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
      // The agent's rows changed: the hint listeners act on (watchers re-read it).
      if (this.notifyChannel !== undefined) {
        await client.query('SELECT pg_notify($1, $2)', [this.notifyChannel, encodeAgentId(agentId)]);
      }
      return (await this.readAgents(client, [agentId], {})).agents.get(agentId) ?? [];
    });
  }

  /** An agent's rows sorted by display_order then key, or undefined for an unknown agent. */
  async getMetadata(agentId: string): Promise<MetadataRow[] | undefined> {
    return (await this.getMetadataOfAgents([agentId])).agents.get(agentId);
  }

  /**
   * The rows of several agents in one query, each list sorted as
   * `getMetadata` sorts it, and the agents that do not exist. `keys`
   * restricts the rows to those keys; `script` is empty unless
   * `includeScript`.
   */
  getMetadataOfAgents(agentIds: readonly string[], options: MetadataReadOptions = {}): Promise<MetadataOfAgents> {
    return this.readAgents(this.pool, agentIds, options);
  }

  private async readAgents(
    queryable: Pool | PoolClient,
    agentIds: readonly string[],
    options: MetadataReadOptions,
  ): Promise<MetadataOfAgents> {
    const ids = [...new Set(agentIds)];
    const { rows } = await queryable.query<MetadataRow & { agent_id: string; exists: boolean; token_hash: string }>(
      selectMetadataOfAgents,
      [ids, options.keys ?? null, options.includeScript ?? false],
    );
    const agents = new Map<string, MetadataRow[]>();
    const tokenHashes = new Map<string, string>();
    const missing = new Set<string>();
    for (const { agent_id, exists, token_hash, ...row } of rows) {
      if (!exists) {
        missing.add(agent_id);
        continue;
      }
      let list = agents.get(agent_id);
      if (!list) {
        agents.set(agent_id, (list = []));
        tokenHashes.set(agent_id, token_hash);
      }
      // An agent with no (matching) keys comes as one row of nulls.
      if (row.key !== null) list.push(row);
    }
    return { agents, missing: ids.filter((id) => missing.has(id)), tokenHashes };
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
