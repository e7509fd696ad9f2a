// The benchmark's load generator, run as its own process so that it does not
// share a core's event loop with the service: real HTTP over undici, each
// agent POSTing its keys with changing values. Prints one JSON line of
// results.

import { readFileSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Pool } from 'undici';
import { summarize, type Summary } from './stats.js';

export interface LoadConfig {
  baseUrl: string;
  /** JSON file of [{ id, token }]. */
  agentsFile: string;
  keys: string[];
  /** closed: `concurrency` loops as fast as they can; open: every agent every `intervalMs`; burst: every agent once, all at once. */
  mode: 'closed' | 'open' | 'burst';
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
}

export interface LoadResult {
  requests: number;
  statuses: Record<string, number>;
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
}

interface Agent {
  id: string;
  token: string;
}

async function main(): Promise<void> {
  const config = JSON.parse(readFileSync(process.argv[2]!, 'utf8')) as LoadConfig;
  const agents = JSON.parse(readFileSync(config.agentsFile, 'utf8')) as Agent[];
  const pool = new Pool(config.baseUrl, { connections: config.concurrency, pipelining: 1, keepAliveTimeout: 60_000 });
  const latencies: number[] = [];
  const statuses: Record<string, number> = {};
  let requests = 0;
  let errors = 0;
  let keysSent = 0;
  let keysAccepted = 0;
  let keysDropped = 0;
  let keysAcceptedAll = 0;
  const rounds = new Uint32Array(agents.length).fill(config.firstRound ?? 0);
  const loopDelay = monitorEventLoopDelay({ resolution: 5 });
  loopDelay.enable();
  const start = performance.now();

  const measureFrom = start + (config.rampMs ?? 0);
  let measuredFrom = Number.POSITIVE_INFINITY;
  const post = async (index: number, scheduledAt: number): Promise<void> => {
    const agent = agents[index]!;
    const measured = scheduledAt >= measureFrom;
    if (measured && scheduledAt < measuredFrom) measuredFrom = scheduledAt;
    const round = rounds[index]!++;
    let body = '{"metadata":[';
    for (let k = 0; k < config.keys.length; k++) {
      body += `${k === 0 ? '' : ','}{"key":"${config.keys[k]}","value":"${round}-${k}"}`;
    }
    body += ']}';
    try {
      const res = await pool.request({
        method: 'POST',
        path: `/v1/agents/${agent.id}/metadata`,
        headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json' },
        body,
      });
      const text = await res.body.text();
      const answer =
        res.statusCode === 202 || res.statusCode === 429
          ? (JSON.parse(text) as { accepted: number; dropped: number })
          : undefined;
      keysAcceptedAll += answer?.accepted ?? 0;
      if (!measured) return;
      statuses[res.statusCode] = (statuses[res.statusCode] ?? 0) + 1;
      if (answer) {
        keysAccepted += answer.accepted;
        keysDropped += answer.dropped;
      }
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
    let next = 0;
    const deadline = start + config.durationMs;
    const limit = config.requests ?? Number.POSITIVE_INFINITY;
    let issued = 0;
    await Promise.all(
      Array.from({ length: config.concurrency }, async () => {
        while (performance.now() < deadline && issued < limit) {
          issued++;
          const index = next++ % agents.length;
          await post(index, performance.now());
        }
      }),
    );
  } else if (config.mode === 'burst') {
    const at = performance.now();
    await Promise.all(agents.map((_, index) => post(index, at)));
  } else {
    // Open loop: agent i posts at i/N of each interval, timed from when it
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
          const p = post(due % agents.length, scheduledAt);
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
  await pool.close();
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
  };
  process.stdout.write(`${JSON.stringify({ event: 'result', result })}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`loadgen: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
