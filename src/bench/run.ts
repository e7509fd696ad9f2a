// `metabatch bench` / `npm run bench`: the service against the raw limits of
// its parts, measured side by side in one run on this machine, printed as a
// table and written as JSON (--json FILE). See README "Performance".
//
// This file only sets the stage and runs the scenarios, each a module of
// ./scenarios that measures (its section of the JSON) and prints its rows of
// the table. A new scenario is a new module there and one line below.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type pg from 'pg';
import { createPool, migrate, openDatabase, recreateDatabase } from '../database.js';
import { provisionAgents } from '../provision.js';
import { log, progress, type Agent, type Context, type Scenario } from './context.js';
import { parseOptions } from './options.js';
import { burst } from './scenarios/burst.js';
import { capacity } from './scenarios/capacity.js';
import { flush } from './scenarios/flush.js';
import { history } from './scenarios/history.js';
import { ingest } from './scenarios/ingest.js';
import { overload } from './scenarios/overload.js';
import { steady } from './scenarios/steady.js';
import { stream } from './scenarios/stream.js';
import { round } from './stats.js';
import { table, type Machine } from './table.js';

/** The raw limits: they run first, every time, in this order. */
const LIMITS: Scenario[] = [flush, ingest];
/** The scenarios --scenario picks from (all by default): they run next, in this order. */
const SCENARIOS: Scenario[] = [steady, burst, overload, history, stream, capacity];

export async function runBench(argv: string[]): Promise<number> {
  const options = parseOptions(
    argv,
    SCENARIOS.map((s) => s.name),
  );
  const started = Date.now();
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-bench-'));
  // Reachable by the embedded cluster's OS account when running as root.
  await fs.chmod(work, 0o711);
  const server = await openDatabase({
    databaseUrl: process.env.DATABASE_URL,
    dataDir: path.join(work, 'pg'),
    log,
    database: 'metabatch_bench',
  });
  try {
    // The embedded Postgres makes it, owned by the service's role (as the
    // service runs); a DATABASE_URL's server gets it made afresh.
    const databaseUrl = server.adminUrl ? server.url : await recreateDatabase(server.url, 'metabatch_bench');
    // The service's session settings (asynchronous commit), so the raw limits compare like with like.
    const pool = createPool(databaseUrl, log, { max: 4, asyncCommit: true });
    try {
      await migrate(pool, log);
      const version = (await pool.query<{ v: string }>(`SELECT current_setting('server_version') AS v`)).rows[0]!.v;
      progress(`provisioning ${options.agents} agents x ${options.keys} keys`);
      const keys = Array.from({ length: options.keys }, (_, i) => `key${i}`);
      const agentsFile = path.join(work, 'agents.json');
      const agents = await provision(pool, options.agents, keys, agentsFile);
      const probes = await provision(pool, 4, ['probe'], path.join(work, 'probes.json'));
      const adminUrl = server.adminUrl ?? server.url;
      const context: Context = { options, work, databaseUrl, adminUrl, pool, keys, agentsFile, agents, probes };

      const machine: Machine = {
        node: process.version,
        cpus: os.cpus().length,
        cpu: os.cpus()[0]?.model ?? '',
        memoryGb: round(os.totalmem() / 2 ** 30, 1),
        postgres: version,
        embedded: server.embedded,
      };
      // The JSON figures: machine, options, then one section per scenario, named after it.
      const report: Record<string, unknown> = { machine, options: { ...options, scenarios: [...options.scenarios] } };
      const picked = SCENARIOS.filter((scenario) => options.scenarios.has(scenario.name));
      const figures = new Map<Scenario, unknown>();
      for (const scenario of [...LIMITS, ...picked]) {
        figures.set(scenario, await scenario.run(context));
        report[scenario.name] = figures.get(scenario);
      }
      const seconds = round((Date.now() - started) / 1000, 1);
      report.seconds = seconds;
      // The table leads with ingest, then flush, then the scenarios in the order they ran.
      const rows = [ingest, flush, ...picked].flatMap((scenario) => scenario.rows(figures.get(scenario), options));
      process.stdout.write(`${table(machine, seconds, rows)}\n`);
      if (options.json) {
        await fs.writeFile(options.json, `${JSON.stringify(report, null, 2)}\n`);
        process.stdout.write(`figures written to ${options.json}\n`);
      }
    } finally {
      await pool.end();
    }
    return 0;
  } finally {
    await server.close();
    await fs.rm(work, { recursive: true, force: true });
  }
}

/** Agents with known tokens and declared keys, also written to `file` for the load generator. */
async function provision(pool: pg.Pool, count: number, keys: string[], file: string): Promise<Agent[]> {
  const agents = await provisionAgents(pool, count, keys, 'bench');
  await pool.query('VACUUM ANALYZE workspace_agent_metadata');
  await fs.writeFile(file, JSON.stringify(agents));
  return agents;
}
