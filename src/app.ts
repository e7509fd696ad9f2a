// The Fastify app: routes, auth hooks and the error shape. It never listens;
// `main` does, and tests drive it with `app.inject` or a real socket.

import Fastify, { LogController, type FastifyBaseLogger, type FastifyError, type FastifyInstance } from 'fastify';
import type { Registry } from 'prom-client';
import { adminOnly, adminOrAgent, agentOnly } from './access.js';
import type { AgentAuthenticator } from './auth.js';
import { BODY_LIMIT_BYTES, DEFAULT_TIMEOUTS } from './limits.js';
import type { Logger } from './logger.js';
import { agentRoutes } from './routes/agents.js';
import { healthRoutes, type Health } from './routes/health.js';
import { ingestRoutes, type MetadataSink } from './routes/ingest.js';
import { readRoutes } from './routes/read.js';
import type { MetadataStore } from './store.js';
import type { WatchHub } from './watch.js';

export interface AppDependencies {
  logger: Logger;
  store: MetadataStore;
  batcher: MetadataSink;
  auth: AgentAuthenticator;
  registry: Registry;
  health: Health;
  watchHub: WatchHub;
  adminToken: string | undefined;
  /** Overrides of DEFAULT_TIMEOUTS (tests use short ones). */
  timeouts?: Partial<typeof DEFAULT_TIMEOUTS>;
}

export function buildApp(deps: AppDependencies): FastifyInstance {
  const timeouts = { ...DEFAULT_TIMEOUTS, ...deps.timeouts };
  // Fastify's own logger type: routes log through request.log.
  const loggerInstance: FastifyBaseLogger = deps.logger;
  const app = Fastify({
    loggerInstance,
    bodyLimit: BODY_LIMIT_BYTES,
    requestTimeout: timeouts.requestMs,
    connectionTimeout: timeouts.idleMs,
    http: {
      headersTimeout: timeouts.headersMs,
      // How often Node enforces the two timeouts above (its default is 30 s).
      connectionsCheckingInterval: Math.min(1000, timeouts.headersMs / 2),
    },
    // Node's 16 KiB header limit stays: more is refused with 431.
    routerOptions: { maxParamLength: 200 },
    return503OnClosing: true,
    // Our own onResponse hook logs requests, without bodies or tokens.
    logController: new LogController({ disableRequestLogging: true }),
    // No child logger per request: nothing logs per request on the hot path.
    childLoggerFactory: (logger) => logger,
    // Types are checked, not coerced: a number where a string belongs is a 400.
    ajv: { customOptions: { coerceTypes: false } },
  });
  // JSON only: anything else is a 415.
  app.removeContentTypeParser('text/plain');
  app.decorateRequest('caller', undefined);

  // Request logs (debug) carry method, route, status and time, never bodies or tokens.
  if (deps.logger.isLevelEnabled('debug')) {
    app.addHook('onResponse', (request, reply, done) => {
      deps.logger.debug(
        {
          method: request.method,
          url: request.routeOptions.url,
          status: reply.statusCode,
          ms: Math.round(reply.elapsedTime),
        },
        'request',
      );
      done();
    });
  }

  app.setErrorHandler((error: FastifyError, request, reply) => {
    const status = error.statusCode ?? 500;
    if (status >= 500) {
      request.log.error({ err: error, url: request.routeOptions.url }, 'request failed');
      return reply.code(status).send({ error: status === 503 ? error.message : 'internal error' });
    }
    return reply.code(status).send({ error: error.message });
  });
  app.setNotFoundHandler((request, reply) =>
    reply.code(404).send({ error: `no route for ${request.method} ${request.url.split('?')[0]}` }),
  );

  app.register(healthRoutes, { health: deps.health, registry: deps.registry });
  app.register(ingestRoutes, { batcher: deps.batcher, authenticate: agentOnly(deps.auth) });
  app.register(agentRoutes, { store: deps.store, auth: deps.auth, authenticate: adminOnly(deps.adminToken) });
  app.register(readRoutes, {
    store: deps.store,
    watchHub: deps.watchHub,
    authenticate: adminOrAgent(deps.adminToken, deps.auth),
  });
  return app;
}
