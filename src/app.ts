// The Fastify app: routes, auth hooks and the error shape. It never listens;
// `main` does, and tests drive it with `app.inject` or a real socket.

import Fastify, {
  LogController,
  type FastifyBaseLogger,
  type FastifyError,
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
  type HookHandlerDoneFunction,
} from 'fastify';
import type { Registry } from 'prom-client';
import { isUuid } from './agentIdChunks.js';
import { bearerToken, secretsEqual, type AgentAuthenticator } from './auth.js';
import type { Logger } from './logger.js';
import { agentRoutes } from './routes/agents.js';
import { healthRoutes, type Health } from './routes/health.js';
import { ingestRoutes, type MetadataSink } from './routes/ingest.js';
import { readRoutes } from './routes/read.js';
import type { MetadataStore } from './store.js';
import type { WatchHub } from './watch.js';

// 1 MiB: a report holds at most 6144 bytes of keys, and values over 2048
// bytes are cut anyway; an agent's output of 10 KiB for each of 50 keys fits.
export const BODY_LIMIT_BYTES = 1024 * 1024;
// Slow clients must not hold sockets forever (slow-loris): headers within
// 10 s, the whole request within 30 s, no silence longer than 30 s.
export const DEFAULT_TIMEOUTS = { headersMs: 10_000, requestMs: 30_000, idleMs: 30_000 };

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

/** Who a request speaks for: the admin, or one agent. */
export type Caller = { kind: 'admin' } | { kind: 'agent'; agentId: string };

declare module 'fastify' {
  interface FastifyRequest {
    caller: Caller | undefined;
  }
}

export class HttpError extends Error {
  constructor(
    readonly statusCode: number,
    message: string,
  ) {
    super(message);
  }
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

/** An onRequest hook that sets `request.caller`, or fails with an HttpError. */
export type Authenticate = (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction) => void;

/**
 * A callback-style hook around a check that is synchronous when the token is
 * cached (the common case: no promise, no extra tick), and a promise when it
 * must ask the database.
 */
function hook(check: (request: FastifyRequest) => void | Promise<void>): Authenticate {
  return (request, _reply, done) => {
    let pending: void | Promise<void>;
    try {
      refuseOversizeBody(request);
      pending = check(request);
    } catch (err) {
      done(err as Error);
      return;
    }
    if (pending) pending.then(() => done(), done);
    else done();
  };
}

/**
 * 413 from Content-Length before the body is read, so the client sees the
 * answer instead of a connection reset mid-upload. (Every route with a body
 * authenticates, so the check rides on that one hook.)
 */
function refuseOversizeBody(request: FastifyRequest): void {
  const length = Number(request.headers['content-length'] ?? 0);
  if (length > BODY_LIMIT_BYTES) {
    throw new HttpError(413, `request body of ${length} bytes exceeds the limit of ${BODY_LIMIT_BYTES} bytes`);
  }
}

function requireAgentIdParam(request: FastifyRequest): string | undefined {
  const agentId = (request.params as { agentId?: string }).agentId;
  if (agentId !== undefined && !isUuid(agentId))
    throw new HttpError(400, `agentId must be a UUID (got ${JSON.stringify(agentId)})`);
  return agentId?.toLowerCase();
}

function adminMatches(adminToken: string | undefined, token: string | undefined): boolean {
  return adminToken !== undefined && token !== undefined && secretsEqual(token, adminToken);
}

/**
 * Sets the caller to the token's agent: 401 for an unknown token, 403 for
 * another agent's, 503 when the database cannot answer. Synchronous when the
 * token is cached, a promise when it must be looked up.
 */
function asTokenAgent(
  request: FastifyRequest,
  auth: AgentAuthenticator,
  token: string,
  agentId: string | undefined,
  unknown: string,
): void | Promise<void> {
  const accept = (owner: string | undefined): void => {
    if (owner === undefined) throw new HttpError(401, unknown);
    if (owner !== agentId) throw new HttpError(403, 'this token belongs to another agent');
    request.caller = { kind: 'agent', agentId: owner };
  };
  const owner = auth.agentForToken(token);
  if (!(owner instanceof Promise)) return accept(owner);
  return owner.then(accept, () => {
    throw new HttpError(503, 'database unavailable: could not check the token, retry later');
  });
}

/** The route's agent, by its own token: 401 without a valid token, 403 with another agent's. */
function agentOnly(auth: AgentAuthenticator): Authenticate {
  return hook((request) => {
    const agentId = requireAgentIdParam(request);
    const token = bearerToken(request.headers.authorization);
    if (token === undefined) throw new HttpError(401, 'missing agent token: send Authorization: Bearer <token>');
    return asTokenAgent(request, auth, token, agentId, 'invalid agent token');
  });
}

function adminOnly(adminToken: string | undefined): Authenticate {
  return hook((request) => {
    if (adminToken === undefined) throw new HttpError(403, 'admin API disabled: set ADMIN_TOKEN');
    requireAgentIdParam(request);
    const token = bearerToken(request.headers.authorization);
    if (token === undefined) throw new HttpError(401, 'missing admin token: send Authorization: Bearer <ADMIN_TOKEN>');
    if (!adminMatches(adminToken, token)) throw new HttpError(401, 'invalid admin token');
    request.caller = { kind: 'admin' };
  });
}

function adminOrAgent(adminToken: string | undefined, auth: AgentAuthenticator): Authenticate {
  return hook((request) => {
    const agentId = requireAgentIdParam(request);
    const token = bearerToken(request.headers.authorization);
    if (token === undefined)
      throw new HttpError(401, 'missing token: send Authorization: Bearer <admin or agent token>');
    if (adminMatches(adminToken, token)) {
      request.caller = { kind: 'admin' };
      return;
    }
    return asTokenAgent(request, auth, token, agentId, 'invalid token');
  });
}
