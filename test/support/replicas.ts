// Real `metabatch serve` processes on one test database, as replicas behind a
// load balancer: started before a file's tests, stopped (SIGTERM) after them.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import type { TestDatabase } from './db.js';
import { CLI, freePort, run, type Spawned } from './process.js';

export interface Replica {
  name: string;
  service: Spawned;
  /** http://127.0.0.1:<port> */
  base: string;
}

/**
 * One replica per name, each with a DATA_DIR and a port of its own and `env`
 * beyond DATABASE_URL, DATA_DIR and PORT. The array fills before the file's
 * tests run; a replica a test stopped already is not signalled again.
 */
export function replicasOf(db: TestDatabase, names: string[], env: Record<string, string>): Replica[] {
  const replicas: Replica[] = [];
  let dataDir: string;
  beforeAll(async () => {
    dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-replicas-'));
    for (const name of names) {
      const port = await freePort();
      const service = run('node', [CLI, 'serve'], {
        DATABASE_URL: db.url,
        DATA_DIR: path.join(dataDir, name),
        PORT: String(port),
        ...env,
      });
      replicas.push({ name, service, base: `http://127.0.0.1:${port}` });
    }
    await Promise.all(replicas.map((r) => r.service.waitFor(/metabatch listening on/, 60_000)));
  }, 90_000);
  afterAll(async () => {
    for (const { service } of replicas) if (service.child.exitCode === null) service.child.kill('SIGTERM');
    await Promise.all(replicas.map((r) => r.service.exited));
    await fs.rm(dataDir, { recursive: true, force: true });
  });
  return replicas;
}

/** A JSON request to a replica with a bearer token: its status, and its JSON body (none for a 204). */
export async function call(base: string, method: string, url: string, token: string, body?: unknown) {
  const res = await fetch(`${base}${url}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });
  return { status: res.status, body: res.status === 204 ? undefined : ((await res.json()) as Record<string, string>) };
}

/** One series' value from a replica's /metrics, by its name and labels as exposed (0 when it is not exposed). */
export async function replicaMetric(base: string, series: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? 0 : Number(line.slice(series.length + 1));
}
