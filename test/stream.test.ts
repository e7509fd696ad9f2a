// The WebSocket ingest stream as an agent sees it, over a real socket to the
// service as production wires it (a fake clock drives the batcher and the
// ping schedule; Postgres and the network are real): the upgrade's HTTP
// answers, each report's answer, every input rule of the POST with the POST's
// own messages, drops, the bounds (streams per agent, message size,
// backpressure, idle), shutdown, revocation on this replica and on another
// one, and generated messages.

import net from 'node:net';
import { once } from 'node:events';
import fc from 'fast-check';
import { afterEach, describe, expect, it, vi } from 'vitest';
import WebSocket from 'ws';
import { provisionAgents } from '../src/provision.js';
import { BACKPRESSURE_BYTES } from '../src/routes/ingestStream.js';
import { MAX_MESSAGE_BYTES, PING_INTERVAL_MS, PING_SLOTS } from '../src/routes/stream.js';
import { ReportMetadata } from '../src/schemas.js';
import { MAX_STREAMS_PER_AGENT, StreamRegistry } from '../src/streams.js';
import { metadataItem } from './support/arbitraries.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { lockRows, outage, waitForBlockedUpdate } from './support/faults.js';
import { call, replicasOf } from './support/replicas.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';
import { refusedUpgrade } from './support/upgrade.js';

const db = testDatabase();
const appHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

/** One answer of the stream. */
interface Answer {
  seq: number | null;
  accepted?: number;
  dropped?: number;
  retry_after?: number;
  error?: string;
}

/** An agent's end of a stream: what it sent is answered in `answers`, in order. */
class StreamClient {
  readonly answers: Answer[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  private read = 0;
  private isClosed = false;
  private readonly waiters = new Set<() => void>();

  constructor(readonly ws: WebSocket) {
    ws.on('message', (data: Buffer) => {
      this.answers.push(JSON.parse(data.toString()) as Answer);
      this.notify();
    });
    this.closed = new Promise((resolve) =>
      ws.once('close', (code, reason) => {
        this.isClosed = true;
        resolve({ code, reason: reason.toString() });
        this.notify();
      }),
    );
  }

  send(message: unknown): void {
    this.ws.send(typeof message === 'string' ? message : JSON.stringify(message));
  }

  /** The next answer not yet read. */
  async next(): Promise<Answer> {
    await this.until(() => this.answers.length > this.read);
    return this.answers[this.read++]!;
  }

  /** Sends a message and waits for its answer. */
  async report(message: unknown): Promise<Answer> {
    this.send(message);
    return this.next();
  }

  /** Resolves once `ready()` holds; fails if the stream closes first. */
  until(ready: () => boolean): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (ready()) {
          this.waiters.delete(check);
          resolve();
        } else if (this.isClosed) {
          this.waiters.delete(check);
          reject(new Error(`the stream closed (${this.answers.length} answers)`));
        }
      };
      this.waiters.add(check);
      check();
    });
  }

  private notify(): void {
    for (const waiter of [...this.waiters]) waiter();
  }
}

const clients: WebSocket[] = [];
afterEach(() => {
  for (const ws of clients.splice(0)) ws.terminate();
});

function streamUrl(base: string, agentId: string): string {
  return `${base.replace(/^http/, 'ws')}/v1/agents/${agentId}/metadata/stream`;
}

/** Opens a stream; fails with the HTTP answer if the upgrade is refused. */
function open(
  base: string,
  agentId: string,
  token: string,
  options: WebSocket.ClientOptions = {},
): Promise<StreamClient> {
  const ws = new WebSocket(streamUrl(base, agentId), { headers: { authorization: `Bearer ${token}` }, ...options });
  clients.push(ws);
  const client = new StreamClient(ws);
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve(client));
    ws.once('error', reject);
  });
}

/** The HTTP answer to an upgrade that is refused, its body parsed. */
async function refused(
  base: string,
  agentId: string,
  headers: Record<string, string>,
): Promise<{ status: number; body: unknown; headers: Record<string, unknown> }> {
  const ws = new WebSocket(streamUrl(base, agentId), { headers });
  clients.push(ws);
  const answer = await refusedUpgrade(ws);
  return { ...answer, body: JSON.parse(answer.body) };
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

/** The service's end of the next stream opened: the TCP socket its upgrade came on. */
function serviceEnd(h: ServiceHarness): Promise<net.Socket> {
  return new Promise((resolve) => h.app.server.once('upgrade', (_request, socket: net.Socket) => resolve(socket)));
}

/**
 * From now on, every time the service reads its client's reports while more
 * than BACKPRESSURE_BYTES of answers wait in its socket (never, if it holds
 * back as it should). Call it once the stream is open: the listener goes
 * before the service's own, so it sees the socket before that read's answers.
 */
function readsWhileFull(socket: net.Socket): number[] {
  const reads: number[] = [];
  socket.prependListener('data', () => {
    if (socket.writableLength > BACKPRESSURE_BYTES) reads.push(socket.writableLength);
  });
  return reads;
}

/** Resolves when the service stops reading the stream for unread answers (its socket's 'pause', counted). */
async function heldBack(h: ServiceHarness, socket: net.Socket): Promise<void> {
  const before = await h.metric('metabatch_stream_paused_total');
  await once(socket, 'pause');
  expect(await h.metric('metabatch_stream_paused_total')).toBe(before + 1);
}

describe('the upgrade', () => {
  it('answers 401, 403 and 400 as HTTP with the POST’s messages, before any upgrade', async () => {
    const h = await appHarness();
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    expect(await refused(h.base, a.id, {})).toMatchObject({
      status: 401,
      body: { error: 'missing agent token: send Authorization: Bearer <token>' },
    });
    expect(await refused(h.base, a.id, bearer('mbt_not-a-real-token'))).toMatchObject({
      status: 401,
      body: { error: 'invalid agent token' },
    });
    expect(await refused(h.base, a.id, bearer(ADMIN_TOKEN))).toMatchObject({ status: 401 });
    expect(await refused(h.base, a.id, bearer(b.token))).toMatchObject({
      status: 403,
      body: { error: 'this token belongs to another agent' },
    });
    expect(await refused(h.base, 'not-a-uuid', bearer(a.token))).toMatchObject({
      status: 400,
      body: { error: 'agentId must be a UUID (got "not-a-uuid")' },
    });
    // The agent id in any case, as the POST takes it.
    const upper = await open(h.base, a.id.toUpperCase(), a.token);
    expect(await upper.report({ seq: 0, metadata: [{ key: 'cpu', value: '1' }] })).toEqual({
      seq: 0,
      accepted: 1,
      dropped: 0,
    });
    expect(await h.metric('metabatch_stream_connections')).toBe(1);
  });

  it('answers 503 when the token cannot be checked because the database is down', async () => {
    const h = await appHarness();
    // An agent the service has never seen: its token is not cached.
    const [agent] = await provisionAgents(db.pool, 1, ['cpu'], 'uncached');
    const restore = await outage(db);
    try {
      expect(await refused(h.base, agent!.id, bearer(agent!.token))).toMatchObject({
        status: 503,
        body: { error: 'database unavailable: could not check the token, retry later' },
      });
    } finally {
      await restore();
    }
    const stream = await open(h.base, agent!.id, agent!.token);
    expect(await stream.report({ seq: 1, metadata: [{ key: 'cpu', value: 'ok' }] })).toMatchObject({ accepted: 1 });
  });

  it('answers 426 to a GET without the upgrade', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const res = await fetch(`${h.base}/v1/agents/${id}/metadata/stream`, { headers: bearer(token) });
    expect(res.status).toBe(426);
    expect(res.headers.get('upgrade')).toBe('websocket');
    expect(await res.json()).toEqual({
      error: 'this route is a WebSocket: send Connection: Upgrade and Upgrade: websocket',
    });
  });

  it(`holds at most ${MAX_STREAMS_PER_AGENT} streams per agent: one more is answered 429`, async () => {
    const h = await appHarness();
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const streams = await Promise.all(Array.from({ length: MAX_STREAMS_PER_AGENT }, () => open(h.base, a.id, a.token)));
    expect(await refused(h.base, a.id, bearer(a.token))).toMatchObject({
      status: 429,
      body: { error: 'too many streams for this agent (at most 4)' },
    });
    expect(await h.metric('metabatch_stream_upgrades_refused_total')).toBe(1);
    // Another agent is not affected.
    await open(h.base, b.id, b.token);
    expect(await h.metric('metabatch_stream_connections')).toBe(MAX_STREAMS_PER_AGENT + 1);
    // One closes: there is room again.
    streams[0]!.ws.close(1000);
    expect(await streams[0]!.closed).toMatchObject({ code: 1000 });
    await vi.waitFor(async () => expect(await h.metric('metabatch_stream_connections')).toBe(MAX_STREAMS_PER_AGENT));
    const again = await open(h.base, a.id, a.token);
    expect(await again.report({ seq: 1, metadata: [] })).toEqual({ seq: 1, accepted: 0, dropped: 0 });
    expect(await h.metric('metabatch_stream_closed_total', { code: '1000' })).toBe(1);
  });

  it('leaves no socket open after an upgrade answered over HTTP, on any route', async () => {
    const h = await appHarness({ timeouts: { headersMs: 300, requestMs: 600, idleMs: 600 } });
    const port = Number(new URL(h.base).port);
    for (const url of ['/healthz', '/v1/no-such-route', '/v1/agents/not-a-uuid/metadata/stream']) {
      const socket = net.connect(port, '127.0.0.1');
      socket.on('error', () => undefined);
      await new Promise((resolve) => socket.once('connect', resolve));
      const started = Date.now();
      const closed = new Promise<number>((resolve) => socket.once('close', () => resolve(Date.now() - started)));
      let answer = '';
      socket.on('data', (chunk: Buffer) => (answer += chunk.toString()));
      socket.write(
        `GET ${url} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n` +
          'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n',
      );
      // The client never closes: the service does, at the latest after the idle timeout.
      expect(await closed, url).toBeLessThan(3000);
      expect(answer, url).toMatch(/^HTTP\/1\.1 [2-5]\d\d /);
    }
  });
});

describe('reports', () => {
  it('answers each report in order with its counts, and the values reach the table at the next flush', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu', 'mem']);
    const stream = await open(h.base, id, token);
    expect(
      await stream.report({
        seq: 1,
        metadata: [
          { key: 'cpu', value: '12%', error: '', collected_at: '2026-11-22T23:59:00Z' },
          { key: 'mem', value: '1G' },
        ],
      }),
    ).toEqual({ seq: 1, accepted: 2, dropped: 0 });
    const sentAt = h.clock.now;
    await h.advance(5000);
    const rows = await h.stored(id);
    expect(rows.cpu).toMatchObject({ value: '12%', error: '', collected_at: '2026-11-22T23:59:00.000Z' });
    // No collected_at: the server's time.
    expect(rows.mem!.collected_at).toBe(new Date(sentAt).toISOString());
    await h.waitForPayloads(2);
    expect(h.payloads).toEqual([[id], [id]]);

    // Many at once, in any seq order the client likes: answered in the order sent, the last value wins.
    const seqs = Array.from({ length: 200 }, (_, i) => 1000 - i * 3);
    for (const seq of seqs) stream.send({ seq, metadata: [{ key: 'cpu', value: `v${seq}` }] });
    await stream.until(() => stream.answers.length === 1 + seqs.length);
    expect(stream.answers.slice(1)).toEqual(seqs.map((seq) => ({ seq, accepted: 1, dropped: 0 })));
    await h.advance(5000);
    expect((await h.stored(id)).cpu!.value).toBe(`v${seqs.at(-1)}`);
    expect(await h.metric('metabatch_stream_reports_total')).toBe(1 + seqs.length);
  });

  it('applies the POST’s rules to what it keeps: cut values, their messages, trimming, a clamped future', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['v2049', 'e2049', 'both', 'utf8', 'trim', 'future']);
    const stream = await open(h.base, id, token);
    const utf8 = 'x' + '€'.repeat(682) + 'é' + 'tail';
    expect(
      await stream.report({
        seq: 9,
        metadata: [
          { key: 'v2049', value: 'a'.repeat(2049) },
          { key: 'e2049', error: 'a'.repeat(2049) },
          { key: 'both', value: 'b'.repeat(3000), error: 'e'.repeat(2100) },
          { key: 'utf8', value: utf8 },
          { key: 'trim', value: ' \t 12 %\n\n', error: '\n oops  here \t' },
          { key: 'future', value: 'f', collected_at: '2099-01-01T00:00:00Z' },
        ],
      }),
    ).toEqual({ seq: 9, accepted: 6, dropped: 0 });
    const sentAt = h.clock.now;
    await h.advance(5000);
    const rows = await h.stored(id);
    expect(rows.v2049).toMatchObject({ value: 'a'.repeat(2048), error: 'value of 2049 bytes exceeded 2048 bytes' });
    expect(rows.e2049).toMatchObject({ value: '', error: 'error of 2049 bytes exceeded 2048 bytes' });
    expect(rows.both).toMatchObject({ value: 'b'.repeat(2048), error: 'error of 2100 bytes exceeded 2048 bytes' });
    expect(rows.utf8).toMatchObject({
      value: 'x' + '€'.repeat(682),
      error: `value of ${Buffer.byteLength(utf8)} bytes exceeded 2048 bytes`,
    });
    expect(rows.trim).toMatchObject({ value: '12 %', error: 'oops  here' });
    expect(rows.future!.collected_at).toBe(new Date(sentAt).toISOString());
  });

  it('refuses bad input with the POST’s 400 message, applies none of it, and stays open', async () => {
    const h = await appHarness();
    const keys48 = Array.from({ length: 48 }, (_, i) => `${String(i).padStart(2, '0')}${'é'.repeat(63)}`);
    const { id, token } = await h.agent(['cpu', 'a', ...keys48]);
    const stream = await open(h.base, id, token);
    // Each as a POST body; the stream's message is the same with a seq.
    const bodies: [string, Record<string, unknown>][] = [
      ['no metadata', {}],
      ['metadata not an array', { metadata: 'cpu=1' }],
      ['a value that is not a string', { metadata: [{ key: 'cpu', value: 12 }] }],
      ['a key that is not a string', { metadata: [{ key: 7 }] }],
      ['an empty key', { metadata: [{ key: '', value: 'x' }] }],
      ['a key of 128 characters', { metadata: [{ key: 'k'.repeat(128), value: 'x' }] }],
      ['a bad collected_at', { metadata: [{ key: 'cpu', collected_at: 'yesterday' }] }],
      ['an impossible collected_at', { metadata: [{ key: 'cpu', collected_at: '2026-02-30T00:00:00Z' }] }],
      ['a NUL in a value', { metadata: [{ key: 'cpu', value: 'a\u0000b' }] }],
      ['a NUL in an error', { metadata: [{ key: 'cpu', error: 'a\u0000b' }] }],
      ['a NUL in a key', { metadata: [{ key: 'c\u0000pu' }] }],
      ['too many items', { metadata: Array.from({ length: 6145 }, () => ({ key: 'k' })) }],
      ['keys over 6144 bytes', { metadata: [...keys48, 'a'].map((key) => ({ key, value: 'w' })) }],
    ];
    let seq = 100;
    for (const [name, body] of bodies) {
      const post = await h.post(id, token, body);
      expect(post.statusCode, name).toBe(400);
      expect(await stream.report({ seq, ...body }), name).toEqual({ seq, error: post.json().error });
      seq++;
    }
    // What only a stream message can get wrong: its seq (answered with "seq": null), its own properties, its text.
    const messages: [string, unknown, number | null, RegExp][] = [
      ['not JSON', '{"seq": 1, "metadata": [', null, /JSON/],
      ['an empty message', '', null, /JSON/],
      ['a JSON array', [{ seq: 1, metadata: [] }], null, /^body must be object$/],
      ['a JSON string', '"hello"', null, /^body must be object$/],
      ['no seq', { metadata: [] }, null, /^body must have required property 'seq'$/],
      ['a negative seq', { seq: -1, metadata: [] }, null, /^body\/seq must be >= 0$/],
      ['a fractional seq', { seq: 1.5, metadata: [] }, null, /^body\/seq must be integer$/],
      ['a seq as a string', { seq: '1', metadata: [] }, null, /^body\/seq must be integer$/],
      ['a seq over 2^53 - 1', { seq: 2 ** 53, metadata: [] }, null, /^body\/seq must be <= 9007199254740991$/],
      ['an unknown property', { seq: 3, metadata: [], extra: 1 }, 3, /^body must NOT have additional properties$/],
      ['an unknown property and no metadata', { seq: 4, metadata: [], meta: [] }, 4, /additional properties/],
    ];
    for (const [name, message, expectedSeq, error] of messages) {
      const answer = await stream.report(message);
      expect(answer.seq, name).toBe(expectedSeq);
      expect(answer.error, name).toMatch(error);
      expect(Object.keys(answer).sort(), name).toEqual(['error', 'seq']);
    }
    expect(await h.metric('metabatch_stream_rejected_total', { reason: 'invalid' })).toBe(
      bodies.length + messages.length,
    );
    expect(await h.metric('metabatch_stream_reports_total')).toBe(0);
    await h.advance(5000);
    expect(h.service.batcher.channelLength + h.service.batcher.currentBatchLen).toBe(0);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(0);
    // Still open, and still taking reports: exactly 6144 key bytes included.
    expect(await stream.report({ seq: 1, metadata: keys48.map((key) => ({ key, value: 'v' })) })).toEqual({
      seq: 1,
      accepted: 48,
      dropped: 0,
    });
    await h.advance(5000);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(48);
  });

  it('validates the same metadata schema as the POST (the OpenAPI document’s body)', async () => {
    const h = await appHarness();
    const doc = (await h.app.inject({ url: '/openapi.json' })).json();
    const body = doc.paths['/v1/agents/{agentId}/metadata'].post.requestBody.content['application/json'].schema;
    expect(body.properties.metadata).toEqual(JSON.parse(JSON.stringify(ReportMetadata)));
    const stream = doc.paths['/v1/agents/{agentId}/metadata/stream'].get;
    expect(Object.keys(stream.responses).sort()).toEqual(
      ['101', '400', '401', '403', '426', '429', '431', '500', '503'].sort(),
    );
    expect(stream.description).toContain('"retry_after"');
    // As test/openapi.test.ts asks of every route, but with 101 (the upgrade) as the success answer.
    expect(stream).toMatchObject({ tags: ['ingest'], security: [{ agentToken: [] }] });
    expect(stream.parameters).toContainEqual(expect.objectContaining({ in: 'path', name: 'agentId', required: true }));
    for (const [status, response] of Object.entries<{ content?: Record<string, { schema: unknown }> }>(
      stream.responses,
    )) {
      if (Number(status) < 400) continue;
      expect(response.content?.['application/json']?.schema, status).toEqual({
        $ref: '#/components/schemas/ErrorBody',
      });
    }
  });

  it('answers dropped keys with retry_after when the channel is full', async () => {
    // Batch of 1, channel of 1: a blocked flush leaves room for one update.
    const h = await appHarness({ env: { BATCH_SIZE: '1', CHANNEL_MULTIPLIER: '1' } });
    const { id, token } = await h.agent(['cpu', 'mem', 'disk']);
    const stream = await open(h.base, id, token);
    const release = await lockRows(db, [id]);
    expect(await stream.report({ seq: 1, metadata: [{ key: 'cpu', value: '1' }] })).toEqual({
      seq: 1,
      accepted: 1,
      dropped: 0,
    });
    await waitForBlockedUpdate(db);
    const answer = await stream.report({
      seq: 2,
      metadata: [
        { key: 'mem', value: '2' },
        { key: 'disk', value: '3' },
      ],
    });
    expect(answer).toEqual({ seq: 2, accepted: 1, dropped: 1, retry_after: 1 });
    await release();
    await h.service.batcher.idle();
    const rows = await h.stored(id);
    expect([rows.cpu!.value, rows.mem!.value, rows.disk!.value]).toEqual(['1', '2', '']);
    expect(await h.metric('metabatch_metadata_dropped_keys_total')).toBe(1);
  });
});

describe('bounds', () => {
  it('closes with 1009 on a message over 1 MiB, and takes one of exactly 1 MiB', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const stream = await open(h.base, id, token);
    const message = (bytes: number, value: string) => {
      const head = `{"seq":1,"metadata":[{"key":"cpu","value":"${value}`;
      const tail = '"}]}';
      return head + ' '.repeat(bytes - head.length - tail.length) + tail;
    };
    expect(await stream.report(message(MAX_MESSAGE_BYTES, 'fits'))).toEqual({ seq: 1, accepted: 1, dropped: 0 });
    stream.send(message(MAX_MESSAGE_BYTES + 1, 'too big'));
    expect(await stream.closed).toMatchObject({ code: 1009 });
    await h.advance(5000);
    expect((await h.stored(id)).cpu!.value).toBe('fits');
    expect(await h.metric('metabatch_stream_rejected_total', { reason: 'too_big' })).toBe(1);
    await vi.waitFor(async () => expect(await h.metric('metabatch_stream_closed_total', { code: '1009' })).toBe(1));
  });

  it('closes with 1003 on a binary message, and applies nothing of it', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const stream = await open(h.base, id, token);
    stream.ws.send(Buffer.from(JSON.stringify({ seq: 1, metadata: [{ key: 'cpu', value: 'binary' }] })), {
      binary: true,
    });
    expect(await stream.closed).toMatchObject({ code: 1003 });
    expect(stream.answers).toEqual([]);
    await h.advance(5000);
    expect((await h.stored(id)).cpu!.value).toBe('');
    expect(await h.metric('metabatch_stream_rejected_total', { reason: 'binary' })).toBe(1);
  });

  it('stops reading a client that does not read its answers, and answers everything once it does', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const service = serviceEnd(h);
    const stream = await open(h.base, id, token);
    const socket = await service;
    const readWhileFull = readsWhileFull(socket);
    // The client stops reading: answers pile up in the service's socket (and the kernel's buffers).
    stream.ws.pause();
    const count = 300_000;
    const seq = 9_000_000_000_000_000; // long answers: ~55 bytes each, ~16 MB in all
    for (let i = 0; i < count; i++) stream.send(`{"seq":${seq + i},"metadata":[]}`);
    // The service stops reading once over 1 MiB of answers waits, short of every report.
    await heldBack(h, socket);
    const handled = await h.metric('metabatch_stream_reports_total');
    expect(handled).toBeGreaterThan(0);
    expect(handled).toBeLessThan(count);
    // Reading again: every report is answered, in order.
    stream.ws.resume();
    await stream.until(() => stream.answers.length === count);
    expect(stream.answers.every((answer, i) => answer.seq === seq + i && answer.accepted === 0)).toBe(true);
    // And it never read a report while over 1 MiB of answers waited (it read again only once they drained).
    expect(readWhileFull).toEqual([]);
  }, 60_000);

  it(`pings every ${PING_INTERVAL_MS / 1000} s and cuts off a stream that answers no ping and sends nothing`, async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const silent = await open(h.base, id, token, { autoPong: false });
    const answering = await open(h.base, id, token);
    const reporting = await open(h.base, id, token, { autoPong: false });
    const pings = { silent: 0, answering: 0, reporting: 0 };
    silent.ws.on('ping', () => pings.silent++);
    answering.ws.on('ping', () => pings.answering++);
    reporting.ws.on('ping', () => pings.reporting++);
    // A ping the client answered has reached the service once the client's own ping is answered behind it.
    const roundTrip = (client: StreamClient) =>
      new Promise<void>((resolve) => {
        client.ws.once('pong', () => resolve());
        client.ws.ping();
      });
    const interval = async (seq: number) => {
      h.clock.tick(PING_INTERVAL_MS);
      await vi.waitFor(() => expect(pings.answering).toBe(seq));
      await roundTrip(answering);
      expect(await reporting.report({ seq, metadata: [] })).toMatchObject({ seq, accepted: 0 });
    };
    await interval(1);
    expect(pings.silent).toBe(1);
    // 30 s more without an answer: cut off (no close frame); the others go on.
    await interval(2);
    expect(await silent.closed).toMatchObject({ code: 1006 });
    await interval(3);
    expect(answering.ws.readyState).toBe(WebSocket.OPEN);
    expect(reporting.ws.readyState).toBe(WebSocket.OPEN);
    // The reporting client stops reporting: pinged at the next beat, cut off at the one after.
    h.clock.tick(PING_INTERVAL_MS);
    await vi.waitFor(() => expect(pings.answering).toBe(4));
    await roundTrip(answering);
    expect(reporting.ws.readyState).toBe(WebSocket.OPEN);
    h.clock.tick(PING_INTERVAL_MS);
    expect(await reporting.closed).toMatchObject({ code: 1006 });
    expect(answering.ws.readyState).toBe(WebSocket.OPEN);
    await vi.waitFor(async () => expect(await h.metric('metabatch_stream_closed_total', { code: '1006' })).toBe(2));
  });

  it('spreads its pings over the period: each stream once a period, streams opened together in turns', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const clients = [await open(h.base, id, token), await open(h.base, id, token), await open(h.base, id, token)];
    const pingedAt: number[][] = clients.map(() => []);
    // A ping sent before the client's own ping was answered has reached it by then.
    const settle = () =>
      Promise.all(
        clients.map(
          (client) =>
            new Promise<void>((resolve) => {
              client.ws.once('pong', () => resolve());
              client.ws.ping();
            }),
        ),
      );
    for (let step = 1; step <= 2 * PING_SLOTS; step++) {
      clients.forEach((client, i) => client.ws.once('ping', () => pingedAt[i]!.push(step)));
      h.clock.tick(PING_INTERVAL_MS / PING_SLOTS);
      await settle();
      for (const client of clients) client.ws.removeAllListeners('ping');
    }
    // Opened together, pinged in three different turns, then again a whole period later.
    expect(new Set(pingedAt.map((steps) => steps[0])).size).toBe(3);
    for (const steps of pingedAt) expect(steps).toEqual([steps[0], steps[0]! + PING_SLOTS]);
  });

  it('is not cut off by the HTTP server’s request and idle timeouts', async () => {
    const h = await appHarness({ timeouts: { headersMs: 200, requestMs: 300, idleMs: 300 } });
    const { id, token } = await h.agent(['cpu']);
    const stream = await open(h.base, id, token);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    expect(await stream.report({ seq: 1, metadata: [] })).toEqual({ seq: 1, accepted: 0, dropped: 0 });
  });
});

describe('shutdown', () => {
  it('answers what it received, closes with 1001, and what it acknowledged is in the table afterwards', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const stream = await open(h.base, id, token);
    const idle = await open(h.base, id, token);
    expect(await stream.report({ seq: 0, metadata: [{ key: 'cpu', value: 'v0' }] })).toMatchObject({ accepted: 1 });
    // A burst, and the stop as soon as the first of it is answered.
    for (let seq = 1; seq <= 50; seq++) stream.send({ seq, metadata: [{ key: 'cpu', value: `v${seq}` }] });
    await stream.until(() => stream.answers.length >= 2);
    const stopping = h.service.stop();
    expect(await stream.closed).toEqual({ code: 1001, reason: 'shutting down' });
    expect(await idle.closed).toEqual({ code: 1001, reason: 'shutting down' });
    expect(await stopping).toEqual({ flushed: true });
    // Answers in order, every one a report taken; the last one taken is the value, nothing after it applied.
    const last = stream.answers.length - 1;
    expect(stream.answers).toEqual(Array.from({ length: last + 1 }, (_, seq) => ({ seq, accepted: 1, dropped: 0 })));
    const { rows } = await db.pool.query(`SELECT value FROM workspace_agent_metadata WHERE workspace_agent_id = $1`, [
      id,
    ]);
    expect(rows).toEqual([{ value: `v${last}` }]);
  });

  it('answers the reports it had read and held for a client that was not reading, then closes with 1001', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const service = serviceEnd(h);
    const stream = await open(h.base, id, token);
    const socket = await service;
    stream.ws.pause();
    const count = 300_000;
    for (let seq = 0; seq < count; seq++) stream.send(`{"seq":${seq},"metadata":[{"key":"cpu","value":"v${seq}"}]}`);
    // Reading has stopped (backpressure), with what was read last held unanswered.
    await heldBack(h, socket);
    const handled = await h.metric('metabatch_stream_reports_total');
    const stopping = h.service.stop();
    stream.ws.resume();
    expect(await stream.closed).toEqual({ code: 1001, reason: 'shutting down' });
    expect(await stopping).toEqual({ flushed: true });
    // Every report read was answered, in order: those held included; none after them.
    const answered = stream.answers.length;
    expect(answered).toBeGreaterThanOrEqual(handled);
    expect(answered).toBeLessThan(count);
    expect(stream.answers.every((answer, seq) => answer.seq === seq && answer.error === undefined)).toBe(true);
    const lastTaken = stream.answers.findLast((answer) => answer.accepted === 1)!.seq;
    const { rows } = await db.pool.query(`SELECT value FROM workspace_agent_metadata WHERE workspace_agent_id = $1`, [
      id,
    ]);
    expect(rows).toEqual([{ value: `v${lastTaken}` }]);
  }, 60_000);
});

describe('revocation on this replica', () => {
  it('closes the agent’s streams with 4001 at once when it is deleted', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const other = await h.agent(['cpu']);
    const streams = await Promise.all([open(h.base, id, token), open(h.base, id, token)]);
    const bystander = await open(h.base, other.id, other.token);
    const deleted = await h.app.inject({ method: 'DELETE', url: `/v1/agents/${id}`, headers: bearer(ADMIN_TOKEN) });
    expect(deleted.statusCode).toBe(204);
    const answeredAt = Date.now();
    for (const stream of streams) expect(await stream.closed).toEqual({ code: 4001, reason: 'token revoked' });
    expect(Date.now() - answeredAt).toBeLessThan(500);
    expect(await refused(h.base, id, bearer(token))).toMatchObject({ status: 401 });
    expect(await bystander.report({ seq: 1, metadata: [] })).toMatchObject({ accepted: 0 });
    await vi.waitFor(async () => expect(await h.metric('metabatch_stream_closed_total', { code: '4001' })).toBe(2));
  });

  it('closes the streams of a rotated token with 4001 at once; the new token opens one', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const stream = await open(h.base, id, token);
    const rotated = await h.app.inject({ method: 'POST', url: `/v1/agents/${id}/token`, headers: bearer(ADMIN_TOKEN) });
    expect(rotated.statusCode).toBe(200);
    const answeredAt = Date.now();
    expect(await stream.closed).toEqual({ code: 4001, reason: 'token revoked' });
    expect(Date.now() - answeredAt).toBeLessThan(500);
    expect(await refused(h.base, id, bearer(token))).toMatchObject({ status: 401 });
    const renewed = await open(h.base, id, rotated.json<{ token: string }>().token);
    expect(await renewed.report({ seq: 1, metadata: [{ key: 'cpu', value: 'new' }] })).toMatchObject({ accepted: 1 });
  });

  it('refuses a stream whose upgrade was checking its token when the agent was revoked', () => {
    const registry = new StreamRegistry();
    const closed: string[] = [];
    const stream = (name: string) => ({ revoke: () => closed.push(name) });
    const before = registry.epoch();
    registry.revoke('agent-b');
    // Another agent's revocation does not matter; this agent's does.
    expect(registry.open('agent-a', stream('a1'), before)).toBe('open');
    const during = registry.epoch();
    registry.revoke('agent-a');
    expect(closed).toEqual(['a1']);
    expect(registry.open('agent-a', stream('a2'), during)).toBe('revoked');
    registry.remove('agent-a', { revoke: () => undefined });
    expect(registry.size).toBe(1);
    for (let i = 0; i < MAX_STREAMS_PER_AGENT - 1; i++) {
      expect(registry.open('agent-a', stream(`a${i + 3}`), registry.epoch())).toBe('open');
    }
    expect(registry.hasRoom('agent-a')).toBe(false);
    expect(registry.open('agent-a', stream('one too many'), registry.epoch())).toBe('full');
    // Thousands of revocations since the upgrade began: it cannot tell (the client is told to connect again).
    const long = registry.epoch();
    for (let i = 0; i < 4096; i++) registry.revoke(`agent-${i}`);
    expect(registry.open('agent-z', stream('z1'), long)).toBe('open');
    expect(registry.open('agent-0', stream('a0'), long)).toBe('revoked');
    registry.revoke('agent-y');
    expect(registry.open('agent-z', stream('z2'), long)).toBe('unknown');
  });
});

describe('revocation across replicas', () => {
  const ADMIN = 'stream-revocation-admin-token';
  const replicas = replicasOf(db, ['a', 'b'], { ADMIN_TOKEN: ADMIN, LOG_LEVEL: 'info' });

  it('closes the other replica’s streams within a second of a rotation and of a deletion', async () => {
    const [a, b] = replicas as [(typeof replicas)[0], (typeof replicas)[0]];
    const created = (await call(a.base, 'POST', '/v1/agents', ADMIN, { name: 'streaming' })).body!;
    await call(a.base, 'PUT', `/v1/agents/${created.id}/metadata-definitions`, ADMIN, {
      definitions: [{ key: 'cpu' }],
    });
    const first = await open(b.base, created.id!, created.token!);
    expect(await first.report({ seq: 1, metadata: [{ key: 'cpu', value: '1' }] })).toMatchObject({ accepted: 1 });

    const rotatedAt = Date.now();
    const rotated = (await call(a.base, 'POST', `/v1/agents/${created.id}/token`, ADMIN)).body!;
    expect(await first.closed).toEqual({ code: 4001, reason: 'token revoked' });
    expect(Date.now() - rotatedAt).toBeLessThan(1000);

    const second = await open(b.base, created.id!, rotated.token!);
    expect(await second.report({ seq: 2, metadata: [{ key: 'cpu', value: '2' }] })).toMatchObject({ accepted: 1 });
    const deletedAt = Date.now();
    expect((await call(a.base, 'DELETE', `/v1/agents/${created.id}`, ADMIN)).status).toBe(204);
    expect(await second.closed).toEqual({ code: 4001, reason: 'token revoked' });
    expect(Date.now() - deletedAt).toBeLessThan(1000);
  });
});

// Messages near the valid shape, where the bugs live, and arbitrary JSON and text.
const seqValue = fc.oneof(
  fc.nat(),
  fc.constant(Number.MAX_SAFE_INTEGER),
  fc.integer(),
  fc.double(),
  fc.string({ maxLength: 5 }),
  fc.constant(null),
);
const streamMessage = fc.oneof(
  fc
    .record({ seq: seqValue, metadata: fc.array(metadataItem, { maxLength: 40 }) }, { requiredKeys: ['metadata'] })
    .map((m) => JSON.stringify(m)),
  fc
    .record({ seq: fc.nat(), metadata: fc.array(metadataItem, { maxLength: 10 }), extra: fc.jsonValue() })
    .map((m) => JSON.stringify(m)),
  fc.json({ depthSize: 'medium' }),
  fc.jsonValue().map((v) => JSON.stringify({ seq: 1, metadata: v })),
  fc.nat({ max: 20_000 }).map((depth) => '['.repeat(depth) + ']'.repeat(depth)),
  fc.string({ maxLength: 300 }),
);

/** The seq an answer must carry: the message's when it is a valid one, else null. */
function expectedSeq(text: string): number | null {
  let message: unknown;
  try {
    message = JSON.parse(text);
  } catch {
    return null;
  }
  const seq = (message as { seq?: unknown } | null)?.seq;
  return typeof message === 'object' && typeof seq === 'number' && Number.isSafeInteger(seq) && seq >= 0 ? seq : null;
}

describe('generated messages', () => {
  it('answers every one of a few thousand, never crashes, and still takes a valid report afterwards', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu', 'mem']);
    const stream = await open(h.base, id, token);
    let sent = 0;
    let errors = 0;
    await fc.assert(
      fc.asyncProperty(streamMessage, async (text) => {
        sent++;
        const answer = await stream.report(text);
        expect(answer.seq).toBe(expectedSeq(text));
        if (answer.error !== undefined) {
          errors++;
          expect(Object.keys(answer).sort()).toEqual(['error', 'seq']);
          expect(typeof answer.error).toBe('string');
        } else {
          const { metadata } = JSON.parse(text) as { metadata: unknown[] };
          expect(answer.accepted! + answer.dropped!).toBe(metadata.length);
        }
      }),
      // Seeded, so a failure replays; FC_SEED=<n> explores other inputs.
      { numRuns: 3000, seed: Number(process.env.FC_SEED ?? 20261124) },
    );
    expect(stream.answers).toHaveLength(sent);
    expect(errors).toBeGreaterThan(sent / 2);
    expect(errors).toBeLessThan(sent);
    expect(await h.metric('metabatch_stream_rejected_total', { reason: 'invalid' })).toBe(errors);
    // Whatever was accepted flushes without failing the batch.
    await h.advance(5000);
    await h.service.batcher.idle();
    expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(0);
    expect(await stream.report({ seq: 1, metadata: [{ key: 'cpu', value: 'still serving' }] })).toEqual({
      seq: 1,
      accepted: 1,
      dropped: 0,
    });
    await h.advance(5000);
    expect((await h.stored(id)).cpu!.value).toBe('still serving');
  }, 120_000);
});
