// Who may call what: the onRequest hooks that authenticate a request and set
// `request.caller`, by the admin token or an agent's token. Refused requests
// fail with an HttpError (401, 403; 503 when a token cannot be checked). Each
// refusal for the credentials is recorded (authFailures.ts): counted by kind,
// logged, and charged to the client's address. Past its bound an address is
// throttled: credentials that can be checked without the database (the admin
// token, an agent token this replica has cached) still pass, so that a
// guesser behind the same NAT or proxy cannot lock the fleet out; anything
// else gets 429 before any token is looked up.

import type { FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify';
import { isUuid } from './agentIdChunks.js';
import { bearerToken, secretsEqual, type AgentAuthenticator } from './auth.js';
import { AuthError, type AuthFailures } from './authFailures.js';
import { HttpError } from './errors.js';
import { BODY_LIMIT_BYTES } from './limits.js';
import { agentTokenShape, TOKEN_PREFIX } from './tokens.js';

/** Who a request speaks for: the admin, or one agent. */
export type Caller = { kind: 'admin' } | { kind: 'agent'; agentId: string };

declare module 'fastify' {
  interface FastifyRequest {
    caller: Caller | undefined;
  }
}

/** An onRequest hook that sets `request.caller`, or fails with an HttpError. */
export type Authenticate = (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction) => void;

/** Set while the address has no failure left: the refusal to give where a token would need the database. */
type Throttle = (() => HttpError) | undefined;

/**
 * A callback-style hook around a check that is synchronous when the token is
 * cached (the common case: no promise, no extra tick), and a promise when it
 * must ask the database. First of all, an address that used up its failures
 * is refused.
 */
function hook(
  failures: AuthFailures,
  check: (request: FastifyRequest, throttle: Throttle) => void | Promise<void>,
): Authenticate {
  return (request, reply, done) => {
    const retryAfter = failures.retryAfter(request.ip);
    const throttle: Throttle =
      retryAfter === undefined
        ? undefined
        : () => {
            failures.throttled(request.ip);
            // As JSON, not by the route's 429 schema: the POST's own 429 is `{accepted, dropped}`.
            void reply.header('retry-after', String(retryAfter)).serializer(JSON.stringify);
            return new HttpError(
              429,
              `too many failed authentications from this address: retry in ${retryAfter} s with a valid token`,
            );
          };
    const refused = (err: unknown): void => {
      if (err instanceof AuthError) failures.record(request.ip, err.kind, request.routeOptions.url);
      done(err as Error);
    };
    let pending: void | Promise<void>;
    try {
      refuseOversizeBody(request);
      pending = check(request, throttle);
    } catch (err) {
      refused(err);
      return;
    }
    if (pending) {
      const lookupEnded = failures.lookupStarted(request.ip);
      pending.then(
        () => {
          lookupEnded();
          done();
        },
        (err: unknown) => {
          lookupEnded();
          refused(err);
        },
      );
    } else done();
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
 * Sets the caller to the token's agent: 401 for an unknown token (one of a
 * shape no version issued is refused without a query), 403 for another
 * agent's than the route's `agentId` (a route without one checks what the
 * agent may see itself), 503 when the database cannot answer. Synchronous
 * when the token is cached or malformed, a promise when it must be looked up.
 */
function asTokenAgent(
  request: FastifyRequest,
  auth: AgentAuthenticator,
  token: string,
  agentId: string | undefined,
  unknown: string,
  throttle: Throttle,
  malformedKind: 'malformed' | 'bad_admin_token' = 'malformed',
): void | Promise<void> {
  const accept = (owner: string | undefined): void => {
    if (owner === undefined) {
      const malformed = agentTokenShape(token) === 'malformed';
      throw new AuthError(401, unknown, malformed ? malformedKind : 'unknown_agent_token');
    }
    if (agentId !== undefined && owner !== agentId)
      throw new AuthError(403, 'this token belongs to another agent', 'wrong_agent');
    request.caller = { kind: 'agent', agentId: owner };
  };
  if (throttle) {
    // Only what needs no query: a token cached as valid passes, any other is refused unlooked.
    const cached = auth.cachedAgentForToken(token);
    if (cached === undefined) throw throttle();
    return accept(cached);
  }
  const owner = auth.agentForToken(token);
  if (!(owner instanceof Promise)) return accept(owner);
  return owner.then(accept, () => {
    throw new HttpError(503, 'database unavailable: could not check the token, retry later');
  });
}

/** The route's agent, by its own token: 401 without a valid token, 403 with another agent's. */
export function agentOnly(auth: AgentAuthenticator, failures: AuthFailures): Authenticate {
  return hook(failures, (request, throttle) => {
    const agentId = requireAgentIdParam(request);
    const token = bearerToken(request.headers.authorization);
    if (token === undefined)
      throw new AuthError(401, 'missing agent token: send Authorization: Bearer <token>', 'missing');
    return asTokenAgent(request, auth, token, agentId, 'invalid agent token', throttle);
  });
}

export function adminOnly(adminToken: string | undefined, failures: AuthFailures): Authenticate {
  return hook(failures, (request, throttle) => {
    // A setting of the service, not a credential refused: not counted.
    if (adminToken === undefined) throw new HttpError(403, 'admin API disabled: set ADMIN_TOKEN');
    requireAgentIdParam(request);
    const token = bearerToken(request.headers.authorization);
    if (token === undefined)
      throw new AuthError(401, 'missing admin token: send Authorization: Bearer <ADMIN_TOKEN>', 'missing');
    if (!adminMatches(adminToken, token)) {
      if (throttle) throw throttle();
      throw new AuthError(401, 'invalid admin token', 'bad_admin_token');
    }
    request.caller = { kind: 'admin' };
  });
}

export function adminOrAgent(
  adminToken: string | undefined,
  auth: AgentAuthenticator,
  failures: AuthFailures,
): Authenticate {
  return hook(failures, (request, throttle) => {
    const agentId = requireAgentIdParam(request);
    const token = bearerToken(request.headers.authorization);
    if (token === undefined)
      throw new AuthError(401, 'missing token: send Authorization: Bearer <admin or agent token>', 'missing');
    if (adminMatches(adminToken, token)) {
      request.caller = { kind: 'admin' };
      return;
    }
    // Without the agent tokens' prefix it was meant as the admin token (a typo at the live page's sign-in).
    const malformedKind = token.startsWith(TOKEN_PREFIX) ? 'malformed' : 'bad_admin_token';
    return asTokenAgent(request, auth, token, agentId, 'invalid token', throttle, malformedKind);
  });
}
