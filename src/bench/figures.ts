// The load generator's results as the report prints them: rounded, and
// pooled when a measurement is made of several runs.

import type { LoadResult } from './loadgen.js';
import { round, summarize, type Summary } from './stats.js';

/** One run's figures in the JSON report. */
export type LoadFigures = ReturnType<typeof summarizeLoad>;

export function summarizeLoad(run: LoadResult) {
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

export function roundSummary(s: Summary): Summary {
  return { count: s.count, p50: round(s.p50), p99: round(s.p99), max: round(s.max), mean: round(s.mean) };
}

/** Several runs as one: totals, and percentiles over every request. */
export function poolRuns(runs: LoadResult[]): LoadResult {
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
