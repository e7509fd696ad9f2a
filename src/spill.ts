// What shutdown could not write goes to a spill file under DATA_DIR, written
// atomically (a temp file, fsync, rename), and is replayed at the next start
// before traffic is taken. Replaying is safe twice: the UPDATE never moves a
// row back in time.

import fs from 'node:fs/promises';
import path from 'node:path';
import type { MetadataBatch, MetadataWriter } from './batcher.js';

const SPILL_FILE = 'unflushed-metadata.json';

interface SpillFile {
  version: 1;
  written_at: string;
  entries: { agent_id: string; key: string; value: string; error: string; collected_at: string }[];
}

export function spillPath(dataDir: string): string {
  return path.join(path.resolve(dataDir), SPILL_FILE);
}

/** Writes the batch to the spill file, merging with one already there. Returns the path. */
export async function writeSpill(dataDir: string, batch: MetadataBatch): Promise<string> {
  const file = spillPath(dataDir);
  const previous = await readSpill(dataDir);
  const entries = previous?.entries ?? [];
  for (let i = 0; i < batch.keys.length; i++) {
    entries.push({
      agent_id: batch.agentIds[i]!,
      key: batch.keys[i]!,
      value: batch.values[i]!,
      error: batch.errors[i]!,
      collected_at: batch.collectedAts[i]!.toISOString(),
    });
  }
  const content: SpillFile = { version: 1, written_at: new Date().toISOString(), entries };
  await fs.mkdir(path.dirname(file), { recursive: true });
  const temp = `${file}.${process.pid}.tmp`;
  const handle = await fs.open(temp, 'w', 0o600);
  try {
    await handle.writeFile(JSON.stringify(content));
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.rename(temp, file);
  return file;
}

async function readSpill(dataDir: string): Promise<SpillFile | undefined> {
  let text: string;
  try {
    text = await fs.readFile(spillPath(dataDir), 'utf8');
  } catch {
    return undefined;
  }
  const parsed = JSON.parse(text) as SpillFile;
  if (parsed.version !== 1 || !Array.isArray(parsed.entries))
    throw new Error(`${spillPath(dataDir)} is not a metabatch spill file`);
  return parsed;
}

/**
 * Writes a spill file left by an earlier shutdown to the database and removes
 * it. Returns the number of entries replayed (0 when there was none).
 * Entries of one (agent, key) are reduced to the newest first, since one
 * UPDATE cannot touch a row twice.
 */
export async function replaySpill(dataDir: string, store: MetadataWriter): Promise<number> {
  const spill = await readSpill(dataDir);
  if (!spill) return 0;
  const newest = new Map<string, SpillFile['entries'][number]>();
  for (const entry of spill.entries) {
    const id = `${entry.agent_id}\0${entry.key}`;
    const held = newest.get(id);
    if (!held || Date.parse(entry.collected_at) >= Date.parse(held.collected_at)) newest.set(id, entry);
  }
  const batch: MetadataBatch = { agentIds: [], keys: [], values: [], errors: [], collectedAts: [] };
  for (const entry of newest.values()) {
    batch.agentIds.push(entry.agent_id);
    batch.keys.push(entry.key);
    batch.values.push(entry.value);
    batch.errors.push(entry.error);
    batch.collectedAts.push(new Date(entry.collected_at));
  }
  if (batch.keys.length > 0) await store.updateMetadata(batch);
  await fs.rm(spillPath(dataDir), { force: true });
  return batch.keys.length;
}
