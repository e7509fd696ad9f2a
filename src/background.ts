// Background processes and what they cost, after Synapse's
// `synapse_background_process_*` metrics: the flush loop, the watch hub's
// tick, the listener's resync, spill replay and migrations each run under a
// name, and the metrics say how often each started, how many run, how long
// they took, how long they spent in queries and waiting for a pool
// connection, and how much CPU their synchronous parts used. A query is
// attributed to the process it runs for through AsyncLocalStorage, so no
// call passes a name down.

import { AsyncLocalStorage } from 'node:async_hooks';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export const BACKGROUND_PROCESSES = [
  'metadata_flush',
  'watch_tick',
  'listener_resync',
  'spill_replay',
  'migrate',
] as const;
export type BackgroundProcessName = (typeof BACKGROUND_PROCESSES)[number];

/** Runs work under a background process's name and counts its cost. */
export interface BackgroundRunner {
  run<T>(name: BackgroundProcessName, work: () => Promise<T>): Promise<T>;
  /** Runs a synchronous part of `name`'s work and counts the CPU it used. */
  cpu<T>(name: BackgroundProcessName, work: () => T): T;
}

/** Database time, attributed to the background process it is spent for (createPool reports it). */
export interface DatabaseTimeObserver {
  /** The process running now, if any: captured when a query or a connect starts. */
  current(): BackgroundProcessName | undefined;
  queryDone(name: BackgroundProcessName, seconds: number): void;
  connectionWaited(name: BackgroundProcessName, seconds: number): void;
}

export class BackgroundProcesses implements BackgroundRunner, DatabaseTimeObserver {
  private readonly context = new AsyncLocalStorage<BackgroundProcessName>();
  private readonly starts: Counter<'name'>;
  private readonly inFlight: Gauge<'name'>;
  private readonly duration: Histogram<'name'>;
  private readonly dbDuration: Counter<'name'>;
  private readonly dbWait: Counter<'name'>;
  private readonly cpuSeconds: Counter<'name'>;
  /** CPU seconds not yet added to the counter (it runs per report: a label lookup each time would cost more than the work). */
  private readonly cpuPending = new Map<BackgroundProcessName, number>();

  constructor(registry: Registry) {
    const registers = [registry];
    const labelNames = ['name'] as const;
    this.starts = new Counter({
      name: 'metabatch_background_process_start_count',
      help: 'Background processes started, by name.',
      labelNames,
      registers,
    });
    this.inFlight = new Gauge({
      name: 'metabatch_background_process_in_flight_count',
      help: 'Background processes running now, by name.',
      labelNames,
      registers,
    });
    this.duration = new Histogram({
      name: 'metabatch_background_process_duration_seconds',
      help: 'How long each background process ran (wall time), by name.',
      labelNames,
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    this.dbDuration = new Counter({
      name: 'metabatch_background_process_db_duration_seconds',
      help: 'Seconds background processes spent in database queries, by name.',
      labelNames,
      registers,
    });
    this.dbWait = new Counter({
      name: 'metabatch_background_process_db_wait_seconds',
      help: 'Seconds background processes waited for a pool connection, by name.',
      labelNames,
      registers,
    });
    const cpuPending = this.cpuPending;
    this.cpuSeconds = new Counter({
      name: 'metabatch_background_process_cpu_seconds_total',
      collect() {
        for (const [name, seconds] of cpuPending) this.inc({ name }, seconds);
        cpuPending.clear();
      },
      help: 'CPU seconds of background processes’ synchronous parts (their merging, parameter building, rendering), by name.',
      labelNames,
      registers,
    });
    // Every series from the start, so that rates and dashboards see zeros, not gaps.
    for (const name of BACKGROUND_PROCESSES) {
      for (const metric of [this.starts, this.dbDuration, this.dbWait, this.cpuSeconds]) metric.inc({ name }, 0);
      this.inFlight.set({ name }, 0);
    }
  }

  async run<T>(name: BackgroundProcessName, work: () => Promise<T>): Promise<T> {
    this.starts.inc({ name });
    this.inFlight.inc({ name });
    const end = this.duration.startTimer({ name });
    try {
      return await this.context.run(name, work);
    } finally {
      end();
      this.inFlight.dec({ name });
    }
  }

  cpu<T>(name: BackgroundProcessName, work: () => T): T {
    // Synchronous JavaScript holds the thread from start to end, so its wall
    // time is its CPU time (unless the OS preempts it); performance.now()
    // costs nanoseconds where process.cpuUsage() is a system call, and this
    // runs for every report the loop merges.
    const start = performance.now();
    try {
      return work();
    } finally {
      this.cpuPending.set(name, (this.cpuPending.get(name) ?? 0) + (performance.now() - start) / 1000);
    }
  }

  current(): BackgroundProcessName | undefined {
    return this.context.getStore();
  }

  queryDone(name: BackgroundProcessName, seconds: number): void {
    this.dbDuration.inc({ name }, seconds);
  }

  connectionWaited(name: BackgroundProcessName, seconds: number): void {
    this.dbWait.inc({ name }, seconds);
  }
}

/** For library users who do not count: runs the work as it is. */
export const uncounted: BackgroundRunner = {
  run: (_name, work) => work(),
  cpu: (_name, work) => work(),
};
