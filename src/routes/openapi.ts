// The API's OpenAPI 3.1 document, built by @fastify/swagger from the very
// route schemas that validate requests, served at GET /openapi.json, and an
// interactive UI (@fastify/swagger-ui) at /docs. Neither needs a token.
//
// Registered before the routes and in the root scope (not encapsulated), so
// that @fastify/swagger's onRoute hook sees every route the app registers.

import { readFileSync } from 'node:fs';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { FastifySchema } from 'fastify';
import { Type } from 'typebox';
import { COMPONENTS, errors, HEADERS_TOO_LARGE, json } from '../schemas.js';

const DOCS_PREFIX = '/docs';
const DOCUMENT_URL = '/openapi.json';
// The UI's scripts and styles are its own files (no inline script); it reads
// this service only ("Try it out" included), and no other site may frame it.
// Its React components set element styles from script, which style-src allows;
// the one inline <style> its bundle inserts (@fastify/swagger-ui 6.1.3) is
// allowed by its hash, which Chromium names in the violation it reports
// (test/headers.test.ts fails on any violation, so a new bundle's is noticed).
const SWAGGER_UI_INLINE_STYLE = "'sha256-RL3ie0nH+Lzz2YNqQN83mnU0J1ot4QL7b99vMdIX99w='";
const DOCS_CONTENT_SECURITY_POLICY =
  `default-src 'none'; script-src 'self'; style-src 'self' ${SWAGGER_UI_INLINE_STYLE}; img-src 'self' data:; ` +
  "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const { version } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
  version: string;
};

// A route refers to a component by using its schema object: in the document
// that object becomes a `$ref` to components/schemas (the route's own schema,
// which ajv and the serializer use, is left as it is).
const componentRefs = new Map<unknown, string>(
  Object.entries(COMPONENTS).map(([name, schema]) => [schema, `#/components/schemas/${name}`]),
);

function withComponentRefs(value: unknown): unknown {
  if (typeof value !== 'object' || value === null) return value;
  const ref = componentRefs.get(value);
  if (ref !== undefined) return { $ref: ref };
  if (Array.isArray(value)) return value.map(withComponentRefs);
  return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, withComponentRefs(item)]));
}

// Parameters are listed one by one in the document, never by reference: only bodies and answers refer.
function documentSchema(schema: FastifySchema): FastifySchema {
  return { ...schema, body: withComponentRefs(schema.body), response: withComponentRefs(schema.response) };
}

const description = `metabatch takes metadata reports from many agents (key/value pairs such as \`cpu=12%\`),
coalesces them in memory, writes them to Postgres with one array UPDATE per batch, and announces the
changed agents on a Postgres NOTIFY channel.

Every request and answer body is JSON, except the watch stream (\`text/event-stream\`) and \`/metrics\`
(Prometheus text). Every error is \`{"error": "<message>"}\` with a 4xx or 5xx status.

Two bearer tokens: an **agent token** (\`mbt_…\`, created with the agent, shown once) reports that
agent's metadata and reads it; the **admin token** (\`ADMIN_TOKEN\`) creates agents, declares their keys
and reads any agent. With \`ADMIN_TOKEN\` unset, every admin route answers 403.

Fixed limits: bodies up to 1 MiB (413), headers up to 16 KiB (431), headers within 10 s and a whole
request within 30 s.`;

export const openapiRoutes: FastifyPluginAsyncTypebox = async (app) => {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: { title: 'metabatch', version, description },
      tags: [
        { name: 'ingest', description: 'Agents report their metadata (agent token).' },
        { name: 'admin', description: 'Agents and their declared keys (admin token).' },
        { name: 'read', description: 'Agents’ metadata, now or live (admin token, or the agent’s own token).' },
        { name: 'operations', description: 'Health, readiness, metrics and this document (no token).' },
      ],
      components: {
        securitySchemes: {
          agentToken: {
            type: 'http',
            scheme: 'bearer',
            description:
              'An agent’s token (`mbt_…`), shown once when the agent is created. It reports and reads that agent only: ' +
              'another agent’s id is a 403.',
          },
          adminToken: {
            type: 'http',
            scheme: 'bearer',
            description:
              'The `ADMIN_TOKEN` the service was started with (at least 16 characters). ' +
              'Unset: every admin route answers 403 `admin API disabled: set ADMIN_TOKEN`.',
          },
        },
        // @fastify/swagger converts these as it converts route schemas.
        schemas: COMPONENTS as Record<string, object>,
      },
    },
    // Routes without a schema (the UI's own) are left as they are.
    transform: ({ schema, url }) => ({ schema: schema ? documentSchema(schema) : schema, url }),
  });

  await app.register(swaggerUi, {
    routePrefix: DOCS_PREFIX,
    staticCSP: DOCS_CONTENT_SECURITY_POLICY,
    // No badge from validator.swagger.io: the page loads nothing from elsewhere.
    uiConfig: { validatorUrl: null },
  });

  app.get(
    DOCUMENT_URL,
    {
      schema: {
        tags: ['operations'],
        summary: 'This API’s OpenAPI 3.1 document',
        description: `The document the UI at ${DOCS_PREFIX} shows, generated from the schemas that validate requests. No token.`,
        response: {
          200: json('The OpenAPI 3.1 document.', Type.Object({}, { additionalProperties: true })),
          ...errors({ 431: HEADERS_TOO_LARGE }),
        },
      },
    },
    async () => app.swagger(),
  );
};

// What fastify-plugin does: no scope of its own (see the top of this file).
Object.assign(openapiRoutes, { [Symbol.for('skip-override')]: true });
