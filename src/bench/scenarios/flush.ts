// The flush limit: rows/s of the raw UPDATE against the batcher's whole flush
// path, run in this process (no server, no HTTP), batch for batch; and what a
// large flush does to the event loop the requests share with it.

import { monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks';
import { setImmediate as nextTurn } from 'node:timers/promises';
import pg from 'pg';
import { Registry } from 'prom-client';
import { Batcher, type MetadataBatch, type UpdateResult } from '../../batcher.js';
import { DEFAULT_NOTIFY_CHANNEL } from '../../config.js';
import { BatcherMetrics } from '../../metrics.js';
import { flushParameters } from '../../arrayLiterals.js';
import { provisionAgents } from '../../provision.js';
import { guardedUpdate, MetadataStore, updateMetadataReturningAgents } from '../../store.js';
import { BATCH_SIZE, log, progress, type Context, type Scenario } from '../context.js';
import { roundSummary } from '../figures.js';
import { round, summarize } from '../stats.js';
import { check, fmt } from '../table.js';

/** The store the service uses, with each flush's duration (ms) kept in `durations`. */
function timedStore(pool: pg.Pool) {
  const store = new MetadataStore(pool, { notifyChannel: DEFAULT_NOTIFY_CHANNEL });
  const durations: number[] = [];
  return {
    durations,
    store: {
      async updateMetadata(batch: MetadataBatch): Promise<UpdateResult> {
        const t0 = performance.now();
        try {
          return await store.updateMetadata(batch);
        } finally {
          durations.push(performance.now() - t0);
        }
      },
    },
  };
}

/**
 * Rows/s of the raw UPDATE at BATCH_SIZE, sent directly with pg, against our
 * whole flush path (the batcher's merge, its arrays, the guarded UPDATE that
 * also NOTIFYs) at the same batch size, in alternating blocks.
 */
async function measure(context: Context) {
  const { pool, agents, keys, options } = context;
  progress(`flush: raw UPDATE vs the batcher, ${options.flushRounds} batches of ${BATCH_SIZE} each`);
  const perBatch = BATCH_SIZE / keys.length;
  let clock = Date.now();
  const batchAt = (n: number) => {
    const first = (n * perBatch) % Math.max(1, agents.length - perBatch);
    const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAtMicros: [] };
    const at = ++clock * 1000;
    for (const agent of agents.slice(first, first + perBatch)) {
      for (const key of keys) {
        batch.agentIds.push(agent.id);
        batch.keys.push(key);
        batch.values.push(`flush-${n}`);
        batch.errors.push('');
        batch.collectedAtMicros.push(at);
      }
    }
    return batch;
  };
  const { store, durations: flushDurations } = timedStore(pool);
  const batcher = new Batcher({
    store,
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
            b.collectedAtMicros.slice(from, to),
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
        await pool.query(mode === 'bare' ? guardedUpdate : updateMetadataReturningAgents, await flushParameters(b));
        durations[mode].push(performance.now() - s);
      }
      spent[mode] += performance.now() - t0;
    }
  }
  await batcher.close();
  const stall = await measureStall(context, () => ++clock * 1000);
  const totalRows = perBlock * blocks * BATCH_SIZE;
  const figures = (mode: (typeof modes)[number]) => ({
    rowsPerSecond: round(totalRows / (spent[mode] / 1000), 0),
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
    stall,
  };
}

/** The largest batch the stall is measured at (BATCH_SIZE's upper range in production). */
const STALL_BATCH = 20_000;
/** pg's generic parameter encoding, which flushParameters replaced (its types do not declare `utils`). */
const { prepareValue } = (pg as unknown as { utils: { prepareValue: (value: unknown) => unknown } }).utils;

/**
 * The event loop during flushes of STALL_BATCH rows, and the CPU time of
 * their parameters against pg's generic encoding. Requests are answered on
 * the loop the flush runs on: a flush that holds it for long delays every
 * request in flight, however fast the UPDATE itself is.
 */
async function measureStall(context: Context, nextMicros: () => number) {
  const { pool, keys, options } = context;
  const perBatch = Math.ceil(STALL_BATCH / keys.length);
  let agents = context.agents;
  if (agents.length < perBatch) {
    // --quick (or a small --agents) provisions fewer agents than one batch takes.
    agents = [...agents, ...(await provisionAgents(pool, perBatch - agents.length, keys, 'flush-stall'))];
    await pool.query('VACUUM ANALYZE workspace_agent_metadata');
  }
  agents = agents.slice(0, perBatch);
  const flushes = options.quick ? 3 : 5;
  progress(`flush: event-loop delay during ${flushes} flushes of ${STALL_BATCH} rows`);
  const { store, durations: flushDurations } = timedStore(pool);
  const batcher = new Batcher({
    store,
    metrics: new BatcherMetrics(new Registry()),
    logger: log,
    batchSize: STALL_BATCH,
    flushIntervalMs: 3_600_000,
  });
  // The histogram records the time between its ticks (1 ms when nothing
  // holds the loop, so its max includes that 1 ms). The interval keeps a
  // JavaScript timer due every millisecond as well, as a busy server has.
  const loopDelay = monitorEventLoopDelay({ resolution: 1 });
  const ticker = setInterval(() => undefined, 1);
  const delayMaxMs: number[] = [];
  // The collector's pauses in the same windows: part of the delay, not the flush's own work.
  let measuring = false;
  let gcPauseMaxMs = 0;
  const gc = new PerformanceObserver((list) => {
    if (!measuring) return;
    for (const entry of list.getEntries()) gcPauseMaxMs = Math.max(gcPauseMaxMs, entry.duration);
  });
  gc.observe({ entryTypes: ['gc'] });
  try {
    for (let n = 0; n < flushes; n++) {
      const at = nextMicros();
      const values = keys.map((key) => `stall-${n}-${key}`);
      const errors = keys.map(() => '');
      const collectedAts = keys.map(() => at);
      loopDelay.reset();
      loopDelay.enable();
      measuring = true;
      // One report per turn, as requests arrive: the route's own work is
      // spread over the loop; what is left in one piece is the flush's.
      for (const agent of agents) {
        batcher.add(agent.id, keys, values, errors, collectedAts);
        await nextTurn();
      }
      await batcher.idle();
      loopDelay.disable();
      measuring = false;
      delayMaxMs.push(loopDelay.max / 1e6);
    }
  } finally {
    clearInterval(ticker);
    gc.disconnect();
    await batcher.close();
  }
  return {
    batchSize: STALL_BATCH,
    flushes,
    loopDelayMaxMs: round(Math.max(...delayMaxMs)),
    loopDelayMaxMsPerFlush: delayMaxMs.map((ms) => round(ms)),
    gcPauseMaxMs: round(gcPauseMaxMs),
    flushMs: roundSummary(summarize(flushDurations)),
    parameterCpuMs: await parameterCpu(agents, keys, nextMicros(), options.quick ? 3 : 7),
  };
}

/**
 * CPU ms (process.cpuUsage, the median of `rounds`, alternating) of one
 * flush's five parameters: ours (flushParameters) against pg's prepareValue
 * on the same arrays, the timestamps as Dates as it would take them.
 */
async function parameterCpu(agents: readonly { id: string }[], keys: readonly string[], at: number, rounds: number) {
  const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAtMicros: [] };
  for (const [i, agent] of agents.entries()) {
    for (const key of keys) {
      batch.agentIds.push(agent.id);
      batch.keys.push(key);
      batch.values.push(`value ${i} of ${key}`);
      batch.errors.push('');
      batch.collectedAtMicros.push(at);
    }
  }
  const dates = batch.collectedAtMicros.map((us) => new Date(us / 1000));
  const arrays = [batch.agentIds, batch.keys, batch.values, batch.errors, dates];
  const cpuMs = async (work: () => Promise<unknown>) => {
    const before = process.cpuUsage();
    await work();
    const used = process.cpuUsage(before);
    return (used.user + used.system) / 1000;
  };
  const ours: number[] = [];
  const theirs: number[] = [];
  // One of each first, uncounted: the JIT.
  for (let r = -1; r < rounds; r++) {
    const a = await cpuMs(() => flushParameters(batch));
    const b = await cpuMs(async () => arrays.map((array) => prepareValue(array)));
    if (r < 0) continue;
    ours.push(a);
    theirs.push(b);
  }
  return { rows: batch.keys.length, rounds, ours: round(summarize(ours).p50), pg: round(summarize(theirs).p50) };
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(flush: Figures): string[][] {
  const { stall } = flush;
  return [
    [`flush (${flush.batchSize} rows a batch)`, 'ours', 'raw UPDATE…RETURNING', 'ratio', 'target'],
    [
      '  rows/s',
      fmt(flush.ours.rowsPerSecond),
      fmt(flush.raw.rowsPerSecond),
      `${flush.ratio}x`,
      `>= 0.9x ${check(flush.ratio >= 0.9)}`,
    ],
    ['  batches/s', fmt(flush.ours.batchesPerSecond, 1), fmt(flush.raw.batchesPerSecond, 1), '', ''],
    [
      '  flush ms p50 / p99',
      `${flush.ours.durationMs.p50} / ${flush.ours.durationMs.p99}`,
      `${flush.raw.durationMs.p50} / ${flush.raw.durationMs.p99}`,
      '',
      '',
    ],
    ['  rows/s of the bare UPDATE (no RETURNING)', '', fmt(flush.bare.rowsPerSecond), `${flush.ratioToBare}x`, ''],
    [
      `  flush of ${fmt(stall.batchSize)} rows: event-loop delay max ms`,
      fmt(stall.loopDelayMaxMs, 2),
      '',
      '',
      `<= 10 ${check(stall.loopDelayMaxMs <= 10)}`,
    ],
    [`    of which the longest GC pause ms`, fmt(stall.gcPauseMaxMs, 2), '', '', ''],
    [
      `  parameter building CPU ms per ${fmt(stall.parameterCpuMs.rows)} rows: ours / pg's`,
      `${stall.parameterCpuMs.ours} / ${stall.parameterCpuMs.pg}`,
      '',
      `${round(stall.parameterCpuMs.ours / stall.parameterCpuMs.pg, 2)}x`,
      `<= 25 ${check(stall.parameterCpuMs.ours <= 25)}`,
    ],
  ];
}

export const flush: Scenario<Figures> = { name: 'flush', run: measure, rows };
