// /healthz: the process answers. /readyz: it can take traffic (database
// reachable, flushes succeeding, not shutting down). /metrics: Prometheus.

import type { FastifyPluginAsync } from 'fastify';
import type { Registry } from 'prom-client';

export interface Health {
  /** Set when shutdown begins. */
  shuttingDown: boolean;
  /** Rejects when the database cannot be reached. */
  pingDatabase(): Promise<void>;
  /** False while batch UPDATEs fail and are being retried. */
  flushesSucceeding(): boolean;
}

export const healthRoutes: FastifyPluginAsync<{ health: Health; registry: Registry }> = async (
  app,
  { health, registry },
) => {
  app.get('/healthz', async () => ({ status: 'ok' }));

  app.get('/readyz', async (_request, reply) => {
    if (health.shuttingDown) return reply.code(503).send({ status: 'shutting down', error: 'shutting down' });
    if (!health.flushesSucceeding()) {
      return reply
        .code(503)
        .send({ status: 'degraded', error: 'database writes are failing; updates are held and retried' });
    }
    try {
      await health.pingDatabase();
    } catch (err) {
      return reply
        .code(503)
        .send({ status: 'database unreachable', error: `database unreachable: ${(err as Error).message}` });
    }
    return { status: 'ready' };
  });

  app.get('/metrics', async (_request, reply) => {
    reply.header('content-type', registry.contentType);
    return registry.metrics();
  });
};
