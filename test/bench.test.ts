// `npm run bench -- --quick` works end to end: a smoke test, with no speed
// assertions (figures come from the benchmark's printout, never from a test).
// What it asserts is bookkeeping that must hold at any speed.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI, run } from './support/process.js';

describe('metabatch bench --quick', () => {
  it('runs every scenario, prints the table and writes the figures as JSON', async () => {
    const json = path.join(os.tmpdir(), `metabatch-bench-${process.pid}.json`);
    const bench = run('node', [CLI, 'bench', '--quick', '--json', json], {});
    const { code } = await bench.exited;
    expect(code, bench.stderr()).toBe(0);
    expect(bench.stdout()).toMatch(/^metabatch bench: Node v\d+/m);
    for (const section of [
      'ingest (closed loop)',
      'flush (500 rows a batch)',
      'flush of 20,000 rows: event-loop delay max ms',
      "parameter building CPU ms per 20,000 rows: ours / pg's",
      'steady (',
      'burst (',
      'overload (',
      'history (flush cost as the table grows)',
      'stream vs POST (closed loop, 49 agents x 10 keys)',
      '  reports/s, createReporter (one in flight per agent)',
      '  reports/s, raw WebSockets, 4 in flight per agent',
      'stream at 500 agents x 10 keys / 1000 ms',
      '  ack latency p50 / p99 / max ms',
      'capacity (agents x 10 keys / 500 ms, open loop)',
      '  sustained: p99 <= 50 ms, no errors, no keys dropped',
      '  POST ',
      '  stream (createReporter) ',
      '  naive (UPDATE + NOTIFY per report) ',
    ]) {
      expect(bench.stdout()).toContain(section);
    }
    const report = JSON.parse(await fs.readFile(json, 'utf8'));
    await fs.rm(json, { force: true });
    expect(report.ingest.raw.requestsPerSecond).toBeGreaterThan(0);
    expect(report.ingest.ours.requestsPerSecond).toBeGreaterThan(0);
    expect(report.flush.raw.rowsPerSecond).toBeGreaterThan(0);
    expect(report.flush.ours.rowsPerSecond).toBeGreaterThan(0);
    // One capacity flush per batch fed, each with its own reading of the loop.
    const { stall } = report.flush;
    expect(stall.batchSize).toBe(20_000);
    expect(stall.flushMs.count).toBe(stall.flushes);
    expect(stall.loopDelayMaxMsPerFlush).toHaveLength(stall.flushes);
    expect(stall.loopDelayMaxMs).toBe(Math.max(...stall.loopDelayMaxMsPerFlush));
    expect(stall.parameterCpuMs.rows).toBe(20_000);
    expect(stall.parameterCpuMs.ours).toBeGreaterThan(0);
    expect(stall.parameterCpuMs.pg).toBeGreaterThan(0);
    expect(report.steady.ours.statements).toBeGreaterThan(0);
    expect(report.steady.naive.statementsPerKey).toBeGreaterThan(report.steady.ours.statementsPerKey);
    expect(report.steady.ours.freshness.postToNotifyMs.count).toBeGreaterThan(0);
    // Every key sent is accounted for, and the service's own count agrees.
    expect(report.overload.keysSent).toBe(report.overload.keysAccepted + report.overload.keysDropped);
    expect(report.overload.acceptedPlusDroppedEqualsSent).toBe(true);
    expect(report.overload.serviceCountsAgree).toBe(true);
    expect(report.overload.peakRssMb).toBeGreaterThan(0);
    // The table grew as planned (--quick sizes), and every batch was of the size it says.
    expect(report.history.sizes.map((s: { tableRows: number }) => s.tableRows)).toEqual([1_000, 10_000, 50_000]);
    for (const size of report.history.sizes) {
      expect(size.small.batchRows).toBe(500);
      expect(size.small.durationMs.count).toBe(size.small.batches);
      expect(size.large.batchRows).toBe(Math.min(20_000, size.tableRows));
      expect(size.large.durationMs.count).toBe(size.large.batches);
      expect(size.large.msPerBatch).toBeGreaterThan(0);
    }
    // Each ratio is µs per row at the largest table over µs per row at the smallest, and "within" says
    // whether it is within the tolerance: the verdict the table prints is the one its figures give.
    const { history } = report;
    const [smallest, largest] = [history.sizes[0], history.sizes.at(-1)];
    expect(history.smallRatio).toBeCloseTo(largest.small.usPerRow / smallest.small.usPerRow, 2);
    expect(history.largeRatio).toBeCloseTo(largest.large.usPerRow / smallest.large.usPerRow, 2);
    expect(history.smallWithin).toBe(Math.abs(history.smallRatio - 1) <= history.tolerance);
    expect(history.largeWithin).toBe(Math.abs(history.largeRatio - 1) <= history.tolerance);
    // The stream against POST on the same agents: every transport was measured, with the service's CPU.
    const { closed, steady: streamSteady } = report.stream;
    for (const transport of [closed.stream, closed.ws, closed.post]) {
      expect(transport.requests).toBeGreaterThan(0);
      expect(transport.serviceCpuUsPerReport).toBeGreaterThan(0);
    }
    expect(closed.stream.ratio).toBeGreaterThan(0);
    expect(closed.ws.ratio).toBeGreaterThan(0);
    // Under the steady load every agent reported over a stream of its own (no POST fallback), and every key it
    // sent was taken in the end (the reporter sends dropped keys again).
    expect(streamSteady.stream.streamsOpened).toBeGreaterThanOrEqual(streamSteady.agents);
    expect(streamSteady.stream.requests).toBeGreaterThan(0);
    expect(streamSteady.stream.keysAccepted).toBe(streamSteady.stream.keysSent);
    // The capacity search: each mode tried fleets, each step judged by the criterion's figures.
    for (const mode of ['post', 'stream', 'naive']) {
      const { steps } = report.capacity[mode];
      expect(steps.length).toBeGreaterThan(0);
      for (const step of steps) {
        const met = step.p99Ms <= 50 && step.errors === 0 && step.keysDropped === 0 && step.refusedReports === 0;
        expect(step.sustained, JSON.stringify(step)).toBe(met);
        // A step not sustained names the first criterion it failed, in the criterion's order.
        const firstFailed =
          step.errors > 0
            ? / errors$/
            : step.keysDropped > 0
              ? / keys dropped$/
              : step.refusedReports > 0
                ? / reports not answered 202$/
                : step.p99Ms > 50
                  ? /^p99 /
                  : undefined;
        if (firstFailed) expect(step.failed, JSON.stringify(step)).toMatch(firstFailed);
        else expect(step.failed, JSON.stringify(step)).toBeUndefined();
      }
    }
  }, 180_000);
});
