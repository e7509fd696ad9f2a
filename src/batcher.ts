// The batcher: request handlers `add` updates to a bounded channel without
// ever waiting; one loop drains the channel into the batch (newest
// collected_at per agent and key wins), and flushes it with one UPDATE and
// its NOTIFY payloads when it holds `batchSize` entries or when the timer
// fires. A port of coder's metadatabatcher (seeds/002) with three promises the
// original does not make: a failed flush is kept and retried with backoff, a
// failed publish is retried, and shutdown drains the channel before the last
// flush.

import type { Logger } from 'pino';
import { Backoff, type BackoffOptions } from './backoff.js';
import { BoundedChannel } from './channel.js';
import { systemClock, type Clock } from './clock.js';
import type { BatcherMetrics, FlushReason } from './metrics.js';

/** One flush, as parallel arrays (the shape `UPDATE … FROM unnest` takes). */
export interface MetadataBatch {
  agentIds: string[];
  keys: string[];
  values: string[];
  errors: string[];
  collectedAts: Date[];
}

export interface UpdateResult {
  /** Distinct agents with at least one row written. */
  changedAgentIds: string[];
  /** Entries of the batch with no row to write (the agent never declared the key). */
  undeclared: number;
  /** Entries not written because the row already held a newer collected_at. */
  stale: number;
  /** Set when the store itself NOTIFYed the changed agents (in the UPDATE's statement): the payloads sent. */
  announced?: number;
}

/** What the batcher writes to; `MetadataStore` in production. */
export interface MetadataWriter {
  updateMetadata(batch: MetadataBatch): Promise<UpdateResult>;
}

/** What announces changed agents; `Publisher` in production. Resolves to the number of payloads sent. */
export interface Announcer {
  publish(agentIds: readonly string[]): Promise<number>;
}

export interface BatcherOptions {
  store: MetadataWriter;
  /** Announces changed agents when the store does not do it in its own statement. */
  publisher?: Announcer;
  metrics: BatcherMetrics;
  logger: Logger;
  clock?: Clock;
  /** Unique (agent, key) entries that force a flush. Default 500. */
  batchSize?: number;
  /** Timer flush period. Default 5000 ms. */
  flushIntervalMs?: number;
  /** Channel capacity = batchSize * channelMultiplier. Default 5. */
  channelMultiplier?: number;
  /** Bound on the flush at shutdown, retries included. Default 15000 ms. */
  finalFlushTimeoutMs?: number;
  /** Distinct keys held at most (batch plus channel); new keys beyond it are refused. Default 10 * batchSize. */
  maxHeldKeys?: number;
  backoff?: BackoffOptions;
}

export interface AddResult {
  accepted: number;
  /** Refused: the channel was full, or the batch held while the database fails is at its bound. */
  dropped: number;
}

/** What is still held when shutdown could not write it (for a spill file). */
export interface CloseResult {
  flushed: boolean;
  held: MetadataBatch;
}

export class BatcherClosedError extends Error {
  override name = 'BatcherClosedError';
  constructor() {
    super('the batcher is shutting down');
  }
}

interface Update {
  agentId: string;
  key: string;
  value: string;
  error: string;
  collectedAt: number;
}

interface Held {
  value: string;
  error: string;
  collectedAt: number;
}

/**
 * The loop's modes. `idle`: accumulating, the scheduled timer armed.
 * `flushing`: one UPDATE (and its NOTIFY) in flight; the channel fills.
 * `backoff`: the last UPDATE failed; the batch is kept, the channel keeps
 * merging into it, a retry timer is armed. `closed`: final flush done.
 */
const Mode = { idle: 'idle', flushing: 'flushing', backoff: 'backoff', closed: 'closed' } as const;
type Mode = (typeof Mode)[keyof typeof Mode];

// Drops are logged at warn at most once per 10 s, as the original does: under
// overload every request drops and the log would drown.
const DROP_WARN_INTERVAL_MS = 10_000;
// Agents whose NOTIFY failed are announced again with the next payloads. Past
// this many (2.2 MB of ids) the oldest hints are forgotten and counted;
// listeners resync on reconnect anyway.
const MAX_PENDING_ANNOUNCE = 100_000;
// SQLSTATE of "too many notifications in the NOTIFY queue".
const NOTIFY_QUEUE_FULL = '54000';

export class Batcher {
  readonly batchSize: number;
  readonly flushIntervalMs: number;
  readonly finalFlushTimeoutMs: number;
  readonly maxHeldKeys: number;

  private readonly store: MetadataWriter;
  private readonly publisher: Announcer | undefined;
  private readonly metrics: BatcherMetrics;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly channel: BoundedChannel<Update>;
  private readonly flushBackoff: Backoff;
  private readonly publishBackoff: Backoff;

  private mode: Mode = Mode.idle;
  // The batch, per agent then per key. Only the loop writes it.
  private batch = new Map<string, Map<string, Held>>();
  private heldCount = 0;
  private pendingAnnounce = new Set<string>();
  private retryReason: FlushReason = 'scheduled';

  private flushTimer: unknown;
  private retryTimer: unknown;
  private publishTimer: unknown;
  private drainScheduled = false;
  private inFlight: Promise<void> | undefined;
  private closing: Promise<CloseResult> | undefined;
  private lastDropWarnAt = Number.NEGATIVE_INFINITY;

  constructor(options: BatcherOptions) {
    this.store = options.store;
    this.publisher = options.publisher;
    this.metrics = options.metrics;
    this.log = options.logger;
    this.clock = options.clock ?? systemClock;
    this.batchSize = options.batchSize ?? 500;
    this.flushIntervalMs = options.flushIntervalMs ?? 5000;
    this.finalFlushTimeoutMs = options.finalFlushTimeoutMs ?? 15_000;
    this.channel = new BoundedChannel(this.batchSize * (options.channelMultiplier ?? 5));
    this.maxHeldKeys = options.maxHeldKeys ?? this.batchSize * 10;
    this.flushBackoff = new Backoff(options.backoff);
    this.publishBackoff = new Backoff(options.backoff);
    this.metrics.bind({
      channelDepth: () => this.channel.length,
      channelCapacity: () => this.channel.capacity,
      heldKeys: () => this.heldCount,
      databaseUp: () => this.databaseUp,
    });
    this.armFlushTimer();
  }

  /** Distinct (agent, key) entries in the batch. */
  get currentBatchLen(): number {
    return this.heldCount;
  }

  get channelLength(): number {
    return this.channel.length;
  }

  get channelCapacity(): number {
    return this.channel.capacity;
  }

  /** False while batch UPDATEs are failing and being retried. */
  get databaseUp(): boolean {
    return this.flushBackoff.attempts === 0;
  }

  /** Whole seconds a refused client should wait: the channel frees within a flush, the backoff within its delay. */
  get retryAfterSeconds(): number {
    return this.databaseUp ? 1 : Math.ceil(Math.max(1, Math.min(30, 2 ** this.flushBackoff.attempts / 10)));
  }

  /**
   * Queues updates for one agent. Never waits: an update that finds the
   * channel full, or that would add a new key to a batch held at
   * `maxHeldKeys`, is refused and counted. Throws on arrays of unequal length
   * (nothing is queued) and after `close()`.
   */
  add(
    agentId: string,
    keys: readonly string[],
    values: readonly string[],
    errors: readonly string[],
    collectedAts: readonly Date[],
  ): AddResult {
    if (!(keys.length === values.length && values.length === errors.length && errors.length === collectedAts.length)) {
      throw new RangeError(
        `invalid add call, all inputs must have the same number of items; keys: ${keys.length}, values: ${values.length}, errors: ${errors.length}, collectedAt: ${collectedAts.length}`,
      );
    }
    if (this.closing) throw new BatcherClosedError();
    let channelFull = 0;
    let heldLimit = 0;
    for (let i = 0; i < keys.length; i++) {
      const key = keys[i]!;
      // Every queued update may be a new key: refuse new keys once batch and
      // channel together reach the bound; keys already held still merge.
      if (this.heldCount + this.channel.length >= this.maxHeldKeys && !this.batch.get(agentId)?.has(key)) {
        heldLimit++;
        continue;
      }
      const queued = this.channel.trySend({
        agentId,
        key,
        value: values[i]!,
        error: errors[i]!,
        collectedAt: collectedAts[i]!.getTime(),
      });
      if (!queued) channelFull++;
    }
    const dropped = channelFull + heldLimit;
    if (dropped > 0) this.countDrops(agentId, channelFull, heldLimit);
    if (dropped < keys.length) this.scheduleDrain();
    return { accepted: keys.length - dropped, dropped };
  }

  /**
   * Resolves once the loop has nothing to do right now: the channel is empty
   * and no flush is in flight. Tests await it after advancing a fake clock.
   */
  async idle(): Promise<void> {
    for (;;) {
      if (this.inFlight) {
        await this.inFlight;
        continue;
      }
      if (this.drainScheduled || this.channel.length > 0) {
        await new Promise<void>((resolve) => queueMicrotask(resolve));
        continue;
      }
      return;
    }
  }

  /**
   * Stops the loop: waits for a flush in flight, drains the channel into the
   * batch, and flushes it with reason `shutdown`, retrying until
   * `finalFlushTimeoutMs`. Resolves with what could not be written (nothing,
   * normally). Idempotent: later calls return the same promise.
   */
  close(): Promise<CloseResult> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  /**
   * Gives up at once (a second signal): stops the loop and returns everything
   * held, channel included, for the spill file. A flush still in flight may
   * yet commit; replaying its entries later is harmless.
   */
  abandon(): MetadataBatch {
    this.closing ??= Promise.resolve({
      flushed: false,
      held: { agentIds: [], keys: [], values: [], errors: [], collectedAts: [] },
    });
    this.clock.clearTimeout(this.flushTimer);
    this.clock.clearTimeout(this.retryTimer);
    this.clock.clearTimeout(this.publishTimer);
    this.drainAll();
    this.mode = Mode.closed;
    return this.snapshot();
  }

  private async shutdown(): Promise<CloseResult> {
    const deadline = this.clock.Date.now() + this.finalFlushTimeoutMs;
    this.clock.clearTimeout(this.flushTimer);
    this.clock.clearTimeout(this.retryTimer);
    this.clock.clearTimeout(this.publishTimer);
    if (this.inFlight) await this.inFlight;
    this.drainAll();
    this.log.info({ count: this.heldCount }, 'flushing metadata batch before exit');
    let flushed = this.heldCount === 0 && this.pendingAnnounce.size === 0;
    while (!flushed) {
      const remaining = deadline - this.clock.Date.now();
      if (remaining <= 0) break;
      const attempt = this.flush('shutdown');
      const timedOut = await this.raceDeadline(attempt, remaining);
      if (timedOut) break;
      flushed = this.heldCount === 0 && this.pendingAnnounce.size === 0;
      if (!flushed) {
        // A failed UPDATE keeps the batch; a failed NOTIFY keeps the ids. Wait, then try again.
        const delay = Math.min(
          this.mode === Mode.backoff ? this.flushBackoff.next() : this.publishBackoff.next(),
          remaining,
        );
        await new Promise<void>((resolve) => this.clock.setTimeout(resolve, delay));
        this.drainAll();
      }
    }
    this.mode = Mode.closed;
    const held = this.snapshot();
    if (held.keys.length > 0) {
      this.log.error(
        { count: held.keys.length },
        'final flush did not reach the database before FINAL_FLUSH_TIMEOUT_MS',
      );
    }
    return { flushed: held.keys.length === 0, held };
  }

  private async raceDeadline(attempt: Promise<void>, remaining: number): Promise<boolean> {
    let timer: unknown;
    const timeout = new Promise<true>((resolve) => {
      timer = this.clock.setTimeout(() => resolve(true), remaining);
    });
    const done = attempt.then(() => false as const);
    const timedOut = await Promise.race([done, timeout]);
    this.clock.clearTimeout(timer);
    return timedOut;
  }

  private countDrops(agentId: string, channelFull: number, heldLimit: number): void {
    if (channelFull > 0) this.metrics.droppedKeysTotal.inc(channelFull);
    if (heldLimit > 0) this.metrics.heldLimitRefusedKeysTotal.inc(heldLimit);
    const fields = {
      agent_id: agentId,
      channel_size: this.channel.capacity,
      dropped_count: channelFull + heldLimit,
      reason: channelFull > 0 ? 'channel full' : 'held batch at MAX_HELD_KEYS while the database fails',
    };
    const now = this.clock.Date.now();
    if (now - this.lastDropWarnAt >= DROP_WARN_INTERVAL_MS) {
      this.lastDropWarnAt = now;
      this.log.warn(fields, 'metadata channel at capacity, dropped updates');
    } else {
      this.log.debug(fields, 'metadata channel at capacity, dropped updates');
    }
  }

  private scheduleDrain(): void {
    if (this.drainScheduled) return;
    this.drainScheduled = true;
    queueMicrotask(() => {
      this.drainScheduled = false;
      this.drain();
    });
  }

  /** The loop's body: merge queued updates; flush when the batch is full. */
  private drain(): void {
    switch (this.mode) {
      case Mode.idle:
        for (let update = this.channel.receive(); update; update = this.channel.receive()) {
          this.merge(update);
          if (this.heldCount >= this.batchSize) {
            // The rest waits in the channel until this flush is done.
            this.startFlush('capacity');
            return;
          }
        }
        return;
      case Mode.backoff:
        // Keep merging into the kept batch so the channel never fills while
        // the database is down: memory grows with distinct keys, not reports.
        this.drainAll();
        return;
      case Mode.flushing:
      case Mode.closed:
        return;
      default:
        return assertNever(this.mode);
    }
  }

  private drainAll(): void {
    for (let update = this.channel.receive(); update; update = this.channel.receive()) this.merge(update);
  }

  private merge(update: Update): void {
    let keys = this.batch.get(update.agentId);
    if (!keys) {
      keys = new Map();
      this.batch.set(update.agentId, keys);
    }
    const existing = keys.get(update.key);
    if (existing) {
      // Newest collected_at wins; on a tie the later arrival wins.
      if (update.collectedAt < existing.collectedAt) return;
      existing.value = update.value;
      existing.error = update.error;
      existing.collectedAt = update.collectedAt;
      return;
    }
    keys.set(update.key, { value: update.value, error: update.error, collectedAt: update.collectedAt });
    this.heldCount++;
  }

  private armFlushTimer(): void {
    this.clock.clearTimeout(this.flushTimer);
    this.flushTimer = this.clock.setTimeout(() => this.onFlushTimer(), this.flushIntervalMs);
  }

  private onFlushTimer(): void {
    if (this.closing || this.mode !== Mode.idle) return;
    if (this.heldCount === 0 && this.pendingAnnounce.size === 0) {
      // An empty tick does nothing but re-arm.
      this.armFlushTimer();
      return;
    }
    this.startFlush('scheduled');
  }

  private startFlush(reason: FlushReason): void {
    this.clock.clearTimeout(this.flushTimer);
    this.clock.clearTimeout(this.retryTimer);
    const attempt = this.flush(reason).catch((err: unknown) => {
      // flush() handles its own failures; this is a bug's last line of defence.
      this.log.error({ err, reason }, 'unexpected error in the flush; the batch is kept');
      this.mode = Mode.backoff;
    });
    this.inFlight = attempt.then(() => {
      this.inFlight = undefined;
      if (this.closing) return;
      if (this.mode === Mode.backoff) {
        this.retryReason = reason;
        this.retryTimer = this.clock.setTimeout(() => this.onRetryTimer(), this.flushBackoff.next());
      } else {
        this.armFlushTimer();
      }
      this.armPublishRetry();
      this.drain();
    });
  }

  private onRetryTimer(): void {
    if (this.closing || this.mode !== Mode.backoff) return;
    this.drainAll();
    this.startFlush(this.retryReason);
  }

  /** One attempt: UPDATE, then NOTIFY. Never throws; leaves mode `idle` on success, `backoff` on a failed UPDATE. */
  private async flush(reason: FlushReason): Promise<void> {
    this.mode = Mode.flushing;
    const count = this.heldCount;
    const start = this.clock.Date.now();
    let changed: string[] = [];
    if (count > 0) {
      const batch = this.snapshot();
      this.log.debug({ reason, count }, 'flushing metadata batch');
      let result: UpdateResult;
      try {
        result = await this.store.updateMetadata(batch);
      } catch (err) {
        this.metrics.flushErrorsTotal.inc();
        // The NOTIFY queue is full: a publish failure too (the statement rolled back and is retried).
        if ((err as { code?: string }).code === NOTIFY_QUEUE_FULL) this.metrics.publishErrorsTotal.inc();
        if (this.databaseUp) {
          this.log.error({ err, reason, count }, 'metadata UPDATE failed; keeping the batch and retrying with backoff');
        } else {
          this.log.debug({ err, reason, count, attempt: this.flushBackoff.attempts }, 'metadata UPDATE retry failed');
        }
        this.mode = Mode.backoff;
        return;
      }
      if (!this.databaseUp) {
        this.log.info(
          { attempts: this.flushBackoff.attempts, count },
          'metadata UPDATE succeeded again; database recovered',
        );
        this.flushBackoff.reset();
      }
      // Written: the batch can go. Nothing merged into it meanwhile (the loop
      // does not drain while a flush is in flight).
      this.batch = new Map();
      this.heldCount = 0;
      if (result.undeclared > 0) this.metrics.undeclaredKeysTotal.inc(result.undeclared);
      if (result.stale > 0) this.metrics.staleKeysTotal.inc(result.stale);
      if (result.announced === undefined) changed = result.changedAgentIds;
      else this.metrics.notifyPayloadsTotal.inc(result.announced);
    }
    this.mode = Mode.idle;
    await this.announce(changed, count);
    if (count > 0) {
      this.metrics.batchSize.observe(count);
      this.metrics.flushedTotal.inc(count);
      this.metrics.batchesTotal.inc({ reason });
      const elapsed = (this.clock.Date.now() - start) / 1000;
      this.metrics.flushDuration.observe({ reason }, elapsed);
      this.log.debug({ count, elapsed, reason }, 'flush complete');
    }
  }

  /** Flattens the batch into the UPDATE's arrays, and records per-agent utilization. */
  private snapshot(): MetadataBatch {
    const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAts: [] };
    for (const [agentId, keys] of this.batch) {
      if (this.mode === Mode.flushing) this.metrics.batchUtilization.observe(keys.size);
      for (const [key, held] of keys) {
        batch.agentIds.push(agentId);
        batch.keys.push(key);
        batch.values.push(held.value);
        batch.errors.push(held.error);
        batch.collectedAts.push(new Date(held.collectedAt));
      }
    }
    return batch;
  }

  /** NOTIFY the changed agents plus any whose earlier NOTIFY failed. A failure is counted and retried later. */
  private async announce(changed: readonly string[], count: number): Promise<void> {
    let ids: readonly string[] = changed;
    if (this.pendingAnnounce.size > 0) {
      for (const id of changed) this.pendingAnnounce.add(id);
      ids = [...this.pendingAnnounce];
      this.pendingAnnounce.clear();
    }
    if (ids.length === 0 || !this.publisher) return;
    try {
      const payloads = await this.publisher.publish(ids);
      this.metrics.notifyPayloadsTotal.inc(payloads);
      this.publishBackoff.reset();
    } catch (err) {
      this.metrics.publishErrorsTotal.inc();
      this.log.error(
        { err, agents: ids.length, count },
        'failed to publish workspace agent metadata batch; will retry',
      );
      for (const id of ids) {
        if (this.pendingAnnounce.size >= MAX_PENDING_ANNOUNCE) {
          this.log.warn(
            { limit: MAX_PENDING_ANNOUNCE },
            'too many agents waiting for a NOTIFY retry; forgetting the rest',
          );
          break;
        }
        this.pendingAnnounce.add(id);
      }
    }
  }

  /** After a failed NOTIFY, retry on its own backoff even if no flush comes to carry it. */
  private armPublishRetry(): void {
    if (this.pendingAnnounce.size === 0 || this.publishTimer !== undefined) return;
    this.publishTimer = this.clock.setTimeout(() => {
      this.publishTimer = undefined;
      if (this.closing) return;
      if (this.mode === Mode.idle) {
        this.startFlush('scheduled');
      } else {
        this.armPublishRetry();
      }
    }, this.publishBackoff.next());
  }
}

function assertNever(value: never): never {
  throw new Error(`unexpected mode ${String(value)}`);
}
