// POST /v1/agents/{agentId}/metadata: an agent reports; the batcher queues.
// 202 when every key was queued, 429 with Retry-After when some were refused.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { BatcherClosedError, type AddResult, type Batcher } from '../batcher.js';
import { MAX_ALL_KEYS_BYTES, normalizeReport } from '../report.js';
import type { Authenticate } from '../access.js';
import type { Clock } from '../clock.js';
import { HttpError } from '../errors.js';
import {
  AgentIdParams,
  BAD_BODY,
  Counts,
  errors,
  HEADERS_TOO_LARGE,
  INTERNAL,
  json,
  NOT_JSON,
  ReportMetadata,
  SECURITY,
  TOO_LARGE,
} from '../schemas.js';

// A property it does not know is refused, as a stream message's is (and as the admin routes' bodies are).
const ReportBody = Type.Object({ metadata: ReportMetadata }, { additionalProperties: false });

/** Where reports go: the Batcher; the benchmark's naive mode writes at once instead. */
export interface MetadataSink {
  add(...report: Parameters<Batcher['add']>): AddResult | Promise<AddResult>;
  readonly retryAfterSeconds: number;
  /** Writes what it holds; the plugin calls it once the server has stopped taking requests. */
  close(): Promise<unknown>;
}

export const ingestRoutes: FastifyPluginAsyncTypebox<{
  batcher: MetadataSink;
  authenticate: Authenticate;
  clock: Clock;
}> = async (app, { batcher, authenticate, clock }) => {
  // After the requests in flight have finished: drain, flush, retry until FINAL_FLUSH_TIMEOUT_MS.
  app.addHook('onClose', async () => {
    await batcher.close();
  });
  app.post(
    '/v1/agents/:agentId/metadata',
    {
      onRequest: authenticate,
      schema: {
        tags: ['ingest'],
        summary: 'Report an agent’s metadata',
        description:
          'Queues the reported keys for the next batch UPDATE (at the latest FLUSH_INTERVAL_MS later) and answers ' +
          'at once. Several reports of one key: the newest `collected_at` wins, a tie goes to the later arrival. ' +
          'Keys the agent never declared are counted and ignored. A report whose keys total over ' +
          `${MAX_ALL_KEYS_BYTES} bytes is refused whole (400), as is one with a bad \`collected_at\` or a NUL character.`,
        security: SECURITY.agent,
        params: AgentIdParams,
        body: ReportBody,
        response: {
          202: json('Every key was queued.', Counts),
          429: json(
            'Some keys were refused (`dropped`): the channel is full, or MAX_HELD_KEYS keys are held while ' +
              'flushes fail. Send those keys again after Retry-After.',
            Counts,
            {
              'retry-after': Type.Integer({
                minimum: 1,
                maximum: 30,
                description:
                  'Seconds to wait: 1 while flushes succeed, else the longest wait of the current retry backoff.',
              }),
            },
          ),
          ...errors({
            400:
              BAD_BODY +
              ' Also: keys over their total limit (`metadata keys of N bytes exceeded 6144 bytes`), a bad ' +
              '`collected_at`, an unknown property (`body must NOT have additional properties`). ' +
              'Nothing of the report is applied.',
            401: 'No agent token, or an unknown one (the admin token is not an agent token).',
            403: 'The token belongs to another agent: `this token belongs to another agent`.',
            413: TOO_LARGE,
            415: NOT_JSON,
            431: HEADERS_TOO_LARGE,
            500: INTERNAL,
            503:
              'Shutting down (`shutting down: retry against another replica or later`), or the token could not ' +
              'be checked because the database is down.',
          }),
        },
      },
    },
    async (request, reply) => {
      const caller = request.caller;
      if (caller?.kind !== 'agent') throw new HttpError(401, 'invalid agent token');
      const report = normalizeReport(request.body.metadata, clock.Date.now() * 1000);
      let result;
      try {
        result = await batcher.add(caller.agentId, report.keys, report.values, report.errors, report.collectedAtMicros);
      } catch (err) {
        if (err instanceof BatcherClosedError)
          throw new HttpError(503, 'shutting down: retry against another replica or later');
        throw err;
      }
      if (result.dropped > 0) {
        reply.header('retry-after', String(batcher.retryAfterSeconds));
        return reply.code(429).send(result);
      }
      return reply.code(202).send(result);
    },
  );
};
