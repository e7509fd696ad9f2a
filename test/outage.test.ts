// Nothing acknowledged is lost when Postgres goes away: during an outage
// under load, at shutdown with the database down (spill and replay), and on
// a second signal. Real service process, real Postgres stopped and started.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { EmbeddedPostgres } from '../src/embedded.js';
import { spillFiles } from '../src/spill.js';
import { createLogger } from '../src/logger.js';
import { CLI, freePort, run, type Spawned } from './support/process.js';

const ADMIN = 'outage-test-admin-token';
const log = createLogger('silent');
let root: string;

beforeAll(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-outage-'));
  // Reachable by the postgres OS user when running as root.
  await fs.chmod(root, 0o711);
});
afterAll(async () => {
  await fs.rm(root, { recursive: true, force: true });
});

/** A Postgres of the test's own that can be stopped and started on the same port. */
class Database {
  private instance: EmbeddedPostgres | undefined;
  url = '';
  constructor(
    private readonly dir: string,
    private readonly port: number,
  ) {}
  async start(): Promise<void> {
    this.instance = new EmbeddedPostgres({ dataDir: this.dir, log, port: this.port });
    this.url = await this.instance.start();
  }
  async stop(): Promise<void> {
    await this.instance?.stop();
  }
  async rows(agentId: string): Promise<Map<string, string>> {
    const client = new pg.Client(this.url);
    await client.connect();
    try {
      const { rows } = await client.query<{ key: string; value: string }>(
        'SELECT key, value FROM workspace_agent_metadata WHERE workspace_agent_id = $1',
        [agentId],
      );
      return new Map(rows.map((r) => [r.key, r.value]));
    } finally {
      await client.end();
    }
  }
}

async function setup(name: string, env: Record<string, string>) {
  const db = new Database(path.join(root, `${name}-pg`), await freePort());
  await db.start();
  const dataDir = path.join(root, `${name}-service`);
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const start = () =>
    run('node', [CLI, 'serve'], {
      DATABASE_URL: db.url,
      DATA_DIR: dataDir,
      PORT: String(port),
      ADMIN_TOKEN: ADMIN,
      ...env,
    });
  const service = start();
  await service.waitFor(/metabatch listening on/, 60_000);
  const call = async (method: string, url: string, token: string, body?: unknown) => {
    const res = await fetch(`${base}${url}`, {
      method,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: (await res.json()) as Record<string, string> };
  };
  const agent = (await call('POST', '/v1/agents', ADMIN, { name })).body;
  const keys = Array.from({ length: 16 }, (_, i) => `k${i}`);
  await call('PUT', `/v1/agents/${agent.id}/metadata-definitions`, ADMIN, {
    definitions: keys.map((key) => ({ key })),
  });
  return { db, dataDir, base, service, start, call, id: agent.id!, token: agent.token!, keys };
}

function kill(service: Spawned) {
  if (service.child.exitCode === null) service.child.kill('SIGKILL');
}

describe('database outages', () => {
  it('keeps taking reports while Postgres is down, answers /readyz 503, retries with backoff, and loses nothing', async () => {
    const s = await setup('outage', { FLUSH_INTERVAL_MS: '200' });
    try {
      const acknowledged = new Map<string, string>();
      let acceptedDuringOutage = 0;
      let outage = false;
      let running = true;
      const clients = Array.from({ length: 4 }, async (_, c) => {
        for (let round = 0; running; round++) {
          const metadata = s.keys.filter((_, i) => i % 4 === c).map((key) => ({ key, value: `${c}-${round}` }));
          const res = await s.call('POST', `/v1/agents/${s.id}/metadata`, s.token, { metadata });
          if (res.status !== 202) continue;
          for (const m of metadata) acknowledged.set(m.key, m.value);
          if (outage) acceptedDuringOutage++;
        }
      });
      await vi.waitFor(() => expect(acknowledged.size).toBe(16), { timeout: 10_000 });

      await s.db.stop();
      outage = true;
      await vi.waitFor(async () => expect((await fetch(`${s.base}/readyz`)).status).toBe(503), { timeout: 10_000 });
      await vi.waitFor(() => expect(acceptedDuringOutage).toBeGreaterThan(50), { timeout: 20_000 });
      const during = await (await fetch(`${s.base}/metrics`)).text();
      expect(during).toMatch(/^metabatch_database_up 0$/m);
      // The outage lasts until a retry has failed too (a loaded machine can take 50 reports before the second try).
      const flushErrors = async () =>
        Number(
          /^metabatch_metadata_flush_errors_total (\d+)$/m.exec(await (await fetch(`${s.base}/metrics`)).text())?.[1],
        );
      await vi.waitFor(async () => expect(await flushErrors()).toBeGreaterThanOrEqual(2), { timeout: 10_000 });

      await s.db.start();
      outage = false;
      await vi.waitFor(async () => expect((await fetch(`${s.base}/readyz`)).status).toBe(200), { timeout: 40_000 });
      running = false;
      await Promise.all(clients);
      const metrics = await (await fetch(`${s.base}/metrics`)).text();
      const retries = Number(/^metabatch_metadata_flush_errors_total (\d+)$/m.exec(metrics)?.[1]);
      expect(retries).toBeGreaterThanOrEqual(2);
      // Backoff: a 200 ms flush timer alone would have failed ~5 times a second.
      expect(retries).toBeLessThan(60);
      expect(metrics).toMatch(/^metabatch_database_up 1$/m);

      s.service.child.kill('SIGTERM');
      expect((await s.service.exited).code).toBe(0);
      expect(await s.db.rows(s.id)).toEqual(acknowledged);
    } finally {
      kill(s.service);
      await s.db.stop();
    }
  });

  it('spills what it holds when the database is down at shutdown, exits 1, and replays it at the next start', async () => {
    const s = await setup('spill', { FLUSH_INTERVAL_MS: '600000', FINAL_FLUSH_TIMEOUT_MS: '1500' });
    let restarted: Spawned | undefined;
    try {
      const metadata = s.keys.map((key) => ({ key, value: `held-${key}` }));
      expect((await s.call('POST', `/v1/agents/${s.id}/metadata`, s.token, { metadata })).status).toBe(202);
      await s.db.stop();
      s.service.child.kill('SIGTERM');
      expect((await s.service.exited).code).toBe(1);
      expect(s.service.stdout()).toMatch(/held metadata written to the spill file/);
      const files = await spillFiles(s.dataDir);
      expect(files).toHaveLength(1);
      const spill = JSON.parse(await fs.readFile(files[0]!, 'utf8'));
      expect(spill.entries).toHaveLength(16);

      await s.db.start();
      restarted = s.start();
      await restarted.waitFor(/metabatch listening on/, 60_000);
      expect(restarted.stdout()).toMatch(/"entries":16,.*replayed metadata spilled at an earlier shutdown/);
      expect(await spillFiles(s.dataDir)).toEqual([]);
      expect(await s.db.rows(s.id)).toEqual(new Map(metadata.map((m) => [m.key, m.value])));
      restarted.child.kill('SIGTERM');
      expect((await restarted.exited).code).toBe(0);
    } finally {
      kill(s.service);
      if (restarted) kill(restarted);
      await s.db.stop();
    }
  });

  it('skips straight to the spill on a second signal more than a second after the first', async () => {
    const s = await setup('second-signal', { FLUSH_INTERVAL_MS: '600000', FINAL_FLUSH_TIMEOUT_MS: '60000' });
    try {
      const metadata = s.keys.map((key) => ({ key, value: `v-${key}` }));
      expect((await s.call('POST', `/v1/agents/${s.id}/metadata`, s.token, { metadata })).status).toBe(202);
      await s.db.stop();
      s.service.child.kill('SIGTERM');
      await s.service.waitFor(/flushing metadata batch before exit/);
      // A repeat within a second is the same signal delivered twice: ignored.
      s.service.child.kill('SIGTERM');
      await new Promise((resolve) => setTimeout(resolve, 1100));
      expect(s.service.child.exitCode).toBeNull();
      const sentAt = Date.now();
      // A second and a third signal: the spill is written once, whole.
      s.service.child.kill('SIGTERM');
      s.service.child.kill('SIGTERM');
      expect((await s.service.exited).code).toBe(1);
      // It does not wait for the 60 s final flush; 5 s leaves room for a loaded machine.
      expect(Date.now() - sentAt).toBeLessThan(5000);
      expect(s.service.stdout().match(/second signal: held metadata written to the spill file/g)).toHaveLength(1);
      const files = await spillFiles(s.dataDir);
      expect(files).toHaveLength(1);
      const spill = JSON.parse(await fs.readFile(files[0]!, 'utf8'));
      expect(spill.entries.map((e: { value: string }) => e.value).sort()).toEqual(metadata.map((m) => m.value).sort());
    } finally {
      kill(s.service);
      await s.db.stop();
    }
  });
});
