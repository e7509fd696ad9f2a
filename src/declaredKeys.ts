// The keys each agent has declared, as this replica last read them: what the
// batcher may hold for an agent while flushes fail. During an outage the
// database cannot be asked, so the sets are read while it answers: an
// agent's first report on this replica (and any report once its set is older
// than REFRESH_MS) queues a read, and the reads of one turn of the event loop
// go out as one query. A set that is stale only costs retries, never a value:
// a key declared since is refused (429) during an outage, not dropped after a
// 202; a key removed since is held and then ignored by the flush, as today.
// An agent whose keys this replica never read (its first report here comes
// during the outage) may hold a share of UNREAD_AGENT_SHARE keys: the first
// it reports, whatever they are.

import type pg from 'pg';
import { LRUCache } from 'lru-cache';
import { systemClock, type Clock } from './clock.js';

const declaredKeysOf = `SELECT workspace_agent_id::text AS agent_id, array_agg(key) AS keys
FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1::uuid[]) GROUP BY workspace_agent_id`;

// An agent's definitions change rarely (a template update); a minute keeps
// the reads to one per agent per minute per replica, batched.
const REFRESH_MS = 60_000;
// As many agents as the token cache holds (src/auth.ts): ~100 bytes plus the
// keys of each, ~15 MB at 100k agents of 10 keys.
const MAX_AGENTS = 100_000;
// Agents read in one query at most (a 1,000-uuid array is ~37 KB).
const READ_CHUNK = 1000;
// The keys an agent whose definitions were never read here may hold while
// flushes fail: Coder's templates declare a handful of keys, and 64 at the
// 2,048-byte limits are ~270 KB, so the agents new to a replica during an
// outage keep reporting while none of them can hold much.
export const UNREAD_AGENT_SHARE = 64;
// After a failed read (the database is down), the next waits this long:
// reports keep coming during an outage, and each must not try to connect.
const RETRY_MS = 5000;

interface Entry {
  keys: ReadonlySet<string>;
  readAt: number;
}

export interface DeclaredKeysOptions {
  clock?: Clock;
  /** Called with a read that failed (it is retried at the agent's next report). */
  onError?: (err: Error) => void;
}

export class DeclaredKeys {
  private readonly known = new LRUCache<string, Entry>({ max: MAX_AGENTS });
  private readonly queued = new Set<string>();
  /** The keys admitted for agents never read here, each at most UNREAD_AGENT_SHARE. */
  private readonly unread = new LRUCache<string, Set<string>>({ max: MAX_AGENTS });
  private readonly clock: Clock;
  private readonly onError: (err: Error) => void;
  private reading: Promise<void> | undefined;
  private retryAt = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly pool: Pick<pg.Pool, 'query'>,
    options: DeclaredKeysOptions = {},
  ) {
    this.clock = options.clock ?? systemClock;
    this.onError = options.onError ?? (() => undefined);
  }

  /**
   * The agent's declared keys as last read, or undefined if never read here.
   * Queues a read when there is none or it is older than REFRESH_MS.
   */
  keysOf(agentId: string): ReadonlySet<string> | undefined {
    const entry = this.known.get(agentId);
    if (entry === undefined || this.clock.Date.now() - entry.readAt >= REFRESH_MS) this.queue(agentId);
    return entry?.keys;
  }

  /**
   * For an agent whose keys were never read here: whether it may hold this
   * key, the first UNREAD_AGENT_SHARE distinct keys it reports being admitted.
   */
  admitUnread(agentId: string, key: string): boolean {
    let keys = this.unread.get(agentId);
    if (keys === undefined) this.unread.set(agentId, (keys = new Set()));
    if (keys.has(key)) return true;
    if (keys.size >= UNREAD_AGENT_SHARE) return false;
    keys.add(key);
    return true;
  }

  /** Resolves once the reads queued so far are done (or failed). */
  async idle(): Promise<void> {
    while (this.reading) await this.reading;
  }

  private queue(agentId: string): void {
    this.queued.add(agentId);
    if (this.queued.size > MAX_AGENTS) this.queued.delete(this.queued.values().next().value!);
    if (this.clock.Date.now() < this.retryAt) return;
    // One query for every agent queued in this turn of the event loop.
    this.reading ??= new Promise<void>((resolve) => setImmediate(resolve)).then(() => this.readQueued());
  }

  private async readQueued(): Promise<void> {
    try {
      while (this.queued.size > 0) {
        const ids = [...this.queued].slice(0, READ_CHUNK);
        for (const id of ids) this.queued.delete(id);
        const readAt = this.clock.Date.now();
        try {
          const { rows } = await this.pool.query<{ agent_id: string; keys: string[] }>(declaredKeysOf, [ids]);
          const found = new Map(rows.map((row) => [row.agent_id, row.keys]));
          // An agent with no rows declares nothing (or does not exist): an empty set.
          for (const id of ids) {
            this.known.set(id, { keys: new Set(found.get(id)), readAt });
            this.unread.delete(id);
          }
        } catch (err) {
          // Read again at the agents' next reports, once RETRY_MS have passed.
          for (const id of ids) this.queued.add(id);
          this.retryAt = this.clock.Date.now() + RETRY_MS;
          this.onError(err as Error);
          return;
        }
      }
    } finally {
      this.reading = undefined;
    }
  }
}
