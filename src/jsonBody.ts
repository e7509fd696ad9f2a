// The JSON body parser, stricter than Fastify's: the body is decoded as UTF-8
// that must be valid (Fastify's replaces bad bytes with U+FFFD, so a Latin-1
// `é` was stored as `\uFFFD`), a charset other than UTF-8 is a 415 (it was
// ignored), and no string may hold what Postgres text cannot (text.ts).
// Fastify's own parser still does the rest: an empty body, malformed JSON and
// `__proto__`/`constructor` keys are 400s as before, and the body limit (413)
// is the server's.

import type { FastifyInstance, FastifyRequest } from 'fastify';
import { HttpError } from './errors.js';
import { jsonTextProblem } from './text.js';

// `fatal`: a malformed sequence throws instead of becoming U+FFFD; `ignoreBOM`
// false: a leading byte-order mark is dropped, as JSON (RFC 8259) allows.
const utf8 = new TextDecoder('utf-8', { fatal: true });
const BACKSLASH_U = Buffer.from('\\u');

/**
 * `application/json; charset=…`: the charset, lower-cased and unquoted, or
 * undefined when there is none. Several are given back joined by commas
 * (`utf-8,latin1`), which no check takes for UTF-8: which one a parser
 * believes is its own choice.
 */
export function charsetOf(contentType: string | undefined): string | undefined {
  if (contentType === undefined) return undefined;
  const charsets = [...contentType.matchAll(/;\s*charset\s*=\s*("?)([^";\s]*)\1/gi)].map((m) => m[2]!.toLowerCase());
  return charsets.length === 0 ? undefined : charsets.join(',');
}

/** Decodes a body or a stream message as strict UTF-8; a HttpError 400 when it is not UTF-8. */
export function decodeUtf8(bytes: Uint8Array): string {
  try {
    return utf8.decode(bytes);
  } catch {
    throw new HttpError(400, 'body is not valid UTF-8: send JSON encoded as UTF-8');
  }
}

/** Whether a JSON text has a `\u` escape, the only way NUL and lone surrogates get into one. */
export function hasUnicodeEscape(bytes: Buffer): boolean {
  return bytes.includes(BACKSLASH_U);
}

/** Replaces Fastify's `application/json` parser with the strict one. */
export function registerJsonBodyParser(app: FastifyInstance): void {
  const parseJson = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser(
    'application/json',
    { parseAs: 'buffer' },
    (request: FastifyRequest, body: Buffer | string, done: (err: Error | null, body?: unknown) => void) => {
      const charset = charsetOf(request.headers['content-type']);
      if (charset !== undefined && charset !== 'utf-8' && charset !== 'utf8') {
        done(new HttpError(415, `unsupported charset "${charset}": send JSON encoded as UTF-8`));
        return;
      }
      const bytes = body as Buffer;
      let text: string;
      try {
        text = decodeUtf8(bytes);
      } catch (err) {
        done(err as Error);
        return;
      }
      void parseJson(request, text, (err, parsed) => {
        if (err) return done(err);
        const problem = jsonTextProblem(parsed, hasUnicodeEscape(bytes));
        done(problem === undefined ? null : new HttpError(400, problem), parsed);
      });
    },
  );
}
