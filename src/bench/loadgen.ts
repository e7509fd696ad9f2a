// The benchmark's load generator, run as its own process so that it does not
// share a core's event loop with the service. Each agent reports its keys
// with changing values: by real HTTP POSTs over undici, or over the
// streaming route through the agents' own client, createReporter
// (src/reporter.ts), or over raw WebSockets. Prints one JSON line of results.

import { readFileSync } from 'node:fs';
import { monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks';
import { cpuSecondsSince, cpuTicks, postgresPids } from './cpu.js';
import { summarize, type Summary } from './stats.js';
import type { Agent } from './context.js';
import { postTransport, streamTransport, wsTransport } from './transports.js';

export interface LoadConfig {
  baseUrl: string;
  /** JSON file of [{ id, token }]. */
  agentsFile: string;
  keys: string[];
  /** closed: `concurrency` loops as fast as they can; open: every agent every `intervalMs`; burst: every agent once, all at once. */
  mode: 'closed' | 'open' | 'burst';
  /**
   * post (default): each report a POST, over `concurrency` connections shared
   * by every agent. stream: each agent a reporter of its own (createReporter),
   * so a WebSocket each, one report in flight at a time; a report is answered
   * when its flush() resolves. ws: a raw WebSocket per agent (wsTransport).
   * Over a stream, closed mode's loop i keeps to agent i % agents.
   */
  transport?: 'post' | 'stream' | 'ws';
  concurrency: number;
  durationMs: number;
  intervalMs: number;
  /** closed mode: stop after this many requests (else after durationMs). */
  requests?: number;
  /** First value round, so that a second run sends new values. */
  firstRound?: number;
  /** Also return every latency (ms), for runs that are pooled. */
  keepLatencies?: boolean;
  /** Requests due in the first rampMs are sent but not measured (process start, connections, JIT). */
  rampMs?: number;
  /** The server's process, whose CPU is read over the measured window (from rampMs to the end) as Postgres's is. */
  serverPid?: number;
}

export interface LoadResult {
  requests: number;
  /**
   * By HTTP status. Over the stream, a report counts as the POST would have
   * been answered: 202 every key taken, 429 some dropped (the reporter sent
   * them again after retry_after, and its flush() waited for that too).
   */
  statuses: Record<string, number>;
  /** Requests with no answer; over the stream, the problems the reporters reported (onError). */
  errors: number;
  keysSent: number;
  keysAccepted: number;
  keysDropped: number;
  /** Keys accepted by every request, the unmeasured ramp included (to set against counters of the whole run). */
  keysAcceptedAll: number;
  seconds: number;
  requestsPerSecond: number;
  keysAcceptedPerSecond: number;
  latencyMs: Summary;
  latencies?: number[];
  /** CPU seconds the generator itself used. */
  generatorCpuSeconds: number;
  /** The generator's own event-loop delay: a stall here shows as latency too. */
  generatorLoopDelayMs: { p99: number; max: number };
  /** CPU seconds over the measured window: this generator, the server (serverPid), every Postgres process. */
  windowCpuSeconds?: { generator: number; server: number; postgres: number };
  /**
   * Over the measured window (with serverPid): the longest pause of the
   * generator's GC, and the server's own event-loop delay max (its
   * metabatch_nodejs_eventloop_lag_max_seconds, read at the window's start and
   * end: prom-client resets it at each read; absent for a server without
   * it, the naive one). A latency tail of the same size
   * is one of them holding every answer, not the transport.
   */
  windowStallsMs?: { generatorGc: number; serverLoop?: number };
  /** Over the stream: messages the reporters sent, and streams they opened (more than the agents: reconnects). */
  stream?: { messages: number; streamsOpened: number };
}

/** The server's event-loop delay max since its last scrape, in ms (undefined when it has no such metric). */
async function serverLoopMaxMs(baseUrl: string): Promise<number | undefined> {
  try {
    const text = await (await fetch(`${baseUrl}/metrics`)).text();
    const line = /^metabatch_nodejs_eventloop_lag_max_seconds (\S+)$/m.exec(text);
    return line ? Number(line[1]) * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * CPU seconds from now until end() of this process, of `serverPid` and of
 * every Postgres process running now (the pool's backends come and go:
 * they are looked up when the window opens); and the stalls of the same
 * window (LoadResult.windowStallsMs).
 */
async function cpuWindow(baseUrl: string, serverPid: number | undefined) {
  await serverLoopMaxMs(baseUrl);
  const usage = process.cpuUsage();
  const server = cpuTicks(serverPid === undefined ? [] : [serverPid]);
  const postgres = cpuTicks(postgresPids());
  let generatorGc = 0;
  const gc = new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) generatorGc = Math.max(generatorGc, entry.duration);
  });
  gc.observe({ entryTypes: ['gc'] });
  return {
    async end() {
      const used = process.cpuUsage(usage);
      const cpu = {
        generator: (used.user + used.system) / 1e6,
        server: cpuSecondsSince(server),
        postgres: cpuSecondsSince(postgres),
      };
      gc.disconnect();
      const serverLoop = await serverLoopMaxMs(baseUrl);
      return { cpu, stalls: { generatorGc, ...(serverLoop === undefined ? {} : { serverLoop }) } };
    },
  };
}

async function main(): Promise<void> {
  const config = JSON.parse(readFileSync(process.argv[2]!, 'utf8')) as LoadConfig;
  const agents = JSON.parse(readFileSync(config.agentsFile, 'utf8')) as Agent[];
  const latencies: number[] = [];
  const statuses: Record<string, number> = {};
  let requests = 0;
  let errors = 0;
  let keysSent = 0;
  let keysAccepted = 0;
  let keysDropped = 0;
  let keysAcceptedAll = 0;
  const rounds = new Uint32Array(agents.length).fill(config.firstRound ?? 0);
  let measureFrom = Number.POSITIVE_INFINITY;
  const transport =
    config.transport === 'stream'
      ? streamTransport(config, agents, () => {
          if (performance.now() >= measureFrom) errors++;
        })
      : config.transport === 'ws'
        ? wsTransport(config, agents)
        : postTransport(config, agents);
  await transport.connect?.();
  const loopDelay = monitorEventLoopDelay({ resolution: 5 });
  loopDelay.enable();
  const start = performance.now();
  measureFrom = start + (config.rampMs ?? 0);
  let measuredFrom = Number.POSITIVE_INFINITY;
  let window: ReturnType<typeof cpuWindow> | undefined;
  const windowTimer = setTimeout(() => {
    window = cpuWindow(config.baseUrl, config.serverPid);
  }, config.rampMs ?? 0);
  const send = async (index: number, scheduledAt: number): Promise<void> => {
    const measured = scheduledAt >= measureFrom;
    if (measured && scheduledAt < measuredFrom) measuredFrom = scheduledAt;
    try {
      const answer = await transport.send(index, rounds[index]!++);
      keysAcceptedAll += answer.accepted;
      if (!measured) return;
      statuses[answer.status] = (statuses[answer.status] ?? 0) + 1;
      keysAccepted += answer.accepted;
      keysDropped += answer.dropped;
    } catch {
      if (measured) errors++;
    } finally {
      if (measured) {
        requests++;
        keysSent += config.keys.length;
        latencies.push(performance.now() - scheduledAt);
      }
    }
  };

  if (config.mode === 'closed') {
    const perAgentLoops = config.transport === 'stream' || config.transport === 'ws';
    let next = 0;
    const deadline = start + config.durationMs;
    const limit = config.requests ?? Number.POSITIVE_INFINITY;
    let issued = 0;
    await Promise.all(
      Array.from({ length: config.concurrency }, async (_, loop) => {
        while (performance.now() < deadline && issued < limit) {
          issued++;
          // Over a stream each loop keeps to its own agent (one loop per agent: one report in flight each).
          const index = perAgentLoops ? loop % agents.length : next++ % agents.length;
          await send(index, performance.now());
        }
      }),
    );
  } else if (config.mode === 'burst') {
    const at = performance.now();
    await Promise.all(agents.map((_, index) => send(index, at)));
  } else {
    // Open loop: agent i reports at i/N of each interval, timed from when it
    // was due, so a slow server shows as latency (no coordinated omission).
    const inFlight = new Set<Promise<void>>();
    const perMs = agents.length / config.intervalMs;
    const end = start + config.durationMs;
    let due = 0;
    await new Promise<void>((resolve) => {
      const tick = setInterval(() => {
        const now = performance.now();
        const target = Math.floor((Math.min(now, end) - start) * perMs);
        for (; due < target; due++) {
          const scheduledAt = start + due / perMs;
          const p = send(due % agents.length, scheduledAt);
          inFlight.add(p);
          void p.finally(() => inFlight.delete(p));
        }
        if (now >= end) {
          clearInterval(tick);
          resolve();
        }
      }, 2);
    });
    await Promise.all(inFlight);
  }
  const seconds = (performance.now() - Math.min(measuredFrom, performance.now())) / 1000;
  clearTimeout(windowTimer);
  const windowFigures = await (await window)?.end();
  const stream = transport.stream?.();
  await transport.close();
  const result: LoadResult = {
    requests,
    statuses,
    errors,
    keysSent,
    keysAccepted,
    keysDropped,
    keysAcceptedAll,
    seconds,
    requestsPerSecond: requests / seconds,
    keysAcceptedPerSecond: keysAccepted / seconds,
    latencyMs: summarize(latencies),
    ...(config.keepLatencies ? { latencies } : {}),
    generatorLoopDelayMs: { p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6 },
    generatorCpuSeconds: (process.cpuUsage().user + process.cpuUsage().system) / 1e6,
    ...(windowFigures ? { windowCpuSeconds: windowFigures.cpu, windowStallsMs: windowFigures.stalls } : {}),
    ...(stream ? { stream } : {}),
  };
  process.stdout.write(`${JSON.stringify({ event: 'result', result })}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`loadgen: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
