// The listener SDK (`metabatch/client`): a reliable LISTEN on the batch
// channel that hands over decoded agent ids (listener.ts: one dedicated
// connection, checked every 10 s, reconnecting with backoff forever). NOTIFY
// never replays what was missed while disconnected, so after every reconnect
// `onResync` fires before any further batch: re-read the table then.
// For agents, `createReporter` (reporter.ts) reports an agent's keys: over the
// metadata stream, or by POST where the service has no stream.

import { decodeAgentIdChunk } from './agentIdChunks.js';
import { DEFAULT_NOTIFY_CHANNEL } from './config.js';
import { listen, type Subscription } from './listener.js';

export type { Subscription } from './listener.js';
export { createReporter, ReporterError } from './reporter.js';
export type {
  ReporterCloseResult,
  Reporter,
  ReporterOptions,
  ReporterStats,
  ReportResult,
  ReportValue,
} from './reporter.js';

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

/** Starts listening; resolves once the LISTEN is in place. */
export function subscribe(options: SubscribeOptions): Promise<Subscription> {
  const onError = options.onError ?? (() => undefined);
  return listen({
    databaseUrl: options.databaseUrl,
    channels: {
      [options.channel ?? DEFAULT_NOTIFY_CHANNEL]: (payload) => {
        let ids: string[];
        try {
          ids = decodeAgentIdChunk(payload);
        } catch (err) {
          onError(err as Error);
          return;
        }
        options.onBatch(ids);
      },
    },
    onError,
    ...(options.onResync ? { onResync: options.onResync } : {}),
    ...(options.applicationName ? { applicationName: options.applicationName } : {}),
  });
}
