// Revocation across replicas: two real service processes on one Postgres. A
// watch stream opened on one with an agent's token ends, with `event:
// revoked`, within a second of that token being rotated or the agent deleted
// on the other, and is sent nothing reported after the change.

import { beforeAll, describe, expect, it } from 'vitest';
import { testDatabase } from './support/db.js';
import { call, replicasOf, type Replica } from './support/replicas.js';
import { openSse } from './support/sse.js';

const db = testDatabase();
const ADMIN = 'watch-revocation-test-admin-token';
const replicas = replicasOf(db, ['a', 'b'], { ADMIN_TOKEN: ADMIN, LOG_LEVEL: 'info', FLUSH_INTERVAL_MS: '100' });

beforeAll(async () => {
  for (const { base } of replicas) expect((await fetch(`${base}/readyz`)).status).toBe(200);
});

/** A stream of B opened with the token, and how long after `change` (run on A) it ended. */
async function msUntilEnded(b: Replica, id: string, token: string, change: () => Promise<unknown>) {
  const stream = await openSse(`${b.base}/v1/agents/${id}/metadata/watch`, token);
  expect(stream.status).toBe(200);
  await stream.next('data');
  const start = Date.now();
  await change();
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`still open 5 s after the change: ${JSON.stringify(stream.events)}`)),
      5000,
    );
  });
  await Promise.race([stream.ended, bound]).finally(() => clearTimeout(timer));
  return { ms: Date.now() - start, stream };
}

describe('two replicas on one Postgres', () => {
  it('end a watch opened on one with a token rotated or an agent deleted on the other, within a second', async () => {
    const [a, b] = replicas as [Replica, Replica];
    const created = (await call(a.base, 'POST', '/v1/agents', ADMIN, { name: 'watched' })).body!;
    const id = created.id!;
    await call(a.base, 'PUT', `/v1/agents/${id}/metadata-definitions`, ADMIN, { definitions: [{ key: 'cpu' }] });

    let rotated = '';
    const rotation = await msUntilEnded(b, id, created.token!, async () => {
      rotated = (await call(a.base, 'POST', `/v1/agents/${id}/token`, ADMIN)).body!.token!;
      // Reported with the new token straight after the change: the old stream must never see it.
      const res = await call(a.base, 'POST', `/v1/agents/${id}/metadata`, rotated, {
        metadata: [{ key: 'cpu', value: 'after the rotation' }],
      });
      expect(res.status).toBe(202);
    });
    expect(rotation.stream.events.at(-1)).toEqual({
      type: 'revoked',
      data: { agent_id: id, reason: 'token rotated' },
    });
    expect(JSON.stringify(rotation.stream.events)).not.toContain('after the rotation');
    expect(rotation.ms).toBeLessThan(1000);

    const deletion = await msUntilEnded(b, id, rotated, () => call(a.base, 'DELETE', `/v1/agents/${id}`, ADMIN));
    expect(deletion.stream.events.slice(-2)).toEqual([
      { type: 'deleted', data: { agent_id: id } },
      { type: 'revoked', data: { agent_id: id, reason: 'agent deleted' } },
    ]);
    expect(deletion.ms).toBeLessThan(1000);
    console.log(`watch on B ended ${rotation.ms} ms after a rotation on A, ${deletion.ms} ms after a delete`);
  });
});
