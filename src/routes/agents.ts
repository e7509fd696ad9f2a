// Admin API: create agents (the token is shown once) and declare the keys
// each reports. Reports for undeclared keys are counted and ignored.

import type { FastifyPluginAsync } from 'fastify';
import type { AgentStore } from '../agentStore.js';
import type { AgentAuthenticator } from '../auth.js';
import type { Authenticate } from '../access.js';
import { HttpError } from '../errors.js';
import { MAX_KEY_CHARS } from '../report.js';
import type { MetadataDefinition, MetadataStore } from '../store.js';

const createSchema = {
  type: 'object',
  required: ['name'],
  additionalProperties: false,
  properties: { name: { type: 'string', minLength: 1, maxLength: 127, pattern: '\\S' } },
} as const;

// The original's column limits (varchar(127), varchar(65535), bigint).
const definitionsSchema = {
  type: 'object',
  required: ['definitions'],
  additionalProperties: false,
  properties: {
    definitions: {
      type: 'array',
      maxItems: 1000,
      items: {
        type: 'object',
        required: ['key'],
        additionalProperties: false,
        properties: {
          key: { type: 'string', minLength: 1, maxLength: MAX_KEY_CHARS },
          display_name: { type: 'string', maxLength: 127 },
          script: { type: 'string', maxLength: 65535 },
          interval: { type: 'integer', minimum: 0, maximum: 2147483647 },
          timeout: { type: 'integer', minimum: 0, maximum: 2147483647 },
          display_order: { type: 'integer', minimum: -2147483648, maximum: 2147483647 },
        },
      },
    },
  },
} as const;

type DefinitionInput = Partial<MetadataDefinition> & { key: string };

export const agentRoutes: FastifyPluginAsync<{
  store: MetadataStore;
  agents: AgentStore;
  auth: AgentAuthenticator;
  authenticate: Authenticate;
}> = async (app, { store, agents, auth, authenticate }) => {
  app.post<{ Body: { name: string } }>(
    '/v1/agents',
    { onRequest: authenticate, schema: { body: createSchema } },
    async (request, reply) => {
      const agent = await agents.create(request.body.name.trim());
      auth.remember(agent.token, agent.id);
      return reply.code(201).send({ id: agent.id, name: agent.name, token: agent.token });
    },
  );

  app.put<{ Params: { agentId: string }; Body: { definitions: DefinitionInput[] } }>(
    '/v1/agents/:agentId/metadata-definitions',
    { onRequest: authenticate, schema: { body: definitionsSchema } },
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
