// What a watch sends of an agent: each row as clients see it (its `age`, and
// whether it is `stale` or `pending`), and the text of a data event.

import type { MetadataRow } from './store.js';

// The original's "never reported": collected_at in the year 1.
const NEVER_REPORTED_BEFORE = Date.parse('1000-01-01T00:00:00Z');

/** One row as clients see it. */
export interface MetadataView {
  key: string;
  display_name: string;
  display_order: number;
  interval: number;
  timeout: number;
  value: string;
  error: string;
  collected_at: string;
  /** Whole seconds since collected_at. */
  age: number;
  /** Older than its interval allows: `interval > 0 && age > max(interval + 2 × timeout, 5)`. */
  stale: boolean;
  /** Present (true) when the key was never reported. */
  pending?: true;
  /** Only when asked for (bulk read with include_script). */
  script?: string;
}

/**
 * How a stream's data events look: `list`, the agent's list alone (the
 * one-agent watch); `agent`, `{"agent_id","metadata"}` (the many-agent watch).
 */
export type WatchFormat = 'list' | 'agent';

/** A row as clients see it, at `now`. */
export function toView(row: MetadataRow, now: number, options: { includeScript?: boolean } = {}): MetadataView {
  const collected = row.collected_at.getTime();
  const age = Math.max(0, Math.floor((now - collected) / 1000));
  const pending = collected < NEVER_REPORTED_BEFORE;
  const view: MetadataView = {
    key: row.key,
    display_name: row.display_name,
    display_order: row.display_order,
    interval: row.interval,
    timeout: row.timeout,
    value: row.value,
    error: row.error,
    collected_at: row.collected_at.toISOString(),
    age,
    stale: !pending && isStale(row.interval, row.timeout, age),
  };
  if (pending) view.pending = true;
  if (options.includeScript) view.script = row.script;
  return view;
}

/** Coder's UI rule, in seconds: a value is stale once older than its interval, twice its timeout, and 5 s. */
export function isStale(interval: number, timeout: number, age: number): boolean {
  return interval > 0 && age > Math.max(interval + 2 * timeout, 5);
}

export function dataEvent(format: WatchFormat, agentId: string, rows: readonly MetadataRow[], now: number): string {
  const metadata = rows.map((row) => toView(row, now));
  const data = format === 'list' ? metadata : { agent_id: agentId, metadata };
  return `event: data\ndata: ${JSON.stringify(data)}\n\n`;
}
