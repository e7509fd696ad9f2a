// The reporter's book of held keys alone (src/reporterBook.ts): no network,
// no timers. What the send loop relies on: the bound on distinct keys (a key
// in flight counts once, and takes its newest value whatever the bound), the
// split of messages, what goes again after an answer, and when flush()
// resolves.

import { describe, expect, it } from 'vitest';
import { droppedOf, HeldKeys, itemsOf, type Entry } from '../src/reporterBook.js';

const AT = '2026-01-01T00:00:00.000Z';

function add(book: HeldKeys, values: Record<string, string>): { accepted: number; refused: number } {
  return book.add(itemsOf(values), AT);
}

const keysOf = (entries: readonly Entry[]) => entries.map((entry) => entry.key);

/** Whether `promise` has resolved by the end of this turn's microtasks. */
async function resolved(promise: Promise<void>): Promise<boolean> {
  let done = false;
  void promise.then(() => (done = true));
  await new Promise((resolve) => setImmediate(resolve));
  return done;
}

describe('HeldKeys', () => {
  it('holds at most maxKeys distinct keys; a key held, pending or in flight, takes its newest value whatever the bound', () => {
    const book = new HeldKeys(2);
    expect(add(book, { a: '1', b: '1', c: '1' })).toEqual({ accepted: 2, refused: 1 });
    expect(add(book, { a: '2', c: '2' })).toEqual({ accepted: 1, refused: 1 });
    const batch = book.take(1024 * 1024);
    expect(keysOf(batch)).toEqual(['a', 'b']);
    expect(JSON.parse(batch[0]!.json)).toEqual({ key: 'a', value: '2', error: '', collected_at: AT });
    expect({ held: book.held, pending: book.pendingKeys, inFlight: book.inFlight }).toEqual({
      held: 2,
      pending: 0,
      inFlight: true,
    });
    // In flight and pending again: still one key.
    expect(add(book, { a: '3', c: '3' })).toEqual({ accepted: 1, refused: 1 });
    expect({ held: book.held, pending: book.pendingKeys }).toEqual({ held: 2, pending: 1 });
    book.land([]);
    expect({ held: book.held, pending: book.pendingKeys, inFlight: book.inFlight }).toEqual({
      held: 1,
      pending: 1,
      inFlight: false,
    });
    expect(add(book, { c: '4' })).toEqual({ accepted: 1, refused: 0 });
  });

  it('splits messages at 6144 bytes of keys and at maxMessageBytes, with one key at least', () => {
    const keys = Array.from({ length: 60 }, (_, i) => `k${String(i).padStart(2, '0')}${'x'.repeat(120)}`);
    const book = new HeldKeys(6144);
    add(book, Object.fromEntries(keys.map((key) => [key, 'v'])));
    // 123 bytes a key: 49 keys are 6027 bytes, 50 would be 6150.
    const first = book.take(1024 * 1024);
    expect(keysOf(first)).toEqual(keys.slice(0, 49));
    book.land([]);
    expect(keysOf(book.take(1024 * 1024))).toEqual(keys.slice(49));
    book.land([]);

    add(book, { a: 'x'.repeat(100), b: 'x'.repeat(100), c: 'x'.repeat(100) });
    // A message of one item is its JSON plus 65 bytes; a bound below that still sends one key.
    const one = book.take(1);
    expect(keysOf(one)).toEqual(['a']);
    book.land([]);
    const two = book.take(64 + 2 * (one[0]!.bytes + 1));
    expect(keysOf(two)).toEqual(['b', 'c']);
    expect(() => book.take(1)).toThrow(/in flight already/);
  });

  it('puts back what goes again, unless a newer value was reported meanwhile', () => {
    const book = new HeldKeys(10);
    add(book, { a: '1', b: '1', c: '1' });
    const batch = book.take(1024 * 1024);
    add(book, { b: '2' });
    book.land(batch);
    const again = book.take(1024 * 1024);
    // In first-reported order of the book as it stands: b (newer, pending first), then a and c put back.
    expect(again.map((entry) => `${entry.key}=${(JSON.parse(entry.json) as { value: string }).value}`)).toEqual([
      'b=2',
      'a=1',
      'c=1',
    ]);
  });

  it('flushed() resolves once every value added before it is landed without going again, or discarded', async () => {
    const book = new HeldKeys(10);
    expect(await resolved(book.flushed())).toBe(true);
    add(book, { a: '1', b: '1' });
    const flushed = book.flushed();
    const batch = book.take(1024 * 1024);
    // b's newer value stands for the older one too: it must land as well.
    add(book, { b: '2' });
    book.land(droppedOf(batch, 1, 1));
    expect(await resolved(flushed)).toBe(false);
    const again = book.take(1024 * 1024);
    expect(keysOf(again)).toEqual(['b']);
    // A value added later does not hold back a flush asked for before it.
    add(book, { c: '1' });
    book.land([]);
    expect(await resolved(flushed)).toBe(true);
    const later = book.flushed();
    expect(book.discard()).toBe(1);
    expect(await resolved(later)).toBe(true);
    expect(book.held).toBe(0);
  });

  it('droppedOf: the suffix the service dropped (retry_after 1), or the whole report (over 1)', () => {
    const book = new HeldKeys(10);
    add(book, { a: '1', b: '1', c: '1' });
    const batch = book.take(1024 * 1024);
    expect(keysOf(droppedOf(batch, 2, 1))).toEqual(['b', 'c']);
    expect(keysOf(droppedOf(batch, 0, 1))).toEqual([]);
    expect(keysOf(droppedOf(batch, 1, 5))).toEqual(['a', 'b', 'c']);
  });

  it('itemsOf: values and errors as the service stores them; keys and values it would refuse are thrown whole', () => {
    expect(itemsOf({ a: '  1 ', b: { error: ' e ' }, c: {} })).toEqual([
      { key: 'a', value: '1', error: '' },
      { key: 'b', value: '', error: 'e' },
      { key: 'c', value: '', error: '' },
    ]);
    expect(itemsOf({ a: 'é'.repeat(1100) })).toEqual([
      { key: 'a', value: 'é'.repeat(1024), error: 'value of 2200 bytes exceeded 2048 bytes' },
    ]);
    expect(itemsOf({ a: { error: 'x'.repeat(2049) } })[0]!.error).toBe('error of 2049 bytes exceeded 2048 bytes');
    // 127 characters, not bytes.
    expect(itemsOf({ ['é'.repeat(127)]: 'x' })).toHaveLength(1);
    expect(() => itemsOf({ ['k'.repeat(128)]: 'x' })).toThrow(/1-127 characters/);
    expect(() => itemsOf({ '': 'x' })).toThrow(RangeError);
    expect(() => itemsOf({ 'a\u0000': 'x' })).toThrow(/NUL/);
    expect(() => itemsOf({ a: { value: 'x', error: 'y\u0000' } })).toThrow(/NUL/);
    expect(() => itemsOf({ a: 12 as unknown as string })).toThrow(TypeError);
    expect(() => itemsOf({ a: { value: 12 as unknown as string } })).toThrow(TypeError);
    expect(() => itemsOf(null as unknown as Record<string, string>)).toThrow(TypeError);
  });
});
