// Wiring only: config → logger → database → pool → registry → store → spill
// replay → batcher → health → listener, watch hub → app → listen. Shutdown
// runs in the reverse order: app.close() (its plugins answer 503, end watch
// streams, let requests in flight finish and flush the batcher), spill what
// could not be written, close the listener and the pool, stop Postgres last.

import type { FastifyInstance } from 'fastify';
import { collectDefaultMetrics, Registry } from 'prom-client';
import { buildApp } from './app.js';
import { AgentAuthenticator } from './auth.js';
import { BackgroundProcesses } from './background.js';
import { Batcher, type Announcer } from './batcher.js';
import { decodeAgentIdChunk } from './agentIdChunks.js';
import { DeclaredKeys } from './declaredKeys.js';
import { limitConnections, openFileLimit } from './connections.js';
import { AgentStore } from './agentStore.js';
import { applyControlPayload, CONTROL_CHANNEL } from './control.js';
import type { Clock } from './clock.js';
import type { Config } from './config.js';
import { createPool, migrate, openDatabase, warnIfSuperuser } from './database.js';
import { DatabaseHealth } from './health.js';
import { listen } from './listener.js';
import type { DEFAULT_TIMEOUTS } from './limits.js';
import type { Logger } from './logger.js';
import { BatcherMetrics, registerDatabaseUp, registerReady, WatchMetrics } from './metrics.js';
import { replaySpills, Spill } from './spill.js';
import { MetadataStore } from './store.js';
import { StreamRegistry } from './streams.js';
import { WatchHub } from './watch.js';

/** Collaborators a caller may replace: tests drive the service's time with a fake clock. */
export interface ServiceOptions {
  /** The time of the batcher, the watch hub and the health check. Default: real timers. */
  clock?: Clock;
  /** Overrides of the HTTP timeouts. */
  timeouts?: Partial<typeof DEFAULT_TIMEOUTS>;
  /** Sinks that announce changed agents after the flush statement's NOTIFY (Redis, a webhook: announcers.ts). Default none. */
  announcers?: readonly Announcer[];
}

export interface StopResult {
  /** Whether everything acknowledged reached the database. */
  flushed: boolean;
  /** Where what could not be written went, if anything. */
  spillFile?: string;
}

export interface Service {
  app: FastifyInstance;
  batcher: Batcher;
  /** Each agent's declared keys as this replica last read them (what it may hold while flushes fail). */
  declaredKeys: DeclaredKeys;
  watchHub: WatchHub;
  health: DatabaseHealth;
  registry: Registry;
  /** http://host:port the service listens on. */
  address: string;
  databaseUrl: string;
  /** Graceful stop: resolves once everything is closed, with what the final flush could not write. Idempotent. */
  stop(): Promise<StopResult>;
  /** Second signal: spill what is held and stop Postgres, without waiting for flushes. Idempotent. */
  abort(): Promise<string | undefined>;
}

export async function startService(config: Config, log: Logger, options: ServiceOptions = {}): Promise<Service> {
  const clock = options.clock;
  const database = await openDatabase({ databaseUrl: config.databaseUrl, dataDir: config.dataDir, log });
  // What is open so far, closed in reverse if start-up fails.
  const opened: (() => Promise<void> | void)[] = [() => database.close()];
  try {
    const registry = new Registry();
    collectDefaultMetrics({ register: registry, prefix: 'metabatch_' });
    const background = new BackgroundProcesses(registry);
    const pool = createPool(database.url, log, { registry, background, asyncCommit: true, max: config.poolSize });
    opened.push(() => pool.end());
    await background.run('migrate', () => migrate(pool, log));
    await warnIfSuperuser(pool, log);
    // The store NOTIFYs in the flush's own statement: one round trip per batch.
    const store = new MetadataStore(pool, { notifyChannel: config.notifyChannel });

    const spill = new Spill(config.dataDir);
    const replayed = await background.run('spill_replay', () => replaySpills(config.dataDir, store));
    if (replayed.files.length > 0) {
      log.info(
        { entries: replayed.entries, files: replayed.files },
        'replayed metadata spilled at an earlier shutdown',
      );
    }

    // What each agent may hold while flushes fail: its declared keys, read while the database answers.
    const declaredKeys = new DeclaredKeys(pool, {
      ...(clock ? { clock } : {}),
      onError: (err) => log.debug({ err }, 'could not read declared keys; retrying at the next report'),
    });
    const batcher = new Batcher({
      store,
      declaredKeys,
      metrics: new BatcherMetrics(registry),
      logger: log.child({ component: 'batcher' }),
      batchSize: config.batchSize,
      flushIntervalMs: config.flushIntervalMs,
      flushJitter: config.flushJitter,
      channelMultiplier: config.channelMultiplier,
      finalFlushTimeoutMs: config.finalFlushTimeoutMs,
      maxHeldKeys: config.maxHeldKeys,
      background,
      // The store's NOTIFY stays first, in the flush statement; these run after it.
      announcers: options.announcers ?? [],
      ...(clock ? { clock } : {}),
    });
    opened.push(() => void batcher.abandon());
    const health = new DatabaseHealth({
      pool,
      logger: log.child({ component: 'health' }),
      // A database back after an outage: retry the held batch now, not at the end of its backoff.
      onRecovered: () => batcher.retryNow(),
      ...(clock ? { clock } : {}),
    });
    opened.push(() => health.close());
    registerDatabaseUp(registry, () => health.up);
    let stopping: Promise<StopResult> | undefined;
    registerReady(registry, () => stopping === undefined && health.up && !batcher.flushesFailing);

    const agents = new AgentStore(pool);
    const auth = new AgentAuthenticator(agents);
    const watchMetrics = new WatchMetrics(registry);
    const watchHub = new WatchHub({
      source: store,
      metrics: watchMetrics,
      logger: log.child({ component: 'watch' }),
      background,
      limits: { maxWatches: config.maxWatches, maxWatchesPerAdmin: config.maxWatchesPerAdmin },
      ...(clock ? { clock } : {}),
    });
    opened.push(() => watchHub.close());
    // The open ingest streams: closed by a revocation here (the lifecycle routes) or on another replica.
    const streams = new StreamRegistry();
    // The service's one LISTEN connection: batches for the watchers, and the
    // control channel (agents created, deleted, tokens rotated on any replica).
    const listenerLog = log.child({ component: 'listener' });
    const listener = await listen({
      databaseUrl: database.url,
      channels: {
        [config.notifyChannel]: (payload) => {
          let agentIds: string[];
          try {
            agentIds = decodeAgentIdChunk(payload);
          } catch (err) {
            listenerLog.warn({ err }, 'a batch payload that is not agent ids; ignored');
            return;
          }
          watchMetrics.listenerBatchesTotal.inc();
          watchHub.onBatch(agentIds);
        },
        [CONTROL_CHANNEL]: (payload) => {
          const message = applyControlPayload(payload, { auth, watchHub, streams }, (err) =>
            listenerLog.warn({ err }, 'a control payload this version cannot read; ignored'),
          );
          if (message) watchMetrics.controlMessagesTotal.inc({ type: message.type });
        },
      },
      onResync: () =>
        void background.run('listener_resync', async () => {
          watchMetrics.listenerReconnectsTotal.inc();
          listenerLog.info('LISTEN connection re-established; re-reading watched agents, forgetting cached tokens');
          watchHub.resync();
          auth.clear();
        }),
      onError: (err) => listenerLog.warn({ err }, 'LISTEN connection problem; reconnecting'),
    });
    opened.push(() => listener.close());

    const app = buildApp({
      logger: log,
      store,
      agents,
      batcher,
      auth,
      registry,
      readiness: { database: health, flushesFailing: () => batcher.flushesFailing },
      watchHub,
      streams,
      adminToken: config.adminToken,
      authFailureLimits: { ratePerSecond: config.authFailureRate, burst: config.authFailureBurst },
      ...(config.trustProxy ? { trustProxy: config.trustProxy } : {}),
      ...(options.timeouts ? { timeouts: options.timeouts } : {}),
      ...(clock ? { clock } : {}),
    });
    opened.push(() => app.close());
    limitConnections(app.server, {
      fileLimit: openFileLimit(),
      poolSize: config.poolSize,
      registry,
      log,
      ...(clock ? { clock } : {}),
    });
    const address = await app.listen({ host: config.host, port: config.port });
    log.info(
      { address, embedded: database.embedded, channel: config.notifyChannel },
      `metabatch listening on ${address}`,
    );

    const stop = () =>
      (stopping ??= (async () => {
        log.info('shutting down: no new requests, flushing what is held');
        await app.close();
        // The app flushed the batcher as it closed; this is the same result.
        const result = await batcher.close();
        const spillFile = await spill.write(result.held);
        if (spillFile) {
          log.error(
            { entries: result.held.keys.length, file: spillFile },
            'database unreachable at shutdown: held metadata written to the spill file; it is replayed at the next start',
          );
        }
        await listener.close();
        health.close();
        await pool.end();
        await database.close();
        log.info({ flushed: result.flushed }, 'stopped');
        return { flushed: result.flushed, ...(spillFile ? { spillFile } : {}) };
      })());
    let aborting: Promise<string | undefined> | undefined;
    const abort = () =>
      (aborting ??= (async () => {
        const held = batcher.abandon();
        const file = await spill.write(held);
        if (file) {
          log.error(
            { entries: held.keys.length, file },
            'second signal: held metadata written to the spill file without flushing',
          );
        }
        await database.close();
        return file;
      })());
    return {
      app,
      batcher,
      declaredKeys,
      watchHub,
      health,
      registry,
      address,
      databaseUrl: database.url,
      stop,
      abort,
    };
  } catch (err) {
    for (const close of opened.reverse()) await Promise.resolve(close()).catch(() => undefined);
    throw err;
  }
}
