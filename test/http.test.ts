// The HTTP API as a client sees it, on the service as production wires it:
// every status code of the README, and the original's input rules (coder's
// BatchUpdateMetadata test cases, see docs/original.md), against a real
// Postgres.

import net from 'node:net';
import { describe, expect, it, vi } from 'vitest';
import { BODY_LIMIT_BYTES } from '../src/limits.js';
import { provisionAgents } from '../src/provision.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { failUpdates, lockRows, outage, waitForBlockedUpdate } from './support/faults.js';
import { ADMIN_TOKEN, startTestService } from './support/service.js';

const db = testDatabase();
const appHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

describe('POST /v1/agents/{id}/metadata', () => {
  it('answers 202 with the counts, and the values reach the table at the next flush', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu', 'mem']);
    const res = await h.post(id, token, {
      metadata: [
        { key: 'cpu', value: '12%', error: '', collected_at: '2026-11-22T23:59:00Z' },
        { key: 'mem', value: '1G' },
      ],
    });
    expect(res.statusCode).toBe(202);
    expect(res.json()).toEqual({ accepted: 2, dropped: 0 });
    const postedAt = h.clock.now;
    await h.advance(5000);
    const rows = await h.stored(id);
    expect(rows.cpu).toMatchObject({ value: '12%', error: '', collected_at: '2026-11-22T23:59:00.000Z' });
    // No collected_at: the server's time.
    expect(rows.mem!.collected_at).toBe(new Date(postedAt).toISOString());
    // Declaring its keys announced the agent, and so did the flush.
    await h.waitForPayloads(2);
    expect(h.payloads).toEqual([[id], [id]]);
  });

  it('keeps values byte for byte and collected_at to the microsecond, whatever its time zone', async () => {
    const h = await appHarness();
    const awkward = [
      '',
      ' ',
      'a,b',
      '{x}',
      '"quoted"',
      'back\\slash',
      'NULL',
      'null',
      'ünïcødé ✓ 𝄞',
      'tab\there',
      "it's",
    ];
    const keys = awkward.map((_, i) => `k${i}`);
    const { id, token } = await h.agent([...keys, 'tz1', 'tz2', 'tz3']);
    const res = await h.post(id, token, {
      metadata: [
        ...awkward.map((value, i) => ({
          key: `k${i}`,
          value: `x${value}x`,
          error: value,
          collected_at: '2026-11-23T00:00:00Z',
        })),
        { key: 'tz1', value: 'a', collected_at: '2026-11-23T10:00:00.123456+02:00' },
        { key: 'tz2', value: 'b', collected_at: '2026-11-22 23:30:00.000001-01:30' },
        // Nanoseconds, as Go writes them: rounded to the microsecond, as Postgres rounds.
        { key: 'tz3', value: 'c', collected_at: '2026-11-23T00:00:00.9999995Z' },
      ],
    });
    expect(res.statusCode).toBe(202);
    await h.advance(5000);
    const { rows } = await db.pool.query<{ key: string; value: string; error: string; at: string }>(
      `SELECT key, value, error, to_char(collected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') AS at
       FROM workspace_agent_metadata WHERE workspace_agent_id = $1`,
      [id],
    );
    const byKey = new Map(rows.map((r) => [r.key, r]));
    awkward.forEach((value, i) =>
      // Trimmed at both ends (the x's keep the inner whitespace), nothing else.
      expect(byKey.get(`k${i}`)).toMatchObject({ value: `x${value}x`, error: value.trim() }),
    );
    expect(byKey.get('tz1')!.at).toBe('2026-11-23T08:00:00.123456');
    expect(byKey.get('tz2')!.at).toBe('2026-11-23T01:00:00.000001');
    expect(byKey.get('tz3')!.at).toBe('2026-11-23T00:00:01.000000');
  });

  it('answers 400 to a collected_at that is no date (February 30th, a 25th hour, no time zone)', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    for (const collected_at of [
      '2026-02-30T00:00:00Z',
      '2026-11-23T24:00:00Z',
      '2026-11-23T00:00:00',
      '0000-01-01T00:00:00Z',
    ]) {
      const res = await h.post(id, token, { metadata: [{ key: 'cpu', value: '1', collected_at }] });
      expect(res.statusCode, collected_at).toBe(400);
      expect(res.json().error).toMatch(/collected_at must be an RFC 3339 timestamp/);
    }
  });

  it('clamps a collected_at in the future to server time', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    expect(
      (await h.post(id, token, { metadata: [{ key: 'cpu', value: 'x', collected_at: '2099-01-01T00:00:00Z' }] }))
        .statusCode,
    ).toBe(202);
    await h.advance(5000);
    expect((await h.stored(id)).cpu!.collected_at).toBe(new Date(h.clock.now - 5000).toISOString());
  });

  it('answers 401 without a token or with a wrong one, 403 with another agent’s token, and applies nothing', async () => {
    const h = await appHarness();
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const body = { metadata: [{ key: 'cpu', value: 'stolen' }] };
    const missing = await h.post(a.id, undefined, body);
    expect(missing.statusCode).toBe(401);
    expect(missing.json().error).toMatch(/missing agent token/);
    const wrong = await h.post(a.id, 'mbt_not-a-real-token', body);
    expect(wrong.statusCode).toBe(401);
    expect(wrong.json()).toEqual({ error: 'invalid agent token' });
    const other = await h.post(a.id, b.token, body);
    expect(other.statusCode).toBe(403);
    expect(other.json()).toEqual({ error: 'this token belongs to another agent' });
    const admin = await h.post(a.id, ADMIN_TOKEN, body);
    expect(admin.statusCode).toBe(401);
    await h.advance(5000);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(0);
    expect((await h.stored(a.id)).cpu!.value).toBe('');
  });

  it.each([
    ['malformed JSON', '{"metadata": [', /JSON/],
    ['an empty body', '', /empty/i],
    ['no metadata', { other: 1 }, /must have required property 'metadata'/],
    ['metadata not an array', { metadata: 'cpu=1' }, /metadata must be array/],
    ['a value that is not a string', { metadata: [{ key: 'cpu', value: 12 }] }, /value must be string/],
    ['an empty key', { metadata: [{ key: '', value: 'x' }] }, /key must NOT have fewer than 1 characters/],
    [
      'a key of 128 characters',
      { metadata: [{ key: 'k'.repeat(128), value: 'x' }] },
      /key must NOT have more than 127 characters/,
    ],
    [
      'a bad collected_at',
      { metadata: [{ key: 'cpu', collected_at: 'yesterday' }] },
      /collected_at must be an RFC 3339 timestamp/,
    ],
    ['a NUL in a value', { metadata: [{ key: 'cpu', value: 'a\u0000b' }] }, /NUL/],
    [
      'too many items',
      { metadata: Array.from({ length: 6145 }, () => ({ key: 'k' })) },
      /must NOT have more than 6144 items/,
    ],
  ])('answers 400 with a message for %s', async (_name, body, message) => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const res = await h.app.inject({
      method: 'POST',
      url: `/v1/agents/${id}/metadata`,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      payload: typeof body === 'string' ? body : JSON.stringify(body),
    });
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toMatch(message);
    await h.advance(5000);
    expect(await h.metric('metabatch_metadata_batches_total', { reason: 'scheduled' })).toBe(0);
  });

  it('answers 400 for an agent id that is not a UUID', async () => {
    const h = await appHarness();
    const res = await h.post('not-a-uuid', 'x', { metadata: [] });
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toMatch(/agentId must be a UUID/);
  });

  it('answers 415 for a body that is not JSON', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const res = await h.app.inject({
      method: 'POST',
      url: `/v1/agents/${id}/metadata`,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' },
      payload: 'cpu=12%',
    });
    expect(res.statusCode).toBe(415);
    expect(res.json().error).toMatch(/Unsupported Media Type/i);
  });

  it('answers 413 from Content-Length before reading the body', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const big = JSON.stringify({ metadata: [{ key: 'cpu', value: 'x'.repeat(BODY_LIMIT_BYTES) }] });
    const res = await h.app.inject({
      method: 'POST',
      url: `/v1/agents/${id}/metadata`,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      payload: big,
    });
    expect(res.statusCode).toBe(413);
    expect(res.json().error).toMatch(/exceeds the limit of 1048576 bytes/);
  });

  it('answers 429 with Retry-After and the counts when the channel is full', async () => {
    // Batch of 1, channel of 1: a blocked flush leaves room for one update.
    const h = await appHarness({ env: { BATCH_SIZE: '1', CHANNEL_MULTIPLIER: '1' } });
    const { id, token } = await h.agent(['cpu', 'mem', 'disk']);
    const release = await lockRows(db, [id]);
    expect((await h.post(id, token, { metadata: [{ key: 'cpu', value: '1' }] })).statusCode).toBe(202);
    await waitForBlockedUpdate(db);
    const res = await h.post(id, token, {
      metadata: [
        { key: 'mem', value: '2' },
        { key: 'disk', value: '3' },
      ],
    });
    expect(res.statusCode).toBe(429);
    expect(res.json()).toEqual({ accepted: 1, dropped: 1 });
    expect(res.headers['retry-after']).toBe('1');
    await release();
    await h.service.batcher.idle();
    const rows = await h.stored(id);
    expect([rows.cpu!.value, rows.mem!.value, rows.disk!.value]).toEqual(['1', '2', '']);
    expect(await h.metric('metabatch_metadata_dropped_keys_total')).toBe(1);
  });

  describe('the original’s input rules', () => {
    it('ExceededLength: keeps 2048-byte values and errors, cuts longer ones with the original’s messages', async () => {
      const h = await appHarness();
      const { id, token } = await h.agent(['v2048', 'v2049', 'e2048', 'e2049', 'both']);
      const res = await h.post(id, token, {
        metadata: [
          { key: 'v2048', value: 'a'.repeat(2048) },
          { key: 'v2049', value: 'a'.repeat(2049) },
          { key: 'e2048', error: 'a'.repeat(2048) },
          { key: 'e2049', error: 'a'.repeat(2049) },
          { key: 'both', value: 'b'.repeat(3000), error: 'e'.repeat(2100) },
        ],
      });
      expect(res.statusCode).toBe(202);
      await h.advance(5000);
      const rows = await h.stored(id);
      expect(rows.v2048).toMatchObject({ value: 'a'.repeat(2048), error: '' });
      expect(rows.v2049).toMatchObject({ value: 'a'.repeat(2048), error: 'value of 2049 bytes exceeded 2048 bytes' });
      expect(rows.e2048).toMatchObject({ value: '', error: 'a'.repeat(2048) });
      expect(rows.e2049).toMatchObject({ value: '', error: 'error of 2049 bytes exceeded 2048 bytes' });
      // Both too long: the error's message wins, as it is assigned last.
      expect(rows.both).toMatchObject({ value: 'b'.repeat(2048), error: 'error of 2100 bytes exceeded 2048 bytes' });
      expect(await h.metric('metabatch_metadata_flushed_total')).toBe(5);
    });

    it('never cuts a value inside a UTF-8 character', async () => {
      const h = await appHarness();
      const { id, token } = await h.agent(['utf8']);
      // 'é' is 2 bytes, '€' 3: 1 + 682 * 3 = 2047 bytes, then 'é' would end at 2049.
      const value = 'x' + '€'.repeat(682) + 'é' + 'tail';
      expect((await h.post(id, token, { metadata: [{ key: 'utf8', value }] })).statusCode).toBe(202);
      await h.advance(5000);
      const row = (await h.stored(id)).utf8!;
      expect(row.value).toBe('x' + '€'.repeat(682));
      expect(Buffer.byteLength(row.value)).toBe(2047);
      expect(row.error).toBe(`value of ${Buffer.byteLength(value)} bytes exceeded 2048 bytes`);
    });

    it('KeysTooLong: accepts exactly 6144 key bytes, refuses 6145 with the original’s message and applies nothing', async () => {
      const h = await appHarness();
      // The original's keys ("key 1", "key 2", "key 3 " + 6128 × a) are refused
      // sooner here: a key is at most 127 characters (the column's limit).
      const { id, token } = await h.agent(['key 1', 'key 2', 'a']);
      const original = await h.post(id, token, {
        metadata: [{ key: 'key 1' }, { key: 'key 2' }, { key: 'key 3 ' + 'a'.repeat(6128) }, { key: 'a' }],
      });
      expect(original.statusCode).toBe(400);
      expect(original.json().error).toMatch(/key must NOT have more than 127 characters/);
      // 48 keys of 128 bytes (2 + 63 two-byte characters) make exactly 6144 bytes.
      const keys = Array.from({ length: 48 }, (_, i) => `${String(i).padStart(2, '0')}${'é'.repeat(63)}`);
      const agent = await h.agent([...keys, 'a']);
      const at6144 = await h.post(agent.id, agent.token, { metadata: keys.map((key) => ({ key, value: 'v' })) });
      expect(at6144.statusCode).toBe(202);
      expect(at6144.json()).toEqual({ accepted: 48, dropped: 0 });
      const over = await h.post(agent.id, agent.token, {
        metadata: [...keys, 'a'].map((key) => ({ key, value: 'w' })),
      });
      expect(over.statusCode).toBe(400);
      expect(over.json()).toEqual({ error: 'metadata keys of 6145 bytes exceeded 6144 bytes' });
      await h.advance(5000);
      const rows = Object.values(await h.stored(agent.id));
      expect(rows.filter((r) => r.value === 'w')).toHaveLength(0);
      expect(rows.filter((r) => r.value === 'v')).toHaveLength(48);
      expect(await h.metric('metabatch_metadata_flushed_total')).toBe(48);
    });

    it('TrimWhitespace: trims spaces, tabs and newlines at the ends of value and error, keeps inner ones', async () => {
      const h = await appHarness();
      const { id, token } = await h.agent(['cpu']);
      await h.post(id, token, { metadata: [{ key: 'cpu', value: ' \t 12 %\n\n', error: '\n oops  here \t' }] });
      await h.advance(5000);
      expect((await h.stored(id)).cpu).toMatchObject({ value: '12 %', error: 'oops  here' });
    });

    it('ignores and counts keys the agent never declared', async () => {
      const h = await appHarness();
      const { id, token } = await h.agent(['cpu']);
      const res = await h.post(id, token, {
        metadata: [
          { key: 'cpu', value: '1' },
          { key: 'undeclared', value: '2' },
        ],
      });
      expect(res.json()).toEqual({ accepted: 2, dropped: 0 });
      await h.advance(5000);
      expect(Object.keys(await h.stored(id))).toEqual(['cpu']);
      expect(await h.metric('metabatch_metadata_undeclared_keys_total')).toBe(1);
    });
  });
});

describe('admin API', () => {
  it('answers 403 on every admin route when ADMIN_TOKEN is unset', async () => {
    const h = await appHarness({ env: { ADMIN_TOKEN: null } });
    for (const [method, url] of [
      ['POST', '/v1/agents'],
      ['PUT', '/v1/agents/123e4567-e89b-12d3-a456-426614174000/metadata-definitions'],
    ] as const) {
      const res = await h.app.inject({ method, url, headers: { authorization: 'Bearer anything' }, payload: {} });
      expect(res.statusCode).toBe(403);
      expect(res.json()).toEqual({ error: 'admin API disabled: set ADMIN_TOKEN' });
    }
  });

  it('creates an agent with a token shown once and stored only as a hash', async () => {
    const h = await appHarness();
    const res = await h.app.inject({
      method: 'POST',
      url: '/v1/agents',
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      payload: { name: 'web-1' },
    });
    expect(res.statusCode).toBe(201);
    const agent = res.json<{ id: string; name: string; token: string }>();
    expect(Object.keys(agent).sort()).toEqual(['id', 'name', 'token']);
    expect(agent.name).toBe('web-1');
    const { rows } = await db.pool.query(`SELECT * FROM workspace_agents WHERE id = $1`, [agent.id]);
    expect(JSON.stringify(rows)).not.toContain(agent.token);
    expect(rows[0].token_hash).toHaveLength(32);
  });

  it('answers 401 for a missing or wrong admin token and 400 for a bad body', async () => {
    const h = await appHarness();
    expect((await h.app.inject({ method: 'POST', url: '/v1/agents', payload: { name: 'x' } })).statusCode).toBe(401);
    const wrong = await h.app.inject({
      method: 'POST',
      url: '/v1/agents',
      headers: { authorization: 'Bearer nope' },
      payload: { name: 'x' },
    });
    expect(wrong.statusCode).toBe(401);
    expect(wrong.json()).toEqual({ error: 'invalid admin token' });
    const bad = await h.app.inject({
      method: 'POST',
      url: '/v1/agents',
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      payload: { name: '' },
    });
    expect(bad.statusCode).toBe(400);
    expect(bad.json().error).toMatch(/name must NOT have fewer than 1 characters/);
  });

  it('declares keys: new ones get rows, kept ones keep their values, dropped ones go', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu', 'mem']);
    await h.post(id, token, {
      metadata: [
        { key: 'cpu', value: '12%' },
        { key: 'mem', value: '1G' },
      ],
    });
    await h.advance(5000);
    const res = await h.app.inject({
      method: 'PUT',
      url: `/v1/agents/${id}/metadata-definitions`,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      payload: {
        definitions: [{ key: 'cpu', display_name: 'CPU', interval: 10, timeout: 5, display_order: 1 }, { key: 'disk' }],
      },
    });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual({
      definitions: [
        { key: 'disk', display_name: 'disk', script: '', interval: 0, timeout: 0, display_order: 0 },
        { key: 'cpu', display_name: 'CPU', script: '', interval: 10, timeout: 5, display_order: 1 },
      ],
    });
    const rows = await h.stored(id);
    expect(Object.keys(rows)).toEqual(['disk', 'cpu']);
    expect(rows.cpu!.value).toBe('12%');
  });

  it('refuses a property it does not know (a misspelt interval must not pass for the default) and changes nothing', async () => {
    const h = await appHarness();
    const { id } = await h.agent(['cpu']);
    const misspelt = await h.app.inject({
      method: 'PUT',
      url: `/v1/agents/${id}/metadata-definitions`,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      payload: { definitions: [{ key: 'cpu', intervall: 10 }] },
    });
    expect(misspelt.statusCode).toBe(400);
    expect(misspelt.json().error).toMatch(/must NOT have additional properties/);
    const created = await h.app.inject({
      method: 'POST',
      url: '/v1/agents',
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      payload: { name: 'x', token: 'mine' },
    });
    expect(created.statusCode).toBe(400);
    const { rows } = await db.pool.query(
      `SELECT key, interval FROM workspace_agent_metadata WHERE workspace_agent_id = $1`,
      [id],
    );
    expect(rows).toEqual([{ key: 'cpu', interval: '0' }]);
  });

  it('answers 404 for an unknown agent and 400 for a key declared twice', async () => {
    const h = await appHarness();
    const headers = { authorization: `Bearer ${ADMIN_TOKEN}` };
    const unknown = await h.app.inject({
      method: 'PUT',
      url: '/v1/agents/123e4567-e89b-12d3-a456-426614174000/metadata-definitions',
      headers,
      payload: { definitions: [{ key: 'cpu' }] },
    });
    expect(unknown.statusCode).toBe(404);
    expect(unknown.json().error).toMatch(/not found/);
    const { id } = await h.agent([]);
    const twice = await h.app.inject({
      method: 'PUT',
      url: `/v1/agents/${id}/metadata-definitions`,
      headers,
      payload: { definitions: [{ key: 'cpu' }, { key: 'cpu' }] },
    });
    expect(twice.statusCode).toBe(400);
    expect(twice.json()).toEqual({ error: 'key "cpu" is declared twice' });
  });
});

describe('GET /v1/agents/{id}/metadata', () => {
  it('lists rows by display_order then key, with age in seconds, for the admin or the agent itself', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent([]);
    await h.app.inject({
      method: 'PUT',
      url: `/v1/agents/${id}/metadata-definitions`,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      payload: {
        definitions: [
          { key: 'b', display_order: 1 },
          { key: 'z', display_order: 0 },
          { key: 'a', display_order: 1 },
        ],
      },
    });
    const collected = new Date(h.clock.now - 10_000).toISOString();
    await h.post(id, token, { metadata: [{ key: 'a', value: '1', collected_at: collected }] });
    await h.advance(5000);
    for (const auth of [ADMIN_TOKEN, token]) {
      const res = await h.app.inject({
        url: `/v1/agents/${id}/metadata`,
        headers: { authorization: `Bearer ${auth}` },
      });
      expect(res.statusCode).toBe(200);
      const rows = res.json<{ key: string; age: number; value: string }[]>();
      expect(rows.map((r) => r.key)).toEqual(['z', 'a', 'b']);
      expect(rows[1]!.value).toBe('1');
      // Collected 10 s before the POST, read 5 s after it.
      expect(rows[1]!.age).toBe(15);
    }
  });

  it('answers 404 for an unknown agent, 403 for another agent’s token, 401 without a token', async () => {
    const h = await appHarness();
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const unknown = await h.app.inject({
      url: '/v1/agents/123e4567-e89b-12d3-a456-426614174000/metadata',
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    expect(unknown.statusCode).toBe(404);
    expect(
      (await h.app.inject({ url: `/v1/agents/${a.id}/metadata`, headers: { authorization: `Bearer ${b.token}` } }))
        .statusCode,
    ).toBe(403);
    expect((await h.app.inject({ url: `/v1/agents/${a.id}/metadata` })).statusCode).toBe(401);
  });
});

describe('health and metrics', () => {
  it('answers /healthz, /readyz (503 while shutting down or while flushes fail) and /metrics', async () => {
    const h = await appHarness();
    expect((await h.app.inject({ url: '/healthz' })).json()).toEqual({ status: 'ok' });
    expect((await h.app.inject({ url: '/readyz' })).statusCode).toBe(200);
    const metrics = await h.app.inject({ url: '/metrics' });
    expect(metrics.headers['content-type']).toMatch(/text\/plain/);
    for (const name of [
      'metabatch_metadata_batch_utilization',
      'metabatch_metadata_batch_size',
      'metabatch_metadata_flush_duration_seconds',
      'metabatch_metadata_batches_total',
      'metabatch_metadata_dropped_keys_total',
      'metabatch_metadata_flushed_total',
      'metabatch_metadata_publish_errors_total',
      'metabatch_metadata_flush_errors_total',
      'metabatch_metadata_undeclared_keys_total',
      'metabatch_metadata_channel_depth',
    ]) {
      expect(metrics.body).toContain(`# TYPE ${name}`);
    }
    expect(metrics.body).toContain('metabatch_metadata_channel_capacity 2500');

    // Writes fail while the database answers: not ready, the database up.
    const { id, token } = await h.agent(['cpu']);
    const restore = await failUpdates(db);
    await h.post(id, token, { metadata: [{ key: 'cpu', value: '1' }] });
    await h.advance(5000);
    const degraded = await h.app.inject({ url: '/readyz' });
    expect(degraded.statusCode).toBe(503);
    expect(degraded.json().error).toMatch(/database writes are failing/);
    expect(await h.metric('metabatch_metadata_flushes_failing')).toBe(1);
    expect(await h.metric('metabatch_database_up')).toBe(1);
    await restore();
    await h.advance(100);
    expect((await h.app.inject({ url: '/readyz' })).statusCode).toBe(200);
    expect(await h.metric('metabatch_metadata_flushes_failing')).toBe(0);
    expect((await h.stored(id)).cpu!.value).toBe('1');
  });

  it('says the database is down while nothing flushes, in /readyz and metabatch_database_up alike', async () => {
    const h = await appHarness();
    expect(await h.metric('metabatch_database_up')).toBe(1);
    const restore = await outage(db);
    try {
      // Nothing has succeeded for a health-check interval: the service asks.
      h.clock.tick(5000);
      await vi.waitFor(async () => expect(await h.metric('metabatch_database_up')).toBe(0));
      const ready = await h.app.inject({ url: '/readyz' });
      expect(ready.statusCode).toBe(503);
      expect(ready.json().error).toBe('database unreachable');
      expect(await h.metric('metabatch_database_up')).toBe(0);
    } finally {
      await restore();
    }
    expect((await h.app.inject({ url: '/readyz' })).statusCode).toBe(200);
    expect(await h.metric('metabatch_database_up')).toBe(1);
  });

  it('answers 503 when a token cannot be checked because the database is down, and applies nothing', async () => {
    const h = await appHarness();
    // An agent the service has never seen: its token is not cached.
    const [agent] = await provisionAgents(db.pool, 1, ['cpu'], 'uncached');
    const restore = await outage(db);
    try {
      const res = await h.post(agent!.id, agent!.token, { metadata: [{ key: 'cpu', value: 'lost?' }] });
      expect(res.statusCode).toBe(503);
      expect(res.json()).toEqual({ error: 'database unavailable: could not check the token, retry later' });
      expect(h.service.batcher.channelLength + h.service.batcher.currentBatchLen).toBe(0);
    } finally {
      await restore();
    }
    expect((await h.post(agent!.id, agent!.token, { metadata: [{ key: 'cpu', value: 'ok' }] })).statusCode).toBe(202);
  });

  it('during shutdown, finishes a POST in flight (its key reaches the table) and answers 503 to the next', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const port = Number(new URL(h.base).port);
    const request = (body: string) =>
      `POST /v1/agents/${id}/metadata HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
    const first = request(JSON.stringify({ metadata: [{ key: 'cpu', value: 'in flight' }] }));
    const second = request(JSON.stringify({ metadata: [{ key: 'cpu', value: 'too late' }] }));
    const socket = net.connect(port, '127.0.0.1');
    let answers = '';
    socket.on('data', (chunk: Buffer) => (answers += chunk.toString()));
    const ended = new Promise((resolve) => socket.once('close', resolve));
    await new Promise((resolve) => socket.once('connect', resolve));
    // The first request, all but its last byte: it is in flight once the server has its headers.
    const received = new Promise((resolve) => h.app.server.once('request', resolve));
    socket.write(first.slice(0, -1));
    await received;
    const stopping = h.service.stop();
    // New connections are refused once the server has stopped listening.
    await vi.waitFor(
      () =>
        new Promise<void>((resolve, reject) => {
          const probe = net.connect(port, '127.0.0.1');
          probe.once('connect', () => (probe.destroy(), reject(new Error('still listening'))));
          probe.once('error', () => resolve());
        }),
    );
    // The rest of the first, and a second request behind it on the same connection.
    socket.write(first.slice(-1) + second);
    await ended;
    const statuses = [...answers.matchAll(/HTTP\/1\.1 (\d+)/g)].map((m) => Number(m[1]));
    expect(statuses).toEqual([202, 503]);
    expect(answers).toContain('{"error":"shutting down: retry against another replica or later"}');
    expect(await stopping).toEqual({ flushed: true });
    const { rows } = await db.pool.query(`SELECT value FROM workspace_agent_metadata WHERE workspace_agent_id = $1`, [
      id,
    ]);
    expect(rows).toEqual([{ value: 'in flight' }]);
  });

  it('counts a flush as the flush loop’s background process, and as no other’s', async () => {
    const h = await appHarness();
    const keys = Array.from({ length: 20 }, (_, i) => `k${i}`);
    const agents = await Promise.all(Array.from({ length: 25 }, () => h.agent(keys)));
    const names = ['metadata_flush', 'watch_tick', 'listener_resync', 'spill_replay', 'migrate'];
    const read = async () => {
      const costs: Record<string, { starts: number; db: number; wait: number; cpu: number }> = {};
      for (const name of names) {
        costs[name] = {
          starts: await h.metric('metabatch_background_process_start_count', { name }),
          db: await h.metric('metabatch_background_process_db_duration_seconds', { name }),
          wait: await h.metric('metabatch_background_process_db_wait_seconds', { name }),
          cpu: await h.metric('metabatch_background_process_cpu_seconds_total', { name }),
        };
      }
      return costs;
    };
    // Start-up migrated and looked for spill files, once each.
    const before = await read();
    expect([before.migrate!.starts, before.spill_replay!.starts]).toEqual([1, 1]);
    for (const agent of agents) {
      const metadata = keys.map((key) => ({ key, value: 'x'.repeat(100) }));
      expect((await h.post(agent.id, agent.token, { metadata })).statusCode).toBe(202);
    }
    await h.advance(5000);
    const after = await read();
    // 500 entries: one capacity flush, with its query, its wait for a connection, its merge and arrays.
    expect(after.metadata_flush!.starts).toBe(before.metadata_flush!.starts + 1);
    expect(after.metadata_flush!.db).toBeGreaterThan(before.metadata_flush!.db);
    expect(after.metadata_flush!.wait).toBeGreaterThan(before.metadata_flush!.wait);
    expect(after.metadata_flush!.cpu).toBeGreaterThan(before.metadata_flush!.cpu);
    expect(await h.metric('metabatch_background_process_duration_seconds_count', { name: 'metadata_flush' })).toBe(
      after.metadata_flush!.starts,
    );
    // The watch hub ticked on its own schedule, with nothing to read; the others did not run.
    expect(after.watch_tick!.starts).toBeGreaterThan(before.watch_tick!.starts);
    for (const name of names.filter((n) => n !== 'metadata_flush')) {
      expect({ name, db: after[name]!.db, wait: after[name]!.wait }).toEqual({
        name,
        db: before[name]!.db,
        wait: before[name]!.wait,
      });
    }
    for (const name of ['listener_resync', 'spill_replay', 'migrate']) expect(after[name]).toEqual(before[name]);
    expect(await h.metric('metabatch_background_process_in_flight_count', { name: 'metadata_flush' })).toBe(0);
  });

  it('answers unknown routes with 404 and a JSON error', async () => {
    const h = await appHarness();
    const res = await h.app.inject({ url: '/nope' });
    expect(res.statusCode).toBe(404);
    expect(res.json()).toEqual({ error: 'no route for GET /nope' });
  });
});
