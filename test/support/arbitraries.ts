// fast-check inputs shared by the fuzz tests of the POST and the stream.

import fc from 'fast-check';

/**
 * One item of a report's `metadata`, near the valid shape, where the bugs
 * live: keys an agent declared (`cpu`, `mem`) among arbitrary and binary
 * strings and wrong types, values and errors over their limits, and
 * collected_at in and out of RFC 3339.
 */
export const metadataItem = fc.record(
  {
    key: fc.oneof(
      fc.string({ maxLength: 200 }),
      fc.string({ unit: 'binary', maxLength: 130 }),
      fc.constantFrom('cpu', 'mem'),
      fc.integer(),
      fc.constant(null),
    ),
    value: fc.oneof(
      fc.string({ maxLength: 3000 }),
      fc.string({ unit: 'binary', maxLength: 1000 }),
      fc.double(),
      fc.boolean(),
      fc.object(),
    ),
    error: fc.oneof(fc.string({ maxLength: 2100 }), fc.constant(undefined), fc.array(fc.string())),
    collected_at: fc.oneof(
      fc.date({ noInvalidDate: true }).map((d) => d.toISOString()),
      fc.string({ maxLength: 40 }),
      fc.constant('2026-11-23T00:00:00Z'),
      fc.constant('9999-12-31T23:59:59.999999999+14:00'),
      fc.integer(),
    ),
  },
  { requiredKeys: [] },
);
