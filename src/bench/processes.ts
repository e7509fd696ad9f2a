// The bench's child processes: the servers under test (the service, the raw
// Fastify route, the naive mode) and the load generator, each a Node process
// of its own started from dist/, so that none shares an event loop with
// another or with this runner.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BATCH_SIZE, type Context } from './context.js';
import type { LoadConfig, LoadResult } from './loadgen.js';
import { parseScrape, type Scrape } from './scrape.js';
import { round } from './stats.js';

const DIST = path.dirname(path.dirname(fileURLToPath(import.meta.url)));

export interface Server {
  child: ChildProcess;
  url: string;
  /** Peak resident set size so far (VmHWM), in MB. */
  peakRssMb(): number;
  metrics(): Promise<Scrape>;
  stop(): Promise<number | null>;
}

export async function startServer(
  kind: 'service' | 'raw' | 'naive',
  context: Context,
  env: Record<string, string> = {},
): Promise<Server> {
  const script = {
    service: path.join(DIST, 'cli.js'),
    raw: path.join(DIST, 'bench', 'rawServer.js'),
    naive: path.join(DIST, 'bench', 'naiveServer.js'),
  }[kind];
  // BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=prof" profiles the servers.
  const nodeArgs = (process.env.BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const args = [...nodeArgs, ...(kind === 'service' ? [script, 'serve'] : [script])];
  const child = spawn(process.execPath, args, {
    env: {
      ...process.env,
      DATABASE_URL: context.databaseUrl,
      PORT: '0',
      LOG_LEVEL: 'info',
      BATCH_SIZE: String(BATCH_SIZE),
      FLUSH_INTERVAL_MS: String(context.options.flushIntervalMs),
      DATA_DIR: path.join(context.work, 'service'),
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const url = await new Promise<string>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      const match = /(?:metabatch listening on|listening) (http:\/\/[\d.]+:\d+)/.exec(output);
      if (match) {
        child.stdout.off('data', onData);
        resolve(match[1]!);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.once('exit', (code) => reject(new Error(`${kind} server exited (${code}): ${output.slice(-1000)}`)));
  });
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child,
    url,
    peakRssMb() {
      const status = readFileSync(`/proc/${child.pid}/status`, 'utf8');
      return round(Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) / 1024, 1);
    },
    async metrics() {
      return parseScrape(await (await fetch(`${url}/metrics`)).text());
    },
    async stop() {
      child.kill('SIGTERM');
      return exited;
    },
  };
}

/** One run of the load generator (./loadgen.ts) against `url`: the context's load, as `config` amends it. */
export async function load(
  context: Context,
  url: string,
  config: Partial<LoadConfig> & Pick<LoadConfig, 'mode'>,
): Promise<LoadResult> {
  const full: LoadConfig = {
    baseUrl: url,
    agentsFile: context.agentsFile,
    keys: context.keys,
    concurrency: context.options.concurrency,
    durationMs: context.options.durationS * 1000,
    intervalMs: context.options.intervalMs,
    ...config,
  };
  const file = path.join(context.work, `load-${randomBytes(4).toString('hex')}.json`);
  await fs.writeFile(file, JSON.stringify(full));
  const child = spawn(process.execPath, [path.join(DIST, 'bench', 'loadgen.js'), file], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  const line = output.split('\n').find((l) => l.includes('"event":"result"'));
  if (code !== 0 || !line) throw new Error(`load generator failed (${code}): ${output.slice(-500)}`);
  return (JSON.parse(line) as { result: LoadResult }).result;
}
