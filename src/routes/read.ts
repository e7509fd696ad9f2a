// Read API: an agent's metadata now (GET), or live as Server-Sent Events.
// Auth: the admin token, or the agent's own token.

import type { FastifyPluginAsync } from 'fastify';
import type { Authenticate } from '../access.js';
import type { Clock } from '../clock.js';
import { HttpError } from '../errors.js';
import type { MetadataStore } from '../store.js';
import { serveWatch } from '../sse.js';
import { toView, type WatchHub } from '../watch.js';

export const readRoutes: FastifyPluginAsync<{
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

  app.get<{ Params: { agentId: string } }>(
    '/v1/agents/:agentId/metadata',
    { onRequest: authenticate },
    async (request) => {
      const agentId = request.params.agentId.toLowerCase();
      const rows = await store.getMetadata(agentId);
      if (rows === undefined) throw new HttpError(404, `agent ${agentId} not found`);
      const now = clock.Date.now();
      return rows.map((row) => toView(row, now));
    },
  );

  app.get<{ Params: { agentId: string } }>(
    '/v1/agents/:agentId/metadata/watch',
    { onRequest: authenticate },
    async (request, reply) => {
      const agentId = request.params.agentId.toLowerCase();
      await serveWatch(request, reply, watchHub, store, { agentIds: [agentId], format: 'list', requireAll: true });
    },
  );
};
