import { randomUUID } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  decodeAgentIdChunk,
  encodeAgentId,
  encodeAgentIdChunks,
  MAX_AGENT_IDS_PER_CHUNK,
} from '../src/agentIdChunks.js';

const ids = (n: number) => Array.from({ length: n }, () => randomUUID());

describe('agent id chunks (the NOTIFY payload)', () => {
  it.each([
    ['00000000-0000-0000-0000-000000000000', 'AAAAAAAAAAAAAAAAAAAAAA'],
    ['123e4567-e89b-12d3-a456-426614174000', 'Ej5FZ+ibEtOkVkJmFBdAAA'],
    ['ffffffff-ffff-ffff-ffff-ffffffffffff', '/////////////////////w'],
  ])('encodes %s as %s', (id, encoded) => {
    expect(encodeAgentId(id)).toBe(encoded);
    expect(encodeAgentIdChunks([id])).toEqual([encoded]);
    expect(decodeAgentIdChunk(encoded)).toEqual([id]);
  });

  it('accepts upper-case UUIDs and decodes to lower case', () => {
    expect(decodeAgentIdChunk(encodeAgentId('123E4567-E89B-12D3-A456-426614174000'))).toEqual([
      '123e4567-e89b-12d3-a456-426614174000',
    ]);
  });

  it.each([
    ['Empty', 0, 0],
    ['Single', 1, 1],
    ['Multiple', 3, 1],
    ['Exactly 363 (one chunk)', 363, 1],
    ['364 (two chunks)', 364, 2],
    ['600 (multiple chunks)', 600, 2],
  ])('round-trips %s in order', (_name, count, chunkCount) => {
    const input = ids(count);
    const chunks = encodeAgentIdChunks(input);
    expect(chunks).toHaveLength(chunkCount);
    expect(chunks.flatMap(decodeAgentIdChunk)).toEqual(input);
  });

  it('splits 600 ids into payloads of 7986 and 5214 bytes, each within 8000', () => {
    const chunks = encodeAgentIdChunks(ids(600));
    expect(chunks.map((c) => Buffer.byteLength(c))).toEqual([7986, 5214]);
    expect(MAX_AGENT_IDS_PER_CHUNK).toBe(363);
    for (const chunk of encodeAgentIdChunks(ids(1000))) expect(chunk.length).toBeLessThanOrEqual(8000);
  });

  it('refuses payloads that are not whole 22-character ids', () => {
    expect(() => decodeAgentIdChunk('invalid')).toThrow(/must be a multiple of 22/);
    expect(() => decodeAgentIdChunk('A'.repeat(21) + 'B')).toThrow(/invalid agent id at offset 0/);
    expect(() => decodeAgentIdChunk('AAAAAAAAAAAAAAAAAAAAAA' + '-'.repeat(22))).toThrow(/offset 22/);
    expect(decodeAgentIdChunk('')).toEqual([]);
    expect(() => encodeAgentId('not-a-uuid')).toThrow(/not a UUID/);
  });
});
