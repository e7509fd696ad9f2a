// The reporter's interface (`createReporter`, reporter.ts): what it is given,
// its options with their defaults and why each has its value, checked once
// when the reporter is created (a wrong option is a TypeError or RangeError
// then, never later in the loop), and what it answers.

import type { Clock } from './clock.js';
import { DEFAULTS } from './config.js';
import { MAX_ALL_KEYS_BYTES } from './report.js';
import type { ReportValue } from './reporterBook.js';
import type { ReporterError } from './reporterOutcome.js';

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
   * It must not throw: a throw stops the reporter (as a fatal error it is not told of).
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
  /** New keys refused: `maxKeys` distinct keys are held already, or the reporter stopped. */
  refused: number;
  /** Set once the reporter stopped for good (its token was refused): nothing is taken any more. */
  stopped?: true;
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
  /** Keys `report()` refused: `maxKeys` were held, or the reporter had stopped. */
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
   * `collected_at`; never waits. Never throws for a condition of the service:
   * once the token was refused (`onError` has heard why, with `err.fatal`) it
   * takes nothing and answers `{accepted: 0, refused: n, stopped: true}`.
   * Throws a ReporterError once `close()` was called, a TypeError/RangeError
   * for a key the service would refuse (empty, over 127 characters, NUL
   * characters): those are the caller's bugs.
   */
  report(values: Readonly<Record<string, ReportValue>>): ReportResult;
  /** Resolves once everything reported so far is acknowledged, or refused for good. */
  flush(): Promise<void>;
  /** Flushes what it holds (at most `closeTimeoutMs`), closes the stream, leaves no timers. Idempotent. */
  close(): Promise<ReporterCloseResult>;
  stats(): ReporterStats;
}

/** The options checked, with their defaults, and the addresses and header they make. */
export interface ReporterSettings {
  authorization: string;
  postUrl: URL;
  streamUrl: URL;
  onError: (err: ReporterError) => void;
  maxKeys: number;
  maxMessageBytes: number;
  requestTimeoutMs: number;
  streamRetryMs: number;
  closeTimeoutMs: number;
  backoff: { initialMs: number; maxMs: number; random: () => number };
  clock: Clock;
  random: () => number;
}

// The most keys one report can carry (one byte a key at least): more held
// keys than that would only wait for later reports.
const DEFAULT_MAX_KEYS = MAX_ALL_KEYS_BYTES;
// A quarter of the service's 1 MiB message bound: room for the service's
// own framing, and a message the service never refuses as too big.
const DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024;
// The service answers a report without waiting on its database (it drops
// keys and says so rather than wait): a send unanswered for 30 s is lost.
const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
// A service upgraded to one with the stream is found within half a minute,
// while a service without it costs one refused upgrade per 30 s.
const DEFAULT_STREAM_RETRY_MS = 30_000;
// close() runs in the agent's own shutdown: 5 s leaves most of a usual grace
// period (Kubernetes gives 30 s) to the rest of the agent.
const DEFAULT_CLOSE_TIMEOUT_MS = 5000;

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

/** Checks the options (TypeError, RangeError) and fills in the defaults. */
export function reporterSettings(options: ReporterOptions): ReporterSettings {
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
  const agentPath = `v1/agents/${encodeURIComponent(options.agentId)}/metadata`;
  const streamUrl = new URL(`${agentPath}/stream`, base);
  streamUrl.protocol = base.protocol === 'https:' ? 'wss:' : 'ws:';
  const random = options.random ?? Math.random;
  return {
    authorization: `Bearer ${options.token}`,
    postUrl: new URL(agentPath, base),
    streamUrl,
    onError: options.onError ?? (() => undefined),
    maxKeys: positiveInteger('maxKeys', options.maxKeys, DEFAULT_MAX_KEYS),
    maxMessageBytes: positiveInteger('maxMessageBytes', options.maxMessageBytes, DEFAULT_MAX_MESSAGE_BYTES),
    requestTimeoutMs: positiveInteger('requestTimeoutMs', options.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS),
    streamRetryMs: nonNegative('streamRetryMs', options.streamRetryMs, DEFAULT_STREAM_RETRY_MS),
    closeTimeoutMs: nonNegative('closeTimeoutMs', options.closeTimeoutMs, DEFAULT_CLOSE_TIMEOUT_MS),
    backoff: {
      initialMs: positiveInteger('reconnect.initialMs', options.reconnect?.initialMs, DEFAULTS.reconnect.initialMs),
      maxMs: positiveInteger('reconnect.maxMs', options.reconnect?.maxMs, DEFAULTS.reconnect.maxMs),
      random,
    },
    clock: options.clock ?? globalThis,
    random,
  };
}
