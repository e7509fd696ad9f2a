// The HTTP API's shared schemas (TypeBox): Fastify's ajv validates requests
// with them, fast-json-stringify serializes answers with them, the type
// provider types handlers from them, and @fastify/swagger builds the OpenAPI
// document from them. Each schema named in COMPONENTS appears in the
// document once, under components/schemas, and routes refer to it there.
//
// A route declares its answers with `json()` (and `errors()` for the error
// statuses), so that each status has its own description while the schema
// object stays the shared one.

import { Type, type Static, type TSchema } from 'typebox';
import { MAX_ALL_KEYS_BYTES, MAX_ERROR_BYTES, MAX_KEY_CHARS, MAX_VALUE_BYTES } from './report.js';

/** Every error: `{"error": "<message>"}`. */
export const ErrorBody = Type.Object(
  { error: Type.String({ description: 'What went wrong, in a sentence for a human.' }) },
  { description: 'Every error answer of the API: one message.' },
);
export type ErrorBody = Static<typeof ErrorBody>;

/** The `{agentId}` path parameter. */
export const AgentIdParams = Type.Object({
  agentId: Type.String({
    format: 'uuid',
    description: 'The agent’s id, a UUID (any case). Anything else is a 400 before the token is checked.',
  }),
});

/** How many keys of a report were queued and how many were refused. */
export const Counts = Type.Object(
  {
    accepted: Type.Integer({ minimum: 0, description: 'Keys queued: they reach the table at the next flush.' }),
    dropped: Type.Integer({ minimum: 0, description: 'Keys refused: send them again after Retry-After.' }),
  },
  { description: 'The keys of one report, queued or refused.' },
);

/**
 * The keys of one report, as agents send them: the `metadata` of a POST body
 * and of a stream message (docs/original.md, "The input rules"; the finer
 * checks are normalizeReport's). A property of an item it does not know is
 * refused, as elsewhere: a misspelt `vlaue` must not store "".
 */
export const ReportMetadata = Type.Array(
  Type.Object(
    {
      key: Type.String({ minLength: 1, maxLength: MAX_KEY_CHARS, description: 'A declared key.' }),
      value: Type.Optional(
        Type.String({
          description: `Default "". Trimmed; over ${MAX_VALUE_BYTES} bytes it is cut and \`error\` says so.`,
        }),
      ),
      error: Type.Optional(
        Type.String({ description: `Default "". Trimmed; over ${MAX_ERROR_BYTES} bytes it is replaced.` }),
      ),
      collected_at: Type.Optional(
        Type.String({
          description:
            'RFC 3339 (2026-11-23T00:00:00Z). Default: server time; a time in the future becomes server time.',
        }),
      ),
    },
    { additionalProperties: false },
  ),
  {
    // Each key is at least one byte, so more items than this always exceed the key limit.
    maxItems: MAX_ALL_KEYS_BYTES,
    description: `The keys reported; all keys together at most ${MAX_ALL_KEYS_BYTES} bytes.`,
  },
);

/**
 * One message of an ingest stream: a report and its sequence number, which
 * its answer repeats. A property it does not know is refused.
 */
export const StreamReport = Type.Object(
  {
    seq: Type.Integer({
      minimum: 0,
      maximum: Number.MAX_SAFE_INTEGER,
      description: 'The client’s number for this report, repeated in its answer.',
    }),
    metadata: ReportMetadata,
  },
  { additionalProperties: false },
);
export type StreamReport = Static<typeof StreamReport>;

/** One metadata key of an agent as clients see it (the GET list, and each item of a watch `data` event). */
export const MetadataItem = Type.Object(
  {
    key: Type.String({ description: 'The key, as declared.' }),
    display_name: Type.String({ description: 'Its label (the key unless declared otherwise).' }),
    display_order: Type.Integer({ description: 'Lists are sorted by display_order, then key.' }),
    interval: Type.Integer({ minimum: 0, description: 'Seconds between the agent’s reports of it; 0: not periodic.' }),
    timeout: Type.Integer({ minimum: 0, description: 'Seconds the agent allows its script.' }),
    value: Type.String({ description: `The newest value, trimmed, at most ${MAX_VALUE_BYTES} bytes.` }),
    error: Type.String({ description: 'The newest error ("" if none), or why the value was cut.' }),
    collected_at: Type.String({
      format: 'date-time',
      description: 'When the agent collected the value; 0001-01-01T00:00:00.000Z while never reported.',
    }),
    age: Type.Integer({ minimum: 0, description: 'Whole seconds since collected_at, at the time of the answer.' }),
    stale: Type.Boolean({
      description: 'Older than its interval allows: interval > 0 and age > max(interval + 2 × timeout, 5).',
    }),
    pending: Type.Optional(
      Type.Literal(true, { description: 'Present (true) only while the key was never reported.' }),
    ),
    script: Type.Optional(
      Type.String({ description: 'What the agent runs for it: only in the bulk read, with include_script=true.' }),
    ),
  },
  { description: 'One metadata key of an agent, as clients see it.' },
);
export type MetadataItem = Static<typeof MetadataItem>;

/** An agent's metadata list, sorted by display_order then key. */
export const MetadataList = Type.Array(MetadataItem, {
  description: 'The agent’s keys sorted by display_order, then key.',
});

/** A declared key as stored (what PUT …/metadata-definitions answers). */
export const MetadataDefinition = Type.Object(
  {
    key: Type.String(),
    display_name: Type.String(),
    script: Type.String(),
    interval: Type.Integer({ minimum: 0 }),
    timeout: Type.Integer({ minimum: 0 }),
    display_order: Type.Integer(),
  },
  { description: 'A key an agent declares, as stored.' },
);

/** An agent just created, with its token: shown once, only its SHA-256 is stored. */
export const CreatedAgent = Type.Object(
  {
    id: Type.String({ format: 'uuid' }),
    name: Type.String(),
    token: Type.String({ description: 'The agent’s bearer token (`mbt_…`). Shown once: only its SHA-256 is stored.' }),
  },
  { description: 'A new agent and its token.' },
);

/** An agent as the list and show routes answer it. */
export const AgentSummary = Type.Object(
  {
    id: Type.String({ format: 'uuid' }),
    name: Type.String(),
    created_at: Type.String({ format: 'date-time' }),
    last_reported_at: Type.Union([Type.String({ format: 'date-time' }), Type.Null()], {
      description: 'The newest collected_at of its keys; null while none was ever reported.',
    }),
    declared_keys: Type.Integer({ minimum: 0, description: 'How many keys it declares.' }),
  },
  { description: 'An agent, with when it last reported and how many keys it declares.' },
);

/** One agent's metadata in a bulk read or a many-agent watch event. */
export const AgentMetadata = Type.Object(
  {
    agent_id: Type.String({ format: 'uuid' }),
    metadata: MetadataList,
  },
  { description: 'One agent’s metadata list.' },
);

/** The schemas the document names under components/schemas (routes refer to them by `$ref`). */
export const COMPONENTS: Readonly<Record<string, TSchema>> = {
  ErrorBody,
  Counts,
  MetadataItem,
  MetadataDefinition,
  CreatedAgent,
  AgentSummary,
  AgentMetadata,
};

/** An answer with a JSON body, its own description, and headers if any. */
export interface JsonAnswer<S extends TSchema> {
  description: string;
  content: { 'application/json': { schema: S } };
  headers?: Record<string, TSchema>;
}

/**
 * An answer: `json('The keys were queued.', Counts)`. The schema object stays
 * the shared one, so a component is a `$ref` in the document.
 */
export function json<S extends TSchema>(
  description: string,
  schema: S,
  headers?: Record<string, TSchema>,
): JsonAnswer<S> {
  return { description, content: { 'application/json': { schema } }, ...(headers ? { headers } : {}) };
}

/** The answer of a Server-Sent Events route (the handler takes the response over: this is for the document). */
export function eventStream(description: string, events: string) {
  return {
    description,
    content: { 'text/event-stream': { schema: Type.String({ description: events }) } },
  };
}

export type ErrorStatus = 400 | 401 | 403 | 404 | 413 | 415 | 426 | 429 | 431 | 500 | 503;

/**
 * The error answers of a route, each `{"error": "<message>"}`, by status,
 * with when each happens there: `errors({ 404: 'Unknown agent.', 431: HEADERS_TOO_LARGE })`.
 */
export function errors<const E extends Partial<Record<ErrorStatus, string>>>(
  when: E,
): { [S in keyof E]: JsonAnswer<typeof ErrorBody> } {
  const answers: Partial<Record<string, JsonAnswer<typeof ErrorBody>>> = {};
  for (const [status, description] of Object.entries(when)) {
    if (description !== undefined) answers[status] = json(description, ErrorBody);
  }
  return answers as { [S in keyof E]: JsonAnswer<typeof ErrorBody> };
}

/**
 * Who may call a route (`schema.security`): the names of the document's
 * bearer schemes. A route without `security` takes no token.
 */
export const SECURITY = {
  agent: [{ agentToken: [] }],
  admin: [{ adminToken: [] }],
  adminOrAgent: [{ adminToken: [] }, { agentToken: [] }],
} as const;

// When the common errors happen, for routes' `errors()`.
export const HEADERS_TOO_LARGE =
  'Headers over 16 KiB: `{"error": "Request Header Fields Too Large", …}`, from the HTTP server before any route.';
export const SHUTTING_DOWN = 'Shutting down: `shutting down: retry against another replica or later`.';
export const INTERNAL = 'An unexpected failure: `internal error` (the details are logged).';
export const BAD_BODY =
  'Malformed JSON, a body that is not valid UTF-8, wrong types, a value out of its limits (the message names ' +
  'it, e.g. `body/metadata must be array`), a string with a NUL character or a lone surrogate (Postgres text ' +
  'holds neither: `body/metadata/0/value must not contain NUL characters`), or `agentId` not a UUID.';
export const TOO_LARGE = 'The body is over 1 MiB (answered from Content-Length before the body is read).';
export const NOT_JSON = 'The body is not `application/json`, or its charset is not UTF-8.';
