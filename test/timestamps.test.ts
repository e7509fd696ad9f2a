// Timestamps to the microsecond: RFC 3339 in any time zone, and back.

import { describe, expect, it } from 'vitest';
import { microsToIso, parseRfc3339Micros } from '../src/timestamps.js';

describe('parseRfc3339Micros', () => {
  it.each([
    ['2026-11-23T00:00:00Z', '2026-11-23T00:00:00.000000Z'],
    ['2026-11-23t00:00:00z', '2026-11-23T00:00:00.000000Z'],
    ['2026-11-23T10:00:00.123456+02:00', '2026-11-23T08:00:00.123456Z'],
    ['2026-11-22 23:30:00.000001-01:30', '2026-11-23T01:00:00.000001Z'],
    ['2026-11-23T00:00:00.1Z', '2026-11-23T00:00:00.100000Z'],
    ['2026-11-23T00:00:00.123456789Z', '2026-11-23T00:00:00.123457Z'],
    ['2026-11-23T00:00:00.9999995Z', '2026-11-23T00:00:01.000000Z'],
    ['2024-02-29T12:00:00Z', '2024-02-29T12:00:00.000000Z'],
    ['1969-12-31T23:59:59.5Z', '1969-12-31T23:59:59.500000Z'],
    ['0099-06-01T00:00:00Z', '0099-06-01T00:00:00.000000Z'],
  ])('reads %s as %s', (text, iso) => {
    expect(microsToIso(parseRfc3339Micros(text)!)).toBe(iso);
  });

  it.each([
    'yesterday',
    '2026-11-23',
    '2026-11-23T00:00:00',
    '2026-11-23T00:00Z',
    '2026-02-29T00:00:00Z',
    '2026-04-31T00:00:00Z',
    '2026-13-01T00:00:00Z',
    '2026-11-23T24:00:00Z',
    '2026-11-23T00:60:00Z',
    '2026-11-23T00:00:60Z',
    '2026-11-23T00:00:00.Z',
    '2026-11-23T00:00:00+2:00',
    '2026-11-23T00:00:00+24:00',
    '2026-11-23T00:00:00Z ',
    '0000-01-01T00:00:00Z',
    '２０２６-11-23T00:00:00Z',
  ])('refuses %j', (text) => {
    expect(parseRfc3339Micros(text)).toBeUndefined();
  });

  it('agrees with Date.parse to the millisecond on a thousand instants', () => {
    for (let i = 0; i < 1000; i++) {
      const ms = Date.UTC(1990 + (i % 60), i % 12, 1 + (i % 28), i % 24, (i * 7) % 60, (i * 13) % 60, i % 1000);
      const iso = new Date(ms).toISOString();
      expect(parseRfc3339Micros(iso)).toBe(ms * 1000);
    }
  });
});
