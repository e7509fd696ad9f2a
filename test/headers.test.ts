// Response headers, on the service as production wires it: every answer
// carries `X-Content-Type-Options: nosniff` (JSON, errors, /metrics, watch
// streams, the HTTP parser's own refusals), and /docs a CSP with
// `frame-ancestors 'none'` under which the Swagger UI still renders in a real
// browser (Debian's Chromium driven by playwright-core) with no CSP violation.

import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { describe, expect, it } from 'vitest';
import { closedAfterEach, testDatabase } from './support/db.js';
import { ADMIN_TOKEN, startTestService } from './support/service.js';
import { CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM } from './support/chromium.js';

const db = testDatabase();
const appHarness = closedAfterEach(() => startTestService(db));

// The browser globals that functions run in the page use (this project's types are Node's, not the DOM's).
declare const document: {
  addEventListener(type: string, listener: (event: { violatedDirective: string; blockedURI: string }) => void): void;
  querySelector(selector: string): { textContent: string | null } | null;
  querySelectorAll(selector: string): { length: number };
};
declare const window: { cspViolations: string[] };
declare function getComputedStyle(element: unknown): { borderRadius: string };

/** The status and headers of an answer over real HTTP; an event stream is closed once its headers arrive. */
function head(base: string, url: string, headers: Record<string, string> = {}) {
  return new Promise<{ status: number; headers: http.IncomingHttpHeaders }>((resolve, reject) => {
    http
      .get(`${base}${url}`, { headers, agent: false }, (response) => {
        resolve({ status: response.statusCode!, headers: response.headers });
        response.destroy();
      })
      .on('error', reject);
  });
}

describe('X-Content-Type-Options: nosniff', () => {
  it('is on every answer: JSON, errors, /metrics, the pages, a watch stream and the HTTP parser’s refusals', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu']);
    const agent = { authorization: `Bearer ${token}` };
    const answers = {
      healthz: await h.app.inject({ url: '/healthz' }),
      metrics: await h.app.inject({ url: '/metrics' }),
      openapi: await h.app.inject({ url: '/openapi.json' }),
      accepted: await h.post(id, token, { metadata: [{ key: 'cpu', value: '1' }] }),
      invalid: await h.post(id, token, { metadata: 'cpu' }),
      unauthorized: await h.post(id, 'wrong', { metadata: [] }),
      notFound: await h.app.inject({ url: '/nowhere' }),
      notJson: await h.app.inject({
        method: 'POST',
        url: `/v1/agents/${id}/metadata`,
        headers: { ...agent, 'content-type': 'text/plain' },
        payload: 'x',
      }),
      upgradeRequired: await h.app.inject({ url: `/v1/agents/${id}/metadata/stream`, headers: agent }),
      list: await h.app.inject({ url: '/v1/agents', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } }),
      docs: await h.app.inject({ url: '/docs' }),
      page: await h.app.inject({ url: '/' }),
    };
    const statuses = Object.fromEntries(Object.entries(answers).map(([name, res]) => [name, res.statusCode]));
    expect(statuses).toEqual({
      healthz: 200,
      metrics: 200,
      openapi: 200,
      accepted: 202,
      invalid: 400,
      unauthorized: 401,
      notFound: 404,
      notJson: 415,
      upgradeRequired: 426,
      list: 200,
      docs: 200,
      page: 200,
    });
    for (const [name, res] of Object.entries(answers))
      expect(res.headers['x-content-type-options'], name).toBe('nosniff');
    // A watch stream (the route takes the response over) and a WebSocket refusal, over real HTTP.
    const watch = await head(h.base, `/v1/agents/${id}/metadata/watch`, agent);
    expect(watch.status).toBe(200);
    expect(watch.headers['content-type']).toBe('text/event-stream');
    expect(watch.headers['x-content-type-options']).toBe('nosniff');
    const refused = await head(h.base, `/v1/agents/${id}/metadata/stream`, {
      connection: 'Upgrade',
      upgrade: 'websocket',
      'sec-websocket-version': '13',
      'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
    });
    expect(refused.status).toBe(401);
    expect(refused.headers['x-content-type-options']).toBe('nosniff');
    // Headers over 16 KiB: answered by the HTTP parser's handler, before Fastify.
    const socket = net.connect(Number(new URL(h.base).port), '127.0.0.1');
    let raw = '';
    socket.on('data', (chunk: Buffer) => (raw += chunk.toString()));
    socket.on('error', () => undefined);
    const closed = new Promise((resolve) => socket.once('close', resolve));
    socket.write(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(17_000)}\r\n\r\n`);
    await closed;
    expect(raw).toMatch(/^HTTP\/1\.1 431 /);
    expect(raw).toMatch(/\r\nX-Content-Type-Options: nosniff\r\n/i);
  });
});

describe('/docs', () => {
  it('sets a CSP that no other site may frame it under, on the page and its files', async () => {
    const h = await appHarness();
    const page = await h.app.inject({ url: '/docs' });
    expect(page.statusCode).toBe(200);
    const csp = String(page.headers['content-security-policy']);
    expect(csp).toMatch(/(^|; )frame-ancestors 'none'(;|$)/);
    expect(csp).toMatch(/(^|; )default-src 'none'(;|$)/);
    expect(csp).toMatch(/(^|; )script-src 'self'(;|$)/);
    const script = await h.app.inject({ url: '/docs/static/swagger-ui-bundle.js' });
    expect(script.statusCode).toBe(200);
    expect(script.headers['x-content-type-options']).toBe('nosniff');
    expect(script.headers['content-security-policy']).toBe(csp);
  });

  it.skipIf(!HAVE_CHROMIUM)('renders every operation in Chromium with no CSP violation', async () => {
    const h = await appHarness();
    const operations = Object.values(
      (await h.app.inject({ url: '/openapi.json' })).json<{ paths: Record<string, object> }>().paths,
    ).reduce((count: number, methods) => count + Object.keys(methods).length, 0);
    const profile = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'metabatch-chromium-'));
    const context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, args: CHROMIUM_ARGS });
    try {
      context.setDefaultTimeout(15_000);
      const page = await context.newPage();
      const problems: string[] = [];
      page.on('console', (message) => {
        if (message.type() === 'error') problems.push(`console error: ${message.text()}`);
      });
      page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
      await page.addInitScript(() => {
        window.cspViolations = [];
        document.addEventListener('securitypolicyviolation', (event) =>
          window.cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`),
        );
      });
      const answer = await page.goto(`${h.base}/docs`);
      expect(answer?.headers()['content-security-policy']).toMatch(/frame-ancestors 'none'/);
      await page.waitForFunction(() =>
        document.querySelector('.swagger-ui .info .title')?.textContent?.includes('metabatch'),
      );
      await page.waitForFunction((count) => document.querySelectorAll('.opblock').length === count, operations);
      // Its stylesheet applied: Swagger UI's own layout, not the browser's defaults.
      expect(
        await page
          .locator('.swagger-ui .opblock')
          .first()
          .evaluate((el) => getComputedStyle(el).borderRadius),
      ).not.toBe('0px');
      expect([await page.evaluate(() => window.cspViolations), problems]).toEqual([[], []]);
    } finally {
      await context.close();
      await fs.promises.rm(profile, { recursive: true, force: true });
    }
  });
});
