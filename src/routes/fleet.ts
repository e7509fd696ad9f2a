// Many agents at once: a bulk read (one query, whatever the number of
// agents) and a watch of many agents, or of every agent, as Server-Sent
// Events. The admin token reads any agent; an agent token only its own.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { FastifyRequest } from 'fastify';
import { Type } from 'typebox';
import type { Authenticate, Caller } from '../access.js';
import type { AgentStore } from '../agentStore.js';
import type { Clock } from '../clock.js';
import { HttpError } from '../errors.js';
import { MAX_KEY_CHARS } from '../report.js';
import {
  AgentMetadata,
  BAD_BODY,
  errors,
  eventStream,
  HEADERS_TOO_LARGE,
  INTERNAL,
  json,
  NOT_JSON,
  SECURITY,
  SHUTTING_DOWN,
  TOO_LARGE,
} from '../schemas.js';
import { serveWatch } from '../sse.js';
import type { MetadataStore } from '../store.js';
import { toView, type WatchHub } from '../watch.js';
import { TOO_MANY_WATCHES, WATCH_BOUNDS_DESCRIPTION } from '../watchLimits.js';

// A bulk read names at most 200 agents: an answer of at most ~2 MB at 10 keys each.
export const MAX_BULK_AGENTS = 200;
// A watch names at most 1,000 agents (every agent: all=true). 1,000 ids in a
// query string are ~46 KB, over the 16 KiB header limit: POST takes them.
export const MAX_WATCH_AGENTS = 1000;

const Uuid = Type.String({ format: 'uuid' });
/** One value or several of a repeated query parameter (`?agent_id=a&agent_id=b`). */
const Repeated = <T extends ReturnType<typeof Type.String>>(item: T, maxItems: number, description: string) =>
  Type.Union([item, Type.Array(item, { minItems: 1, maxItems })], { description });

const BulkQuery = Type.Object({
  agent_id: Repeated(Uuid, MAX_BULK_AGENTS, `The agents, 1 to ${MAX_BULK_AGENTS} (repeat the parameter).`),
  key: Type.Optional(
    Repeated(
      Type.String({ minLength: 1, maxLength: MAX_KEY_CHARS }),
      1000,
      'Only these keys (repeat the parameter); all keys when absent.',
    ),
  ),
  include_script: Type.Optional(
    Type.Union([Type.Literal('true'), Type.Literal('false')], {
      description: 'Include each key’s `script` (left out by default: it can be long).',
    }),
  ),
});

const BulkAnswer = Type.Object({
  agents: Type.Array(AgentMetadata, { description: 'The agents that exist, in the order asked.' }),
  missing: Type.Array(Uuid, { description: 'The agents asked for that do not exist.' }),
});

const WatchQuery = Type.Object({
  agent_id: Type.Optional(Repeated(Uuid, MAX_WATCH_AGENTS, `The agents to watch (repeat the parameter); or all=true.`)),
  all: Type.Optional(Type.Literal('true', { description: 'Every agent, those created later too (admin only).' })),
});

const WatchBody = Type.Object(
  {
    agent_ids: Type.Optional(
      Type.Array(Uuid, { minItems: 1, maxItems: MAX_WATCH_AGENTS, description: 'The agents to watch; or all.' }),
    ),
    all: Type.Optional(Type.Literal(true, { description: 'Every agent, those created later too (admin only).' })),
  },
  { additionalProperties: false },
);

const readErrors = {
  401: 'No token, or one that is neither the admin token nor an agent’s.',
  403: 'An agent token naming another agent than its own (or all=true): `an agent token reads only its own agent`.',
  431: HEADERS_TOO_LARGE,
  500: INTERNAL,
  503: `${SHUTTING_DOWN} Or an agent token could not be checked because the database is down.`,
} as const;

const WATCH_DESCRIPTION = `Many agents' metadata, live, as Server-Sent Events (\`text/event-stream\`):

- \`event: data\` with \`data: {"agent_id": "<id>", "metadata": [MetadataItem…]}\`: one per agent at once, then
  for each agent a batch named, on a fixed tick of at most a second (never waiting for quiet: under a
  continuous stream of batches each changed agent is still sent within a second), and at least every 5 s
  per agent so that \`age\` stays true;
- \`event: deleted\` with \`data: {"agent_id": "<id>"}\` when an agent is deleted: it leaves the stream;
- with all=true, an agent created later joins: its first \`data\` event arrives within a second;
- a \`: ping\` comment every 15 s, whatever else is sent.

Every stream of the service shares one LISTEN connection and one read per tick. A slow client holds at
most the newest event per agent it watches (older ones are dropped and counted). After the service's
LISTEN connection reconnects, every watched agent is read again and sent. ${WATCH_BOUNDS_DESCRIPTION}`;

export const fleetRoutes: FastifyPluginAsyncTypebox<{
  store: MetadataStore;
  agents: AgentStore;
  watchHub: WatchHub;
  authenticate: Authenticate;
  clock: Clock;
}> = async (app, { store, agents, watchHub, authenticate, clock }) => {
  app.get(
    '/v1/agents/metadata',
    {
      onRequest: authenticate,
      schema: {
        tags: ['read'],
        summary: 'Read many agents’ metadata',
        description:
          `Up to ${MAX_BULK_AGENTS} agents’ metadata in one answer (one query, whatever their number), ` +
          'each list sorted as GET /v1/agents/{agentId}/metadata sorts it, optionally restricted to some keys. ' +
          '`script` is left out unless include_script=true. The agents asked for that do not exist are listed ' +
          'in `missing`.',
        security: SECURITY.adminOrAgent,
        querystring: BulkQuery,
        response: {
          200: json('The agents’ metadata.', BulkAnswer),
          ...errors({
            400: 'No agent_id, more than 200, one that is not a UUID, or another parameter out of its limits.',
            ...readErrors,
          }),
        },
      },
    },
    async (request) => {
      const ids = lowerUnique(list(request.query.agent_id));
      mayRead(request.caller, ids);
      const keys = request.query.key === undefined ? undefined : list(request.query.key);
      const includeScript = request.query.include_script === 'true';
      const read = await store.getMetadataOfAgents(ids, { ...(keys ? { keys } : {}), includeScript });
      const now = clock.Date.now();
      return {
        agents: ids.flatMap((id) => {
          const rows = read.agents.get(id);
          return rows ? [{ agent_id: id, metadata: rows.map((row) => toView(row, now, { includeScript })) }] : [];
        }),
        missing: read.missing,
      };
    },
  );

  const watchSchema = {
    tags: ['read'],
    summary: 'Watch many agents’ metadata (Server-Sent Events)',
    description: WATCH_DESCRIPTION,
    security: SECURITY.adminOrAgent,
  };
  const watchAnswers = {
    200: eventStream(
      'The stream, open until the client leaves or the service stops.',
      'Server-Sent Events: `event: data` ({"agent_id","metadata"}), `event: deleted` ({"agent_id"}), ' +
        '`event: revoked` ({"agent_id","reason"}), `: ping` comments.',
    ),
  };
  const watch = async (request: FastifyRequest, reply: Parameters<typeof serveWatch>[1], target: WatchTarget) => {
    if (target.both) throw new HttpError(400, 'name the agents to watch or all, not both');
    if (target.all) {
      if (request.caller?.kind !== 'admin') throw new HttpError(403, 'all=true needs the admin token');
      await serveWatch(request, reply, watchHub, store, {
        agentIds: [],
        format: 'agent',
        all: true,
        allAgentIds: () => agents.allIds(),
      });
      return;
    }
    const ids = lowerUnique(target.agentIds);
    if (ids.length === 0) throw new HttpError(400, 'name the agents to watch (agent_id, agent_ids) or all=true');
    mayRead(request.caller, ids);
    await serveWatch(request, reply, watchHub, store, { agentIds: ids, format: 'agent' });
  };

  app.get(
    '/v1/agents/metadata/watch',
    {
      onRequest: authenticate,
      schema: {
        ...watchSchema,
        description: `${WATCH_DESCRIPTION}\n\nWith more agents than a query string holds (16 KiB of headers), POST the same request.`,
        querystring: WatchQuery,
        response: {
          ...watchAnswers,
          ...errors({
            400: `Neither agent_id nor all=true, both, more than ${MAX_WATCH_AGENTS} agents, or an agent_id that is not a UUID.`,
            ...readErrors,
            429: TOO_MANY_WATCHES,
          }),
        },
      },
    },
    async (request, reply) =>
      watch(request, reply, {
        agentIds: request.query.agent_id === undefined ? [] : list(request.query.agent_id),
        all: request.query.all === 'true',
        both: request.query.agent_id !== undefined && request.query.all !== undefined,
      }),
  );

  app.post(
    '/v1/agents/metadata/watch',
    {
      onRequest: authenticate,
      schema: {
        ...watchSchema,
        summary: 'Watch many agents’ metadata (Server-Sent Events), the agents in the body',
        body: WatchBody,
        response: {
          ...watchAnswers,
          ...errors({
            400: `${BAD_BODY} Or neither agent_ids nor all, both, or more than ${MAX_WATCH_AGENTS} agents.`,
            ...readErrors,
            413: TOO_LARGE,
            415: NOT_JSON,
            429: TOO_MANY_WATCHES,
          }),
        },
      },
    },
    async (request, reply) =>
      watch(request, reply, {
        agentIds: request.body.agent_ids ?? [],
        all: request.body.all === true,
        both: request.body.agent_ids !== undefined && request.body.all !== undefined,
      }),
  );
};

interface WatchTarget {
  agentIds: readonly string[];
  all: boolean;
  /** Both agents and all were named. */
  both: boolean;
}

function list(value: string | string[]): string[] {
  return typeof value === 'string' ? [value] : value;
}

function lowerUnique(ids: readonly string[]): string[] {
  return [...new Set(ids.map((id) => id.toLowerCase()))];
}

/** An agent token reads its own agent only. */
function mayRead(caller: Caller | undefined, ids: readonly string[]): void {
  if (caller?.kind === 'admin') return;
  if (caller?.kind === 'agent' && ids.every((id) => id === caller.agentId)) return;
  throw new HttpError(403, 'an agent token reads only its own agent');
}
