// The agent side of metabatch (`metabatch/client`): one object that reports
// an agent's keys well. It holds the newest value of each key (bounded,
// reporterBook.ts), sends over the streaming route `GET
// /v1/agents/{agentId}/metadata/stream` (reporterStream.ts), one message at
// a time, and falls back to `POST /v1/agents/{agentId}/metadata`
// (reporterPost.ts) while the stream cannot be opened (an older service
// answers the upgrade 404), trying the stream again later. Keys the service
// dropped (its channel was full) are sent again after `retry_after`, unless
// a newer value was reported meanwhile. Connection problems back off as
// every retry of metabatch does (backoff.ts, `DEFAULTS.reconnect`) and never
// give up; a token the service refuses (401, 403, close code 4001) stops the
// reporter for good, and `report()` answers `stopped: true` from then on.
//
// The send loop is one state machine (`Mode`, changed only by `to()`) with
// one send in flight at most; every way a send ends is one `Outcome`
// (reporterOutcome.ts), settled in one place (`onSent`). How reports go (the
// `Link`: an open stream, POST until the stream is tried again, or neither)
// is the other half of the state, and `stats().transport` is its kind.

import assert from 'node:assert/strict';
import { backoffDelay } from './backoff.js';
import { droppedOf, HeldKeys, itemsOf, type Entry, type ReportValue } from './reporterBook.js';
import {
  reporterSettings,
  type Reporter,
  type ReporterCloseResult,
  type ReporterOptions,
  type ReporterSettings,
  type ReporterStats,
  type ReportResult,
} from './reporterOptions.js';
import { ReporterError, tokenRefused, type Outcome } from './reporterOutcome.js';
import { PostLink } from './reporterPost.js';
import { openStream, StreamLink, type OpenResult } from './reporterStream.js';

export type { ReportValue } from './reporterBook.js';
export type { Reporter, ReporterCloseResult, ReporterOptions, ReporterStats, ReportResult } from './reporterOptions.js';
export { ReporterError } from './reporterOutcome.js';

export function createReporter(options: ReporterOptions): Reporter {
  return new MetadataReporter(reporterSettings(options));
}

/**
 * The send loop's modes, changed only by `to()`.
 * - `idle`: nothing to send; a report() that takes a key moves to `waiting`.
 * - `waiting`: keys to send, not before `notBefore` (retry_after, or backoff
 *   after a failure); its timer (or, when nothing is to be waited for, the
 *   next microtask, so that the reports of one turn go together) moves on.
 * - `opening`: the stream's upgrade is in flight (the link is `none`).
 * - `sending`: one message or POST is in flight (the link is `stream` or `post`).
 * - `stopped`: for good (close(), or the token refused): nothing is sent,
 *   what was held is discarded, report() takes nothing.
 */
const Mode = {
  idle: 'idle',
  waiting: 'waiting',
  opening: 'opening',
  sending: 'sending',
  stopped: 'stopped',
} as const;
type Mode = (typeof Mode)[keyof typeof Mode];

/** How reports go: an open stream, POST until `streamRetryAt`, or neither yet (the stream is opened next). */
type Link = { kind: 'none' } | { kind: 'stream'; stream: StreamLink } | { kind: 'post'; streamRetryAt: number };
const NO_LINK: Link = { kind: 'none' };

class MetadataReporter implements Reporter {
  private readonly book: HeldKeys;
  private readonly post: PostLink;
  /** Halved for good whenever the service refuses a message as too big. */
  private maxMessageBytes: number;

  private mode: Mode = Mode.idle;
  private link: Link = NO_LINK;
  /** Counts transitions: a wake-up armed in one `waiting` does nothing in a later mode. */
  private turn = 0;
  /** The `waiting` timer. */
  private timer: unknown;
  /** In `opening`: ends the upgrade in flight. */
  private opening: { abort(): void } | undefined;
  /** The last message's seq on any stream. */
  private seq = 0;
  /** Failed sends or opens in a row: the backoff's exponent. */
  private failures = 0;
  /** The clock time before which nothing is sent (retry_after, backoff). */
  private notBefore = 0;

  private closing: Promise<ReporterCloseResult> | undefined;
  /** Set on entering `stopped`: the stream's graceful close. */
  private stopping: Promise<void> | undefined;

  private readonly counters = {
    sent: 0,
    acceptedKeys: 0,
    droppedKeys: 0,
    refusedKeys: 0,
    refusedReports: 0,
    discardedKeys: 0,
    streamsOpened: 0,
  };

  constructor(private readonly settings: ReporterSettings) {
    this.book = new HeldKeys(settings.maxKeys);
    this.post = new PostLink(settings);
    this.maxMessageBytes = settings.maxMessageBytes;
  }

  report(values: Readonly<Record<string, ReportValue>>): ReportResult {
    if (this.closing) throw new ReporterError('metabatch reporter is closed');
    const items = itemsOf(values);
    if (this.mode === Mode.stopped) {
      this.counters.refusedKeys += items.length;
      return { accepted: 0, refused: items.length, stopped: true };
    }
    const result = this.book.add(items, new Date(this.settings.clock.Date.now()).toISOString());
    this.counters.refusedKeys += result.refused;
    if (result.accepted > 0 && this.mode === Mode.idle) this.to(Mode.waiting);
    return result;
  }

  flush(): Promise<void> {
    return this.book.flushed();
  }

  close(): Promise<ReporterCloseResult> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  stats(): ReporterStats {
    const now = this.settings.clock.Date.now();
    return {
      transport: this.link.kind,
      heldKeys: this.book.held,
      ...this.counters,
      waitingUntil: this.mode !== Mode.stopped && this.notBefore > now ? this.notBefore : undefined,
    };
  }

  private async shutdown(): Promise<ReporterCloseResult> {
    let flushed = this.book.held === 0;
    if (!flushed && this.mode !== Mode.stopped) {
      let timer: unknown;
      flushed = await Promise.race([
        this.book.flushed().then(() => true),
        new Promise<boolean>((resolve) => {
          timer = this.settings.clock.setTimeout(() => resolve(false), this.settings.closeTimeoutMs);
        }),
      ]);
      this.settings.clock.clearTimeout(timer);
    }
    const before = this.counters.discardedKeys;
    if (this.mode !== Mode.stopped) this.to(Mode.stopped);
    await this.stopping;
    return { flushed: flushed && this.counters.discardedKeys === before, discardedKeys: this.counters.discardedKeys };
  }

  /** What comes after a send, an open, or a wait: wait, open the stream, send, or nothing. */
  private next(): void {
    const now = this.settings.clock.Date.now();
    if (this.book.pendingKeys === 0) return this.to(Mode.idle);
    if (this.notBefore > now) return this.to(Mode.waiting);
    if (this.link.kind === 'post' && now >= this.link.streamRetryAt) this.link = NO_LINK;
    this.to(this.link.kind === 'none' ? Mode.opening : Mode.sending);
  }

  /**
   * The transition function: every mode change happens here, with what
   * entering the mode means. `why` is the fatal error that stops the reporter.
   */
  private to(next: Mode, why?: ReporterError): void {
    assert.ok(this.mode !== Mode.stopped, 'reporter: a transition out of stopped');
    this.settings.clock.clearTimeout(this.timer);
    this.timer = undefined;
    const from = this.mode;
    const turn = ++this.turn;
    this.mode = next;
    switch (next) {
      case Mode.idle:
        assert.ok(this.book.pendingKeys === 0 && !this.book.inFlight, 'reporter: idle with keys to send');
        return;
      case Mode.waiting: {
        const wait = this.notBefore - this.settings.clock.Date.now();
        const wake = () => this.guard(() => this.turn === turn && this.next());
        if (wait > 0) this.timer = this.settings.clock.setTimeout(wake, wait);
        else queueMicrotask(wake);
        return;
      }
      case Mode.opening:
        assert.ok(this.link.kind === 'none', 'reporter: opening with a link');
        this.opening = openStream(this.settings, (result) => this.guard(() => this.onOpened(result)));
        return;
      case Mode.sending:
        return this.send();
      case Mode.stopped:
        return this.enterStopped(from, why);
      default:
        return assertNever(next);
    }
  }

  private send(): void {
    const link = this.link;
    assert.ok(link.kind !== 'none' && this.book.pendingKeys > 0, 'reporter: sending without a link or keys');
    const batch = this.book.take(this.maxMessageBytes);
    const done = (outcome: Outcome) => this.guard(() => this.onSent(batch, outcome));
    this.counters.sent++;
    if (link.kind === 'stream') link.stream.send(++this.seq, batch, done);
    else this.post.send(batch, done);
  }

  /** Entering `stopped`: ends what is in flight, closes the stream, discards what is held. */
  private enterStopped(from: Mode, why: ReporterError | undefined): void {
    if (from === Mode.opening) this.opening?.abort();
    this.opening = undefined;
    const link = this.link;
    this.link = NO_LINK;
    this.post.destroy();
    this.stopping = link.kind === 'stream' ? link.stream.close() : Promise.resolve();
    this.counters.discardedKeys += this.book.discard();
    if (why) this.tell(why);
  }

  private onOpened(result: OpenResult): void {
    this.opening = undefined;
    if (this.mode !== Mode.opening) {
      // Stopped meanwhile (the abort ends it `aborted`; an open that won the race is cut).
      if (result.kind === 'open') {
        result.socket.on('error', () => undefined);
        result.socket.terminate();
      }
      return;
    }
    const { clock, requestTimeoutMs } = this.settings;
    switch (result.kind) {
      case 'open': {
        this.counters.streamsOpened++;
        const stream: StreamLink = new StreamLink(result.socket, clock, requestTimeoutMs, (outcome) =>
          this.guard(() => this.onLost(stream, outcome)),
        );
        this.link = { kind: 'stream', stream };
        return this.to(Mode.sending);
      }
      case 'answered':
        if (result.status === 401 || result.status === 403) {
          return this.to(Mode.stopped, tokenRefused(result.status, result.message));
        }
        return this.fallBackToPost(`the service answered the stream's upgrade ${result.status} (${result.message})`, {
          status: result.status,
        });
      case 'timeout':
        return this.fallBackToPost(`the stream did not open within ${requestTimeoutMs} ms`, {});
      case 'network':
        // No answer at all: a POST would fail the same way. Back off, try the stream again.
        this.failed(new ReporterError(`cannot reach metabatch: ${result.error.message}`, { cause: result.error }));
        if (this.mode === Mode.opening) this.next();
        return;
      case 'aborted':
        return;
      default:
        return assertNever(result);
    }
  }

  /** The stream cannot be opened: reports go by POST for `streamRetryMs`, this one at once. */
  private fallBackToPost(why: string, details: { status?: number }): void {
    const { clock, streamRetryMs } = this.settings;
    this.link = { kind: 'post', streamRetryAt: clock.Date.now() + streamRetryMs };
    this.tell(
      new ReporterError(`${why}: reporting by POST, the stream is tried again in ${streamRetryMs} ms`, details),
    );
    // Unless onError closed the reporter meanwhile.
    if (this.mode === Mode.opening) this.to(Mode.sending);
  }

  /** A send ended: the held keys settle by its outcome, then the loop goes on. */
  private onSent(batch: readonly Entry[], outcome: Outcome): void {
    // Stopped meanwhile: what was in flight is discarded already.
    if (this.mode !== Mode.sending) return;
    if (this.link.kind === 'stream' && this.link.stream.closed) this.link = NO_LINK;
    switch (outcome.kind) {
      case 'ack': {
        this.failures = 0;
        this.counters.acceptedKeys += outcome.accepted;
        if (outcome.dropped === 0) {
          this.book.land([]);
          break;
        }
        this.counters.droppedKeys += outcome.dropped;
        this.book.land(droppedOf(batch, outcome.dropped, outcome.retryAfterS));
        const waitMs = outcome.retryAfterS * 1000;
        const jitter = (waitMs / 2) * this.settings.random();
        this.notBefore = Math.max(this.notBefore, this.settings.clock.Date.now() + waitMs + jitter);
        break;
      }
      case 'refused':
        this.counters.refusedReports++;
        this.book.land([]);
        this.tell(outcome.error);
        break;
      case 'tooBig':
        if (batch.length > 1) {
          // Smaller messages from now on; this one goes again, split.
          const sent = batch.reduce((sum, entry) => sum + entry.bytes, 0);
          this.maxMessageBytes = Math.max(1, Math.min(this.maxMessageBytes, sent) >> 1);
          this.book.land(batch);
        } else {
          this.counters.refusedReports++;
          this.book.land([]);
        }
        this.tell(outcome.error);
        break;
      case 'fatal':
        this.book.land(batch);
        return this.to(Mode.stopped, outcome.error);
      case 'failed':
        this.book.land(batch);
        this.failed(outcome.error);
        break;
      case 'aborted':
        this.book.land(batch);
        break;
      default:
        return assertNever(outcome);
    }
    if (this.mode === Mode.sending) this.next();
  }

  /** The stream ended with no send in flight: the next send opens another. */
  private onLost(stream: StreamLink, outcome: Outcome): void {
    if (this.link.kind !== 'stream' || this.link.stream !== stream) return;
    this.link = NO_LINK;
    if (outcome.kind === 'fatal') this.to(Mode.stopped, outcome.error);
    else if (outcome.kind === 'failed') this.failed(outcome.error);
  }

  /** A send or open failed: the next waits for the backoff. */
  private failed(error: ReporterError): void {
    this.failures++;
    const delay = backoffDelay(this.failures, this.settings.backoff);
    this.notBefore = Math.max(this.notBefore, this.settings.clock.Date.now() + delay);
    this.tell(error);
  }

  /** onError, which must not throw: if it does, the reporter stops rather than throw into a socket's event. */
  private tell(error: ReporterError): void {
    try {
      this.settings.onError(error);
    } catch {
      if (this.mode !== Mode.stopped) this.to(Mode.stopped);
    }
  }

  /**
   * Runs a step of the loop from a timer or a socket's event. A throw there
   * is a bug, not a condition of the service: the reporter says so and stops
   * rather than spin, and the process goes on.
   */
  private guard(step: () => unknown): void {
    try {
      step();
    } catch (err) {
      if (this.mode === Mode.stopped) return;
      this.to(
        Mode.stopped,
        new ReporterError(`metabatch reporter stopped: ${(err as Error).message}`, { fatal: true, cause: err }),
      );
    }
  }
}

function assertNever(value: never): never {
  throw new Error(`unexpected mode ${String(value)}`);
}
