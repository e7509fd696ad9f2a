// Live watchers of agents' metadata (Server-Sent Events), fed by the one
// shared LISTEN connection. Coder's watch-metadata semantics, for one agent
// or many per stream:
// - the full list of each watched agent at once;
// - again when a batch names the agent, on a fixed 1 s tick (never a
//   debounce that waits for quiet: under a continuous stream of batches each
//   changed agent is still sent within a second);
// - at least every 5 s, so `age` stays true;
// - a keep-alive ping every 15 s on its own schedule.
// One read per tick serves every stream, whatever their number, and agents
// nobody watches are never read. What a slow client may cost, and how many
// streams a token may hold, is watchStream.ts's and watchLimits.ts's. A
// stream opened with an agent's token ends (`event: revoked`) when the token
// is rotated or the agent deleted: at the control message, or at the first
// read that finds another token (the message may still be on its way), so it
// is never sent a value read after the change.

import type { Logger } from 'pino';
import { uncounted, type BackgroundRunner } from './background.js';
import { systemClock, type Clock } from './clock.js';
import type { WatchMetrics } from './metrics.js';
import type { MetadataOfAgents, MetadataRow } from './store.js';
import {
  REVOCATION_CLOSE_REASON,
  WatchLimits,
  type WatchLimitOptions,
  type WatchOwner,
  type WatchRevocation,
} from './watchLimits.js';
import { watchEvent, WatchStream, type WatchEvent, type WatchSink } from './watchStream.js';
import { dataEvent, type WatchFormat } from './watchView.js';

export type { WatchSink } from './watchStream.js';
export { WatchStream } from './watchStream.js';
export { isStale, toView, type MetadataView, type WatchFormat } from './watchView.js';

export interface WatchSource {
  getMetadataOfAgents(agentIds: readonly string[]): Promise<MetadataOfAgents>;
}

export interface WatchHubOptions {
  source: WatchSource;
  metrics: WatchMetrics;
  logger: Logger;
  clock?: Clock;
  /** Counts each tick as the background process `watch_tick` (background.ts). Default: not counted. */
  background?: BackgroundRunner;
  /** Streams open at most, per replica and per admin token (watchLimits.ts). Default: config.ts's. */
  limits?: WatchLimitOptions;
}

// Coder's intervals: a send tick of 1 s, a forced resend every 5 s (keeps
// `age` true), a heartbeat every 15 s.
const TICK_MS = 1000;
const RESEND_MS = 5000;
const PING_MS = 15_000;

interface Watched {
  streams: Set<WatchStream>;
  rows: MetadataRow[] | undefined;
  /** The agent's token hash as read with `rows`: a stream opened with another token gets nothing more. */
  tokenHash: string | undefined;
  /** A batch named the agent (or the listener reconnected) since its rows were read. */
  dirty: boolean;
  /** When its data was last sent to all its streams. */
  lastSentAt: number;
  /** The events last made of `rows`, shared by the streams that open during the same tick. */
  events: { rows: MetadataRow[]; tick: number; byFormat: Partial<Record<WatchFormat, WatchEvent>> } | undefined;
}

// A revoked stream's last events are written within this, or its
// connection is dropped: revocation ends every stream within a second.
const FINISH_GRACE_MS = 500;

export class WatchHub {
  private readonly source: WatchSource;
  private readonly metrics: WatchMetrics;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly background: BackgroundRunner;
  private readonly limits: WatchLimits;
  private readonly agents = new Map<string, Watched>();
  private readonly streams = new Set<WatchStream>();
  /** Streams writing their last events, and the timer that drops them if they take too long. */
  private readonly finishing = new Map<WatchStream, unknown>();
  private timer: unknown;
  private ticking = false;
  private closed = false;
  /** Counts ticks: the events of one tick are one generation (watchStream.ts). */
  private tickCount = 0;

  constructor(options: WatchHubOptions) {
    this.source = options.source;
    this.metrics = options.metrics;
    this.log = options.logger;
    this.clock = options.clock ?? systemClock;
    this.background = options.background ?? uncounted;
    this.limits = new WatchLimits(options.limits ?? {}, this.metrics);
    this.metrics.bind({ streams: () => this.streams.size, agents: () => this.agents.size });
    this.schedule();
  }

  get streamCount(): number {
    return this.streams.size;
  }

  /**
   * Registers a stream before its first read, so that no batch between the
   * two is missed. For `all`, agents created from now on join it too.
   * Throws a 429 HttpError when its owner or the replica has all its streams.
   */
  open(agentIds: readonly string[], options: { format: WatchFormat; all?: boolean; owner?: WatchOwner }): WatchStream {
    this.limits.take(options.owner);
    // A stream that ends by itself (too slow, or its last events written) leaves at once.
    const stream = new WatchStream(options.format, options.all ?? false, options.owner, this.metrics, (ended) =>
      this.remove(ended),
    );
    this.streams.add(stream);
    this.addAgents(stream, agentIds);
    return stream;
  }

  /** Adds agents to a stream (its initial ones, or every agent for an `all` stream). */
  addAgents(stream: WatchStream, agentIds: readonly string[]): void {
    if (!this.streams.has(stream)) return;
    for (const id of agentIds) {
      if (stream.agents.has(id)) continue;
      stream.agents.add(id);
      this.watched(id).streams.add(stream);
    }
  }

  /**
   * The rows last read of these agents, for those no batch has named since:
   * the agents a new stream needs no query for, with their token hashes. The
   * others (`unread`) must be read by the caller.
   */
  cached(agentIds: readonly string[]): {
    rows: Map<string, MetadataRow[]>;
    unread: string[];
    tokenHashes: Map<string, string>;
  } {
    const rows = new Map<string, MetadataRow[]>();
    const tokenHashes = new Map<string, string>();
    const unread: string[] = [];
    for (const id of agentIds) {
      const watched = this.agents.get(id);
      if (watched?.rows && !watched.dirty) {
        rows.set(id, watched.rows);
        if (watched.tokenHash !== undefined) tokenHashes.set(id, watched.tokenHash);
      } else unread.push(id);
    }
    return { rows, unread, tokenHashes };
  }

  /**
   * Connects the stream to its client and sends each agent's list read for
   * it (in the given order); agents read as missing leave the stream.
   */
  attach(
    stream: WatchStream,
    sink: WatchSink,
    read: Map<string, MetadataRow[]>,
    missing: readonly string[] = [],
    tokenHashes: ReadonlyMap<string, string> = new Map(),
  ): void {
    if (this.closed || !this.streams.has(stream)) {
      sink.end();
      return;
    }
    const now = this.clock.Date.now();
    stream.connect(sink, now);
    for (const id of missing) this.leave(stream, id);
    for (const [id, rows] of read) {
      const watched = this.agents.get(id);
      if (!watched || !stream.agents.has(id)) continue;
      if (!watched.dirty) {
        watched.rows = rows;
        watched.tokenHash = tokenHashes.get(id) ?? watched.tokenHash;
      }
      stream.send(id, this.eventOf(watched, id, stream.format, rows, now));
    }
  }

  /** Forgets a stream at once (its client went away). */
  remove(stream: WatchStream): void {
    if (!this.streams.delete(stream)) return;
    this.limits.release(stream.owner);
    stream.detach();
    this.clock.clearTimeout(this.finishing.get(stream));
    this.finishing.delete(stream);
    for (const id of stream.agents) this.unwatch(stream, id);
    stream.agents.clear();
  }

  /** A batch named these agents: the watched ones are read again on the next tick. */
  onBatch(agentIds: readonly string[]): void {
    for (const id of agentIds) {
      const watched = this.agents.get(id);
      if (watched) watched.dirty = true;
    }
  }

  /** The listener reconnected and may have missed batches: read every watched agent again. */
  resync(): void {
    for (const watched of this.agents.values()) watched.dirty = true;
  }

  /** An agent was created: streams of every agent watch it from now on (its list comes on the next tick). */
  onCreated(agentId: string): void {
    for (const stream of this.streams) {
      if (!stream.all) continue;
      this.addAgents(stream, [agentId]);
      this.agents.get(agentId)!.dirty = true;
    }
  }

  /** An agent was deleted: each stream watching it gets `event: deleted`, and it leaves them. */
  onDeleted(agentId: string): void {
    this.revoke(agentId, 'agent deleted');
    const watched = this.agents.get(agentId);
    if (!watched) return;
    for (const stream of [...watched.streams]) this.leave(stream, agentId);
  }

  /**
   * The agent's token was rotated, or the agent deleted: every stream opened
   * with its token ends with `event: revoked` (after `event: deleted` for a
   * delete), and its next stream is checked against the database's token.
   */
  revoke(agentId: string, why: WatchRevocation): void {
    const watched = this.agents.get(agentId);
    if (!watched) return;
    // What was cached was read with the old token: read the agent again before serving it.
    watched.dirty = true;
    watched.tokenHash = undefined;
    for (const stream of [...watched.streams]) {
      if (stream.owner?.kind === 'agent' && stream.owner.agentId === agentId) this.endRevoked(stream, agentId, why);
    }
  }

  /** Ends every stream (shutdown). */
  close(): void {
    this.closed = true;
    this.clock.clearTimeout(this.timer);
    for (const stream of [...this.streams]) {
      stream.end();
      this.remove(stream);
    }
  }

  /** One tick: read dirty agents in one query, send what changed, resend what is due, ping. Resolves when done. */
  async tick(): Promise<void> {
    if (this.ticking || this.closed) return;
    this.ticking = true;
    try {
      const fresh = await this.readDirty();
      this.background.cpu('watch_tick', () => this.send(fresh));
    } finally {
      this.ticking = false;
    }
  }

  /** Sends what changed and what is due for a resend, and the pings that are due. */
  private send(fresh: Set<string>): void {
    const now = this.clock.Date.now();
    this.tickCount++;
    for (const [id, watched] of this.agents) {
      if (!watched.rows || !(fresh.has(id) || now - watched.lastSentAt >= RESEND_MS)) continue;
      watched.lastSentAt = now;
      for (const stream of [...watched.streams]) {
        if (!stream.open) continue;
        if (stream.owner?.kind === 'agent' && stream.owner.tokenHash !== watched.tokenHash) {
          // Read after the token changed, before the control message arrived (or it was
          // missed): ended. Unknown (revoked, not read again yet): nothing sent.
          if (watched.tokenHash !== undefined) this.endRevoked(stream, id, 'token rotated');
          continue;
        }
        stream.send(id, this.eventOf(watched, id, stream.format, watched.rows, now));
      }
    }
    for (const stream of this.streams) {
      if (stream.open && now - stream.lastPingAt >= PING_MS) stream.ping(now);
    }
  }

  /** Reads every dirty agent in one query; returns those read. A failed read is retried on the next tick. */
  private async readDirty(): Promise<Set<string>> {
    const fresh = new Set<string>();
    const dirty = [...this.agents].filter(([, watched]) => watched.dirty).map(([id]) => id);
    if (dirty.length === 0) return fresh;
    for (const id of dirty) this.agents.get(id)!.dirty = false;
    let read: MetadataOfAgents;
    try {
      read = await this.source.getMetadataOfAgents(dirty);
    } catch (err) {
      this.metrics.refetchErrorsTotal.inc();
      this.log.warn({ err, agents: dirty.length }, 'could not read watched agents; retrying next tick');
      for (const id of dirty) {
        const watched = this.agents.get(id);
        if (watched) watched.dirty = true;
      }
      return fresh;
    }
    for (const [id, rows] of read.agents) {
      const watched = this.agents.get(id);
      if (!watched) continue;
      // Sent even if a batch named the agent again while it was read (it stays
      // dirty for the next tick): under a continuous stream of batches, waiting
      // for a read with no batch in between would starve it.
      watched.rows = rows;
      watched.tokenHash = read.tokenHashes?.get(id);
      fresh.add(id);
    }
    // Gone, though no control message said so (it may have been missed).
    for (const id of read.missing) this.onDeleted(id);
    return fresh;
  }

  /** The agent's data event in this format, made once per rows and tick and shared by every stream. */
  private eventOf(watched: Watched, id: string, format: WatchFormat, rows: MetadataRow[], now: number): WatchEvent {
    if (watched.events?.rows !== rows || watched.events.tick !== this.tickCount) {
      watched.events = { rows, tick: this.tickCount, byFormat: {} };
    }
    return (watched.events.byFormat[format] ??= watchEvent(dataEvent(format, id, rows, now), this.tickCount));
  }

  private watched(agentId: string): Watched {
    let watched = this.agents.get(agentId);
    if (!watched) {
      watched = {
        streams: new Set(),
        rows: undefined,
        tokenHash: undefined,
        dirty: false,
        lastSentAt: this.clock.Date.now(),
        events: undefined,
      };
      this.agents.set(agentId, watched);
    }
    return watched;
  }

  /** The agent is gone: tell the stream, and stop watching it there. A one-agent stream ends. */
  private leave(stream: WatchStream, agentId: string): void {
    if (!stream.agents.delete(agentId)) return;
    this.unwatch(stream, agentId);
    const deleted = watchEvent(`event: deleted\ndata: ${JSON.stringify({ agent_id: agentId })}\n\n`, this.tickCount);
    if (stream.format === 'list') this.finish(stream, [[agentId, deleted]]);
    else stream.send(agentId, deleted);
  }

  /** A stream opened with a token revoked since: its last event says why, and it ends (or, not yet attached, is refused). */
  private endRevoked(stream: WatchStream, agentId: string, why: WatchRevocation): void {
    this.metrics.closedTotal.inc({ reason: REVOCATION_CLOSE_REASON[why] });
    stream.revoked = why;
    const last: [string, WatchEvent][] = [];
    const event = (type: string, data: object) =>
      watchEvent(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`, this.tickCount);
    if (why === 'agent deleted') last.push([agentId, event('deleted', { agent_id: agentId })]);
    last.push(['', event('revoked', { agent_id: agentId, reason: why })]);
    this.finish(stream, last);
  }

  /** Ends a stream after its last events; one that has not taken them within FINISH_GRACE_MS is dropped. */
  private finish(stream: WatchStream, last: [string, WatchEvent][]): void {
    for (const id of stream.agents) this.unwatch(stream, id);
    stream.agents.clear();
    // Ended already (written at once, or never attached): its place is free now.
    if (stream.finish(last)) {
      this.remove(stream);
      return;
    }
    if (!this.streams.has(stream) || this.finishing.has(stream)) return;
    this.finishing.set(
      stream,
      this.clock.setTimeout(() => {
        stream.abort();
        this.remove(stream);
      }, FINISH_GRACE_MS),
    );
  }

  private unwatch(stream: WatchStream, agentId: string): void {
    const watched = this.agents.get(agentId);
    if (!watched) return;
    watched.streams.delete(stream);
    if (watched.streams.size === 0) this.agents.delete(agentId);
  }

  /** A tick every second, on a fixed schedule; one still reading the database makes the next one a no-op. */
  private schedule(): void {
    this.timer = this.clock.setTimeout(() => {
      if (this.closed) return;
      this.schedule();
      void this.background.run('watch_tick', () => this.tick());
    }, TICK_MS);
  }
}
