// Announcing adds (src/announcers.ts): sinks run after the store's NOTIFY,
// which stays in the flush statement, as the service wires it. Through the
// real store on Postgres and a real LISTEN, with the batcher's time on a fake
// clock: a second sink gets the same agents the NOTIFY named, and a failing
// one is retried and counted on its own, never holding up the flush, the
// NOTIFY or another sink.

import { describe, expect, it } from 'vitest';
import type { Announcer } from '../src/announcers.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { createHarness, rowsOf } from './support/harness.js';

const db = testDatabase();
const harness = closedAfterEach((options: Parameters<typeof createHarness>[1] = {}) => createHarness(db, options));

const at = (iso: string) => new Date(iso);
const sorted = (ids: readonly string[]) => [...ids].sort();

/** A sink standing for Redis or a webhook: records each call; it can fail, or wait at a gate. */
class RecordingSink implements Announcer {
  calls: string[][] = [];
  failures = 0;
  gate: Promise<void> | undefined;
  private called: (() => void)[] = [];

  constructor(readonly sink: string) {}

  async publish(agentIds: readonly string[]): Promise<number> {
    this.calls.push([...agentIds]);
    for (const resolve of this.called.splice(0)) resolve();
    if (this.gate) await this.gate;
    if (this.failures > 0) {
      this.failures--;
      throw new Error(`${this.sink} unreachable (simulated)`);
    }
    return 1;
  }

  /** Resolves at its next call. */
  nextCall(): Promise<void> {
    return new Promise((resolve) => this.called.push(resolve));
  }
}

describe('announcers after the store’s NOTIFY', () => {
  it('gives a second sink the agents the NOTIFY named, after the LISTEN has them', async () => {
    const second = new RecordingSink('redis');
    const h = await harness({ announcers: [second] });
    const agents = await db.createAgents(400);
    const t = at('2026-11-23T00:00:01Z');
    for (const id of agents) h.batcher.add(id, ['key1'], ['v'], [''], [t]);
    await h.batcher.idle();

    // The second sink waits: the UPDATE and its NOTIFY are done without it.
    let release!: () => void;
    second.gate = new Promise((resolve) => (release = resolve));
    const called = second.nextCall();
    h.clock.tick(5000);
    await Promise.race([
      called,
      h.batcher.idle().then(() => Promise.reject(new Error('the flush ended without calling the second sink'))),
    ]);
    await h.waitForPayloads(2);
    expect(h.payloads.map((p) => p.length)).toEqual([363, 37]);
    expect((await rowsOf(db, agents)).filter((r) => r.includes('|v|'))).toHaveLength(400);
    release();
    await h.batcher.idle();

    // One call with exactly the agents of the two payloads.
    expect(second.calls).toHaveLength(1);
    expect(sorted(second.calls[0]!)).toEqual(sorted(h.payloads.flat()));
    expect(sorted(second.calls[0]!)).toEqual(sorted(agents));
    // The NOTIFY's payloads are the store's; the second sink's messages are not NOTIFY payloads.
    expect(await h.metric('metabatch_metadata_notify_payloads_total')).toBe(2);
    expect(h.publisher.calls).toHaveLength(0);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(400);
    for (const sink of ['notify', 'redis']) {
      expect(await h.metric('metabatch_metadata_publish_errors_total', { sink })).toBe(0);
      expect(await h.metric('metabatch_metadata_notify_given_up_agents_total', { sink })).toBe(0);
    }
  });

  it('retries and counts a failing sink on its own: the flush, the NOTIFY and another sink go on', async () => {
    const failing = new RecordingSink('redis');
    const working = new RecordingSink('webhook');
    const h = await harness({ announcers: [failing, working], backoff: { random: () => 1 } });
    const [agent1, agent2, agent3] = await db.createAgents(3);
    failing.failures = 2;
    h.batcher.add(agent1!, ['key1'], ['v1'], [''], [at('2026-11-23T00:00:01Z')]);
    await h.advance(5000);

    // The flush succeeded and was announced by the NOTIFY and the working sink.
    expect(h.batcher.flushesFailing).toBe(false);
    expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(0);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(1);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(1);
    expect(await rowsOf(db, [agent1!])).toEqual([`${agent1}|key1|v1||2026-11-23T00:00:01.000Z`]);
    await h.waitForPayloads(1);
    expect(h.payloads).toEqual([[agent1]]);
    expect(working.calls).toEqual([[agent1]]);
    expect(failing.calls).toEqual([[agent1]]);
    // Counted under its own sink, and nowhere else.
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'redis' })).toBe(1);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'webhook' })).toBe(0);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'notify' })).toBe(0);

    // Its retries come on its own backoff (random() = 1: 100 ms, then 200 ms).
    await h.advance(99);
    expect(failing.calls).toHaveLength(1);
    await h.advance(1);
    expect(failing.calls).toEqual([[agent1], [agent1]]);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'redis' })).toBe(2);

    await h.advance(199);
    expect(failing.calls).toHaveLength(2);
    await h.advance(1);
    expect(failing.calls).toEqual([[agent1], [agent1], [agent1]]);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'redis' })).toBe(2);
    // The retries wrote nothing and announced nothing again on the other sinks.
    expect(h.store.calls).toHaveLength(1);
    expect(h.payloads).toEqual([[agent1]]);
    expect(working.calls).toEqual([[agent1]]);

    // It owes nothing now: the next flush gives it its own agent only, and it fails once more.
    failing.failures = 1;
    h.batcher.add(agent2!, ['key1'], ['v2'], [''], [at('2026-11-23T00:00:02Z')]);
    await h.advance(5000);
    expect(h.store.calls).toHaveLength(2);
    await h.waitForPayloads(2);
    expect(h.payloads).toEqual([[agent1], [agent2]]);
    expect(working.calls).toEqual([[agent1], [agent2]]);
    expect(failing.calls[3]).toEqual([agent2]);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'redis' })).toBe(3);

    // A report held meanwhile is flushed by its retry timer, not later: its
    // agent goes to the NOTIFY and the working sink alone, and to the failing
    // sink with the agent it still owes.
    h.batcher.add(agent3!, ['key1'], ['v3'], [''], [at('2026-11-23T00:00:03Z')]);
    await h.advance(100);
    expect(h.store.calls).toHaveLength(3);
    await h.waitForPayloads(3);
    expect(h.payloads).toEqual([[agent1], [agent2], [agent3]]);
    expect(working.calls).toEqual([[agent1], [agent2], [agent3]]);
    expect(failing.calls).toHaveLength(5);
    expect(sorted(failing.calls[4]!)).toEqual(sorted([agent2!, agent3!]));
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'redis' })).toBe(3);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'webhook' })).toBe(0);
    expect(await h.metric('metabatch_metadata_publish_errors_total', { sink: 'notify' })).toBe(0);
    expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(0);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(3);
  });

  it('refuses two announcers with one sink name (their counts would mix)', async () => {
    await expect(harness({ announcers: [new RecordingSink('redis'), new RecordingSink('redis')] })).rejects.toThrow(
      /two announcers share the sink name "redis"/,
    );
  });
});
