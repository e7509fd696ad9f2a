// The history scenario: the flush's cost as workspace_agent_metadata grows.
// A fleet only ever adds agents, so a flush whose cost followed the table's
// size (a hash join reading all of it, as the planner once chose for large
// batches) would slow down for good. The pool's planner settings
// (database.ts) keep each row's lookup on the primary key: this checks that a
// flush costs what its batch costs, whatever the table holds.

import { randomInt } from 'node:crypto';
import type pg from 'pg';
import type { MetadataBatch } from '../../batch.js';
import { DEFAULT_NOTIFY_CHANNEL } from '../../config.js';
import { createPool, databaseUrlFor, dropDatabase, migrate, recreateDatabase } from '../../database.js';
import { provisionAgents } from '../../provision.js';
import { MetadataStore } from '../../store.js';
import { BATCH_SIZE, log, progress, type Context, type Scenario } from '../context.js';
import { roundSummary } from '../figures.js';
import type { Options } from '../options.js';
import { round, summarize } from '../stats.js';
import { check, fmt } from '../table.js';

/** A database of its own: a million rows would change what every other scenario measures. */
const DATABASE = 'metabatch_bench_history';
/** The large batch: BATCH_SIZE's upper range in production (at most the table's rows). */
const LARGE_BATCH = 20_000;
/** µs per row at the largest table within this fraction of the smallest's. */
const TOLERANCE = 0.25;
/** Agents provisioned per step: one progress line each. */
const PROVISION_STEP = 10_000;

function plan(options: Options) {
  return options.quick
    ? { tableRows: [1_000, 10_000, 50_000], smallBatches: 10, largeBatches: 3 }
    : { tableRows: [10_000, 100_000, 1_000_000], smallBatches: 30, largeBatches: 5 };
}

/**
 * At each size of the table, the real flush (MetadataStore.updateMetadata,
 * with its NOTIFYs) of batches of BATCH_SIZE rows and of LARGE_BATCH rows,
 * each a run of consecutive agents (scattered over the primary key: their ids
 * are random) at a random offset, with all their keys and a new collected_at.
 */
async function measure(context: Context) {
  const { keys, options } = context;
  const { tableRows, smallBatches, largeBatches } = plan(options);
  progress(`history: the flush at ${tableRows.map((n) => fmt(n)).join(' / ')} rows in the table`);
  const owner = decodeURIComponent(new URL(context.databaseUrl).username);
  await recreateDatabase(context.adminUrl, DATABASE, undefined, owner);
  const url = databaseUrlFor(context.databaseUrl, DATABASE);
  // The service's pool: its planner settings and asynchronous commit.
  const pool = createPool(url, log, { asyncCommit: true });
  try {
    await migrate(pool, log);
    const store = new MetadataStore(pool, { notifyChannel: DEFAULT_NOTIFY_CHANNEL });
    const agentIds: string[] = [];
    let clock = Date.now() * 1000;
    let batchNumber = 0;
    const flushes = async (batchRows: number, count: number) => {
      const perBatch = Math.max(1, Math.floor(batchRows / keys.length));
      const durations: number[] = [];
      // One more first, uncounted: the plan, the pool's connection, the cache after VACUUM.
      for (let b = -1; b < count; b++) {
        const first = randomInt(0, agentIds.length - perBatch + 1);
        const batch = batchOf(agentIds.slice(first, first + perBatch), keys, `history-${batchNumber++}`, ++clock);
        const t0 = performance.now();
        await store.updateMetadata(batch);
        if (b >= 0) durations.push(performance.now() - t0);
      }
      const summary = summarize(durations);
      const rows = perBatch * keys.length;
      return {
        batchRows: rows,
        batches: count,
        msPerBatch: round(summary.p50),
        usPerRow: round((summary.p50 * 1000) / rows),
        durationMs: roundSummary(summary),
      };
    };
    const sizes = [];
    for (const target of tableRows) {
      await grow(pool, agentIds, Math.ceil(target / keys.length), keys);
      const rows = agentIds.length * keys.length;
      progress(
        `history: ${fmt(rows)} rows: ${smallBatches} flushes of ${BATCH_SIZE}, ${largeBatches} of ${fmt(Math.min(LARGE_BATCH, rows))}`,
      );
      const small = await flushes(BATCH_SIZE, smallBatches);
      const large = await flushes(Math.min(LARGE_BATCH, rows), largeBatches);
      sizes.push({ tableRows: rows, agents: agentIds.length, small, large });
    }
    const first = sizes[0]!;
    const last = sizes.at(-1)!;
    const ratio = (pick: (size: typeof first) => { usPerRow: number }) =>
      round(pick(last).usPerRow / pick(first).usPerRow, 3);
    const smallRatio = ratio((s) => s.small);
    const largeRatio = ratio((s) => s.large);
    const within = (r: number) => Math.abs(r - 1) <= TOLERANCE;
    return {
      sizes,
      // µs per row at the largest table over µs per row at the smallest.
      smallRatio,
      largeRatio,
      tolerance: TOLERANCE,
      smallWithin: within(smallRatio),
      largeWithin: within(largeRatio),
    };
  } finally {
    await pool.end();
    // A million rows need not outlive the measurement (the embedded server goes anyway, a DATABASE_URL's does not).
    await dropDatabase(context.adminUrl, DATABASE);
  }
}

/** Adds agents, all declaring `keys`, until there are `agents`; then VACUUM ANALYZE, as autovacuum would have by then. */
async function grow(pool: pg.Pool, agentIds: string[], agents: number, keys: readonly string[]): Promise<void> {
  while (agentIds.length < agents) {
    const count = Math.min(PROVISION_STEP, agents - agentIds.length);
    for (const agent of await provisionAgents(pool, count, keys, `history-${agentIds.length}`)) agentIds.push(agent.id);
    if (agents > PROVISION_STEP) progress(`history: provisioned ${fmt(agentIds.length)} of ${fmt(agents)} agents`);
  }
  await pool.query('VACUUM ANALYZE');
}

/** Every key of these agents, with a new value and collected_at (epoch µs). */
function batchOf(agentIds: readonly string[], keys: readonly string[], value: string, at: number): MetadataBatch {
  const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAtMicros: [] };
  for (const id of agentIds) {
    for (const key of keys) {
      batch.agentIds.push(id);
      batch.keys.push(key);
      batch.values.push(value);
      batch.errors.push('');
      batch.collectedAtMicros.push(at);
    }
  }
  return batch;
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(h: Figures): string[][] {
  const first = h.sizes[0]!;
  const last = h.sizes.at(-1)!;
  const cell = (f: { msPerBatch: number; usPerRow: number }) => `${f.msPerBatch} / ${f.usPerRow}`;
  return [
    [
      'history (flush cost as the table grows)',
      `${BATCH_SIZE} rows a batch`,
      `${fmt(LARGE_BATCH)} rows a batch`,
      '',
      'target',
    ],
    ...h.sizes.map((size) => [
      `  ${fmt(size.tableRows)} rows: ms per batch / µs per row`,
      cell(size.small),
      // At most the table's rows: smaller at the smallest table.
      size.large.batchRows === LARGE_BATCH
        ? cell(size.large)
        : `${cell(size.large)} (${fmt(size.large.batchRows)} a batch)`,
      '',
      '',
    ]),
    [
      `  µs per row at ${fmt(last.tableRows)} rows / at ${fmt(first.tableRows)}`,
      `${h.smallRatio}x`,
      `${h.largeRatio}x`,
      '',
      `within ±${h.tolerance * 100} %: ${check(h.smallWithin)} / ${check(h.largeWithin)}`,
    ],
  ];
}

export const history: Scenario<Figures> = { name: 'history', run: measure, rows };
