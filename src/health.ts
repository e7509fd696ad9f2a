// Whether Postgres answers: the truth behind `metabatch_database_up` and
// /readyz. Every statement the pool runs tells (a success means up, a
// connection failure means down); when nothing has succeeded for a while, a
// `SELECT 1` asks, so a dead database shows even when nothing is flushing.

import type pg from 'pg';
import type { Logger } from 'pino';
import { systemClock, type Clock } from './clock.js';
import { isConnectionError } from './database.js';

export interface DatabaseHealthOptions {
  pool: pg.Pool;
  logger: Logger;
  clock?: Clock;
  /** How long without a successful statement before a ping asks. Default 5000 ms. */
  intervalMs?: number;
  /** A ping's query slower than this counts as down. Default 3000 ms. */
  timeoutMs?: number;
  /** Called when the database comes back after being down. */
  onRecovered?: () => void;
}

// A dead database shows within 5 s when idle; under traffic no ping is sent.
const DEFAULT_INTERVAL_MS = 5000;
// A ping is one round trip: 3 s means the database (or the way to it) is stuck.
const DEFAULT_TIMEOUT_MS = 3000;

export class DatabaseHealth {
  private readonly pool: pg.Pool;
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly intervalMs: number;
  private readonly timeoutMs: number;
  private readonly onRecovered: (() => void) | undefined;
  private state: { up: true } | { up: false; error: string } = { up: true };
  private lastSuccessAt: number;
  private timer: unknown;
  private pinging: Promise<boolean> | undefined;
  private closed = false;

  constructor(options: DatabaseHealthOptions) {
    this.pool = options.pool;
    this.log = options.logger;
    this.clock = options.clock ?? systemClock;
    this.intervalMs = options.intervalMs ?? DEFAULT_INTERVAL_MS;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.onRecovered = options.onRecovered;
    this.lastSuccessAt = this.clock.Date.now();
    this.pool.on('release', this.onRelease);
    this.schedule();
  }

  /** Whether the last statement or ping reached Postgres. */
  get up(): boolean {
    return this.state.up;
  }

  /** Why the database counts as down, if it does. */
  get error(): string | undefined {
    return this.state.up ? undefined : this.state.error;
  }

  /** Asks Postgres now (one ping at a time); resolves to whether it answered. */
  check(): Promise<boolean> {
    this.pinging ??= this.ping().finally(() => (this.pinging = undefined));
    return this.pinging;
  }

  close(): void {
    this.closed = true;
    this.clock.clearTimeout(this.timer);
    this.pool.off('release', this.onRelease);
  }

  // Every pool.query ends by releasing its connection, with the error if it failed.
  private readonly onRelease = (err: Error | undefined): void => {
    if (!err) this.record(undefined);
    else if (isConnectionError(err)) this.record(err);
  };

  private async ping(): Promise<boolean> {
    try {
      // pg's own timer bounds the round trip (the pool bounds the connect);
      // pg reads a per-query query_timeout that its types do not list.
      const ping: pg.QueryConfig & { query_timeout: number } = { text: 'SELECT 1', query_timeout: this.timeoutMs };
      await this.pool.query(ping);
      this.record(undefined);
    } catch (err) {
      this.record(err as Error);
    }
    return this.state.up;
  }

  private record(err: Error | undefined): void {
    const wasUp = this.state.up;
    if (err === undefined) {
      this.lastSuccessAt = this.clock.Date.now();
      this.state = { up: true };
      if (!wasUp) {
        this.log.info('database reachable again');
        this.onRecovered?.();
      }
      return;
    }
    this.state = { up: false, error: err.message };
    if (wasUp) this.log.error({ err }, 'database unreachable');
  }

  private schedule(): void {
    if (this.closed) return;
    this.timer = this.clock.setTimeout(() => {
      const idle = this.clock.Date.now() - this.lastSuccessAt >= this.intervalMs;
      const next = () => this.schedule();
      if (idle || !this.state.up) void this.check().finally(next);
      else next();
    }, this.intervalMs);
  }
}
