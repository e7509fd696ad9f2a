// The live page at /, in a real browser (Debian's Chromium driven by
// playwright-core) against the real service process, as production runs
// it: sign in with the admin token (never in a URL), values change after a
// report, values go stale on time, counts and the name filter, agents that
// join later; and without ADMIN_TOKEN, a page that says the admin API is
// disabled. Skipped, with how to install it, where /usr/bin/chromium is
// missing.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { testDatabase } from './support/db.js';
import { CLI, ROOT, freePort, run, type Spawned } from './support/process.js';
import { CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM, INSTALL_CHROMIUM } from './support/chromium.js';

// The browser globals that functions run in the page use (this project's types are Node's, not the DOM's).
interface PageElement {
  textContent: string | null;
  classList: { contains(name: string): boolean };
}
declare const document: { querySelector(selector: string): PageElement | null };
declare const sessionStorage: { length: number };
declare const localStorage: { length: number };
declare const window: unknown;

if (!HAVE_CHROMIUM) console.warn(`test/ui.test.ts skipped: ${INSTALL_CHROMIUM}`);

const ADMIN = 'ui-test-admin-token-0123456789';
const SCREENSHOT = path.join(ROOT, 'test-results', 'ui.png');

interface Service {
  base: string;
  process: Spawned;
  dataDir: string;
}

async function startService(databaseUrl: string, env: Record<string, string | undefined>): Promise<Service> {
  const port = await freePort();
  const dataDir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'metabatch-ui-'));
  const service = run('node', [CLI, 'serve'], {
    DATABASE_URL: databaseUrl,
    DATA_DIR: dataDir,
    PORT: String(port),
    FLUSH_INTERVAL_MS: '200',
    ...env,
  });
  await service.waitFor(/metabatch listening on/, 60_000);
  return { base: `http://127.0.0.1:${port}`, process: service, dataDir };
}

async function stopService(service: Service | undefined): Promise<void> {
  if (!service) return;
  if (service.process.child.exitCode === null && service.process.child.signalCode === null) {
    service.process.child.kill('SIGTERM');
    await service.process.exited;
  }
  await fs.promises.rm(service.dataDir, { recursive: true, force: true });
}

describe.skipIf(!HAVE_CHROMIUM)(
  HAVE_CHROMIUM ? 'the live page at /' : `the live page at / (skipped: ${INSTALL_CHROMIUM})`,
  () => {
    const db = testDatabase();
    let service: Service | undefined;
    let profile: string | undefined;
    let context: BrowserContext | undefined;

    beforeAll(async () => {
      service = await startService(db.url, { ADMIN_TOKEN: ADMIN });
      // A fresh profile of our own (Playwright passes it as --user-data-dir), removed afterwards.
      profile = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'metabatch-chromium-'));
      context = await chromium.launchPersistentContext(profile, {
        executablePath: CHROMIUM,
        args: CHROMIUM_ARGS,
        viewport: { width: 1280, height: 720 },
      });
      context.setDefaultTimeout(15_000);
    });
    afterAll(async () => {
      await context?.close();
      if (profile) await fs.promises.rm(profile, { recursive: true, force: true });
      await stopService(service);
    });

    async function call(method: string, url: string, token: string, body?: unknown) {
      const res = await fetch(`${service!.base}${url}`, {
        method,
        headers: {
          authorization: `Bearer ${token}`,
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await res.text();
      return { status: res.status, body: text ? JSON.parse(text) : undefined };
    }

    async function createAgent(name: string, definitions: object[]): Promise<{ id: string; token: string }> {
      const created = await call('POST', '/v1/agents', ADMIN, { name });
      expect(created.status).toBe(201);
      const declared = await call('PUT', `/v1/agents/${created.body.id}/metadata-definitions`, ADMIN, { definitions });
      expect(declared.status).toBe(200);
      return { id: created.body.id, token: created.body.token };
    }

    async function report(agent: { id: string; token: string }, metadata: object[]): Promise<void> {
      const res = await call('POST', `/v1/agents/${agent.id}/metadata`, agent.token, { metadata });
      expect(res.status).toBe(202);
    }

    /** Waits (polling in the page) until the element's text is `text`. */
    async function textIs(page: Page, selector: string, text: string, timeout = 10_000): Promise<void> {
      await page.waitForFunction(
        ([sel, want]) => document.querySelector(sel)?.textContent === want,
        [selector, text] as const,
        { timeout },
      );
    }

    const item = (agentId: string, key: string) => `.agent[data-id="${agentId}"] .item[data-key="${key}"]`;

    it('signs in without a token in any URL, shows values live, greys stale ones on time, counts and filters', async () => {
      const web = await createAgent('web-1', [
        { key: 'cpu', display_name: 'CPU', display_order: 0 },
        { key: 'disk', display_order: 1 },
        { key: 'never', display_order: 2 },
      ]);
      const beat = await createAgent('db-1', [{ key: 'beat', interval: 1, timeout: 0 }]);
      const idle = await createAgent('idle-1', [{ key: 'x' }]);
      await report(web, [
        { key: 'cpu', value: '12%' },
        { key: 'disk', value: '', error: 'df: permission denied' },
      ]);

      const page = await context!.newPage();
      const urls: string[] = [];
      const problems: string[] = [];
      page.on('request', (request) => urls.push(request.url()));
      page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
      page.on('console', (message) => {
        // Chromium logs each 4xx answer (the wrong token's 401s) as a console error: expected here.
        if (message.type() === 'error' && !message.text().startsWith('Failed to load resource'))
          problems.push(`console error: ${message.text()}`);
      });

      await page.goto(`${service!.base}/`);
      // A wrong token first: told so, and asked again.
      await page.locator('#token').fill('not-the-admin-token-at-all');
      await page.locator('#sign-in button[type=submit]').click();
      await page
        .locator('#sign-in-error')
        .filter({ hasText: /wrong token/i })
        .waitFor();
      expect(await page.locator('#sign-in').isVisible()).toBe(true);
      expect(await page.evaluate(() => sessionStorage.length)).toBe(0);

      await page.locator('#token').fill(ADMIN);
      await page.locator('#sign-in button[type=submit]').click();
      await textIs(page, `${item(web.id, 'cpu')} .v`, '12%');
      await page.locator('#status').filter({ hasText: 'live' }).waitFor();
      expect(await page.textContent(`.agent[data-id="${web.id}"] .name`)).toBe('web-1');
      expect(await page.textContent(`${item(web.id, 'cpu')} .k`)).toBe('CPU');
      // An item's error is shown; a key never reported is pending.
      expect(await page.textContent(`${item(web.id, 'disk')} .err`)).toBe('df: permission denied');
      expect(await page.getAttribute(item(web.id, 'never'), 'class')).toContain('pending');
      expect(await page.textContent(`${item(web.id, 'never')} .v`)).toBe('pending');
      expect(await page.getAttribute(item(idle.id, 'x'), 'class')).toContain('pending');

      // A report changes the value on the page.
      await report(web, [{ key: 'cpu', value: '47%' }]);
      await textIs(page, `${item(web.id, 'cpu')} .v`, '47%');

      // A key with interval 1 s and timeout 0 s is stale once older than 5 s. Its age ticks on the
      // page every second (the stream resends only every 5 s), and it greys out with a tooltip saying why.
      await report(beat, [{ key: 'beat', value: 'ok' }]);
      await textIs(page, `${item(beat.id, 'beat')} .v`, 'ok');
      const reportedAt = Date.now();
      expect(await page.getAttribute(item(beat.id, 'beat'), 'class')).not.toContain('stale');
      await textIs(page, `${item(beat.id, 'beat')} .age`, '3s');
      await textIs(page, `${item(beat.id, 'beat')} .age`, '4s');
      // Real time must pass here: 5 s and a bit after the report.
      await page.waitForFunction(
        (sel) => document.querySelector(sel)?.classList.contains('stale'),
        item(beat.id, 'beat'),
        {
          timeout: 15_000,
        },
      );
      // Greyed by the page's own clock: the stream's next word on it (a resend every 5 s) says stale
      // only 10 s after the report.
      expect(Date.now() - reportedAt).toBeGreaterThan(4000);
      expect(Date.now() - reportedAt).toBeLessThan(9500);
      const title = await page.getAttribute(item(beat.id, 'beat'), 'title');
      expect(title).toMatch(/stale: age \d+ s/);
      expect(title).toContain('interval 1 s, timeout 0 s');
      expect(await page.getAttribute(`.agent[data-id="${beat.id}"]`, 'data-status')).toBe('stale');

      // Counts: web-1 reporting (no interval: never stale), db-1 stale, idle-1 never reported.
      await textIs(page, '#count-reporting', '1');
      await textIs(page, '#count-stale', '1');
      await textIs(page, '#count-never', '1');
      expect(await page.textContent('#count-shown')).toBe('3 agents');

      // The name filter.
      await page.locator('#filter').fill('WEB');
      await textIs(page, '#count-shown', 'showing 1 of 3');
      expect(await page.locator(`.agent[data-id="${web.id}"]`).isVisible()).toBe(true);
      expect(await page.locator(`.agent[data-id="${beat.id}"]`).isVisible()).toBe(false);
      expect(await page.locator(`.agent[data-id="${idle.id}"]`).isVisible()).toBe(false);
      await page.locator('#filter').fill('');
      await textIs(page, '#count-shown', '3 agents');

      // An agent created now joins the page, with its name, once it reports.
      const late = await createAgent('late-1', [{ key: 'up' }]);
      await report(late, [{ key: 'up', value: 'yes' }]);
      await textIs(page, `${item(late.id, 'up')} .v`, 'yes', 15_000);
      await textIs(page, `.agent[data-id="${late.id}"] .name`, 'late-1');
      await textIs(page, '#count-shown', '4 agents');

      // A deleted agent leaves the page.
      expect((await call('DELETE', `/v1/agents/${late.id}`, ADMIN)).status).toBe(204);
      await page.locator(`.agent[data-id="${late.id}"]`).waitFor({ state: 'detached' });
      await textIs(page, '#count-shown', '3 agents');

      await fs.promises.mkdir(path.dirname(SCREENSHOT), { recursive: true });
      await page.screenshot({ path: SCREENSHOT, fullPage: true });

      // A reload keeps the session (sessionStorage), asking for no token.
      await page.reload();
      await textIs(page, `${item(web.id, 'cpu')} .v`, '47%');
      expect(await page.locator('#sign-in').isVisible()).toBe(false);

      // The token was sent in headers only: in no URL the page requested, nor in its address.
      expect(urls.length).toBeGreaterThan(0);
      for (const url of [...urls, page.url()]) {
        expect(url).not.toContain(ADMIN);
        expect(url).not.toContain(encodeURIComponent(ADMIN));
      }
      expect(urls).toContainEqual(`${service!.base}/v1/agents/metadata/watch`);
      expect(await page.evaluate(() => localStorage.length)).toBe(0);

      // Signing out forgets the token.
      await page.locator('#sign-out').click();
      await page.locator('#sign-in').waitFor();
      expect(await page.evaluate(() => sessionStorage.length)).toBe(0);

      expect(problems).toEqual([]);
      await page.close();
    }, 90_000);

    it('parses event streams split anywhere, in the browser', async () => {
      const page = await context!.newPage();
      await page.goto(`${service!.base}/`);
      // A string, not a function: vitest rewrites import() in this file's functions.
      await page.evaluate("import('/ui/sse.js').then((module) => { window.SseParser = module.SseParser; })");
      const results = await page.evaluate(() => {
        type Parser = new (onEvent: (event: { event: string; data: string }) => void) => { push(text: string): void };
        const { SseParser } = window as { SseParser: Parser };
        const stream =
          ': ping\n\nevent: data\r\ndata: {"a":1}\r\n\r\ndata:x\rdata: y\r\revent: deleted\ndata: z\n\nevent: none\n\n';
        const runs: string[] = [];
        for (let cut = 0; cut <= stream.length; cut++) {
          const events: string[] = [];
          const parser = new SseParser((event) => events.push(`${event.event}=${event.data}`));
          parser.push(stream.slice(0, cut));
          parser.push(stream.slice(cut));
          runs.push(events.join('|'));
        }
        return [...new Set(runs)];
      });
      expect(results).toEqual(['data={"a":1}|message=x\ny|deleted=z']);
      await page.close();
    });

    it('says the admin API is disabled when ADMIN_TOKEN is unset', async () => {
      const disabled = await startService(db.url, { ADMIN_TOKEN: undefined });
      try {
        const page = await context!.newPage();
        const res = await page.goto(`${disabled.base}/`);
        expect(res?.status()).toBe(200);
        expect(res?.headers()['cache-control']).toBe('no-cache');
        await page.locator('#disabled').filter({ hasText: 'The admin API is disabled' }).waitFor();
        expect(await page.locator('#sign-in').isVisible()).toBe(false);
        await page.close();
      } finally {
        await stopService(disabled);
      }
    });
  },
);
