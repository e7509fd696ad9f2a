// GET /v1/agents/{agentId}/metadata/stream: an agent reports over one
// WebSocket instead of a request each time, as coder's agents do. The token is
// checked once, at the upgrade, by the POST route's hook; then each text
// message is one report under the POST's rules (the same schema, the app's
// ajv, normalizeReport, the batcher's `add`), answered in order with its
// counts or its error. This file holds the route, the upgrade and the ping
// schedule; each connection is an IngestStream (routes/ingestStream.ts).

import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import websocket from '@fastify/websocket';
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { FastifyRequest, HookHandlerDoneFunction } from 'fastify';
import type { Authenticate } from '../access.js';
import type { Clock } from '../clock.js';
import { HttpError } from '../errors.js';
import { BODY_LIMIT_BYTES } from '../limits.js';
import type { StreamMetrics } from '../metrics.js';
import { AgentIdParams, errors, HEADERS_TOO_LARGE, INTERNAL, SECURITY, StreamReport } from '../schemas.js';
import {
  MAX_STREAMS_PER_AGENT,
  REVOKED_CLOSE_CODE,
  REVOKED_CLOSE_REASON,
  TOO_MANY_STREAMS,
  type StreamRegistry,
} from '../streams.js';
import type { MetadataSink } from './ingest.js';
import { IngestStream, protocolCloseCode, type StreamContext } from './ingestStream.js';

/** The largest message, as the POST's body limit; over it the stream is closed with 1009. */
export const MAX_MESSAGE_BYTES = BODY_LIMIT_BYTES;
/** Default ping period; a stream silent for a whole period after a ping (no pong, no message) is terminated. */
export const PING_INTERVAL_MS = 30_000;
/** The ping period's slots: a stream is pinged in its slot's turn, one slot every PING_INTERVAL_MS / PING_SLOTS. */
export const PING_SLOTS = 30;
/** How long the service waits at shutdown for clients to answer its close frame before cutting them off. */
export const CLOSE_GRACE_MS = 1000;

const TOO_MANY_CLOSE_CODE = 1008;
const TRY_AGAIN_CLOSE_CODE = 1013;
const TRY_AGAIN_CLOSE_REASON = 'try again later: the token could not be confirmed';

export interface StreamRoutesOptions {
  sink: MetadataSink;
  /** The POST route's hook: the agent's own token (`agentOnly`). */
  authenticate: Authenticate;
  /** The time of reports (collected_at defaults) and of the ping schedule. */
  clock: Clock;
  streams: StreamRegistry;
  metrics: StreamMetrics;
  /** Ping period (and idle timeout). Default PING_INTERVAL_MS. */
  pingIntervalMs?: number;
  /** Bound on the closing handshake at shutdown. Default CLOSE_GRACE_MS. */
  closeGraceMs?: number;
  /**
   * How long the socket of an upgrade request answered over HTTP (an error,
   * or a route that is no WebSocket) may stay silent before it is closed:
   * the HTTP server's idle timeout (DEFAULT_TIMEOUTS.idleMs).
   */
  upgradeIdleMs: number;
}

declare module 'fastify' {
  interface FastifyRequest {
    /** The stream registry's epoch when the upgrade's token check began (see StreamRegistry.epoch). */
    streamEpoch: number;
  }
}

const DESCRIPTION = `A WebSocket for an agent that stays connected: one report per message, the same rules and
limits as POST /v1/agents/{agentId}/metadata, without a request (and a token check) per report.

**The upgrade.** \`GET\` with \`Connection: Upgrade\`, \`Upgrade: websocket\` and \`Authorization: Bearer
<agent token>\`. The token is checked once, here; errors are HTTP answers with \`{"error": …}\` before
any upgrade: 400 (\`agentId\` not a UUID), 401, 403, 503 (the token cannot be checked), and 429 \`too many
streams for this agent (at most ${MAX_STREAMS_PER_AGENT})\` for a fifth stream of one agent on one replica.
A GET without the upgrade is answered 426.

**Messages.** Each text message is one report:

\`\`\`
{"seq": 7, "metadata": [{"key": "cpu", "value": "12%", "collected_at": "2026-11-23T00:00:00Z"}]}
\`\`\`

\`seq\` is an integer from 0 to 2^53 − 1 of the client's choosing (no order is required); \`metadata\` is the
POST body's, under its schema and rules (a property of the message other than these two is refused).
Reports are handled one at a time, and each is answered, in order:

- \`{"seq":7,"accepted":2,"dropped":0}\`: queued, as the POST's 202;
- \`{"seq":7,"accepted":1,"dropped":1,"retry_after":1}\`: some keys refused, as the POST's 429 with
  Retry-After (whole seconds, at least 1): send them again after that;
- \`{"seq":7,"error":"body/metadata must be array"}\`: refused whole, nothing applied, with the message the
  POST answers 400 with; \`"seq": null\` when the message is not JSON or has no valid \`seq\`. The stream
  stays open.

**Closes.** 1003: a binary message. 1009: a message over 1 MiB. 4001 \`token revoked\`: the agent was
deleted or its token rotated, on any replica (within a second). 1001 \`shutting down\`: the service
stops, after answering every report it received. 1008: a fifth stream that got past the 429 in a race.
1013: the token was being checked while thousands of tokens were revoked, and could not be told apart
from a revoked one (connect again).
A stream that answers no ping (sent every 30 s) within 30 s, and sends nothing meanwhile, is cut off.

**Backpressure.** While the client leaves over 1 MiB of answers unread, the service reads no more of its
messages until they drain; its pongs wait behind them too, so a client that leaves its answers unread for a
whole ping period is cut off.`;

export const streamRoutes: FastifyPluginAsyncTypebox<StreamRoutesOptions> = async (app, options) => {
  const { sink, authenticate, clock, streams, metrics, upgradeIdleMs } = options;
  const pingIntervalMs = options.pingIntervalMs ?? PING_INTERVAL_MS;
  const closeGraceMs = options.closeGraceMs ?? CLOSE_GRACE_MS;
  /** Every stream of this plugin, for the ping schedule and shutdown. */
  const open = new Set<IngestStream>();
  let shuttingDown = false;
  metrics.bind({ connections: () => streams.size });

  // The ping schedule, spread over the period: each stream belongs to one of
  // PING_SLOTS slots (in turn, so they stay even), and one timer for the
  // whole replica, armed while any stream is open, pings one slot every
  // period / PING_SLOTS. So each stream is still pinged once a period, and
  // 10,000 streams cost ~330 pings a tick, not 10,000 writes (and then
  // 10,000 pongs) in one turn of the event loop, which held every report
  // behind them long enough to fill the channel.
  const slots = Array.from({ length: PING_SLOTS }, () => new Set<IngestStream>());
  const slotOf = new Map<IngestStream, Set<IngestStream>>();
  let nextSlot = 0;
  let dueSlot = 0;
  let heartbeat: unknown;
  const beat = () => {
    heartbeat = undefined;
    const slot = slots[dueSlot]!;
    dueSlot = (dueSlot + 1) % PING_SLOTS;
    for (const stream of slot) stream.beat();
    armHeartbeat();
  };
  const armHeartbeat = () => {
    if (heartbeat === undefined && open.size > 0) heartbeat = clock.setTimeout(beat, pingIntervalMs / PING_SLOTS);
  };
  const joinSchedule = (stream: IngestStream) => {
    const slot = slots[nextSlot]!;
    nextSlot = (nextSlot + 1) % PING_SLOTS;
    slot.add(stream);
    slotOf.set(stream, slot);
    armHeartbeat();
  };

  const context: StreamContext = {
    sink,
    clock,
    metrics,
    log: app.log,
    validate: undefined,
    closed(stream) {
      open.delete(stream);
      slotOf.get(stream)?.delete(stream);
      slotOf.delete(stream);
      streams.remove(stream.agentId, stream);
      if (open.size === 0 && heartbeat !== undefined) {
        clock.clearTimeout(heartbeat);
        heartbeat = undefined;
      }
    },
  };

  // Every upgrade request, to any route, comes to the server's 'upgrade'
  // listener (@fastify/websocket's), which answers it through Fastify. The
  // HTTP server no longer watches those sockets, and one answered over HTTP
  // (an error, a route that is no WebSocket) would stay open, holding
  // app.close(), as long as its client likes: it gets the server's idle
  // timeout, which the upgrade to a stream disarms (ws's setSocket), and is
  // closed at shutdown once answered.
  const upgrading = new Set<Socket>();
  function forgetUpgrade(this: Socket) {
    upgrading.delete(this);
  }
  const onUpgrade = (_request: IncomingMessage, duplex: Duplex) => {
    const socket = duplex as Socket;
    upgrading.add(socket);
    socket.once('close', forgetUpgrade);
    socket.setTimeout(upgradeIdleMs, destroyIdle);
  };
  app.server.prependListener('upgrade', onUpgrade);
  app.addHook('onClose', (_instance, done) => {
    app.server.removeListener('upgrade', onUpgrade);
    done();
  });

  await app.register(websocket, {
    options: {
      maxPayload: MAX_MESSAGE_BYTES,
      perMessageDeflate: false,
      // The plugin keeps its own set (`open`).
      clientTracking: false,
    },
    // Errors of an established socket. The protocol's own (a message over
    // maxPayload, invalid UTF-8, a bad frame) already close it with their
    // code, and the stream counts them.
    errorHandler(error, socket, request) {
      if (protocolCloseCode(error) !== undefined) return;
      request.log.error({ err: error, url: request.routeOptions.url }, 'metadata stream failed');
      socket.terminate();
    },
    // Before the server closes: answer what was received, then 1001 to every
    // stream, so that app.close() is not held open by them.
    async preClose() {
      shuttingDown = true;
      for (const socket of upgrading) {
        // Answered over HTTP: nothing more will come. Still being answered: a short while to finish.
        if (socket.bytesWritten > 0 && socket.writableLength === 0) socket.destroy();
        else socket.setTimeout(closeGraceMs, destroyIdle);
      }
      await Promise.all([...open].map((stream) => stream.shutdown(closeGraceMs)));
      if (heartbeat !== undefined) clock.clearTimeout(heartbeat);
      heartbeat = undefined;
      await new Promise<void>((resolve) => app.websocketServer.close(() => resolve()));
    },
  });

  app.decorateRequest('streamEpoch', 0);
  const markEpoch = (request: FastifyRequest, _reply: unknown, done: HookHandlerDoneFunction) => {
    request.streamEpoch = streams.epoch();
    done();
  };

  app.route({
    method: 'GET',
    url: '/v1/agents/:agentId/metadata/stream',
    // The epoch first: a revocation while the token is checked refuses the stream.
    onRequest: [markEpoch, authenticate],
    preHandler: (request, _reply, done) => {
      const caller = request.caller;
      if (caller?.kind !== 'agent') return done(new HttpError(401, 'invalid agent token'));
      if (request.ws && !streams.hasRoom(caller.agentId)) {
        metrics.upgradesRefusedTotal.inc();
        return done(new HttpError(429, TOO_MANY_STREAMS));
      }
      done();
    },
    schema: {
      tags: ['ingest'],
      summary: 'Report an agent’s metadata over a WebSocket',
      description: DESCRIPTION,
      security: SECURITY.agent,
      params: AgentIdParams,
      response: {
        101: {
          description:
            'Switching Protocols: the WebSocket is open; reports and their answers are messages (see above).',
          type: 'null',
        },
        ...errors({
          400:
            '`agentId` is not a UUID. (A bad report is answered on the stream, with ' +
            '`{"seq": n, "error": "<the POST’s 400 message>"}`.)',
          401: 'No agent token, or an unknown one (the admin token is not an agent token).',
          403: 'The token belongs to another agent: `this token belongs to another agent`.',
          426: 'A GET without `Upgrade: websocket`.',
          429: `The agent has ${MAX_STREAMS_PER_AGENT} streams open on this replica already: \`${TOO_MANY_STREAMS}\`.`,
          431: HEADERS_TOO_LARGE,
          500: INTERNAL,
          503:
            'Shutting down (`shutting down: retry against another replica or later`), or the token could not ' +
            'be checked because the database is down.',
        }),
      },
    },
    handler: async (_request, reply) => {
      void reply.header('upgrade', 'websocket');
      throw new HttpError(426, 'this route is a WebSocket: send Connection: Upgrade and Upgrade: websocket');
    },
    wsHandler: (socket, request) => {
      // preHandler made sure of it.
      const agentId = (request.caller as { agentId: string }).agentId;
      upgrading.delete(request.raw.socket);
      context.validate ??= request.compileValidationSchema(StreamReport);
      const stream = new IngestStream(socket, request.raw.socket, agentId, context);
      const opened = streams.open(agentId, stream, request.streamEpoch);
      if (opened === 'revoked') return stream.close(REVOKED_CLOSE_CODE, REVOKED_CLOSE_REASON);
      if (opened === 'full') return stream.close(TOO_MANY_CLOSE_CODE, TOO_MANY_STREAMS);
      if (opened === 'unknown') return stream.close(TRY_AGAIN_CLOSE_CODE, TRY_AGAIN_CLOSE_REASON);
      open.add(stream);
      joinSchedule(stream);
      // Its token was checked while the service began to stop: it stops at once.
      if (shuttingDown) void stream.shutdown(closeGraceMs);
    },
  });
};

/** A socket silent for its timeout. */
function destroyIdle(this: Socket): void {
  this.destroy();
}
