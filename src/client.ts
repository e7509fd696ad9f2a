// The listener SDK (`metabatch/client`): a reliable LISTEN on the batch
// channel that hands over decoded agent ids. It holds one dedicated
// connection (pg-listen), checks it every 10 s, and reconnects with backoff
// forever. NOTIFY never replays what was missed while disconnected, so after
// every reconnect `onResync` fires before any further batch: re-read the
// table then.

import pgListen from 'pg-listen';
import { decodeAgentIdChunk } from './agentIdChunks.js';
import { backoffDelay } from './backoff.js';
import { DEFAULT_NOTIFY_CHANNEL, DEFAULTS } from './config.js';

export interface SubscribeOptions {
  /** postgres:// URL of the database metabatch writes to. */
  databaseUrl: string;
  /** NOTIFY channel; default `workspace_agent_metadata_batch`. */
  channel?: string;
  /** The agents (lower-case UUIDs) a batch changed; one call per NOTIFY payload. */
  onBatch: (agentIds: string[]) => void;
  /** After a reconnect (not the first connect), before further batches: batches may have been missed. */
  onResync?: () => void;
  /** Connection problems and undecodable payloads; the subscription carries on. Default: ignored. */
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

class SubscriptionClosed extends Error {}

// CommonJS with exports.default: from ESM the function is `.default`.
const createSubscriber = pgListen.default;

/** Starts listening; resolves once the LISTEN is in place. */
export async function subscribe(options: SubscribeOptions): Promise<Subscription> {
  const channel = options.channel ?? DEFAULT_NOTIFY_CHANNEL;
  const onError = options.onError ?? (() => undefined);
  let closed = false;
  let firstConnect = true;
  const subscriber = createSubscriber(
    { connectionString: options.databaseUrl, application_name: options.applicationName ?? 'metabatch-listener' },
    {
      // Payloads are raw base64, not JSON.
      parse: (payload: string) => payload,
      serialize: (payload: string) => payload,
      paranoidChecking: HEALTH_CHECK_MS,
      // pg-listen gives up after retryTimeout (3 s by default): never give up.
      retryTimeout: 0,
      retryLimit: Number.POSITIVE_INFINITY,
      retryInterval: (attempt: number) => {
        // Thrown inside pg-listen's reconnect loop, this ends it after close().
        if (closed) throw new SubscriptionClosed('subscription closed');
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
  subscriber.notifications.on(channel, (payload: string | undefined) => {
    if (closed || payload === undefined) return;
    let ids: string[];
    try {
      ids = decodeAgentIdChunk(payload);
    } catch (err) {
      onError(err as Error);
      return;
    }
    options.onBatch(ids);
  });
  try {
    await subscriber.connect();
    await subscriber.listenTo(channel);
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
