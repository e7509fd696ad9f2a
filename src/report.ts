// An agent's metadata report, checked and normalised as coder's
// BatchUpdateMetadata does it (docs/original.md, "The input rules"), with two differences
// the contract asks for: a report over the key limit is refused whole (400,
// nothing applied) instead of cut, and an agent's collected_at is kept
// (clamped to server time) instead of replaced by it.

import { parseRfc3339Micros } from './timestamps.js';

export const MAX_VALUE_BYTES = 2048;
export const MAX_ERROR_BYTES = MAX_VALUE_BYTES;
// 6144 keeps the original's NOTIFY headroom; it also bounds a report to 6144 keys.
export const MAX_ALL_KEYS_BYTES = 6144;
export const MAX_KEY_CHARS = 127;

export interface ReportItem {
  key: string;
  value?: string;
  error?: string;
  collected_at?: string;
}

/** The report as the batcher's parallel arrays. */
export interface Report {
  keys: string[];
  values: string[];
  errors: string[];
  /** Microseconds since the epoch (timestamps.ts). */
  collectedAtMicros: number[];
}

export class ReportError extends Error {
  override name = 'ReportError';
  readonly statusCode = 400;
}

// A UTF-16 code unit is at most 3 UTF-8 bytes: shorter strings cannot be over the limit.
const SAFE_LENGTH = Math.floor(MAX_VALUE_BYTES / 3);

/**
 * Checks and normalises the items of one report. Throws ReportError (nothing
 * applied) on keys over the limits, NUL characters, or a bad collected_at.
 */
export function normalizeReport(items: readonly ReportItem[], nowMicros: number): Report {
  const report: Report = { keys: [], values: [], errors: [], collectedAtMicros: [] };
  let allKeysBytes = 0;
  for (let i = 0; i < items.length; i++) {
    const item = items[i]!;
    const key = item.key;
    allKeysBytes += Buffer.byteLength(key);
    if (allKeysBytes > MAX_ALL_KEYS_BYTES) {
      throw new ReportError(`metadata keys of ${allKeysBytes} bytes exceeded ${MAX_ALL_KEYS_BYTES} bytes`);
    }
    // Postgres text cannot hold NUL; one such value would fail the whole batch.
    if (key.includes('\0')) throw new ReportError(`metadata[${i}].key must not contain NUL characters`);
    let value = (item.value ?? '').trim();
    const originalError = (item.error ?? '').trim();
    if (value.includes('\0') || originalError.includes('\0')) {
      throw new ReportError(`metadata[${i}] value and error must not contain NUL characters`);
    }
    let error = originalError;
    if (value.length > SAFE_LENGTH) {
      const bytes = Buffer.byteLength(value);
      if (bytes > MAX_VALUE_BYTES) {
        error = `value of ${bytes} bytes exceeded ${MAX_VALUE_BYTES} bytes`;
        value = truncateUtf8(value, MAX_VALUE_BYTES);
      }
    }
    if (originalError.length > SAFE_LENGTH) {
      const bytes = Buffer.byteLength(originalError);
      if (bytes > MAX_ERROR_BYTES) error = `error of ${bytes} bytes exceeded ${MAX_ERROR_BYTES} bytes`;
    }
    report.keys.push(key);
    report.values.push(value);
    report.errors.push(error);
    report.collectedAtMicros.push(collectedAt(item.collected_at, nowMicros, i));
  }
  return report;
}

function collectedAt(raw: string | undefined, nowMicros: number, index: number): number {
  if (raw === undefined) return nowMicros;
  // RFC 3339, as agents send it (Go's time.Time marshals to this), to the microsecond.
  const micros = parseRfc3339Micros(raw);
  if (micros === undefined) {
    throw new ReportError(`metadata[${index}].collected_at must be an RFC 3339 timestamp such as 2026-11-23T00:00:00Z`);
  }
  // An agent's clock ahead of ours would make its value unbeatable.
  return Math.min(micros, nowMicros);
}

/** The longest prefix of `text` of at most `maxBytes` UTF-8 bytes that ends on a character boundary. */
export function truncateUtf8(text: string, maxBytes: number): string {
  const bytes = Buffer.from(text);
  if (bytes.length <= maxBytes) return text;
  let end = maxBytes;
  // Step back over continuation bytes (10xxxxxx) to the start of the cut character.
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--;
  return bytes.toString('utf8', 0, end);
}
