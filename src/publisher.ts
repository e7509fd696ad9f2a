// Announces changed agents on the NOTIFY channel after their UPDATE has
// committed, for a store that does not NOTIFY in its own statement (library
// use; an announcer of announcers.ts, sink `notify`). All payloads of a flush
// go in one statement: one round trip, and Postgres delivers them together
// when it commits.

import type { Pool } from 'pg';
import { encodeAgentIdChunks } from './agentIdChunks.js';
import { NOTIFY_SINK, type Announcer } from './announcers.js';

const notifyPayloads = `SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload`;

export class Publisher implements Announcer {
  /** Its payloads count as NOTIFY payloads; the store must then not NOTIFY too (no `notifyChannel`). */
  readonly sink = NOTIFY_SINK;

  constructor(
    private readonly pool: Pool,
    readonly channel: string,
  ) {}

  /** Publishes the ids in payloads of at most 363; resolves to the number of payloads. */
  async publish(agentIds: readonly string[]): Promise<number> {
    const chunks = encodeAgentIdChunks(agentIds);
    if (chunks.length === 0) return 0;
    await this.pool.query(notifyPayloads, [this.channel, chunks]);
    return chunks.length;
  }
}
