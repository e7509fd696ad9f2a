// The one retry schedule: flush retries, NOTIFY retries, LISTEN reconnects
// and Retry-After all come from it.

import { describe, expect, it } from 'vitest';
import { Backoff, backoffCeiling, backoffDelay } from '../src/backoff.js';

describe('backoff', () => {
  it('doubles from the first delay to the cap, half of each wait random', () => {
    const full = new Backoff({ random: () => 1 });
    expect(Array.from({ length: 11 }, () => full.next())).toEqual([
      100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000,
    ]);
    const half = new Backoff({ random: () => 0 });
    expect([half.next(), half.next(), half.next()]).toEqual([50, 100, 200]);
  });

  it('starts again from the first delay after a success', () => {
    const backoff = new Backoff({ random: () => 1 });
    backoff.next();
    backoff.next();
    expect(backoff.attempts).toBe(2);
    backoff.reset();
    expect(backoff.attempts).toBe(0);
    expect(backoff.ceilingMs).toBe(0);
    expect(backoff.next()).toBe(100);
  });

  it('tells the longest the current wait can be, for Retry-After', () => {
    const backoff = new Backoff({ random: () => 0.5 });
    const ceilings = Array.from({ length: 10 }, () => (backoff.next(), backoff.ceilingMs));
    expect(ceilings).toEqual([100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000]);
  });

  it('gives LISTEN reconnects the same shape with their own cap', () => {
    expect([1, 2, 3, 6, 7, 20].map((failures) => backoffCeiling(failures, 100, 5000))).toEqual([
      100, 200, 400, 3200, 5000, 5000,
    ]);
    expect(backoffDelay(3, { initialMs: 100, maxMs: 5000, random: () => 0 })).toBe(200);
  });
});
