// The stream scenario: reports over the streaming route (one WebSocket per
// agent, through the agents' own client, createReporter) against the POST
// route, on the same service process in the same run: how many reports each
// takes, what each report costs the service, and the stream's latency under
// the steady scenario's load.

import fs from 'node:fs/promises';
import path from 'node:path';
import { BATCH_SIZE, progress, type Context, type Scenario } from '../context.js';
import { poolRuns, summarizeLoad } from '../figures.js';
import type { LoadConfig, LoadResult } from '../loadgen.js';
import { load, startServer, type Server } from '../processes.js';
import { round } from '../stats.js';
import { check, fmt } from '../table.js';

/** The targets: reports/s over the stream against the POST's, service CPU per report, ack latency p99. */
const TARGETS = { ratio: 3, cpuUs: 30, p99Ms: 15 };

/** Reports in flight per agent on the raw WebSockets. */
const PIPELINED = 4;

/** Each closed-loop round's first reports (HTTP connections, JIT) are sent but not measured; streams open before. */
const CLOSED_RAMP_MS = 250;

type Transport = NonNullable<LoadConfig['transport']>;

/**
 * The transports' figures for one kind of run: the load generator's, plus
 * the service's CPU over the measured window, per report.
 */
function figuresOf(runs: LoadResult[]) {
  const pooled = poolRuns(runs);
  const windowCpu = (name: 'server' | 'postgres' | 'generator') =>
    runs.reduce((total, run) => total + (run.windowCpuSeconds?.[name] ?? 0), 0);
  return {
    ...summarizeLoad(pooled),
    serviceCpuUsPerReport: round((windowCpu('server') * 1e6) / pooled.requests, 1),
    postgresCpuUsPerReport: round((windowCpu('postgres') * 1e6) / pooled.requests, 1),
    generatorCpuUsPerReport: round((windowCpu('generator') * 1e6) / pooled.requests, 1),
    streamsOpened: runs.reduce((total, run) => total + (run.stream?.streamsOpened ?? 0), 0),
    /** The longest stalls over the runs' measured windows, ms: the server's event loop, the generator's GC. */
    stallsMs: {
      serverLoop: round(Math.max(0, ...runs.map((run) => run.windowStallsMs?.serverLoop ?? 0)), 1),
      generatorGc: round(Math.max(0, ...runs.map((run) => run.windowStallsMs?.generatorGc ?? 0)), 1),
    },
  };
}

/** One run of a transport against the server, with its CPU (and Postgres's) over the measured window. */
function run(context: Context, server: Server, transport: Transport, config: Partial<LoadConfig>) {
  return load(context, server.url, {
    mode: 'closed',
    transport,
    serverPid: server.child.pid!,
    keepLatencies: true,
    ...config,
  });
}

/**
 * Reports/s, closed loop, over the stream and by POST, in alternating rounds
 * on the same agents: through createReporter and by POST, one report in
 * flight per agent; and over raw WebSockets with PIPELINED reports in flight
 * per agent, the POST's very body, which is what the route itself takes when
 * its client costs little (the reporter costs the two shared cores about as
 * much as the service does). So few agents that all their keys fit in one
 * batch (agents x keys < BATCH_SIZE): reports coalesce in memory and the
 * timer flushes them, so what is measured is each transport's ingest path,
 * not Postgres (which caps every transport alike at the flush's rows/s; see
 * ingest and capacity).
 */
async function throughput(context: Context, server: Server) {
  const { options, keys } = context;
  const agents = context.agents.slice(0, Math.max(1, Math.floor((BATCH_SIZE - 1) / keys.length)));
  const agentsFile = path.join(context.work, 'stream-agents.json');
  await fs.writeFile(agentsFile, JSON.stringify(agents));
  // --quick: one round of each, a smoke run.
  const rounds = options.quick ? 1 : 5;
  const roundMs = (options.closedS * 1000) / rounds;
  progress(
    `stream: createReporter, raw WebSockets and POST, closed loop, ${agents.length} agents x ${keys.length} keys, ${rounds} alternating rounds of ${roundMs / 1000} s`,
  );
  const runs: Record<Transport, LoadResult[]> = { stream: [], ws: [], post: [] };
  for (let r = 0; r < rounds; r++) {
    for (const transport of ['stream', 'ws', 'post'] as const) {
      runs[transport].push(
        await run(context, server, transport, {
          agentsFile,
          concurrency: agents.length * (transport === 'ws' ? PIPELINED : 1),
          rampMs: CLOSED_RAMP_MS,
          durationMs: CLOSED_RAMP_MS + roundMs,
          firstRound: 4_000_000 + r * 100_000,
        }),
      );
    }
  }
  const post = figuresOf(runs.post);
  const against = (transport: 'stream' | 'ws') => {
    const figures = figuresOf(runs[transport]);
    return {
      ...figures,
      ratio: round(figures.requestsPerSecond / post.requestsPerSecond, 2),
      ratioPerRound: runs[transport].map((s, i) => round(s.requestsPerSecond / runs.post[i]!.requestsPerSecond, 2)),
    };
  };
  return {
    agents: agents.length,
    keys: keys.length,
    rounds,
    seconds: options.closedS,
    pipelined: PIPELINED,
    stream: against('stream'),
    ws: against('ws'),
    post,
  };
}

/**
 * The steady scenario's load (every agent every interval, open loop, latency
 * from when a report was due until it was acknowledged: flush() resolved,
 * or the POST answered), over the stream, then by POST for comparison. The
 * streams are opened before the load starts (loadgen's connect), and the
 * first second is sent but not measured, as in steady.
 */
async function steadyLoad(context: Context, server: Server) {
  const { options } = context;
  const rampMs = Math.min(1000, options.intervalMs);
  const figures: Partial<Record<Transport, ReturnType<typeof figuresOf>>> = {};
  for (const transport of ['stream', 'post'] as const) {
    progress(
      `stream: ${transport === 'stream' ? 'stream' : 'POST'}, ${options.agents} agents x ${options.keys} keys every ${options.intervalMs} ms, ${options.durationS} s`,
    );
    const result = await run(context, server, transport, {
      mode: 'open',
      rampMs,
      durationMs: rampMs + options.durationS * 1000,
      firstRound: transport === 'stream' ? 5_000_000 : 6_000_000,
    });
    figures[transport] = figuresOf([result]);
  }
  return {
    agents: options.agents,
    keys: options.keys,
    intervalMs: options.intervalMs,
    seconds: options.durationS,
    stream: figures.stream!,
    post: figures.post!,
  };
}

async function measure(context: Context) {
  const server = await startServer('service', context);
  try {
    const closed = await throughput(context, server);
    const steady = await steadyLoad(context, server);
    return { closed, steady, peakRssMb: server.peakRssMb() };
  } finally {
    await server.stop();
  }
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(s: Figures): string[][] {
  const { closed, steady } = s;
  const latency = (l: { p50: number; p99: number; max: number }) => `${l.p50} / ${l.p99} / ${l.max}`;
  const cpu = (f: { serviceCpuUsPerReport: number; generatorCpuUsPerReport: number }) =>
    `${fmt(f.serviceCpuUsPerReport, 1)} / ${fmt(f.generatorCpuUsPerReport, 1)}`;
  const cpuRatio = (f: { serviceCpuUsPerReport: number }) =>
    `${round(f.serviceCpuUsPerReport / closed.post.serviceCpuUsPerReport, 2)}x`;
  const drops = (f: { keysDropped: number; errors: number }) => `${fmt(f.keysDropped)}, ${fmt(f.errors)}`;
  const ratioTarget = (ratio: number) => `>= ${TARGETS.ratio}x ${check(ratio >= TARGETS.ratio)}`;
  const cpuTarget = (us: number) => `<= ${TARGETS.cpuUs} µs ${check(us <= TARGETS.cpuUs)}`;
  // A transport's two rows against the POST: reports/s, and CPU per report.
  const againstPost = (label: string, f: typeof closed.stream): string[][] => [
    [
      `  reports/s, ${label}`,
      fmt(f.requestsPerSecond),
      fmt(closed.post.requestsPerSecond),
      `${f.ratio}x`,
      ratioTarget(f.ratio),
    ],
    [
      '    CPU µs per report: service / generator',
      cpu(f),
      cpu(closed.post),
      cpuRatio(f),
      cpuTarget(f.serviceCpuUsPerReport),
    ],
  ];
  return [
    [
      `stream vs POST (closed loop, ${closed.agents} agents x ${closed.keys} keys)`,
      'stream',
      'POST',
      'ratio',
      'target',
    ],
    ...againstPost('createReporter (one in flight per agent)', closed.stream),
    ...againstPost(`raw WebSockets, ${closed.pipelined} in flight per agent`, closed.ws),
    [
      '  keys dropped, errors: createReporter / raw',
      `${drops(closed.stream)} / ${drops(closed.ws)}`,
      drops(closed.post),
      '',
      '',
    ],
    [
      `stream at ${fmt(steady.agents)} agents x ${steady.keys} keys / ${steady.intervalMs} ms, ${steady.seconds} s`,
      'createReporter',
      'POST',
      '',
      '',
    ],
    [
      '  ack latency p50 / p99 / max ms',
      latency(steady.stream.latencyMs),
      latency(steady.post.latencyMs),
      '',
      `p99 <= ${TARGETS.p99Ms} ms ${check(steady.stream.latencyMs.p99 <= TARGETS.p99Ms)}`,
    ],
    [
      '  CPU µs per report: service / Postgres',
      `${fmt(steady.stream.serviceCpuUsPerReport, 1)} / ${fmt(steady.stream.postgresCpuUsPerReport, 1)}`,
      `${fmt(steady.post.serviceCpuUsPerReport, 1)} / ${fmt(steady.post.postgresCpuUsPerReport, 1)}`,
      '',
      '',
    ],
    ['  keys dropped, errors', drops(steady.stream), drops(steady.post), '', ''],
    [
      '  longest stall ms: server loop / generator GC',
      `${steady.stream.stallsMs.serverLoop} / ${steady.stream.stallsMs.generatorGc}`,
      `${steady.post.stallsMs.serverLoop} / ${steady.post.stallsMs.generatorGc}`,
      '',
      '',
    ],
  ];
}

export const stream: Scenario<Figures> = { name: 'stream', run: measure, rows };
