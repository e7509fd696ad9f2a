// The `metabatch` command as a child process against a real database.

import { describe, expect, it } from 'vitest';
import { encodeAgentIdChunks } from '../src/agentIdChunks.js';
import { testDatabase } from './support/db.js';
import { CLI, run } from './support/process.js';

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

  it('database-url: prints the URL to give psql', async () => {
    const cli = run('node', [CLI, 'database-url'], { DATABASE_URL: db.url });
    expect((await cli.exited).code).toBe(0);
    expect(cli.stdout()).toBe(`${db.url}\n`);
  });

  it('agents create --json: prints one JSON line on stdout, logs on stderr only', async () => {
    const cli = run('node', [CLI, 'agents', 'create', '--name', 'json-1', '--key', 'cpu', '--json'], {
      DATABASE_URL: db.url,
      LOG_LEVEL: 'info',
    });
    expect((await cli.exited).code).toBe(0);
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
