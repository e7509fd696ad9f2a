// The bench's command line: the scenarios to run and the size of the load,
// with the --quick defaults (a smoke run of about 30 s) and the full ones.

import { parseArgs } from 'node:util';

export interface Options {
  quick: boolean;
  scenarios: Set<string>;
  agents: number;
  keys: number;
  intervalMs: number;
  durationS: number;
  closedS: number;
  concurrency: number;
  flushRounds: number;
  overloadRequests: number;
  /** The service's FLUSH_INTERVAL_MS: the default, or 1 s for --quick. */
  flushIntervalMs: number;
  json: string | undefined;
}

/** `known`: the scenarios --scenario can pick, in the order they run (the raw limits always run). */
export function parseOptions(argv: string[], known: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      scenario: { type: 'string' },
      agents: { type: 'string' },
      keys: { type: 'string' },
      'interval-ms': { type: 'string' },
      'duration-s': { type: 'string' },
      concurrency: { type: 'string' },
      json: { type: 'string' },
    },
    strict: true,
  });
  const quick = values.quick ?? false;
  const number = (raw: string | undefined, fallback: number, name: string) => {
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isSafeInteger(n) || n < 1) throw new Error(`--${name} must be a whole number >= 1`);
    return n;
  };
  const scenario = values.scenario ?? 'all';
  if (scenario !== 'all' && scenario !== 'limits' && !known.includes(scenario)) {
    throw new Error(`--scenario must be all, limits (only the raw limits), ${known.join(', ')}`);
  }
  const agents = number(values.agents, quick ? 500 : 10_000, 'agents');
  return {
    quick,
    scenarios: new Set(scenario === 'all' ? known : scenario === 'limits' ? [] : [scenario]),
    agents,
    keys: number(values.keys, 10, 'keys'),
    intervalMs: number(values['interval-ms'], quick ? 1000 : 5000, 'interval-ms'),
    durationS: number(values['duration-s'], quick ? 2 : 30, 'duration-s'),
    closedS: quick ? 1.5 : 10,
    concurrency: number(values.concurrency, 64, 'concurrency'),
    flushRounds: quick ? 20 : 100,
    // 10x the channel (BATCH_SIZE x 5 keys), in requests of `keys` keys... times ten again in the full run.
    overloadRequests: quick ? 2_000 : 25_000,
    flushIntervalMs: quick ? 1000 : 5000,
    json: values.json,
  };
}
