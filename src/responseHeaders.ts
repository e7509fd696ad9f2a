// The header every answer carries: `X-Content-Type-Options: nosniff`, so
// that no browser reads a JSON answer, a watch stream or /metrics as a script
// or a page. (The pages set their own CSP: routes/ui.ts and routes/openapi.ts.)
//
// One hook of our own instead of @fastify/helmet: helmet sets a dozen headers
// per answer from an onRequest hook, most of them for HTML pages that this
// API has two of, and that already set what they need. Set on the raw
// response, so that the answers that bypass Fastify's reply (the watch
// streams after hijack, our WebSocket refusals) carry it too. A handshake
// that ws itself refuses (a bad Sec-WebSocket-Version: a 400 written raw to
// the socket, with no body to sniff) does not.

import type { FastifyReply, FastifyRequest, HookHandlerDoneFunction } from 'fastify';

export const NOSNIFF = { name: 'X-Content-Type-Options', value: 'nosniff' } as const;

/** An onRequest hook: every answer gets `nosniff`. */
export function nosniff(_request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
  reply.raw.setHeader(NOSNIFF.name, NOSNIFF.value);
  done();
}
