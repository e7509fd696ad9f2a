// /healthz: the process answers. /readyz: it can take traffic (not shutting
// down, database reachable, flushes succeeding); it asks the database each
// time, and `metabatch_database_up` reads the same answer. /metrics:
// Prometheus.

import type { FastifyPluginAsync } from 'fastify';
import type { Registry } from 'prom-client';

export interface Readiness {
  /** Whether Postgres answers; `check()` asks it now. */
  database: { check(): Promise<boolean>; readonly error: string | undefined };
  /** True while batch UPDATEs fail and are being retried. */
  flushesFailing(): boolean;
}

export const healthRoutes: FastifyPluginAsync<{
  readiness: Readiness;
  registry: Registry;
  shuttingDown: () => boolean;
}> = async (app, { readiness, registry, shuttingDown }) => {
  app.get('/healthz', async () => ({ status: 'ok' }));

  app.get('/readyz', async (_request, reply) => {
    if (shuttingDown()) return reply.code(503).send({ status: 'shutting down', error: 'shutting down' });
    if (!(await readiness.database.check())) {
      const error = `database unreachable: ${readiness.database.error ?? 'no answer'}`;
      return reply.code(503).send({ status: 'database unreachable', error });
    }
    if (readiness.flushesFailing()) {
      return reply
        .code(503)
        .send({ status: 'degraded', error: 'database writes are failing; updates are held and retried' });
    }
    return { status: 'ready' };
  });

  app.get('/metrics', async (_request, reply) => {
    reply.header('content-type', registry.contentType);
    return registry.metrics();
  });
};
