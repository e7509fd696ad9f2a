// Exponential backoff with jitter, the one retry schedule of metabatch: a
// failed flush, a failed NOTIFY, a LISTEN reconnect, and the Retry-After a
// refused client is told all come from here. As Synapse's appservice
// recoverer does it: each failure doubles the wait up to a cap, the first
// success resets it; half of each wait is random, so that several replicas
// do not retry in lockstep.

import { DEFAULTS } from './config.js';

export interface BackoffOptions {
  /** First delay. Default `DEFAULTS.retry.initialMs`. */
  initialMs?: number;
  /** Largest delay. Default `DEFAULTS.retry.maxMs`. */
  maxMs?: number;
  /** Source of randomness in [0, 1), injectable for tests. */
  random?: () => number;
}

/** The longest wait after `failures` failures in a row (the first is `initialMs`). */
export function backoffCeiling(failures: number, initialMs: number, maxMs: number): number {
  return Math.min(maxMs, initialMs * 2 ** Math.min(Math.max(failures - 1, 0), 30));
}

/** A wait after `failures` failures in a row: half fixed, half random. */
export function backoffDelay(failures: number, options: Required<BackoffOptions>): number {
  const ceiling = backoffCeiling(failures, options.initialMs, options.maxMs);
  return Math.round(ceiling / 2 + (ceiling / 2) * options.random());
}

/** The backoff of one thing that fails and recovers: counts failures since the last success. */
export class Backoff {
  private readonly options: Required<BackoffOptions>;
  private failures = 0;

  constructor(options: BackoffOptions = {}) {
    this.options = {
      initialMs: options.initialMs ?? DEFAULTS.retry.initialMs,
      maxMs: options.maxMs ?? DEFAULTS.retry.maxMs,
      random: options.random ?? Math.random,
    };
  }

  /** Failures since the last success. */
  get attempts(): number {
    return this.failures;
  }

  /** The longest the current wait can be (0 when nothing failed): what Retry-After is derived from. */
  get ceilingMs(): number {
    return this.failures === 0 ? 0 : backoffCeiling(this.failures, this.options.initialMs, this.options.maxMs);
  }

  /** Records a failure and returns how long to wait before the next try. */
  next(): number {
    this.failures++;
    return backoffDelay(this.failures, this.options);
  }

  reset(): void {
    this.failures = 0;
  }
}
