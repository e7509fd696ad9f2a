// POST /v1/agents/{agentId}/metadata: an agent reports; the batcher queues.
// 202 when every key was queued, 429 with Retry-After when some were refused.

import type { FastifyPluginAsync } from 'fastify';
import { BatcherClosedError, type AddResult, type Batcher } from '../batcher.js';
import { MAX_ALL_KEYS_BYTES, MAX_KEY_CHARS, normalizeReport, type ReportItem } from '../report.js';
import type { Authenticate } from '../access.js';
import type { Clock } from '../clock.js';
import { HttpError } from '../errors.js';

const reportSchema = {
  type: 'object',
  required: ['metadata'],
  properties: {
    metadata: {
      type: 'array',
      // Each key is at least one byte, so more items than this always exceed the key limit.
      maxItems: MAX_ALL_KEYS_BYTES,
      items: {
        type: 'object',
        required: ['key'],
        properties: {
          key: { type: 'string', minLength: 1, maxLength: MAX_KEY_CHARS },
          value: { type: 'string' },
          error: { type: 'string' },
          collected_at: { type: 'string' },
        },
      },
    },
  },
} as const;

/** Where reports go: the Batcher; the benchmark's naive mode writes at once instead. */
export interface MetadataSink {
  add(...report: Parameters<Batcher['add']>): AddResult | Promise<AddResult>;
  readonly retryAfterSeconds: number;
  /** Writes what it holds; the plugin calls it once the server has stopped taking requests. */
  close(): Promise<unknown>;
}

const countsSchema = {
  type: 'object',
  properties: { accepted: { type: 'integer' }, dropped: { type: 'integer' } },
} as const;

export const ingestRoutes: FastifyPluginAsync<{
  batcher: MetadataSink;
  authenticate: Authenticate;
  clock: Clock;
}> = async (app, { batcher, authenticate, clock }) => {
  // After the requests in flight have finished: drain, flush, retry until FINAL_FLUSH_TIMEOUT_MS.
  app.addHook('onClose', async () => {
    await batcher.close();
  });
  app.post<{ Params: { agentId: string }; Body: { metadata: ReportItem[] } }>(
    '/v1/agents/:agentId/metadata',
    { onRequest: authenticate, schema: { body: reportSchema, response: { '2xx': countsSchema, 429: countsSchema } } },
    async (request, reply) => {
      const caller = request.caller;
      if (caller?.kind !== 'agent') throw new HttpError(401, 'invalid agent token');
      const report = normalizeReport(request.body.metadata, new Date(clock.Date.now()));
      let result;
      try {
        result = await batcher.add(caller.agentId, report.keys, report.values, report.errors, report.collectedAts);
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
