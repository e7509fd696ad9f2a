// The npm package as another program imports it: `metabatch` and
// `metabatch/client`, compiled JavaScript with type declarations.

import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, run } from './support/process.js';

describe('package exports', () => {
  it('serves the library, the listener SDK and the reporter by their package names', async () => {
    const script = `
      import { Batcher, MetadataStore, Publisher, encodeAgentIdChunks, decodeAgentIdChunk } from 'metabatch';
      import { subscribe, createReporter } from 'metabatch/client';
      const chunk = encodeAgentIdChunks(['123e4567-e89b-12d3-a456-426614174000'])[0];
      console.log(JSON.stringify({ kinds: [typeof Batcher, typeof MetadataStore, typeof Publisher, typeof subscribe, typeof createReporter], chunk, back: decodeAgentIdChunk(chunk) }));`;
    const child = run('node', ['--input-type=module', '-e', script], {});
    expect((await child.exited).code, child.stderr()).toBe(0);
    expect(JSON.parse(child.stdout())).toEqual({
      kinds: ['function', 'function', 'function', 'function', 'function'],
      chunk: 'Ej5FZ+ibEtOkVkJmFBdAAA',
      back: ['123e4567-e89b-12d3-a456-426614174000'],
    });
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
    for (const target of [pkg.exports['.'].types, pkg.exports['./client'].types]) {
      expect(fs.existsSync(path.join(ROOT, target))).toBe(true);
    }
  });
});
