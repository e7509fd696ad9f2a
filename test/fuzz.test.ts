// No input gets a 5xx: a seeded fast-check run over every operation of the
// OpenAPI document the service serves (its path parameters, query and JSON
// body, generated from the document's own schemas with NUL, lone
// surrogates, invalid UTF-8 and impossible dates among them), with the admin
// token, an agent token, another agent's token and none, over real HTTP to
// the service as production wires it. Every error answer is
// `{"error": "<message>"}` too.

import http from 'node:http';
import fc from 'fast-check';
import { expect, it } from 'vitest';
import { closedAfterEach, testDatabase } from './support/db.js';
import { requestsOf, type Known, type Operation, type Schema } from './support/openapiArbitraries.js';
import { ADMIN_TOKEN, startTestService } from './support/service.js';

const db = testDatabase();
// Failed authentications are not throttled here: every generated request must reach the checks it is aimed at.
const appHarness = closedAfterEach(() => startTestService(db, { env: { AUTH_FAILURE_BURST: '10000000' } }));

// Enough runs per operation that each hostile generator comes up in each
// place (about 3 s in all here), few enough for `npm test`.
const RUNS_PER_OPERATION = 400;
const SEED = 15;
// Operations that end an agent: they get agents of their own, so that the others keep a valid token.
const DESTRUCTIVE = new Set(['DELETE /v1/agents/{agentId}', 'POST /v1/agents/{agentId}/token']);

interface Answer {
  status: number;
  contentType: string;
  body: string;
}

/** One request over HTTP; an event stream's 200 is answered as soon as its headers arrive (then closed). */
function send(base: string, method: string, path: string, headers: Record<string, string>, body?: Buffer) {
  return new Promise<Answer>((resolve, reject) => {
    const request = http.request(`${base}${path}`, { method, headers, agent: false }, (response) => {
      const contentType = String(response.headers['content-type'] ?? '');
      if (contentType.startsWith('text/event-stream')) {
        response.destroy();
        resolve({ status: response.statusCode!, contentType, body: '' });
        return;
      }
      const chunks: Buffer[] = [];
      response.on('data', (chunk: Buffer) => chunks.push(chunk));
      response.on('end', () =>
        resolve({ status: response.statusCode!, contentType, body: Buffer.concat(chunks).toString() }),
      );
      response.on('error', reject);
    });
    request.on('error', reject);
    request.end(body);
  });
}

it('answers no generated request with a 5xx, and every error as {"error": message}', async () => {
  const h = await appHarness();
  const document = (await h.app.inject({ url: '/openapi.json' })).json<{
    paths: Record<string, Record<string, Operation>>;
    components: { schemas: Record<string, Schema> };
  }>();
  const agent = await h.agent(['cpu', 'mem', 'disk', 'load']);
  const other = await h.agent(['cpu']);
  await h.post(agent.id, agent.token, { metadata: [{ key: 'cpu', value: '12%' }] });
  await h.advance(5000);
  const victims = await Promise.all(Array.from({ length: 4 }, () => h.agent(['cpu'])));
  const tokens: Record<string, string | undefined> = {
    admin: ADMIN_TOKEN,
    agent: agent.token,
    other: other.token,
    none: undefined,
    junk: 'mbt_\0\ud800',
  };
  // Mostly callers that get past authentication: the checks after it are where a 500 hides.
  const caller = fc.oneof(
    { weight: 3, arbitrary: fc.constant('admin') },
    { weight: 3, arbitrary: fc.constant('agent') },
    { weight: 1, arbitrary: fc.constantFrom('other', 'none', 'junk') },
  );
  const failures: string[] = [];
  let requests = 0;
  for (const [template, operations] of Object.entries(document.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const name = `${method.toUpperCase()} ${template}`;
      // The agents a caller names: mostly its own (another's is a 403 before anything else is checked).
      const known = (who: string): Known => ({
        agentIds: DESTRUCTIVE.has(name)
          ? victims.map((v) => v.id)
          : who === 'agent'
            ? [agent.id, agent.id, agent.id, other.id]
            : [agent.id, other.id],
        keys: ['cpu', 'mem', 'disk', 'load', 'web-1'],
        components: document.components.schemas,
      });
      await fc.assert(
        fc.asyncProperty(
          caller.chain((who) => fc.tuple(fc.constant(who), requestsOf(operation, known(who)))),
          async ([who, generated]) => {
            const path =
              template.replace(/\{(\w+)\}/g, (_, parameter: string) => generated.path[parameter] ?? '') +
              (generated.query ? `?${generated.query}` : '');
            const headers: Record<string, string> = {};
            const token = tokens[who];
            // A header value cannot hold NUL: that token is sent as its UTF-8 bytes' latin1 reading.
            if (token !== undefined)
              headers.authorization = `Bearer ${Buffer.from(token.replace('\0', '')).toString('latin1')}`;
            if (generated.contentType !== undefined) headers['content-type'] = generated.contentType;
            const answer = await send(h.base, method.toUpperCase(), path, headers, generated.body);
            requests++;
            const where = `${name} as ${who}: ${method.toUpperCase()} ${path} ${generated.body?.toString('latin1').slice(0, 300) ?? ''}`;
            if (answer.status >= 500) failures.push(`${answer.status} ${answer.body} ← ${where}`);
            else if (answer.status >= 400) {
              let error: unknown;
              try {
                error = (JSON.parse(answer.body) as { error?: unknown }).error;
              } catch {
                error = undefined;
              }
              if (typeof error !== 'string' || error === '')
                failures.push(`${answer.status} without {"error"} ← ${where}`);
            }
          },
        ),
        { seed: SEED, numRuns: RUNS_PER_OPERATION },
      );
    }
  }
  expect(requests).toBeGreaterThan(RUNS_PER_OPERATION * 15);
  expect(failures).toEqual([]);
  expect(await h.metric('metabatch_auth_throttled_total')).toBe(0);
  // And what was queued flushes: nothing that passed the checks fails the batch UPDATE.
  await h.advance(5000);
  expect(await h.metric('metabatch_metadata_flush_errors_total')).toBe(0);
});
