// A reliable LISTEN: one dedicated connection (pg-listen) on one or more
// channels, checked every 10 s, reconnecting with backoff forever. NOTIFY
// never replays what was missed while disconnected, so after every reconnect
// `onResync` fires before any further payload: re-read what you watch then.
// The listener SDK (client.ts) and the service's one LISTEN connection are
// both this.

import pgListen from 'pg-listen';
import { backoffDelay } from './backoff.js';
import { DEFAULTS } from './config.js';

export interface ListenOptions {
  /** postgres:// URL of the database. */
  databaseUrl: string;
  /** Each channel and what to do with its raw payloads. */
  channels: Record<string, (payload: string) => void>;
  /** After a reconnect (not the first connect), before further payloads: some may have been missed. */
  onResync?: () => void;
  /** Connection problems; the listener carries on. Default: ignored. */
  onError?: (err: Error) => void;
  /** application_name of the connection, as pg_stat_activity shows it. Default `metabatch-listener`. */
  applicationName?: string;
}

export interface Subscription {
  /** Stops listening and closes the connection. Idempotent. */
  close(): Promise<void>;
}

// How often the connection is checked with a trivial query.
const HEALTH_CHECK_MS = 10_000;
// Reconnects back off as every retry of metabatch does (backoff.ts), from
// 100 ms to 5 s (`DEFAULTS.reconnect`).
const RECONNECT = { ...DEFAULTS.reconnect, random: Math.random };

class ListenerClosed extends Error {}

// CommonJS with exports.default: from ESM the function is `.default`.
const createSubscriber = pgListen.default;

/** Starts listening; resolves once every LISTEN is in place. */
export async function listen(options: ListenOptions): Promise<Subscription> {
  const onError = options.onError ?? (() => undefined);
  let closed = false;
  let firstConnect = true;
  const subscriber = createSubscriber(
    { connectionString: options.databaseUrl, application_name: options.applicationName ?? 'metabatch-listener' },
    {
      // Payloads are handed over as sent (base64 ids, control JSON): no parsing here.
      parse: (payload: string) => payload,
      serialize: (payload: string) => payload,
      paranoidChecking: HEALTH_CHECK_MS,
      // pg-listen gives up after retryTimeout (3 s by default): never give up.
      retryTimeout: 0,
      retryLimit: Number.POSITIVE_INFINITY,
      retryInterval: (attempt: number) => {
        // Thrown inside pg-listen's reconnect loop, this ends it after close().
        if (closed) throw new ListenerClosed('listener closed');
        // pg-listen counts from 0 after the first failed attempt.
        return backoffDelay(attempt + 1, RECONNECT);
      },
    },
  );
  subscriber.events.on('error', (err: Error) => {
    if (!closed) onError(err);
  });
  subscriber.events.on('connected', () => {
    if (closed) {
      // A reconnect that finished after close(): end that connection too.
      void subscriber.close().catch(() => undefined);
      return;
    }
    if (firstConnect) {
      firstConnect = false;
      return;
    }
    options.onResync?.();
  });
  for (const [channel, handle] of Object.entries(options.channels)) {
    subscriber.notifications.on(channel, (payload: string | undefined) => {
      if (!closed && payload !== undefined) handle(payload);
    });
  }
  try {
    await subscriber.connect();
    for (const channel of Object.keys(options.channels)) await subscriber.listenTo(channel);
  } catch (err) {
    closed = true;
    await subscriber.close().catch(() => undefined);
    throw err;
  }
  let closing: Promise<void> | undefined;
  return {
    close() {
      closed = true;
      closing ??= subscriber.close().then(
        () => undefined,
        () => undefined,
      );
      return closing;
    },
  };
}
