// The agent SDK (`createReporter`) against the real service: values reach the
// table over the stream; a service without the stream route (a front door of
// the test's own that 404s the upgrade and forwards POSTs) is reported to by
// POST, and the stream is tried again later; keys the service dropped go
// again after retry_after, or their newer value does; a stopped service is
// reconnected to; a refused token stops the reporter; close() flushes and
// leaves no timers. Where the reporter waits (retry_after), it runs on the
// service's fake clock and the test moves it; where it backs off, the
// backoff is a few milliseconds.

import net from 'node:net';
import type { AddressInfo } from 'node:net';
import FakeTimers from '@sinonjs/fake-timers';
import Fastify from 'fastify';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { WebSocketServer, type WebSocket } from 'ws';
import { createReporter, type Reporter, type ReporterError, type ReporterOptions } from '../src/client.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { lockRows, waitForBlockedUpdate } from './support/faults.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';

const db = testDatabase();
const service = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

// Closed before the services and front doors they talk to (hooks registered later run first).
const reporters: Reporter[] = [];
const doors: FrontDoor[] = [];
afterEach(async () => {
  await Promise.all(reporters.splice(0).map((reporter) => reporter.close()));
  await Promise.all(doors.splice(0).map((door) => door.close()));
});

function reporter(options: ReporterOptions): Reporter {
  const created = createReporter(options);
  reporters.push(created);
  return created;
}

/** A reporter for an agent of `h`, on the service's fake clock. */
function reporterOf(
  h: ServiceHarness,
  agent: { id: string; token: string },
  options: Partial<ReporterOptions> = {},
): Reporter {
  return reporter({ url: h.base, agentId: agent.id, token: agent.token, clock: h.clock, ...options });
}

interface FrontDoor {
  url: string;
  /** Upgrade requests seen (404ed, or let through). */
  upgrades: number;
  posts: number;
  /** From now on, let upgrades through to the service (as if it had been upgraded). */
  openStreams(): void;
  close(): Promise<void>;
}

/**
 * A service of the test's own in front of `target`, as an older metabatch
 * is: it forwards POST /v1/agents/{id}/metadata and has no stream route, so
 * Fastify answers the upgrade 404 — until `openStreams()`, when upgrades are
 * piped to the target.
 */
async function frontDoor(target: string): Promise<FrontDoor> {
  const app = Fastify();
  const upstreamAddress = new URL(target);
  const sockets = new Set<net.Socket>();
  const track = (socket: net.Socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  };
  const door: FrontDoor = {
    url: '',
    upgrades: 0,
    posts: 0,
    openStreams() {
      app.server.on('upgrade', (request, socket: net.Socket, head: Buffer) => {
        door.upgrades++;
        const upstream = net.connect(Number(upstreamAddress.port), upstreamAddress.hostname, () => {
          let head_ = `${request.method} ${request.url} HTTP/1.1\r\n`;
          for (let i = 0; i < request.rawHeaders.length; i += 2) {
            head_ += `${request.rawHeaders[i]}: ${request.rawHeaders[i + 1]}\r\n`;
          }
          upstream.write(head_ + '\r\n');
          upstream.write(head);
          socket.pipe(upstream).pipe(socket);
        });
        track(upstream);
        upstream.on('error', () => socket.destroy());
        socket.on('error', () => upstream.destroy());
      });
    },
    async close() {
      for (const socket of sockets) socket.destroy();
      await app.close();
    },
  };
  app.server.on('connection', track);
  app.addHook('onRequest', async (request) => {
    if (request.url.endsWith('/metadata/stream')) door.upgrades++;
  });
  app.post('/v1/agents/:agentId/metadata', async (request, reply) => {
    door.posts++;
    const res = await fetch(new URL(request.url, target), {
      method: 'POST',
      headers: { authorization: request.headers.authorization ?? '', 'content-type': 'application/json' },
      body: JSON.stringify(request.body),
    });
    const retryAfter = res.headers.get('retry-after');
    if (retryAfter !== null) void reply.header('retry-after', retryAfter);
    return reply
      .code(res.status)
      .type('application/json')
      .send(await res.text());
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  door.url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
  doors.push(door);
  return door;
}

/** Waits until the send in flight (if any) is answered: nothing held, or a wait before the next. */
async function settled(r: Reporter): Promise<void> {
  await vi.waitFor(() => {
    const stats = r.stats();
    if (stats.heldKeys > 0 && stats.waitingUntil === undefined) throw new Error('a send is in flight');
  });
}

describe('createReporter()', () => {
  it('reports over the stream: the newest value of each key reaches the table, stamped when reported; a report over 6144 bytes of keys is split', async () => {
    const h = await service();
    // 60 keys of 123 bytes: 7380 bytes of keys, over what one report may carry.
    const many = Array.from({ length: 60 }, (_, i) => `k${String(i).padStart(2, '0')}${'x'.repeat(120)}`);
    const agent = await h.agent(['cpu', 'mem', 'disk', ...many]);
    const errors: ReporterError[] = [];
    const r = reporterOf(h, agent, { onError: (err) => errors.push(err) });
    const reportedAt = new Date(h.clock.now).toISOString();
    expect(r.report({ cpu: '10%', mem: { value: '1G' }, disk: { error: 'df failed' } })).toEqual({
      accepted: 3,
      refused: 0,
    });
    r.report({ cpu: '12%' });
    r.report(Object.fromEntries(many.map((key) => [key, 'v'])));
    await r.flush();
    expect(errors).toEqual([]);
    // Reports made before the first send are merged: 63 keys, cpu once, in two messages.
    expect(r.stats()).toMatchObject({
      transport: 'stream',
      streamsOpened: 1,
      sent: 2,
      acceptedKeys: 63,
      droppedKeys: 0,
      heldKeys: 0,
      waitingUntil: undefined,
    });
    await h.advance(5000);
    const rows = await h.stored(agent.id);
    expect(rows.cpu).toMatchObject({ value: '12%', error: '', collected_at: reportedAt });
    expect(rows.mem).toMatchObject({ value: '1G', error: '' });
    expect(rows.disk).toMatchObject({ value: '', error: 'df failed' });
    expect(many.filter((key) => rows[key]?.value === 'v')).toHaveLength(60);

    // Later reports go on the same stream.
    h.clock.tick(1000);
    r.report({ cpu: '13%' });
    await r.flush();
    await h.advance(5000);
    expect((await h.stored(agent.id)).cpu).toMatchObject({
      value: '13%',
      collected_at: new Date(h.clock.now - 5000).toISOString(),
    });
    expect(r.stats()).toMatchObject({ streamsOpened: 1, sent: 3 });
  });

  it('reports by POST where the upgrade is answered 404, and tries the stream again after streamRetryMs', async () => {
    const h = await service();
    const agent = await h.agent(['cpu']);
    const door = await frontDoor(h.base);
    const errors: ReporterError[] = [];
    const r = reporter({
      url: door.url,
      agentId: agent.id,
      token: agent.token,
      clock: h.clock,
      streamRetryMs: 60_000,
      onError: (err) => errors.push(err),
    });
    r.report({ cpu: '1' });
    await r.flush();
    expect(r.stats()).toMatchObject({ transport: 'post', streamsOpened: 0, acceptedKeys: 1 });
    expect({ upgrades: door.upgrades, posts: door.posts }).toEqual({ upgrades: 1, posts: 1 });
    expect(errors).toHaveLength(1);
    expect(errors[0]!.message).toMatch(/answered the stream's upgrade 404 .*reporting by POST/);
    expect(errors[0]).toMatchObject({ status: 404, fatal: false });
    await h.advance(5000);
    expect((await h.stored(agent.id)).cpu!.value).toBe('1');

    // Within streamRetryMs: POST, no new upgrade.
    h.clock.tick(30_000);
    r.report({ cpu: '2' });
    await r.flush();
    expect({ upgrades: door.upgrades, posts: door.posts }).toEqual({ upgrades: 1, posts: 2 });

    // After it, the stream again; the service behind the door has it now.
    door.openStreams();
    h.clock.tick(30_000);
    r.report({ cpu: '3' });
    await r.flush();
    expect({ upgrades: door.upgrades, posts: door.posts }).toEqual({ upgrades: 2, posts: 2 });
    expect(r.stats()).toMatchObject({ transport: 'stream', streamsOpened: 1, acceptedKeys: 3 });
    await h.advance(5000);
    expect((await h.stored(agent.id)).cpu!.value).toBe('3');
    expect(errors).toHaveLength(1);
  });

  it.each([
    ['the stream', false],
    ['POST', true],
  ])(
    'sends the keys the service dropped again after retry_after (%s), or the newer value reported meanwhile',
    async (_name, viaPost) => {
      // Batch of 1, channel of 1: a blocked flush leaves room for one key.
      const h = await service({ env: { BATCH_SIZE: '1', CHANNEL_MULTIPLIER: '1' } });
      const agent = await h.agent(['cpu', 'mem', 'disk', 'net']);
      const url = viaPost ? (await frontDoor(h.base)).url : h.base;
      const r = reporterOf(h, agent, { url, random: () => 0 });
      const release = await lockRows(db, [agent.id]);
      r.report({ cpu: '1' });
      await r.flush();
      await waitForBlockedUpdate(db);

      // mem is queued, disk and net find the channel full: dropped, retry_after 1 s.
      r.report({ mem: '2', disk: '3', net: '4' });
      await vi.waitFor(() => expect(r.stats().droppedKeys).toBe(2));
      const dropped = h.clock.now;
      expect(r.stats()).toMatchObject({ acceptedKeys: 2, heldKeys: 2, waitingUntil: dropped + 1000 });
      r.report({ disk: '5' });
      expect(r.stats().heldKeys).toBe(2);
      await release();
      await h.service.batcher.idle();

      // Nothing goes before retry_after.
      const flushed = r.flush();
      const sent = r.stats().sent;
      h.clock.tick(999);
      await new Promise((resolve) => setImmediate(resolve));
      expect(r.stats().sent).toBe(sent);
      // Then disk's newer value and net: the channel holds one, net is dropped again.
      h.clock.tick(1);
      await settled(r);
      expect(r.stats()).toMatchObject({
        sent: sent + 1,
        droppedKeys: 3,
        heldKeys: 1,
        waitingUntil: h.clock.now + 1000,
      });
      await h.service.batcher.idle();
      h.clock.tick(1000);
      await flushed;
      await h.advance(5000);
      const rows = await h.stored(agent.id);
      expect([rows.cpu!.value, rows.mem!.value, rows.disk!.value, rows.net!.value]).toEqual(['1', '2', '5', '4']);
      expect(r.stats()).toMatchObject({ heldKeys: 0, refusedReports: 0 });
    },
  );

  it('reconnects with backoff after the service closes the stream (1001), to a new service on the same port', async () => {
    const first = await startTestService(db);
    let second: ServiceHarness | undefined;
    try {
      const agent = await first.agent(['cpu']);
      const errors: ReporterError[] = [];
      const r = reporter({
        url: first.base,
        agentId: agent.id,
        token: agent.token,
        reconnect: { initialMs: 5, maxMs: 20 },
        onError: (err) => errors.push(err),
      });
      r.report({ cpu: '1' });
      await r.flush();
      expect(r.stats()).toMatchObject({ transport: 'stream', streamsOpened: 1 });

      await first.close();
      expect(errors.map((err) => err.closeCode)).toEqual([1001]);
      expect(r.stats().transport).toBe('none');
      // Reported while no service listens: it keeps trying.
      r.report({ cpu: '2' });
      await vi.waitFor(() =>
        expect(errors.filter((err) => /cannot reach metabatch/.test(err.message)).length).toBeGreaterThan(2),
      );
      second = await startTestService(db, { env: { PORT: new URL(first.base).port } });
      await r.flush();
      expect(r.stats()).toMatchObject({ transport: 'stream', streamsOpened: 2, heldKeys: 0 });
      await second.advance(5000);
      expect((await second.stored(agent.id)).cpu!.value).toBe('2');
      expect(errors.every((err) => !err.fatal)).toBe(true);
    } finally {
      await Promise.all(reporters.splice(0).map((r) => r.close()));
      await second?.close();
    }
  });

  it('gives up on a stream that does not answer within requestTimeoutMs, or answers out of turn, and sends the same keys on a new one', async () => {
    // A service of the test's own: its first stream never answers, its
    // second answers with a seq nobody sent, its third answers properly.
    const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise<void>((resolve) => server.once('listening', resolve));
    const received: { stream: number; metadata: { key: string; value: string }[] }[] = [];
    let streams = 0;
    server.on('connection', (socket: WebSocket) => {
      const stream = ++streams;
      socket.on('message', (data: Buffer) => {
        const message = JSON.parse(data.toString()) as { seq: number; metadata: { key: string; value: string }[] };
        received.push({ stream, metadata: message.metadata });
        if (stream === 2) socket.send(JSON.stringify({ seq: message.seq + 1000, accepted: 1, dropped: 0 }));
        if (stream === 3) {
          socket.send(JSON.stringify({ seq: message.seq, accepted: message.metadata.length, dropped: 0 }));
        }
      });
    });
    try {
      const errors: ReporterError[] = [];
      const r = reporter({
        url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        agentId: '00000000-0000-4000-8000-000000000001',
        token: 'mbt_test',
        // Real time, and it bounds each stream's opening too: a margin for a loaded machine.
        requestTimeoutMs: 1000,
        reconnect: { initialMs: 5, maxMs: 20 },
        onError: (err) => errors.push(err),
      });
      r.report({ cpu: '1', mem: '2' });
      await r.flush();
      expect(errors.map((err) => err.message)).toEqual([
        'no answer on the stream within 1000 ms',
        expect.stringMatching(/^unexpected answer on the stream \(seq 10\d\d\)/),
      ]);
      expect(errors.every((err) => !err.fatal)).toBe(true);
      // The same keys, with the same values, on each stream in turn; taken by the third.
      const sent = (stream: number) => received.filter((m) => m.stream === stream).flatMap((m) => m.metadata);
      for (const stream of [1, 2, 3]) {
        expect(sent(stream).map(({ key, value }) => `${key}=${value}`)).toEqual(['cpu=1', 'mem=2']);
      }
      expect(r.stats()).toMatchObject({ transport: 'stream', streamsOpened: 3, acceptedKeys: 2, heldKeys: 0 });
    } finally {
      await Promise.all(reporters.splice(0).map((r) => r.close()));
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });

  it.each([
    ['over the stream', false],
    ['by POST', true],
  ])('stops for good when the token is refused (401 %s): report() refuses, flush() settles', async (_name, viaPost) => {
    const h = await service();
    const agent = await h.agent(['cpu']);
    const url = viaPost ? (await frontDoor(h.base)).url : h.base;
    const errors: ReporterError[] = [];
    const r = reporterOf(
      h,
      { id: agent.id, token: 'mbt_not-a-real-token' },
      { url, onError: (err) => errors.push(err) },
    );
    r.report({ cpu: '1' });
    await r.flush();
    const fatal = errors.at(-1)!;
    expect(fatal).toMatchObject({ fatal: true, status: 401 });
    expect(fatal.message).toMatch(/refused the agent token \(401: invalid agent token\)/);
    expect(errors.filter((err) => err.fatal)).toHaveLength(1);
    // onError said why before report() could answer: nothing taken, and no throw.
    expect(r.report({ cpu: '2', mem: '3' })).toEqual({ accepted: 0, refused: 2, stopped: true });
    expect(r.stats()).toMatchObject({
      transport: 'none',
      heldKeys: 0,
      discardedKeys: 1,
      acceptedKeys: 0,
      refusedKeys: 2,
    });
    await r.flush();
    expect(await r.close()).toEqual({ flushed: true, discardedKeys: 1 });
  });

  it('stops for good when the token is rotated: the service closes the stream with 4001', async () => {
    const h = await service();
    const agent = await h.agent(['cpu']);
    const errors: ReporterError[] = [];
    const r = reporterOf(h, agent, { onError: (err) => errors.push(err) });
    r.report({ cpu: '1' });
    await r.flush();
    const rotated = await h.app.inject({
      method: 'POST',
      url: `/v1/agents/${agent.id}/token`,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    expect(rotated.statusCode).toBe(200);
    await vi.waitFor(() => expect(errors).toHaveLength(1));
    expect(errors[0]).toMatchObject({ fatal: true, closeCode: 4001 });
    expect(errors[0]!.message).toMatch(/token revoked/);
    expect(r.report({ cpu: '2' })).toEqual({ accepted: 0, refused: 1, stopped: true });
  });

  it('close() flushes what it holds, closes the stream and leaves no timers; report() throws afterwards', async () => {
    const h = await service();
    const agent = await h.agent(['cpu', 'mem']);
    const timers = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
    const before = timers();
    // A clock of its own: every timer the reporter arms is on it, and must be gone.
    const clock = FakeTimers.createClock(Date.now());
    const r = createReporter({ url: h.base, agentId: agent.id, token: agent.token, clock });
    r.report({ cpu: '1', mem: '2' });
    const closing = r.close();
    expect(r.close()).toBe(closing);
    expect(await closing).toEqual({ flushed: true, discardedKeys: 0 });
    expect(r.stats()).toMatchObject({ transport: 'none', acceptedKeys: 2, heldKeys: 0, streamsOpened: 1 });
    expect(clock.countTimers()).toBe(0);
    // Nor one on the real clock (other tests' timers may end meanwhile: at most as many as before).
    expect(timers()).toBeLessThanOrEqual(before);
    expect(() => r.report({ cpu: '3' })).toThrow(/reporter is closed/);
    await vi.waitFor(async () => expect(await h.metric('metabatch_stream_connections')).toBe(0));
    await h.advance(5000);
    const rows = await h.stored(agent.id);
    expect([rows.cpu!.value, rows.mem!.value]).toEqual(['1', '2']);
  });

  it('close() gives up after closeTimeoutMs when the service cannot be reached, and says what it discarded', async () => {
    // A port nothing listens on.
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as AddressInfo;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    // The real timers, counted: the reporter's own must all be gone after close().
    const live = new Set<unknown>();
    const clock = {
      Date,
      setTimeout(callback: () => void, ms: number): unknown {
        const handle = setTimeout(() => {
          live.delete(handle);
          callback();
        }, ms);
        live.add(handle);
        return handle;
      },
      clearTimeout(handle: unknown): void {
        live.delete(handle);
        clearTimeout(handle as NodeJS.Timeout);
      },
    };
    const errors: ReporterError[] = [];
    const r = createReporter({
      url: `http://127.0.0.1:${port}`,
      agentId: '123e4567-e89b-12d3-a456-426614174000',
      token: 'mbt_x',
      clock,
      closeTimeoutMs: 50,
      reconnect: { initialMs: 5, maxMs: 10 },
      onError: (err) => errors.push(err),
    });
    r.report({ cpu: '1', mem: '2' });
    expect(await r.close()).toEqual({ flushed: false, discardedKeys: 2 });
    expect(errors.length).toBeGreaterThan(0);
    expect(errors[0]!.message).toMatch(/cannot reach metabatch: .*ECONNREFUSED/);
    expect(live.size).toBe(0);
  });

  it('holds at most maxKeys distinct keys (refusing and counting new ones), and refuses keys the service would', async () => {
    const h = await service();
    const agent = await h.agent(['a', 'b', 'c']);
    const r = reporterOf(h, agent, { maxKeys: 2 });
    // Nothing is sent until the loop runs: the three keys meet the bound at once.
    expect(r.report({ a: '1', b: '1', c: '1' })).toEqual({ accepted: 2, refused: 1 });
    // A key held takes its newest value whatever the bound.
    expect(r.report({ a: '2', c: '2' })).toEqual({ accepted: 1, refused: 1 });
    expect(r.stats()).toMatchObject({ heldKeys: 2, refusedKeys: 2 });
    expect(() => r.report({ ['k'.repeat(128)]: 'x' })).toThrow(/1-127 characters/);
    expect(() => r.report({ '': 'x' })).toThrow(/1-127 characters/);
    expect(() => r.report({ a: 'x\u0000y' })).toThrow(/NUL/);
    expect(() => r.report({ a: 12 as unknown as string })).toThrow(TypeError);
    await r.flush();
    expect(r.stats()).toMatchObject({ heldKeys: 0, acceptedKeys: 2 });
    // Values are cut as the service cuts them, so that nothing held is larger than what it keeps.
    r.report({ c: 'é'.repeat(1100) });
    await r.flush();
    await h.advance(5000);
    const rows = await h.stored(agent.id);
    expect([rows.a!.value, rows.b!.value, rows.c!.value]).toEqual(['2', '1', 'é'.repeat(1024)]);
    expect(rows.c!.error).toBe('value of 2200 bytes exceeded 2048 bytes');
  });

  it('sends a message the service closed as too big (1009) again in smaller ones', async () => {
    const h = await service();
    // 50 keys whose value and error are 2048 control characters, 6 bytes each in JSON: ~1.2 MB in one message.
    const keys = Array.from({ length: 50 }, (_, i) => `key${i}`);
    const agent = await h.agent(keys);
    const errors: ReporterError[] = [];
    const r = reporterOf(h, agent, { maxMessageBytes: 8 * 1024 * 1024, onError: (err) => errors.push(err) });
    const noisy = '\u0001'.repeat(2048);
    r.report(Object.fromEntries(keys.map((key) => [key, { value: noisy, error: noisy }])));
    await r.flush();
    expect(errors.map((err) => err.closeCode)).toEqual([1009]);
    // The refused message, then the same keys in messages of half its size (24 + 24 + 2 keys).
    expect(r.stats()).toMatchObject({ acceptedKeys: 50, refusedReports: 0, streamsOpened: 2, sent: 4 });
    await h.advance(5000);
    const rows = await h.stored(agent.id);
    expect(keys.filter((key) => rows[key]?.value === noisy && rows[key]?.error === noisy)).toHaveLength(50);
  });
});
