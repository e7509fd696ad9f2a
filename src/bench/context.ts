// What every scenario is handed (the options, the bench database, the
// provisioned agents), what a scenario module exports, and the few
// constants they all share.

import type pg from 'pg';
import { createLogger } from '../logger.js';
import type { Options } from './options.js';

/** The service's BATCH_SIZE in every scenario, and the batch size of the raw flush it is set against. */
export const BATCH_SIZE = 500;

export const log = createLogger('warn');

export interface Agent {
  id: string;
  token: string;
}

export interface Context {
  options: Options;
  /** A temporary directory of this run, removed at the end. */
  work: string;
  /** As the service connects (on the embedded Postgres, its own role, no superuser). */
  databaseUrl: string;
  /** The same server as a role that may create databases; the scenarios' own databases are owned by databaseUrl's role. */
  adminUrl: string;
  pool: pg.Pool;
  keys: string[];
  /** `agents` as JSON, for the load generator. */
  agentsFile: string;
  agents: Agent[];
  /** Four more agents, with the one key 'probe', for the freshness probes. */
  probes: Agent[];
}

/**
 * One scenario: what it measures (`run`, whose result is its section of the
 * JSON figures, under `name`) and how that section prints (`rows`: a heading
 * row, then its rows, five cells each: label, ours, the other, ratio,
 * target). `name` is also its --scenario name.
 */
export interface Scenario<Figures = unknown> {
  name: string;
  run(context: Context): Promise<Figures>;
  // A method, not a property: a Scenario<SomeFigures> then fits a Scenario[] list.
  rows(figures: Figures, options: Options): string[][];
}

const benchStart = Date.now();
export function progress(message: string): void {
  process.stderr.write(`bench: [${((Date.now() - benchStart) / 1000).toFixed(1)} s] ${message}\n`);
}
