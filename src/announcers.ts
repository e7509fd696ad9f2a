// The sinks that announce changed agents after a flush's UPDATE has committed.
// The store's NOTIFY comes first, in the flush's own statement (store.ts):
// atomic with the UPDATE, and what the service wires. These run after it: a
// `Publisher` (publisher.ts, library use, when the store does not NOTIFY),
// and tomorrow Redis, NATS or a webhook. Each sink has its own agents
// awaiting a retry, its own backoff and its own error counts (the `sink`
// label), so one failing sink never fails the flush, the NOTIFY or another
// sink: its agents wait, and go out with its next try.
//
// The batcher awaits `announce()` in its `announcing` mode (batcher.ts): a
// flush is in flight until its announcement is done.

import type { Logger } from 'pino';
import { Backoff, type BackoffOptions } from './backoff.js';
import type { Counter } from 'prom-client';

/** What announces changed agents after the flush's statement; `Publisher` is one. */
export interface Announcer {
  /** The sink's name: its `sink` label in the metrics and its field in the logs. Unique per batcher. */
  readonly sink: string;
  /** Announces these agents; resolves to the messages sent (NOTIFY payloads for the `notify` sink). */
  publish(agentIds: readonly string[]): Promise<number>;
}

/**
 * The `sink` of NOTIFY on the batch channel, whether the store's statement
 * or a Publisher sends it: its payloads are counted in
 * `metabatch_metadata_notify_payloads_total`.
 */
export const NOTIFY_SINK = 'notify';

// Agents whose announcement failed wait, per sink, to be announced again.
// Past this many (2.2 MB of ids) the oldest are given up and counted;
// listeners resync on reconnect anyway.
export const MAX_PENDING_ANNOUNCE = 100_000;

/** The counters of announcing (`BatcherMetrics` has them, metrics.ts). */
export interface AnnouncerMetrics {
  publishErrorsTotal: Counter<'sink'>;
  notifyPayloadsTotal: Counter;
  announceDroppedAgentsTotal: Counter<'sink'>;
}

export interface AnnouncersOptions {
  metrics: AnnouncerMetrics;
  logger: Logger;
  /** The retry schedule of each sink (backoff.ts). */
  backoff?: BackoffOptions;
}

/** One sink: the agents it still owes an announcement, and its backoff. */
class Sink {
  readonly pending = new Set<string>();
  readonly backoff: Backoff;

  constructor(
    readonly announcer: Announcer,
    backoff: BackoffOptions | undefined,
  ) {
    this.backoff = new Backoff(backoff);
  }
}

export class Announcers {
  private readonly sinks: readonly Sink[];
  private readonly metrics: AnnouncerMetrics;
  private readonly log: Logger;

  constructor(announcers: readonly Announcer[], options: AnnouncersOptions) {
    const names = announcers.map((a) => a.sink);
    const repeated = names.find((name, i) => names.indexOf(name) !== i);
    if (repeated !== undefined) throw new RangeError(`two announcers share the sink name ${JSON.stringify(repeated)}`);
    this.sinks = announcers.map((announcer) => new Sink(announcer, options.backoff));
    this.metrics = options.metrics;
    this.log = options.logger;
    // Each sink's series exist from the start, at 0, as the unlabelled counters did.
    for (const sink of names) {
      this.metrics.publishErrorsTotal.inc({ sink }, 0);
      this.metrics.announceDroppedAgentsTotal.inc({ sink }, 0);
    }
  }

  /** The number of sinks. */
  get size(): number {
    return this.sinks.length;
  }

  /** Agents awaiting a retry, over all sinks (an agent owed by two sinks counts twice). */
  get waiting(): number {
    let agents = 0;
    for (const sink of this.sinks) agents += sink.pending.size;
    return agents;
  }

  /** Whether a flush that changed these agents has anything to announce here. */
  hasWork(changed: readonly string[]): boolean {
    return this.sinks.length > 0 && (changed.length > 0 || this.waiting > 0);
  }

  /**
   * The wait before the next retry, the soonest of the sinks that owe one
   * (each such sink's backoff counts it as an attempt), or undefined when
   * none does.
   */
  retryDelay(): number | undefined {
    let delay: number | undefined;
    for (const sink of this.sinks) {
      if (sink.pending.size === 0) continue;
      const next = sink.backoff.next();
      delay = delay === undefined ? next : Math.min(delay, next);
    }
    return delay;
  }

  /** Announces the changed agents, and those owed from before, on every sink at once. Never throws. */
  async announce(changed: readonly string[], count: number): Promise<void> {
    await Promise.all(this.sinks.map((sink) => this.announceOn(sink, changed, count)));
  }

  /** One sink: the changed agents plus those it owes. A failure is counted and kept for a retry. */
  private async announceOn(sink: Sink, changed: readonly string[], count: number): Promise<void> {
    for (const id of changed) sink.pending.add(id);
    if (sink.pending.size === 0) return;
    const ids = [...sink.pending];
    sink.pending.clear();
    const name = sink.announcer.sink;
    try {
      const sent = await sink.announcer.publish(ids);
      if (name === NOTIFY_SINK) this.metrics.notifyPayloadsTotal.inc(sent);
      sink.backoff.reset();
    } catch (err) {
      this.metrics.publishErrorsTotal.inc({ sink: name });
      this.log.error(
        { err, sink: name, agents: ids.length, count },
        'failed to publish workspace agent metadata batch; will retry',
      );
      // The newest stay: an agent given up was announced longest ago.
      const kept = ids.slice(-MAX_PENDING_ANNOUNCE);
      for (const id of kept) sink.pending.add(id);
      const given = ids.length - kept.length;
      if (given > 0) {
        this.metrics.announceDroppedAgentsTotal.inc({ sink: name }, given);
        this.log.warn(
          { sink: name, given, limit: MAX_PENDING_ANNOUNCE },
          'too many agents waiting for an announcement retry; gave up the oldest',
        );
      }
    }
  }
}
