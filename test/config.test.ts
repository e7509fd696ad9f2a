import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import { CLI, run } from './support/process.js';

describe('configuration', () => {
  it('has the contract’s defaults', () => {
    expect(loadConfig({})).toEqual({
      databaseUrl: undefined,
      dataDir: '.metabatch',
      host: '127.0.0.1',
      port: 8080,
      batchSize: 500,
      flushIntervalMs: 5000,
      flushJitter: 0.1,
      poolSize: 10,
      channelMultiplier: 5,
      finalFlushTimeoutMs: 15000,
      maxHeldKeys: 5000,
      notifyChannel: 'workspace_agent_metadata_batch',
      adminToken: undefined,
      logLevel: 'info',
      maxWatches: 5000,
      maxWatchesPerAdmin: 2000,
      authFailureRate: 20,
      authFailureBurst: 1000,
      trustProxy: undefined,
    });
  });

  it('takes TRUST_PROXY as addresses, CIDRs and proxy-addr names, and refuses anything else', () => {
    expect(loadConfig({ TRUST_PROXY: '10.0.0.1, 172.16.0.0/12,uniquelocal,::1' }).trustProxy).toBe(
      '10.0.0.1,172.16.0.0/12,uniquelocal,::1',
    );
    expect(() => loadConfig({ TRUST_PROXY: 'true' })).toThrow(/^TRUST_PROXY must be a comma-separated list/);
    expect(() => loadConfig({ TRUST_PROXY: '10.0.0.0/8/1' })).toThrow(/^TRUST_PROXY/);
  });

  it.each([
    ['BATCH_SIZE', 'abc', 'BATCH_SIZE must be a whole number from 1 to 100000 (got "abc")'],
    ['BATCH_SIZE', '0', 'BATCH_SIZE must be a whole number from 1 to 100000 (got "0")'],
    ['BATCH_SIZE', '1.5', 'BATCH_SIZE must be a whole number from 1 to 100000 (got "1.5")'],
    ['FLUSH_INTERVAL_MS', '-1', 'FLUSH_INTERVAL_MS must be a whole number from 1 to 3600000 (got "-1")'],
    ['PORT', '70000', 'PORT must be a whole number from 0 to 65535 (got "70000")'],
    ['CHANNEL_MULTIPLIER', '1e3', 'CHANNEL_MULTIPLIER must be a whole number from 1 to 1000 (got "1e3")'],
    ['FINAL_FLUSH_TIMEOUT_MS', 'soon', 'FINAL_FLUSH_TIMEOUT_MS must be a whole number from 1 to 3600000 (got "soon")'],
    [
      'NOTIFY_CHANNEL',
      'Bad-Name',
      'NOTIFY_CHANNEL must be 1-63 characters of a-z, 0-9 and _, not starting with a digit',
    ],
    ['LOG_LEVEL', 'loud', 'LOG_LEVEL must be one of fatal, error, warn, info, debug, trace, silent (got "loud")'],
    ['DATABASE_URL', 'mysql://x', 'DATABASE_URL must be a postgres:// or postgresql:// URL'],
    ['ADMIN_TOKEN', 'short', 'ADMIN_TOKEN must be at least 16 characters'],
    ['FLUSH_JITTER', '0.6', 'FLUSH_JITTER must be a number from 0 to 0.5 (got "0.6")'],
    ['FLUSH_JITTER', '-0.1', 'FLUSH_JITTER must be a number from 0 to 0.5 (got "-0.1")'],
    ['FLUSH_JITTER', 'some', 'FLUSH_JITTER must be a number from 0 to 0.5 (got "some")'],
    ['PG_POOL_SIZE', '0', 'PG_POOL_SIZE must be a whole number from 1 to 1000 (got "0")'],
  ])('refuses %s=%s with one line naming it', (name, value, message) => {
    expect(() => loadConfig({ [name]: value })).toThrow(message);
  });

  it('takes FLUSH_JITTER as a fraction and PG_POOL_SIZE as a count', () => {
    expect(loadConfig({ FLUSH_JITTER: '0.25', PG_POOL_SIZE: '4' })).toMatchObject({ flushJitter: 0.25, poolSize: 4 });
    expect(loadConfig({ FLUSH_JITTER: '0' }).flushJitter).toBe(0);
  });

  it('refuses MAX_HELD_KEYS below BATCH_SIZE', () => {
    expect(() => loadConfig({ BATCH_SIZE: '100', MAX_HELD_KEYS: '50' })).toThrow(
      'MAX_HELD_KEYS must be a whole number from 100 to 100000000 (got "50")',
    );
  });

  it.each([
    ['BATCH_SIZE', 'abc', 'metabatch: BATCH_SIZE must be a whole number from 1 to 100000 (got "abc")\n'],
    ['FLUSH_INTERVAL_MS', '-1', 'metabatch: FLUSH_INTERVAL_MS must be a whole number from 1 to 3600000 (got "-1")\n'],
  ])('the CLI with %s=%s exits non-zero with that one line', async (name, value, line) => {
    const cli = run('node', [CLI, 'serve'], { [name]: value });
    const { code } = await cli.exited;
    expect(code).toBe(2);
    expect(cli.stderr()).toBe(line);
    expect(cli.stdout()).toBe('');
  });
});
