// Connections cost a file descriptor each: an idle keep-alive connection is
// closed after DEFAULT_TIMEOUTS.keepAliveMs, and a replica holding 10,000
// idle connections still answers a fresh client.

import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { DEFAULT_TIMEOUTS } from '../src/limits.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { call, replicasOf } from './support/replicas.js';
import { ADMIN_TOKEN, startTestService } from './support/service.js';

const db = testDatabase();
const appHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);
const replicas = replicasOf(db, ['a'], { ADMIN_TOKEN });

/** A keep-alive connection that asks for /healthz once and then says nothing: resolves once answered. */
function idleClient(port: number): { answered: Promise<void>; closed: Promise<void>; socket: net.Socket } {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  const answered = new Promise<void>((resolve, reject) => {
    socket.once('connect', () => socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n'));
    socket.once('data', (chunk: Buffer) =>
      chunk.toString().startsWith('HTTP/1.1 200') ? resolve() : reject(new Error(chunk.toString())),
    );
    socket.once('close', () => reject(new Error('closed before the answer')));
  });
  return { answered, closed, socket };
}

/** Rejects once `ms` have passed: the bound a promise must settle within. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

describe('idle connections', () => {
  it('closes a keep-alive connection that stays silent after its answer, after keepAliveMs', async () => {
    const h = await appHarness({ timeouts: { keepAliveMs: 200 } });
    const client = idleClient(Number(new URL(h.base).port));
    await client.answered;
    // Node's default (and Fastify's) keeps it for 72 s: this would time out.
    await within(client.closed, 5000, 'closing an idle keep-alive connection');
  });

  it('keeps the default within the README promise that no connection stays silent for 30 s', () => {
    expect(DEFAULT_TIMEOUTS.keepAliveMs).toBeLessThanOrEqual(5000);
    expect(DEFAULT_TIMEOUTS.idleMs).toBeLessThanOrEqual(30_000);
  });

  it('answers a fresh client while 10,000 idle connections are held, and closes them all within 30 s', async () => {
    const base = replicas[0]!.base;
    const port = Number(new URL(base).port);
    const created = await call(base, 'POST', '/v1/agents', ADMIN_TOKEN, { name: 'fresh' });
    expect(created.status).toBe(201);
    const { id, token } = created.body!;
    const defined = await call(base, 'PUT', `/v1/agents/${id}/metadata-definitions`, ADMIN_TOKEN, {
      definitions: [{ key: 'cpu' }],
    });
    expect(defined.status).toBe(200);

    const clients: ReturnType<typeof idleClient>[] = [];

    // Opened 500 at a time: the listen backlog is 511.
    for (let i = 0; i < 10_000; i += 500) {
      const wave = Array.from({ length: 500 }, () => idleClient(port));
      await Promise.all(wave.map((c) => c.answered));
      clients.push(...wave);
    }
    const heldSince = Date.now();

    expect((await fetch(`${base}/healthz`)).status).toBe(200);
    const posted = await call(base, 'POST', `/v1/agents/${id}/metadata`, token!, {
      metadata: [{ key: 'cpu', value: '12%' }],
    });
    expect(posted.status).toBe(202);
    // Opening them takes ~1.2 s here, against a 5 s keep-alive: (nearly) all were held at once.
    expect(clients.filter((c) => !c.socket.closed).length).toBeGreaterThanOrEqual(9000);

    // Every idle connection is closed by the server; with a 72 s keep-alive they would outlive the bound.
    await within(
      Promise.all(clients.map((c) => c.closed)),
      30_000 - (Date.now() - heldSince),
      'closing 10,000 idle connections',
    );
  }, 90_000);
});
