// The reporter's book of held keys: the newest value of each key reported
// and not yet acknowledged, at most `maxKeys` of them. A key is pending (to be
// sent), or in flight (sent, unanswered), or both (a newer value was reported
// while the older one was in flight). The send loop (reporter.ts) takes a
// message's worth of pending keys, and lands it when its outcome is known,
// putting back what goes again. No network and no timers: tested alone.

import { MAX_ALL_KEYS_BYTES, MAX_ERROR_BYTES, MAX_KEY_CHARS, MAX_VALUE_BYTES, truncateUtf8 } from './report.js';

/** A key's new value: the value itself, or a value and/or an error (both default to ""). */
export type ReportValue = string | { value?: string; error?: string };

/** A key's value and error as the service stores them. */
export interface Item {
  key: string;
  value: string;
  error: string;
}

export interface Entry {
  key: string;
  /** The item as sent: `{"key","value","error","collected_at"}`. */
  json: string;
  bytes: number;
  keyBytes: number;
  /** The earliest report() call (version) whose value of this key this entry stands for. */
  since: number;
}

// What a message adds around its items (`{"seq":…,"metadata":[…]}`), with room to spare.
const MESSAGE_OVERHEAD_BYTES = 64;

/** `value` and `error` as the service stores them: trimmed, cut to 2048 bytes with its messages. */
function normalizeItem(value: string, error: string): { value: string; error: string } {
  let v = value.trim();
  const originalError = error.trim();
  let e = originalError;
  const valueBytes = Buffer.byteLength(v);
  if (valueBytes > MAX_VALUE_BYTES) {
    e = `value of ${valueBytes} bytes exceeded ${MAX_VALUE_BYTES} bytes`;
    v = truncateUtf8(v, MAX_VALUE_BYTES);
  }
  const errorBytes = Buffer.byteLength(originalError);
  if (errorBytes > MAX_ERROR_BYTES) e = `error of ${errorBytes} bytes exceeded ${MAX_ERROR_BYTES} bytes`;
  return { value: v, error: e };
}

function checkKey(key: string): void {
  const chars = [...key].length;
  if (chars < 1 || chars > MAX_KEY_CHARS) {
    throw new RangeError(`metadata key must be 1-${MAX_KEY_CHARS} characters (got ${chars}: ${JSON.stringify(key)})`);
  }
  if (key.includes('\0')) throw new RangeError(`metadata key ${JSON.stringify(key)} must not contain NUL characters`);
}

/**
 * A report's items, checked whole before any is taken: a TypeError or
 * RangeError for a key or value the service would refuse (a caller's bug,
 * not a condition of the service).
 */
export function itemsOf(values: Readonly<Record<string, ReportValue>>): Item[] {
  if (values === null || typeof values !== 'object') throw new TypeError('report() takes an object of key: value');
  const items: Item[] = [];
  for (const [key, raw] of Object.entries(values)) {
    checkKey(key);
    const given = typeof raw === 'string' ? { value: raw, error: '' } : raw;
    if (given === null || typeof given !== 'object') {
      throw new TypeError(`metadata ${JSON.stringify(key)}: a string, or { value?, error? } of strings`);
    }
    const value = given.value ?? '';
    const error = given.error ?? '';
    if (typeof value !== 'string' || typeof error !== 'string') {
      throw new TypeError(`metadata ${JSON.stringify(key)}: value and error must be strings`);
    }
    if (value.includes('\0') || error.includes('\0')) {
      throw new RangeError(`metadata ${JSON.stringify(key)}: value and error must not contain NUL characters`);
    }
    items.push({ key, ...normalizeItem(value, error) });
  }
  return items;
}

/**
 * The keys of a report to send again after the service dropped `dropped` of
 * them. It answers how many, not which; README says which from Retry-After:
 * 1 while flushes succeed, when keys are refused because the channel is full,
 * and a full channel refuses a suffix of the report (everything from the
 * first key that did not fit): those go again. Over 1 while flushes fail,
 * when new keys are refused wherever they are (MAX_HELD_KEYS held): the
 * whole report goes again (the keys it took are merged into the held batch).
 * A key with a newer value reported meanwhile sends that one instead.
 */
export function droppedOf(batch: readonly Entry[], dropped: number, retryAfterS: number): readonly Entry[] {
  return retryAfterS > 1 ? batch : batch.slice(Math.max(0, batch.length - dropped));
}

export class HeldKeys {
  /** The newest value of each key not yet sent (or to be sent again), in the order keys were first reported. */
  private readonly pending = new Map<string, Entry>();
  /** The message or POST in flight. */
  private flight: readonly Entry[] | undefined;
  private readonly flightKeys = new Set<string>();
  /** Keys in flight that are not also pending: with pending.size, the distinct keys held. */
  private flightOnly = 0;
  /** Counts add() calls; entries remember the first call they stand for. */
  private version = 0;
  private flushWaiters: { upTo: number; resolve: () => void }[] = [];

  constructor(private readonly maxKeys: number) {}

  /** Distinct keys held: pending, or in flight. */
  get held(): number {
    return this.pending.size + this.flightOnly;
  }

  /** Keys waiting to be sent. */
  get pendingKeys(): number {
    return this.pending.size;
  }

  get inFlight(): boolean {
    return this.flight !== undefined;
  }

  /**
   * Takes the newest value of each item, stamped `collectedAt`; a new key is
   * refused while `maxKeys` are held (a key held takes its newest value
   * whatever the bound).
   */
  add(items: readonly Item[], collectedAt: string): { accepted: number; refused: number } {
    const version = ++this.version;
    let accepted = 0;
    let refused = 0;
    for (const item of items) {
      const older = this.pending.get(item.key);
      const inFlight = this.flightKeys.has(item.key);
      if (!older && !inFlight && this.pending.size + this.flightOnly >= this.maxKeys) {
        refused++;
        continue;
      }
      if (!older && inFlight) this.flightOnly--;
      const json = JSON.stringify({ key: item.key, value: item.value, error: item.error, collected_at: collectedAt });
      this.pending.set(item.key, {
        key: item.key,
        json,
        bytes: Buffer.byteLength(json),
        keyBytes: Buffer.byteLength(item.key),
        since: older ? older.since : version,
      });
      accepted++;
    }
    return { accepted, refused };
  }

  /** The next message: pending keys in order, at most 6144 bytes of keys and `maxMessageBytes` of JSON. */
  take(maxMessageBytes: number): readonly Entry[] {
    if (this.flight) throw new Error('HeldKeys.take: a message is in flight already');
    const batch: Entry[] = [];
    let keyBytes = 0;
    let bytes = MESSAGE_OVERHEAD_BYTES;
    for (const entry of this.pending.values()) {
      if (
        batch.length > 0 &&
        (keyBytes + entry.keyBytes > MAX_ALL_KEYS_BYTES || bytes + entry.bytes + 1 > maxMessageBytes)
      ) {
        break;
      }
      batch.push(entry);
      keyBytes += entry.keyBytes;
      bytes += entry.bytes + 1;
    }
    for (const entry of batch) {
      this.pending.delete(entry.key);
      this.flightKeys.add(entry.key);
    }
    this.flight = batch;
    this.flightOnly = batch.length;
    return batch;
  }

  /**
   * The message in flight was answered (or given up): it is no longer in
   * flight, and `again` (of its entries) is pending again, unless a newer
   * value of the key was reported meanwhile, which goes instead.
   */
  land(again: readonly Entry[]): void {
    this.flight = undefined;
    this.flightKeys.clear();
    this.flightOnly = 0;
    for (const entry of again) {
      const newer = this.pending.get(entry.key);
      if (newer) newer.since = Math.min(newer.since, entry.since);
      else this.pending.set(entry.key, entry);
    }
    this.settleWaiters();
  }

  /** Drops everything held (pending and in flight); returns how many keys. */
  discard(): number {
    const discarded = this.held;
    this.pending.clear();
    this.flight = undefined;
    this.flightKeys.clear();
    this.flightOnly = 0;
    this.settleWaiters();
    return discarded;
  }

  /** Resolves once every value added so far is landed without going again, or discarded. */
  flushed(): Promise<void> {
    const upTo = this.version;
    if (this.oldestHeld() > upTo) return Promise.resolve();
    return new Promise((resolve) => this.flushWaiters.push({ upTo, resolve }));
  }

  private oldestHeld(): number {
    let oldest = Number.POSITIVE_INFINITY;
    for (const entry of this.pending.values()) oldest = Math.min(oldest, entry.since);
    for (const entry of this.flight ?? []) oldest = Math.min(oldest, entry.since);
    return oldest;
  }

  private settleWaiters(): void {
    if (this.flushWaiters.length === 0) return;
    const oldest = this.oldestHeld();
    const waiting = this.flushWaiters;
    this.flushWaiters = [];
    for (const waiter of waiting) {
      if (waiter.upTo < oldest) waiter.resolve();
      else this.flushWaiters.push(waiter);
    }
  }
}
