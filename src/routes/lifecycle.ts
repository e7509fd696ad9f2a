// Admin API, an agent's life after creation: list agents page by page, show
// one, delete one, rotate its token. A deleted agent's or an old token is
// refused here at once, and on every other replica as soon as the control
// NOTIFY (sent by the statement that made the change) reaches it.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { Authenticate } from '../access.js';
import { agentView, CursorError, type AgentStore } from '../agentStore.js';
import type { AgentAuthenticator } from '../auth.js';
import { HttpError } from '../errors.js';
import type { StreamRegistry } from '../streams.js';
import type { WatchHub } from '../watch.js';
import {
  AgentIdParams,
  AgentSummary,
  errors,
  HEADERS_TOO_LARGE,
  INTERNAL,
  json,
  SECURITY,
  SHUTTING_DOWN,
} from '../schemas.js';

// A page of agents: 100 unless asked, 500 at most (an answer of ~100 KB).
const DEFAULT_PAGE = 100;
export const MAX_PAGE = 500;

const ListQuery = Type.Object({
  limit: Type.Optional(
    Type.String({
      pattern: '^[0-9]{1,4}$',
      description: `Agents per page, 1 to ${MAX_PAGE}; default ${DEFAULT_PAGE}.`,
    }),
  ),
  cursor: Type.Optional(
    Type.String({ maxLength: 200, description: 'The `next_cursor` of the previous page; absent for the first.' }),
  ),
  name_prefix: Type.Optional(
    Type.String({ minLength: 1, maxLength: 127, description: 'Only agents whose name starts with this.' }),
  ),
});

const AgentPage = Type.Object({
  agents: Type.Array(AgentSummary, { description: 'Oldest first ((created_at, id) order).' }),
  next_cursor: Type.Optional(Type.String({ description: 'Pass as `cursor` for the next page; absent on the last.' })),
});

const RotatedToken = Type.Object({
  id: Type.String({ format: 'uuid' }),
  token: Type.String({ description: 'The new bearer token, shown once; the old one is refused from now on.' }),
});

const adminErrors = {
  401: 'No admin token, or a wrong one.',
  403: 'The admin API is disabled: `admin API disabled: set ADMIN_TOKEN`.',
  431: HEADERS_TOO_LARGE,
  500: INTERNAL,
  503: SHUTTING_DOWN,
} as const;

export const lifecycleRoutes: FastifyPluginAsyncTypebox<{
  agents: AgentStore;
  auth: AgentAuthenticator;
  /** The ingest streams: a deleted agent's or a rotated token's are closed at once (4001). */
  streams: Pick<StreamRegistry, 'revoke'>;
  /** The watch streams: those of a deleted agent's or a rotated token end at once (`event: revoked`). */
  watchHub: Pick<WatchHub, 'revoke' | 'onDeleted'>;
  authenticate: Authenticate;
}> = async (app, { agents, auth, streams, watchHub, authenticate }) => {
  app.get(
    '/v1/agents',
    {
      onRequest: authenticate,
      schema: {
        tags: ['admin'],
        summary: 'List agents',
        description:
          'Agents oldest first, a page at a time (keyset pagination by (created_at, id): a page costs the ' +
          'same wherever it is), each with when it last reported and how many keys it declares.',
        security: SECURITY.admin,
        querystring: ListQuery,
        response: {
          200: json('A page of agents.', AgentPage),
          ...errors({
            400: `A limit out of 1 to ${MAX_PAGE}, or a cursor this service did not give out.`,
            ...adminErrors,
          }),
        },
      },
    },
    async (request) => {
      const limit = request.query.limit === undefined ? DEFAULT_PAGE : Number(request.query.limit);
      if (limit < 1 || limit > MAX_PAGE) throw new HttpError(400, `limit must be from 1 to ${MAX_PAGE} (got ${limit})`);
      try {
        const page = await agents.list({
          limit,
          ...(request.query.cursor !== undefined ? { cursor: request.query.cursor } : {}),
          ...(request.query.name_prefix !== undefined ? { namePrefix: request.query.name_prefix } : {}),
        });
        return { ...page, agents: page.agents.map(agentView) };
      } catch (err) {
        if (err instanceof CursorError) throw new HttpError(400, err.message);
        throw err;
      }
    },
  );

  app.get(
    '/v1/agents/:agentId',
    {
      onRequest: authenticate,
      schema: {
        tags: ['admin'],
        summary: 'Show an agent',
        description: 'The same fields as each entry of GET /v1/agents.',
        security: SECURITY.admin,
        params: AgentIdParams,
        response: {
          200: json('The agent.', AgentSummary),
          ...errors({ 400: '`agentId` is not a UUID.', 404: 'No agent has this id.', ...adminErrors }),
        },
      },
    },
    async (request) => {
      const agentId = request.params.agentId.toLowerCase();
      const agent = await agents.get(agentId);
      if (!agent) throw new HttpError(404, `agent ${agentId} not found`);
      return agentView(agent);
    },
  );

  app.delete(
    '/v1/agents/:agentId',
    {
      onRequest: authenticate,
      schema: {
        tags: ['admin'],
        summary: 'Delete an agent',
        description:
          'Deletes the agent and its metadata. Its token is refused from now on, on every replica within a ' +
          'second; watch streams get `event: deleted` for it, those opened with its token then end with ' +
          '`event: revoked`, and its ingest streams are closed (4001).',
        security: SECURITY.admin,
        params: AgentIdParams,
        response: {
          204: { description: 'Deleted.', type: 'null' },
          ...errors({ 400: '`agentId` is not a UUID.', 404: 'No agent has this id.', ...adminErrors }),
        },
      },
    },
    async (request, reply) => {
      const agentId = request.params.agentId.toLowerCase();
      if (!(await agents.delete(agentId))) throw new HttpError(404, `agent ${agentId} not found`);
      auth.forgetAgent(agentId);
      streams.revoke(agentId);
      watchHub.onDeleted(agentId);
      return reply.code(204).send(null);
    },
  );

  app.post(
    '/v1/agents/:agentId/token',
    {
      onRequest: authenticate,
      schema: {
        tags: ['admin'],
        summary: 'Rotate an agent’s token',
        description:
          'Gives the agent a new token, in this answer only. The old one is refused from now on, on every ' +
          'replica within a second; the watch streams opened with it end with `event: revoked`, and the ' +
          'ingest streams opened with it are closed (4001).',
        security: SECURITY.admin,
        params: AgentIdParams,
        response: {
          200: json('The new token (shown this once).', RotatedToken),
          ...errors({ 400: '`agentId` is not a UUID.', 404: 'No agent has this id.', ...adminErrors }),
        },
      },
    },
    async (request) => {
      const agentId = request.params.agentId.toLowerCase();
      const token = await agents.rotateToken(agentId);
      if (token === undefined) throw new HttpError(404, `agent ${agentId} not found`);
      auth.forgetAgent(agentId);
      streams.revoke(agentId);
      watchHub.revoke(agentId, 'token rotated');
      auth.remember(token, agentId);
      return { id: agentId, token };
    },
  );
};
