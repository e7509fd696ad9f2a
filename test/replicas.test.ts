// Several replicas on one Postgres, as people run them behind a load
// balancer: three real service processes. Reports go to random replicas,
// some older than what was already sent; every row ends with its newest
// value, and Postgres never sees a deadlock between their flushes. A watcher
// on one replica sees values ingested on the others. SIGTERM one under load:
// the others keep answering, and every value answered 202 by any of them is
// in the table.

import { beforeAll, describe, expect, it, vi } from 'vitest';
import { provisionAgents, type ProvisionedAgent } from '../src/provision.js';
import { testDatabase } from './support/db.js';
import { seededRandom } from './support/random.js';
import { replicaMetric, replicasOf, type Replica } from './support/replicas.js';
import { openSse } from './support/sse.js';

const db = testDatabase();
const ADMIN = 'replicas-test-admin-token';
// Short flushes and small batches: many concurrent flushes over overlapping rows.
const FLUSH_INTERVAL_MS = 500;
const FLUSH_JITTER = 0.1;
const KEYS = Array.from({ length: 10 }, (_, i) => `k${i}`);

const replicas = replicasOf(db, ['a', 'b', 'c'], {
  ADMIN_TOKEN: ADMIN,
  FLUSH_INTERVAL_MS: String(FLUSH_INTERVAL_MS),
  FLUSH_JITTER: String(FLUSH_JITTER),
  BATCH_SIZE: '50',
  LOG_LEVEL: 'info',
});
let agents: ProvisionedAgent[];
const random = seededRandom(20261124);

beforeAll(async () => {
  agents = await provisionAgents(db.pool, 30, KEYS, 'replicated');
});

const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)]!;

/** One report to one replica; resolves to its HTTP status (0 when the connection failed). */
async function report(base: string, agent: ProvisionedAgent, values: Record<string, [string, Date]>): Promise<number> {
  try {
    const res = await fetch(`${base}/v1/agents/${agent.id}/metadata`, {
      method: 'POST',
      headers: { authorization: `Bearer ${agent.token}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        metadata: Object.entries(values).map(([key, [value, at]]) => ({ key, value, collected_at: at.toISOString() })),
      }),
    });
    await res.arrayBuffer();
    return res.status;
  } catch {
    return 0;
  }
}

/** What each (agent, key) must end as: the newest value answered 202 by any replica. */
class Acknowledged {
  private readonly newest = new Map<string, { value: string; at: number }>();
  record(agent: string, key: string, value: string, at: number): void {
    const id = `${agent}|${key}`;
    const held = this.newest.get(id);
    if (!held || at >= held.at) this.newest.set(id, { value, at });
  }
  expected(): Map<string, string> {
    return new Map([...this.newest].map(([id, { value }]) => [id, value]));
  }
}

async function tableValues(ids: Iterable<string>): Promise<Map<string, string>> {
  const wanted = new Set(ids);
  const { rows } = await db.pool.query<{ id: string; value: string }>(
    `SELECT workspace_agent_id || '|' || key AS id, value FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[])`,
    [agents.map((a) => a.id)],
  );
  return new Map(rows.filter((r) => wanted.has(r.id)).map((r) => [r.id, r.value]));
}

/**
 * Waits until no replica holds anything to flush (its channel and its batch
 * are empty, so no UPDATE is in flight), then reads how many of their flushes
 * failed. Only their flushes write these rows: a deadlock between two of them
 * aborts one of the two UPDATEs, and that replica counts it in
 * metabatch_metadata_flush_errors_total before retrying.
 */
async function flushErrorsOnceIdle(): Promise<Record<string, number>> {
  const errors: Record<string, number> = {};
  for (const replica of replicas) {
    await vi.waitFor(async () => {
      expect(await replicaMetric(replica.base, 'metabatch_metadata_channel_depth')).toBe(0);
      expect(await replicaMetric(replica.base, 'metabatch_metadata_held_keys')).toBe(0);
    });
    errors[replica.name] = await replicaMetric(replica.base, 'metabatch_metadata_flush_errors_total');
  }
  return errors;
}

describe('three replicas on one Postgres', () => {
  it('end with every row at its newest value, whichever replica got which report, and never deadlock', async () => {
    const acknowledged = new Acknowledged();
    const base = Date.parse('2026-11-24T00:00:00Z');
    // Eight rounds; in each, 16 clients send 25 reports each to random replicas.
    for (let round = 0; round < 8; round++) {
      await Promise.all(
        Array.from({ length: 16 }, async (_, client) => {
          for (let i = 0; i < 25; i++) {
            const agent = pick(agents);
            // Some reports are older than ones already sent (a slow agent, a retry);
            // none shares its collected_at with another (a tie has no newest).
            const at = new Date(base + round * 100_000 + i * 1000 + client - (random() < 0.3 ? 5000 : 0));
            const values: Record<string, [string, Date]> = {};
            for (const key of KEYS)
              if (random() < 0.6) values[key] = [`r${round}-c${client}-i${i}-${at.getTime()}`, at];
            if (Object.keys(values).length === 0) continue;
            if ((await report(pick(replicas).base, agent, values)) !== 202) continue;
            for (const [key, [value]] of Object.entries(values))
              acknowledged.record(agent.id, key, value, at.getTime());
          }
        }),
      );
      const expected = acknowledged.expected();
      await vi.waitFor(async () => expect(await tableValues(expected.keys())).toEqual(expected), {
        timeout: 10_000,
        interval: 200,
      });
    }
    // No flush failed, so none was a deadlock victim (the replicas log each failure; a deadlock as `deadlock detected`).
    expect(
      await flushErrorsOnceIdle(),
      replicas
        .map((r) => `${r.service.stdout()}${r.service.stderr()}`.match(/^.*deadlock detected.*$/gm) ?? [])
        .join('\n'),
    ).toEqual({ a: 0, b: 0, c: 0 });
  }, 120_000);

  it('show a watcher on one replica the values ingested on the others within a flush period and a second', async () => {
    const [a, b, c] = replicas as [Replica, Replica, Replica];
    const watched = agents.slice(0, 4);
    const seen = new Map<string, number>();
    const stream = await openSse<{ metadata: { value: string }[] }>(`${a.base}/v1/agents/metadata/watch`, ADMIN, {
      method: 'POST',
      body: { agent_ids: watched.map((agent) => agent.id) },
      // When each value first arrived.
      onEvent: ({ type, data }) => {
        if (type !== 'data') return;
        for (const item of data.metadata) if (!seen.has(item.value)) seen.set(item.value, Date.now());
      },
    });
    expect(stream.status).toBe(200);
    try {
      // The longest the path can take: a whole flush period (with its jitter), then the watch tick.
      const bound = FLUSH_INTERVAL_MS * (1 + FLUSH_JITTER) + 1000;
      for (const [i, replica] of [b, c, b, c].entries()) {
        const value = `from-${replica.name}-${i}`;
        const sentAt = Date.now();
        // k9, at the present time: the other tests leave k9 alone.
        expect(await report(replica.base, watched[i]!, { k9: [value, new Date()] })).toBe(202);
        await vi.waitFor(() => expect(seen.has(value)).toBe(true), { timeout: 5000, interval: 20 });
        // 250 ms for the processes' scheduling on a shared 2-core machine.
        expect(seen.get(value)! - sentAt).toBeLessThan(bound + 250);
      }
    } finally {
      stream.close();
      await stream.ended;
    }
  });

  it('keep answering when one is stopped under load, and lose nothing any of them answered 202', async () => {
    const [a, b, c] = replicas as [Replica, Replica, Replica];
    const acknowledged = new Acknowledged();
    const answered = new Map<string, number>();
    let running = true;
    let stoppedAt = 0;
    // After the first test's times; k9 is the watcher test's, at the present time.
    let clock = Date.parse('2026-11-24T12:00:00Z');
    const keys = KEYS.filter((key) => key !== 'k9');
    const clients = Array.from({ length: 12 }, async () => {
      while (running) {
        const replica = pick(replicas);
        const agent = pick(agents);
        const at = new Date(clock++);
        const values = { [pick(keys)]: [`load-${at.getTime()}`, at] as [string, Date] };
        const status = await report(replica.base, agent, values);
        if (status === 202) {
          for (const [key, [value]] of Object.entries(values)) acknowledged.record(agent.id, key, value, at.getTime());
          if (stoppedAt > 0 && replica !== b) answered.set(replica.name, (answered.get(replica.name) ?? 0) + 1);
        }
      }
    });
    await new Promise((resolve) => setTimeout(resolve, 1000));
    b.service.child.kill('SIGTERM');
    stoppedAt = Date.now();
    expect((await b.service.exited).code).toBe(0);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    running = false;
    await Promise.all(clients);
    // The other two kept answering after the signal.
    expect(answered.get('a')).toBeGreaterThan(10);
    expect(answered.get('c')).toBeGreaterThan(10);
    for (const replica of [a, c]) expect((await fetch(`${replica.base}/readyz`)).status).toBe(200);
    const expected = acknowledged.expected();
    await vi.waitFor(async () => expect(await tableValues(expected.keys())).toEqual(expected), {
      timeout: 10_000,
      interval: 200,
    });
  }, 60_000);
});
