// `metabatch agents create|list|show|delete|rotate-token`: agents straight in
// the database (the service's own replicas hear of deletions and rotations
// on the control channel). `--json` prints what the HTTP API would answer;
// otherwise a table for people.

import { parseArgs } from 'node:util';
import { isUuid } from '../agentIdChunks.js';
import { agentView, AgentStore, type AgentSummary, CursorError } from '../agentStore.js';
import type { Config } from '../config.js';
import { createPool, migrate } from '../database.js';
import type { Logger } from '../logger.js';
import { MAX_KEY_CHARS } from '../report.js';
import { MetadataStore } from '../store.js';
import { toView } from '../watch.js';
import { table, UsageError, withDatabase } from './common.js';

export const AGENTS_USAGE = `usage: metabatch agents <command>

  create --name N [--key K]… [--json]   create an agent, declare its keys, print its id and token (shown once)
  list [--name-prefix P] [--limit N] [--cursor C] [--json]
                                        one page of agents, oldest first (the next page's cursor on stderr)
  show ID [--json]                      one agent and its metadata
  delete ID                             delete an agent and its metadata; its token stops working
  rotate-token ID [--json]              give an agent a new token (shown once); the old one stops working`;

// A page of the list: as the API's default.
const DEFAULT_LIMIT = 100;
const MAX_LIMIT = 500;

export async function agentsCommand(config: Config, log: Logger, args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  switch (sub) {
    case 'create':
      return create(config, log, rest);
    case 'list':
      return list(config, log, rest);
    case 'show':
      return show(config, log, rest);
    case 'delete':
      return remove(config, log, rest);
    case 'rotate-token':
      return rotate(config, log, rest);
    default:
      throw new UsageError(AGENTS_USAGE);
  }
}

/** Runs `work` with the stores of a migrated database. */
function withStores(
  config: Config,
  log: Logger,
  work: (agents: AgentStore, metadata: MetadataStore) => Promise<number>,
): Promise<number> {
  return withDatabase(config, log, async (url) => {
    const pool = createPool(url, log, { max: 2 });
    try {
      await migrate(pool, log);
      return await work(new AgentStore(pool), new MetadataStore(pool, { notifyChannel: config.notifyChannel }));
    } finally {
      await pool.end();
    }
  });
}

/** The one agent id a command names, and a `--json` flag. */
function agentId(args: string[]): { id: string; json: boolean } {
  const { values, positionals } = parseArgs({
    args,
    options: { json: { type: 'boolean' } },
    allowPositionals: true,
    strict: true,
  });
  const [id, ...extra] = positionals;
  if (id === undefined || extra.length > 0) throw new UsageError('name one agent by its id');
  if (!isUuid(id)) throw new UsageError(`the agent id must be a UUID (got ${JSON.stringify(id)})`);
  return { id: id.toLowerCase(), json: values.json ?? false };
}

async function create(config: Config, log: Logger, args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { name: { type: 'string' }, key: { type: 'string', multiple: true }, json: { type: 'boolean' } },
    strict: true,
  });
  const name = values.name?.trim();
  if (!name) throw new UsageError('agents create needs --name N');
  if (name.length > 127) throw new UsageError('--name must be at most 127 characters');
  const keys = values.key ?? [];
  for (const key of keys) {
    if (key.length < 1 || key.length > MAX_KEY_CHARS) {
      throw new UsageError(`--key must be 1 to ${MAX_KEY_CHARS} characters (got ${JSON.stringify(key)})`);
    }
  }
  if (new Set(keys).size !== keys.length) throw new UsageError('--key values must differ');
  return withStores(config, log, async (agents, metadata) => {
    const agent = await agents.create(name);
    await metadata.putDefinitions(
      agent.id,
      keys.map((key, index) => ({ key, display_name: key, script: '', interval: 0, timeout: 0, display_order: index })),
    );
    if (values.json) {
      process.stdout.write(`${JSON.stringify({ id: agent.id, name: agent.name, token: agent.token, keys })}\n`);
    } else {
      process.stdout.write(
        `id: ${agent.id}\nname: ${agent.name}\ntoken: ${agent.token}\nkeys: ${keys.join(', ') || '(none)'}\n`,
      );
      process.stderr.write('The token is shown only this once: give it to the agent now.\n');
    }
    return 0;
  });
}

async function list(config: Config, log: Logger, args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      'name-prefix': { type: 'string' },
      limit: { type: 'string' },
      cursor: { type: 'string' },
      json: { type: 'boolean' },
    },
    strict: true,
  });
  const limit = values.limit === undefined ? DEFAULT_LIMIT : Number(values.limit);
  if (!Number.isSafeInteger(limit) || limit < 1 || limit > MAX_LIMIT) {
    throw new UsageError(`--limit must be a whole number from 1 to ${MAX_LIMIT}`);
  }
  return withStores(config, log, async (agents) => {
    let page;
    try {
      page = await agents.list({
        limit,
        ...(values.cursor !== undefined ? { cursor: values.cursor } : {}),
        ...(values['name-prefix'] !== undefined ? { namePrefix: values['name-prefix'] } : {}),
      });
    } catch (err) {
      if (err instanceof CursorError) throw new UsageError(`--cursor: ${err.message}`);
      throw err;
    }
    if (values.json) {
      process.stdout.write(`${JSON.stringify({ ...page, agents: page.agents.map(agentView) })}\n`);
    } else {
      process.stdout.write(
        `${table([['ID', 'NAME', 'CREATED', 'LAST REPORTED', 'KEYS'], ...page.agents.map(summaryRow)])}\n`,
      );
      if (page.next_cursor) process.stderr.write(`more: metabatch agents list --cursor ${page.next_cursor}\n`);
    }
    return 0;
  });
}

async function show(config: Config, log: Logger, args: string[]): Promise<number> {
  const { id, json } = agentId(args);
  return withStores(config, log, async (agents, metadata) => {
    const agent = await agents.get(id);
    if (!agent) return notFound(id);
    const now = Date.now();
    const items = ((await metadata.getMetadata(id)) ?? []).map((row) => toView(row, now));
    if (json) {
      process.stdout.write(`${JSON.stringify({ ...agentView(agent), metadata: items })}\n`);
      return 0;
    }
    process.stdout.write(`${table([['ID', 'NAME', 'CREATED', 'LAST REPORTED', 'KEYS'], summaryRow(agent)])}\n\n`);
    const rows = items.map((item) => [
      item.key,
      item.value,
      item.pending ? 'never reported' : `${item.age}s${item.stale ? ' (stale)' : ''}`,
      item.error,
    ]);
    process.stdout.write(`${table([['KEY', 'VALUE', 'AGE', 'ERROR'], ...rows])}\n`);
    return 0;
  });
}

async function remove(config: Config, log: Logger, args: string[]): Promise<number> {
  const { id } = agentId(args);
  return withStores(config, log, async (agents) => {
    if (!(await agents.delete(id))) return notFound(id);
    process.stdout.write(`deleted ${id}\n`);
    return 0;
  });
}

async function rotate(config: Config, log: Logger, args: string[]): Promise<number> {
  const { id, json } = agentId(args);
  return withStores(config, log, async (agents) => {
    const token = await agents.rotateToken(id);
    if (token === undefined) return notFound(id);
    if (json) {
      process.stdout.write(`${JSON.stringify({ id, token })}\n`);
    } else {
      process.stdout.write(`id: ${id}\ntoken: ${token}\n`);
      process.stderr.write('The new token is shown only this once; the old one no longer works.\n');
    }
    return 0;
  });
}

function notFound(id: string): number {
  process.stderr.write(`metabatch: agent ${id} not found\n`);
  return 1;
}

function summaryRow(agent: AgentSummary): string[] {
  return [
    agent.id,
    agent.name,
    agent.created_at.toISOString(),
    agent.last_reported_at?.toISOString() ?? 'never',
    String(agent.declared_keys),
  ];
}
