// The Fastify app: routes, auth hooks, the error shape, and what closing it
// means (503 for new requests; each plugin closes what it uses). It never
// listens; `main` does.

import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyError, type FastifyInstance } from 'fastify';
import type { Registry } from 'prom-client';
import { adminOnly, adminOrAgent, agentOnly } from './access.js';
import { isUuid } from './agentIdChunks.js';
import type { AgentStore } from './agentStore.js';
import type { AgentAuthenticator } from './auth.js';
import { AuthFailures, type AuthFailureLimits } from './authFailures.js';
import { clientErrorHandler } from './clientError.js';
import { systemClock, type Clock } from './clock.js';
import { DEFAULTS } from './config.js';
import { HttpError } from './errors.js';
import { registerJsonBodyParser } from './jsonBody.js';
import { BODY_LIMIT_BYTES, DEFAULT_TIMEOUTS } from './limits.js';
import type { Logger } from './logger.js';
import { agentRoutes } from './routes/agents.js';
import { healthRoutes, type Readiness } from './routes/health.js';
import { fleetRoutes } from './routes/fleet.js';
import { ingestRoutes, type MetadataSink } from './routes/ingest.js';
import { lifecycleRoutes } from './routes/lifecycle.js';
import { openapiRoutes } from './routes/openapi.js';
import { readRoutes } from './routes/read.js';
import { streamRoutes } from './routes/stream.js';
import { uiRoutes } from './routes/ui.js';
import { AuthMetrics, StreamMetrics } from './metrics.js';
import { nosniff } from './responseHeaders.js';
import type { MetadataStore } from './store.js';
import { StreamRegistry } from './streams.js';
import { refuseNulInUrl } from './text.js';
import type { WatchHub } from './watch.js';

export interface AppDependencies {
  logger: Logger;
  store: MetadataStore;
  agents: AgentStore;
  batcher: MetadataSink;
  auth: AgentAuthenticator;
  registry: Registry;
  readiness: Readiness;
  watchHub: WatchHub;
  adminToken: string | undefined;
  /** The time of requests (collected_at defaults, ages). Default: the system's. */
  clock?: Clock;
  /** Overrides of DEFAULT_TIMEOUTS (tests use short ones). */
  timeouts?: Partial<typeof DEFAULT_TIMEOUTS>;
  /** The open ingest streams, which revocation closes (main.ts shares it with the control channel). Default: the app's own. */
  streams?: StreamRegistry;
  /** The bound on failed authentications per client address. Default: DEFAULTS' (config.ts). */
  authFailureLimits?: Partial<AuthFailureLimits>;
  /**
   * The proxies whose X-Forwarded-For names the client (Fastify's
   * `trustProxy`: addresses, CIDRs, or loopback, linklocal, uniquelocal).
   * Default: none, the client is the socket's peer.
   */
  trustProxy?: string;
}

const SERVED_WHILE_CLOSING = new Set(['/healthz', '/readyz', '/metrics']);

// `format: 'uuid'` means what Postgres's uuid type reads: ajv-formats' own also
// takes a `urn:uuid:` prefix, which Postgres refuses (a 500). Set once ajv-formats is added.
const strictUuidFormat = (ajv: { addFormat(name: string, format: (text: string) => boolean): unknown }): void => {
  ajv.addFormat('uuid', isUuid);
};

export function buildApp(deps: AppDependencies): FastifyInstance {
  const timeouts = { ...DEFAULT_TIMEOUTS, ...deps.timeouts };
  // Fastify's own logger type: routes log through request.log.
  const loggerInstance: FastifyBaseLogger = deps.logger;
  const app = Fastify({
    loggerInstance,
    // Behind a load balancer the client's address (the failed-authentication
    // bucket's key) comes from X-Forwarded-For, from trusted proxies only.
    trustProxy: deps.trustProxy ?? false,
    bodyLimit: BODY_LIMIT_BYTES,
    requestTimeout: timeouts.requestMs,
    connectionTimeout: timeouts.idleMs,
    keepAliveTimeout: timeouts.keepAliveMs,
    http: {
      headersTimeout: timeouts.headersMs,
      // How often Node enforces the two timeouts above (its default is 30 s).
      connectionsCheckingInterval: Math.min(1000, timeouts.headersMs / 2),
    },
    // Node's 16 KiB header limit stays: more is refused with 431.
    routerOptions: { maxParamLength: 200 },
    // Our own hook answers 503 while closing, with a message (Fastify's says only "Service Unavailable").
    return503OnClosing: false,
    // Our own onResponse hook logs requests, without bodies or tokens.
    logController: new LogController({ disableRequestLogging: true }),
    // No child logger per request: nothing logs per request on the hot path.
    childLoggerFactory: (logger) => logger,
    // Types are checked, not coerced: a number where a string belongs is a 400.
    // A body property a schema does not know is refused, not silently dropped
    // (a misspelt `interval` must not pass for a default); query strings stay open.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false }, onCreate: strictUuidFormat },
    // Fastify's logs a malformed request's raw bytes (its token included) at trace: ours does not.
    clientErrorHandler: clientErrorHandler(loggerInstance),
  }).withTypeProvider<TypeBoxTypeProvider>();
  // JSON only (anything else is a 415), decoded strictly as UTF-8 (jsonBody.ts).
  app.removeContentTypeParser('text/plain');
  registerJsonBodyParser(app);
  app.addHook('onRequest', nosniff);
  app.addHook('onRequest', refuseNulInUrl);
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

  // Once app.close() begins, new requests get 503 (with Connection: close) while
  // the ones in flight finish; probes and metrics still answer.
  let closing = false;
  app.addHook('preClose', (done) => {
    closing = true;
    done();
  });
  app.addHook('onRequest', (request, reply, done) => {
    if (!closing || SERVED_WHILE_CLOSING.has(request.routeOptions.url ?? '')) return done();
    void reply.header('connection', 'close');
    done(new HttpError(503, 'shutting down: retry against another replica or later'));
  });

  // Before the routes: the OpenAPI document (/openapi.json, /docs) is built from every route registered after it.
  app.register(openapiRoutes);
  app.register(healthRoutes, { readiness: deps.readiness, registry: deps.registry, shuttingDown: () => closing });
  const clock = deps.clock ?? systemClock;
  const failures = new AuthFailures({
    ratePerSecond: DEFAULTS.authFailureRate,
    burst: DEFAULTS.authFailureBurst,
    maxAddresses: DEFAULTS.authFailureAddresses,
    ...deps.authFailureLimits,
    metrics: new AuthMetrics(deps.registry),
    logger: deps.logger,
    clock,
  });
  app.register(ingestRoutes, { batcher: deps.batcher, authenticate: agentOnly(deps.auth, failures), clock });
  const streams = deps.streams ?? new StreamRegistry();
  app.register(streamRoutes, {
    sink: deps.batcher,
    authenticate: agentOnly(deps.auth, failures),
    clock,
    streams,
    metrics: new StreamMetrics(deps.registry),
    upgradeIdleMs: timeouts.idleMs,
  });
  app.register(agentRoutes, {
    store: deps.store,
    agents: deps.agents,
    auth: deps.auth,
    authenticate: adminOnly(deps.adminToken, failures),
  });
  app.register(lifecycleRoutes, {
    agents: deps.agents,
    auth: deps.auth,
    streams,
    watchHub: deps.watchHub,
    authenticate: adminOnly(deps.adminToken, failures),
  });
  const adminOrAgentToken = adminOrAgent(deps.adminToken, deps.auth, failures);
  app.register(readRoutes, { store: deps.store, watchHub: deps.watchHub, authenticate: adminOrAgentToken, clock });
  app.register(fleetRoutes, {
    store: deps.store,
    agents: deps.agents,
    watchHub: deps.watchHub,
    authenticate: adminOrAgentToken,
    clock,
  });
  app.register(uiRoutes, { adminEnabled: deps.adminToken !== undefined });
  return app;
}
