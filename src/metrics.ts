// The batcher's Prometheus metrics: the original's seven (same buckets, labels
// and help texts, under the `metabatch_` prefix) plus the ones a service that
// keeps failed batches needs. One instance per registry; tests use a fresh
// Registry each.
//
// Longer than our other files: the metric families of ingest, the batcher,
// the watch hub and the stream are declared here together (the background
// processes' are in background.ts, the pool's in database.ts), each with its
// help text, so that /metrics, the dashboard and the README have few places
// to agree with.

import { Counter, Gauge, Histogram, type LabelValues, type Registry } from 'prom-client';
import { NOTIFY_SINK } from './announcers.js';

export const FLUSH_REASONS = ['capacity', 'scheduled', 'shutdown'] as const;
export type FlushReason = (typeof FLUSH_REASONS)[number];

/** What the gauges read at scrape time. */
export interface BatcherGaugeSource {
  channelDepth(): number;
  channelCapacity(): number;
  heldKeys(): number;
  maxHeldKeys(): number;
  flushesFailing(): boolean;
}

export class BatcherMetrics {
  readonly batchUtilization: Histogram;
  readonly batchSize: Histogram;
  readonly flushDuration: Histogram<'reason'>;
  readonly batchesTotal: Counter<'reason'>;
  readonly droppedKeysTotal: Counter;
  readonly flushedTotal: Counter;
  readonly publishErrorsTotal: Counter<'sink'>;
  readonly flushErrorsTotal: Counter;
  readonly heldLimitRefusedKeysTotal: Counter;
  readonly undeclaredRefusedKeysTotal: Counter;
  readonly undeclaredKeysTotal: Counter;
  readonly staleKeysTotal: Counter;
  readonly notifyPayloadsTotal: Counter;
  readonly announceDroppedAgentsTotal: Counter<'sink'>;
  private source: BatcherGaugeSource | undefined;

  constructor(registry: Registry) {
    const registers = [registry];
    this.batchUtilization = new Histogram({
      name: 'metabatch_metadata_batch_utilization',
      help: 'Number of metadata keys per agent in each batch, updated before flushes.',
      buckets: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 40, 80, 160],
      registers,
    });
    this.batchSize = new Histogram({
      name: 'metabatch_metadata_batch_size',
      help: 'Total number of metadata entries in each batch, updated before flushes.',
      buckets: [10, 25, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500],
      registers,
    });
    this.flushDuration = new Histogram({
      name: 'metabatch_metadata_flush_duration_seconds',
      help: 'Time taken to flush metadata batch to database and pubsub.',
      labelNames: ['reason'],
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
      registers,
    });
    this.batchesTotal = new Counter({
      name: 'metabatch_metadata_batches_total',
      help: 'Total number of metadata batches flushed.',
      labelNames: ['reason'],
      registers,
    });
    this.droppedKeysTotal = new Counter({
      name: 'metabatch_metadata_dropped_keys_total',
      help: 'Total number of metadata keys dropped due to capacity limits.',
      registers,
    });
    this.flushedTotal = new Counter({
      name: 'metabatch_metadata_flushed_total',
      help: 'Total number of unique metadatas flushed.',
      registers,
    });
    this.publishErrorsTotal = new Counter({
      name: 'metabatch_metadata_publish_errors_total',
      help: 'Total number of metadata batch pubsub publish calls that have resulted in an error.',
      // By sink (announcers.ts): `notify` is the NOTIFY (the flush statement's or a Publisher's), as
      // the original counts; a sink added after it (Redis, a webhook) counts under its own name.
      labelNames: ['sink'],
      registers,
    });
    this.publishErrorsTotal.inc({ sink: NOTIFY_SINK }, 0);
    this.flushErrorsTotal = new Counter({
      name: 'metabatch_metadata_flush_errors_total',
      help: 'Total number of batch UPDATEs that failed; the batch is kept and retried.',
      registers,
    });
    this.heldLimitRefusedKeysTotal = new Counter({
      name: 'metabatch_metadata_held_limit_refused_keys_total',
      help: 'Total number of new metadata keys refused (429) because MAX_HELD_KEYS were held while flushes fail.',
      registers,
    });
    this.undeclaredRefusedKeysTotal = new Counter({
      name: 'metabatch_metadata_undeclared_refused_keys_total',
      help:
        'Total number of metadata keys refused (429) while flushes fail because the agent has not declared them ' +
        '(as this replica last read its definitions): no agent holds more than its declared keys.',
      registers,
    });
    this.undeclaredKeysTotal = new Counter({
      name: 'metabatch_metadata_undeclared_keys_total',
      help: 'Total number of flushed metadata keys ignored because the agent never declared them.',
      registers,
    });
    this.staleKeysTotal = new Counter({
      name: 'metabatch_metadata_stale_keys_total',
      help: 'Total number of flushed metadata keys not written because the row already held a newer collected_at.',
      registers,
    });
    this.notifyPayloadsTotal = new Counter({
      name: 'metabatch_metadata_notify_payloads_total',
      help: 'Total number of NOTIFY payloads published.',
      registers,
    });
    this.announceDroppedAgentsTotal = new Counter({
      name: 'metabatch_metadata_notify_given_up_agents_total',
      help: 'Agents whose failed announcement was given up because too many awaited a retry (Publisher path, or a sink after the NOTIFY), by sink; listeners resync on reconnect.',
      labelNames: ['sink'],
      registers,
    });
    this.announceDroppedAgentsTotal.inc({ sink: NOTIFY_SINK }, 0);
    const read = (pick: (source: BatcherGaugeSource) => number) =>
      function (this: Gauge) {
        // `this` is the gauge itself, as prom-client calls collect.
        const source = sourceOf();
        if (source) this.set(pick(source));
      };
    const sourceOf = () => this.source;
    new Gauge({
      name: 'metabatch_metadata_channel_depth',
      help: 'Metadata updates queued in the channel, waiting for the batcher loop.',
      registers,
      collect: read((s) => s.channelDepth()),
    });
    new Gauge({
      name: 'metabatch_metadata_channel_capacity',
      help: 'Capacity of the channel (BATCH_SIZE * CHANNEL_MULTIPLIER); updates beyond it are dropped.',
      registers,
      collect: read((s) => s.channelCapacity()),
    });
    new Gauge({
      name: 'metabatch_metadata_held_keys',
      help: 'Distinct (agent, key) entries held in the batch, not yet in the database.',
      registers,
      collect: read((s) => s.heldKeys()),
    });
    new Gauge({
      name: 'metabatch_metadata_max_held_keys',
      help: 'MAX_HELD_KEYS: distinct keys held at most while flushes fail; new keys beyond it are refused (429).',
      registers,
      collect: read((s) => s.maxHeldKeys()),
    });
    new Gauge({
      name: 'metabatch_metadata_flushes_failing',
      help: '1 from a failed batch UPDATE until one succeeds again (the batch is held and retried meanwhile), else 0.',
      registers,
      collect: read((s) => (s.flushesFailing() ? 1 : 0)),
    });
  }

  /** Lets the gauges read the batcher's state at scrape time. */
  bind(source: BatcherGaugeSource): void {
    this.source = source;
  }
}

/** `metabatch_database_up`: whether the last statement or ping reached Postgres (see health.ts). */
export function registerDatabaseUp(registry: Registry, up: () => boolean): void {
  new Gauge({
    name: 'metabatch_database_up',
    help: '1 while the last statement or health-check ping reached Postgres, else 0. /readyz answers 503 while it is 0.',
    registers: [registry],
    collect() {
      this.set(up() ? 1 : 0);
    },
  });
}

/** `metabatch_ready`: what /readyz answers, from what the service last knew (it does not ping). */
export function registerReady(registry: Registry, ready: () => boolean): void {
  new Gauge({
    name: 'metabatch_ready',
    help: '1 while /readyz answers 200 (not shutting down, the database reachable, flushes succeeding), else 0.',
    registers: [registry],
    collect() {
      this.set(ready() ? 1 : 0);
    },
  });
}

/** The listening side: the shared LISTEN connection and the SSE watchers it feeds. */
export class WatchMetrics {
  readonly listenerBatchesTotal: Counter;
  readonly listenerReconnectsTotal: Counter;
  readonly eventsSentTotal: Counter;
  readonly eventsDroppedTotal: Counter;
  readonly refetchErrorsTotal: Counter;
  readonly controlMessagesTotal: Counter<'type'>;
  /** Watch opens refused with 429, by the bound hit (src/watchLimits.ts). */
  readonly refusedTotal: Counter<'bound'>;
  /** Watch streams the service ended, by why (src/watchLimits.ts). */
  readonly closedTotal: Counter<'reason'>;
  private source: { streams(): number; agents(): number } | undefined;

  constructor(registry: Registry) {
    const registers = [registry];
    const sourceOf = () => this.source;
    new Gauge({
      name: 'metabatch_watchers',
      help: 'Server-Sent Events watch streams open.',
      registers,
      collect() {
        const source = sourceOf();
        if (source) this.set(source.streams());
      },
    });
    new Gauge({
      name: 'metabatch_watched_agents',
      help: 'Distinct agents watched by the open streams.',
      registers,
      collect() {
        const source = sourceOf();
        if (source) this.set(source.agents());
      },
    });
    this.controlMessagesTotal = new Counter({
      name: 'metabatch_control_messages_total',
      help: 'Control messages received by the shared listener (agents created, deleted, tokens rotated), by type.',
      labelNames: ['type'],
      registers,
    });
    this.listenerBatchesTotal = new Counter({
      name: 'metabatch_listener_batches_total',
      help: 'NOTIFY payloads received by the shared listener.',
      registers,
    });
    this.listenerReconnectsTotal = new Counter({
      name: 'metabatch_listener_reconnects_total',
      help: 'Times the shared LISTEN connection was re-established.',
      registers,
    });
    this.eventsSentTotal = new Counter({
      name: 'metabatch_watch_events_sent_total',
      help: 'Watch events written to clients.',
      registers,
    });
    this.eventsDroppedTotal = new Counter({
      name: 'metabatch_watch_events_dropped_total',
      help: 'Watch events replaced by a newer one before a slow client could take them.',
      registers,
    });
    this.refusedTotal = new Counter({
      name: 'metabatch_watch_refused_total',
      help:
        'Watch streams refused with 429, by the bound hit: agent (streams of one agent token), admin ' +
        '(streams of the admin token), replica (streams of this replica).',
      labelNames: ['bound'],
      registers,
    });
    this.closedTotal = new Counter({
      name: 'metabatch_watch_closed_total',
      help:
        'Watch streams the service ended, by reason: slow (over 1 MiB behind when a newer event came), ' +
        'token_rotated and agent_deleted (opened with a token revoked since).',
      labelNames: ['reason'],
      registers,
    });
    this.refetchErrorsTotal = new Counter({
      name: 'metabatch_watch_refetch_errors_total',
      help: 'Failed reads of watched agents after a batch; retried on the next tick.',
      registers,
    });
  }

  /** Lets the gauges read the watch hub at scrape time. */
  bind(source: { streams(): number; agents(): number }): void {
    this.source = source;
  }
}

/** Why a stream message was refused: an error answer, or the close it caused. */
export const STREAM_REJECT_REASONS = ['invalid', 'too_big', 'binary'] as const;
export type StreamRejectReason = (typeof STREAM_REJECT_REASONS)[number];

/** The close codes counted by their number; any other is counted as `other` (a client chooses its own). */
const STREAM_CLOSE_CODES = new Set([1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1013, 4001]);

/**
 * A counter's collect(): adds what `read()`, a plain number a hot path adds
 * to, gained since the last scrape (with `labels`, to that series).
 */
function catchUp<T extends string>(read: () => number, labels?: LabelValues<T>): (this: Counter<T>) => void {
  let seen = 0;
  return function (this: Counter<T>) {
    const now = read();
    if (now > seen) {
      if (labels) this.inc(labels, now - seen);
      else this.inc(now - seen);
    }
    seen = now;
  };
}

/**
 * The WebSocket ingest streams (src/routes/stream.ts, each connection
 * src/routes/ingestStream.ts). The per-message
 * counts are plain numbers the stream adds to and the counters read at
 * scrape time: no prom-client call (nor its label hashing) per message.
 */
export class StreamMetrics {
  /** Reports answered with their counts (queued by the batcher, some maybe dropped). */
  reports = 0;
  /** Messages answered with an error (nothing applied). */
  invalid = 0;
  /** Times a stream stopped reading: its client left over 1 MiB of answers unread. */
  paused = 0;
  private readonly rejectedTotal: Counter<'reason'>;
  private readonly closedTotal: Counter<'code'>;
  /** Upgrades answered 429: the agent holds MAX_STREAMS_PER_AGENT streams on this replica already. */
  readonly upgradesRefusedTotal: Counter;
  private source: { connections(): number } | undefined;

  constructor(registry: Registry) {
    const registers = [registry];
    const sourceOf = () => this.source;
    new Gauge({
      name: 'metabatch_stream_connections',
      help: 'WebSocket ingest streams open.',
      registers,
      collect() {
        const source = sourceOf();
        if (source) this.set(source.connections());
      },
    });
    new Counter({
      name: 'metabatch_stream_reports_total',
      help: 'Reports received on WebSocket ingest streams and handed to the batcher (each answered with its counts).',
      registers,
      collect: catchUp(() => this.reports),
    });
    this.upgradesRefusedTotal = new Counter({
      name: 'metabatch_stream_upgrades_refused_total',
      help: 'WebSocket ingest upgrades answered 429: the agent holds its most streams on this replica already.',
      registers,
    });
    new Counter({
      name: 'metabatch_stream_paused_total',
      help:
        'Times a WebSocket ingest stream stopped reading its client’s reports because the client left over ' +
        '1 MiB of answers unread (it reads again once they drain).',
      registers,
      collect: catchUp(() => this.paused),
    });
    this.rejectedTotal = new Counter({
      name: 'metabatch_stream_rejected_total',
      help:
        'WebSocket ingest messages refused, by reason: invalid (answered with an error, nothing applied), ' +
        'too_big (over 1 MiB: closed with 1009), binary (closed with 1003).',
      labelNames: ['reason'],
      registers,
      collect: catchUp(() => this.invalid, { reason: 'invalid' }),
    });
    for (const reason of STREAM_REJECT_REASONS) this.rejectedTotal.inc({ reason }, 0);
    this.closedTotal = new Counter({
      name: 'metabatch_stream_closed_total',
      help:
        'WebSocket ingest streams closed, by close code: the one the service closed with (1001 shutting down, ' +
        '1002/1007 bad frame or UTF-8, 1003 binary, 1008 too many streams, 1009 too big, 4001 token revoked, ' +
        '1013 token unconfirmed, 1006 idle), else the client’s (other: a code not listed).',
      labelNames: ['code'],
      registers,
    });
  }

  /** A message refused with a close (`invalid` is counted by `invalid++`). */
  rejected(reason: Exclude<StreamRejectReason, 'invalid'>): void {
    this.rejectedTotal.inc({ reason });
  }

  closed(code: number): void {
    this.closedTotal.inc({ code: STREAM_CLOSE_CODES.has(code) ? String(code) : 'other' });
  }

  /** Lets the gauge read the open streams at scrape time. */
  bind(source: { connections(): number }): void {
    this.source = source;
  }
}

/** What a refused credential was (authFailures.ts): a label of `metabatch_auth_failures_total`. */
export const AUTH_FAILURE_KINDS = [
  'missing',
  'malformed',
  'unknown_agent_token',
  'wrong_agent',
  'bad_admin_token',
] as const;
export type AuthFailureKind = (typeof AUTH_FAILURE_KINDS)[number];

/** Refused credentials, and the per-address bound on them (authFailures.ts). */
export class AuthMetrics {
  readonly failuresTotal: Counter<'kind'>;
  readonly throttledTotal: Counter;
  readonly addressesEvictedTotal: Counter;
  private source: { addresses(): number } | undefined;

  constructor(registry: Registry) {
    const registers = [registry];
    const sourceOf = () => this.source;
    this.failuresTotal = new Counter({
      name: 'metabatch_auth_failures_total',
      help:
        'Requests refused for their credentials, by kind: missing, malformed (no version issued that shape: ' +
        'refused without a query), unknown_agent_token, wrong_agent (another agent’s token), bad_admin_token.',
      labelNames: ['kind'],
      registers,
    });
    for (const kind of AUTH_FAILURE_KINDS) this.failuresTotal.inc({ kind }, 0);
    this.throttledTotal = new Counter({
      name: 'metabatch_auth_throttled_total',
      help: 'Requests answered 429 before any token check: their address had used up its failed authentications.',
      registers,
    });
    new Gauge({
      name: 'metabatch_auth_failure_addresses',
      help: 'Client addresses whose failed authentications are remembered (bounded; see README, Guessing tokens).',
      registers,
      collect() {
        const source = sourceOf();
        if (source) this.set(source.addresses());
      },
    });
    this.addressesEvictedTotal = new Counter({
      name: 'metabatch_auth_failure_addresses_evicted_total',
      help: 'Addresses forgotten to make room for others (their failures start afresh): many addresses failing at once.',
      registers,
    });
  }

  /** Lets the gauge read the remembered addresses at scrape time. */
  bind(source: { addresses(): number }): void {
    this.source = source;
  }
}
