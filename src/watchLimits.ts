// The bounds of SSE watch streams, and who a stream speaks for:
// - how many one agent token, the admin token, and the whole replica may
//   hold open (an open beyond is answered 429, naming the bound, and
//   counted);
// - how far behind a stream may fall (past it the stream is closed and
//   counted: watchStream.ts applies the rule);
// - why the service ends a stream (a client too slow, a token revoked).

import { DEFAULTS } from './config.js';
import { HttpError } from './errors.js';
import type { WatchMetrics } from './metrics.js';
import { BACKPRESSURE_BYTES } from './routes/ingestStream.js';
import { MAX_STREAMS_PER_AGENT } from './streams.js';

/**
 * A stream may be this many bytes behind its client when a newer event for it
 * arrives; more, and it is closed. The WebSocket's figure: 1 MiB.
 */
export const MAX_WATCH_BYTES_BEHIND = BACKPRESSURE_BYTES;

/** Who opened a stream: its bounds, and which revocations end it. */
export type WatchOwner = { kind: 'admin' } | { kind: 'agent'; agentId: string; tokenHash: string };

export const WATCH_BOUNDS = ['agent', 'admin', 'replica'] as const;
export type WatchBound = (typeof WATCH_BOUNDS)[number];

/** Why the service ended a stream (metabatch_watch_closed_total{reason}). */
export const WATCH_CLOSE_REASONS = ['slow', 'token_rotated', 'agent_deleted'] as const;
export type WatchCloseReason = (typeof WATCH_CLOSE_REASONS)[number];

/** What ends a stream opened with an agent's token, as its last event says (`event: revoked`). */
export type WatchRevocation = 'token rotated' | 'agent deleted';

export const REVOCATION_CLOSE_REASON: Record<WatchRevocation, WatchCloseReason> = {
  'token rotated': 'token_rotated',
  'agent deleted': 'agent_deleted',
};

/** The 429 of a watch, as the API document describes it. */
export const TOO_MANY_WATCHES =
  `Too many watch streams open (the message names the bound): ${MAX_STREAMS_PER_AGENT} for one agent token, ` +
  'MAX_WATCHES_PER_ADMIN for the admin token, MAX_WATCHES on this replica. Close one, or retry against another ' +
  'replica or later.';

/** What every watch's description says of its bounds and of how it may end. */
export const WATCH_BOUNDS_DESCRIPTION = `A stream opened with an agent's token ends with \`event: revoked\` and
\`data: {"agent_id": "<id>", "reason": "token rotated"}\` (or \`"agent deleted"\`, after \`event: deleted\`) as
soon as that token is rotated or the agent deleted, on whichever replica; it is never sent a value read after
the change. A client more than 1 MiB behind when a newer event comes is cut off (the service's memory does not
grow with a client that stops reading).`;

export interface WatchLimitOptions {
  /** Streams of this replica at most (MAX_WATCHES). */
  maxWatches?: number;
  /** Streams of the admin token at most (MAX_WATCHES_PER_ADMIN). */
  maxWatchesPerAdmin?: number;
}

/** The streams open per owner; refuses an open past a bound. */
export class WatchLimits {
  private readonly maxWatches: number;
  private readonly maxWatchesPerAdmin: number;
  private total = 0;
  private admin = 0;
  private readonly byAgent = new Map<string, number>();

  constructor(
    options: WatchLimitOptions,
    private readonly metrics: WatchMetrics,
  ) {
    this.maxWatches = options.maxWatches ?? DEFAULTS.maxWatches;
    this.maxWatchesPerAdmin = options.maxWatchesPerAdmin ?? DEFAULTS.maxWatchesPerAdmin;
    for (const bound of WATCH_BOUNDS) metrics.refusedTotal.inc({ bound }, 0);
    for (const reason of WATCH_CLOSE_REASONS) metrics.closedTotal.inc({ reason }, 0);
  }

  /** Takes a place for one more stream of `owner`, or throws a 429 naming the bound (and counts it). */
  take(owner: WatchOwner | undefined): void {
    const refused = this.refusal(owner);
    if (refused) {
      this.metrics.refusedTotal.inc({ bound: refused.bound });
      throw new HttpError(429, refused.message);
    }
    this.total++;
    if (owner?.kind === 'admin') this.admin++;
    else if (owner?.kind === 'agent') this.byAgent.set(owner.agentId, (this.byAgent.get(owner.agentId) ?? 0) + 1);
  }

  /** Gives back the place of a stream that closed. */
  release(owner: WatchOwner | undefined): void {
    this.total--;
    if (owner?.kind === 'admin') this.admin--;
    else if (owner?.kind === 'agent') {
      const left = (this.byAgent.get(owner.agentId) ?? 1) - 1;
      if (left > 0) this.byAgent.set(owner.agentId, left);
      else this.byAgent.delete(owner.agentId);
    }
  }

  private refusal(owner: WatchOwner | undefined): { bound: WatchBound; message: string } | undefined {
    if (owner?.kind === 'agent' && (this.byAgent.get(owner.agentId) ?? 0) >= MAX_STREAMS_PER_AGENT) {
      return {
        bound: 'agent',
        message: `too many watch streams for this agent token (at most ${MAX_STREAMS_PER_AGENT}); close one first`,
      };
    }
    if (owner?.kind === 'admin' && this.admin >= this.maxWatchesPerAdmin) {
      return {
        bound: 'admin',
        message: `too many watch streams for the admin token (at most ${this.maxWatchesPerAdmin}, MAX_WATCHES_PER_ADMIN); close one first`,
      };
    }
    if (this.total >= this.maxWatches) {
      return {
        bound: 'replica',
        message: `too many watch streams on this replica (at most ${this.maxWatches}, MAX_WATCHES): retry against another replica or later`,
      };
    }
    return undefined;
  }
}
