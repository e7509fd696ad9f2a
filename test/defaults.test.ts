// Safe defaults (issue 15, finding 11): the embedded Postgres runs as an OS
// account of its own, the service connects as a role that owns its tables
// and is no superuser (and says so when a DATABASE_URL is one), start-up
// never loosens an existing DATA_DIR and writes its files 0600, and an
// unauthenticated /readyz names the reason's class, never the database's
// address or error.

import { execFileSync } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterEach, describe, expect, inject, it, vi } from 'vitest';
import { emptyBatch } from '../src/batch.js';
import { loadConfig } from '../src/config.js';
import { databaseUrlFor } from '../src/database.js';
import { CLUSTER_ACCOUNT, EmbeddedPostgres, SERVICE_ROLE } from '../src/embedded.js';
import { createLogger } from '../src/logger.js';
import { startService, type Service } from '../src/main.js';
import { provisionAgents } from '../src/provision.js';
import { Spill } from '../src/spill.js';
import { testDatabase } from './support/db.js';
import { outage } from './support/faults.js';
import { ADMIN_TOKEN, startTestService } from './support/service.js';

const db = testDatabase();
const root = process.getuid?.() === 0;

interface LogLine {
  level: number;
  msg: string;
  err?: { message?: string };
  [key: string]: unknown;
}

/** A logger that keeps every line, and the lines. */
function capturingLogger() {
  const lines: LogLine[] = [];
  const log = createLogger('info', { write: (line: string) => void lines.push(JSON.parse(line) as LogLine) });
  return { log, lines };
}

// What each test made: services to stop, directories to remove.
const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => undefined);
});

/** A DATA_DIR path that does not exist yet, removed after the test with the cluster it may point to. */
function newDataDir(): string {
  const dir = path.join(os.tmpdir(), `metabatch-defaults-${randomBytes(6).toString('hex')}`);
  cleanups.push(() => removeDataDir(dir));
  return dir;
}

async function removeDataDir(dir: string): Promise<void> {
  const elsewhere = await fs.readFile(path.join(dir, 'POSTGRES_LOCATION'), 'utf8').catch(() => undefined);
  if (elsewhere) await fs.rm(elsewhere.trim(), { recursive: true, force: true });
  await fs.rm(dir, { recursive: true, force: true });
}

/** `npm start` without DATABASE_URL: the embedded Postgres under `dataDir`. */
async function startEmbedded(dataDir: string): Promise<{ service: Service; lines: LogLine[] }> {
  const { log, lines } = capturingLogger();
  const config = loadConfig({ DATA_DIR: dataDir, HOST: '127.0.0.1', PORT: '0', ADMIN_TOKEN });
  const service = await startService(config, log);
  cleanups.push(() => service.stop());
  return { service, lines };
}

async function query<T extends pg.QueryResultRow>(url: string, sql: string, params: unknown[] = []): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(sql, params)).rows;
  } finally {
    await client.end();
  }
}

/** Who the service's statements run as, and who owns what it uses. */
async function privileges(url: string) {
  const [role] = await query<{ name: string; superuser: boolean; createdb: boolean; createrole: boolean }>(
    url,
    `SELECT rolname AS name, rolsuper AS superuser, rolcreatedb AS createdb, rolcreaterole AS createrole
       FROM pg_roles WHERE rolname = current_user`,
  );
  const owners = await query<{ name: string; owner: string }>(
    url,
    `SELECT tablename AS name, tableowner AS owner FROM pg_tables WHERE schemaname = 'public'
     UNION ALL SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()
     ORDER BY 1`,
  );
  return { role, owners };
}

/** The files (not directories) directly under `dir` whose mode lets anyone but the owner in. */
async function openFiles(dir: string): Promise<string[]> {
  const open: string[] = [];
  for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const { mode } = await fs.stat(path.join(dir, entry.name));
    if ((mode & 0o077) !== 0) open.push(`${entry.name} ${(mode & 0o777).toString(8)}`);
  }
  return open;
}

/** Where the cluster of `dataDir` lives: DATA_DIR, or where POSTGRES_LOCATION says. */
async function clusterHome(dataDir: string): Promise<string> {
  const elsewhere = await fs.readFile(path.join(dataDir, 'POSTGRES_LOCATION'), 'utf8').catch(() => undefined);
  return elsewhere?.trim() ?? dataDir;
}

/** The uid the postmaster of the cluster under `home` runs as. */
async function postmasterUid(home: string): Promise<number> {
  const pid = (await fs.readFile(path.join(home, 'postgres', 'postmaster.pid'), 'utf8')).split('\n')[0]!;
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/^Uid:\s+(\d+)/m.exec(status)![1]);
}

function uidOf(user: string): number | undefined {
  try {
    return Number(execFileSync('id', ['-u', user], { encoding: 'utf8' }).trim());
  } catch {
    return undefined;
  }
}

/** The service's role is SERVICE_ROLE, no superuser, and owns the database `database` and every table. */
const expectServiceRole = async (url: string, database = 'metabatch') => {
  const { role, owners } = await privileges(url);
  expect(role).toEqual({ name: SERVICE_ROLE, superuser: false, createdb: false, createrole: false });
  expect(owners.map((row) => row.name)).toEqual(
    expect.arrayContaining([database, 'metabatch_migrations', 'workspace_agent_metadata', 'workspace_agents']),
  );
  expect(owners.filter((row) => row.owner !== SERVICE_ROLE)).toEqual([]);
};

describe('the embedded Postgres, as `npm start` runs it', () => {
  it('from a fresh DATA_DIR: the service connects as a role that owns its tables and is no superuser; files are 0600', async () => {
    const dataDir = newDataDir();
    const { service, lines } = await startEmbedded(dataDir);
    await expectServiceRole(service.databaseUrl);
    expect(lines.filter((line) => /superuser/.test(line.msg))).toEqual([]);
    // The LISTEN connection is the same role's.
    const listeners = await query<{ role: string }>(
      service.databaseUrl,
      `SELECT usename AS role FROM pg_stat_activity WHERE application_name = 'metabatch-listener'`,
    );
    expect(listeners.map((row) => row.role)).toEqual([SERVICE_ROLE]);
    const home = await clusterHome(dataDir);
    await service.stop();
    expect(await openFiles(dataDir)).toEqual([]);
    expect(await openFiles(home)).toEqual([]);
    // Made here: traversable (by the cluster's account, as root), never listable or readable by others.
    expect((await fs.stat(dataDir)).mode & 0o777).toBe(root ? 0o711 : 0o700);
  }, 60_000);

  it.runIf(root)(
    'runs the cluster as an OS account of its own, not the postgres of a system Postgres',
    async () => {
      const dataDir = newDataDir();
      await startEmbedded(dataDir);
      const uid = await postmasterUid(await clusterHome(dataDir));
      expect(uid).toBe(uidOf(CLUSTER_ACCOUNT));
      expect(uid).not.toBe(uidOf('postgres'));
      // A system account without a login shell.
      const entry = execFileSync('getent', ['passwd', CLUSTER_ACCOUNT], { encoding: 'utf8' }).trim().split(':');
      expect(entry.at(-1)).toMatch(/nologin|false/);
    },
    60_000,
  );

  it.runIf(root)(
    'never loosens an existing DATA_DIR; what it writes there is 0600',
    async () => {
      const dataDir = newDataDir();
      await fs.mkdir(dataDir, { mode: 0o700 });
      await fs.chmod(dataDir, 0o700);
      // Something the operator keeps there, readable through a loosened directory.
      await fs.writeFile(path.join(dataDir, 'notes.txt'), 'private\n', { mode: 0o644 });
      const { service, lines } = await startEmbedded(dataDir);
      expect((await fs.stat(dataDir)).mode & 0o777).toBe(0o700);
      // The cluster's account cannot reach a 0700 DATA_DIR: the cluster lives elsewhere, and the log says so.
      expect(lines.some((line) => /not reachable by the metabatch-pg OS user/.test(line.msg))).toBe(true);
      await expectServiceRole(service.databaseUrl);
      const spilled = emptyBatch();
      spilled.agentIds.push(randomUUID());
      spilled.keys.push('cpu');
      spilled.values.push('1');
      spilled.errors.push('');
      spilled.collectedAtMicros.push(Date.now() * 1000);
      await new Spill(dataDir).write(spilled);
      await service.stop();
      expect((await fs.stat(dataDir)).mode & 0o777).toBe(0o700);
      expect(await openFiles(dataDir)).toEqual(['notes.txt 644']);
      expect(await openFiles(await clusterHome(dataDir))).toEqual([]);
    },
    60_000,
  );

  it.runIf(root)(
    'upgrades a DATA_DIR made by the previous release: the role is made, the cluster changes hands, data stays',
    async () => {
      const dataDir = newDataDir();
      const first = await startEmbedded(dataDir);
      const pool = new pg.Pool({ connectionString: first.service.databaseUrl, max: 1 });
      const [agent] = await provisionAgents(pool, 1, ['cpu']);
      await pool.end();
      await first.service.stop();

      // What the previous release left: tables and database of the superuser,
      // no service role, a cluster of the `postgres` OS account, 0644 files.
      const embedded = new EmbeddedPostgres({ dataDir, log: createLogger('silent') });
      await embedded.start();
      const admin = embedded.adminUrl;
      const postgresRole = `ALTER TABLE %s OWNER TO postgres`;
      for (const table of ['workspace_agents', 'workspace_agent_metadata', 'metabatch_migrations']) {
        await query(admin, postgresRole.replace('%s', table));
      }
      await query(databaseUrlFor(admin, 'postgres'), `ALTER DATABASE metabatch OWNER TO postgres`);
      await query(databaseUrlFor(admin, 'postgres'), `DROP ROLE ${SERVICE_ROLE}`);
      await embedded.stop();
      if (uidOf('postgres') === undefined)
        execFileSync('useradd', ['--system', '-M', '-s', '/usr/sbin/nologin', 'postgres']);
      execFileSync('chown', ['-R', 'postgres:', path.join(dataDir, 'postgres')]);
      await fs.rm(path.join(dataDir, 'service-password'));
      for (const file of ['postgres.log', 'postgres-port']) await fs.chmod(path.join(dataDir, file), 0o644);

      const second = await startEmbedded(dataDir);
      await expectServiceRole(second.service.databaseUrl);
      const agents = await query<{ id: string }>(second.service.databaseUrl, 'SELECT id FROM workspace_agents');
      expect(agents.map((row) => row.id)).toEqual([agent!.id]);
      // The service writes as before: the agent's report reaches the table.
      const res = await second.service.app.inject({
        method: 'POST',
        url: `/v1/agents/${agent!.id}/metadata`,
        headers: { authorization: `Bearer ${agent!.token}` },
        payload: { metadata: [{ key: 'cpu', value: '7', collected_at: new Date().toISOString() }] },
      });
      expect(res.statusCode).toBe(202);
      expect(await postmasterUid(dataDir)).toBe(uidOf(CLUSTER_ACCOUNT));
      // The final flush at stop writes it.
      await second.service.stop();
      const again = new EmbeddedPostgres({ dataDir, log: createLogger('silent') });
      cleanups.push(() => again.stop());
      const rows = await query<{ value: string }>(await again.start(), 'SELECT value FROM workspace_agent_metadata');
      expect(rows.map((row) => row.value)).toEqual(['7']);
      await again.stop();
      expect(await openFiles(dataDir)).toEqual([]);
    },
    90_000,
  );
});

describe('a DATABASE_URL of the operator', () => {
  it('is warned about at start when its role is a superuser', async () => {
    const superuser = capturingLogger();
    const asSuperuser = await startTestService(db, {
      env: { DATABASE_URL: databaseUrlFor(inject('serverUrl'), db.name) },
      logger: superuser.log,
    });
    cleanups.push(() => asSuperuser.close());
    const warnings = superuser.lines.filter((line) => line.level === 40 && /a superuser/.test(line.msg));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]!.msg).toMatch(/README, "Postgres"/);
  });

  it.runIf(inject('serviceUrl') !== inject('serverUrl'))(
    'is not warned about when its role owns the tables without being a superuser (what the tests run as)',
    async () => {
      const owner = capturingLogger();
      const h = await startTestService(db, { logger: owner.log });
      cleanups.push(() => h.close());
      await expectServiceRole(h.service.databaseUrl, db.name);
      expect(owner.lines.filter((line) => /superuser/.test(line.msg))).toEqual([]);
    },
  );
});

describe('/readyz', () => {
  it('tells anyone the reason class, never the database error; the log has it, once per change of state', async () => {
    const { log, lines } = capturingLogger();
    const h = await startTestService(db, { logger: log });
    cleanups.push(() => h.close());
    const restore = await outage(db);
    try {
      h.clock.tick(5000);
      await vi.waitFor(async () => expect(await h.metric('metabatch_database_up')).toBe(0));
      for (let probe = 0; probe < 3; probe++) {
        const ready = await h.app.inject({ url: '/readyz' });
        expect(ready.statusCode).toBe(503);
        expect(ready.json()).toEqual({ status: 'database unreachable', error: 'database unreachable' });
        // What the service knows of the failure (here: the database's name in Postgres's refusal).
        const detail = h.service.health.error!;
        expect(detail).toMatch(/\w/);
        expect(ready.body).not.toContain(detail);
        expect(ready.body).not.toContain(db.name);
      }
    } finally {
      await restore();
    }
    expect((await h.app.inject({ url: '/readyz' })).statusCode).toBe(200);
    const down = lines.filter((line) => line.msg === 'database unreachable');
    expect(down).toHaveLength(1);
    expect(down[0]!.err?.message).toMatch(/\w/);
    expect(lines.filter((line) => line.msg === 'database reachable again')).toHaveLength(1);
  });
});
