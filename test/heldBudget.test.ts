// While flushes fail, MAX_HELD_KEYS is shared by every agent: no agent may
// hold more than its declared keys, so one that posts keys it never declared
// cannot take the budget of the others.

import { describe, expect, it } from 'vitest';
import { UNREAD_AGENT_SHARE } from '../src/declaredKeys.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { outage } from './support/faults.js';
import { startTestService } from './support/service.js';

const db = testDatabase();
const serviceHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

const report = (pairs: Record<string, string>) => ({
  metadata: Object.entries(pairs).map(([key, value]) => ({ key, value })),
});

describe('the held budget during an outage', () => {
  it('holds only declared keys, so one agent posting undeclared keys leaves the others their 202s', async () => {
    const h = await serviceHarness({ env: { BATCH_SIZE: '10', MAX_HELD_KEYS: '20' } });
    const hostile = await h.agent(['cpu']);
    const web = await h.agent(['cpu', 'mem']);
    const db2 = await h.agent(['cpu', 'mem']);
    // Each agent reports once while the database answers: its declared keys are read then.
    for (const agent of [hostile, web, db2]) {
      expect((await h.post(agent.id, agent.token, report({ cpu: '1' }))).statusCode).toBe(202);
    }
    await h.service.declaredKeys.idle();
    await h.advance(5000);

    const restore = await outage(h.db);
    try {
      expect((await h.post(web.id, web.token, report({ cpu: '2' }))).statusCode).toBe(202);
      await h.advance(5000);
      expect(h.service.batcher.flushesFailing).toBe(true);

      // Six reports of ten keys never declared: 60 keys, three times MAX_HELD_KEYS.
      for (let i = 0; i < 6; i++) {
        const keys = Object.fromEntries(Array.from({ length: 10 }, (_, k) => [`junk-${i}-${k}`, 'x']));
        const res = await h.post(hostile.id, hostile.token, report(keys));
        expect(res.statusCode).toBe(429);
        expect(res.json()).toEqual({ accepted: 0, dropped: 10 });
      }
      expect(await h.metric('metabatch_metadata_undeclared_refused_keys_total')).toBe(60);
      expect(await h.metric('metabatch_metadata_held_limit_refused_keys_total')).toBe(0);

      // Everyone's declared keys are still held, the hostile agent's included.
      for (const [agent, pairs] of [
        [web, { cpu: '3', mem: '3G' }],
        [db2, { cpu: '4', mem: '4G' }],
        [hostile, { cpu: '5' }],
      ] as const) {
        const res = await h.post(agent.id, agent.token, report(pairs));
        expect(res.statusCode).toBe(202);
      }
    } finally {
      await restore();
    }
    h.service.batcher.retryNow();
    await h.advance(0);
    expect(h.service.batcher.flushesFailing).toBe(false);
    expect(await h.stored(web.id)).toMatchObject({ cpu: { value: '3' }, mem: { value: '3G' } });
    expect(await h.stored(db2.id)).toMatchObject({ cpu: { value: '4' }, mem: { value: '4G' } });
    expect(await h.stored(hostile.id)).toMatchObject({ cpu: { value: '5' } });
  });

  it('gives an agent whose definitions this replica never read a share of UNREAD_AGENT_SHARE keys', async () => {
    const h = await serviceHarness({ env: { BATCH_SIZE: '100', MAX_HELD_KEYS: '1000' } });
    const known = await h.agent(['cpu']);
    // Declared, never reported before the outage: this replica never read its keys.
    const unread = await h.agent(['cpu', 'mem']);
    expect((await h.post(known.id, known.token, report({ cpu: '1' }))).statusCode).toBe(202);
    await h.service.declaredKeys.idle();
    await h.advance(5000);

    const restore = await outage(h.db);
    try {
      expect((await h.post(known.id, known.token, report({ cpu: '2' }))).statusCode).toBe(202);
      await h.advance(5000);
      expect(h.service.batcher.flushesFailing).toBe(true);
      // Its declared keys are held...
      expect((await h.post(unread.id, unread.token, report({ cpu: '3', mem: '3G' }))).statusCode).toBe(202);
      // ...and so are other keys up to its share, but no more (the flush will ignore those as undeclared).
      const junk = Object.fromEntries(Array.from({ length: UNREAD_AGENT_SHARE }, (_, k) => [`junk-${k}`, 'x']));
      const res = await h.post(unread.id, unread.token, report(junk));
      expect(res.statusCode).toBe(429);
      expect(res.json()).toEqual({ accepted: UNREAD_AGENT_SHARE - 2, dropped: 2 });
      expect(Number(res.headers['retry-after'])).toBeGreaterThanOrEqual(1);
      // Keys it holds still merge.
      expect((await h.post(unread.id, unread.token, report({ cpu: '4' }))).statusCode).toBe(202);
    } finally {
      await restore();
    }
    h.service.batcher.retryNow();
    await h.advance(0);
    expect(h.service.batcher.flushesFailing).toBe(false);
    expect(await h.stored(unread.id)).toMatchObject({ cpu: { value: '4' }, mem: { value: '3G' } });
    expect(await h.metric('metabatch_metadata_undeclared_keys_total')).toBe(UNREAD_AGENT_SHARE - 2);
  });
});
