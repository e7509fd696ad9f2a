// Read API: an agent's metadata now (GET), or live as Server-Sent Events.
// Auth: the admin token, or the agent's own token.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { Authenticate } from '../access.js';
import type { Clock } from '../clock.js';
import { HttpError } from '../errors.js';
import {
  AgentIdParams,
  errors,
  eventStream,
  HEADERS_TOO_LARGE,
  INTERNAL,
  json,
  MetadataList,
  SECURITY,
} from '../schemas.js';
import type { MetadataStore } from '../store.js';
import { serveWatch } from '../sse.js';
import { toView, type WatchHub } from '../watch.js';
import { TOO_MANY_WATCHES, WATCH_BOUNDS_DESCRIPTION } from '../watchLimits.js';

// The errors of both reads.
const readErrors = errors({
  400: '`agentId` is not a UUID.',
  401: 'No token, or one that is neither the admin token nor an agent’s.',
  403: 'An agent token of another agent: `this token belongs to another agent`.',
  404: 'No agent has this id.',
  431: HEADERS_TOO_LARGE,
  500: INTERNAL,
  503:
    'Shutting down (`shutting down: retry against another replica or later`), or an agent token could ' +
    'not be checked because the database is down.',
});

const WATCH_DESCRIPTION = `The agent's metadata, live, as Server-Sent Events (\`text/event-stream\`):

- \`event: data\` with \`data:\` the same list as GET /v1/agents/{agentId}/metadata (a JSON array of
  MetadataItem): at once, again when a batch names the agent (at most once a second), and at least every
  5 s so that \`age\` stays true;
- \`event: deleted\` with \`data: {"agent_id": "<id>"}\` when the agent is deleted; the stream then ends;
- a \`: ping\` comment every 15 s, on its own schedule, whatever else is sent.

A slow client only ever has the newest list pending: older ones are dropped. ${WATCH_BOUNDS_DESCRIPTION}
Errors are answered as JSON, before the stream starts.

\`\`\`
event: data
data: [{"key":"cpu","display_name":"cpu","display_order":0,"interval":10,"timeout":5,"value":"12%","error":"","collected_at":"2026-11-23T00:00:00.000Z","age":3,"stale":false}]

: ping
\`\`\``;

export const readRoutes: FastifyPluginAsyncTypebox<{
  store: MetadataStore;
  watchHub: WatchHub;
  authenticate: Authenticate;
  clock: Clock;
}> = async (app, { store, watchHub, authenticate, clock }) => {
  // Open streams would keep the server from closing: end them first.
  app.addHook('preClose', (done) => {
    watchHub.close();
    done();
  });

  app.get(
    '/v1/agents/:agentId/metadata',
    {
      onRequest: authenticate,
      schema: {
        tags: ['read'],
        summary: 'Read an agent’s metadata',
        description:
          'The agent’s keys as stored now (values reach the table at each flush), sorted by display_order then ' +
          'key, with their `age` and whether they are `stale`. A key never reported has `pending: true` and ' +
          'the original’s `collected_at` of 0001-01-01T00:00:00.000Z.',
        security: SECURITY.adminOrAgent,
        params: AgentIdParams,
        response: { 200: json('The agent’s keys.', MetadataList), ...readErrors },
      },
    },
    async (request) => {
      const agentId = request.params.agentId.toLowerCase();
      const rows = await store.getMetadata(agentId);
      if (rows === undefined) throw new HttpError(404, `agent ${agentId} not found`);
      const now = clock.Date.now();
      return rows.map((row) => toView(row, now));
    },
  );

  app.get(
    '/v1/agents/:agentId/metadata/watch',
    {
      onRequest: authenticate,
      schema: {
        tags: ['read'],
        summary: 'Watch an agent’s metadata (Server-Sent Events)',
        description: WATCH_DESCRIPTION,
        security: SECURITY.adminOrAgent,
        params: AgentIdParams,
        response: {
          200: eventStream(
            'The stream, open until the client leaves, the agent is deleted or the service stops.',
            'Server-Sent Events: `event: data` (the list), `event: deleted`, `event: revoked`, `: ping` comments.',
          ),
          ...readErrors,
          ...errors({ 429: TOO_MANY_WATCHES }),
        },
      },
    },
    async (request, reply) => {
      const agentId = request.params.agentId.toLowerCase();
      await serveWatch(request, reply, watchHub, store, { agentIds: [agentId], format: 'list', requireAll: true });
    },
  );
};
