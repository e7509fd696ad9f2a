// The overload scenario: far more than the service can take, and every key
// accounted for.

import { setTimeout as sleep } from 'node:timers/promises';
import { BATCH_SIZE, progress, type Context, type Scenario } from '../context.js';
import { summarizeLoad } from '../figures.js';
import { load, startServer } from '../processes.js';
import { since } from '../scrape.js';
import { check, fmt } from '../table.js';

/**
 * Far more than the service can take: 256 connections post as fast as they
 * can until `overloadRequests` requests (10x, or in the full run 100x, the
 * channel's capacity in keys) have been sent. Every key sent must be counted
 * as accepted or dropped, and the service's own counters must agree.
 */
async function measure(context: Context) {
  const requests = context.options.overloadRequests;
  progress(`overload: ${requests} requests x ${context.keys.length} keys from 256 connections`);
  const server = await startServer('service', context);
  try {
    const before = await server.metrics();
    const run = await load(context, server.url, {
      mode: 'closed',
      concurrency: 256,
      durationMs: 600_000,
      requests,
      firstRound: 3_000_000,
    });
    await sleep(context.options.flushIntervalMs + 200);
    const delta = since(before, await server.metrics());
    const droppedByService =
      delta('metabatch_metadata_dropped_keys_total') + delta('metabatch_metadata_held_limit_refused_keys_total');
    return {
      ...summarizeLoad(run),
      channelCapacity: BATCH_SIZE * 5,
      droppedCountedByService: droppedByService,
      acceptedPlusDroppedEqualsSent: run.keysAccepted + run.keysDropped === run.keysSent && run.errors === 0,
      serviceCountsAgree: droppedByService === run.keysDropped,
      peakRssMb: server.peakRssMb(),
    };
  } finally {
    await server.stop();
  }
}

type Figures = Awaited<ReturnType<typeof measure>>;

function rows(o: Figures): string[][] {
  return [
    [`overload (${fmt(o.requests)} requests, 256 connections)`, 'ours', '', '', ''],
    [
      '  keys sent = accepted + dropped',
      `${fmt(o.keysSent)} = ${fmt(o.keysAccepted)} + ${fmt(o.keysDropped)}`,
      '',
      '',
      `exact ${check(o.acceptedPlusDroppedEqualsSent && o.serviceCountsAgree)}`,
    ],
    ['  requests/s, 429s', `${fmt(o.requestsPerSecond)}, ${fmt(o.statuses['429'] ?? 0)}`, '', '', ''],
    ['  peak RSS MB', fmt(o.peakRssMb, 1), '', '', `<= 256 ${check(o.peakRssMb <= 256)}`],
  ];
}

export const overload: Scenario<Figures> = { name: 'overload', run: measure, rows };
