// Text Postgres can store. Its `text` holds neither NUL nor a lone UTF-16
// surrogate (UTF-8 has no encoding for one): a NUL failed the statement (a
// 500, and a stack trace in both logs), a lone surrogate was stored as U+FFFD
// without a word. Input is refused with a 400 before it gets that far.
//
// In a JSON text both can only come from `\u` escapes (a raw NUL is not JSON,
// a raw surrogate is not UTF-8, which the body parser and ws refuse), so the
// parsed value is walked only when its text has an escape: the common report
// costs one byte search.

import type { FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify';
import { HttpError } from './errors.js';

// A UTF-16 surrogate, paired or not: the walk then checks the pairing.
const NUL_OR_SURROGATE = /[\0\ud800-\udfff]/;

/** Why `text` cannot be stored, or undefined when it can. */
export function textProblem(text: string): string | undefined {
  const found = NUL_OR_SURROGATE.exec(text);
  if (found === null) return undefined;
  for (let i = found.index; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    if (unit === 0) return 'must not contain NUL characters';
    if (unit < 0xd800 || unit > 0xdfff) continue;
    const next = unit <= 0xdbff && i + 1 < text.length ? text.charCodeAt(i + 1) : 0;
    if (next >= 0xdc00 && next <= 0xdfff) {
      i++;
      continue;
    }
    return `must not contain a lone surrogate (\\u${unit.toString(16)}): it is not Unicode text`;
  }
  return undefined;
}

/**
 * The first string of a parsed JSON value (property names included) that
 * cannot be stored, as a message naming where it is: `body/metadata/0/value
 * must not contain NUL characters`; undefined when every string can be.
 * `hasEscape`: whether the JSON text had a `\u` escape (none: nothing to walk).
 */
export function jsonTextProblem(value: unknown, hasEscape: boolean, where = 'body'): string | undefined {
  return hasEscape ? walk(value, where) : undefined;
}

function walk(value: unknown, where: string): string | undefined {
  if (typeof value === 'string') {
    const problem = textProblem(value);
    return problem === undefined ? undefined : `${where} ${problem}`;
  }
  if (typeof value !== 'object' || value === null) return undefined;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const problem = walk(value[i], `${where}/${i}`);
      if (problem !== undefined) return problem;
    }
    return undefined;
  }
  for (const [name, item] of Object.entries(value)) {
    const nameProblem = textProblem(name);
    if (nameProblem !== undefined) return `${where} property names ${nameProblem}`;
    const problem = walk(item, `${where}/${name}`);
    if (problem !== undefined) return problem;
  }
  return undefined;
}

// `%00` anywhere in a URL: the router and the query-string parser decode it
// to NUL. (Invalid percent-encoded UTF-8 is left as its `%XX` text by both,
// so a URL cannot carry a lone surrogate.)
const PERCENT_NUL = '%00';

/**
 * An onRequest hook: a URL with a NUL (`%00`) is a 400 before any route
 * runs, whatever parameter it is in.
 */
export function refuseNulInUrl(request: FastifyRequest, _reply: FastifyReply, done: HookHandlerDoneFunction): void {
  if (request.url.includes(PERCENT_NUL)) {
    done(new HttpError(400, 'the URL must not contain NUL characters (%00): Postgres text cannot hold them'));
    return;
  }
  done();
}
