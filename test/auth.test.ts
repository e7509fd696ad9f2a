// Guessing tokens is not free: an agent token carries a checksum, so a
// malformed or random one is refused without a query; each refused credential
// is counted by kind and logged at most once per 10 s per address; past a
// bound per address, further requests get 429 with Retry-After before any
// token lookup, until the bucket refills (on the service's fake clock). The
// service is wired as in production; the lookups are counted by a spy on the
// real AgentStore's one lookup method.

import { randomBytes, randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { crc32 } from 'node:zlib';
import { afterEach, describe, expect, it, vi } from 'vitest';
import WebSocket from 'ws';
import { AgentStore } from '../src/agentStore.js';
import { createLogger } from '../src/logger.js';
import { provisionAgents } from '../src/provision.js';
import { hashToken } from '../src/tokens.js';
import { closedAfterEach, testDatabase } from './support/db.js';
import { ADMIN_TOKEN, startTestService, type ServiceHarness } from './support/service.js';
import { refusedUpgrade } from './support/upgrade.js';

const db = testDatabase();
const appHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

/** Every query the service makes for an agent token goes through this one method. */
const lookups = () => vi.spyOn(AgentStore.prototype, 'agentIdForTokenHash');
afterEach(() => vi.restoreAllMocks());

/** Checked here with zlib's CRC-32, not with the service's own code. */
function hasValidChecksum(token: string): boolean {
  const match = /^mbt_([A-Za-z0-9_-]{48})$/.exec(token);
  if (!match) return false;
  const bytes = Buffer.from(match[1]!, 'base64url');
  return bytes.length === 36 && crc32(bytes.subarray(0, 32)) === bytes.readUInt32BE(32);
}

/** A token of the new shape that no agent has: random bytes with a correct checksum. */
function checksummedToken(): string {
  const bytes = Buffer.alloc(36);
  randomBytes(32).copy(bytes);
  bytes.writeUInt32BE(crc32(bytes.subarray(0, 32)), 32);
  return `mbt_${bytes.toString('base64url')}`;
}

/** The base64url alphabet, to make tokens of a given shape. */
const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
const randomText = (length: number) =>
  Array.from(randomBytes(length), (byte) => ALPHABET[byte % ALPHABET.length]).join('');

const report = { metadata: [{ key: 'cpu', value: '1' }] };

function postFrom(h: ServiceHarness, address: string, agentId: string, token: string | undefined) {
  return h.app.inject({
    method: 'POST',
    url: `/v1/agents/${agentId}/metadata`,
    remoteAddress: address,
    headers: token === undefined ? {} : { authorization: `Bearer ${token}` },
    payload: report,
  });
}

describe('the token’s checksum', () => {
  it('is carried by every new token: created, rotated and provisioned', async () => {
    const h = await appHarness();
    const created = await h.agent(['cpu']);
    expect(hasValidChecksum(created.token)).toBe(true);
    const rotated = await h.app.inject({
      method: 'POST',
      url: `/v1/agents/${created.id}/token`,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    expect(hasValidChecksum(rotated.json<{ token: string }>().token)).toBe(true);
    const [provisioned] = await provisionAgents(db.pool, 1, ['cpu'], 'checksum');
    expect(hasValidChecksum(provisioned!.token)).toBe(true);
    expect((await h.post(provisioned!.id, provisioned!.token, report)).statusCode).toBe(202);
  });

  it('lets the service refuse 400 malformed or random agent tokens without a single query', async () => {
    const h = await appHarness({ env: { AUTH_FAILURE_BURST: '100000' } });
    const { id, token } = await h.agent(['cpu']);
    // One character of a real token changed, in its random part: the checksum no longer matches.
    const flipped = (i: number) => {
      const at = 4 + (i % 40);
      return token.slice(0, at) + (token[at] === 'A' ? 'B' : 'A') + token.slice(at + 1);
    };
    const bad = [
      (i: number) => flipped(i),
      () => `mbt_${randomText(48)}`, // the new length, a random checksum
      () => `mbt_${randomText(12)}`, // too short to be any version's
      () => `mbt_${randomText(60)}`, // too long
      () => `xyz_${randomText(43)}`, // another prefix
      () => `mbt_${randomText(20)}!${randomText(22)}`, // not base64url
      () => token.slice(0, -1), // truncated
      () => 'mbt_not-a-real-token',
    ];
    const spy = lookups();
    for (let i = 0; i < 400; i++) {
      const res = await h.post(id, bad[i % bad.length]!(i), report);
      expect(res.statusCode).toBe(401);
      expect(res.json()).toEqual({ error: 'invalid agent token' });
    }
    expect(spy).toHaveBeenCalledTimes(0);
    // The spy does see a token it cannot judge by its shape: one of the new shape with a correct checksum.
    expect((await h.post(id, checksummedToken(), report)).statusCode).toBe(401);
    expect(spy).toHaveBeenCalledTimes(1);
    // And the real token still works, from the cache.
    expect((await h.post(id, token, report)).statusCode).toBe(202);
    expect(spy).toHaveBeenCalledTimes(1);
  });

  it('leaves tokens of the earlier shapes working: 43 characters (created), 32 (provisioned)', async () => {
    const h = await appHarness();
    const legacy = [`mbt_${randomBytes(32).toString('base64url')}`, `mbt_${randomBytes(24).toString('base64url')}`];
    for (const token of legacy) {
      const id = randomUUID();
      await db.pool.query(`INSERT INTO workspace_agents (id, name, token_hash) VALUES ($1, 'legacy', $2)`, [
        id,
        hashToken(token),
      ]);
      expect((await h.post(id, token, report)).statusCode).toBe(202);
      // A random token of the same shape still costs its one query (README, Security).
      const spy = lookups();
      const guess = `mbt_${randomBytes(token.length === 47 ? 32 : 24).toString('base64url')}`;
      expect((await h.post(id, guess, report)).statusCode).toBe(401);
      expect(spy).toHaveBeenCalledTimes(1);
      spy.mockRestore();
    }
  });
});

describe('failed authentications', () => {
  it('are counted by kind', async () => {
    const h = await appHarness();
    const a = await h.agent(['cpu']);
    const b = await h.agent(['cpu']);
    const admin = (token: string) => h.app.inject({ url: '/v1/agents', headers: { authorization: `Bearer ${token}` } });
    const read = (token: string) =>
      h.app.inject({ url: `/v1/agents/${a.id}/metadata`, headers: { authorization: `Bearer ${token}` } });
    expect((await h.post(a.id, undefined, report)).statusCode).toBe(401); // missing
    expect((await h.post(a.id, 'mbt_short', report)).statusCode).toBe(401); // malformed
    expect((await h.post(a.id, checksummedToken(), report)).statusCode).toBe(401); // unknown_agent_token
    expect((await h.post(a.id, b.token, report)).statusCode).toBe(403); // wrong_agent
    expect((await read(b.token)).statusCode).toBe(403); // wrong_agent
    expect((await admin(`${ADMIN_TOKEN}x`)).statusCode).toBe(401); // bad_admin_token
    expect((await admin(a.token)).statusCode).toBe(401); // bad_admin_token
    expect((await read('not-the-admin-token')).statusCode).toBe(401); // bad_admin_token (no agent prefix)
    expect((await h.post(a.id, a.token, report)).statusCode).toBe(202); // not a failure
    const kinds = { missing: 1, malformed: 1, unknown_agent_token: 1, wrong_agent: 2, bad_admin_token: 3 };
    for (const [kind, count] of Object.entries(kinds)) {
      expect([kind, await h.metric('metabatch_auth_failures_total', { kind })]).toEqual([kind, count]);
    }
  });

  it('are logged at info at most once per 10 s per address, with how many were not, never with the token', async () => {
    const lines: Record<string, unknown>[] = [];
    const raw: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        raw.push(chunk.toString());
        for (const line of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(line));
        done();
      },
    });
    const h = await appHarness({ logger: createLogger('info', sink) });
    const { id } = await h.agent(['cpu']);
    const failed = () => lines.filter((line) => String(line.msg).startsWith('authentication failed'));
    const tokens = Array.from({ length: 6 }, () => checksummedToken());
    for (const token of tokens.slice(0, 5)) await postFrom(h, '203.0.113.7', id, token);
    await postFrom(h, '198.51.100.1', id, undefined);
    expect(failed()).toMatchObject([
      { level: 30, address: '203.0.113.7', kind: 'unknown_agent_token', suppressed: 0 },
      { level: 30, address: '198.51.100.1', kind: 'missing', suppressed: 0 },
    ]);
    h.clock.tick(9_999);
    await postFrom(h, '203.0.113.7', id, 'mbt_short');
    expect(failed()).toHaveLength(2);
    h.clock.tick(1);
    await postFrom(h, '203.0.113.7', id, tokens[5]);
    expect(failed()).toHaveLength(3);
    expect(failed()[2]).toMatchObject({ address: '203.0.113.7', kind: 'unknown_agent_token', suppressed: 5 });
    expect(String(failed()[2]!.msg)).toContain('5 more failures');
    for (const token of tokens) expect(raw.join('')).not.toContain(token);
  });
});

describe('the bound on failures per address', () => {
  it('answers 429 with Retry-After before any lookup, on every authenticated route, until the bucket refills', async () => {
    // Three failures in a row, then one back every 2 s.
    const h = await appHarness({ env: { AUTH_FAILURE_BURST: '3', AUTH_FAILURE_RATE: '0.5' } });
    const { id, token } = await h.agent(['cpu']);
    const attacker = '192.0.2.66';
    for (let i = 0; i < 3; i++) expect((await postFrom(h, attacker, id, checksummedToken())).statusCode).toBe(401);

    const spy = lookups();
    const throttled = await postFrom(h, attacker, id, checksummedToken());
    expect(throttled.statusCode).toBe(429);
    expect(throttled.headers['retry-after']).toBe('2');
    expect(throttled.json().error).toMatch(/^too many failed authentications from this address: retry in 2 s/);
    expect(spy).toHaveBeenCalledTimes(0);
    // Credentials checked without a query still pass: a cached agent token, the admin token.
    expect((await postFrom(h, attacker, id, token)).statusCode).toBe(202);
    const admin = await h.app.inject({
      url: '/v1/agents',
      remoteAddress: attacker,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    expect(admin.statusCode).toBe(200);
    const read = await h.app.inject({
      url: `/v1/agents/${id}/metadata`,
      remoteAddress: attacker,
      headers: { authorization: `Bearer ${token}` },
    });
    expect(read.statusCode).toBe(200);
    // A wrong admin token, and a valid agent token this replica has not cached (it would need a query), do not.
    const wrongAdmin = await h.app.inject({
      url: '/v1/agents',
      remoteAddress: attacker,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}-wrong` },
    });
    expect(wrongAdmin.statusCode).toBe(429);
    const [uncached] = await provisionAgents(db.pool, 1, ['cpu']);
    expect((await postFrom(h, attacker, uncached!.id, uncached!.token)).statusCode).toBe(429);
    expect(spy).toHaveBeenCalledTimes(0);
    expect(await h.metric('metabatch_auth_throttled_total')).toBe(3);
    // Another address is not affected, and successes cost nothing.
    for (let i = 0; i < 10; i++) expect((await postFrom(h, '192.0.2.67', id, token)).statusCode).toBe(202);

    // A second later the bucket holds half a failure: still 429, 1 s to go.
    h.clock.tick(1000);
    const later = await postFrom(h, attacker, uncached!.id, uncached!.token);
    expect([later.statusCode, later.headers['retry-after']]).toEqual([429, '1']);
    h.clock.tick(1000);
    // One failure back: the uncached token is looked up, and cached.
    expect((await postFrom(h, attacker, uncached!.id, uncached!.token)).statusCode).toBe(202);
    expect(spy).toHaveBeenCalledTimes(1);
    expect((await postFrom(h, attacker, id, 'mbt_short')).statusCode).toBe(401);
    expect((await postFrom(h, attacker, id, checksummedToken())).statusCode).toBe(429);
    // A request without a token guesses nothing: it is not charged.
    expect((await postFrom(h, '192.0.2.68', id, undefined)).statusCode).toBe(401);
    expect(await h.metric('metabatch_auth_failures_total', { kind: 'missing' })).toBe(1);
  });

  it('tells clients behind a trusted proxy apart by X-Forwarded-For (TRUST_PROXY)', async () => {
    const h = await appHarness({
      env: { AUTH_FAILURE_BURST: '3', AUTH_FAILURE_RATE: '0.5', TRUST_PROXY: 'uniquelocal' },
    });
    const { id } = await h.agent(['cpu']);
    const [fresh] = await provisionAgents(db.pool, 1, ['cpu']);
    const via = (client: string, agentId: string, token: string) =>
      h.app.inject({
        method: 'POST',
        url: `/v1/agents/${agentId}/metadata`,
        remoteAddress: '10.1.2.3',
        headers: { authorization: `Bearer ${token}`, 'x-forwarded-for': client },
        payload: report,
      });
    for (let i = 0; i < 4; i++) await via('198.51.100.1', id, checksummedToken());
    expect((await via('198.51.100.1', fresh!.id, fresh!.token)).statusCode).toBe(429);
    // Another client behind the same proxy has its own bucket: its token is looked up.
    expect((await via('198.51.100.2', fresh!.id, fresh!.token)).statusCode).toBe(202);
  });

  it('keeps a fleet behind one address reporting while a guesser there is throttled', async () => {
    const h = await appHarness({ env: { AUTH_FAILURE_BURST: '3', AUTH_FAILURE_RATE: '0.5' } });
    const nat = '192.0.2.70';
    const fleet = await Promise.all(Array.from({ length: 5 }, () => h.agent(['cpu'])));
    for (const agent of fleet) expect((await postFrom(h, nat, agent.id, agent.token)).statusCode).toBe(202);
    for (let i = 0; i < 50; i++) await postFrom(h, nat, fleet[0]!.id, checksummedToken());
    for (const agent of fleet) expect((await postFrom(h, nat, agent.id, agent.token)).statusCode).toBe(202);
  });

  it('lets no more concurrent lookups through than the failures left', async () => {
    const h = await appHarness({ env: { AUTH_FAILURE_BURST: '3', AUTH_FAILURE_RATE: '0.1' } });
    const { id } = await h.agent(['cpu']);
    const attacker = '192.0.2.99';
    expect((await postFrom(h, attacker, id, 'mbt_short')).statusCode).toBe(401);
    const spy = lookups();
    // 50 guesses at once, each of a shape that must be looked up: two failures are left.
    const answers = await Promise.all(
      Array.from({ length: 50 }, () => postFrom(h, attacker, id, `mbt_${randomBytes(32).toString('base64url')}`)),
    );
    const statuses = answers.map((res) => res.statusCode);
    expect(statuses.filter((status) => status === 401)).toHaveLength(2);
    expect(statuses.filter((status) => status === 429)).toHaveLength(48);
    expect(spy).toHaveBeenCalledTimes(2);
  });

  it('answers the WebSocket upgrade of a token it would have to look up 429 with Retry-After, before any upgrade', async () => {
    const h = await appHarness({ env: { AUTH_FAILURE_BURST: '2', AUTH_FAILURE_RATE: '0.1' } });
    const { id } = await h.agent(['cpu']);
    // A valid token this replica has not cached: checking it would need a query.
    const [fresh] = await provisionAgents(db.pool, 1, ['cpu']);
    // The socket's address: the loopback the real client connects from.
    for (let i = 0; i < 2; i++) expect((await postFrom(h, '127.0.0.1', id, 'mbt_short')).statusCode).toBe(401);
    const ws = new WebSocket(`${h.base.replace('http', 'ws')}/v1/agents/${fresh!.id}/metadata/stream`, {
      headers: { authorization: `Bearer ${fresh!.token}` },
    });
    const answer = await refusedUpgrade(ws);
    expect(answer).toMatchObject({ status: 429, headers: { 'retry-after': '10' } });
    expect(JSON.parse(answer.body).error).toMatch(/^too many failed authentications/);
  });
});
