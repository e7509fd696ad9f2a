// Strict input, on the service as production wires it: what Postgres text
// cannot hold (NUL, lone surrogates) and impossible cursors are 400s with a
// message, never 500s; bodies are strict UTF-8 JSON (other charsets are
// 415s) with no unknown top-level property; the stream refuses what the POST
// refuses. And no token reaches the log, at trace, from malformed requests.

import net from 'node:net';
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { createLogger } from '../src/logger.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';

const db = testDatabase();
const appHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const json = { 'content-type': 'application/json' };

/** A raw JSON body: the escapes stay as written (`\u0000`, `\ud800`), as a client could send them. */
function request(h: ServiceHarness, method: 'GET' | 'POST' | 'PUT', url: string, payload?: string | Buffer) {
  return h.app.inject({ method, url, headers: payload === undefined ? admin : { ...admin, ...json }, payload });
}

/** A cursor as the service encodes one, with this created_at. */
function cursor(createdAt: string): string {
  return Buffer.from(JSON.stringify([createdAt, '123e4567-e89b-12d3-a456-426614174000'])).toString('base64url');
}

describe('input Postgres cannot store is a 400, never a 500', () => {
  it('refuses a NUL in a bulk read key with an agent token', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const res = await h.app.inject({
      url: `/v1/agents/metadata?agent_id=${id}&key=%00`,
      headers: { authorization: `Bearer ${token}` },
    });
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toMatch(/NUL/);
  });

  it.each([
    ['a NUL in name_prefix', 'GET', '/v1/agents?name_prefix=a%00b', undefined, /NUL/],
    ['a NUL in an agent name', 'POST', '/v1/agents', '{"name":"a\\u0000b"}', /^body\/name must not contain NUL/],
    ['a lone surrogate in an agent name', 'POST', '/v1/agents', '{"name":"web-\\ud800"}', /lone surrogate/],
    ['a lone low surrogate in an agent name', 'POST', '/v1/agents', '{"name":"\\udc00web"}', /lone surrogate/],
    ['a NUL in a property name', 'POST', '/v1/agents', '{"name":"web","\\u0000":1}', /NUL/],
    ['a month 13 cursor', 'GET', `/v1/agents?cursor=${cursor('2026-13-01 00:00:00+00')}`, undefined, /cursor/],
    ['a February 30 cursor', 'GET', `/v1/agents?cursor=${cursor('2026-02-30 00:00:00.5+00')}`, undefined, /cursor/],
    ['a year 0000 cursor', 'GET', `/v1/agents?cursor=${cursor('0000-01-01 00:00:00+00')}`, undefined, /cursor/],
    ['an hour 25 cursor', 'GET', `/v1/agents?cursor=${cursor('2026-01-01 25:00:00+00')}`, undefined, /cursor/],
    ['a cursor 16 hours east', 'GET', `/v1/agents?cursor=${cursor('2026-01-01 00:00:00+16')}`, undefined, /cursor/],
    [
      'an agent_id Postgres does not read as a UUID',
      'GET',
      '/v1/agents/metadata?agent_id=urn:uuid:123e4567-e89b-12d3-a456-426614174000',
      undefined,
      /agent_id/,
    ],
  ] as const)('answers 400 to %s (admin)', async (_name, method, url, payload, message) => {
    const h = await appHarness();
    const res = await request(h, method, url, payload);
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toMatch(message);
  });

  it.each([
    ['a NUL in a display_name', '{"definitions":[{"key":"cpu","display_name":"C\\u0000PU"}]}', /NUL/],
    ['a NUL in a script', '{"definitions":[{"key":"cpu","script":"echo \\u0000"}]}', /NUL/],
    ['a lone surrogate in a key', '{"definitions":[{"key":"cpu\\udbff"}]}', /lone surrogate/],
    ['a lone surrogate in a script', '{"definitions":[{"key":"cpu","script":"\\ud800\\ud800"}]}', /lone surrogate/],
  ])('answers 400 to %s in the declared keys', async (_name, payload, message) => {
    const h = await appHarness();
    const { id } = await h.agent(['cpu']);
    const res = await request(h, 'PUT', `/v1/agents/${id}/metadata-definitions`, payload);
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toMatch(message);
  });

  it('still takes a cursor it gave out, and names that are valid Unicode (surrogate pairs included)', async () => {
    const h = await appHarness();
    for (const name of ['page-1', 'page-2', 'page-3']) await request(h, 'POST', '/v1/agents', JSON.stringify({ name }));
    const created = await request(h, 'POST', '/v1/agents', '{"name":"page-\\ud83d\\ude00 é"}');
    expect(created.statusCode).toBe(201);
    expect(created.json().name).toBe('page-😀 é');
    const first = await request(h, 'GET', '/v1/agents?limit=2&name_prefix=page-');
    expect(first.statusCode).toBe(200);
    const next = await request(h, 'GET', `/v1/agents?limit=2&name_prefix=page-&cursor=${first.json().next_cursor}`);
    expect(next.statusCode).toBe(200);
    expect(next.json().agents.map((a: { name: string }) => a.name)).toEqual(['page-3', 'page-😀 é']);
    // The bulk read still takes an upper-case UUID.
    const { id } = await h.agent(['cpu']);
    const bulk = await request(h, 'GET', `/v1/agents/metadata?agent_id=${id.toUpperCase()}&key=cpu`);
    expect(bulk.statusCode).toBe(200);
  });
});

describe('POST /v1/agents/{id}/metadata takes strict JSON only', () => {
  const body = (value: string | Buffer) =>
    Buffer.concat([Buffer.from('{"metadata":[{"key":"cpu","value":"'), Buffer.from(value), Buffer.from('"}]}')]);

  it.each([
    [
      'an unknown top-level property',
      Buffer.from('{"metadata":[],"extra":1}'),
      /^body must NOT have additional properties$/,
    ],
    [
      'an unknown property of an item (a misspelt value)',
      Buffer.from('{"metadata":[{"key":"cpu","vlaue":"12%"}]}'),
      /^body\/metadata\/0 must NOT have additional properties$/,
    ],
    ['Latin-1 bytes', body(Buffer.from([0xff, 0xfe, 0xe9])), /not valid UTF-8/],
    ['a truncated UTF-8 character', body(Buffer.from([0xc3])), /not valid UTF-8/],
    ['an overlong NUL', body(Buffer.from([0xc0, 0x80])), /not valid UTF-8/],
    ['a surrogate encoded as UTF-8', body(Buffer.from([0xed, 0xa0, 0x80])), /not valid UTF-8/],
    ['an escaped lone surrogate', body('x\\ud800y'), /^body\/metadata\/0\/value must not contain a lone surrogate/],
    ['two high surrogates', body('\\ud83d\\ud83d'), /lone surrogate/],
    ['an escaped NUL in an error', Buffer.from('{"metadata":[{"key":"cpu","error":"\\u0000"}]}'), /NUL/],
  ])('answers 400 to %s, and stores nothing', async (_name, payload, message) => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const res = await h.app.inject({
      method: 'POST',
      url: `/v1/agents/${id}/metadata`,
      headers: { authorization: `Bearer ${token}`, ...json },
      payload,
    });
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toMatch(message);
    await h.advance(5000);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(0);
  });

  it.each(['utf-16', 'iso-8859-1', '"latin1"', 'UTF-16LE', 'utf-8; charset=latin1'])(
    'answers 415 to charset=%s',
    async (charset) => {
      const h = await appHarness();
      const { id, token } = await h.agent(['cpu']);
      const res = await h.app.inject({
        method: 'POST',
        url: `/v1/agents/${id}/metadata`,
        headers: { authorization: `Bearer ${token}`, 'content-type': `application/json; charset=${charset}` },
        payload: '{"metadata":[{"key":"cpu","value":"x"}]}',
      });
      expect(res.statusCode).toBe(415);
      expect(res.json().error).toMatch(/charset/);
    },
  );

  it('takes UTF-8 as it is, named or not, escaped surrogate pairs included', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu', 'mem', 'disk']);
    for (const [contentType, key, value] of [
      ['application/json', 'cpu', 'é ✓'],
      ['application/json; charset=utf-8', 'mem', '\\ud83d\\ude00'],
      ['application/json;charset="UTF-8"', 'disk', '\\u00e9'],
    ]) {
      const res = await h.app.inject({
        method: 'POST',
        url: `/v1/agents/${id}/metadata`,
        headers: { authorization: `Bearer ${token}`, 'content-type': contentType },
        payload: Buffer.from(`{"metadata":[{"key":"${key}","value":"${value}"}]}`),
      });
      expect(res.statusCode, contentType).toBe(202);
    }
    await h.advance(5000);
    const rows = await h.stored(id);
    expect([rows.cpu!.value, rows.mem!.value, rows.disk!.value]).toEqual(['é ✓', '😀', 'é']);
  });
});

describe('the ingest stream refuses what the POST refuses', () => {
  it('answers an escaped lone surrogate or NUL with the POST’s message, and closes on invalid UTF-8 (1007)', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const url = `${h.base.replace('http', 'ws')}/v1/agents/${id}/metadata/stream`;
    const ws = new WebSocket(url, { headers: { authorization: `Bearer ${token}` } });
    await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
    const answers: string[] = [];
    ws.on('message', (data: Buffer) => answers.push(data.toString()));
    const next = () =>
      new Promise<unknown>((resolve) => ws.once('message', (data: Buffer) => resolve(JSON.parse(data.toString()))));
    for (const [seq, value] of [
      [1, 'x\\ud800'],
      [2, 'a\\u0000b'],
    ] as const) {
      const post = await h.app.inject({
        method: 'POST',
        url: `/v1/agents/${id}/metadata`,
        headers: { authorization: `Bearer ${token}`, ...json },
        payload: `{"metadata":[{"key":"cpu","value":"${value}"}]}`,
      });
      const answer = next();
      ws.send(`{"seq":${seq},"metadata":[{"key":"cpu","value":"${value}"}]}`);
      expect(post.statusCode).toBe(400);
      expect(await answer).toEqual({ seq, error: post.json().error });
    }
    const closed = new Promise<number>((resolve) => ws.once('close', resolve));
    ws.send(Buffer.from([0x7b, 0xed, 0xa0, 0x80, 0x7d]), { binary: false });
    expect(await closed).toBe(1007);
    await h.advance(5000);
    expect(await h.metric('metabatch_metadata_flushed_total')).toBe(0);
  });
});

describe('no token in the log, at trace', () => {
  /** Every string of a log line, raw bytes (`{"type":"Buffer","data":[…]}`) decoded as text too. */
  function strings(value: unknown): string[] {
    if (typeof value === 'string') return [value];
    if (typeof value !== 'object' || value === null) return [];
    const buffer = value as { type?: unknown; data?: unknown };
    if (buffer.type === 'Buffer' && Array.isArray(buffer.data))
      return [Buffer.from(buffer.data as number[]).toString()];
    return Object.entries(value).flatMap(([key, item]) => [key, ...strings(item)]);
  }

  /** Writes raw bytes on a fresh connection and resolves with the answer once the server closes it. */
  function raw(base: string, bytes: string): Promise<string> {
    const socket = net.connect(Number(new URL(base).port), '127.0.0.1');
    let answer = '';
    socket.on('data', (chunk: Buffer) => (answer += chunk.toString()));
    socket.on('error', () => undefined);
    return new Promise((resolve) => {
      socket.once('close', () => resolve(answer));
      socket.write(bytes);
    });
  }

  it('logs no agent or admin token from malformed requests, oversize headers or ordinary ones', async () => {
    const lines: string[] = [];
    const destination = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(...chunk.toString().split('\n').filter(Boolean));
        callback();
      },
    });
    const h = await appHarness({ logger: createLogger('trace', destination) });
    const { id, token } = await h.agent(['cpu']);
    const answers: string[] = [];
    for (const secret of [token, ADMIN_TOKEN]) {
      const auth = `Authorization: Bearer ${secret}\r\n`;
      const post = `POST /v1/agents/${id}/metadata HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/json\r\n`;
      answers.push(
        // A control character in a header value.
        await raw(h.base, `GET /healthz HTTP/1.1\r\nHost: x\r\n${auth}X-Bad: a\x01b\r\n\r\n`),
        // Request smuggling: both framings.
        await raw(h.base, `${post}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`),
        // A malformed request line after the headers began.
        await raw(h.base, `GET /healthz HTTP/9.9\r\n${auth}\r\n`),
        // Headers over 16 KiB.
        await raw(h.base, `GET /healthz HTTP/1.1\r\nHost: x\r\n${auth}X-Big: ${'a'.repeat(17_000)}\r\n\r\n`),
        // A bad chunk size.
        await raw(h.base, `${post}Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n`),
      );
      await h.app.inject({ url: '/v1/agents', headers: { authorization: `Bearer ${secret}` } });
      await h.post(id, secret, { metadata: [{ key: 'cpu', value: 'x' }] });
    }
    // Each is refused by the HTTP parser (after an answer to what came before the bad bytes, for some).
    for (const answer of answers) expect(answer).toMatch(/HTTP\/1\.1 4(00|31) [^]*"statusCode":4(00|31)\}$/);
    // The log did see those requests (the test would prove nothing otherwise).
    expect(lines.some((line) => line.includes('client error'))).toBe(true);
    const logged = lines.flatMap((line) => strings(JSON.parse(line))).join('\n');
    expect(logged).not.toContain(token);
    expect(logged).not.toContain(ADMIN_TOKEN);
  });
});
