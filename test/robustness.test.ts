// Bad input never hurts: 10,000 generated bodies and a set of hostile
// clients get clear 4xx answers, nothing is applied, the process keeps
// serving, and no secret reaches a log line.

import net from 'node:net';
import { Writable } from 'node:stream';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../src/logger.js';
import { ADMIN_TOKEN, startTestService } from './support/service.js';
import { metadataItem } from './support/arbitraries.js';
import { closedAfterEach, testDatabase } from './support/db.js';

const db = testDatabase();
const appHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

// Bodies near the valid shape, where the bugs live, and arbitrary JSON.
const body = fc.oneof(
  fc.record({ metadata: fc.array(metadataItem, { maxLength: 40 }) }).map((b) => JSON.stringify(b)),
  fc.json({ depthSize: 'medium' }),
  fc.jsonValue().map((v) => JSON.stringify({ metadata: v })),
  fc.uint8Array({ maxLength: 300 }).map((bytes) => Buffer.from(bytes)),
  fc.nat({ max: 20_000 }).map((depth) => '['.repeat(depth) + ']'.repeat(depth)),
  fc.string({ maxLength: 300 }),
);

describe('bad input', () => {
  it('answers 10,000 generated bodies without a single 5xx, and keeps serving', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu', 'mem']);
    const statuses = new Map<number, number>();
    await fc.assert(
      fc.asyncProperty(body, async (payload) => {
        const res = await h.app.inject({
          method: 'POST',
          url: `/v1/agents/${id}/metadata`,
          headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
          payload,
        });
        statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
        expect(res.statusCode).toBeLessThan(500);
        if (res.statusCode >= 400) expect(typeof res.json().error).toBe('string');
      }),
      // Seeded, so a failure replays; FC_SEED=<n> explores other inputs.
      { numRuns: 10_000, seed: Number(process.env.FC_SEED ?? 20261124) },
    );
    // Every answer is an acceptance or a 400, and there were both: some bodies were
    // applied, so the flush below has something to flush.
    expect(
      [...statuses.keys()].sort((a, b) => a - b),
      JSON.stringify([...statuses]),
    ).toEqual([202, 400]);
    expect(statuses.get(400)).toBeGreaterThan(1000);
    expect(statuses.get(202), JSON.stringify([...statuses])).toBeGreaterThan(100);
    // Whatever was accepted flushes without failing the batch.
    await h.advance(5000);
    await h.service.batcher.idle();
    expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(0);
    const ok = await h.post(id, token, { metadata: [{ key: 'cpu', value: 'still serving' }] });
    expect(ok.statusCode).toBe(202);
  }, 120_000);

  it('answers 400 to non-UTF-8 bytes, deep nesting and an invalid UUID', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const send = (url: string, payload: string | Buffer) =>
      h.app.inject({
        method: 'POST',
        url,
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        payload,
      });
    const latin1 = Buffer.concat([
      Buffer.from('{"metadata":[{"key":"cpu","value":"'),
      Buffer.from([0xff, 0xfe, 0xe9]),
      Buffer.from('"}]}'),
    ]);
    // Not UTF-8: refused (it used to be stored with replacement characters; see test/strict.test.ts).
    expect((await send(`/v1/agents/${id}/metadata`, latin1)).statusCode).toBe(400);
    expect(
      (await send(`/v1/agents/${id}/metadata`, '{"metadata":' + '['.repeat(100_000) + ']'.repeat(100_000) + '}'))
        .statusCode,
    ).toBe(400);
    const badId = await send('/v1/agents/123/metadata', '{"metadata":[]}');
    expect(badId.statusCode).toBe(400);
    expect(badId.json()).toEqual({ error: 'agentId must be a UUID (got "123")' });
    await h.advance(5000);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(0);
  });

  it('cuts off a slow-loris client at the header timeout and keeps serving others', async () => {
    const h = await appHarness({ timeouts: { headersMs: 300, requestMs: 600, idleMs: 600 } });
    const base = h.base;
    const port = Number(new URL(base).port);
    const socket = net.connect(port, '127.0.0.1');
    await new Promise((resolve) => socket.once('connect', resolve));
    const started = Date.now();
    const closed = new Promise<number>((resolve) => socket.once('close', () => resolve(Date.now() - started)));
    socket.on('error', () => undefined);
    socket.write('POST /v1/agents/123e4567-e89b-12d3-a456-426614174000/metadata HTTP/1.1\r\nHost: x\r\n');
    // One header byte every 100 ms, never finishing.
    const drip = setInterval(() => socket.write('X'), 100);
    const took = await closed;
    clearInterval(drip);
    // Node checks the header timeout every 150 ms here, so the cut comes after
    // 300-450 ms; a client that dripped unchecked would never be cut at all.
    // 3 s leaves room for a loaded machine.
    expect(took).toBeLessThan(3000);
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
  });

  it('answers 431 to oversize headers', async () => {
    const h = await appHarness();
    const base = h.base;
    const res = await fetch(`${base}/healthz`, { headers: { 'x-huge': 'a'.repeat(20_000) } });
    expect(res.status).toBe(431);
  });
});

describe('secrets', () => {
  it('never logs tokens or metadata values, even at trace level and on errors', async () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        lines.push(chunk.toString());
        done();
      },
    });
    const h = await appHarness({ logger: createLogger('trace', sink) });
    const { id, token } = await h.agent(['cpu']);
    await h.post(id, token, { metadata: [{ key: 'cpu', value: 'SECRET-VALUE-123' }] });
    await h.post(id, 'mbt_WRONG-TOKEN-456', { metadata: [{ key: 'cpu', value: 'SECRET-VALUE-789' }] });
    await h.post(id, token, '{"broken');
    await h.app.inject({
      method: 'POST',
      url: '/v1/agents',
      headers: { authorization: `Bearer ${ADMIN_TOKEN}x` },
      payload: { name: 'n' },
    });
    await h.advance(5000);
    const log = lines.join('');
    expect(log).toContain('"msg":"request"');
    for (const secret of [token, 'mbt_WRONG-TOKEN-456', ADMIN_TOKEN, 'SECRET-VALUE-123', 'SECRET-VALUE-789']) {
      expect(log).not.toContain(secret);
    }
  });
});
