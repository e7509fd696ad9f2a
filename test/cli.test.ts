// The `metabatch` command as a child process against a real database.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { describe, expect, inject, it, onTestFinished } from 'vitest';
import { encodeAgentIdChunks } from '../src/agentIdChunks.js';
import { dropDatabase, recreateDatabase } from '../src/database.js';
import { hashToken } from '../src/tokens.js';
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
    // As an operator would: the cluster's OS account (as root) traverses DATA_DIR (README, "The two commands").
    await fs.chmod(dataDir, 0o711);
    const env = { DATA_DIR: dataDir, PORT: String(await freePort()), LOG_LEVEL: 'info' };
    // Without a service: it starts the embedded Postgres for the occasion, and stops it.
    const alone = run('node', [CLI, 'database-url'], env);
    expect((await alone.exited).code).toBe(0);
    expect(alone.stdout()).toMatch(/^postgres:\/\/metabatch:[^@]+@127\.0\.0\.1:\d+\/metabatch\n$/);
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

  it('agents list, show, rotate-token and delete: tables for people, JSON with --json', async () => {
    const env = { DATABASE_URL: db.url, LOG_LEVEL: 'warn' };
    const cli = async (...args: string[]) => {
      const child = run('node', [CLI, 'agents', ...args], env);
      return { code: (await child.exited).code, stdout: child.stdout(), stderr: child.stderr() };
    };
    const prefix = `cli-${randomBytes(3).toString('hex')}`;
    const created = await Promise.all(
      ['a', 'b', 'c'].map(async (n) =>
        JSON.parse((await cli('create', '--name', `${prefix}-${n}`, '--key', 'cpu', '--json')).stdout),
      ),
    );
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET value = '7%', collected_at = now() - interval '3 seconds' WHERE workspace_agent_id = $1`,
      [created[0].id],
    );

    const page1 = await cli('list', '--name-prefix', prefix, '--limit', '2', '--json');
    expect(page1.code).toBe(0);
    const first = JSON.parse(page1.stdout);
    expect(first.agents.map((a: { name: string }) => a.name).sort()).toHaveLength(2);
    expect(first.next_cursor).toEqual(expect.any(String));
    const page2 = JSON.parse(
      (await cli('list', '--name-prefix', prefix, '--limit', '2', '--cursor', first.next_cursor, '--json')).stdout,
    );
    expect(page2.next_cursor).toBeUndefined();
    const listed = [...first.agents, ...page2.agents];
    expect(listed.map((a: { id: string }) => a.id).sort()).toEqual(created.map((a) => a.id).sort());
    expect(listed.find((a: { id: string }) => a.id === created[0].id)).toMatchObject({
      name: `${prefix}-a`,
      declared_keys: 1,
      last_reported_at: expect.stringMatching(/^\d{4}-/),
    });
    expect(listed.find((a: { id: string }) => a.id === created[1].id).last_reported_at).toBeNull();

    const human = await cli('list', '--name-prefix', prefix, '--limit', '2');
    expect(human.stdout.split('\n')[0]).toMatch(/^ID +NAME +CREATED +LAST REPORTED +KEYS$/);
    expect(human.stderr).toMatch(/^more: metabatch agents list --cursor \S+\n$/);

    const shown = await cli('show', created[0].id);
    expect(shown.stdout).toMatch(/^KEY +VALUE +AGE +ERROR$/m);
    // Reported 3 s before; the commands in between take a while on a loaded machine.
    expect(Number(/^cpu +7% +(\d+)s$/m.exec(shown.stdout)?.[1])).toBeGreaterThanOrEqual(3);
    expect(JSON.parse((await cli('show', created[0].id, '--json')).stdout).metadata[0]).toMatchObject({
      key: 'cpu',
      value: '7%',
      stale: false,
    });

    const rotated = await cli('rotate-token', created[1].id, '--json');
    const { token } = JSON.parse(rotated.stdout);
    expect(token).toMatch(/^mbt_/);
    expect(token).not.toBe(created[1].token);
    const { rows } = await db.pool.query(`SELECT token_hash FROM workspace_agents WHERE id = $1`, [created[1].id]);
    expect(rows[0].token_hash).toEqual(hashToken(token));

    expect(await cli('delete', created[2].id)).toMatchObject({ code: 0, stdout: `deleted ${created[2].id}\n` });
    expect(await cli('delete', created[2].id)).toMatchObject({
      code: 1,
      stderr: `metabatch: agent ${created[2].id} not found\n`,
    });
    expect(await cli('show', 'nope')).toMatchObject({
      code: 2,
      stderr: 'metabatch: the agent id must be a UUID (got "nope")\n',
    });
    expect((await cli('list', '--cursor', 'garbage')).stderr).toMatch(
      /^metabatch: --cursor: cursor is not one this service gave out/,
    );
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
