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
// nobody watches are never read. A slow client holds at most the newest
// event per agent it watches (older ones are dropped and counted), so its
// buffer is bounded by what it watches, never by time.
//
// Longer than our other files: the hub (subscriptions, the tick's one read,
// resync) and the per-stream state it writes into share their bookkeeping,
// and split apart each would need the other's internals.

import type { Logger } from 'pino';
import { uncounted, type BackgroundRunner } from './background.js';
import { systemClock, type Clock } from './clock.js';
import type { WatchMetrics } from './metrics.js';
import type { MetadataOfAgents, MetadataRow } from './store.js';

export interface WatchSource {
  getMetadataOfAgents(agentIds: readonly string[]): Promise<MetadataOfAgents>;
}

/** Where a stream's events go: an HTTP response in production. */
export interface WatchSink {
  /** Returns false when the client is not keeping up (the chunk is still buffered). */
  write(chunk: string): boolean;
  /** Called once when the buffered chunks have been taken. */
  onceDrained(callback: () => void): void;
  end(): void;
}

export interface WatchHubOptions {
  source: WatchSource;
  metrics: WatchMetrics;
  logger: Logger;
  clock?: Clock;
  /** Counts each tick as the background process `watch_tick` (background.ts). Default: not counted. */
  background?: BackgroundRunner;
}

/** One row as clients see it. */
export interface MetadataView {
  key: string;
  display_name: string;
  display_order: number;
  interval: number;
  timeout: number;
  value: string;
  error: string;
  collected_at: string;
  /** Whole seconds since collected_at. */
  age: number;
  /** Older than its interval allows: `interval > 0 && age > max(interval + 2 × timeout, 5)`. */
  stale: boolean;
  /** Present (true) when the key was never reported. */
  pending?: true;
  /** Only when asked for (bulk read with include_script). */
  script?: string;
}

/**
 * How a stream's data events look: `list`, the agent's list alone (the
 * one-agent watch); `agent`, `{"agent_id","metadata"}` (the many-agent watch).
 */
export type WatchFormat = 'list' | 'agent';

// Coder's intervals: a send tick of 1 s, a forced resend every 5 s (keeps
// `age` true), a heartbeat every 15 s.
const TICK_MS = 1000;
const RESEND_MS = 5000;
const PING_MS = 15_000;
// The original's "never reported": collected_at in the year 1.
const NEVER_REPORTED_BEFORE = Date.parse('1000-01-01T00:00:00Z');

/** One SSE connection, watching some agents (or every agent). */
export class WatchStream {
  readonly agents = new Set<string>();
  lastPingAt = 0;
  private sink: WatchSink | undefined;
  private blocked = false;
  /** While the client is slow: the newest event per agent, in arrival order. */
  private readonly outbox = new Map<string, string>();

  constructor(
    readonly format: WatchFormat,
    /** Every agent, those created later included. */
    readonly all: boolean,
    private readonly metrics: WatchMetrics,
  ) {}

  get open(): boolean {
    return this.sink !== undefined;
  }

  connect(sink: WatchSink, now: number): void {
    this.sink = sink;
    this.lastPingAt = now;
  }

  /** Sends an agent's event now, or keeps it as that agent's one pending event while the client is slow. */
  send(agentId: string, chunk: string): void {
    if (!this.sink) return;
    if (this.blocked) {
      if (this.outbox.has(agentId)) {
        this.outbox.delete(agentId);
        this.metrics.eventsDroppedTotal.inc();
      }
      this.outbox.set(agentId, chunk);
      return;
    }
    this.write(chunk);
  }

  /** A keep-alive; skipped while the client is slow (bytes are waiting for it anyway). */
  ping(now: number): void {
    this.lastPingAt = now;
    if (this.sink && !this.blocked) this.write(': ping\n\n');
  }

  end(): void {
    const sink = this.sink;
    this.sink = undefined;
    this.outbox.clear();
    sink?.end();
  }

  /** Forgets the client without ending it (it went away). */
  detach(): void {
    this.sink = undefined;
    this.outbox.clear();
  }

  private write(chunk: string): void {
    const sink = this.sink!;
    this.metrics.eventsSentTotal.inc();
    if (sink.write(chunk)) return;
    this.blocked = true;
    sink.onceDrained(() => this.drain());
  }

  private drain(): void {
    this.blocked = false;
    for (const [agentId, chunk] of this.outbox) {
      this.outbox.delete(agentId);
      if (!this.sink) return;
      this.write(chunk);
      if (this.blocked) return;
    }
  }
}

interface Watched {
  streams: Set<WatchStream>;
  rows: MetadataRow[] | undefined;
  /** A batch named the agent (or the listener reconnected) since its rows were read. */
  dirty: boolean;
  /** When its data was last sent to all its streams. */
  lastSentAt: number;
}

export class WatchHub {
  private readonly source: WatchSource;
  private readonly metrics: WatchMetrics;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly background: BackgroundRunner;
  private readonly agents = new Map<string, Watched>();
  private readonly streams = new Set<WatchStream>();
  private timer: unknown;
  private ticking = false;
  private closed = false;

  constructor(options: WatchHubOptions) {
    this.source = options.source;
    this.metrics = options.metrics;
    this.log = options.logger;
    this.clock = options.clock ?? systemClock;
    this.background = options.background ?? uncounted;
    this.metrics.bind({ streams: () => this.streams.size, agents: () => this.agents.size });
    this.schedule();
  }

  get streamCount(): number {
    return this.streams.size;
  }

  /**
   * Registers a stream before its first read, so that no batch between the
   * two is missed. For `all`, agents created from now on join it too.
   */
  open(agentIds: readonly string[], options: { format: WatchFormat; all?: boolean }): WatchStream {
    const stream = new WatchStream(options.format, options.all ?? false, this.metrics);
    this.streams.add(stream);
    this.addAgents(stream, agentIds);
    return stream;
  }

  /** Adds agents to a stream (its initial ones, or every agent for an `all` stream). */
  addAgents(stream: WatchStream, agentIds: readonly string[]): void {
    for (const id of agentIds) {
      if (stream.agents.has(id)) continue;
      stream.agents.add(id);
      this.watched(id).streams.add(stream);
    }
  }

  /**
   * The rows last read of these agents, for those no batch has named since:
   * the agents a new stream needs no query for. The others (`unread`) must be
   * read by the caller.
   */
  cached(agentIds: readonly string[]): { rows: Map<string, MetadataRow[]>; unread: string[] } {
    const rows = new Map<string, MetadataRow[]>();
    const unread: string[] = [];
    for (const id of agentIds) {
      const watched = this.agents.get(id);
      if (watched?.rows && !watched.dirty) rows.set(id, watched.rows);
      else unread.push(id);
    }
    return { rows, unread };
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
      if (!watched.dirty) watched.rows = rows;
      stream.send(id, dataEvent(stream.format, id, rows, now));
    }
  }

  /** Forgets a stream at once (its client went away). */
  remove(stream: WatchStream): void {
    if (!this.streams.delete(stream)) return;
    stream.detach();
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
    const watched = this.agents.get(agentId);
    if (!watched) return;
    for (const stream of [...watched.streams]) this.leave(stream, agentId);
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
    for (const [id, watched] of this.agents) {
      if (!watched.rows || !(fresh.has(id) || now - watched.lastSentAt >= RESEND_MS)) continue;
      watched.lastSentAt = now;
      const events: Partial<Record<WatchFormat, string>> = {};
      for (const stream of watched.streams) {
        if (!stream.open) continue;
        const event = (events[stream.format] ??= dataEvent(stream.format, id, watched.rows, now));
        stream.send(id, event);
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
      fresh.add(id);
    }
    // Gone, though no control message said so (it may have been missed).
    for (const id of read.missing) this.onDeleted(id);
    return fresh;
  }

  private watched(agentId: string): Watched {
    let watched = this.agents.get(agentId);
    if (!watched) {
      watched = { streams: new Set(), rows: undefined, dirty: false, lastSentAt: this.clock.Date.now() };
      this.agents.set(agentId, watched);
    }
    return watched;
  }

  /** The agent is gone: tell the stream, and stop watching it there. A one-agent stream ends. */
  private leave(stream: WatchStream, agentId: string): void {
    if (!stream.agents.delete(agentId)) return;
    this.unwatch(stream, agentId);
    stream.send(agentId, `event: deleted\ndata: ${JSON.stringify({ agent_id: agentId })}\n\n`);
    if (stream.format === 'list') {
      stream.end();
      this.remove(stream);
    }
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

/** A row as clients see it, at `now`. */
export function toView(row: MetadataRow, now: number, options: { includeScript?: boolean } = {}): MetadataView {
  const collected = row.collected_at.getTime();
  const age = Math.max(0, Math.floor((now - collected) / 1000));
  const pending = collected < NEVER_REPORTED_BEFORE;
  const view: MetadataView = {
    key: row.key,
    display_name: row.display_name,
    display_order: row.display_order,
    interval: row.interval,
    timeout: row.timeout,
    value: row.value,
    error: row.error,
    collected_at: row.collected_at.toISOString(),
    age,
    stale: !pending && isStale(row.interval, row.timeout, age),
  };
  if (pending) view.pending = true;
  if (options.includeScript) view.script = row.script;
  return view;
}

/** Coder's UI rule, in seconds: a value is stale once older than its interval, twice its timeout, and 5 s. */
export function isStale(interval: number, timeout: number, age: number): boolean {
  return interval > 0 && age > Math.max(interval + 2 * timeout, 5);
}

function dataEvent(format: WatchFormat, agentId: string, rows: readonly MetadataRow[], now: number): string {
  const metadata = rows.map((row) => toView(row, now));
  const data = format === 'list' ? metadata : { agent_id: agentId, metadata };
  return `event: data\ndata: ${JSON.stringify(data)}\n\n`;
}
