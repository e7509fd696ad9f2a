// /healthz: the process answers. /readyz: it can take traffic (not shutting
// down, database reachable, flushes succeeding); it asks the database each
// time, and `metabatch_database_up` reads the same answer. It answers anyone,
// so it names the reason's class only: the error itself (which can carry the
// database's address, its name, a user) goes to the log, once per change of
// state (health.ts, the batcher). /metrics: Prometheus.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { Registry } from 'prom-client';
import { errors, HEADERS_TOO_LARGE, json } from '../schemas.js';

export interface Readiness {
  /** Whether Postgres answers; `check()` asks it now. */
  database: { check(): Promise<boolean>; readonly error: string | undefined };
  /** True while batch UPDATEs fail and are being retried. */
  flushesFailing(): boolean;
}

const NotReady = Type.Object({
  status: Type.Union([Type.Literal('shutting down'), Type.Literal('database unreachable'), Type.Literal('degraded')]),
  error: Type.String(),
});

export const healthRoutes: FastifyPluginAsyncTypebox<{
  readiness: Readiness;
  registry: Registry;
  shuttingDown: () => boolean;
}> = async (app, { readiness, registry, shuttingDown }) => {
  app.get(
    '/healthz',
    {
      schema: {
        tags: ['operations'],
        summary: 'Liveness',
        description: 'Answers 200 while the process runs (shutting down included). No token.',
        response: {
          200: json('The process runs.', Type.Object({ status: Type.Literal('ok') })),
          ...errors({ 431: HEADERS_TOO_LARGE }),
        },
      },
    },
    async () => ({ status: 'ok' }) as const,
  );

  app.get(
    '/readyz',
    {
      schema: {
        tags: ['operations'],
        summary: 'Readiness',
        description:
          'Whether the service can take traffic: not shutting down, the database answers (it is pinged on each ' +
          'call) and batch UPDATEs succeed. No token.',
        response: {
          200: json('Ready.', Type.Object({ status: Type.Literal('ready') })),
          503: json(
            'Not ready; `error` says why, as a class: `shutting down`, `database unreachable`, or `database ' +
              'writes are failing` (Postgres answers but batch UPDATEs fail). The error itself is in the log.',
            NotReady,
          ),
          ...errors({ 431: HEADERS_TOO_LARGE }),
        },
      },
    },
    async (_request, reply) => {
      if (shuttingDown()) return reply.code(503).send({ status: 'shutting down', error: 'shutting down' });
      if (!(await readiness.database.check())) {
        return reply.code(503).send({ status: 'database unreachable', error: 'database unreachable' });
      }
      if (readiness.flushesFailing()) {
        return reply.code(503).send({ status: 'degraded', error: 'database writes are failing' });
      }
      return { status: 'ready' } as const;
    },
  );

  app.get(
    '/metrics',
    {
      schema: {
        tags: ['operations'],
        summary: 'Prometheus metrics',
        description: 'The service’s metrics (`metabatch_…`) in the Prometheus text format. No token.',
        response: {
          200: {
            description: 'The metrics.',
            content: { 'text/plain': { schema: Type.String({ description: 'Prometheus text exposition format.' }) } },
          },
          ...errors({ 431: HEADERS_TOO_LARGE }),
        },
      },
    },
    async (_request, reply) => {
      reply.header('content-type', registry.contentType);
      return registry.metrics();
    },
  );
};
