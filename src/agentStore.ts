// Agents in Postgres: create, look up by token, list page by page, show,
// delete, rotate the token. Every change also NOTIFYs the control channel in
// the same statement (control.ts), so every replica hears of it exactly when
// it commits.

import { randomUUID } from 'node:crypto';
import type { Pool } from 'pg';
import { isUuid } from './agentIdChunks.js';
import { CONTROL_CHANNEL } from './control.js';
import { parseRfc3339Micros } from './timestamps.js';
import { hashToken, newAgentToken } from './tokens.js';

const insertAgent = `
WITH created AS (
  INSERT INTO workspace_agents (id, name, token_hash) VALUES ($1, $2, $3) RETURNING id, name, created_at
)
SELECT id::text, name, created_at, pg_notify($4, json_build_object('type', 'created', 'agent_id', id)::text)
FROM created`;

const selectAgentByTokenHash = `SELECT id::text FROM workspace_agents WHERE token_hash = $1`;

const selectAgentExists = `SELECT 1 FROM workspace_agents WHERE id = $1`;

// A page of agents in (created_at, id) order, after the cursor's position.
// created_at travels as Postgres's own text (microseconds included), so the
// cursor is exact. `last_reported_at` leaves out keys never reported (the
// year-1 default).
const selectAgents = `
SELECT a.id::text, a.name, a.created_at, a.created_at::text AS created_at_text,
       max(m.collected_at) FILTER (WHERE m.collected_at > '0001-01-02') AS last_reported_at,
       count(m.key)::int AS declared_keys
FROM workspace_agents a
LEFT JOIN workspace_agent_metadata m ON m.workspace_agent_id = a.id
WHERE ($1::timestamptz IS NULL OR (a.created_at, a.id) > ($1::timestamptz, $2::uuid))
  AND ($3::text IS NULL OR starts_with(a.name, $3))
  AND ($4::uuid IS NULL OR a.id = $4)
GROUP BY a.id
ORDER BY a.created_at, a.id
LIMIT $5`;

const selectAllAgentIds = `SELECT id::text FROM workspace_agents ORDER BY created_at, id`;

const deleteAgent = `
WITH deleted AS (DELETE FROM workspace_agents WHERE id = $1 RETURNING id)
SELECT pg_notify($2, json_build_object('type', 'deleted', 'agent_id', id)::text) FROM deleted`;

const rotateToken = `
WITH rotated AS (UPDATE workspace_agents SET token_hash = $2 WHERE id = $1 RETURNING id)
SELECT pg_notify($3, json_build_object('type', 'token', 'agent_id', id)::text) FROM rotated`;

export interface Agent {
  id: string;
  name: string;
  created_at: Date;
}

export interface CreatedAgent extends Agent {
  /** Shown once; only its hash is stored. */
  token: string;
}

/** An agent as the list and show routes answer it. */
export interface AgentSummary {
  id: string;
  name: string;
  created_at: Date;
  /** The newest collected_at of its keys, or null when none was ever reported. */
  last_reported_at: Date | null;
  declared_keys: number;
}

export interface AgentPage {
  agents: AgentSummary[];
  /** Pass as `cursor` for the next page; absent on the last page. */
  next_cursor?: string;
}

/** An agent as the API answers it (times as ISO strings). */
export interface AgentView {
  id: string;
  name: string;
  created_at: string;
  last_reported_at: string | null;
  declared_keys: number;
}

export function agentView(agent: AgentSummary): AgentView {
  return {
    id: agent.id,
    name: agent.name,
    created_at: agent.created_at.toISOString(),
    last_reported_at: agent.last_reported_at?.toISOString() ?? null,
    declared_keys: agent.declared_keys,
  };
}

export class CursorError extends Error {
  override name = 'CursorError';
}

export class AgentStore {
  constructor(private readonly pool: Pool) {}

  async create(name: string): Promise<CreatedAgent> {
    const token = newAgentToken();
    const { rows } = await this.pool.query<Agent>(insertAgent, [randomUUID(), name, hashToken(token), CONTROL_CHANNEL]);
    const { id, created_at } = rows[0]!;
    return { id, name: rows[0]!.name, created_at, token };
  }

  /** The agent a token belongs to, by the token's hash. */
  async agentIdForTokenHash(tokenHash: Buffer): Promise<string | undefined> {
    const { rows } = await this.pool.query<{ id: string }>(selectAgentByTokenHash, [tokenHash]);
    return rows[0]?.id;
  }

  async exists(agentId: string): Promise<boolean> {
    const { rowCount } = await this.pool.query(selectAgentExists, [agentId]);
    return rowCount === 1;
  }

  /** One page of agents in creation order, optionally those whose name starts with `namePrefix`. */
  async list(options: { limit: number; cursor?: string; namePrefix?: string }): Promise<AgentPage> {
    const after = options.cursor === undefined ? undefined : decodeCursor(options.cursor);
    const rows = await this.select([
      after?.createdAt ?? null,
      after?.id ?? null,
      options.namePrefix ?? null,
      null,
      options.limit + 1,
    ]);
    const page: AgentPage = { agents: rows.slice(0, options.limit).map(({ summary }) => summary) };
    if (rows.length > options.limit) page.next_cursor = encodeCursor(rows[options.limit - 1]!);
    return page;
  }

  async get(agentId: string): Promise<AgentSummary | undefined> {
    return (await this.select([null, null, null, agentId, 1]))[0]?.summary;
  }

  /** Every agent's id, oldest first. */
  async allIds(): Promise<string[]> {
    const { rows } = await this.pool.query<{ id: string }>(selectAllAgentIds);
    return rows.map((row) => row.id);
  }

  /** Deletes the agent and its metadata; false when there was no such agent. */
  async delete(agentId: string): Promise<boolean> {
    const { rowCount } = await this.pool.query(deleteAgent, [agentId, CONTROL_CHANNEL]);
    return rowCount === 1;
  }

  /** Gives the agent a new token (returned, shown once); the old one stops working. Undefined for an unknown agent. */
  async rotateToken(agentId: string): Promise<string | undefined> {
    const token = newAgentToken();
    const { rowCount } = await this.pool.query(rotateToken, [agentId, hashToken(token), CONTROL_CHANNEL]);
    return rowCount === 1 ? token : undefined;
  }

  private async select(params: unknown[]): Promise<{ summary: AgentSummary; createdAtText: string }[]> {
    const { rows } = await this.pool.query<AgentSummary & { created_at_text: string }>(selectAgents, params);
    return rows.map(({ created_at_text, ...summary }) => ({ summary, createdAtText: created_at_text }));
  }
}

function encodeCursor(row: { summary: AgentSummary; createdAtText: string }): string {
  return Buffer.from(JSON.stringify([row.createdAtText, row.summary.id])).toString('base64url');
}

// created_at as Postgres writes a timestamptz: 2026-11-25 00:12:33.123456+00
const TIMESTAMP = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?[+-](\d\d)(:\d\d)?$/;
// Postgres refuses a zone offset over 15 hours (MAX_TZDISP_HOUR): a 500, were it let through.
const MAX_OFFSET_HOURS = 15;

/** A timestamp in that form that is a real time (no month 13, February 30 or year 0) Postgres takes. */
function isCursorTimestamp(text: string): boolean {
  const match = TIMESTAMP.exec(text);
  if (match === null || Number(match[1]) > MAX_OFFSET_HOURS) return false;
  return parseRfc3339Micros(match[2] === undefined ? `${text}:00` : text) !== undefined;
}

function decodeCursor(cursor: string): { createdAt: string; id: string } {
  try {
    const [createdAt, id] = JSON.parse(Buffer.from(cursor, 'base64url').toString()) as unknown[];
    if (typeof createdAt === 'string' && typeof id === 'string' && isCursorTimestamp(createdAt) && isUuid(id)) {
      return { createdAt, id };
    }
  } catch {
    // not JSON
  }
  throw new CursorError('cursor is not one this service gave out: pass the next_cursor of the previous page');
}
