// The fleet at a glance, over real HTTP on the service as production wires
// it: the bulk read, the many-agent watch (GET and POST, all=true), the
// agent lifecycle routes, and their answers and limits.

import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { provisionAgents } from '../src/provision.js';
import { createTestDatabase, type TestDatabase } from './support/db.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';
import { openSse, type SseStream } from './support/sse.js';

let db: TestDatabase;
let h: ServiceHarness;

beforeAll(async () => {
  db = await createTestDatabase();
  h = await startTestService(db, { env: { FLUSH_INTERVAL_MS: '200' } });
});
afterAll(async () => {
  await h.close();
  await db.drop();
});

const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const missingId = '123e4567-e89b-12d3-a456-426614174000';

interface Item {
  key: string;
  value: string;
  age: number;
  stale: boolean;
  pending?: true;
  script?: string;
}
interface AgentEvent {
  agent_id: string;
  metadata?: Item[];
}

/** A many-agent watch stream as the admin, read in the background (test/support/sse.ts). */
async function open(path: string, body?: unknown): Promise<SseStream<AgentEvent>> {
  const stream = await openSse<AgentEvent>(
    `${h.base}${path}`,
    ADMIN_TOKEN,
    body === undefined ? {} : { method: 'POST', body },
  );
  opened.push(stream);
  return stream;
}
const opened: { close(): void }[] = [];
afterEach(() => opened.splice(0).forEach((s) => s.close()));

const post = (path: string, body: unknown, headers: Record<string, string> = admin) =>
  fetch(`${h.base}${path}`, {
    method: 'POST',
    headers: { ...headers, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });

async function report(id: string, token: string, values: Record<string, string>): Promise<void> {
  const metadata = Object.entries(values).map(([key, value]) => ({
    key,
    value,
    collected_at: new Date(h.clock.now).toISOString(),
  }));
  expect((await h.post(id, token, { metadata })).statusCode).toBe(202);
}

/** Flushes what was posted and waits until the service's own LISTEN has heard of it. */
async function flushAndHear(): Promise<void> {
  const heard = await h.metric('metabatch_listener_batches_total');
  await h.advance(200);
  await vi.waitFor(async () => expect(await h.metric('metabatch_listener_batches_total')).toBeGreaterThan(heard));
}

type Agent = { id: string; token: string };

/**
 * Agents declaring `cpu`, once the service's own LISTEN has heard their
 * declarations (each NOTIFYs the batch channel): heard after a stream opened,
 * one would count as changed and be sent again.
 */
async function heardAgents(count: number): Promise<Agent[]> {
  const heard = await h.metric('metabatch_listener_batches_total');
  const agents = [];
  for (let i = 0; i < count; i++) agents.push(await h.agent(['cpu']));
  await vi.waitFor(async () =>
    expect(await h.metric('metabatch_listener_batches_total')).toBeGreaterThanOrEqual(heard + count),
  );
  return agents;
}

describe('GET /v1/agents/metadata (bulk read)', () => {
  it('reads many agents in one query, in the order asked, with the missing ones named; script only when asked', async () => {
    const a = await h.agent(['cpu', 'mem']);
    const b = await h.agent(['cpu']);
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET script = 'uptime', interval = 10 WHERE workspace_agent_id = $1`,
      [b.id],
    );
    await report(a.id, a.token, { cpu: '1%', mem: '2G' });
    await h.advance(200);
    const statements = await h.statements();
    const res = await h.app.inject({
      url: `/v1/agents/metadata?agent_id=${b.id}&agent_id=${missingId}&agent_id=${a.id.toUpperCase()}`,
      headers: admin,
    });
    expect(res.statusCode).toBe(200);
    expect(await h.statements()).toBe(statements + 1);
    const body = res.json<{ agents: AgentEvent[]; missing: string[] }>();
    expect(body.missing).toEqual([missingId]);
    expect(body.agents.map((agent) => agent.agent_id)).toEqual([b.id, a.id]);
    expect(body.agents[1]!.metadata!.map((item) => [item.key, item.value, item.stale])).toEqual([
      ['cpu', '1%', false],
      ['mem', '2G', false],
    ]);
    expect(body.agents[0]!.metadata![0]).toMatchObject({ key: 'cpu', pending: true, stale: false });
    expect(body.agents[0]!.metadata![0]).not.toHaveProperty('script');

    const withScript = await h.app.inject({
      url: `/v1/agents/metadata?agent_id=${b.id}&agent_id=${a.id}&key=cpu&include_script=true`,
      headers: admin,
    });
    const agents = withScript.json<{ agents: AgentEvent[] }>().agents;
    expect(agents.map((agent) => agent.metadata!.map((item) => [item.key, item.script]))).toEqual([
      [['cpu', 'uptime']],
      [['cpu', '']],
    ]);
  });

  it('costs one query for 200 agents too, and refuses 201', async () => {
    const ids = (await provisionAgents(db.pool, 200, ['cpu'], 'bulk')).map((agent) => agent.id);
    const statements = await h.statements();
    const res = await h.app.inject({
      url: `/v1/agents/metadata?${ids.map((id) => `agent_id=${id}`).join('&')}`,
      headers: admin,
    });
    expect(res.statusCode).toBe(200);
    expect(res.json<{ agents: unknown[] }>().agents).toHaveLength(200);
    expect(await h.statements()).toBe(statements + 1);
    const over = await h.app.inject({
      url: `/v1/agents/metadata?${[...ids, missingId].map((id) => `agent_id=${id}`).join('&')}`,
      headers: admin,
    });
    expect(over.statusCode).toBe(400);
    expect(over.json().error).toMatch(/must NOT have more than 200 items/);
  });

  it.each([
    ['no agent', '', /must have required property 'agent_id'/],
    ['an id that is not a UUID', '?agent_id=123', /must match format "uuid"/],
    ['include_script that is not true or false', `?agent_id=${missingId}&include_script=yes`, /include_script/],
  ])('answers 400 with a message for %s', async (_case, query, message) => {
    const res = await h.app.inject({ url: `/v1/agents/metadata${query}`, headers: admin });
    expect(res.statusCode).toBe(400);
    expect(res.json().error).toMatch(message);
  });

  it('lets an agent token read its own agent only', async () => {
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const own = await h.app.inject({
      url: `/v1/agents/metadata?agent_id=${a.id}`,
      headers: { authorization: `Bearer ${a.token}` },
    });
    expect(own.statusCode).toBe(200);
    const other = await h.app.inject({
      url: `/v1/agents/metadata?agent_id=${a.id}&agent_id=${b.id}`,
      headers: { authorization: `Bearer ${a.token}` },
    });
    expect(other.statusCode).toBe(403);
    expect(other.json()).toEqual({ error: 'an agent token reads only its own agent' });
    expect((await h.app.inject({ url: `/v1/agents/metadata?agent_id=${a.id}` })).statusCode).toBe(401);
  });
});

describe('the many-agent watch', () => {
  it('sends each agent at once, then what batches change; by GET or by POST', async () => {
    const [a, b] = (await heardAgents(2)) as [Agent, Agent];
    const byGet = await open(`/v1/agents/metadata/watch?agent_id=${a.id}&agent_id=${b.id}`);
    const byPost = await open('/v1/agents/metadata/watch', { agent_ids: [a.id, b.id] });
    for (const stream of [byGet, byPost]) {
      expect(stream.headers.get('content-type')).toBe('text/event-stream');
      await vi.waitFor(() => expect(stream.events.map((e) => e.data.agent_id).sort()).toEqual([a.id, b.id].sort()));
    }
    await report(b.id, b.token, { cpu: '42%' });
    await flushAndHear();
    await h.advance(1000);
    for (const stream of [byGet, byPost]) {
      await vi.waitFor(() =>
        expect(stream.events.at(-1)).toEqual({
          type: 'data',
          data: { agent_id: b.id, metadata: [expect.objectContaining({ key: 'cpu', value: '42%' })] },
        }),
      );
      // The unchanged agent was not sent again yet (its 5 s resend is not due).
      expect(stream.events.filter((e) => e.data.agent_id === a.id)).toHaveLength(1);
    }
  });

  it('with all=true, sends every agent, then agents created later, and says when one is deleted', async () => {
    const existing = await h.agent(['cpu']);
    const stream = await open('/v1/agents/metadata/watch?all=true');
    await vi.waitFor(() => expect(stream.events.map((e) => e.data.agent_id)).toContain(existing.id));
    const known = new Set(stream.events.map((e) => e.data.agent_id));
    const { rows } = await db.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM workspace_agents');
    expect(known.size).toBe(rows[0]!.n);

    const createdBefore = await h.metric('metabatch_control_messages_total', { type: 'created' });
    const created = await h.agent(['cpu']);
    // The service hears of the new agent on its control channel, then sends it on the next tick.
    await vi.waitFor(async () =>
      expect(await h.metric('metabatch_control_messages_total', { type: 'created' })).toBe(createdBefore + 1),
    );
    await h.advance(1000);
    await vi.waitFor(() => expect(stream.events.map((e) => e.data.agent_id)).toContain(created.id));

    expect((await fetch(`${h.base}/v1/agents/${existing.id}`, { method: 'DELETE', headers: admin })).status).toBe(204);
    await vi.waitFor(() => expect(stream.events.at(-1)).toEqual({ type: 'deleted', data: { agent_id: existing.id } }));
  });

  it('sends each changed agent within a second under a continuous stream of batches', async () => {
    const [a] = (await heardAgents(1)) as [Agent];
    const stream = await open(`/v1/agents/metadata/watch?agent_id=${a.id}`);
    await vi.waitFor(() => expect(stream.events).toHaveLength(1));
    // A new value and a flush every 200 ms, for 4 s: the agent is never quiet.
    for (let step = 1; step <= 20; step++) {
      await report(a.id, a.token, { cpu: `v${step}` });
      await flushAndHear();
    }
    // Sent on the 1 s tick all along (a debounce waiting for quiet would have
    // sent nothing yet): at least one event a second, each newer than the last.
    await vi.waitFor(() => expect(stream.events.length).toBeGreaterThanOrEqual(1 + 3));
    const values = stream.events.slice(1).map((e) => Number(e.data.metadata![0]!.value.slice(1)));
    expect(values).toEqual([...values].sort((x, y) => x - y));
    expect(new Set(values).size).toBe(values.length);
    // And within a second of the last change, the last value.
    await h.advance(1000);
    await vi.waitFor(() => expect(stream.events.at(-1)!.data.metadata![0]!.value).toBe('v20'));
  });

  it('re-reads every agent of the stream after the LISTEN connection is killed, and sends what changed meanwhile', async () => {
    const [a, b] = (await heardAgents(2)) as [Agent, Agent];
    const stream = await open(`/v1/agents/metadata/watch?agent_id=${a.id}&agent_id=${b.id}`);
    await vi.waitFor(() => expect(stream.events).toHaveLength(2));
    // Changes no NOTIFY announces, as if missed while disconnected.
    await db.pool.query(
      `UPDATE workspace_agent_metadata SET value = 'missed', collected_at = now() WHERE workspace_agent_id = ANY($1::uuid[])`,
      [[a.id, b.id]],
    );
    const reconnects = await h.metric('metabatch_listener_reconnects_total');
    await db.pool.query(
      `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'metabatch-listener' AND datname = current_database()`,
    );
    await vi.waitFor(async () => expect(await h.metric('metabatch_listener_reconnects_total')).toBe(reconnects + 1), {
      timeout: 10_000,
    });
    await h.advance(1000);
    await vi.waitFor(() =>
      expect(
        stream.events
          .slice(2)
          .filter((e) => e.data.metadata?.[0]?.value === 'missed')
          .map((e) => e.data.agent_id)
          .sort(),
      ).toEqual([a.id, b.id].sort()),
    );
  });

  it('holds at most one event per agent for a client that stops reading, dropping and counting the rest', async () => {
    const keys = Array.from({ length: 20 }, (_, i) => `k${i}`);
    const agents = await Promise.all(Array.from({ length: 10 }, () => h.agent(keys)));
    for (const agent of agents) {
      const metadata = keys.map((key) => ({ key, value: 'x'.repeat(2000) }));
      expect((await h.post(agent.id, agent.token, { metadata })).statusCode).toBe(202);
    }
    await h.advance(200);
    // A raw socket that sends the request and never reads.
    const socket = net.connect(Number(new URL(h.base).port), '127.0.0.1');
    await new Promise((resolve) => socket.once('connect', resolve));
    socket.pause();
    const body = JSON.stringify({ agent_ids: agents.map((a) => a.id) });
    socket.write(
      `POST /v1/agents/metadata/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${ADMIN_TOKEN}\r\n` +
        `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    );
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(1));
    const dropped = await h.metric('metabatch_watch_events_dropped_total');
    const sent = await h.metric('metabatch_watch_events_sent_total');
    // 100 rounds of every agent (~40 kB each): ~40 MB if they were all buffered.
    for (let round = 0; round < 100; round++) {
      h.service.watchHub.onBatch(agents.map((a) => a.id));
      await h.service.watchHub.tick();
    }
    await vi.waitFor(async () =>
      expect(await h.metric('metabatch_watch_events_dropped_total')).toBeGreaterThan(dropped + 900),
    );
    // What was written went into the socket's buffers before it filled; the rest waits as one event per agent.
    expect((await h.metric('metabatch_watch_events_sent_total')) - sent).toBeLessThan(100);
    socket.destroy();
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(0));
  });

  it('serves 1,000 streams with one LISTEN connection', async () => {
    const [a] = (await heardAgents(1)) as [Agent];
    const streams = await Promise.all(
      Array.from({ length: 1000 }, () => open(`/v1/agents/metadata/watch?agent_id=${a.id}`)),
    );
    await vi.waitFor(() => expect(streams.every((s) => s.events.length === 1)).toBe(true), { timeout: 15_000 });
    expect(await h.metric('metabatch_watchers')).toBe(1000);
    const { rows } = await db.pool.query(
      `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'metabatch-listener'`,
    );
    expect(rows[0].n).toBe(1);
    await report(a.id, a.token, { cpu: 'all of them' });
    await flushAndHear();
    await h.advance(1000);
    await vi.waitFor(
      () => expect(streams.every((s) => s.events.at(-1)?.data.metadata?.[0]?.value === 'all of them')).toBe(true),
      {
        timeout: 15_000,
      },
    );
    streams.forEach((s) => s.close());
    await vi.waitFor(async () => expect(await h.metric('metabatch_watchers')).toBe(0), { timeout: 15_000 });
  }, 60_000);

  it.each([
    ['neither agents nor all', 'GET', '/v1/agents/metadata/watch', undefined, 400, /name the agents to watch/],
    ['both', 'GET', `/v1/agents/metadata/watch?all=true&agent_id=${missingId}`, undefined, 400, /not both/],
    ['an id that is not a UUID', 'GET', '/v1/agents/metadata/watch?agent_id=x', undefined, 400, /format "uuid"/],
    [
      '1,001 agents',
      'POST',
      '/v1/agents/metadata/watch',
      { agent_ids: Array.from({ length: 1001 }, () => missingId) },
      400,
      /must NOT have more than 1000 items/,
    ],
    ['an empty list', 'POST', '/v1/agents/metadata/watch', { agent_ids: [] }, 400, /must NOT have fewer than 1 items/],
    [
      'all=true with an agent token',
      'GET',
      '/v1/agents/metadata/watch?all=true',
      undefined,
      403,
      /all=true needs the admin token/,
    ],
  ])('answers %s with %i', async (_case, method, path, body, status, message) => {
    const agent = await h.agent(['cpu']);
    const headers = status === 403 ? { authorization: `Bearer ${agent.token}` } : admin;
    const res = await fetch(`${h.base}${path}`, {
      method,
      headers: { ...headers, ...(body ? { 'content-type': 'application/json' } : {}) },
      ...(body ? { body: JSON.stringify(body) } : {}),
    });
    expect(res.status).toBe(status);
    expect(((await res.json()) as { error: string }).error).toMatch(message);
  });

  it('refuses a body property it does not know', async () => {
    const res = await post('/v1/agents/metadata/watch', { agent_ids: [missingId], al: true });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: string }).error).toMatch(/must NOT have additional properties/);
  });

  it('takes 1,000 agents by POST, where the query string would be over the header limit (431)', async () => {
    const ids = (await provisionAgents(db.pool, 1000, ['cpu'], 'many')).map((agent) => agent.id);
    const tooLong = await fetch(`${h.base}/v1/agents/metadata/watch?${ids.map((id) => `agent_id=${id}`).join('&')}`, {
      headers: admin,
    });
    expect(tooLong.status).toBe(431);
    const stream = await open('/v1/agents/metadata/watch', { agent_ids: ids });
    expect(stream.status).toBe(200);
    await vi.waitFor(() => expect(new Set(stream.events.map((e) => e.data.agent_id)).size).toBe(1000));
  });
});

describe('agent lifecycle', () => {
  it('lists agents page by page by (created_at, id), with a name filter; shows one', async () => {
    const prefix = `page-${Date.now()}`;
    const created: { id: string }[] = [];
    for (let i = 0; i < 5; i++) {
      const res = await post('/v1/agents', { name: `${prefix}-${i}` });
      created.push((await res.json()) as { id: string });
    }
    await db.pool.query(
      `INSERT INTO workspace_agent_metadata (workspace_agent_id, key, display_name, script, interval, timeout, collected_at)
      VALUES ($1, 'cpu', 'cpu', '', 0, 0, '2026-11-23T00:00:01Z')`,
      [created[2]!.id],
    );
    const seen: { id: string; name: string; declared_keys: number; last_reported_at: string | null }[] = [];
    let cursor: string | undefined;
    let pages = 0;
    do {
      const res = await fetch(`${h.base}/v1/agents?limit=2&name_prefix=${prefix}${cursor ? `&cursor=${cursor}` : ''}`, {
        headers: admin,
      });
      expect(res.status).toBe(200);
      const page = (await res.json()) as { agents: typeof seen; next_cursor?: string };
      seen.push(...page.agents);
      cursor = page.next_cursor;
      pages++;
    } while (cursor);
    expect(pages).toBe(3);
    expect(seen.map((a) => a.id)).toEqual(created.map((a) => a.id));
    expect(seen[2]).toMatchObject({ declared_keys: 1, last_reported_at: '2026-11-23T00:00:01.000Z' });
    expect(seen[0]).toMatchObject({ declared_keys: 0, last_reported_at: null });

    const one = await fetch(`${h.base}/v1/agents/${created[2]!.id}`, { headers: admin });
    expect(await one.json()).toEqual(seen[2]);
    expect((await fetch(`${h.base}/v1/agents/${missingId}`, { headers: admin })).status).toBe(404);
  });

  it.each([
    ['a limit over 500', '?limit=501', /limit must be from 1 to 500 \(got 501\)/],
    ['a limit of 0', '?limit=0', /limit must be from 1 to 500/],
    ['a limit that is not a number', '?limit=ten', /must match pattern/],
    ['a cursor it did not give out', '?cursor=bm9wZQ', /cursor is not one this service gave out/],
  ])('answers 400 to %s', async (_case, query, message) => {
    const res = await fetch(`${h.base}/v1/agents${query}`, { headers: admin });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: string }).error).toMatch(message);
  });

  it('deletes an agent with its metadata and refuses its token at once; rotates a token and refuses the old one', async () => {
    const a = await h.agent(['cpu']);
    await report(a.id, a.token, { cpu: 'before' });
    const rotated = await fetch(`${h.base}/v1/agents/${a.id}/token`, { method: 'POST', headers: admin });
    expect(rotated.status).toBe(200);
    const { token } = (await rotated.json()) as { token: string };
    expect((await h.post(a.id, a.token, { metadata: [{ key: 'cpu', value: 'old token' }] })).statusCode).toBe(401);
    expect((await h.post(a.id, token, { metadata: [{ key: 'cpu', value: 'new token' }] })).statusCode).toBe(202);

    expect((await fetch(`${h.base}/v1/agents/${a.id}`, { method: 'DELETE', headers: admin })).status).toBe(204);
    expect((await h.post(a.id, token, { metadata: [{ key: 'cpu', value: 'gone' }] })).statusCode).toBe(401);
    const { rows } = await db.pool.query(
      `SELECT count(*)::int AS n FROM workspace_agent_metadata WHERE workspace_agent_id = $1`,
      [a.id],
    );
    expect(rows[0].n).toBe(0);
    expect((await fetch(`${h.base}/v1/agents/${a.id}`, { method: 'DELETE', headers: admin })).status).toBe(404);
    expect((await fetch(`${h.base}/v1/agents/${a.id}/token`, { method: 'POST', headers: admin })).status).toBe(404);
  });

  it('is admin only', async () => {
    const a = await h.agent(['cpu']);
    for (const [method, path] of [
      ['GET', '/v1/agents'],
      ['GET', `/v1/agents/${a.id}`],
      ['DELETE', `/v1/agents/${a.id}`],
      ['POST', `/v1/agents/${a.id}/token`],
    ]) {
      expect(
        (await fetch(`${h.base}${path}`, { method, headers: { authorization: `Bearer ${a.token}` } })).status,
      ).toBe(401);
      expect((await fetch(`${h.base}${path}`, { method })).status).toBe(401);
    }
  });
});
