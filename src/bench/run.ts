// `metabatch bench` / `npm run bench`: the service against the raw limits of
// its parts, measured side by side in one run on this machine, printed as a
// table and written as JSON (--json FILE). See README "Performance".

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { Registry } from 'prom-client';
import { Batcher, type MetadataBatch, type UpdateResult } from '../batcher.js';
import { subscribe } from '../client.js';
import { DEFAULT_NOTIFY_CHANNEL } from '../config.js';
import { createPool, migrate, openDatabase, recreateDatabase } from '../database.js';
import { createLogger } from '../logger.js';
import { BatcherMetrics } from '../metrics.js';
import { provisionAgents } from '../provision.js';
import { guardedUpdate, MetadataStore, updateMetadataReturningAgents } from '../store.js';
import type { LoadConfig, LoadResult } from './loadgen.js';
import { round, summarize, type Summary } from './stats.js';

const DIST = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const BATCH_SIZE = 500;
const log = createLogger('warn');

interface Options {
  quick: boolean;
  scenarios: Set<string>;
  agents: number;
  keys: number;
  intervalMs: number;
  durationS: number;
  closedS: number;
  concurrency: number;
  flushRounds: number;
  overloadRequests: number;
  /** The service's FLUSH_INTERVAL_MS: the default, or 1 s for --quick. */
  flushIntervalMs: number;
  json: string | undefined;
}

function parse(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      scenario: { type: 'string' },
      agents: { type: 'string' },
      keys: { type: 'string' },
      'interval-ms': { type: 'string' },
      'duration-s': { type: 'string' },
      concurrency: { type: 'string' },
      json: { type: 'string' },
    },
    strict: true,
  });
  const quick = values.quick ?? false;
  const number = (raw: string | undefined, fallback: number, name: string) => {
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isSafeInteger(n) || n < 1) throw new Error(`--${name} must be a whole number >= 1`);
    return n;
  };
  const scenario = values.scenario ?? 'all';
  const known = ['steady', 'burst', 'overload'];
  if (scenario !== 'all' && scenario !== 'limits' && !known.includes(scenario)) {
    throw new Error(`--scenario must be all, limits (only the raw limits), ${known.join(', ')}`);
  }
  const agents = number(values.agents, quick ? 500 : 10_000, 'agents');
  return {
    quick,
    scenarios: new Set(scenario === 'all' ? known : scenario === 'limits' ? [] : [scenario]),
    agents,
    keys: number(values.keys, 10, 'keys'),
    intervalMs: number(values['interval-ms'], quick ? 1000 : 5000, 'interval-ms'),
    durationS: number(values['duration-s'], quick ? 2 : 30, 'duration-s'),
    closedS: quick ? 1.5 : 10,
    concurrency: number(values.concurrency, 64, 'concurrency'),
    flushRounds: quick ? 20 : 100,
    // 10x the channel (BATCH_SIZE x 5 keys), in requests of `keys` keys... times ten again in the full run.
    overloadRequests: quick ? 2_000 : 25_000,
    flushIntervalMs: quick ? 1000 : 5000,
    json: values.json,
  };
}

export async function runBench(argv: string[]): Promise<number> {
  const options = parse(argv);
  const started = Date.now();
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-bench-'));
  // Reachable by the postgres OS user when running as root.
  await fs.chmod(work, 0o711);
  const server = await openDatabase({
    databaseUrl: process.env.DATABASE_URL,
    dataDir: path.join(work, 'pg'),
    log,
    database: 'postgres',
  });
  try {
    const databaseUrl = await recreateDatabase(server.url, 'metabatch_bench');
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
      const context: Context = { options, work, databaseUrl, pool, keys, agentsFile, agents, probes };

      const report: Report = {
        machine: {
          node: process.version,
          cpus: os.cpus().length,
          cpu: os.cpus()[0]?.model ?? '',
          memoryGb: round(os.totalmem() / 2 ** 30, 1),
          postgres: version,
          embedded: server.embedded,
        },
        options: { ...options, scenarios: [...options.scenarios] },
        flush: await flushLimits(context),
        ingest: await ingestLimits(context),
      };
      if (options.scenarios.has('steady')) report.steady = await steady(context);
      if (options.scenarios.has('burst')) report.burst = await burst(context);
      if (options.scenarios.has('overload')) report.overload = await overload(context);
      report.seconds = round((Date.now() - started) / 1000, 1);
      process.stdout.write(`${table(report)}\n`);
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

interface Context {
  options: Options;
  work: string;
  databaseUrl: string;
  pool: pg.Pool;
  keys: string[];
  agentsFile: string;
  agents: Agent[];
  probes: Agent[];
}

interface Agent {
  id: string;
  token: string;
}

interface Report {
  machine: { node: string; cpus: number; cpu: string; memoryGb: number; postgres: string; embedded: boolean };
  options: Record<string, unknown>;
  flush: Awaited<ReturnType<typeof flushLimits>>;
  ingest: Awaited<ReturnType<typeof ingestLimits>>;
  steady?: Awaited<ReturnType<typeof steady>>;
  burst?: Awaited<ReturnType<typeof burst>>;
  overload?: Awaited<ReturnType<typeof overload>>;
  seconds?: number;
}

const benchStart = Date.now();
function progress(message: string): void {
  process.stderr.write(`bench: [${((Date.now() - benchStart) / 1000).toFixed(1)} s] ${message}\n`);
}

/** Agents with known tokens and declared keys, also written to `file` for the load generator. */
async function provision(pool: pg.Pool, count: number, keys: string[], file: string): Promise<Agent[]> {
  const agents = await provisionAgents(pool, count, keys, 'bench');
  await pool.query('VACUUM ANALYZE workspace_agent_metadata');
  await fs.writeFile(file, JSON.stringify(agents));
  return agents;
}

// ---------------------------------------------------------------- flush

/**
 * Rows/s of the raw UPDATE at BATCH_SIZE, sent directly with pg, against our
 * whole flush path (the batcher's merge, its arrays, the guarded UPDATE that
 * also NOTIFYs) at the same batch size, in alternating blocks.
 */
async function flushLimits(context: Context) {
  const { pool, agents, keys, options } = context;
  progress(`flush: raw UPDATE vs the batcher, ${options.flushRounds} batches of ${BATCH_SIZE} each`);
  const perBatch = BATCH_SIZE / keys.length;
  let clock = Date.now();
  const batchAt = (n: number) => {
    const first = (n * perBatch) % Math.max(1, agents.length - perBatch);
    const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAts: [] };
    const at = new Date(++clock);
    for (const agent of agents.slice(first, first + perBatch)) {
      for (const key of keys) {
        batch.agentIds.push(agent.id);
        batch.keys.push(key);
        batch.values.push(`flush-${n}`);
        batch.errors.push('');
        batch.collectedAts.push(at);
      }
    }
    return batch;
  };
  const store = new MetadataStore(pool, { notifyChannel: DEFAULT_NOTIFY_CHANNEL });
  const flushDurations: number[] = [];
  const timedStore = {
    async updateMetadata(batch: MetadataBatch): Promise<UpdateResult> {
      const t0 = performance.now();
      try {
        return await store.updateMetadata(batch);
      } finally {
        flushDurations.push(performance.now() - t0);
      }
    },
  };
  const batcher = new Batcher({
    store: timedStore,
    metrics: new BatcherMetrics(new Registry()),
    logger: log,
    batchSize: BATCH_SIZE,
    flushIntervalMs: 3_600_000,
  });
  // Three ways to write the same batches, in alternating blocks of 20:
  // - bare: the guarded UPDATE alone;
  // - raw: the same UPDATE telling which rows it wrote (RETURNING, grouped per
  //   agent), the statement the store needs to announce only changed agents
  //   and to count undeclared keys, sent directly with pg: the raw limit;
  // - ours: the batcher's whole path (merge, arrays, that UPDATE with the
  //   NOTIFYs in the same statement), fed as the ingest route feeds it.
  const modes = ['bare', 'raw', 'ours'] as const;
  const spent = { bare: 0, raw: 0, ours: 0 };
  const durations: Record<(typeof modes)[number], number[]> = { bare: [], raw: [], ours: flushDurations };
  let batchNumber = 0;
  const perBlock = 20;
  const blocks = Math.max(1, Math.ceil(options.flushRounds / perBlock));
  for (let block = 0; block < blocks; block++) {
    for (const mode of modes) {
      // Built before the clock starts: the route hands over ready arrays.
      const batches = Array.from({ length: perBlock }, () => batchAt(batchNumber++));
      const reports = batches.map((b) =>
        Array.from({ length: b.agentIds.length / keys.length }, (_, i) => {
          const from = i * keys.length;
          const to = from + keys.length;
          return [
            b.agentIds[from]!,
            b.keys.slice(from, to),
            b.values.slice(from, to),
            b.errors.slice(from, to),
            b.collectedAts.slice(from, to),
          ] as const;
        }),
      );
      const t0 = performance.now();
      for (let i = 0; i < perBlock; i++) {
        const b = batches[i]!;
        if (mode === 'ours') {
          for (const report of reports[i]!) batcher.add(...report);
          await batcher.idle();
          continue;
        }
        const s = performance.now();
        await pool.query(mode === 'bare' ? guardedUpdate : updateMetadataReturningAgents, [
          b.agentIds,
          b.keys,
          b.values,
          b.errors,
          b.collectedAts,
        ]);
        durations[mode].push(performance.now() - s);
      }
      spent[mode] += performance.now() - t0;
    }
  }
  await batcher.close();
  const rows = perBlock * blocks * BATCH_SIZE;
  const figures = (mode: (typeof modes)[number]) => ({
    rowsPerSecond: round(rows / (spent[mode] / 1000), 0),
    batchesPerSecond: round((perBlock * blocks) / (spent[mode] / 1000), 1),
    durationMs: roundSummary(summarize(durations[mode])),
  });
  const bare = figures('bare');
  const raw = figures('raw');
  const ours = figures('ours');
  return {
    batchSize: BATCH_SIZE,
    batches: perBlock * blocks,
    bare,
    raw,
    ours,
    ratio: round(ours.rowsPerSecond / raw.rowsPerSecond, 3),
    ratioToBare: round(ours.rowsPerSecond / bare.rowsPerSecond, 3),
  };
}

// ---------------------------------------------------------------- processes

interface Server {
  child: ChildProcess;
  url: string;
  /** Peak resident set size so far (VmHWM), in MB. */
  peakRssMb(): number;
  metrics(): Promise<Map<string, number>>;
  stop(): Promise<number | null>;
}

async function startServer(
  kind: 'service' | 'raw' | 'naive',
  context: Context,
  env: Record<string, string> = {},
): Promise<Server> {
  const script = {
    service: path.join(DIST, 'cli.js'),
    raw: path.join(DIST, 'bench', 'rawServer.js'),
    naive: path.join(DIST, 'bench', 'naiveServer.js'),
  }[kind];
  // BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=prof" profiles the servers.
  const nodeArgs = (process.env.BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const args = [...nodeArgs, ...(kind === 'service' ? [script, 'serve'] : [script])];
  const child = spawn(process.execPath, args, {
    env: {
      ...process.env,
      DATABASE_URL: context.databaseUrl,
      PORT: '0',
      LOG_LEVEL: 'info',
      BATCH_SIZE: String(BATCH_SIZE),
      FLUSH_INTERVAL_MS: String(context.options.flushIntervalMs),
      DATA_DIR: path.join(context.work, 'service'),
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const url = await new Promise<string>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      const match = /(?:metabatch listening on|listening) (http:\/\/[\d.]+:\d+)/.exec(output);
      if (match) {
        child.stdout.off('data', onData);
        resolve(match[1]!);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.once('exit', (code) => reject(new Error(`${kind} server exited (${code}): ${output.slice(-1000)}`)));
  });
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child,
    url,
    peakRssMb() {
      const status = readFileSync(`/proc/${child.pid}/status`, 'utf8');
      return round(Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) / 1024, 1);
    },
    async metrics() {
      const text = await (await fetch(`${url}/metrics`)).text();
      const values = new Map<string, number>();
      for (const line of text.split('\n')) {
        const match = /^([a-z_]+(?:\{[^}]*\})?) ([\d.e+-]+|NaN)$/.exec(line);
        if (match) values.set(match[1]!, Number(match[2]));
      }
      return values;
    },
    async stop() {
      child.kill('SIGTERM');
      return exited;
    },
  };
}

/** How much each series of a /metrics scrape grew since an earlier one. */
function since(before: Map<string, number>, after: Map<string, number>): (series: string) => number {
  return (series) => (after.get(series) ?? 0) - (before.get(series) ?? 0);
}

async function load(
  context: Context,
  url: string,
  config: Partial<LoadConfig> & Pick<LoadConfig, 'mode'>,
): Promise<LoadResult> {
  const full: LoadConfig = {
    baseUrl: url,
    agentsFile: context.agentsFile,
    keys: context.keys,
    concurrency: context.options.concurrency,
    durationMs: context.options.durationS * 1000,
    intervalMs: context.options.intervalMs,
    ...config,
  };
  const file = path.join(context.work, `load-${randomBytes(4).toString('hex')}.json`);
  await fs.writeFile(file, JSON.stringify(full));
  const child = spawn(process.execPath, [path.join(DIST, 'bench', 'loadgen.js'), file], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  const line = output.split('\n').find((l) => l.includes('"event":"result"'));
  if (code !== 0 || !line) throw new Error(`load generator failed (${code}): ${output.slice(-500)}`);
  return (JSON.parse(line) as { result: LoadResult }).result;
}

/** Committed transactions of the bench database, as Postgres counts them (each autocommit statement is one). */
async function transactions(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: string }>(
    `SELECT xact_commit + xact_rollback AS n FROM pg_stat_database WHERE datname = current_database()`,
  );
  return Number(rows[0]!.n);
}

// Postgres publishes an idle backend's counters within 10 s
// (PGSTAT_IDLE_INTERVAL): wait that long before reading them.
const STATS_SETTLE_MS = 11_000;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- ingest

/**
 * Requests/s, closed loop, of the bare Fastify route against the service,
 * same body, same generator: both servers run side by side and are loaded in
 * alternating rounds, so that this machine's drifts hit both alike.
 */
async function ingestLimits(context: Context) {
  const { options } = context;
  const rounds = options.quick ? 2 : 5;
  progress(
    `ingest: raw Fastify and metabatch, closed loop, ${options.concurrency} connections, ${rounds} alternating rounds of ${options.closedS / rounds} s`,
  );
  const raw = await startServer('raw', context);
  const ours = await startServer('service', context);
  try {
    // One round first: JIT, connections and (for us) the token cache warm.
    await load(context, raw.url, { mode: 'burst', concurrency: options.concurrency });
    await load(context, ours.url, { mode: 'burst', concurrency: options.concurrency });
    const before = await ours.metrics();
    const runs: Record<'raw' | 'ours', LoadResult[]> = { raw: [], ours: [] };
    // Where the two cores went, per 1000 requests: the server, Postgres, the generator.
    const cpu = { raw: { server: 0, postgres: 0 }, ours: { server: 0, postgres: 0 } };
    for (let r = 0; r < rounds; r++) {
      for (const [kind, server] of [
        ['ours', ours],
        ['raw', raw],
      ] as const) {
        const serverBefore = cpuTicks([server.child.pid!]);
        const postgresBefore = cpuTicks(postgresPids());
        runs[kind].push(
          await load(context, server.url, {
            mode: 'closed',
            durationMs: (options.closedS * 1000) / rounds,
            firstRound: 1 + r * 1000,
            keepLatencies: true,
          }),
        );
        cpu[kind].server += cpuSecondsSince(serverBefore);
        cpu[kind].postgres += cpuSecondsSince(postgresBefore);
      }
    }
    const perThousand = (kind: 'raw' | 'ours') => {
      const requests = runs[kind].reduce((n, run) => n + run.requests, 0) / 1000;
      const generator = runs[kind].reduce((n, run) => n + run.generatorCpuSeconds, 0);
      return {
        serverMs: round((cpu[kind].server * 1000) / requests, 1),
        postgresMs: round((cpu[kind].postgres * 1000) / requests, 1),
        generatorMs: round((generator * 1000) / requests, 1),
      };
    };
    const delta = since(before, await ours.metrics());
    const oursEntry: Record<string, unknown> = summarizeLoad(pool(runs.ours));
    for (const name of [
      'metabatch_database_statements_total',
      'metabatch_metadata_flushed_total',
      'metabatch_metadata_dropped_keys_total',
    ]) {
      oursEntry[name.replace('metabatch_', '')] = delta(name);
    }
    const rawEntry = summarizeLoad(pool(runs.raw));
    const perRound = runs.ours.map((run, i) => round(run.requestsPerSecond / runs.raw[i]!.requestsPerSecond, 3));
    return {
      concurrency: options.concurrency,
      seconds: options.closedS,
      rounds,
      raw: rawEntry,
      ours: oursEntry as ReturnType<typeof summarizeLoad>,
      ratio: round((oursEntry.requestsPerSecond as number) / rawEntry.requestsPerSecond, 3),
      ratioPerRound: perRound,
      cpuPerThousandRequests: { ours: perThousand('ours'), raw: perThousand('raw') },
    };
  } finally {
    await ours.stop();
    await raw.stop();
  }
}

/** CPU ticks (user + system, 1/100 s) used so far by each of these processes. */
function cpuTicks(pids: number[]): Map<number, number> {
  const ticks = new Map<number, number>();
  for (const pid of pids) {
    try {
      const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      ticks.set(pid, Number(fields[11]) + Number(fields[12]));
    } catch {
      // gone
    }
  }
  return ticks;
}

/** CPU seconds used since `before` by the processes alive at both readings. */
function cpuSecondsSince(before: Map<number, number>): number {
  let ticks = 0;
  for (const [pid, now] of cpuTicks([...before.keys()])) ticks += now - before.get(pid)!;
  return ticks / 100;
}

/** Every Postgres process on this machine (the cluster the bench uses, on a machine of its own). */
function postgresPids(): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/comm`, 'utf8').trim() === 'postgres') pids.push(Number(entry));
    } catch {
      // gone
    }
  }
  return pids;
}

/** Several runs as one: totals, and percentiles over every request. */
function pool(runs: LoadResult[]): LoadResult {
  const statuses: Record<string, number> = {};
  for (const run of runs)
    for (const [status, n] of Object.entries(run.statuses)) statuses[status] = (statuses[status] ?? 0) + n;
  const sum = (pick: (run: LoadResult) => number) => runs.reduce((total, run) => total + pick(run), 0);
  const seconds = sum((r) => r.seconds);
  return {
    requests: sum((r) => r.requests),
    statuses,
    errors: sum((r) => r.errors),
    keysSent: sum((r) => r.keysSent),
    keysAccepted: sum((r) => r.keysAccepted),
    keysDropped: sum((r) => r.keysDropped),
    keysAcceptedAll: sum((r) => r.keysAcceptedAll),
    seconds,
    requestsPerSecond: sum((r) => r.requests) / seconds,
    keysAcceptedPerSecond: sum((r) => r.keysAccepted) / seconds,
    latencyMs: summarize(runs.flatMap((r) => r.latencies ?? [])),
    generatorLoopDelayMs: {
      p99: Math.max(...runs.map((r) => r.generatorLoopDelayMs.p99)),
      max: Math.max(...runs.map((r) => r.generatorLoopDelayMs.max)),
    },
    generatorCpuSeconds: sum((r) => r.generatorCpuSeconds),
  };
}

function summarizeLoad(run: LoadResult) {
  return {
    requests: run.requests,
    requestsPerSecond: round(run.requestsPerSecond, 0),
    keysAcceptedPerSecond: round(run.keysAcceptedPerSecond, 0),
    keysSent: run.keysSent,
    keysAccepted: run.keysAccepted,
    keysDropped: run.keysDropped,
    statuses: run.statuses,
    errors: run.errors,
    latencyMs: roundSummary(run.latencyMs),
  };
}

function roundSummary(s: Summary): Summary {
  return { count: s.count, p50: round(s.p50), p99: round(s.p99), max: round(s.max), mean: round(s.mean) };
}

// ---------------------------------------------------------------- steady

/**
 * Every agent posts its keys every interval, open loop. Measures ingest
 * latency, flushes, freshness (POST -> NOTIFY, POST -> row visible, by probe
 * agents), SQL statements per accepted key against the naive mode under the
 * same load, and peak RSS.
 */
async function steady(context: Context) {
  const { options } = context;
  const modes: Record<string, unknown> = {};
  // The statements the server sent, by its own metabatch_database_statements_total;
  // in the full run, Postgres's own transaction count cross-checks it.
  const crossCheck = !options.quick;
  const settle = () => sleep(crossCheck ? STATS_SETTLE_MS : 200);
  for (const kind of ['service', 'naive'] as const) {
    progress(
      `steady: ${kind === 'service' ? 'metabatch' : 'naive (UPDATE + NOTIFY per request)'}, ${options.agents} agents x ${options.keys} keys every ${options.intervalMs} ms, ${options.durationS} s`,
    );
    const server = await startServer(kind, context);
    try {
      // Warm-up: one interval, so every token (the probes' too) is cached and the batch is flushed.
      await load(context, server.url, { mode: 'open', durationMs: options.intervalMs });
      for (const probe of context.probes) await postProbe(server.url, probe, 'warm-up');
      await sleep(options.flushIntervalMs);
      await settle();
      const before = await server.metrics();
      const transactionsBefore = await transactions(context.pool);
      // The first second (the generator's start, its connections) is sent but not measured.
      const rampMs = Math.min(1000, options.durationS * 200);
      const probe =
        kind === 'service' ? startProbes(context, server.url, rampMs, options.durationS * 1000 - 500) : undefined;
      const run = await load(context, server.url, {
        mode: 'open',
        firstRound: 1_000_000,
        rampMs,
        durationMs: options.durationS * 1000 + rampMs,
      });
      const probes = await probe?.stop();
      // The last partial batch flushes on the timer.
      await sleep(options.flushIntervalMs + 200);
      const after = await server.metrics();
      const delta = since(before, after);
      const sent = delta('metabatch_database_statements_total');
      const entry: Record<string, unknown> = {
        ...summarizeLoad(run),
        statements: sent,
        keysAcceptedInWindow: run.keysAcceptedAll,
        statementsPerKey: round(sent / run.keysAcceptedAll, 6),
        peakRssMb: server.peakRssMb(),
      };
      if (crossCheck) {
        await settle();
        // Less the probes' own polls and the two counter reads.
        entry.transactionsCountedByPostgres =
          (await transactions(context.pool)) - transactionsBefore - (probes?.queries ?? 0) - 1;
      }
      if (kind === 'service') {
        const batches =
          delta('metabatch_metadata_batches_total{reason="capacity"}') +
          delta('metabatch_metadata_batches_total{reason="scheduled"}');
        const durationSum =
          delta('metabatch_metadata_flush_duration_seconds_sum{reason="capacity"}') +
          delta('metabatch_metadata_flush_duration_seconds_sum{reason="scheduled"}');
        entry.flush = {
          batches,
          batchesPerSecond: round(batches / run.seconds, 1),
          rowsPerSecond: round(delta('metabatch_metadata_flushed_total') / run.seconds, 0),
          meanBatchSize: round(delta('metabatch_metadata_flushed_total') / Math.max(1, batches), 1),
          meanFlushMs: round((durationSum / Math.max(1, batches)) * 1000, 2),
        };
        entry.freshness = probes?.freshness;
        entry.serviceEventLoopLagMs = {
          p99: round((after.get('metabatch_nodejs_eventloop_lag_p99_seconds') ?? 0) * 1000),
          max: round((after.get('metabatch_nodejs_eventloop_lag_max_seconds') ?? 0) * 1000),
        };
        const gc = ['minor', 'major', 'incremental', 'weakcb'].map((kind) => ({
          kind,
          count: delta(`metabatch_nodejs_gc_duration_seconds_count{kind="${kind}"}`),
          seconds: round(delta(`metabatch_nodejs_gc_duration_seconds_sum{kind="${kind}"}`), 3),
        }));
        entry.serviceGc = gc;
      }
      entry.generatorLoopDelayMs = run.generatorLoopDelayMs;
      modes[kind] = entry;
    } finally {
      await server.stop();
    }
  }
  const ours = modes.service as { statementsPerKey: number };
  const naive = modes.naive as { statementsPerKey: number };
  return {
    agents: options.agents,
    keys: options.keys,
    intervalMs: options.intervalMs,
    seconds: options.durationS,
    ours: modes.service,
    naive: modes.naive,
    fewerStatementsThanNaive: round(naive.statementsPerKey / ours.statementsPerKey, 1),
  };
}

async function postProbe(url: string, probe: Agent, value: string): Promise<number> {
  const res = await fetch(`${url}/v1/agents/${probe.id}/metadata`, {
    method: 'POST',
    headers: { authorization: `Bearer ${probe.token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ metadata: [{ key: 'probe', value }] }),
  });
  await res.text();
  return res.status;
}

// How often a probe looks for its row: the figure's resolution. Finer
// polling would itself load the two cores it measures.
const POLL_MS = 5;

/**
 * Probe agents post a fresh value, one at a time each, and time it until a
 * NOTIFY names them (a real LISTEN) and until the row shows it (polled every
 * POLL_MS on connections of their own).
 */
function startProbes(context: Context, url: string, afterMs: number, untilMs: number) {
  const notified: number[] = [];
  const visible: number[] = [];
  let queries = 0;
  let running = true;
  // Only while the load runs: a sample at its very start or end would wait for the timer flush.
  const timer = setTimeout(() => (running = false), untilMs);
  const waiting = new Map<string, () => void>();
  const poller = new pg.Pool({ connectionString: context.databaseUrl, max: context.probes.length });
  const done = (async () => {
    await sleep(afterMs);
    const listener = await subscribe({
      databaseUrl: context.databaseUrl,
      applicationName: 'bench-probe',
      onBatch: (ids) => {
        for (const id of ids) waiting.get(id)?.();
      },
    });
    try {
      await Promise.all(
        context.probes.map(async (probe, index) => {
          for (let round = 0; running; round++) {
            const value = `probe-${index}-${round}`;
            const heard = new Promise<void>((resolve) => waiting.set(probe.id, resolve));
            const t0 = performance.now();
            if ((await postProbe(url, probe, value)) !== 202) continue;
            const seen = (async () => {
              for (let i = 0; i < 10_000; i++) {
                queries++;
                const { rows } = await poller.query<{ value: string }>(
                  `SELECT value FROM workspace_agent_metadata WHERE workspace_agent_id = $1 AND key = 'probe'`,
                  [probe.id],
                );
                if (rows[0]?.value === value) return visible.push(performance.now() - t0);
                await sleep(POLL_MS);
              }
            })();
            await Promise.race([
              heard.then(() => notified.push(performance.now() - t0)),
              sleep(context.options.flushIntervalMs * 3),
            ]);
            await seen;
            await sleep(100);
          }
        }),
      );
    } finally {
      await listener.close();
      await poller.end();
    }
  })();
  return {
    async stop() {
      running = false;
      clearTimeout(timer);
      await done;
      return {
        queries,
        freshness: {
          postToNotifyMs: roundSummary(summarize(notified)),
          postToRowVisibleMs: roundSummary(summarize(visible)),
        },
      };
    },
  };
}

// ---------------------------------------------------------------- burst, overload

/** Every agent posts at the same moment. */
async function burst(context: Context) {
  progress(`burst: ${context.options.agents} agents post at once`);
  const server = await startServer('service', context);
  try {
    await load(context, server.url, { mode: 'burst' });
    await sleep(500);
    const before = await server.metrics();
    const t0 = performance.now();
    const run = await load(context, server.url, { mode: 'burst', firstRound: 2_000_000 });
    // Until every accepted key has been flushed.
    let drainedMs = 0;
    for (let i = 0; i < 400; i++) {
      const flushed = since(before, await server.metrics())('metabatch_metadata_flushed_total');
      if (flushed >= run.keysAccepted) {
        drainedMs = performance.now() - t0;
        break;
      }
      await sleep(25);
    }
    return {
      ...summarizeLoad(run),
      allFlushedAfterMs: round(drainedMs, 0),
      // The last keys wait for the timer: bounded by FLUSH_INTERVAL_MS after the last answer.
      lastFlushAfterLastAnswerMs: round(drainedMs - run.seconds * 1000, 0),
      peakRssMb: server.peakRssMb(),
    };
  } finally {
    await server.stop();
  }
}

/**
 * Far more than the service can take: 256 connections post as fast as they
 * can until `overloadRequests` requests (10x, or in the full run 100x, the
 * channel's capacity in keys) have been sent. Every key sent must be counted
 * as accepted or dropped, and the service's own counters must agree.
 */
async function overload(context: Context) {
  const requests = context.options.overloadRequests;
  progress(`overload: ${requests} requests x ${context.keys.length} keys from 256 connections`);
  const server = await startServer('service', context);
  try {
    const before = await server.metrics();
    const run = await load(context, server.url, {
      mode: 'closed',
      concurrency: 256,
      durationMs: 600_000,
      requests,
      firstRound: 3_000_000,
    });
    await sleep(context.options.flushIntervalMs + 200);
    const delta = since(before, await server.metrics());
    const droppedByService =
      delta('metabatch_metadata_dropped_keys_total') + delta('metabatch_metadata_held_limit_refused_keys_total');
    return {
      ...summarizeLoad(run),
      channelCapacity: BATCH_SIZE * 5,
      droppedCountedByService: droppedByService,
      acceptedPlusDroppedEqualsSent: run.keysAccepted + run.keysDropped === run.keysSent && run.errors === 0,
      serviceCountsAgree: droppedByService === run.keysDropped,
      peakRssMb: server.peakRssMb(),
    };
  } finally {
    await server.stop();
  }
}

// ---------------------------------------------------------------- table

function table(report: Report): string {
  const rows: string[][] = [];
  const fmt = (n: number | undefined, digits = 0) =>
    n === undefined ? '-' : n.toLocaleString('en-US', { maximumFractionDigits: digits });
  const check = (ok: boolean) => (ok ? 'met' : 'MISSED');
  const { flush, ingest } = report;
  rows.push(['ingest (closed loop)', 'ours', 'raw Fastify', 'ratio', 'target']);
  rows.push([
    '  requests/s',
    fmt(ingest.ours.requestsPerSecond),
    fmt(ingest.raw.requestsPerSecond),
    `${ingest.ratio}x`,
    `>= 0.85x ${check(ingest.ratio >= 0.85)}`,
  ]);
  rows.push(['  keys accepted/s', fmt(ingest.ours.keysAcceptedPerSecond), '-', '', '']);
  rows.push([
    '  latency p50 / p99 / max ms',
    `${ingest.ours.latencyMs.p50} / ${ingest.ours.latencyMs.p99} / ${ingest.ours.latencyMs.max}`,
    `${ingest.raw.latencyMs.p50} / ${ingest.raw.latencyMs.p99} / ${ingest.raw.latencyMs.max}`,
    '',
    '',
  ]);
  rows.push(['  429s', fmt(ingest.ours.statuses['429'] ?? 0), '-', '', '']);
  const cpuRow = (c: { serverMs: number; postgresMs: number; generatorMs: number }) =>
    `${c.serverMs} / ${c.postgresMs} / ${c.generatorMs}`;
  rows.push([
    '  CPU ms per 1000 req: server / Postgres / generator',
    cpuRow(ingest.cpuPerThousandRequests.ours),
    cpuRow(ingest.cpuPerThousandRequests.raw),
    '',
    '',
  ]);
  rows.push([`flush (${flush.batchSize} rows a batch)`, 'ours', 'raw UPDATE…RETURNING', 'ratio', 'target']);
  rows.push([
    '  rows/s',
    fmt(flush.ours.rowsPerSecond),
    fmt(flush.raw.rowsPerSecond),
    `${flush.ratio}x`,
    `>= 0.9x ${check(flush.ratio >= 0.9)}`,
  ]);
  rows.push(['  batches/s', fmt(flush.ours.batchesPerSecond, 1), fmt(flush.raw.batchesPerSecond, 1), '', '']);
  rows.push([
    '  flush ms p50 / p99',
    `${flush.ours.durationMs.p50} / ${flush.ours.durationMs.p99}`,
    `${flush.raw.durationMs.p50} / ${flush.raw.durationMs.p99}`,
    '',
    '',
  ]);
  rows.push([
    '  rows/s of the bare UPDATE (no RETURNING)',
    '',
    fmt(flush.bare.rowsPerSecond),
    `${flush.ratioToBare}x`,
    '',
  ]);
  if (report.steady) {
    const s = report.steady;
    const ours = s.ours as ReturnType<typeof summarizeLoad> & {
      statementsPerKey: number;
      peakRssMb: number;
      flush: Record<string, number>;
      freshness: { postToNotifyMs: Summary; postToRowVisibleMs: Summary };
    };
    const naive = s.naive as ReturnType<typeof summarizeLoad> & { statementsPerKey: number };
    rows.push([
      `steady (${fmt(s.agents)} agents x ${s.keys} keys / ${s.intervalMs} ms, ${s.seconds} s)`,
      'ours',
      'naive',
      'ratio',
      'target',
    ]);
    rows.push(['  requests/s', fmt(ours.requestsPerSecond), fmt(naive.requestsPerSecond), '', '']);
    rows.push([
      '  latency p50 / p99 / max ms',
      `${ours.latencyMs.p50} / ${ours.latencyMs.p99} / ${ours.latencyMs.max}`,
      `${naive.latencyMs.p50} / ${naive.latencyMs.p99} / ${naive.latencyMs.max}`,
      '',
      `p99 <= 15 ms ${check(ours.latencyMs.p99 <= 15)}`,
    ]);
    rows.push([
      '  SQL statements per key',
      fmt(ours.statementsPerKey, 5),
      fmt(naive.statementsPerKey, 5),
      `${s.fewerStatementsThanNaive}x fewer`,
      `>= 100x ${check(s.fewerStatementsThanNaive >= 100)}`,
    ]);
    const counted = (m: unknown) => m as { statements: number; transactionsCountedByPostgres?: number };
    if (counted(ours).transactionsCountedByPostgres !== undefined) {
      rows.push([
        '  statements: sent / Postgres counted',
        `${fmt(counted(ours).statements)} / ${fmt(counted(ours).transactionsCountedByPostgres)}`,
        `${fmt(counted(naive).statements)} / ${fmt(counted(naive).transactionsCountedByPostgres)}`,
        '',
        '',
      ]);
    }
    rows.push([
      '  batches/s, rows/s',
      `${fmt(ours.flush.batchesPerSecond, 1)}, ${fmt(ours.flush.rowsPerSecond)}`,
      '-',
      '',
      '',
    ]);
    rows.push(['  mean batch, mean flush ms', `${ours.flush.meanBatchSize}, ${ours.flush.meanFlushMs}`, '-', '', '']);
    const fresh = ours.freshness;
    rows.push([
      '  POST -> NOTIFY p50 / p99 ms',
      `${fresh.postToNotifyMs.p50} / ${fresh.postToNotifyMs.p99}`,
      '-',
      '',
      `p99 <= 50 ms (capacity flushes) ${check(fresh.postToNotifyMs.p99 <= 50)}`,
    ]);
    rows.push([
      `  POST -> row visible p50 / p99 ms (±${POLL_MS})`,
      `${fresh.postToRowVisibleMs.p50} / ${fresh.postToRowVisibleMs.p99}`,
      '-',
      '',
      '',
    ]);
    rows.push(['  peak RSS MB', fmt(ours.peakRssMb, 1), '-', '', '']);
  }
  if (report.burst) {
    const b = report.burst;
    rows.push([`burst (every agent at once)`, 'ours', '', '', '']);
    rows.push(['  requests, 429s', `${fmt(b.requests)}, ${fmt(b.statuses['429'] ?? 0)}`, '', '', '']);
    rows.push([
      '  latency p50 / p99 / max ms',
      `${b.latencyMs.p50} / ${b.latencyMs.p99} / ${b.latencyMs.max}`,
      '',
      '',
      '',
    ]);
    const bound = (report.options.flushIntervalMs as number) + 50;
    rows.push([
      '  all flushed after ms (from the burst / from its last answer)',
      `${fmt(b.allFlushedAfterMs)} / ${fmt(b.lastFlushAfterLastAnswerMs)}`,
      '',
      '',
      `<= ${bound} after the last answer ${check(b.allFlushedAfterMs > 0 && b.lastFlushAfterLastAnswerMs <= bound)}`,
    ]);
    rows.push(['  peak RSS MB', fmt(b.peakRssMb, 1), '', '', '']);
  }
  if (report.overload) {
    const o = report.overload;
    rows.push([`overload (${fmt(o.requests)} requests, 256 connections)`, 'ours', '', '', '']);
    rows.push([
      '  keys sent = accepted + dropped',
      `${fmt(o.keysSent)} = ${fmt(o.keysAccepted)} + ${fmt(o.keysDropped)}`,
      '',
      '',
      `exact ${check(o.acceptedPlusDroppedEqualsSent && o.serviceCountsAgree)}`,
    ]);
    rows.push(['  requests/s, 429s', `${fmt(o.requestsPerSecond)}, ${fmt(o.statuses['429'] ?? 0)}`, '', '', '']);
    rows.push(['  peak RSS MB', fmt(o.peakRssMb, 1), '', '', `<= 256 ${check(o.peakRssMb <= 256)}`]);
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  const machine = report.machine;
  const header = `metabatch bench: Node ${machine.node}, ${machine.cpus} cores (${machine.cpu}), ${machine.memoryGb} GB, Postgres ${machine.postgres}${machine.embedded ? ' (embedded)' : ''}, ${report.seconds} s`;
  return [
    header,
    '',
    ...rows.map((r) =>
      r
        .map((cell, c) => (cell ?? '').padEnd(widths[c]!))
        .join('  ')
        .trimEnd(),
    ),
  ].join('\n');
}
