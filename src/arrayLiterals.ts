// Postgres array literals, built directly from a flush's arrays. pg's
// generic encoding (prepareValue, escapeElement, dateToString for every
// element) cost about 90 ms of main-thread CPU for 20,000 rows; these cost a
// tenth of that, and are built a slice at a time so that no single piece
// of work holds the event loop for long (slices.ts).

import type { MetadataBatch } from './batch.js';
import { inSlices } from './slices.js';

// Rows per piece of work: well under a millisecond.
const SLICE = 1000;
const NEEDS_ESCAPE = /["\\]/;
const ESCAPED = /["\\]/g;

/**
 * `"a","b \\"c\\""`: every element quoted, `"` and `\\` escaped (NUL never
 * reaches here). Joined, not concatenated: the result is one flat string, so
 * the final literal costs a copy, not the flattening of a deep rope.
 */
function quoted(values: readonly string[], from: number, to: number): string {
  const slice = values.slice(from, to);
  for (let i = 0; i < slice.length; i++) {
    const value = slice[i]!;
    if (NEEDS_ESCAPE.test(value)) slice[i] = value.replace(ESCAPED, '\\$&');
  }
  return `"${slice.join('","')}"`;
}

/** Elements that never need quoting: UUIDs, integers. */
function bare(values: readonly (string | number)[], from: number, to: number): string {
  return values.slice(from, to).join(',');
}

/**
 * The flush's six parameters: the distinct agent ids (`uuid[]`), then per
 * row the agent's 1-based index in them (`int[]`), key, value, error
 * (`text[]` × 3) and collected_at in epoch microseconds (`bigint[]`),
 * yielding to the event loop between slices. An agent's id is sent once,
 * not with each of its keys: a third fewer bytes for pg to encode in one
 * piece and for Postgres to parse.
 */
export function flushParameters(batch: MetadataBatch): Promise<string[]> {
  return inSlices(parameterSlices(batch));
}

function* parameterSlices(batch: MetadataBatch): Generator<void, string[]> {
  const parts: string[][] = [[], [], [], [], []];
  const agents = new Map<string, number>();
  const rows = batch.keys.length;
  for (let from = 0; from < rows; from += SLICE) {
    const to = Math.min(rows, from + SLICE);
    parts[0]!.push(agentIndexes(batch.agentIds, from, to, agents));
    parts[1]!.push(quoted(batch.keys, from, to));
    parts[2]!.push(quoted(batch.values, from, to));
    parts[3]!.push(quoted(batch.errors, from, to));
    parts[4]!.push(bare(batch.collectedAtMicros, from, to));
    yield;
  }
  return [`{${[...agents.keys()].join(',')}}`, ...parts.map((slices) => `{${slices.join(',')}}`)];
}

/** Each row's agent as its 1-based index in `agents` (in order of first appearance), which it extends. */
function agentIndexes(agentIds: readonly string[], from: number, to: number, agents: Map<string, number>): string {
  const indexes = new Array<number>(to - from);
  // A batch lists an agent's keys together: most rows repeat the row before.
  let previous: string | undefined;
  let index = 0;
  for (let i = from; i < to; i++) {
    const agentId = agentIds[i]!;
    if (agentId !== previous) {
      previous = agentId;
      index = agents.get(agentId) ?? 0;
      if (index === 0) agents.set(agentId, (index = agents.size + 1));
    }
    indexes[i - from] = index;
  }
  return indexes.join(',');
}
