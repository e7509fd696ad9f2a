// What shutdown could not write goes to a spill file under DATA_DIR, and is
// replayed at the next start before traffic is taken. Each spill is a new
// file with a name of its own, written atomically (a temp file, fsync,
// rename, fsync of the directory): an existing file is never read, merged or
// overwritten, so one that cannot be read costs nothing else. Spill writes
// run one at a time. Replaying is safe twice: the UPDATE never moves a row
// back in time.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { isUuid } from './agentIdChunks.js';
import { emptyBatch, type MetadataBatch } from './batch.js';
import type { MetadataWriter } from './batcher.js';
import { microsToIso, parseRfc3339Micros } from './timestamps.js';

// Every spill file's name: `unflushed-metadata.json` (older releases) or
// `unflushed-metadata-<time>-<pid>-<random>.json`.
const SPILL_NAME = /^unflushed-metadata(-[\w.-]+)?\.json$/;
// Entries per UPDATE when replaying: a spill holds up to MAX_HELD_KEYS.
const REPLAY_SLICE = 10_000;

interface SpillEntry {
  agent_id: string;
  key: string;
  value: string;
  error: string;
  collected_at: string;
}

interface SpillFile {
  version: 1;
  written_at: string;
  entries: SpillEntry[];
}

/** A spill file that cannot be replayed: start-up stops and says which and what to do. */
export class SpillError extends Error {
  override name = 'SpillError';
}

/** Writes spill files under one directory, one at a time. */
export class Spill {
  private queue: Promise<unknown> = Promise.resolve();

  constructor(readonly dataDir: string) {}

  /** Writes `batch` to a new spill file; resolves to its path, or undefined when there was nothing to write. */
  write(batch: MetadataBatch): Promise<string | undefined> {
    const written = this.queue.then(() => (batch.keys.length > 0 ? this.writeFile(batch) : undefined));
    this.queue = written.catch(() => undefined);
    return written;
  }

  private async writeFile(batch: MetadataBatch): Promise<string> {
    const dir = path.resolve(this.dataDir);
    // A DATA_DIR made here is the service's alone, like the files in it.
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const stamp = new Date().toISOString().replace(/[:.]/g, '');
    const name = `unflushed-metadata-${stamp}-${process.pid}-${randomBytes(4).toString('hex')}.json`;
    const file = path.join(dir, name);
    const content: SpillFile = { version: 1, written_at: new Date().toISOString(), entries: toEntries(batch) };
    const temp = `${file}.tmp`;
    const handle = await fs.open(temp, 'wx', 0o600);
    try {
      await handle.writeFile(JSON.stringify(content));
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(temp, file);
    // The rename itself is durable once the directory is.
    const directory = await fs.open(dir, 'r');
    try {
      await directory.sync();
    } finally {
      await directory.close();
    }
    return file;
  }
}

/** The spill files under `dataDir`, oldest name first. */
export async function spillFiles(dataDir: string): Promise<string[]> {
  const dir = path.resolve(dataDir);
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new SpillError(
      `cannot list ${dir} for spill files (${(err as Error).message}): make DATA_DIR readable by this user`,
    );
  }
  return names
    .filter((name) => SPILL_NAME.test(name))
    .sort()
    .map((name) => path.join(dir, name));
}

/**
 * Writes every spill file under `dataDir` to the database, then removes
 * them. Entries of one (agent, key) are reduced to the newest first, since
 * one UPDATE cannot touch a row twice. Throws SpillError, before writing
 * anything, when a file cannot be read.
 */
export async function replaySpills(
  dataDir: string,
  store: MetadataWriter,
): Promise<{ files: string[]; entries: number }> {
  const files = await spillFiles(dataDir);
  const newest = new Map<string, SpillEntry & { micros: number }>();
  for (const file of files) {
    for (const entry of await readSpillFile(file)) {
      const id = `${entry.agent_id}\0${entry.key}`;
      const micros = parseRfc3339Micros(entry.collected_at)!;
      const held = newest.get(id);
      if (!held || micros >= held.micros) newest.set(id, { ...entry, micros });
    }
  }
  const entries = [...newest.values()];
  for (let start = 0; start < entries.length; start += REPLAY_SLICE) {
    const batch = emptyBatch();
    for (const entry of entries.slice(start, start + REPLAY_SLICE)) {
      batch.agentIds.push(entry.agent_id);
      batch.keys.push(entry.key);
      batch.values.push(entry.value);
      batch.errors.push(entry.error);
      batch.collectedAtMicros.push(entry.micros);
    }
    await store.updateMetadata(batch);
  }
  for (const file of files) await fs.rm(file, { force: true });
  return { files, entries: entries.length };
}

async function readSpillFile(file: string): Promise<SpillEntry[]> {
  const advice =
    'it holds metadata answered 202 that never reached the database: fix it, or move it out of DATA_DIR to start without it';
  let parsed: SpillFile;
  try {
    parsed = JSON.parse(await fs.readFile(file, 'utf8')) as SpillFile;
  } catch (err) {
    throw new SpillError(`cannot replay spill file ${file} (${(err as Error).message}): ${advice}`);
  }
  const valid =
    parsed?.version === 1 &&
    Array.isArray(parsed.entries) &&
    parsed.entries.every(
      (e) =>
        typeof e?.agent_id === 'string' &&
        isUuid(e.agent_id) &&
        typeof e.key === 'string' &&
        typeof e.value === 'string' &&
        typeof e.error === 'string' &&
        typeof e.collected_at === 'string' &&
        parseRfc3339Micros(e.collected_at) !== undefined,
    );
  if (!valid)
    throw new SpillError(`cannot replay spill file ${file} (not a metabatch spill file of version 1): ${advice}`);
  return parsed.entries;
}

function toEntries(batch: MetadataBatch): SpillEntry[] {
  return batch.keys.map((key, i) => ({
    agent_id: batch.agentIds[i]!,
    key,
    value: batch.values[i]!,
    error: batch.errors[i]!,
    collected_at: microsToIso(batch.collectedAtMicros[i]!),
  }));
}
