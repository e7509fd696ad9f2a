// The raw Fastify limit: the same route and body as the ingest route, with
// Fastify's own JSON parsing, and nothing else (no auth, no validation, no
// batching). Prints "listening <url>".

import Fastify from 'fastify';

const app = Fastify({ logger: false });
app.post<{ Body: { metadata: unknown[] } }>('/v1/agents/:agentId/metadata', async (request, reply) =>
  reply.code(202).send({ accepted: request.body.metadata.length, dropped: 0 }),
);
const address = await app.listen({ host: '127.0.0.1', port: Number(process.env.PORT ?? 0) });
process.stdout.write(`listening ${address}\n`);
process.on('SIGTERM', () => void app.close().then(() => process.exit(0)));
