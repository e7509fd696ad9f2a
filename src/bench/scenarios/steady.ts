// The steady scenario: every agent reports on its interval, open loop, as in
// production. The service and the naive mode (one UPDATE + NOTIFY per
// request) take the same load in turn; probe agents time freshness.

import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { subscribe } from '../../client.js';
import { progress, type Agent, type Context, type Scenario } from '../context.js';
import { roundSummary, summarizeLoad, type LoadFigures } from '../figures.js';
import { load, startServer } from '../processes.js';
import { since } from '../scrape.js';
import { round, summarize, type Summary } from '../stats.js';
import { check, fmt } from '../table.js';

// Postgres publishes an idle backend's counters within 10 s
// (PGSTAT_IDLE_INTERVAL): wait that long before reading them.
const STATS_SETTLE_MS = 11_000;

// How often a probe looks for its row: the figure's resolution. Finer
// polling would itself load the two cores it measures.
const POLL_MS = 5;

/**
 * The figures of one mode under the steady load. Only the service's have
 * flush, freshness, serviceEventLoopLagMs and serviceGc; only the full run's
 * have transactionsCountedByPostgres. The optional fields are set one by one,
 * in the order the JSON shows them.
 */
interface ModeFigures extends LoadFigures {
  statements: number;
  keysAcceptedInWindow: number;
  statementsPerKey: number;
  peakRssMb: number;
  transactionsCountedByPostgres?: number;
  flush?: Record<string, number>;
  freshness?: { postToNotifyMs: Summary; postToRowVisibleMs: Summary };
  serviceEventLoopLagMs?: { p99: number; max: number };
  serviceGc?: { kind: string; count: number; seconds: number }[];
  generatorLoopDelayMs?: { p99: number; max: number };
}

/**
 * Every agent posts its keys every interval, open loop. Measures ingest
 * latency, flushes, freshness (POST -> NOTIFY, POST -> row visible, by probe
 * agents), SQL statements per accepted key against the naive mode under the
 * same load, and peak RSS.
 */
async function measure(context: Context) {
  const { options } = context;
  const modes: Partial<Record<'service' | 'naive', ModeFigures>> = {};
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
      const entry: ModeFigures = {
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
  const ours = modes.service!;
  const naive = modes.naive!;
  return {
    agents: options.agents,
    keys: options.keys,
    intervalMs: options.intervalMs,
    seconds: options.durationS,
    ours,
    naive,
    fewerStatementsThanNaive: round(naive.statementsPerKey / ours.statementsPerKey, 1),
  };
}

/** Committed transactions of the bench database, as Postgres counts them (each autocommit statement is one). */
async function transactions(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: string }>(
    `SELECT xact_commit + xact_rollback AS n FROM pg_stat_database WHERE datname = current_database()`,
  );
  return Number(rows[0]!.n);
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

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(s: Figures): string[][] {
  const { ours, naive } = s;
  const fresh = ours.freshness!;
  // Postgres's own count: the full run only.
  const counted =
    ours.transactionsCountedByPostgres === undefined
      ? []
      : [
          [
            '  statements: sent / Postgres counted',
            `${fmt(ours.statements)} / ${fmt(ours.transactionsCountedByPostgres)}`,
            `${fmt(naive.statements)} / ${fmt(naive.transactionsCountedByPostgres)}`,
            '',
            '',
          ],
        ];
  return [
    [
      `steady (${fmt(s.agents)} agents x ${s.keys} keys / ${s.intervalMs} ms, ${s.seconds} s)`,
      'ours',
      'naive',
      'ratio',
      'target',
    ],
    ['  requests/s', fmt(ours.requestsPerSecond), fmt(naive.requestsPerSecond), '', ''],
    [
      '  latency p50 / p99 / max ms',
      `${ours.latencyMs.p50} / ${ours.latencyMs.p99} / ${ours.latencyMs.max}`,
      `${naive.latencyMs.p50} / ${naive.latencyMs.p99} / ${naive.latencyMs.max}`,
      '',
      `p99 <= 15 ms ${check(ours.latencyMs.p99 <= 15)}`,
    ],
    [
      '  SQL statements per key',
      fmt(ours.statementsPerKey, 5),
      fmt(naive.statementsPerKey, 5),
      `${s.fewerStatementsThanNaive}x fewer`,
      `>= 100x ${check(s.fewerStatementsThanNaive >= 100)}`,
    ],
    ...counted,
    ['  batches/s, rows/s', `${fmt(ours.flush!.batchesPerSecond, 1)}, ${fmt(ours.flush!.rowsPerSecond)}`, '-', '', ''],
    ['  mean batch, mean flush ms', `${ours.flush!.meanBatchSize}, ${ours.flush!.meanFlushMs}`, '-', '', ''],
    [
      '  POST -> NOTIFY p50 / p99 ms',
      `${fresh.postToNotifyMs.p50} / ${fresh.postToNotifyMs.p99}`,
      '-',
      '',
      `p99 <= 50 ms (capacity flushes) ${check(fresh.postToNotifyMs.p99 <= 50)}`,
    ],
    [
      `  POST -> row visible p50 / p99 ms (±${POLL_MS})`,
      `${fresh.postToRowVisibleMs.p50} / ${fresh.postToRowVisibleMs.p99}`,
      '-',
      '',
      '',
    ],
    ['  peak RSS MB', fmt(ours.peakRssMb, 1), '-', '', ''],
  ];
}

export const steady: Scenario<Figures> = { name: 'steady', run: measure, rows };
