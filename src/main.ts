// Wiring only: config → logger → database → pool → registry → store,
// publisher → batcher → listener, watchers → app → listen. Shutdown runs in
// the reverse order: stop taking requests, close watch streams, drain and
// flush the batcher, close the listener and the pool, stop Postgres last.

import type { FastifyInstance } from 'fastify';
import type pg from 'pg';
import { collectDefaultMetrics, Registry } from 'prom-client';
import { buildApp } from './app.js';
import { AgentAuthenticator } from './auth.js';
import { Batcher, type CloseResult } from './batcher.js';
import { subscribe, type Subscription } from './client.js';
import type { Config } from './config.js';
import { createPool, migrate, openDatabase } from './database.js';
import type { Logger } from './logger.js';
import { BatcherMetrics, WatchMetrics } from './metrics.js';
import type { Health } from './routes/health.js';
import { replaySpill, spillPath, writeSpill } from './spill.js';
import { MetadataStore } from './store.js';
import { WatchHub } from './watch.js';

export interface Service {
  app: FastifyInstance;
  batcher: Batcher;
  /** http://host:port the service listens on. */
  address: string;
  databaseUrl: string;
  /**
   * Graceful stop. Resolves with what the final flush could not write
   * (spilled to DATA_DIR by then). Idempotent.
   */
  stop(): Promise<CloseResult & { spillFile?: string }>;
  /** Second signal: spill what is held and stop Postgres, without waiting for flushes. */
  abort(): Promise<string | undefined>;
}

export async function startService(config: Config, log: Logger): Promise<Service> {
  const database = await openDatabase({ databaseUrl: config.databaseUrl, dataDir: config.dataDir, log });
  const url = database.url;
  let pool: pg.Pool | undefined;
  try {
    const registry = new Registry();
    collectDefaultMetrics({ register: registry, prefix: 'metabatch_' });
    pool = createPool(url, log, { registry, asyncCommit: true });
    await migrate(pool, log);
    // The store NOTIFYs in the flush's own statement: one round trip per batch.
    const store = new MetadataStore(pool, { notifyChannel: config.notifyChannel });

    const replayed = await replaySpill(config.dataDir, store);
    if (replayed > 0)
      log.info(
        { entries: replayed, file: spillPath(config.dataDir) },
        'replayed metadata spilled at the last shutdown',
      );

    const batcher = new Batcher({
      store,
      metrics: new BatcherMetrics(registry),
      logger: log.child({ component: 'batcher' }),
      batchSize: config.batchSize,
      flushIntervalMs: config.flushIntervalMs,
      channelMultiplier: config.channelMultiplier,
      finalFlushTimeoutMs: config.finalFlushTimeoutMs,
      maxHeldKeys: config.maxHeldKeys,
    });

    const watchMetrics = new WatchMetrics(registry);
    const watchHub = new WatchHub({ source: store, metrics: watchMetrics, logger: log.child({ component: 'watch' }) });
    const listenerLog = log.child({ component: 'listener' });
    const listener: Subscription = await subscribe({
      databaseUrl: url,
      channel: config.notifyChannel,
      onBatch: (agentIds) => {
        watchMetrics.listenerBatchesTotal.inc();
        watchHub.onBatch(agentIds);
      },
      onResync: () => {
        watchMetrics.listenerReconnectsTotal.inc();
        listenerLog.info('LISTEN connection re-established; re-reading watched agents');
        watchHub.resync();
      },
      onError: (err) => listenerLog.warn({ err }, 'LISTEN connection problem; reconnecting'),
    });

    const activePool = pool;
    const health: Health = {
      shuttingDown: false,
      pingDatabase: async () => {
        await activePool.query('SELECT 1');
      },
      flushesSucceeding: () => !batcher.flushesFailing,
    };
    const app = buildApp({
      logger: log,
      store,
      batcher,
      auth: new AgentAuthenticator(store),
      registry,
      health,
      watchHub,
      adminToken: config.adminToken,
    });
    // Open watch streams would keep app.close() waiting forever.
    app.addHook('preClose', async () => watchHub.close());
    const address = await app.listen({ host: config.host, port: config.port });
    log.info(
      { address, embedded: database.embedded, channel: config.notifyChannel },
      `metabatch listening on ${address}`,
    );

    let stopping: Promise<CloseResult & { spillFile?: string }> | undefined;
    const stop = () =>
      (stopping ??= (async () => {
        health.shuttingDown = true;
        log.info('shutting down: no new requests, flushing what is held');
        await app.close();
        const result = await batcher.close();
        let spillFile: string | undefined;
        if (!result.flushed) {
          spillFile = await writeSpill(config.dataDir, result.held);
          log.error(
            { entries: result.held.keys.length, file: spillFile },
            'database unreachable at shutdown: held metadata written to the spill file; it is replayed at the next start',
          );
        }
        await listener.close();
        await activePool.end();
        await database.close();
        log.info({ flushed: result.flushed }, 'stopped');
        return { ...result, ...(spillFile ? { spillFile } : {}) };
      })());
    const abort = async () => {
      const held = batcher.abandon();
      let file: string | undefined;
      if (held.keys.length > 0) {
        file = await writeSpill(config.dataDir, held);
        log.error(
          { entries: held.keys.length, file },
          'second signal: held metadata written to the spill file without flushing',
        );
      }
      await database.close();
      return file;
    };
    return { app, batcher, address, databaseUrl: url, stop, abort };
  } catch (err) {
    await pool?.end().catch(() => undefined);
    await database.close();
    throw err;
  }
}
