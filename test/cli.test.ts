// The `metabatch` command as a child process against a real database.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { describe, expect, inject, it, onTestFinished } from 'vitest';
import { encodeAgentIdChunks } from '../src/agentIdChunks.js';
import { dropDatabase, recreateDatabase } from '../src/database.js';
import { testDatabase } from './support/db.js';
import { CLI, freePort, run } from './support/process.js';

const db = testDatabase();

describe('metabatch CLI', () => {
  it('migrate: says the schema is up to date', async () => {
    const cli = run('node', [CLI, 'migrate'], { DATABASE_URL: db.url, LOG_LEVEL: 'warn' });
    expect((await cli.exited).code).toBe(0);
    expect(cli.stdout()).toBe('schema is up to date\n');
  });

  it('agents create: prints the id and the token once, with the keys declared', async () => {
    const cli = run('node', [CLI, 'agents', 'create', '--name', 'web-9', '--key', 'cpu', '--key', 'mem'], {
      DATABASE_URL: db.url,
      LOG_LEVEL: 'warn',
    });
    expect((await cli.exited).code).toBe(0);
    const match = /^id: ([0-9a-f-]{36})\nname: web-9\ntoken: (mbt_\S+)\nkeys: cpu, mem\n$/.exec(cli.stdout());
    expect(match).not.toBeNull();
    const { rows } = await db.pool.query(
      `SELECT key FROM workspace_agent_metadata WHERE workspace_agent_id = $1 ORDER BY display_order`,
      [match![1]],
    );
    expect(rows.map((r) => r.key)).toEqual(['cpu', 'mem']);
    expect(cli.stderr()).toMatch(/shown only this once/);
  });

  it('database-url: prints DATABASE_URL when it is set', async () => {
    const cli = run('node', [CLI, 'database-url'], { DATABASE_URL: db.url });
    expect((await cli.exited).code).toBe(0);
    expect(cli.stdout()).toBe(`${db.url}\n`);
  });

  it('database-url: prints the URL of the embedded Postgres that a running serve uses, and psql-style clients can use it', async () => {
    const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-cli-'));
    const env = { DATA_DIR: dataDir, PORT: String(await freePort()), LOG_LEVEL: 'info' };
    // Without a service: it starts the embedded Postgres for the occasion, and stops it.
    const alone = run('node', [CLI, 'database-url'], env);
    expect((await alone.exited).code).toBe(0);
    expect(alone.stdout()).toMatch(/^postgres:\/\/postgres:[^@]+@127\.0\.0\.1:\d+\/metabatch\n$/);
    expect(alone.stderr()).toMatch(/"msg":"embedded Postgres started"/);
    expect(alone.stderr()).toMatch(/"msg":"embedded Postgres stopped"/);
    const serve = run('node', [CLI, 'serve'], env);
    try {
      await serve.waitFor(/metabatch listening on/, 60_000);
      const cli = run('node', [CLI, 'database-url'], env);
      expect((await cli.exited).code).toBe(0);
      // The same URL: the cluster keeps its port across restarts.
      expect(cli.stdout()).toBe(alone.stdout());
      expect(cli.stderr()).toBe('');
      const client = new pg.Client(cli.stdout().trim());
      await client.connect();
      try {
        const { rows } = await client.query(`SELECT count(*)::int AS n FROM metabatch_migrations`);
        expect(rows[0].n).toBeGreaterThan(0);
      } finally {
        await client.end();
      }
    } finally {
      serve.child.kill('SIGTERM');
      await serve.exited;
      await fs.rm(dataDir, { recursive: true, force: true });
    }
  }, 90_000);

  it('agents create --json: prints one JSON line on stdout, logs on stderr only', async () => {
    // An empty database: the command migrates it first, and logs that.
    const name = `cli_${randomBytes(4).toString('hex')}`;
    const url = await recreateDatabase(inject('serverUrl'), name);
    onTestFinished(() => dropDatabase(inject('serverUrl'), name));
    const cli = run('node', [CLI, 'agents', 'create', '--name', 'json-1', '--key', 'cpu', '--json'], {
      DATABASE_URL: url,
      LOG_LEVEL: 'info',
    });
    expect((await cli.exited).code).toBe(0);
    expect(cli.stdout().split('\n')).toHaveLength(2); // one line, then the final newline
    expect(cli.stderr()).toMatch(/^\{"level":30,.*"msg":"database migrated"\}$/m);
    const created = JSON.parse(cli.stdout());
    expect(created).toMatchObject({ name: 'json-1', keys: ['cpu'] });
    expect(created.token).toMatch(/^mbt_/);
  });

  it('agents create: refuses a missing --name with a usage line', async () => {
    const cli = run('node', [CLI, 'agents', 'create', '--key', 'cpu'], { DATABASE_URL: db.url });
    expect((await cli.exited).code).toBe(2);
    expect(cli.stderr()).toBe('metabatch: agents create needs --name N\n');
  });

  it('watch: prints a line per batch, and with --agent that agent’s metadata; Ctrl-C exits 0', async () => {
    const [agent, other] = await db.createAgents(2, ['cpu']);
    const watch = run('node', [CLI, 'watch', '--agent', agent!], { DATABASE_URL: db.url, LOG_LEVEL: 'warn' });
    try {
      await watch.waitFor(/listening on workspace_agent_metadata_batch/);
      await watch.waitFor(/ {2}cpu="" never reported\n/);
      await db.pool.query(
        `UPDATE workspace_agent_metadata SET value = '42%', collected_at = now() WHERE workspace_agent_id = $1`,
        [agent],
      );
      await db.pool.query(`SELECT pg_notify('workspace_agent_metadata_batch', $1)`, [
        encodeAgentIdChunks([agent!, other!])[0],
      ]);
      await watch.waitFor(new RegExp(`batch agents=2 ${agent} ${other}\\n`));
      await watch.waitFor(/ {2}cpu="42%" age=\d+s\n/);
      expect(watch.stdout()).toMatch(/^\d{4}-\d\d-\d\dT[\d:.]+Z batch agents=2 /m);
      watch.child.kill('SIGINT');
      expect((await watch.exited).code).toBe(0);
    } finally {
      if (watch.child.exitCode === null) watch.child.kill('SIGKILL');
    }
  });
});
