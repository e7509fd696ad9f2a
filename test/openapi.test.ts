// The OpenAPI document, on the service as production wires it: a valid
// OpenAPI 3.1 document that covers every route the app registered (with a
// summary, a description, a tag, its security and its error answers), served
// with its UI without any token, ADMIN_TOKEN unset included.

import SwaggerParser from '@apidevtools/swagger-parser';
import { describe, expect, it } from 'vitest';
import { closedAfterEach, testDatabase } from './support/db.js';
import { startTestService, type ServiceHarness } from './support/service.js';

const db = testDatabase();
const appHarness = closedAfterEach((options: Parameters<typeof startTestService>[1] = {}) =>
  startTestService(db, options),
);

// What the tests read of the document.
interface Response {
  description?: string;
  headers?: Record<string, unknown>;
  content?: Record<string, { schema?: unknown }>;
}
interface Operation {
  summary?: string;
  description?: string;
  tags?: string[];
  security?: Record<string, string[]>[];
  parameters?: unknown[];
  responses?: Record<string, Response>;
}
interface Document {
  openapi: string;
  paths?: Record<string, Record<string, Operation> | undefined>;
  components?: {
    securitySchemes?: Record<string, unknown>;
    schemas?: Record<string, { required?: string[]; properties?: Record<string, unknown> }>;
  };
}

const TAGS = ['ingest', 'admin', 'read', 'operations'];
const ERROR_BODY = { $ref: '#/components/schemas/ErrorBody' };
// The two 4xx/5xx answers that are not errors of the request: their bodies say more than a message.
const NOT_ERROR_BODY = new Set([
  'POST /v1/agents/{agentId}/metadata 429', // {"accepted","dropped"}: some keys were queued
  'GET /readyz 503', // {"status","error"}
]);

async function document(h: ServiceHarness): Promise<Document> {
  const res = await h.app.inject({ url: '/openapi.json' });
  expect(res.statusCode).toBe(200);
  return res.json();
}

/**
 * Every route the app registered, read from Fastify's own route tree
 * (`printRoutes`), whose lines nest path segments four columns a level:
 * `│   └── /:agentId/metadata (POST, GET, HEAD)`.
 */
function registeredRoutes(tree: string): { method: string; url: string }[] {
  const routes: { method: string; url: string }[] = [];
  const segments: string[] = [];
  for (const line of tree.split('\n')) {
    const match = /^((?:│ {3}| {4})*)[├└]── (.+?)(?: \(([A-Z, ]+)\))?$/.exec(line);
    if (!match) continue;
    segments.length = match[1]!.length / 4;
    segments.push(match[2]!);
    for (const method of match[3]?.split(', ') ?? []) routes.push({ method, url: segments.join('') });
  }
  return routes;
}

/** `/v1/agents/:agentId/metadata` as OpenAPI writes it: `/v1/agents/{agentId}/metadata`. */
const openapiPath = (url: string) => url.replace(/:([A-Za-z0-9_]+)/g, '{$1}');

describe('the OpenAPI document', () => {
  it('is a valid OpenAPI 3.1 document', async () => {
    const h = await appHarness();
    const res = await h.app.inject({ url: '/openapi.json' });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toMatchObject({ openapi: '3.1.0' });
    // Against the OpenAPI 3.1 schema, then the rules a schema cannot say (path parameters declared, …).
    await expect(SwaggerParser.validate(res.json())).resolves.toBeDefined();
    // The validator does check: an answer without its required description is refused.
    const broken = res.json();
    delete broken.paths['/healthz'].get.responses['200'].description;
    await expect(SwaggerParser.validate(broken)).rejects.toThrow(/description/);
  });

  it('covers every route the app registered, and nothing else', async () => {
    const h = await appHarness();
    const doc = await document(h);
    // HEAD routes are Fastify's automatic twins of the GET routes; /docs/* is the UI's own.
    const routes = registeredRoutes(h.app.printRoutes({ commonPrefix: false })).filter(
      (route) => route.method !== 'HEAD' && route.url !== '/docs' && !route.url.startsWith('/docs/'),
    );
    expect(routes).toContainEqual({ method: 'POST', url: '/v1/agents/:agentId/metadata' });
    expect(routes).toContainEqual({ method: 'GET', url: '/v1/agents/:agentId/metadata/watch' });
    const documented = Object.entries(doc.paths ?? {}).flatMap(([url, item]) =>
      Object.keys(item ?? {})
        .filter((key) => ['get', 'put', 'post', 'delete', 'patch', 'options', 'head', 'trace'].includes(key))
        .map((method) => `${method.toUpperCase()} ${url}`),
    );
    expect(documented.sort()).toEqual(routes.map((route) => `${route.method} ${openapiPath(route.url)}`).sort());
  });

  it('gives each operation a summary, a description, one tag, its token and its error answers', async () => {
    const h = await appHarness();
    const doc = await document(h);
    const schemes = Object.keys(doc.components?.securitySchemes ?? {}).sort();
    expect(schemes).toEqual(['adminToken', 'agentToken']);
    for (const [url, item] of Object.entries(doc.paths ?? {})) {
      for (const [method, operation] of Object.entries(item ?? {})) {
        const where = `${method.toUpperCase()} ${url}`;
        expect(operation.summary, where).toBeTruthy();
        expect(operation.description, where).toBeTruthy();
        expect(operation.tags, where).toHaveLength(1);
        expect(TAGS, where).toContain(operation.tags![0]);
        for (const requirement of operation.security ?? []) {
          for (const scheme of Object.keys(requirement)) expect(schemes, where).toContain(scheme);
        }
        // /v1 routes take a token; the operational ones take none.
        expect((operation.security ?? []).length > 0, where).toBe(url.startsWith('/v1/'));
        const responses = operation.responses ?? {};
        // A success: 2xx, or 101 for the WebSocket upgrade.
        expect(
          Object.keys(responses).some((status) => status.startsWith('2') || status === '101'),
          where,
        ).toBe(true);
        expect(Object.keys(responses), where).toContain('431');
        for (const [status, response] of Object.entries(responses)) {
          expect(response.description, `${where} ${status}`).toBeTruthy();
          if (Number(status) < 400 || NOT_ERROR_BODY.has(`${where} ${status}`)) continue;
          expect(response.content?.['application/json']?.schema, `${where} ${status}`).toEqual(ERROR_BODY);
        }
        if (url.startsWith('/v1/')) {
          for (const status of ['401', '431', '503']) expect(Object.keys(responses), where).toContain(status);
        }
        if (url.includes('{agentId}')) {
          expect(operation.parameters, where).toContainEqual(
            expect.objectContaining({ in: 'path', name: 'agentId', required: true }),
          );
          expect(Object.keys(responses), where).toContain('400');
        }
      }
    }
  });

  it('says which token each route takes, and describes the watch stream’s events', async () => {
    const h = await appHarness();
    const doc = await document(h);
    const paths = doc.paths!;
    expect(paths['/v1/agents/{agentId}/metadata']?.post?.security).toEqual([{ agentToken: [] }]);
    expect(paths['/v1/agents']?.post?.security).toEqual([{ adminToken: [] }]);
    expect(paths['/v1/agents/{agentId}/metadata-definitions']?.put?.security).toEqual([{ adminToken: [] }]);
    expect(paths['/v1/agents/{agentId}/metadata']?.get?.security).toEqual([{ adminToken: [] }, { agentToken: [] }]);
    const ingest = paths['/v1/agents/{agentId}/metadata']!.post!.responses!;
    expect(Object.keys(ingest).sort()).toEqual(
      ['202', '400', '401', '403', '413', '415', '429', '431', '500', '503'].sort(),
    );
    expect(ingest['429']!.headers).toHaveProperty('retry-after');
    const watch = paths['/v1/agents/{agentId}/metadata/watch']!.get!;
    expect(Object.keys(watch.responses!['200']!.content!)).toEqual(['text/event-stream']);
    expect(watch.description).toContain('event: data');
    expect(watch.description).toContain(': ping');
    expect(watch.description).toContain('15 s');
    const item = doc.components!.schemas!.MetadataItem!;
    expect(item.required).toEqual(expect.arrayContaining(['collected_at', 'age', 'stale']));
    expect(item.required).not.toContain('pending');
    expect(item.properties?.collected_at).toMatchObject({ type: 'string', format: 'date-time' });
  });

  it('answers the list as its schema says', async () => {
    const h = await appHarness();
    const { id, token } = await h.agent(['cpu', 'mem']);
    await h.post(id, token, { metadata: [{ key: 'cpu', value: '12%' }] });
    await h.advance(5000);
    const res = await h.app.inject({ url: `/v1/agents/${id}/metadata`, headers: { authorization: `Bearer ${token}` } });
    expect(res.statusCode).toBe(200);
    const [cpu, mem] = res.json<Record<string, unknown>[]>();
    expect(Object.keys(cpu!).sort()).toEqual(
      [
        'key',
        'display_name',
        'display_order',
        'interval',
        'timeout',
        'value',
        'error',
        'collected_at',
        'age',
        'stale',
      ].sort(),
    );
    expect(mem).toMatchObject({ key: 'mem', pending: true, collected_at: '0001-01-01T00:00:00.000Z' });
  });
});

describe('/docs and /openapi.json', () => {
  it('answer without a token, with ADMIN_TOKEN unset, over HTTP', async () => {
    const h = await appHarness({ env: { ADMIN_TOKEN: null } });
    const docs = await fetch(`${h.base}/docs`);
    expect(docs.status).toBe(200);
    expect(docs.headers.get('content-type')).toMatch(/^text\/html/);
    const html = await docs.text();
    expect(html).toContain('swagger-ui');
    // The UI's own assets (served by @fastify/static).
    for (const asset of ['/docs/static/swagger-ui-bundle.js', '/docs/static/swagger-initializer.js']) {
      const res = await fetch(`${h.base}${asset}`);
      expect(res.status, asset).toBe(200);
      expect(res.headers.get('content-type'), asset).toMatch(/javascript/);
      await res.arrayBuffer();
    }
    // The document the UI loads (its own copy of /openapi.json).
    expect((await fetch(`${h.base}/docs/json`)).status).toBe(200);
    // Nothing outside the UI's assets is served from there.
    for (const traversal of ['/docs/static/..%2f..%2fpackage.json', '/docs/static/%2e%2e/%2e%2e/package.json']) {
      const res = await fetch(`${h.base}${traversal}`);
      expect(res.status, traversal).not.toBe(200);
      await res.arrayBuffer();
    }
    const doc = await fetch(`${h.base}/openapi.json`);
    expect(doc.status).toBe(200);
    expect(doc.headers.get('content-type')).toMatch(/^application\/json/);
    expect(await doc.json()).toMatchObject({ openapi: '3.1.0', info: { title: 'metabatch' } });
    // The admin API itself stays disabled.
    const admin = await fetch(`${h.base}/v1/agents`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: '{"name":"x"}',
    });
    expect(admin.status).toBe(403);
  });
});
