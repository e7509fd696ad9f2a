// The batcher: request handlers `add` updates to a bounded channel without
// ever waiting; one loop drains the channel into the batch and flushes it
// with one UPDATE (and its NOTIFY payloads) when it holds `batchSize`
// entries, when the timer fires, or at shutdown. A port of coder's Go
// metadatabatcher with three promises the original does not make: a failed
// flush is kept and retried with backoff, a failed NOTIFY is retried, and
// shutdown drains the channel before the last flush.
//
// The loop is one state machine (`Mode`, changed only by `to()`), with at
// most one flush in flight: a flush is in flight from its UPDATE until its
// announcement is done, and nothing merges into the batch meanwhile.
//
// Every mode, every transition and what each means live here together, so
// that the loop can be checked in one read. The batch itself is in batch.ts,
// the retry schedule in backoff.ts, the sinks after the store's NOTIFY and
// their retries in announcers.ts.

import type { Logger } from 'pino';
import { Announcers, NOTIFY_SINK, type Announcer } from './announcers.js';
import { Backoff, type BackoffOptions } from './backoff.js';
import { uncounted, type BackgroundRunner } from './background.js';
import { emptyBatch, PendingBatch, type MetadataBatch, type Update } from './batch.js';
import { BoundedChannel } from './channel.js';
import { inSlices } from './slices.js';
import { systemClock, type Clock } from './clock.js';
import { DEFAULTS } from './config.js';
import { dateToMicros } from './timestamps.js';
import type { BatcherMetrics, FlushReason } from './metrics.js';

export type { MetadataBatch } from './batch.js';
export type { Announcer } from './announcers.js';

export interface UpdateResult {
  /**
   * Distinct agents with at least one row written, also when `announced` is
   * set: the sinks after the NOTIFY get them. A store may work them out when
   * first read.
   */
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

export interface BatcherOptions {
  store: MetadataWriter;
  /**
   * Sinks that announce the changed agents after the store's statement (and
   * its NOTIFY, when the store sends one), each with its own retry and its
   * own error count (announcers.ts): a `Publisher` when the store does not
   * NOTIFY, Redis or a webhook beside it. Default none: the store's NOTIFY.
   */
  announcers?: readonly Announcer[];
  metrics: BatcherMetrics;
  logger: Logger;
  clock?: Clock;
  /** Unique (agent, key) entries that force a flush. Default `DEFAULTS.batchSize`. */
  batchSize?: number;
  /** Timer flush period. Default `DEFAULTS.flushIntervalMs`. */
  flushIntervalMs?: number;
  /**
   * The period varies by ± this fraction, and the first tick comes at a
   * random point of the first period. Default `DEFAULTS.flushJitter`; 0 is
   * the original's fixed schedule.
   */
  flushJitter?: number;
  /** Randomness in [0, 1) for the jitter; injectable for tests. Default Math.random. */
  random?: () => number;
  /** Counts each flush as the background process `metadata_flush` (background.ts). Default: not counted. */
  background?: BackgroundRunner;
  /** Channel capacity = batchSize * channelMultiplier. Default `DEFAULTS.channelMultiplier`. */
  channelMultiplier?: number;
  /** Bound on the flush at shutdown, retries included. Default `DEFAULTS.finalFlushTimeoutMs`. */
  finalFlushTimeoutMs?: number;
  /** Distinct keys held at most while flushes fail; new keys beyond it are refused. Default `DEFAULTS.heldKeysPerBatch` × batchSize. */
  maxHeldKeys?: number;
  /**
   * Each agent's declared keys (src/declaredKeys.ts): while flushes fail, a
   * key not among them is refused rather than held (an agent whose keys are
   * not known holds a small share), so no agent holds more than its share.
   * Default: none, every key may be held.
   */
  declaredKeys?: {
    keysOf(agentId: string): ReadonlySet<string> | undefined;
    /** For an agent whose keys are not known: whether it may hold this key (its share). */
    admitUnread(agentId: string, key: string): boolean;
  };
  backoff?: BackoffOptions;
}

export interface AddResult {
  accepted: number;
  /** Refused: the channel was full, or, while flushes fail, MAX_HELD_KEYS were held or the key is not declared. */
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

/**
 * The loop's modes, changed only by `to()`.
 * - `idle`: merging reports into the batch; the flush timer is armed.
 * - `flushing`: the UPDATE is in flight; reports wait in the channel.
 * - `announcing`: the UPDATE committed (with the store's NOTIFY, if it sends
 *   one) and the batch is gone; the announcers (a Publisher's NOTIFY, other
 *   sinks) are in flight; reports still wait in the channel.
 * - `backoff`: the last UPDATE failed; the batch is kept and merged into; the
 *   retry timer is armed.
 * - `closed`: stopped; nothing more is written.
 */
const Mode = {
  idle: 'idle',
  flushing: 'flushing',
  announcing: 'announcing',
  backoff: 'backoff',
  closed: 'closed',
} as const;
type Mode = (typeof Mode)[keyof typeof Mode];

/** A close() under way: the final flush's deadline and its caller's promise. */
interface Closing {
  deadline: number;
  deadlineTimer: unknown;
  result: Promise<CloseResult>;
  resolve(result: CloseResult): void;
}

// Drops are logged at warn at most once per 10 s, as the original does: under
// overload every request drops and the log would drown.
const DROP_WARN_INTERVAL_MS = 10_000;
// SQLSTATE of "too many notifications in the NOTIFY queue".
const NOTIFY_QUEUE_FULL = '54000';

export class Batcher {
  readonly batchSize: number;
  readonly flushIntervalMs: number;
  readonly flushJitter: number;
  readonly finalFlushTimeoutMs: number;
  readonly maxHeldKeys: number;

  private readonly store: MetadataWriter;
  private readonly declaredKeys: BatcherOptions['declaredKeys'];
  private readonly announcers: Announcers;
  private readonly metrics: BatcherMetrics;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly channel: BoundedChannel<Update>;
  private readonly batch = new PendingBatch();
  private readonly flushBackoff: Backoff;
  private readonly random: () => number;
  private readonly background: BackgroundRunner;
  /** No flush period has been armed yet: the first starts at a random point (with jitter). */
  private firstPeriod = true;

  private mode: Mode = Mode.idle;
  /** The flush in flight (flushing, then announcing), until it has left those modes. */
  private cycle: Promise<void> | undefined;
  /** The reason of the flush a retry repeats. */
  private retryReason: FlushReason = 'scheduled';
  /** The flush timer in `idle`, the retry timer in `backoff`. */
  private timer: unknown;
  private drainScheduled = false;
  private closing: Closing | undefined;
  private lastDropWarnAt = Number.NEGATIVE_INFINITY;

  constructor(options: BatcherOptions) {
    this.store = options.store;
    this.declaredKeys = options.declaredKeys;
    this.metrics = options.metrics;
    this.log = options.logger;
    this.announcers = new Announcers(options.announcers ?? [], {
      metrics: this.metrics,
      logger: this.log,
      ...(options.backoff ? { backoff: options.backoff } : {}),
    });
    this.clock = options.clock ?? systemClock;
    this.batchSize = options.batchSize ?? DEFAULTS.batchSize;
    this.flushIntervalMs = options.flushIntervalMs ?? DEFAULTS.flushIntervalMs;
    this.flushJitter = options.flushJitter ?? DEFAULTS.flushJitter;
    this.random = options.random ?? Math.random;
    this.background = options.background ?? uncounted;
    this.finalFlushTimeoutMs = options.finalFlushTimeoutMs ?? DEFAULTS.finalFlushTimeoutMs;
    this.channel = new BoundedChannel(this.batchSize * (options.channelMultiplier ?? DEFAULTS.channelMultiplier));
    this.maxHeldKeys = options.maxHeldKeys ?? this.batchSize * DEFAULTS.heldKeysPerBatch;
    this.flushBackoff = new Backoff(options.backoff);
    this.metrics.bind({
      channelDepth: () => this.channel.length,
      channelCapacity: () => this.channel.capacity,
      heldKeys: () => this.batch.size,
      maxHeldKeys: () => this.maxHeldKeys,
      flushesFailing: () => this.flushesFailing,
    });
    this.to(Mode.idle);
  }

  /** Distinct (agent, key) entries in the batch. */
  get currentBatchLen(): number {
    return this.batch.size;
  }

  get channelLength(): number {
    return this.channel.length;
  }

  get channelCapacity(): number {
    return this.channel.capacity;
  }

  /** True from a failed UPDATE until one succeeds again (the batch is held and retried meanwhile). */
  get flushesFailing(): boolean {
    return this.flushBackoff.attempts > 0;
  }

  /** Whole seconds a refused client should wait: the channel frees within a flush, a failing database within its backoff. */
  get retryAfterSeconds(): number {
    return Math.max(1, Math.ceil(this.flushBackoff.ceilingMs / 1000));
  }

  /**
   * Queues updates for one agent. Never waits: an update that finds the
   * channel full is refused and counted; so is, while flushes fail, one that
   * would add a new key the agent has not declared, or beyond MAX_HELD_KEYS. Throws on arrays of unequal
   * length (nothing is queued) and once the batcher is closing. Each
   * collected_at is a Date, or a number of microseconds since the epoch.
   */
  add(
    agentId: string,
    keys: readonly string[],
    values: readonly string[],
    errors: readonly string[],
    collectedAts: readonly (Date | number)[],
  ): AddResult {
    if (!(keys.length === values.length && values.length === errors.length && errors.length === collectedAts.length)) {
      throw new RangeError(
        `invalid add call, all inputs must have the same number of items; keys: ${keys.length}, values: ${values.length}, errors: ${errors.length}, collectedAt: ${collectedAts.length}`,
      );
    }
    if (this.closing || this.mode === Mode.closed) throw new BatcherClosedError();
    // While flushes fail the loop merges everything into the held batch, so
    // the channel never fills: the bound on memory is then MAX_HELD_KEYS.
    const bounded = this.flushesFailing;
    // Asked on every call, so that the agent's keys are known before an outage.
    const declared = this.declaredKeys?.keysOf(agentId);
    let channelFull = 0;
    let heldLimit = 0;
    let undeclared = 0;
    for (let i = 0; i < keys.length; i++) {
      const key = keys[i]!;
      if (bounded && !this.batch.has(agentId, key)) {
        if (this.declaredKeys && !(declared ? declared.has(key) : this.declaredKeys.admitUnread(agentId, key))) {
          undeclared++;
          continue;
        }
        if (this.batch.size + this.channel.length >= this.maxHeldKeys) {
          heldLimit++;
          continue;
        }
      }
      const queued = this.channel.trySend({
        agentId,
        key,
        value: values[i]!,
        error: errors[i]!,
        collectedAt: micros(collectedAts[i]!),
      });
      if (!queued) channelFull++;
    }
    const dropped = channelFull + heldLimit + undeclared;
    if (dropped > 0) this.countDrops(agentId, channelFull, heldLimit, undeclared);
    if (dropped < keys.length) this.scheduleDrain();
    return { accepted: keys.length - dropped, dropped };
  }

  /**
   * Resolves once the loop has nothing to do right now: no flush in flight
   * and no queued update left to merge. Tests await it after advancing a
   * fake clock.
   */
  async idle(): Promise<void> {
    for (;;) {
      if (this.cycle) {
        await this.cycle;
        continue;
      }
      if (this.drainScheduled) {
        await new Promise<void>((resolve) => queueMicrotask(resolve));
        continue;
      }
      return;
    }
  }

  /** The database answers again: a held batch waiting for its retry is retried now. */
  retryNow(): void {
    if (this.mode === Mode.backoff) this.to(Mode.flushing, this.closing ? 'shutdown' : this.retryReason);
  }

  /**
   * Stops the loop: lets a flush in flight finish, drains the channel into
   * the batch, and flushes it with reason `shutdown`, retrying until
   * `finalFlushTimeoutMs`. Resolves with what could not be written (nothing,
   * normally). Idempotent: later calls return the same promise.
   */
  close(): Promise<CloseResult> {
    if (this.closing) return this.closing.result;
    if (this.mode === Mode.closed) {
      // Abandoned before: what was held has been handed over already.
      const result = Promise.resolve({ flushed: false, held: emptyBatch() });
      this.closing = { deadline: 0, deadlineTimer: undefined, result, resolve: () => undefined };
      return result;
    }
    let resolve!: (result: CloseResult) => void;
    const result = new Promise<CloseResult>((done) => (resolve = done));
    const deadline = this.clock.Date.now() + this.finalFlushTimeoutMs;
    const deadlineTimer = this.clock.setTimeout(() => this.onDeadline(), this.finalFlushTimeoutMs);
    this.closing = { deadline, deadlineTimer, result, resolve };
    this.log.info({ count: this.batch.size + this.channel.length }, 'flushing metadata batch before exit');
    switch (this.mode) {
      case Mode.idle:
        this.to(Mode.idle); // idle while closing: flush at once, or close
        break;
      case Mode.backoff:
        this.to(Mode.flushing, 'shutdown'); // retry at once rather than at the end of the backoff
        break;
      case Mode.flushing:
      case Mode.announcing:
        break; // the flush in flight ends in to(idle) or to(backoff), which see `closing`
      default:
        assertNever(this.mode);
    }
    return result;
  }

  /**
   * Gives up at once (a second signal): stops the loop and returns everything
   * held, channel included, for the spill file. A flush still in flight may
   * yet commit; replaying its entries later is harmless. A second call
   * returns nothing more.
   */
  abandon(): MetadataBatch {
    if (this.mode === Mode.closed) return emptyBatch();
    // A close() under way gets nothing: what is held goes to this caller.
    const closing = this.closing;
    this.closing = undefined;
    const held = this.to(Mode.closed) ?? emptyBatch();
    if (closing) {
      this.clock.clearTimeout(closing.deadlineTimer);
      this.closing = closing;
      closing.resolve({ flushed: false, held: emptyBatch() });
    }
    return held;
  }

  /**
   * The transition function: every mode change happens here, with what
   * entering the mode means. Returns what was held when entering `closed`.
   */
  private to(next: Mode, reason: FlushReason = 'scheduled'): MetadataBatch | undefined {
    this.clock.clearTimeout(this.timer);
    this.timer = undefined;
    this.mode = next;
    switch (next) {
      case Mode.idle:
        if (this.closing) return this.closeOrFlush();
        this.timer = this.clock.setTimeout(() => this.onTimer(), this.timerDelay(this.flushPeriod()));
        this.drain(); // what waited in the channel during the flush
        return;
      case Mode.flushing:
        this.cycle = this.runCycle(reason);
        return;
      case Mode.announcing:
        return;
      case Mode.backoff: {
        this.retryReason = reason;
        this.drainAll(); // merging keeps the channel free while the database is down
        const delay = this.flushBackoff.next();
        this.timer = this.clock.setTimeout(
          () => this.to(Mode.flushing, this.closing ? 'shutdown' : this.retryReason),
          this.closing ? Math.min(delay, Math.max(0, this.closing.deadline - this.clock.Date.now())) : delay,
        );
        return;
      }
      case Mode.closed:
        return this.finishClose();
      default:
        return assertNever(next);
    }
  }

  /** Entering idle while closing: flush what is left, or wait to retry an announcement, or close. */
  private closeOrFlush(): undefined {
    this.drainAll();
    if (this.batch.size > 0) {
      this.to(Mode.flushing, 'shutdown');
    } else if (this.announcers.waiting > 0) {
      this.timer = this.clock.setTimeout(() => this.onTimer(), this.timerDelay(Number.POSITIVE_INFINITY));
    } else {
      this.to(Mode.closed);
    }
    return undefined;
  }

  /** Entering closed: hands over what is held, and settles a close() under way. */
  private finishClose(): MetadataBatch {
    this.drainAll();
    const held = this.batch.toArrays();
    this.batch.clear();
    if (this.closing) {
      this.clock.clearTimeout(this.closing.deadlineTimer);
      if (held.keys.length > 0) {
        this.log.error(
          { count: held.keys.length },
          'final flush did not reach the database before FINAL_FLUSH_TIMEOUT_MS',
        );
      }
      if (this.announcers.waiting > 0) {
        this.log.warn(
          { agents: this.announcers.waiting },
          'stopped with NOTIFYs not sent; listeners resync on reconnect',
        );
      }
      this.closing.resolve({ flushed: held.keys.length === 0, held });
    }
    return held;
  }

  /** The flush timer (idle) fired: flush what is held, retry announcements, or just re-arm. */
  private onTimer(): void {
    if (this.mode !== Mode.idle) return;
    if (this.batch.size === 0 && this.announcers.waiting === 0) {
      this.to(Mode.idle); // an empty tick does nothing but re-arm, as in the original
      return;
    }
    this.to(Mode.flushing, this.closing ? 'shutdown' : 'scheduled');
  }

  /** FINAL_FLUSH_TIMEOUT_MS passed: close now, with whatever is still held. */
  private onDeadline(): void {
    if (this.mode !== Mode.closed) this.to(Mode.closed);
  }

  /**
   * The next flush period: FLUSH_INTERVAL_MS ± the jitter, the first one
   * cut at a random point, so that replicas started together spread out.
   */
  private flushPeriod(): number {
    if (this.flushJitter === 0) return this.flushIntervalMs;
    const period = this.flushIntervalMs * (1 + this.flushJitter * (2 * this.random() - 1));
    const first = this.firstPeriod;
    this.firstPeriod = false;
    return Math.max(1, Math.round(first ? period * this.random() : period));
  }

  /** The timer of idle: the flush interval, or sooner when a failed announcement awaits its retry. */
  private timerDelay(interval: number): number {
    const retry = this.announcers.retryDelay();
    return retry === undefined ? interval : Math.min(interval, retry);
  }

  private scheduleDrain(): void {
    if (this.drainScheduled) return;
    this.drainScheduled = true;
    queueMicrotask(() => {
      this.drainScheduled = false;
      // Merging is the flush loop's work.
      this.background.cpu('metadata_flush', () => this.drain());
    });
  }

  /** Merges queued updates as the mode allows; a full batch starts a capacity flush. */
  private drain(): void {
    switch (this.mode) {
      case Mode.idle:
        for (let update = this.channel.receive(); update; update = this.channel.receive()) {
          this.batch.merge(update);
          if (this.batch.size >= this.batchSize) {
            // The rest waits in the channel until this flush is done.
            this.to(Mode.flushing, 'capacity');
            return;
          }
        }
        return;
      case Mode.backoff:
        // Merge into the kept batch so the channel never fills while the
        // database is down: memory grows with distinct keys, not reports.
        this.drainAll();
        return;
      case Mode.flushing:
      case Mode.announcing:
      case Mode.closed:
        return;
      default:
        return assertNever(this.mode);
    }
  }

  private drainAll(): void {
    for (let update = this.channel.receive(); update; update = this.channel.receive()) this.batch.merge(update);
  }

  /** One flush, from `flushing` to `idle` (written) or `backoff` (failed). The loop never throws. */
  private async runCycle(reason: FlushReason): Promise<void> {
    let written = false;
    try {
      written = await this.background.run('metadata_flush', () => this.flush(reason));
    } catch (err) {
      // flush() handles its own failures; this is a bug's last line of defence.
      this.log.error({ err, reason }, 'unexpected error in the flush; the batch is kept');
    }
    this.cycle = undefined;
    // Closed meanwhile (the deadline, or a second signal): nothing more to do.
    if (this.mode === Mode.closed) return;
    this.to(written ? Mode.idle : Mode.backoff, reason);
  }

  /** The UPDATE (with the store's NOTIFY), then the announcers. Resolves false when the UPDATE failed: the batch is kept. */
  private async flush(reason: FlushReason): Promise<boolean> {
    const count = this.batch.size;
    const start = this.clock.Date.now();
    let changed: readonly string[] = [];
    if (count > 0) {
      const batch = await this.flattenBatch();
      this.log.debug({ reason, count }, 'flushing metadata batch');
      let result: UpdateResult;
      try {
        result = await this.store.updateMetadata(batch);
      } catch (err) {
        this.countFlushFailure(err, reason, count);
        return false;
      }
      // Closed while the UPDATE ran: the batch was handed over already.
      if (this.mode === Mode.closed) return true;
      if (this.flushesFailing) {
        this.log.info(
          { attempts: this.flushBackoff.attempts, count },
          'metadata UPDATE succeeded again; database recovered',
        );
        this.flushBackoff.reset();
      }
      // Written: nothing merged into the batch meanwhile (the loop does not
      // merge while a flush is in flight), so all of it can go.
      this.batch.clear();
      if (result.undeclared > 0) this.metrics.undeclaredKeysTotal.inc(result.undeclared);
      if (result.stale > 0) this.metrics.staleKeysTotal.inc(result.stale);
      if (result.announced !== undefined) this.metrics.notifyPayloadsTotal.inc(result.announced);
      // Read only for sinks: a store that NOTIFYed decodes them on demand (store.ts).
      if (this.announcers.size > 0) changed = result.changedAgentIds;
    }
    if (this.announcers.hasWork(changed)) {
      this.to(Mode.announcing);
      await this.announcers.announce(changed, count);
    }
    if (count > 0) {
      this.metrics.batchSize.observe(count);
      this.metrics.flushedTotal.inc(count);
      this.metrics.batchesTotal.inc({ reason });
      const elapsed = (this.clock.Date.now() - start) / 1000;
      this.metrics.flushDuration.observe({ reason }, elapsed);
      this.log.debug({ count, elapsed, reason }, 'flush complete');
    }
    return true;
  }

  /**
   * The held batch as the UPDATE's arrays, a slice at a time with a turn of
   * the event loop between slices (slices.ts): requests are answered
   * meanwhile, and nothing merges while a flush is in flight.
   */
  private flattenBatch(): Promise<MetadataBatch> {
    const filling = this.batch.fill((keys) => this.metrics.batchUtilization.observe(keys));
    return inSlices(filling, (work) => this.background.cpu('metadata_flush', work));
  }

  private countFlushFailure(err: unknown, reason: FlushReason, count: number): void {
    this.metrics.flushErrorsTotal.inc();
    // The NOTIFY queue is full: a publish failure too (the statement rolled back and is retried).
    if ((err as { code?: string }).code === NOTIFY_QUEUE_FULL)
      this.metrics.publishErrorsTotal.inc({ sink: NOTIFY_SINK });
    if (!this.flushesFailing) {
      this.log.error({ err, reason, count }, 'metadata UPDATE failed; keeping the batch and retrying with backoff');
    } else {
      this.log.debug({ err, reason, count, attempt: this.flushBackoff.attempts }, 'metadata UPDATE retry failed');
    }
  }

  private countDrops(agentId: string, channelFull: number, heldLimit: number, undeclared: number): void {
    if (channelFull > 0) this.metrics.droppedKeysTotal.inc(channelFull);
    if (heldLimit > 0) this.metrics.heldLimitRefusedKeysTotal.inc(heldLimit);
    if (undeclared > 0) this.metrics.undeclaredRefusedKeysTotal.inc(undeclared);
    const reasons = [];
    if (channelFull > 0) reasons.push(`channel full (${channelFull})`);
    if (heldLimit > 0) reasons.push(`MAX_HELD_KEYS held while flushes fail (${heldLimit})`);
    if (undeclared > 0) reasons.push(`keys the agent has not declared, while flushes fail (${undeclared})`);
    const fields = {
      agent_id: agentId,
      channel_size: this.channel.capacity,
      dropped_count: channelFull + heldLimit + undeclared,
      reason: reasons.join(', '),
    };
    const now = this.clock.Date.now();
    if (now - this.lastDropWarnAt >= DROP_WARN_INTERVAL_MS) {
      this.lastDropWarnAt = now;
      this.log.warn(fields, 'metadata updates refused');
    } else {
      this.log.debug(fields, 'metadata updates refused');
    }
  }
}

/** A Date, or microseconds since the epoch already (what normalizeReport gives). */
function micros(at: Date | number): number {
  return typeof at === 'number' ? at : dateToMicros(at);
}

function assertNever(value: never): never {
  throw new Error(`unexpected mode ${String(value)}`);
}
