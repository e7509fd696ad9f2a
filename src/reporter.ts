// The agent side of metabatch (`metabatch/client`): one object that reports
// an agent's keys well. It holds the newest value of each key (bounded),
// sends over the streaming route `GET /v1/agents/{agentId}/metadata/stream`
// (a WebSocket, `ws`), one message at a time, and falls back to `POST
// /v1/agents/{agentId}/metadata` while the stream cannot be opened (an older
// service answers the upgrade 404), trying the stream again later. Keys the
// service dropped (its channel was full) are sent again after `retry_after`,
// unless a newer value was reported meanwhile. Connection problems back off
// as every retry of metabatch does (backoff.ts, `DEFAULTS.reconnect`) and
// never give up; a token the service refuses (401, 403, close code 4001)
// stops the reporter for good.
//
// Longer than our other files on purpose: the reporter is one loop with one
// send in flight, and every way a send ends (an answer, keys dropped, a bad
// answer, a close code, a timeout, an abort, over the stream or by POST)
// settles the same held keys. Kept in one class, each of those paths can be
// checked against the others in one read.

import http from 'node:http';
import https from 'node:https';
import WebSocket from 'ws';
import { backoffDelay } from './backoff.js';
import type { Clock } from './clock.js';
import { DEFAULTS } from './config.js';
import { MAX_ALL_KEYS_BYTES, MAX_ERROR_BYTES, MAX_KEY_CHARS, MAX_VALUE_BYTES, truncateUtf8 } from './report.js';

/** A key's new value: the value itself, or a value and/or an error (both default to ""). */
export type ReportValue = string | { value?: string; error?: string };

export interface ReporterOptions {
  /** The service's base URL, `http://metabatch:8080` (https too; a path prefix is kept). */
  url: string;
  /** The agent's id (a UUID). */
  agentId: string;
  /** The agent's token (`mbt_…`). */
  token: string;
  /**
   * Problems, as they happen: connection failures, the stream being unavailable
   * (and the POST fallback used), a report the service refused, a refused token
   * (fatal). The reporter carries on unless `err.fatal`. Default: ignored.
   */
  onError?: (err: ReporterError) => void;
  /**
   * Distinct keys held at most while waiting to be sent or acknowledged;
   * `report()` refuses new keys beyond it (counted in `stats().refusedKeys`).
   * Default 6144: the most keys one report can carry (6144 bytes of keys, a
   * key at least one byte); with values and errors cut to 2048 bytes each as
   * the service cuts them, at most ~30 MB, in practice far less.
   */
  maxKeys?: number;
  /**
   * Largest message or POST body, in bytes of JSON (a report holds at least one
   * key whatever this says). Default 256 KiB, well under the service's 1 MiB;
   * halved for the rest of the reporter's life whenever the service refuses a
   * message as too big (1009, 413). Reports are also split so that each
   * carries at most 6144 bytes of keys.
   */
  maxMessageBytes?: number;
  /** Bound on opening the stream, on one POST, and on waiting for an acknowledgement. Default 30 s. */
  requestTimeoutMs?: number;
  /** After the stream could not be opened, reports go by POST for this long, then the stream is tried again. Default 30 s. */
  streamRetryMs?: number;
  /** Bound on `close()` flushing what is held. Default 5 s. */
  closeTimeoutMs?: number;
  /** Backoff of reconnects and failed sends. Default `DEFAULTS.reconnect` (100 ms doubling to 5 s). */
  reconnect?: { initialMs?: number; maxMs?: number };
  /** Timers and the time `collected_at` is stamped with. Default the real ones (`globalThis`). */
  clock?: Clock;
  /** Source of randomness in [0, 1) for the jitter of waits. Default `Math.random`. */
  random?: () => number;
}

export interface ReportResult {
  /** Keys taken (the newest value of a key replaces one still waiting). */
  accepted: number;
  /** New keys refused because `maxKeys` distinct keys are held already. */
  refused: number;
}

export interface ReporterStats {
  /** How reports go now: an open stream, POST (the stream could not be opened), or not connected. */
  transport: 'stream' | 'post' | 'none';
  /** Distinct keys held: waiting to be sent, or sent and not yet acknowledged. */
  heldKeys: number;
  /** Messages and POSTs sent. */
  sent: number;
  /** Keys the service acknowledged as taken. */
  acceptedKeys: number;
  /** Keys the service said it dropped (each was sent again, or superseded by a newer value). */
  droppedKeys: number;
  /** Keys `report()` refused because `maxKeys` were held. */
  refusedKeys: number;
  /** Reports the service refused whole (400, or an `error` answer): their keys are not sent again. */
  refusedReports: number;
  /** Keys discarded unsent: by `close()` at its timeout, or after a fatal error. */
  discardedKeys: number;
  /** Streams opened. */
  streamsOpened: number;
  /** While waiting (retry_after, or backoff after a failure): the clock time before which nothing is sent. */
  waitingUntil: number | undefined;
}

export interface ReporterCloseResult {
  /** Everything held was acknowledged (or refused for good) within `closeTimeoutMs`. */
  flushed: boolean;
  /** Keys discarded unsent. */
  discardedKeys: number;
}

export interface Reporter {
  /**
   * Takes the newest value of each key, stamped with the time of this call as
   * `collected_at`; never waits. Throws a ReporterError once the reporter is
   * closed or its token was refused, a TypeError/RangeError for a key the
   * service would refuse (empty, over 127 characters, NUL characters).
   */
  report(values: Readonly<Record<string, ReportValue>>): ReportResult;
  /** Resolves once everything reported so far is acknowledged, or refused for good. */
  flush(): Promise<void>;
  /** Flushes what it holds (at most `closeTimeoutMs`), closes the stream, leaves no timers. Idempotent. */
  close(): Promise<ReporterCloseResult>;
  stats(): ReporterStats;
}

export class ReporterError extends Error {
  override name = 'ReporterError';
  /** The HTTP status of the answer, when there was one. */
  readonly status: number | undefined;
  /** The stream's close code, when it was closed. */
  readonly closeCode: number | undefined;
  /** The reporter stopped for good (the token was refused): create a new one with a valid token. */
  readonly fatal: boolean;

  constructor(
    message: string,
    details: { status?: number; closeCode?: number; fatal?: boolean; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.status = details.status;
    this.closeCode = details.closeCode;
    this.fatal = details.fatal ?? false;
  }
}

export function createReporter(options: ReporterOptions): Reporter {
  return new MetadataReporter(options);
}

// The close codes of the stream protocol.
const CLOSE_NORMAL = 1000;
const CLOSE_TOO_BIG = 1009;
const CLOSE_TOKEN_REVOKED = 4001;
// How much of a refused upgrade's or POST's body is read for the error message.
const MAX_ERROR_BODY_BYTES = 4096;
// Acknowledgements are small JSON objects.
const MAX_ANSWER_BYTES = 64 * 1024;

interface Entry {
  key: string;
  /** The item as sent: `{"key","value","error","collected_at"}`. */
  json: string;
  bytes: number;
  keyBytes: number;
  /** The earliest report() call (version) whose value of this key this entry stands for. */
  since: number;
}

type Outcome =
  | { kind: 'ack'; accepted: number; dropped: number; retryAfterS: number }
  | { kind: 'refused'; error: ReporterError }
  | { kind: 'tooBig'; error: ReporterError }
  | { kind: 'fatal'; error: ReporterError }
  | { kind: 'failed'; error: ReporterError }
  | { kind: 'aborted' };

type OpenResult =
  | { kind: 'open'; socket: WebSocket }
  | { kind: 'answered'; status: number; message: string }
  | { kind: 'timeout' }
  | { kind: 'network'; error: Error }
  | { kind: 'aborted' };

interface AckWaiter {
  socket: WebSocket;
  seq: number;
  resolve: (outcome: Outcome) => void;
}

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new RangeError(`createReporter: ${name} must be a whole number of at least 1 (got ${String(value)})`);
  }
  return value;
}

function nonNegative(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isFinite(value) || value < 0) {
    throw new RangeError(`createReporter: ${name} must be a number of at least 0 (got ${String(value)})`);
  }
  return value;
}

/** `value` and `error` as the service stores them: trimmed, cut to 2048 bytes with its messages. */
function normalizeItem(value: string, error: string): { value: string; error: string } {
  let v = value.trim();
  const originalError = error.trim();
  let e = originalError;
  const valueBytes = Buffer.byteLength(v);
  if (valueBytes > MAX_VALUE_BYTES) {
    e = `value of ${valueBytes} bytes exceeded ${MAX_VALUE_BYTES} bytes`;
    v = truncateUtf8(v, MAX_VALUE_BYTES);
  }
  const errorBytes = Buffer.byteLength(originalError);
  if (errorBytes > MAX_ERROR_BYTES) e = `error of ${errorBytes} bytes exceeded ${MAX_ERROR_BYTES} bytes`;
  return { value: v, error: e };
}

function checkKey(key: string): void {
  const chars = [...key].length;
  if (chars < 1 || chars > MAX_KEY_CHARS) {
    throw new RangeError(`metadata key must be 1-${MAX_KEY_CHARS} characters (got ${chars}: ${JSON.stringify(key)})`);
  }
  if (key.includes('\0')) throw new RangeError(`metadata key ${JSON.stringify(key)} must not contain NUL characters`);
}

function errorMessage(body: string): string {
  try {
    const parsed = JSON.parse(body) as unknown;
    if (parsed && typeof parsed === 'object' && typeof (parsed as { error?: unknown }).error === 'string') {
      return (parsed as { error: string }).error;
    }
  } catch {
    // Not JSON: the text itself.
  }
  return body.trim().slice(0, 200);
}

function retryAfterSeconds(raw: unknown): number {
  const seconds = typeof raw === 'string' ? Number(raw.trim()) : typeof raw === 'number' ? raw : Number.NaN;
  return Number.isFinite(seconds) && seconds > 0 ? seconds : 1;
}

/**
 * The keys of a report to send again after the service dropped `dropped` of
 * them. It answers how many, not which; README says which from Retry-After:
 * 1 while flushes succeed, when keys are refused because the channel is full,
 * and a full channel refuses a suffix of the report (everything from the
 * first key that did not fit): those go again. Over 1 while flushes fail,
 * when new keys are refused wherever they are (MAX_HELD_KEYS held): the
 * whole report goes again (the keys it took are merged into the held batch).
 * A key with a newer value reported meanwhile sends that one instead.
 */
function droppedOf(batch: Entry[], dropped: number, retryAfterS: number): Entry[] {
  return retryAfterS > 1 ? batch : batch.slice(Math.max(0, batch.length - dropped));
}

class MetadataReporter implements Reporter {
  private readonly authorization: string;
  private readonly postUrl: URL;
  private readonly streamUrl: URL;
  private readonly onError: (err: ReporterError) => void;
  private readonly maxKeys: number;
  private maxMessageBytes: number;
  private readonly requestTimeoutMs: number;
  private readonly streamRetryMs: number;
  private readonly closeTimeoutMs: number;
  private readonly backoff: { initialMs: number; maxMs: number; random: () => number };
  private readonly clock: Clock;
  private readonly random: () => number;

  /** The newest value of each key not yet sent (or to be sent again), in the order keys were first reported. */
  private readonly pending = new Map<string, Entry>();
  /** The message or POST in flight. */
  private flight: Entry[] | undefined;
  private readonly flightKeys = new Set<string>();
  /** Keys in flight that are not also pending: with pending.size, the distinct keys held. */
  private flightOnly = 0;
  /** Counts report() calls; entries remember the first call they stand for. */
  private version = 0;
  private flushWaiters: { upTo: number; resolve: () => void }[] = [];

  private mode: 'stream' | 'post' = 'stream';
  private streamRetryAt = 0;
  private socket: WebSocket | undefined;
  private ackWaiter: AckWaiter | undefined;
  private seq = 0;
  private httpAgent: http.Agent | undefined;
  private readonly inFlightRequests = new Set<http.ClientRequest>();
  /** Aborts whatever the loop waits on (an open, an ack, a request) once the reporter stops. */
  private abortCurrent: (() => void) | undefined;

  private failures = 0;
  private notBefore = 0;
  private wakeLoop: (() => void) | undefined;
  private loopTimer: unknown;
  private readonly loopDone: Promise<void>;

  private fatalError: ReporterError | undefined;
  private closing: Promise<ReporterCloseResult> | undefined;
  private stopping: Promise<void> | undefined;
  private stopped = false;

  private readonly counters = {
    sent: 0,
    acceptedKeys: 0,
    droppedKeys: 0,
    refusedKeys: 0,
    refusedReports: 0,
    discardedKeys: 0,
    streamsOpened: 0,
  };

  constructor(options: ReporterOptions) {
    const base = new URL(options.url);
    if (base.protocol !== 'http:' && base.protocol !== 'https:') {
      throw new TypeError(`createReporter: url must be http:// or https:// (got ${JSON.stringify(options.url)})`);
    }
    if (!base.pathname.endsWith('/')) base.pathname += '/';
    if (typeof options.agentId !== 'string' || options.agentId === '') {
      throw new TypeError('createReporter: agentId is required');
    }
    if (typeof options.token !== 'string' || options.token === '') {
      throw new TypeError('createReporter: token is required');
    }
    this.authorization = `Bearer ${options.token}`;
    const agentPath = `v1/agents/${encodeURIComponent(options.agentId)}/metadata`;
    this.postUrl = new URL(agentPath, base);
    this.streamUrl = new URL(`${agentPath}/stream`, base);
    this.streamUrl.protocol = base.protocol === 'https:' ? 'wss:' : 'ws:';
    this.onError = options.onError ?? (() => undefined);
    this.maxKeys = positiveInteger('maxKeys', options.maxKeys, MAX_ALL_KEYS_BYTES);
    this.maxMessageBytes = positiveInteger('maxMessageBytes', options.maxMessageBytes, 256 * 1024);
    this.requestTimeoutMs = positiveInteger('requestTimeoutMs', options.requestTimeoutMs, 30_000);
    this.streamRetryMs = nonNegative('streamRetryMs', options.streamRetryMs, 30_000);
    this.closeTimeoutMs = nonNegative('closeTimeoutMs', options.closeTimeoutMs, 5000);
    this.random = options.random ?? Math.random;
    this.backoff = {
      initialMs: positiveInteger('reconnect.initialMs', options.reconnect?.initialMs, DEFAULTS.reconnect.initialMs),
      maxMs: positiveInteger('reconnect.maxMs', options.reconnect?.maxMs, DEFAULTS.reconnect.maxMs),
      random: this.random,
    };
    this.clock = options.clock ?? globalThis;
    this.loopDone = this.loop().catch((err: unknown) => {
      // A bug, not a network problem: say so, and stop rather than spin.
      this.fail(
        new ReporterError(`metabatch reporter stopped: ${(err as Error).message}`, { fatal: true, cause: err }),
      );
    });
  }

  report(values: Readonly<Record<string, ReportValue>>): ReportResult {
    if (this.fatalError) {
      throw new ReporterError(`metabatch reporter stopped: ${this.fatalError.message}`, {
        fatal: true,
        cause: this.fatalError,
        ...(this.fatalError.status === undefined ? {} : { status: this.fatalError.status }),
        ...(this.fatalError.closeCode === undefined ? {} : { closeCode: this.fatalError.closeCode }),
      });
    }
    if (this.closing) throw new ReporterError('metabatch reporter is closed');
    if (values === null || typeof values !== 'object') throw new TypeError('report() takes an object of key: value');
    const collectedAt = new Date(this.clock.Date.now()).toISOString();
    // Check every item first: a report is taken whole or not at all.
    const items: { key: string; value: string; error: string }[] = [];
    for (const [key, raw] of Object.entries(values)) {
      checkKey(key);
      const given = typeof raw === 'string' ? { value: raw, error: '' } : raw;
      if (given === null || typeof given !== 'object') {
        throw new TypeError(`metadata ${JSON.stringify(key)}: a string, or { value?, error? } of strings`);
      }
      const value = given.value ?? '';
      const error = given.error ?? '';
      if (typeof value !== 'string' || typeof error !== 'string') {
        throw new TypeError(`metadata ${JSON.stringify(key)}: value and error must be strings`);
      }
      if (value.includes('\0') || error.includes('\0')) {
        throw new RangeError(`metadata ${JSON.stringify(key)}: value and error must not contain NUL characters`);
      }
      items.push({ key, ...normalizeItem(value, error) });
    }
    const version = ++this.version;
    let accepted = 0;
    let refused = 0;
    for (const item of items) {
      const older = this.pending.get(item.key);
      const inFlight = this.flightKeys.has(item.key);
      if (!older && !inFlight && this.pending.size + this.flightOnly >= this.maxKeys) {
        refused++;
        continue;
      }
      if (!older && inFlight) this.flightOnly--;
      const json = JSON.stringify({ key: item.key, value: item.value, error: item.error, collected_at: collectedAt });
      this.pending.set(item.key, {
        key: item.key,
        json,
        bytes: Buffer.byteLength(json),
        keyBytes: Buffer.byteLength(item.key),
        since: older ? older.since : version,
      });
      accepted++;
    }
    this.counters.refusedKeys += refused;
    if (accepted > 0) this.wake();
    return { accepted, refused };
  }

  flush(): Promise<void> {
    const upTo = this.version;
    if (this.oldestHeld() > upTo) return Promise.resolve();
    return new Promise((resolve) => this.flushWaiters.push({ upTo, resolve }));
  }

  close(): Promise<ReporterCloseResult> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  stats(): ReporterStats {
    return {
      transport: this.socket ? 'stream' : this.mode === 'post' && !this.stopped ? 'post' : 'none',
      heldKeys: this.pending.size + this.flightOnly,
      ...this.counters,
      waitingUntil: this.notBefore > this.clock.Date.now() && !this.stopped ? this.notBefore : undefined,
    };
  }

  private async shutdown(): Promise<ReporterCloseResult> {
    let flushed = this.oldestHeld() === Number.POSITIVE_INFINITY;
    if (!flushed && !this.stopped) {
      let timer: unknown;
      flushed = await Promise.race([
        this.flush().then(() => true),
        new Promise<boolean>((resolve) => {
          timer = this.clock.setTimeout(() => resolve(false), this.closeTimeoutMs);
        }),
      ]);
      this.clock.clearTimeout(timer);
    }
    const before = this.counters.discardedKeys;
    await this.stop();
    return { flushed: flushed && this.counters.discardedKeys === before, discardedKeys: this.counters.discardedKeys };
  }

  /** Ends the loop, the stream and any request; discards what is held. Idempotent. */
  private stop(): Promise<void> {
    this.stopping ??= this.stopOnce();
    return this.stopping;
  }

  private async stopOnce(): Promise<void> {
    this.stopped = true;
    this.abortCurrent?.();
    this.wake();
    await this.loopDone;
    const socket = this.socket;
    this.socket = undefined;
    if (socket) await this.closeSocket(socket);
    for (const request of this.inFlightRequests) request.destroy();
    this.httpAgent?.destroy();
    this.httpAgent = undefined;
    this.discardHeld();
  }

  /** A graceful close, bounded: the server answers the close frame, or the socket is cut. */
  private async closeSocket(socket: WebSocket): Promise<void> {
    if (socket.readyState === WebSocket.CLOSED) return;
    await new Promise<void>((resolve) => {
      const timer = this.clock.setTimeout(() => socket.terminate(), 1000);
      socket.once('close', () => {
        this.clock.clearTimeout(timer);
        resolve();
      });
      socket.close(CLOSE_NORMAL, 'reporter closed');
    });
  }

  private discardHeld(): void {
    this.counters.discardedKeys += this.pending.size + this.flightOnly;
    this.pending.clear();
    this.flight = undefined;
    this.flightKeys.clear();
    this.flightOnly = 0;
    this.settleWaiters();
  }

  /** A fatal error: heard once, then everything stops. */
  private fail(error: ReporterError): void {
    if (this.fatalError || this.stopped) return;
    this.fatalError = error;
    // Nothing held can be sent any more: flush() resolves now.
    this.discardHeld();
    this.onError(error);
    void this.stop();
  }

  // The loop: one send at a time, waits between (nothing to send, retry_after, backoff).

  private async loop(): Promise<void> {
    while (!this.stopped) {
      if (this.pending.size === 0) {
        await this.sleep(undefined);
        continue;
      }
      const wait = this.notBefore - this.clock.Date.now();
      if (wait > 0) {
        await this.sleep(wait);
        continue;
      }
      await this.step();
    }
  }

  private sleep(ms: number | undefined): Promise<void> {
    return new Promise((resolve) => {
      this.wakeLoop = resolve;
      if (ms !== undefined) this.loopTimer = this.clock.setTimeout(() => this.wake(), ms);
    });
  }

  private wake(): void {
    if (this.loopTimer !== undefined) {
      this.clock.clearTimeout(this.loopTimer);
      this.loopTimer = undefined;
    }
    const wake = this.wakeLoop;
    this.wakeLoop = undefined;
    wake?.();
  }

  private async step(): Promise<void> {
    if (this.mode === 'post' && this.clock.Date.now() >= this.streamRetryAt) this.mode = 'stream';
    if (this.mode === 'stream' && !this.socket) {
      const opened = await this.openStream();
      if (this.stopped) {
        if (opened.kind === 'open') {
          opened.socket.on('error', () => undefined);
          opened.socket.terminate();
        }
        return;
      }
      switch (opened.kind) {
        case 'open':
          this.counters.streamsOpened++;
          this.attach(opened.socket);
          break;
        case 'answered':
          if (opened.status === 401 || opened.status === 403) {
            this.fail(this.tokenRefused(opened.status, opened.message));
            return;
          }
          this.fallBackToPost(`the service answered the stream's upgrade ${opened.status} (${opened.message})`, {
            status: opened.status,
          });
          break;
        case 'timeout':
          this.fallBackToPost(`the stream did not open within ${this.requestTimeoutMs} ms`, {});
          break;
        case 'network':
          // No answer at all: a POST would fail the same way. Back off, try the stream again.
          this.failed(new ReporterError(`cannot reach metabatch: ${opened.error.message}`, { cause: opened.error }));
          return;
        case 'aborted':
          return;
      }
    }
    const batch = this.take();
    const outcome = this.socket ? await this.sendOnStream(this.socket, batch) : await this.post(batch);
    this.settle(batch, outcome);
  }

  private fallBackToPost(why: string, details: { status?: number }): void {
    this.mode = 'post';
    this.streamRetryAt = this.clock.Date.now() + this.streamRetryMs;
    this.onError(
      new ReporterError(`${why}: reporting by POST, the stream is tried again in ${this.streamRetryMs} ms`, details),
    );
  }

  private tokenRefused(status: number | undefined, message: string, closeCode?: number): ReporterError {
    return new ReporterError(
      `metabatch refused the agent token (${status ?? `close code ${closeCode}`}: ${message}); ` +
        'a wrong token stays wrong: create a new reporter with a valid token',
      { fatal: true, ...(status === undefined ? {} : { status }), ...(closeCode === undefined ? {} : { closeCode }) },
    );
  }

  /** The next message: pending keys in order, at most 6144 bytes of keys and maxMessageBytes of JSON. */
  private take(): Entry[] {
    const batch: Entry[] = [];
    let keyBytes = 0;
    let bytes = 64;
    for (const entry of this.pending.values()) {
      if (
        batch.length > 0 &&
        (keyBytes + entry.keyBytes > MAX_ALL_KEYS_BYTES || bytes + entry.bytes + 1 > this.maxMessageBytes)
      ) {
        break;
      }
      batch.push(entry);
      keyBytes += entry.keyBytes;
      bytes += entry.bytes + 1;
    }
    for (const entry of batch) {
      this.pending.delete(entry.key);
      this.flightKeys.add(entry.key);
    }
    this.flight = batch;
    this.flightOnly = batch.length;
    return batch;
  }

  private settle(batch: Entry[], outcome: Outcome): void {
    this.flight = undefined;
    this.flightKeys.clear();
    this.flightOnly = 0;
    const requeue = (entries: Entry[]) => {
      for (const entry of entries) {
        const newer = this.pending.get(entry.key);
        if (newer) newer.since = Math.min(newer.since, entry.since);
        else this.pending.set(entry.key, entry);
      }
    };
    switch (outcome.kind) {
      case 'ack':
        this.failures = 0;
        this.counters.acceptedKeys += outcome.accepted;
        if (outcome.dropped > 0) {
          this.counters.droppedKeys += outcome.dropped;
          requeue(droppedOf(batch, outcome.dropped, outcome.retryAfterS));
          const waitMs = outcome.retryAfterS * 1000;
          this.notBefore = Math.max(this.notBefore, this.clock.Date.now() + waitMs + (waitMs / 2) * this.random());
        }
        break;
      case 'refused':
        this.counters.refusedReports++;
        this.onError(outcome.error);
        break;
      case 'tooBig':
        if (batch.length > 1) {
          // Smaller messages from now on; this one goes again, split.
          const sent = batch.reduce((sum, entry) => sum + entry.bytes, 0);
          this.maxMessageBytes = Math.max(1, Math.min(this.maxMessageBytes, sent) >> 1);
          requeue(batch);
        } else {
          this.counters.refusedReports++;
        }
        this.onError(outcome.error);
        break;
      case 'fatal':
        requeue(batch);
        this.fail(outcome.error);
        break;
      case 'failed':
        requeue(batch);
        this.failed(outcome.error);
        break;
      case 'aborted':
        requeue(batch);
        break;
    }
    this.settleWaiters();
  }

  private failed(error: ReporterError): void {
    this.failures++;
    this.notBefore = Math.max(this.notBefore, this.clock.Date.now() + backoffDelay(this.failures, this.backoff));
    if (!this.stopped) this.onError(error);
  }

  private oldestHeld(): number {
    let oldest = Number.POSITIVE_INFINITY;
    for (const entry of this.pending.values()) oldest = Math.min(oldest, entry.since);
    for (const entry of this.flight ?? []) oldest = Math.min(oldest, entry.since);
    return oldest;
  }

  private settleWaiters(): void {
    if (this.flushWaiters.length === 0) return;
    const oldest = this.oldestHeld();
    const waiting = this.flushWaiters;
    this.flushWaiters = [];
    for (const waiter of waiting) {
      if (waiter.upTo < oldest) waiter.resolve();
      else this.flushWaiters.push(waiter);
    }
  }

  // The stream.

  private openStream(): Promise<OpenResult> {
    return new Promise<OpenResult>((resolve) => {
      const socket = new WebSocket(this.streamUrl, {
        headers: { authorization: this.authorization },
        perMessageDeflate: false,
        followRedirects: false,
        maxPayload: MAX_ANSWER_BYTES,
      });
      let done = false;
      const finish = (result: OpenResult) => {
        if (done) return;
        done = true;
        this.clock.clearTimeout(timer);
        this.abortCurrent = undefined;
        socket.off('open', onOpen);
        socket.off('close', onClosed);
        if (result.kind !== 'open') {
          // ws reports its own abort of the handshake as an error: heard, ignored.
          socket.on('error', () => undefined);
          socket.terminate();
        }
        socket.off('error', onFailed);
        resolve(result);
      };
      const onOpen = () => finish({ kind: 'open', socket });
      const onFailed = (error: Error) => finish({ kind: 'network', error });
      const onClosed = () => finish({ kind: 'network', error: new Error('connection closed') });
      const timer = this.clock.setTimeout(() => finish({ kind: 'timeout' }), this.requestTimeoutMs);
      this.abortCurrent = () => finish({ kind: 'aborted' });
      socket.once('open', onOpen);
      socket.on('error', onFailed);
      socket.once('close', onClosed);
      // An HTTP answer instead of the upgrade: its status and the service's message.
      socket.once('unexpected-response', (_request, response) => {
        const chunks: Buffer[] = [];
        let size = 0;
        const answered = () =>
          finish({
            kind: 'answered',
            status: response.statusCode ?? 0,
            message: errorMessage(Buffer.concat(chunks).toString('utf8')) || (response.statusMessage ?? ''),
          });
        response.on('data', (chunk: Buffer) => {
          if (size < MAX_ERROR_BODY_BYTES) chunks.push(chunk);
          size += chunk.length;
        });
        response.once('end', answered);
        response.once('error', answered);
        response.once('close', answered);
      });
    });
  }

  private attach(socket: WebSocket): void {
    this.socket = socket;
    socket.on('error', () => undefined); // 'close' follows and says what happened
    socket.on('message', (data, isBinary) => this.onMessage(socket, data, isBinary));
    socket.once('close', (code, reason) => this.onClose(socket, code, reason.toString('utf8')));
  }

  /** Gives up on this stream: what is in flight settles with `outcome`, the socket is cut. */
  private abandon(socket: WebSocket, outcome: Outcome): void {
    if (this.socket === socket) this.socket = undefined;
    const waiter = this.ackWaiter?.socket === socket ? this.ackWaiter : undefined;
    if (waiter) this.ackWaiter = undefined;
    socket.terminate();
    if (waiter) waiter.resolve(outcome);
    else if (outcome.kind === 'failed') this.failed(outcome.error);
  }

  private onMessage(socket: WebSocket, data: WebSocket.RawData, isBinary: boolean): void {
    if (this.socket !== socket) return;
    const waiter = this.ackWaiter;
    let answer: { seq?: unknown; accepted?: unknown; dropped?: unknown; retry_after?: unknown; error?: unknown };
    try {
      if (isBinary || !Buffer.isBuffer(data)) throw new Error('a binary message');
      answer = JSON.parse(data.toString('utf8')) as typeof answer;
      if (answer === null || typeof answer !== 'object') throw new Error('not a JSON object');
    } catch (err) {
      this.protocolError(socket, `unreadable answer on the stream: ${(err as Error).message}`);
      return;
    }
    // `"seq": null` answers a message the service could not read: with one in flight, that one.
    const refusedUnread = answer.seq === null && typeof answer.error === 'string';
    if (!waiter || (answer.seq !== waiter.seq && !refusedUnread)) {
      const said = typeof answer.error === 'string' ? `: ${answer.error}` : '';
      this.protocolError(socket, `unexpected answer on the stream (seq ${String(answer.seq)})${said}`);
      return;
    }
    if (typeof answer.error === 'string') {
      this.ackWaiter = undefined;
      waiter.resolve({
        kind: 'refused',
        error: new ReporterError(`metabatch refused a report (nothing of it applied): ${answer.error}`),
      });
      return;
    }
    if (typeof answer.accepted !== 'number' || typeof answer.dropped !== 'number') {
      this.protocolError(socket, 'an answer on the stream without accepted and dropped counts');
      return;
    }
    this.ackWaiter = undefined;
    waiter.resolve({
      kind: 'ack',
      accepted: answer.accepted,
      dropped: answer.dropped,
      retryAfterS: retryAfterSeconds(answer.retry_after),
    });
  }

  /** An answer that does not follow the protocol: the stream is cut, what is in flight goes again after a backoff. */
  private protocolError(socket: WebSocket, message: string): void {
    this.abandon(socket, { kind: 'failed', error: new ReporterError(message) });
  }

  private onClose(socket: WebSocket, code: number, reason: string): void {
    // Already abandoned (a timeout, a protocol error), or closed by stop().
    if (this.socket !== socket) return;
    this.socket = undefined;
    const said = reason ? ` ${reason}` : '';
    let outcome: Outcome;
    if (this.stopped) {
      outcome = { kind: 'aborted' };
    } else if (code === CLOSE_TOKEN_REVOKED) {
      outcome = { kind: 'fatal', error: this.tokenRefused(undefined, reason || 'token revoked', code) };
    } else if (code === CLOSE_TOO_BIG) {
      outcome = {
        kind: 'tooBig',
        error: new ReporterError(`metabatch closed the stream: message too big (${code}${said})`, { closeCode: code }),
      };
    } else {
      outcome = {
        kind: 'failed',
        error: new ReporterError(`metabatch closed the stream (${code}${said}): reconnecting`, { closeCode: code }),
      };
    }
    const waiter = this.ackWaiter;
    this.ackWaiter = undefined;
    if (waiter) {
      waiter.resolve(outcome);
      return;
    }
    // Closed while idle: nothing in flight.
    if (outcome.kind === 'fatal') this.fail(outcome.error);
    else if (outcome.kind === 'failed') this.failed(outcome.error);
  }

  private sendOnStream(socket: WebSocket, batch: Entry[]): Promise<Outcome> {
    const seq = ++this.seq;
    const message = `{"seq":${seq},"metadata":[${batch.map((entry) => entry.json).join(',')}]}`;
    return new Promise<Outcome>((resolve) => {
      const timer = this.clock.setTimeout(() => {
        const error = new ReporterError(`no answer on the stream within ${this.requestTimeoutMs} ms`);
        this.abandon(socket, { kind: 'failed', error });
      }, this.requestTimeoutMs);
      this.ackWaiter = {
        socket,
        seq,
        resolve: (outcome) => {
          this.clock.clearTimeout(timer);
          this.abortCurrent = undefined;
          resolve(outcome);
        },
      };
      this.abortCurrent = () => this.abandon(socket, { kind: 'aborted' });
      this.counters.sent++;
      socket.send(message, (err) => {
        if (err) this.abandon(socket, { kind: 'failed', error: new ReporterError(`cannot send: ${err.message}`) });
      });
    });
  }

  // The POST fallback.

  private post(batch: Entry[]): Promise<Outcome> {
    const body = `{"metadata":[${batch.map((entry) => entry.json).join(',')}]}`;
    const secure = this.postUrl.protocol === 'https:';
    this.httpAgent ??= secure
      ? new https.Agent({ keepAlive: true, maxSockets: 1 })
      : new http.Agent({ keepAlive: true, maxSockets: 1 });
    return new Promise<Outcome>((resolve) => {
      let done = false;
      const finish = (outcome: Outcome) => {
        if (done) return;
        done = true;
        this.clock.clearTimeout(timer);
        this.abortCurrent = undefined;
        this.inFlightRequests.delete(request);
        resolve(outcome);
      };
      const request = (secure ? https : http).request(this.postUrl, {
        method: 'POST',
        agent: this.httpAgent,
        headers: {
          authorization: this.authorization,
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(body),
        },
      });
      this.inFlightRequests.add(request);
      const timer = this.clock.setTimeout(() => {
        finish({
          kind: 'failed',
          error: new ReporterError(`no answer to the POST within ${this.requestTimeoutMs} ms`),
        });
        request.destroy();
      }, this.requestTimeoutMs);
      this.abortCurrent = () => {
        finish({ kind: 'aborted' });
        request.destroy();
      };
      request.once('error', (err) =>
        finish({ kind: 'failed', error: new ReporterError(`cannot reach metabatch: ${err.message}`, { cause: err }) }),
      );
      request.once('response', (response) => {
        const chunks: Buffer[] = [];
        let size = 0;
        response.on('data', (chunk: Buffer) => {
          if (size < MAX_ANSWER_BYTES) chunks.push(chunk);
          size += chunk.length;
        });
        response.once('error', (err) =>
          finish({ kind: 'failed', error: new ReporterError(`the POST's answer broke off: ${err.message}`) }),
        );
        response.once('end', () => {
          const status = response.statusCode ?? 0;
          finish(this.postOutcome(status, Buffer.concat(chunks).toString('utf8'), response.headers['retry-after']));
        });
      });
      this.counters.sent++;
      request.end(body);
    });
  }

  private postOutcome(status: number, body: string, retryAfter: string | undefined): Outcome {
    if (status === 202 || status === 429) {
      try {
        const counts = JSON.parse(body) as { accepted?: unknown; dropped?: unknown };
        if (typeof counts.accepted === 'number' && typeof counts.dropped === 'number') {
          return {
            kind: 'ack',
            accepted: counts.accepted,
            dropped: counts.dropped,
            retryAfterS: retryAfterSeconds(retryAfter),
          };
        }
      } catch {
        // An answer we cannot read: like a failure below.
      }
    }
    const message = errorMessage(body);
    if (status === 401 || status === 403) return { kind: 'fatal', error: this.tokenRefused(status, message) };
    if (status === 413) {
      return {
        kind: 'tooBig',
        error: new ReporterError(`metabatch refused a POST as too big: ${message}`, { status }),
      };
    }
    if (status === 400 || status === 415) {
      return {
        kind: 'refused',
        error: new ReporterError(`metabatch refused a report (${status}, nothing of it applied): ${message}`, {
          status,
        }),
      };
    }
    return {
      kind: 'failed',
      error: new ReporterError(`metabatch answered the POST ${status}: ${message}`, { status }),
    };
  }
}
