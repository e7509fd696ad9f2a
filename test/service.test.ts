// The service as a user runs it: `npm start` on a bare machine (embedded
// Postgres), real HTTP, real signals, and what is in the table afterwards.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { subscribe } from '../src/client.js';
import { EmbeddedPostgres } from '../src/embedded.js';
import { createLogger } from '../src/logger.js';
import { CLI, freePort, run, type Spawned } from './support/process.js';

const ADMIN = 'service-test-admin-token';
let dataDir: string;

beforeAll(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-service-'));
  // As an operator would: the cluster's OS account (as root) traverses DATA_DIR (README, "The two commands").
  await fs.chmod(dataDir, 0o711);
});
afterAll(async () => {
  await fs.rm(dataDir, { recursive: true, force: true });
});

async function api(base: string, method: string, url: string, token: string, body?: unknown) {
  const res = await fetch(`${base}${url}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function query<T extends pg.QueryResultRow>(dir: string, sql: string, params: unknown[] = []): Promise<T[]> {
  const embedded = new EmbeddedPostgres({ dataDir: dir, log: createLogger('silent') });
  const url = (await embedded.runningUrl()) ?? (await embedded.start());
  const client = new pg.Client(url);
  await client.connect();
  try {
    return (await client.query<T>(sql, params)).rows;
  } finally {
    await client.end();
    await embedded.stop();
  }
}

describe('npm start with an embedded Postgres', () => {
  it('answers /readyz, takes reports, NOTIFYs, and on SIGTERM to its process group flushes every acknowledged key before it exits', async () => {
    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    const service = run(
      'npm',
      ['start', '--silent'],
      {
        DATA_DIR: dataDir,
        PORT: String(port),
        ADMIN_TOKEN: ADMIN,
        // Nothing flushes on the timer: only the shutdown flush can save the values.
        FLUSH_INTERVAL_MS: '600000',
      },
      { detached: true },
    );
    try {
      await service.waitFor(/metabatch listening on/, 60_000);
      expect((await fetch(`${base}/readyz`)).status).toBe(200);

      const created = await api(base, 'POST', '/v1/agents', ADMIN, { name: 'web-1' });
      expect(created.status).toBe(201);
      const id = created.body.id as string;
      const token = created.body.token as string;
      const keys = Array.from({ length: 20 }, (_, i) => `key${i}`);
      expect(
        (
          await api(base, 'PUT', `/v1/agents/${id}/metadata-definitions`, ADMIN, {
            definitions: keys.map((key) => ({ key })),
          })
        ).status,
      ).toBe(200);

      // A real LISTEN on the service's database, as psql would do.
      const embedded = new EmbeddedPostgres({ dataDir, log: createLogger('silent') });
      const url = await embedded.runningUrl();
      expect(url).toBeDefined();
      const received: string[][] = [];
      const listener = await subscribe({ databaseUrl: url!, onBatch: (ids) => received.push(ids) });

      const acknowledged = new Map<string, string>();
      for (let round = 0; round < 30; round++) {
        const metadata = keys.map((key) => ({ key, value: `${key}-round-${round}` }));
        const res = await api(base, 'POST', `/v1/agents/${id}/metadata`, token, { metadata });
        expect(res.status).toBe(202);
        for (const m of metadata) acknowledged.set(m.key, m.value);
      }
      // As Ctrl-C or a process manager would: the whole group. npm itself
      // dies of the signal at once; the service finishes its flush and exits.
      process.kill(-service.child.pid!, 'SIGTERM');
      await service.closed;
      expect(service.stdout()).toMatch(/"flushed":true,"msg":"stopped"/);
      expect(service.stdout()).not.toMatch(/exiting at once/);
      // The shutdown flush was announced before the service stopped.
      await listener.close();
      expect(received.flat()).toContain(id);

      const rows = await query<{ key: string; value: string }>(
        dataDir,
        'SELECT key, value FROM workspace_agent_metadata WHERE workspace_agent_id = $1',
        [id],
      );
      expect(new Map(rows.map((r) => [r.key, r.value]))).toEqual(acknowledged);
    } finally {
      if (service.child.exitCode === null) process.kill(-service.child.pid!, 'SIGKILL');
    }
  });

  it('exits 0 on SIGTERM in the middle of load, with every key answered 202 in the table', async () => {
    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    const service = run('node', [CLI, 'serve'], {
      DATA_DIR: dataDir,
      PORT: String(port),
      ADMIN_TOKEN: ADMIN,
      FLUSH_INTERVAL_MS: '600000',
    });
    try {
      await service.waitFor(/metabatch listening on/, 60_000);
      const created = await api(base, 'POST', '/v1/agents', ADMIN, { name: 'load' });
      const id = created.body.id as string;
      const token = created.body.token as string;
      const keys = Array.from({ length: 50 }, (_, i) => `k${i}`);
      await api(base, 'PUT', `/v1/agents/${id}/metadata-definitions`, ADMIN, {
        definitions: keys.map((key) => ({ key })),
      });
      const acknowledged = new Map<string, string>();
      let refused = 0;
      // Eight clients post without pause; the signal lands mid-stream.
      const clients = Array.from({ length: 8 }, async (_, c) => {
        for (let round = 0; round < 10_000; round++) {
          const metadata = keys.filter((_, i) => i % 8 === c).map((key) => ({ key, value: `${round}` }));
          let res: Response;
          try {
            res = await fetch(`${base}/v1/agents/${id}/metadata`, {
              method: 'POST',
              headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
              body: JSON.stringify({ metadata }),
            });
          } catch {
            return; // the server has closed its socket
          }
          if (res.status !== 202) {
            refused++;
            return;
          }
          for (const m of metadata) acknowledged.set(m.key, m.value);
        }
      });
      await vi.waitFor(() => expect(acknowledged.size).toBe(50), { timeout: 10_000 });
      service.child.kill('SIGTERM');
      await Promise.all(clients);
      const { code } = await service.exited;
      expect(code).toBe(0);
      expect(acknowledged.size).toBe(50);
      const rows = await query<{ key: string; value: string }>(
        dataDir,
        'SELECT key, value FROM workspace_agent_metadata WHERE workspace_agent_id = $1',
        [id],
      );
      expect(new Map(rows.map((r) => [r.key, r.value]))).toEqual(acknowledged);
      expect(refused).toBeLessThanOrEqual(8);
    } finally {
      if (service.child.exitCode === null) service.child.kill('SIGKILL');
    }
  });

  it('recovers the embedded Postgres left running by a service killed with -9', async () => {
    const port = await freePort();
    const env = { DATA_DIR: dataDir, PORT: String(port) };
    const first = run('node', [CLI, 'serve'], env);
    await first.waitFor(/metabatch listening on/, 60_000);
    first.child.kill('SIGKILL');
    await first.exited;
    let second: Spawned | undefined;
    try {
      second = run('node', [CLI, 'serve'], env);
      await second.waitFor(/metabatch listening on/, 60_000);
      expect(second.stdout()).toMatch(/stopping an embedded Postgres left running by an earlier run/);
      // Postgres comes back on the port it had, so a saved database URL keeps working.
      const pgPort = (out: string) => /"port":(\d+),"msg":"embedded Postgres started"/.exec(out)?.[1];
      expect(pgPort(second.stdout())).toBeDefined();
      expect(pgPort(second.stdout())).toBe(pgPort(first.stdout()));
      expect((await fetch(`http://127.0.0.1:${port}/readyz`)).status).toBe(200);
      second.child.kill('SIGINT');
      expect((await second.exited).code).toBe(0);
    } finally {
      if (second && second.child.exitCode === null) second.child.kill('SIGKILL');
    }
  });

  it('refuses to start a second service on a DATA_DIR in use, saying which process holds it', async () => {
    const env = { DATA_DIR: dataDir, PORT: String(await freePort()) };
    const first = run('node', [CLI, 'serve'], env);
    try {
      await first.waitFor(/metabatch listening on/, 60_000);
      const second = run('node', [CLI, 'serve'], { ...env, PORT: String(await freePort()) });
      const { code } = await second.exited;
      expect(code).toBe(1);
      expect(second.stderr()).toMatch(
        new RegExp(`another metabatch process \\(pid ${first.child.pid}\\) runs the embedded Postgres`),
      );
      first.child.kill('SIGTERM');
      expect((await first.exited).code).toBe(0);
    } finally {
      if (first.child.exitCode === null) first.child.kill('SIGKILL');
    }
  });
});
