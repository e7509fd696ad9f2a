// Exponential backoff with jitter, as Synapse's appservice recoverer uses
// (seeds/001): each failure doubles the wait up to a cap, the first success
// resets it. Jitter keeps several replicas from retrying in lockstep.

export interface BackoffOptions {
  /** First delay. 100 ms retries a blip (a failover, a killed backend) at once. */
  initialMs?: number;
  /** Largest delay. 30 s keeps a long outage to two attempts a minute. */
  maxMs?: number;
  /** Source of randomness in [0, 1), injectable for tests. */
  random?: () => number;
}

export class Backoff {
  private readonly initialMs: number;
  private readonly maxMs: number;
  private readonly random: () => number;
  private failures = 0;

  constructor(options: BackoffOptions = {}) {
    this.initialMs = options.initialMs ?? 100;
    this.maxMs = options.maxMs ?? 30_000;
    this.random = options.random ?? Math.random;
  }

  /** Failures since the last success. */
  get attempts(): number {
    return this.failures;
  }

  /** Records a failure and returns how long to wait before the next try: half fixed, half random. */
  next(): number {
    const ceiling = Math.min(this.maxMs, this.initialMs * 2 ** Math.min(this.failures, 30));
    this.failures++;
    return Math.round(ceiling / 2 + (ceiling / 2) * this.random());
  }

  reset(): void {
    this.failures = 0;
  }
}
