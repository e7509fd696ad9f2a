// Connections cost a file descriptor each: an idle keep-alive connection is
// closed after DEFAULT_TIMEOUTS.keepAliveMs, a replica holding 10,000 idle
// connections still answers a fresh client, and past its file limit a
// replica refuses connections rather than the descriptors its flushes need.

import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { subscribe } from '../src/client.js';
import { openFileLimit } from '../src/connections.js';
import { DEFAULT_TIMEOUTS } from '../src/limits.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { CLI, freePort, run } from './support/process.js';
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

describe('the file limit', () => {
  it('reads the soft limit on open files from /proc', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-limits-'));
    const file = path.join(dir, 'limits');
    await fs.writeFile(
      file,
      'Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n',
    );
    expect(openFileLimit(file)).toBe(1024);
    await fs.writeFile(file, 'Max open files            unlimited            unlimited            files\n');
    expect(openFileLimit(file)).toBeUndefined();
    expect(openFileLimit(path.join(dir, 'absent'))).toBeUndefined();
    await fs.rm(dir, { recursive: true });
  });

  it('keeps descriptors for Postgres when clients open more connections than the file limit allows', async () => {
    const port = await freePort();
    const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-fds-'));
    // The replica under a file limit of 1,024, as a default Debian shell gives.
    const service = run('sh', ['-c', `ulimit -n 1024 && exec node "${CLI}" serve`], {
      DATABASE_URL: db.url,
      DATA_DIR: dataDir,
      PORT: String(port),
      ADMIN_TOKEN,
      FLUSH_INTERVAL_MS: '200',
    });
    const clients: ReturnType<typeof idleClient>[] = [];
    try {
      await service.waitFor(/metabatch listening on/, 60_000);
      expect(service.stdout() + service.stderr()).toMatch(
        /the file limit \(ulimit -n\) is 1024: at most 885 HTTP connections/,
      );
      const base = `http://127.0.0.1:${port}`;
      const created = await call(base, 'POST', '/v1/agents', ADMIN_TOKEN, { name: 'under-limit' });
      const { id, token } = created.body!;
      await call(base, 'PUT', `/v1/agents/${id}/metadata-definitions`, ADMIN_TOKEN, { definitions: [{ key: 'cpu' }] });

      // The agent's own connection, open before the flood.
      const agent = net.connect(port, '127.0.0.1');
      agent.on('error', () => undefined);
      await new Promise((resolve) => agent.once('connect', resolve));

      // 1,000 idle connections: more than 1,024 descriptors less the replica's own.
      for (let i = 0; i < 1000; i += 250) {
        const wave = Array.from({ length: 250 }, () => idleClient(port));
        await Promise.allSettled(wave.map((c) => c.answered));
        clients.push(...wave);
      }
      const held = clients.filter((c) => !c.socket.closed).length;
      expect(held).toBeLessThanOrEqual(885);

      // Its Postgres connections are cut: the next flush must open new ones, which needs descriptors.
      let announce!: () => void;
      const announced = new Promise<void>((resolve) => (announce = resolve));
      announcedListeners.push(
        await subscribe({
          databaseUrl: db.url,
          applicationName: 'test-listener',
          onBatch: (ids) => ids.includes(id!) && announce(),
        }),
      );
      await db.pool.query(
        `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND application_name IN ('metabatch', 'metabatch-listener') AND pid <> pg_backend_pid()`,
      );
      const body = JSON.stringify({ metadata: [{ key: 'cpu', value: 'flushed under the flood' }] });
      agent.write(
        `POST /v1/agents/${id}/metadata HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
          `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
      const answer = await new Promise<string>((resolve) =>
        agent.once('data', (chunk: Buffer) => resolve(chunk.toString())),
      );
      expect(answer).toMatch(/^HTTP\/1.1 202/);
      // Flushed and announced while the idle connections are still held (they close after 5 s).
      await within(announced, 4000, 'the flush under the flood');
      const { rows } = await db.pool.query<{ value: string }>(
        `SELECT value FROM workspace_agent_metadata WHERE workspace_agent_id = $1`,
        [id],
      );
      expect(rows[0]!.value).toBe('flushed under the flood');
      agent.destroy();
      await Promise.all(clients.map((c) => c.closed));
      const metrics = await (await fetch(`${base}/metrics`)).text();
      expect(Number(/^metabatch_http_connections_dropped_total (\d+)/m.exec(metrics)?.[1])).toBeGreaterThan(0);
    } finally {
      for (const c of clients) c.socket.destroy();
      for (const listener of announcedListeners.splice(0)) await listener.close();
      service.child.kill('SIGTERM');
      await service.exited;
      await fs.rm(dataDir, { recursive: true, force: true });
    }
  }, 90_000);
});

const announcedListeners: { close(): Promise<void> }[] = [];
