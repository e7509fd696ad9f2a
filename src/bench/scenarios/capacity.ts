// The capacity scenario: the largest fleet one replica sustains, every agent
// reporting its keys every interval (open loop), by POST, over the stream
// (createReporter, a WebSocket per agent), and in the naive mode (one UPDATE
// and one NOTIFY per report), each found by a search of short runs.

import { readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { provisionAgents } from '../../provision.js';
import { progress, type Agent, type Context, type Scenario } from '../context.js';
import type { LoadResult } from '../loadgen.js';
import type { Options } from '../options.js';
import { load, startServer, type Server } from '../processes.js';
import { round } from '../stats.js';
import { fmt } from '../table.js';

/** A fleet is sustained when a run's p99 (from when each report was due until its answer) is within this... */
const P99_MS = 50;
/** ...no report failed, and the service dropped no key (no 429, no `dropped` on the stream). */
const CRITERION = `p99 <= ${P99_MS} ms, no errors, no keys dropped`;

/** POSTs share this many connections: enough that the generator's pool is never what limits a fleet. */
const POST_CONNECTIONS = 256;

/** Descriptors a process keeps for itself (Postgres connections, stdio, epoll...), besides one per stream. */
const RESERVED_DESCRIPTORS = 500;

/** The agents provisioned here (beyond the context's), removed at the end. */
const PREFIX = 'capacity';

type Mode = 'post' | 'stream' | 'naive';
const MODES: Mode[] = ['post', 'stream', 'naive'];
const LABELS: Record<Mode, string> = {
  post: 'POST',
  stream: 'stream (createReporter)',
  naive: 'naive (UPDATE + NOTIFY per report)',
};

const RESOLUTION = 1 / 4;
const MAX_STEPS = 8;

/**
 * The search: fleets from `firstFleet`, doubled until one is not sustained
 * (or the cap), then bisected (to multiples of `grain`) until the gap
 * between the largest sustained and the smallest not sustained above it is
 * within RESOLUTION of the former, or MAX_STEPS runs. Each run opens its
 * streams first (loadgen's connect), reports for one interval unmeasured
 * (every agent once: tokens cached, JIT warm), then for `stepMs` measured,
 * the same for every mode: a longer window meets more of the machine's
 * hiccups (a checkpoint, an autovacuum, a GC), so modes are only compared
 * over windows of one length.
 */
function plan(options: Options) {
  return options.quick
    ? { intervalMs: 500, stepMs: 500, firstFleet: 100, maxFleet: 200, grain: 25 }
    : { intervalMs: 5000, stepMs: 10_000, firstFleet: 2000, maxFleet: 64_000, grain: 250 };
}
type Plan = ReturnType<typeof plan>;

/** One run at one fleet size: its figures and whether it was sustained, or why not. */
interface Step {
  fleet: number;
  reportsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  /** Reports not answered 202 (or, on the stream, with keys dropped and sent again). */
  refusedReports: number;
  keysDropped: number;
  /** CPU cores used over the measured window: the server, Postgres, the load generator. */
  cores: { server: number; postgres: number; generator: number };
  /** The longest stalls of the measured window, ms: the server's event loop, the generator's GC. */
  stallsMs: { serverLoop: number | undefined; generatorGc: number };
  sustained: boolean;
  /** The first criterion it failed, when not sustained. */
  failed?: string;
}

function stepOf(fleet: number, run: LoadResult): Step {
  // Answered, but not 202 (over the stream: some keys dropped). Reports with no answer are in `errors`.
  const refusedReports = Object.entries(run.statuses).reduce(
    (n, [status, count]) => (status === '202' ? n : n + count),
    0,
  );
  const failed =
    run.errors > 0
      ? `${fmt(run.errors)} errors`
      : run.keysDropped > 0
        ? `${fmt(run.keysDropped)} keys dropped`
        : refusedReports > 0
          ? `${fmt(refusedReports)} reports not answered 202`
          : run.latencyMs.p99 > P99_MS
            ? `p99 ${round(run.latencyMs.p99, 1)} ms`
            : undefined;
  const cores = (name: 'server' | 'postgres' | 'generator') =>
    round((run.windowCpuSeconds?.[name] ?? 0) / run.seconds, 2);
  return {
    fleet,
    reportsPerSecond: round(run.requestsPerSecond, 0),
    p50Ms: round(run.latencyMs.p50),
    p99Ms: round(run.latencyMs.p99),
    errors: run.errors,
    refusedReports,
    keysDropped: run.keysDropped,
    cores: { server: cores('server'), postgres: cores('postgres'), generator: cores('generator') },
    stallsMs: {
      serverLoop: run.windowStallsMs?.serverLoop === undefined ? undefined : round(run.windowStallsMs.serverLoop, 1),
      generatorGc: round(run.windowStallsMs?.generatorGc ?? 0, 1),
    },
    sustained: failed === undefined,
    ...(failed === undefined ? {} : { failed }),
  };
}

/** The largest fleet the streams of one generator and one service process can hold here, and what caps it. */
function streamCap(plan: Plan): { fleet: number; by: string } {
  // Each stream holds a descriptor in both processes, and a local port.
  const files = Number(/^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))?.[1]);
  const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
  const ports = high! - low! + 1;
  const caps = [
    { fleet: files - RESERVED_DESCRIPTORS, by: `the open file limit, ${fmt(files)} per process` },
    { fleet: ports - RESERVED_DESCRIPTORS, by: `the local port range, ${low}-${high}` },
    { fleet: plan.maxFleet, by: 'the largest fleet searched' },
  ];
  const cap = caps.reduce((a, b) => (b.fleet < a.fleet ? b : a));
  return { fleet: Math.floor(cap.fleet / plan.grain) * plan.grain, by: cap.by };
}

/** The fleets' agents: the context's, and more provisioned (each with the same keys) when a fleet needs them. */
function fleets(context: Context) {
  const agents: Agent[] = [...context.agents];
  return {
    /** A file of the first `size` agents, for the load generator. */
    async file(size: number): Promise<string> {
      if (size > agents.length) {
        progress(`capacity: provisioning ${fmt(size - agents.length)} more agents`);
        agents.push(...(await provisionAgents(context.pool, size - agents.length, context.keys, PREFIX)));
        await context.pool.query('ANALYZE workspace_agent_metadata');
      }
      const file = path.join(context.work, `capacity-${size}.json`);
      await fs.writeFile(file, JSON.stringify(agents.slice(0, size)));
      return file;
    },
    async remove(): Promise<void> {
      if (agents.length > context.agents.length) {
        await context.pool.query(`DELETE FROM workspace_agents WHERE name LIKE '${PREFIX}-%'`);
      }
    },
  };
}

/** Fleets tried in turn, as the plan says; the largest sustained one, and whether the cap stopped the search. */
async function search(plan: Plan, cap: number, tryFleet: (fleet: number) => Promise<Step>) {
  const steps: Step[] = [];
  const best = () =>
    steps.filter((s) => s.sustained).reduce<Step | undefined>((a, s) => (a && a.fleet >= s.fleet ? a : s), undefined);
  // The smallest fleet not sustained above the largest sustained one.
  const above = () =>
    steps
      .filter((s) => !s.sustained && s.fleet > (best()?.fleet ?? 0))
      .reduce<Step | undefined>((a, s) => (a && a.fleet <= s.fleet ? a : s), undefined);
  let fleet = Math.min(plan.firstFleet, cap);
  while (steps.length < MAX_STEPS) {
    steps.push(await tryFleet(fleet));
    const low = best()?.fleet ?? 0;
    const high = above()?.fleet;
    if (high === undefined) {
      if (fleet >= cap) break;
      fleet = Math.min(cap, fleet * 2);
      continue;
    }
    const next = Math.round((low + high) / 2 / plan.grain) * plan.grain;
    if (high - low <= Math.max(plan.grain, low * RESOLUTION) || next <= low || next >= high) break;
    fleet = next;
  }
  const largest = best();
  return { largest, above: above(), capped: largest !== undefined && largest.fleet >= cap, steps };
}

async function measure(context: Context) {
  const p = plan(context.options);
  const cap = streamCap(p);
  const agents = fleets(context);
  const modes: Partial<Record<Mode, Awaited<ReturnType<typeof search>> & { cap: number; cappedBy: string }>> = {};
  let service: Server | undefined;
  try {
    for (const mode of MODES) {
      // POST and the stream on the same service process; the naive mode on its own.
      const server =
        mode === 'naive' ? await startServer('naive', context) : (service ??= await startServer('service', context));
      const limit = mode === 'stream' ? cap : { fleet: p.maxFleet, by: 'the largest fleet searched' };
      try {
        let runs = 0;
        const result = await search(p, limit.fleet, async (fleet) => {
          progress(
            `capacity: ${LABELS[mode]}, ${fmt(fleet)} agents x ${context.keys.length} keys every ${p.intervalMs} ms`,
          );
          const run = await load(context, server.url, {
            mode: 'open',
            transport: mode === 'stream' ? 'stream' : 'post',
            agentsFile: await agents.file(fleet),
            concurrency: POST_CONNECTIONS,
            intervalMs: p.intervalMs,
            rampMs: p.intervalMs,
            durationMs: p.intervalMs + p.stepMs,
            firstRound: 7_000_000 + runs++ * 10_000,
            serverPid: server.child.pid!,
          });
          return stepOf(fleet, run);
        });
        modes[mode] = { ...result, cap: limit.fleet, cappedBy: limit.by };
      } finally {
        if (mode === 'naive') await server.stop();
      }
    }
  } finally {
    await service?.stop();
    await agents.remove();
  }
  return {
    keys: context.keys.length,
    intervalMs: p.intervalMs,
    stepSeconds: p.stepMs / 1000,
    criterion: { p99Ms: P99_MS, errors: 0, droppedKeys: 0 },
    postConnections: POST_CONNECTIONS,
    post: modes.post!,
    stream: modes.stream!,
    naive: modes.naive!,
  };
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(c: Figures): string[][] {
  const rowsOf = (mode: Mode): string[][] => {
    const m = c[mode];
    const best = m.largest;
    const why = m.capped ? `capped by ${m.cappedBy}` : m.above ? `not at ${fmt(m.above.fleet)}: ${m.above.failed}` : '';
    if (!best) return [[`  ${LABELS[mode]}`, 'none', '', '', why]];
    return [
      [
        `  ${LABELS[mode]}`,
        `${m.capped ? '>= ' : ''}${fmt(best.fleet)}`,
        `${fmt(best.reportsPerSecond)}, ${best.p99Ms}`,
        '',
        why,
      ],
      [
        '    CPU cores there: server / Postgres / generator',
        `${best.cores.server} / ${best.cores.postgres} / ${best.cores.generator}`,
        '',
        '',
        '',
      ],
      [
        '    longest stall there ms: server loop / generator GC',
        `${best.stallsMs.serverLoop ?? '-'} / ${best.stallsMs.generatorGc}`,
        '',
        '',
        '',
      ],
    ];
  };
  return [
    [
      `capacity (agents x ${c.keys} keys / ${c.intervalMs} ms, open loop)`,
      'largest fleet',
      'reports/s, p99 ms',
      '',
      '',
    ],
    [`  sustained: ${CRITERION}`, '', '', '', ''],
    [`  runs: ${c.stepSeconds} s after ${c.intervalMs / 1000} s unmeasured`, '', '', '', ''],
    ...MODES.flatMap(rowsOf),
  ];
}

export const capacity: Scenario<Figures> = { name: 'capacity', run: measure, rows };
