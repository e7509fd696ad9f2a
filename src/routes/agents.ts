// Admin API: create agents (the token is shown once) and declare the keys
// each reports. Reports for undeclared keys are counted and ignored.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { AgentStore } from '../agentStore.js';
import type { AgentAuthenticator } from '../auth.js';
import type { Authenticate } from '../access.js';
import { HttpError } from '../errors.js';
import { MAX_KEY_CHARS } from '../report.js';
import {
  AgentIdParams,
  BAD_BODY,
  CreatedAgent,
  errors,
  HEADERS_TOO_LARGE,
  INTERNAL,
  json,
  MetadataDefinition as StoredDefinition,
  NOT_JSON,
  SECURITY,
  SHUTTING_DOWN,
  TOO_LARGE,
} from '../schemas.js';
import type { MetadataDefinition, MetadataStore } from '../store.js';

const CreateAgentBody = Type.Object(
  {
    name: Type.String({
      minLength: 1,
      maxLength: 127,
      pattern: '\\S',
      description: 'A label for people, 1–127 characters, not only whitespace (trimmed). Need not be unique.',
    }),
  },
  { additionalProperties: false },
);

// The original's column limits (varchar(127), varchar(65535), bigint).
const DefinitionsBody = Type.Object(
  {
    definitions: Type.Array(
      Type.Object(
        {
          key: Type.String({ minLength: 1, maxLength: MAX_KEY_CHARS, description: 'Declared once per list.' }),
          display_name: Type.Optional(Type.String({ maxLength: 127, description: 'Default: the key.' })),
          script: Type.Optional(Type.String({ maxLength: 65535, description: 'What the agent runs. Default "".' })),
          interval: Type.Optional(
            Type.Integer({ minimum: 0, maximum: 2147483647, description: 'Seconds between reports. Default 0.' }),
          ),
          timeout: Type.Optional(
            Type.Integer({ minimum: 0, maximum: 2147483647, description: 'Seconds for the script. Default 0.' }),
          ),
          display_order: Type.Optional(
            Type.Integer({ minimum: -2147483648, maximum: 2147483647, description: 'Default 0.' }),
          ),
        },
        { additionalProperties: false },
      ),
      { maxItems: 1000, description: 'The whole list of keys the agent reports: keys left out are deleted.' },
    ),
  },
  { additionalProperties: false },
);

const StoredDefinitions = Type.Object({ definitions: Type.Array(StoredDefinition) });

export const agentRoutes: FastifyPluginAsyncTypebox<{
  store: MetadataStore;
  agents: AgentStore;
  auth: AgentAuthenticator;
  authenticate: Authenticate;
}> = async (app, { store, agents, auth, authenticate }) => {
  app.post(
    '/v1/agents',
    {
      onRequest: authenticate,
      schema: {
        tags: ['admin'],
        summary: 'Create an agent',
        description:
          'Creates an agent and its token. The token is in this answer only: the service keeps its SHA-256. ' +
          'Declare the keys the agent reports with PUT /v1/agents/{agentId}/metadata-definitions.',
        security: SECURITY.admin,
        body: CreateAgentBody,
        response: {
          201: json('The agent, with its token (shown this once).', CreatedAgent),
          ...errors({
            400: BAD_BODY + ' An unknown property is refused too.',
            401: 'No admin token, or a wrong one.',
            403: 'The admin API is disabled: `admin API disabled: set ADMIN_TOKEN`.',
            413: TOO_LARGE,
            415: NOT_JSON,
            431: HEADERS_TOO_LARGE,
            500: INTERNAL,
            503: SHUTTING_DOWN,
          }),
        },
      },
    },
    async (request, reply) => {
      const agent = await agents.create(request.body.name.trim());
      auth.remember(agent.token, agent.id);
      return reply.code(201).send({ id: agent.id, name: agent.name, token: agent.token });
    },
  );

  app.put(
    '/v1/agents/:agentId/metadata-definitions',
    {
      onRequest: authenticate,
      schema: {
        tags: ['admin'],
        summary: 'Declare the keys an agent reports',
        description:
          'Replaces the list of keys the agent reports (only `key` is required): new keys get rows, keys ' +
          'already declared keep their values, keys left out are deleted with their values. Reports of keys ' +
          'never declared are counted and ignored. Answers the stored list.',
        security: SECURITY.admin,
        params: AgentIdParams,
        body: DefinitionsBody,
        response: {
          200: json('The stored list, sorted by display_order then key.', StoredDefinitions),
          ...errors({
            400: BAD_BODY + ' Also: a key declared twice, a NUL character in a key, an unknown property.',
            401: 'No admin token, or a wrong one.',
            403: 'The admin API is disabled: `admin API disabled: set ADMIN_TOKEN`.',
            404: 'No agent has this id.',
            413: TOO_LARGE,
            415: NOT_JSON,
            431: HEADERS_TOO_LARGE,
            500: INTERNAL,
            503: SHUTTING_DOWN,
          }),
        },
      },
    },
    async (request) => {
      const seen = new Set<string>();
      const definitions = request.body.definitions.map((d): MetadataDefinition => {
        if (d.key.includes('\0')) throw new HttpError(400, 'definition keys must not contain NUL characters');
        if (seen.has(d.key)) throw new HttpError(400, `key ${JSON.stringify(d.key)} is declared twice`);
        seen.add(d.key);
        return {
          key: d.key,
          display_name: d.display_name ?? d.key,
          script: d.script ?? '',
          interval: d.interval ?? 0,
          timeout: d.timeout ?? 0,
          display_order: d.display_order ?? 0,
        };
      });
      const agentId = request.params.agentId.toLowerCase();
      const rows = await store.putDefinitions(agentId, definitions);
      if (rows === undefined) throw new HttpError(404, `agent ${agentId} not found`);
      return {
        definitions: rows.map(({ key, display_name, script, interval, timeout, display_order }) => ({
          key,
          display_name,
          script,
          interval,
          timeout,
          display_order,
        })),
      };
    },
  );
};
