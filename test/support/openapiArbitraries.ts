// fast-check inputs generated from the service's OpenAPI document: for each
// operation, its path parameters, its query and its JSON body, mostly valid
// (the known agents and keys, so requests get past authentication and
// validation and reach Postgres) and otherwise hostile: NUL, lone
// surrogates, invalid UTF-8, impossible dates (RFC 3339 and cursors), wrong
// types, unknown properties, other charsets.

import fc from 'fast-check';

/** The subset of JSON Schema the document's parameters and bodies use. */
export interface Schema {
  $ref?: string;
  type?: string;
  format?: string;
  pattern?: string;
  enum?: unknown[];
  const?: unknown;
  minLength?: number;
  maxLength?: number;
  minimum?: number;
  maximum?: number;
  items?: Schema;
  minItems?: number;
  maxItems?: number;
  properties?: Record<string, Schema>;
  required?: string[];
  additionalProperties?: boolean | Schema;
  anyOf?: Schema[];
  oneOf?: Schema[];
}

export interface Parameter {
  in: 'path' | 'query' | 'header' | 'cookie';
  name: string;
  required?: boolean;
  schema: Schema;
}

export interface Operation {
  parameters?: Parameter[];
  requestBody?: { content?: Record<string, { schema?: Schema }> };
}

/** What the generators draw known values from, so that requests reach past the checks. */
export interface Known {
  agentIds: string[];
  keys: string[];
  components: Record<string, Schema>;
}

/** One request of an operation, its parts already encoded. */
export interface GeneratedRequest {
  /** Each path parameter, percent-encoded. */
  path: Record<string, string>;
  /** `a=1&b=2`, percent-encoded ('' for none). */
  query: string;
  /** The body's bytes, or undefined for none. */
  body: Buffer | undefined;
  contentType: string | undefined;
}

/** Stands for invalid UTF-8 in a generated body: replaced by bytes that are not UTF-8 once serialised. */
const INVALID_UTF8_MARK = '\u{10FFFF}invalid-utf8\u{10FFFF}';
const INVALID_UTF8_BYTES = [
  Buffer.from([0xff, 0xfe, 0xe9]),
  Buffer.from([0xed, 0xa0, 0x80]),
  Buffer.from([0xc0, 0x80]),
];

/** A cursor in the service's encoding around a created_at of any text. */
export function cursorOf(createdAt: string, id = '123e4567-e89b-12d3-a456-426614174000'): string {
  return Buffer.from(JSON.stringify([createdAt, id])).toString('base64url');
}

const IMPOSSIBLE_DATES = [
  '2026-13-01T00:00:00Z',
  '2026-02-30T00:00:00Z',
  '0000-01-01T00:00:00Z',
  '2026-01-01T24:00:00Z',
  '2026-01-01T00:00:60Z',
  '2026-01-01T00:00:00+24:00',
  '275760-09-13T00:00:00Z',
  '9999-12-31T23:59:59.9999999Z',
];
const IMPOSSIBLE_CURSOR_DATES = [
  '2026-13-01 00:00:00+00',
  '2026-02-30 00:00:00+00',
  '0000-01-01 00:00:00+00',
  '2026-01-01 25:00:00+00',
  '2026-01-01 00:61:00+00',
  '2026-01-01 00:00:00+99',
  '2026-01-01 00:00:00.1234567+00',
];

/** Strings Postgres or the parsers choke on, dates included. */
const hostileString: fc.Arbitrary<string> = fc.oneof(
  // What Postgres text cannot hold.
  {
    weight: 4,
    arbitrary: fc.constantFrom('\0', 'a\0b', '\ud800', 'x\udfff', '\ud83d', '\udc00\ud800', INVALID_UTF8_MARK),
  },
  {
    weight: 2,
    arbitrary: fc.string({ unit: fc.constantFrom('\0', '\ud800', '\udc00', '\ud83d\ude00', 'a', 'é'), maxLength: 8 }),
  },
  // Impossible dates, as RFC 3339 and inside cursors.
  {
    weight: 3,
    arbitrary: fc.constantFrom(
      ...IMPOSSIBLE_DATES,
      ...IMPOSSIBLE_CURSOR_DATES.map((date) => cursorOf(date)),
      cursorOf('2026-01-01 00:00:00+00', 'not-a-uuid'),
    ),
  },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      '\ud83d\ude00',
      '',
      ' ',
      '\t\n',
      '\ufeff',
      '\\',
      '"',
      '%',
      '../../etc/passwd',
      'null',
      '-1',
      '1e309',
      'x'.repeat(5000),
    ),
  },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 40 }) },
);

/** Any JSON value in place of the one the schema asks for. */
const hostileValue: fc.Arbitrary<unknown> = fc.oneof(
  hostileString,
  fc.constantFrom(null, true, false, 0, -1, 1.5, -0, 2 ** 53, -(2 ** 63), 1e308, [], {}, [null], { '': '' }),
  fc.integer(),
  fc.double({ noNaN: true, noDefaultInfinity: true }),
);

function uuidVariants(known: Known): fc.Arbitrary<string> {
  return fc.oneof(
    { weight: 10, arbitrary: fc.constantFrom(...known.agentIds) },
    { weight: 1, arbitrary: fc.uuid() },
    {
      weight: 2,
      arbitrary: fc
        .constantFrom(...known.agentIds)
        .chain((id) =>
          fc.constantFrom(id.toUpperCase(), `urn:uuid:${id}`, `{${id}}`, id.replaceAll('-', ''), `${id}\0`),
        ),
    },
  );
}

function resolve(schema: Schema, known: Known): Schema {
  if (schema.$ref === undefined) return schema;
  const name = schema.$ref.replace('#/components/schemas/', '');
  return known.components[name] ?? {};
}

/** Values for a schema: mostly within it, sometimes hostile. */
export function valueOf(schema: Schema, known: Known): fc.Arbitrary<unknown> {
  // Rare at each level, so that most requests are valid but for one thing.
  return fc.oneof(
    { weight: 15, arbitrary: validOf(resolve(schema, known), known) },
    { weight: 1, arbitrary: hostileValue },
  );
}

function validOf(schema: Schema, known: Known): fc.Arbitrary<unknown> {
  const choices = schema.anyOf ?? schema.oneOf;
  if (choices) return fc.oneof(...choices.map((choice) => valueOf(choice, known)));
  if (schema.enum) return fc.constantFrom(...schema.enum);
  if (schema.const !== undefined) return fc.constant(schema.const);
  switch (schema.type) {
    case 'string':
      return stringOf(schema, known);
    case 'integer': {
      // Its bounds now and then (one past them is the hostile values' job).
      const min = schema.minimum ?? -(2 ** 31);
      const max = schema.maximum ?? 2 ** 31;
      return fc.oneof(
        { weight: 4, arbitrary: fc.integer({ min, max }) },
        { weight: 1, arbitrary: fc.constantFrom(min, max) },
      );
    }
    case 'number':
      return fc.double({ noNaN: true, noDefaultInfinity: true });
    case 'boolean':
      return fc.boolean();
    case 'array':
      return fc.array(valueOf(schema.items ?? {}, known), {
        minLength: Math.min(schema.minItems ?? 0, 3),
        maxLength: Math.min(schema.maxItems ?? 3, 3),
      });
    case 'object':
      return objectOf(schema, known);
    default:
      return hostileValue;
  }
}

function stringOf(schema: Schema, known: Known): fc.Arbitrary<string> {
  if (schema.format === 'uuid') return uuidVariants(known);
  if (schema.format === 'date-time') {
    return fc.oneof(
      fc.date({ noInvalidDate: true }).map((date) => date.toISOString()),
      fc.constantFrom(...IMPOSSIBLE_DATES),
    );
  }
  if (schema.pattern !== undefined && schema.pattern.startsWith('^'))
    return fc.stringMatching(new RegExp(schema.pattern));
  return fc.oneof(
    { weight: 3, arbitrary: fc.constantFrom(...known.keys) },
    {
      weight: 3,
      arbitrary: fc.string({ minLength: schema.minLength ?? 0, maxLength: Math.min(schema.maxLength ?? 40, 40) }),
    },
    { weight: 1, arbitrary: fc.string({ unit: 'grapheme', minLength: 1, maxLength: 10 }) },
    { weight: 2, arbitrary: hostileString },
  );
}

function objectOf(schema: Schema, known: Known): fc.Arbitrary<unknown> {
  const properties = schema.properties ?? {};
  const record = fc.record(
    Object.fromEntries(Object.entries(properties).map(([name, property]) => [name, valueOf(property, known)])),
    { requiredKeys: (schema.required ?? []).filter((name) => name in properties) },
  );
  // Sometimes a property the schema does not know, or a required one left out.
  return fc.oneof(
    { weight: 15, arbitrary: record },
    {
      weight: 1,
      arbitrary: fc
        .tuple(record, fc.constantFrom('extra', '__proto__', 'constructor', '\0', '\ud800'), hostileValue)
        .map(([value, name, extra]) => ({ ...(value as object), [name]: extra })),
    },
  );
}

/**
 * Percent-encodes text as its UTF-8 bytes, a lone surrogate as the three
 * bytes UTF-8 forbids for it (`%ED%A0%80`), as a hostile client would.
 */
export function percentEncode(text: string): string {
  let encoded = '';
  for (const char of text) {
    const code = char.codePointAt(0)!;
    if (/^[A-Za-z0-9\-._~]$/.test(char)) encoded += char;
    else if (code >= 0xd800 && code <= 0xdfff) {
      for (const byte of [0xe0 | (code >> 12), 0x80 | ((code >> 6) & 0x3f), 0x80 | (code & 0x3f)]) {
        encoded += `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
      }
    } else encoded += encodeURIComponent(char);
  }
  return encoded;
}

/** A URL parameter's text: a string as it is, anything else as JSON. */
function urlText(value: unknown): string {
  return typeof value === 'string' ? value : (JSON.stringify(value) ?? '');
}

/** Raw URL pieces no encoder produces: broken percent-escapes, encoded NUL and invalid UTF-8. */
const rawUrlPiece = fc.constantFrom('%00', '%ED%A0%80', '%C0%80', '%FF', '%', '%zz', '%u0000', '+', '%2F', '%252F');

function urlValueOf(schema: Schema, known: Known): fc.Arbitrary<string> {
  return fc.oneof(
    { weight: 12, arbitrary: valueOf(schema, known).map((value) => percentEncode(urlText(value))) },
    {
      weight: 1,
      arbitrary: fc.tuple(fc.constantFrom('', 'cpu', known.agentIds[0]!), rawUrlPiece).map(([a, b]) => a + b),
    },
  );
}

const CONTENT_TYPES = [
  'application/json; charset=utf-16',
  'application/json; charset=iso-8859-1',
  'application/json; charset=UTF-8',
  'application/json;charset="utf-8"',
  'text/plain',
  'application/x-www-form-urlencoded',
  'application/json-patch+json',
];

function bodyBytes(value: unknown): Buffer {
  const text = JSON.stringify(value) ?? 'null';
  const parts = text.split(INVALID_UTF8_MARK);
  const chunks: Buffer[] = [];
  parts.forEach((part, i) => {
    if (i > 0) chunks.push(INVALID_UTF8_BYTES[i % INVALID_UTF8_BYTES.length]!);
    chunks.push(Buffer.from(part));
  });
  return Buffer.concat(chunks);
}

/** Requests for one operation of the document. */
export function requestsOf(operation: Operation, known: Known): fc.Arbitrary<GeneratedRequest> {
  const parameters = operation.parameters ?? [];
  const path = fc.record(
    Object.fromEntries(parameters.filter((p) => p.in === 'path').map((p) => [p.name, urlValueOf(p.schema, known)])),
  );
  const queryParameters = parameters.filter((p) => p.in === 'query');
  const query = fc
    .tuple(
      ...queryParameters.map((p) =>
        fc.option(
          // A repeated parameter (an array) is sent once per item.
          valueOf(p.schema, known).map((value) =>
            (Array.isArray(value) ? value : [value]).map((item) => `${p.name}=${percentEncode(urlText(item))}`),
          ),
          { nil: undefined, freq: 3 },
        ),
      ),
      // Now and then a raw piece as one parameter's value (or one more).
      fc.oneof(
        { weight: 7, arbitrary: fc.constant(undefined) },
        {
          weight: 1,
          arbitrary: fc
            .tuple(fc.constantFrom(...queryParameters.map((p) => p.name), 'x'), rawUrlPiece)
            .map(([name, piece]) => [`${name}=${piece}`]),
        },
      ),
    )
    .map((pairs) => pairs.flatMap((pair) => pair ?? []).join('&'));
  const bodySchema = operation.requestBody?.content?.['application/json']?.schema;
  const body: fc.Arbitrary<{ body: Buffer | undefined; contentType: string | undefined }> =
    bodySchema === undefined
      ? fc.constant({ body: undefined, contentType: undefined })
      : fc.record({
          body: fc.oneof(
            { weight: 12, arbitrary: valueOf(bodySchema, known).map(bodyBytes) },
            { weight: 1, arbitrary: fc.constantFrom(Buffer.alloc(0), Buffer.from('{'), Buffer.from('{"a":1}x')) },
          ),
          contentType: fc.oneof(
            { weight: 12, arbitrary: fc.constant('application/json') },
            { weight: 1, arbitrary: fc.constantFrom(...CONTENT_TYPES) },
          ),
        });
  return fc.record({ path, query, body }).map(({ path, query, body }) => ({ path, query, ...body }));
}
