// The burst scenario: every agent at once, and how long until the last of
// it is flushed.

import { setTimeout as sleep } from 'node:timers/promises';
import { progress, type Context, type Scenario } from '../context.js';
import { summarizeLoad } from '../figures.js';
import type { Options } from '../options.js';
import { load, startServer } from '../processes.js';
import { since } from '../scrape.js';
import { round } from '../stats.js';
import { check, fmt } from '../table.js';

/** Every agent posts at the same moment. */
async function measure(context: Context) {
  progress(`burst: ${context.options.agents} agents post at once`);
  const server = await startServer('service', context);
  try {
    await load(context, server.url, { mode: 'burst' });
    await sleep(500);
    const before = await server.metrics();
    const t0 = performance.now();
    const run = await load(context, server.url, { mode: 'burst', firstRound: 2_000_000 });
    // Until every accepted key has been flushed.
    let drainedMs = 0;
    for (let i = 0; i < 400; i++) {
      const flushed = since(before, await server.metrics())('metabatch_metadata_flushed_total');
      if (flushed >= run.keysAccepted) {
        drainedMs = performance.now() - t0;
        break;
      }
      await sleep(25);
    }
    return {
      ...summarizeLoad(run),
      allFlushedAfterMs: round(drainedMs, 0),
      // The last keys wait for the timer: bounded by FLUSH_INTERVAL_MS after the last answer.
      lastFlushAfterLastAnswerMs: round(drainedMs - run.seconds * 1000, 0),
      peakRssMb: server.peakRssMb(),
    };
  } finally {
    await server.stop();
  }
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(b: Figures, options: Options): string[][] {
  const bound = options.flushIntervalMs + 50;
  return [
    [`burst (every agent at once)`, 'ours', '', '', ''],
    ['  requests, 429s', `${fmt(b.requests)}, ${fmt(b.statuses['429'] ?? 0)}`, '', '', ''],
    ['  latency p50 / p99 / max ms', `${b.latencyMs.p50} / ${b.latencyMs.p99} / ${b.latencyMs.max}`, '', '', ''],
    [
      '  all flushed after ms (from the burst / from its last answer)',
      `${fmt(b.allFlushedAfterMs)} / ${fmt(b.lastFlushAfterLastAnswerMs)}`,
      '',
      '',
      `<= ${bound} after the last answer ${check(b.allFlushedAfterMs > 0 && b.lastFlushAfterLastAnswerMs <= bound)}`,
    ],
    ['  peak RSS MB', fmt(b.peakRssMb, 1), '', '', ''],
  ];
}

export const burst: Scenario<Figures> = { name: 'burst', run: measure, rows };
