// The bound on failed authentications, alone: the addresses it remembers are
// bounded (the least recently failing forgotten first, counted), and an IPv6
// client is one /64; the settings' defaults and checks. The service-level
// behaviour is in auth.test.ts.

import FakeTimers from '@sinonjs/fake-timers';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { AuthFailures, clientKey } from '../src/authFailures.js';
import { loadConfig } from '../src/config.js';
import { createLogger } from '../src/logger.js';
import { AuthMetrics } from '../src/metrics.js';
import { metricValue } from './support/harness.js';

describe('the addresses remembered', () => {
  it('are bounded: the least recently failing is forgotten first, counted', async () => {
    const registry = new Registry();
    const failures = new AuthFailures({
      ratePerSecond: 1,
      burst: 1,
      maxAddresses: 2,
      metrics: new AuthMetrics(registry),
      logger: createLogger('silent'),
      clock: FakeTimers.createClock(0),
    });
    for (const address of ['10.0.0.1', '10.0.0.2', '10.0.0.3']) failures.record(address, 'malformed', undefined);
    expect(await metricValue(registry, 'metabatch_auth_failure_addresses')).toBe(2);
    expect(await metricValue(registry, 'metabatch_auth_failure_addresses_evicted_total')).toBe(1);
    // The one forgotten starts afresh; the others are still throttled.
    expect(failures.retryAfter('10.0.0.1')).toBeUndefined();
    expect(failures.retryAfter('10.0.0.3')).toBe(1);
  });

  it('are IPv4 addresses (also IPv4-mapped) and IPv6 /64s, so the next address of a /64 does not start afresh', () => {
    expect(clientKey('192.0.2.1')).toBe('192.0.2.1');
    expect(clientKey('::ffff:192.0.2.1')).toBe('192.0.2.1');
    expect(clientKey('2001:db8:1:2::1')).toBe('2001:db8:1:2::/64');
    expect(clientKey('2001:0db8:0001:0002:ffff:ffff:ffff:ffff')).toBe('2001:db8:1:2::/64');
    expect(clientKey('2001:db8::1')).toBe('2001:db8:0:0::/64');
    expect(clientKey('::1')).toBe('0:0:0:0::/64');
    expect(clientKey('64:ff9b::192.0.2.1')).toBe('64:ff9b::192.0.2.1');
  });
});

describe('the settings', () => {
  it('default to 20 a second and a burst of 1,000, and refuse bad values with one line', () => {
    expect(loadConfig({})).toMatchObject({ authFailureRate: 20, authFailureBurst: 1000 });
    expect(loadConfig({ AUTH_FAILURE_RATE: '0.5', AUTH_FAILURE_BURST: '3' })).toMatchObject({
      authFailureRate: 0.5,
      authFailureBurst: 3,
    });
    expect(() => loadConfig({ AUTH_FAILURE_BURST: '0' })).toThrow(
      'AUTH_FAILURE_BURST must be a whole number from 1 to 10000000 (got "0")',
    );
    expect(() => loadConfig({ AUTH_FAILURE_RATE: 'fast' })).toThrow(
      'AUTH_FAILURE_RATE must be a number from 0.01 to 1000000 (got "fast")',
    );
  });
});
