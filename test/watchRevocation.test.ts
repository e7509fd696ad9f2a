// Revocation ends the watch streams opened with an agent's token, on the
// service as production wires it (a fake clock drives the hub): a rotated
// token's streams end with `event: revoked` (the admin's go on), a deleted
// agent's with `event: deleted` then `event: revoked`, and a stream whose
// token changed before the control message reached it is never sent a value
// read after the change.

import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { randomBytes } from 'node:crypto';
import { hashToken } from '../src/tokens.js';
import { createTestDatabase, type TestDatabase } from './support/db.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';
import { openSse, type SseStream } from './support/sse.js';

let db: TestDatabase;
let h: ServiceHarness;

beforeAll(async () => {
  db = await createTestDatabase();
  h = await startTestService(db);
});
afterAll(async () => {
  await h.close();
  await db.drop();
});

const opened: SseStream[] = [];
afterEach(() => opened.splice(0).forEach((s) => s.close()));

async function watch(path: string, token: string, body?: unknown): Promise<SseStream> {
  const stream = await openSse(`${h.base}${path}`, token, body === undefined ? {} : { method: 'POST', body });
  expect(stream.status).toBe(200);
  opened.push(stream);
  await stream.next('data');
  return stream;
}
const one = (id: string, token: string) => watch(`/v1/agents/${id}/metadata/watch`, token);
const many = (id: string, token: string) => watch('/v1/agents/metadata/watch', token, { agent_ids: [id] });
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };

/** Flushes what was posted and waits until the service's own LISTEN has heard of it, then runs a tick. */
async function flushAndTick(): Promise<void> {
  const heard = await h.metric('metabatch_listener_batches_total');
  await h.advance(5000);
  await vi.waitFor(async () => expect(await h.metric('metabatch_listener_batches_total')).toBeGreaterThan(heard));
  await h.advance(1000);
}

describe('watch streams and revocation', () => {
  it('ends the streams of a rotated token with event: revoked, and keeps the admin’s', async () => {
    const { id, token } = await h.agent(['cpu']);
    const streams = [await one(id, token), await many(id, token)];
    const adminStream = await one(id, ADMIN_TOKEN);
    const rotated = await fetch(`${h.base}/v1/agents/${id}/token`, { method: 'POST', headers: admin });
    expect(rotated.status).toBe(200);
    for (const stream of streams) {
      await stream.ended;
      expect(stream.events.at(-1)).toEqual({ type: 'revoked', data: { agent_id: id, reason: 'token rotated' } });
    }
    expect(await h.metric('metabatch_watch_closed_total', { reason: 'token_rotated' })).toBe(2);
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(1));

    // The old token opens nothing more; the new one does.
    const old = await openSse(`${h.base}/v1/agents/${id}/metadata/watch`, token);
    expect(old.status).toBe(401);
    const { token: fresh } = (await rotated.json()) as { token: string };
    await one(id, fresh);
    await h.post(id, fresh, { metadata: [{ key: 'cpu', value: 'new token', collected_at: new Date(h.clock.now) }] });
    await flushAndTick();
    await vi.waitFor(() =>
      expect(adminStream.events.at(-1)?.data).toEqual([expect.objectContaining({ value: 'new token' })]),
    );
  });

  it('ends the streams of a deleted agent’s token with event: deleted, then event: revoked', async () => {
    const { id, token } = await h.agent(['cpu']);
    const streams = [await one(id, token), await many(id, token)];
    const adminStream = await one(id, ADMIN_TOKEN);
    expect((await fetch(`${h.base}/v1/agents/${id}`, { method: 'DELETE', headers: admin })).status).toBe(204);
    for (const stream of streams) {
      await stream.ended;
      expect(stream.events.slice(-2)).toEqual([
        { type: 'deleted', data: { agent_id: id } },
        { type: 'revoked', data: { agent_id: id, reason: 'agent deleted' } },
      ]);
    }
    await adminStream.ended;
    expect(adminStream.events.at(-1)).toEqual({ type: 'deleted', data: { agent_id: id } });
    expect(await h.metric('metabatch_watch_closed_total', { reason: 'agent_deleted' })).toBe(2);
  });

  it('never sends a value read after the token changed, even before the control message arrives', async () => {
    const { id, token } = await h.agent(['cpu']);
    const stream = await one(id, token);
    // Rotated without the control NOTIFY: as if it were still on its way to this replica.
    const fresh = `mbt_${randomBytes(32).toString('base64url')}`;
    await db.pool.query('UPDATE workspace_agents SET token_hash = $2 WHERE id = $1', [id, hashToken(fresh)]);
    const res = await h.post(id, fresh, {
      metadata: [{ key: 'cpu', value: 'after the rotation', collected_at: new Date(h.clock.now) }],
    });
    expect(res.statusCode).toBe(202);
    await flushAndTick();
    // Whichever comes first: the value (a leak), or the end.
    await vi.waitFor(() => expect(JSON.stringify(stream.events)).toMatch(/after the rotation|revoked/));
    expect(JSON.stringify(stream.events)).not.toContain('after the rotation');
    await stream.ended;
    expect(stream.events.at(-1)).toEqual({ type: 'revoked', data: { agent_id: id, reason: 'token rotated' } });
  });
});
