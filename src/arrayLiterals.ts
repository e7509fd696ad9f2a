// Postgres array literals, built directly from a flush's arrays. pg's
// generic encoding (prepareValue, escapeElement, dateToString for every
// element) cost about 90 ms of main-thread CPU for 20,000 rows; these cost a
// fraction of that, and are built a slice at a time so that no single piece
// of work holds the event loop for long.

import { setImmediate as nextTurn } from 'node:timers/promises';
import type { MetadataBatch } from './batch.js';

// Elements built between two turns of the event loop: about 2 ms of work.
const SLICE = 4000;
const NEEDS_ESCAPE = /["\\]/;
const ESCAPED = /["\\]/g;

/** `{"a","b \\"c\\""}`: every element quoted, `"` and `\` escaped (NUL never reaches here). */
function quoted(values: readonly string[], from: number, to: number): string {
  let out = '';
  for (let i = from; i < to; i++) {
    const value = values[i]!;
    out += i === from ? '"' : ',"';
    out += NEEDS_ESCAPE.test(value) ? value.replace(ESCAPED, '\\$&') : value;
    out += '"';
  }
  return out;
}

/** Elements that never need quoting: UUIDs, integers. */
function bare(values: readonly (string | number)[], from: number, to: number): string {
  return values.slice(from, to).join(',');
}

/**
 * The flush's five parameters: `uuid[]`, `text[]` × 3 and `bigint[]` (epoch
 * microseconds) literals, yielding to the event loop between slices.
 */
export async function flushParameters(batch: MetadataBatch): Promise<string[]> {
  const parts: string[][] = [[], [], [], [], []];
  const rows = batch.keys.length;
  for (let from = 0; from < rows; from += SLICE) {
    if (from > 0) await nextTurn();
    const to = Math.min(rows, from + SLICE);
    parts[0]!.push(bare(batch.agentIds, from, to));
    parts[1]!.push(quoted(batch.keys, from, to));
    parts[2]!.push(quoted(batch.values, from, to));
    parts[3]!.push(quoted(batch.errors, from, to));
    parts[4]!.push(bare(batch.collectedAtMicros, from, to));
  }
  return parts.map((slices) => `{${slices.join(',')}}`);
}

/** `uuid[]` and `text[]` literals of ids and keys, at once (a small follow-up query's). */
export function idKeyParameters(batch: Pick<MetadataBatch, 'agentIds' | 'keys'>): string[] {
  const rows = batch.keys.length;
  return [`{${bare(batch.agentIds, 0, rows)}}`, `{${quoted(batch.keys, 0, rows)}}`];
}
