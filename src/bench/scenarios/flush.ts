// The flush limit: rows/s of the raw UPDATE against the batcher's whole flush
// path, run in this process (no server, no HTTP), batch for batch.

import { Registry } from 'prom-client';
import { Batcher, type MetadataBatch, type UpdateResult } from '../../batcher.js';
import { DEFAULT_NOTIFY_CHANNEL } from '../../config.js';
import { BatcherMetrics } from '../../metrics.js';
import { flushParameters } from '../../arrayLiterals.js';
import { guardedUpdate, MetadataStore, updateMetadataReturningAgents } from '../../store.js';
import { BATCH_SIZE, log, progress, type Context, type Scenario } from '../context.js';
import { roundSummary } from '../figures.js';
import { round, summarize } from '../stats.js';
import { check, fmt } from '../table.js';

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
  };
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(flush: Figures): string[][] {
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
  ];
}

export const flush: Scenario<Figures> = { name: 'flush', run: measure, rows };
