// The ingest limit: requests/s of the service's ingest route against the bare
// Fastify route, closed loop, and where the CPU went for each.

import { cpuSecondsSince, cpuTicks, postgresPids } from '../cpu.js';
import { progress, type Context, type Scenario } from '../context.js';
import { poolRuns, summarizeLoad } from '../figures.js';
import type { LoadResult } from '../loadgen.js';
import { load, startServer } from '../processes.js';
import { since } from '../scrape.js';
import { round } from '../stats.js';
import { check, fmt } from '../table.js';

/**
 * Requests/s, closed loop, of the bare Fastify route against the service,
 * same body, same generator: both servers run side by side and are loaded in
 * alternating rounds, so that this machine's drifts hit both alike.
 */
async function measure(context: Context) {
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
    const oursEntry = {
      ...summarizeLoad(poolRuns(runs.ours)),
      database_statements_total: delta('metabatch_database_statements_total'),
      metadata_flushed_total: delta('metabatch_metadata_flushed_total'),
      metadata_dropped_keys_total: delta('metabatch_metadata_dropped_keys_total'),
    };
    const rawEntry = summarizeLoad(poolRuns(runs.raw));
    const perRound = runs.ours.map((run, i) => round(run.requestsPerSecond / runs.raw[i]!.requestsPerSecond, 3));
    return {
      concurrency: options.concurrency,
      seconds: options.closedS,
      rounds,
      raw: rawEntry,
      ours: oursEntry,
      ratio: round(oursEntry.requestsPerSecond / rawEntry.requestsPerSecond, 3),
      ratioPerRound: perRound,
      cpuPerThousandRequests: { ours: perThousand('ours'), raw: perThousand('raw') },
    };
  } finally {
    await ours.stop();
    await raw.stop();
  }
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(ingest: Figures): string[][] {
  const cpuRow = (c: { serverMs: number; postgresMs: number; generatorMs: number }) =>
    `${c.serverMs} / ${c.postgresMs} / ${c.generatorMs}`;
  return [
    ['ingest (closed loop)', 'ours', 'raw Fastify', 'ratio', 'target'],
    [
      '  requests/s',
      fmt(ingest.ours.requestsPerSecond),
      fmt(ingest.raw.requestsPerSecond),
      `${ingest.ratio}x`,
      `>= 0.85x ${check(ingest.ratio >= 0.85)}`,
    ],
    ['  keys accepted/s', fmt(ingest.ours.keysAcceptedPerSecond), '-', '', ''],
    [
      '  latency p50 / p99 / max ms',
      `${ingest.ours.latencyMs.p50} / ${ingest.ours.latencyMs.p99} / ${ingest.ours.latencyMs.max}`,
      `${ingest.raw.latencyMs.p50} / ${ingest.raw.latencyMs.p99} / ${ingest.raw.latencyMs.max}`,
      '',
      '',
    ],
    ['  429s', fmt(ingest.ours.statuses['429'] ?? 0), '-', '', ''],
    [
      '  CPU ms per 1000 req: server / Postgres / generator',
      cpuRow(ingest.cpuPerThousandRequests.ours),
      cpuRow(ingest.cpuPerThousandRequests.raw),
      '',
      '',
    ],
  ];
}

export const ingest: Scenario<Figures> = { name: 'ingest', run: measure, rows };
