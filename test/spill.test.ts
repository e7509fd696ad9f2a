// Spill files on a real file system, replayed into a real Postgres: each
// spill is a new file, written whole or not at all; every file found is
// replayed, the newest value per key winning; a file that cannot be read
// stops the replay (and start-up) with its name, and is never overwritten.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { emptyBatch, type MetadataBatch } from '../src/batch.js';
import { replaySpills, Spill, SpillError, spillFiles } from '../src/spill.js';
import { MetadataStore } from '../src/store.js';
import { testDatabase } from './support/db.js';
import { rowsOf } from './support/harness.js';
import { CLI, run } from './support/process.js';

const db = testDatabase();
let dir: string;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'metabatch-spill-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

function batchOf(entries: [agentId: string, key: string, value: string, at: string][]): MetadataBatch {
  const batch = emptyBatch();
  for (const [agentId, key, value, at] of entries) {
    batch.agentIds.push(agentId);
    batch.keys.push(key);
    batch.values.push(value);
    batch.errors.push('');
    batch.collectedAtMicros.push(Date.parse(at) * 1000);
  }
  return batch;
}

describe('Spill', () => {
  it('writes each spill to a new file of its own, one at a time, and leaves no temp file', async () => {
    const [agent] = await db.createAgents(1, ['cpu']);
    const spill = new Spill(dir);
    const written = await Promise.all(
      Array.from({ length: 5 }, (_, i) => spill.write(batchOf([[agent!, 'cpu', `v${i}`, '2026-11-23T00:00:01Z']]))),
    );
    expect(new Set(written).size).toBe(5);
    expect(await spillFiles(dir)).toEqual([...(written as string[])].sort());
    expect((await fs.readdir(dir)).filter((name) => name.endsWith('.tmp'))).toEqual([]);
    for (const file of written) {
      const content = JSON.parse(await fs.readFile(file!, 'utf8'));
      expect(content).toMatchObject({ version: 1, entries: [{ agent_id: agent, key: 'cpu' }] });
    }
    expect((await fs.stat(written[0]!)).mode & 0o777).toBe(0o600);
    expect(await spill.write(emptyBatch())).toBeUndefined();
  });

  it('writes a spill even when a file it cannot read is already there, and leaves that file alone', async () => {
    const [agent] = await db.createAgents(1, ['cpu']);
    const corrupt = path.join(dir, 'unflushed-metadata.json');
    await fs.writeFile(corrupt, '{"version":1,"entr');
    const unreadable = path.join(dir, 'unflushed-metadata-directory.json');
    await fs.mkdir(unreadable);
    const file = await new Spill(dir).write(batchOf([[agent!, 'cpu', 'kept', '2026-11-23T00:00:01Z']]));
    expect(file).not.toBe(corrupt);
    expect(await fs.readFile(corrupt, 'utf8')).toBe('{"version":1,"entr');
    expect((await fs.stat(unreadable)).isDirectory()).toBe(true);
    expect(JSON.parse(await fs.readFile(file!, 'utf8')).entries[0].value).toBe('kept');
  });
});

describe('replaySpills', () => {
  it('replays every spill file, the newest value of a key winning across files, then removes them', async () => {
    const [a, b] = await db.createAgents(2, ['cpu', 'mem']);
    const spill = new Spill(dir);
    await spill.write(
      batchOf([
        [a!, 'cpu', 'old', '2026-11-23T00:00:01Z'],
        [b!, 'mem', 'only', '2026-11-23T00:00:01Z'],
      ]),
    );
    await spill.write(batchOf([[a!, 'cpu', 'new', '2026-11-23T00:00:02Z']]));
    // A file of an older release, under the old fixed name.
    await fs.writeFile(
      path.join(dir, 'unflushed-metadata.json'),
      JSON.stringify({
        version: 1,
        written_at: '2026-11-23T00:00:00Z',
        entries: [{ agent_id: a, key: 'mem', value: 'legacy', error: '', collected_at: '2026-11-23T00:00:01.000Z' }],
      }),
    );
    const replayed = await replaySpills(dir, new MetadataStore(db.pool));
    expect(replayed.files).toHaveLength(3);
    expect(replayed.entries).toBe(3);
    expect(await rowsOf(db, [a!, b!])).toEqual(
      [
        `${a}|cpu|new||2026-11-23T00:00:02.000Z`,
        `${a}|mem|legacy||2026-11-23T00:00:01.000Z`,
        `${b}|cpu|||0001-01-01T00:00:00.000Z`,
        `${b}|mem|only||2026-11-23T00:00:01.000Z`,
      ].sort(),
    );
    expect(await spillFiles(dir)).toEqual([]);
    expect(await replaySpills(dir, new MetadataStore(db.pool))).toEqual({ files: [], entries: 0 });
  });

  it.each([
    ['a directory', async (file: string) => fs.mkdir(file), /EISDIR/],
    ['cut-off JSON', async (file: string) => fs.writeFile(file, '{"version":1,"ent'), /JSON/],
    [
      'another version',
      async (file: string) => fs.writeFile(file, JSON.stringify({ version: 2, entries: [] })),
      /not a metabatch spill file of version 1/,
    ],
    [
      'an entry with no valid agent id',
      async (file: string) =>
        fs.writeFile(
          file,
          JSON.stringify({
            version: 1,
            entries: [{ agent_id: 'x', key: 'k', value: '', error: '', collected_at: '2026-11-23T00:00:00Z' }],
          }),
        ),
      /not a metabatch spill file of version 1/,
    ],
  ])(
    'refuses to replay %s, naming the file and what to do, and writes or removes nothing',
    async (_kind, make, why) => {
      const [agent] = await db.createAgents(1, ['cpu']);
      const good = await new Spill(dir).write(batchOf([[agent!, 'cpu', 'held', '2026-11-23T00:00:01Z']]));
      const bad = path.join(dir, 'unflushed-metadata-zzz.json');
      await make(bad);
      const replay = replaySpills(dir, new MetadataStore(db.pool));
      await expect(replay).rejects.toThrow(SpillError);
      await expect(replay).rejects.toThrow(why);
      await expect(replay).rejects.toThrow(`cannot replay spill file ${bad} (`);
      await expect(replay).rejects.toThrow(/fix it, or move it out of DATA_DIR to start without it/);
      expect(await rowsOf(db, [agent!])).toEqual([`${agent}|cpu|||0001-01-01T00:00:00.000Z`]);
      expect(await spillFiles(dir)).toEqual([good, bad]);
    },
  );

  it('stops the service at start-up with one line naming the file it cannot replay', async () => {
    await fs.writeFile(path.join(dir, 'unflushed-metadata-bad.json'), 'not json');
    const service = run('node', [CLI, 'serve'], {
      DATABASE_URL: db.url,
      DATA_DIR: dir,
      PORT: '0',
      LOG_LEVEL: 'silent',
    });
    expect((await service.exited).code).toBe(1);
    expect(service.stderr()).toMatch(
      new RegExp(
        `^metabatch: cannot replay spill file ${path.join(dir, 'unflushed-metadata-bad.json')} \\(.*\\): it holds metadata answered 202 that never reached the database: fix it, or move it out of DATA_DIR to start without it\\n$`,
      ),
    );
    expect(service.stdout()).toBe('');
  });
});
