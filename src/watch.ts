// Live watchers of agents' metadata (SSE), fed by the one shared LISTEN
// connection. The original's semantics (coder's watch-metadata endpoint):
// the full list at once, again when a batch names the agent (at most once a
// second), at least every 5 s so `age` stays true, and a keep-alive ping
// every 15 s on its own schedule. One read serves every watcher of an agent,
// and agents nobody watches are never read. Each watcher buffers at most one
// event: a slow client gets the newest state, older ones are dropped and
// counted (a drop-oldest fan-out with a bound of one).

import type { Logger } from 'pino';
import { systemClock, type Clock } from './clock.js';
import type { WatchMetrics } from './metrics.js';
import type { MetadataRow } from './store.js';

export interface WatchSource {
  getMetadataOfAgents(agentIds: readonly string[]): Promise<Map<string, MetadataRow[]>>;
}

/** Where a watcher's events go: an HTTP response in production. */
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
  /** Seconds since collected_at. */
  age: number;
}

// The original's intervals: a send tick of 1 s (the debounce), a forced
// resend every 5 s (keeps `age` true), a heartbeat every 15 s.
const TICK_MS = 1000;
const RESEND_MS = 5000;
const PING_MS = 15_000;

export class Watcher {
  sink: WatchSink | undefined;
  /** When the list was last sent (the resend for `age` is due 5 s later). */
  lastSentAt = 0;
  /** When the last ping was due: the keep-alive runs on its own 15 s schedule, whatever else is sent. */
  lastPingAt = 0;
  private blocked = false;
  private pending: string | undefined;

  constructor(
    readonly agentId: string,
    private readonly metrics: WatchMetrics,
  ) {}

  /** Writes now, or keeps it as the one pending event while the client is slow. */
  send(chunk: string, now: number, isData: boolean): void {
    if (!this.sink) return;
    if (isData) this.lastSentAt = now;
    else this.lastPingAt = now;
    // A client that is not keeping up has bytes waiting already: no ping, and never one in place of data.
    if (this.blocked && !isData) return;
    if (this.blocked) {
      if (this.pending !== undefined) this.metrics.eventsDroppedTotal.inc();
      this.pending = chunk;
      return;
    }
    this.write(chunk);
  }

  private write(chunk: string): void {
    const sink = this.sink!;
    this.metrics.eventsSentTotal.inc();
    if (sink.write(chunk)) return;
    this.blocked = true;
    sink.onceDrained(() => {
      this.blocked = false;
      const next = this.pending;
      this.pending = undefined;
      if (next !== undefined && this.sink) this.write(next);
    });
  }
}

interface Watched {
  watchers: Set<Watcher>;
  rows: MetadataRow[] | undefined;
  /** A batch named the agent since its rows were read. */
  dirty: boolean;
}

export class WatchHub {
  private readonly source: WatchSource;
  private readonly metrics: WatchMetrics;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly agents = new Map<string, Watched>();
  private timer: unknown;
  private ticking = false;
  private closed = false;

  constructor(options: WatchHubOptions) {
    this.source = options.source;
    this.metrics = options.metrics;
    this.log = options.logger;
    this.clock = options.clock ?? systemClock;
    this.schedule();
  }

  get watcherCount(): number {
    let count = 0;
    for (const watched of this.agents.values()) count += watched.watchers.size;
    return count;
  }

  /** Registers a watcher before its first read, so no batch between the two is missed. */
  add(agentId: string): Watcher {
    let watched = this.agents.get(agentId);
    if (!watched) {
      watched = { watchers: new Set(), rows: undefined, dirty: false };
      this.agents.set(agentId, watched);
    }
    const watcher = new Watcher(agentId, this.metrics);
    watched.watchers.add(watcher);
    this.metrics.watchers.inc();
    return watcher;
  }

  /**
   * The agent's rows as last read for its watchers, when no batch has named
   * it since: a new watcher of an agent already watched needs no query.
   */
  cachedRows(agentId: string): MetadataRow[] | undefined {
    const watched = this.agents.get(agentId);
    return watched && !watched.dirty ? watched.rows : undefined;
  }

  /** Connects the watcher to its client and sends the list read for it. */
  attach(watcher: Watcher, sink: WatchSink, rows: MetadataRow[]): void {
    if (this.closed) {
      sink.end();
      return;
    }
    watcher.sink = sink;
    watcher.lastPingAt = this.clock.Date.now();
    const watched = this.agents.get(watcher.agentId);
    if (watched && !watched.dirty) watched.rows = rows;
    watcher.send(dataEvent(rows, this.clock.Date.now()), this.clock.Date.now(), true);
  }

  /** Forgets a watcher at once (its client went away). */
  remove(watcher: Watcher): void {
    const watched = this.agents.get(watcher.agentId);
    if (!watched?.watchers.delete(watcher)) return;
    watcher.sink = undefined;
    this.metrics.watchers.dec();
    if (watched.watchers.size === 0) this.agents.delete(watcher.agentId);
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

  /** Ends every stream (shutdown). */
  close(): void {
    this.closed = true;
    this.clock.clearTimeout(this.timer);
    for (const watched of this.agents.values()) {
      for (const watcher of watched.watchers) {
        watcher.sink?.end();
        this.remove(watcher);
      }
    }
  }

  /** One tick: read dirty agents in one query, send, resend stale lists, ping. Resolves when done. */
  async tick(): Promise<void> {
    if (this.ticking || this.closed) return;
    this.ticking = true;
    try {
      const dirty = [...this.agents].filter(([, watched]) => watched.dirty).map(([id]) => id);
      const fresh = new Set<string>();
      if (dirty.length > 0) {
        for (const id of dirty) this.agents.get(id)!.dirty = false;
        try {
          const rows = await this.source.getMetadataOfAgents(dirty);
          for (const [id, list] of rows) {
            const watched = this.agents.get(id);
            if (!watched) continue;
            watched.rows = list;
            fresh.add(id);
          }
        } catch (err) {
          this.metrics.refetchErrorsTotal.inc();
          this.log.warn({ err, agents: dirty.length }, 'could not read watched agents; retrying next tick');
          for (const id of dirty) {
            const watched = this.agents.get(id);
            if (watched) watched.dirty = true;
          }
        }
      }
      const now = this.clock.Date.now();
      for (const [id, watched] of this.agents) {
        let event: string | undefined;
        for (const watcher of watched.watchers) {
          if (!watcher.sink) continue;
          if (watched.rows && (fresh.has(id) || now - watcher.lastSentAt >= RESEND_MS)) {
            event ??= dataEvent(watched.rows, now);
            watcher.send(event, now, true);
          }
          if (now - watcher.lastPingAt >= PING_MS) watcher.send(': ping\n\n', now, false);
        }
      }
    } finally {
      this.ticking = false;
    }
  }

  /** A tick every second; one still reading the database makes the next one a no-op. */
  private schedule(): void {
    this.timer = this.clock.setTimeout(() => {
      if (this.closed) return;
      this.schedule();
      void this.tick();
    }, TICK_MS);
  }
}

export function toView(row: MetadataRow, now: number): MetadataView {
  const collected = row.collected_at.getTime();
  return {
    key: row.key,
    display_name: row.display_name,
    display_order: row.display_order,
    interval: row.interval,
    timeout: row.timeout,
    value: row.value,
    error: row.error,
    collected_at: row.collected_at.toISOString(),
    age: Math.max(0, Math.floor((now - collected) / 1000)),
  };
}

function dataEvent(rows: readonly MetadataRow[], now: number): string {
  return `event: data\ndata: ${JSON.stringify(rows.map((row) => toView(row, now)))}\n\n`;
}
