// Revocation across replicas: two real service processes on one Postgres. A
// token rotated or an agent deleted on one is refused on the other within a
// second (the control NOTIFY), and an agent created on one is accepted on the
// other within a second even if that one had just refused its token.

import { beforeAll, describe, expect, it } from 'vitest';
import { CONTROL_CHANNEL } from '../src/control.js';
import { hashToken } from '../src/tokens.js';
import { testDatabase } from './support/db.js';
import { call, replicasOf } from './support/replicas.js';

const db = testDatabase();
const ADMIN = 'revocation-test-admin-token';
const replicas = replicasOf(db, ['a', 'b'], { ADMIN_TOKEN: ADMIN, LOG_LEVEL: 'info' });

beforeAll(async () => {
  for (const { base } of replicas) expect((await fetch(`${base}/readyz`)).status).toBe(200);
});

const report = (base: string, id: string, token: string) =>
  call(base, 'POST', `/v1/agents/${id}/metadata`, token, { metadata: [{ key: 'cpu', value: '1%' }] });

/** How long until `base` answers `status` to a report with this token (polled every 20 ms). */
async function msUntil(status: number, base: string, id: string, token: string, limitMs = 5000): Promise<number> {
  const start = Date.now();
  while (Date.now() - start < limitMs) {
    if ((await report(base, id, token)).status === status) return Date.now() - start;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`no ${status} within ${limitMs} ms`);
}

describe('two replicas on one Postgres', () => {
  it('refuse a rotated token and a deleted agent on the other replica within a second', async () => {
    const [a, b] = replicas as [(typeof replicas)[0], (typeof replicas)[0]];
    const created = (await call(a.base, 'POST', '/v1/agents', ADMIN, { name: 'replicated' })).body!;
    await call(a.base, 'PUT', `/v1/agents/${created.id}/metadata-definitions`, ADMIN, {
      definitions: [{ key: 'cpu' }],
    });
    // B checks the token once and keeps it cached from then on.
    expect((await report(b.base, created.id!, created.token!)).status).toBe(202);
    expect((await report(b.base, created.id!, created.token!)).status).toBe(202);

    const rotated = (await call(a.base, 'POST', `/v1/agents/${created.id}/token`, ADMIN)).body!;
    expect((await report(a.base, created.id!, created.token!)).status).toBe(401);
    expect(await msUntil(401, b.base, created.id!, created.token!)).toBeLessThan(1000);
    expect((await report(b.base, created.id!, rotated.token!)).status).toBe(202);

    expect((await call(a.base, 'DELETE', `/v1/agents/${created.id}`, ADMIN)).status).toBe(204);
    expect(await msUntil(401, b.base, created.id!, rotated.token!)).toBeLessThan(1000);
  });

  it('accept on one replica, within a second, an agent created on the other after it refused its token', async () => {
    const [, b] = replicas as [(typeof replicas)[0], (typeof replicas)[0]];
    const id = '6f1c2c0e-5f0a-4c55-9f1e-2d7b9c3a8e41';
    const token = 'mbt_a-token-chosen-before-the-agent-exists';
    // B refuses it, and remembers it as unknown (for 5 s, unless told otherwise).
    expect((await report(b.base, id, token)).status).toBe(401);
    // The agent appears, announced as the create statement announces it.
    await db.pool.query(
      `WITH created AS (INSERT INTO workspace_agents (id, name, token_hash) VALUES ($1, 'late', $2) RETURNING id)
       SELECT pg_notify($3, json_build_object('type', 'created', 'agent_id', id)::text) FROM created`,
      [id, hashToken(token), CONTROL_CHANNEL],
    );
    expect(await msUntil(202, b.base, id, token)).toBeLessThan(1000);
  });
});
