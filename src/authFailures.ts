// Failed authentications: counted by kind, logged at info at most once per
// 10 s per client address (the line says how many it stands for, never the
// token), and bounded per address by a token bucket that only failures drain.
// Past the bound, every authenticated request from that address is answered
// 429 with Retry-After before any token is looked up; successes cost nothing,
// so a fleet's good tokens never use it up.
//
// Our own bucket, not @fastify/rate-limit: that plugin counts every request in
// its onRequest hook (its store has `incr` only, no way to count just the
// failures or to give a success back) and runs its windows on real timers,
// where this one reads the injected clock.

import { isIPv6 } from 'node:net';
import { LRUCache } from 'lru-cache';
import type { Clock } from './clock.js';
import { HttpError } from './errors.js';
import type { Logger } from './logger.js';
import type { AuthFailureKind, AuthMetrics } from './metrics.js';

/** One line per address per this period at most; the next says how many were not logged. */
export const AUTH_FAILURE_LOG_INTERVAL_MS = 10_000;

/** A refusal for the request's credentials (401, 403), of a kind that is counted. */
export class AuthError extends HttpError {
  constructor(
    statusCode: 401 | 403,
    message: string,
    readonly kind: AuthFailureKind,
  ) {
    super(statusCode, message);
  }
}

export interface AuthFailureLimits {
  /** Failures an address gets back each second. */
  ratePerSecond: number;
  /** Failures an address may have in a row before it is throttled (the bucket's size). */
  burst: number;
  /** Addresses remembered at most; the least recently failing is forgotten first. */
  maxAddresses: number;
}

export interface AuthFailuresOptions extends AuthFailureLimits {
  metrics: AuthMetrics;
  logger: Logger;
  clock: Clock;
}

interface AddressState {
  /** Failures left, refilled at ratePerSecond up to burst. */
  tokens: number;
  /** When `tokens` was last brought up to date. */
  at: number;
  /** When a line about this address was last logged. */
  loggedAt: number;
  /** Failures since that line, not logged. */
  suppressed: number;
  /** Requests answered 429 since that line. */
  throttled: number;
  /** Token lookups of this address under way: each may be a failure, so each holds one back. */
  inFlight: number;
}

export class AuthFailures {
  private readonly addresses: LRUCache<string, AddressState>;
  private readonly metrics: AuthMetrics;
  private readonly logger: Logger;
  private readonly clock: Clock;
  private readonly ratePerMs: number;
  private readonly burst: number;

  constructor(options: AuthFailuresOptions) {
    this.metrics = options.metrics;
    this.logger = options.logger;
    this.clock = options.clock;
    this.ratePerMs = options.ratePerSecond / 1000;
    this.burst = options.burst;
    this.addresses = new LRUCache({
      max: options.maxAddresses,
      dispose: (_state, _key, reason) => {
        if (reason === 'evict') this.metrics.addressesEvictedTotal.inc();
      },
    });
    this.metrics.bind({ addresses: () => this.addresses.size });
  }

  /**
   * Whole seconds (at least 1) until the address may fail again, when it has
   * no failure left: the address is then throttled (src/access.ts: only
   * credentials checked without a query pass). Undefined: go on.
   */
  retryAfter(ip: string): number | undefined {
    const state = this.addresses.peek(clientKey(ip));
    if (state === undefined) return undefined;
    this.refill(state);
    const left = state.tokens - state.inFlight;
    if (left >= 1) return undefined;
    return Math.max(1, Math.ceil((1 - left) / this.ratePerMs / 1000));
  }

  /** A request of a throttled address was refused with 429 (its credentials needed the database, or were wrong). */
  throttled(ip: string): void {
    const state = this.addresses.peek(clientKey(ip));
    if (state) state.throttled++;
    this.metrics.throttledTotal.inc();
  }

  /**
   * A token lookup of this address begins (a query): until it ends, it holds
   * one failure back, so that many concurrent guesses cannot all pass while
   * the first are still being looked up. Returns its end. An address that
   * never failed has nothing to hold back: it is not remembered for a success.
   */
  lookupStarted(ip: string): () => void {
    const state = this.addresses.peek(clientKey(ip));
    if (state === undefined) return noop;
    state.inFlight++;
    return () => state.inFlight--;
  }

  /** A request refused for its credentials: counted, charged to its address, logged (rate-limited). */
  record(ip: string, kind: AuthFailureKind, route: string | undefined): void {
    this.metrics.failuresTotal.inc({ kind });
    const key = clientKey(ip);
    const now = this.clock.Date.now();
    let state = this.addresses.get(key);
    if (state === undefined) {
      state = { tokens: this.burst, at: now, loggedAt: -Infinity, suppressed: 0, throttled: 0, inFlight: 0 };
      this.addresses.set(key, state);
    }
    this.refill(state);
    // A request without credentials guesses nothing: counted and logged, not charged.
    if (kind !== 'missing') state.tokens = Math.max(0, state.tokens - 1);
    if (now - state.loggedAt < AUTH_FAILURE_LOG_INTERVAL_MS) {
      state.suppressed++;
      return;
    }
    const { suppressed, throttled } = state;
    this.logger.info(
      { address: ip, kind, route, suppressed, throttled, throttling: state.tokens < 1 },
      suppressed + throttled === 0
        ? 'authentication failed'
        : `authentication failed; since the last line from this address ${suppressed} more failures and ` +
            `${throttled} throttled requests were not logged`,
    );
    state.loggedAt = now;
    state.suppressed = 0;
    state.throttled = 0;
  }

  private refill(state: AddressState): void {
    const now = this.clock.Date.now();
    state.tokens = Math.min(this.burst, state.tokens + Math.max(0, now - state.at) * this.ratePerMs);
    state.at = now;
  }
}

const noop = (): void => undefined;

/**
 * The bucket an address belongs to: an IPv4 address (also when IPv4-mapped),
 * or an IPv6 address's /64, the block one host or site is usually given, so
 * that a client cannot start afresh by taking the next of its 2^64 addresses.
 */
export function clientKey(ip: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  if (mapped) return mapped[1]!;
  // An IPv4 tail in any other IPv6 form (NAT64's 64:ff9b::/96) is one client per address.
  if (!isIPv6(ip) || ip.includes('.')) return ip;
  const [head = '', tail] = ip.split('%')[0]!.toLowerCase().split('::');
  const front = head === '' ? [] : head.split(':');
  const back = tail === undefined || tail === '' ? [] : tail.split(':');
  const groups = [...front, ...Array<string>(8 - front.length - back.length).fill('0'), ...back];
  return `${groups
    .slice(0, 4)
    .map((group) => group.replace(/^0+(?=.)/, ''))
    .join(':')}::/64`;
}
