// Answers a request the HTTP parser refused (malformed, headers over 16 KiB,
// too slow), as Fastify's own handler does, byte for byte, except for the
// log: Fastify's logs the parser's error whole at trace, and that error
// carries the request's raw bytes (`rawPacket`), Authorization header and
// all. This one logs what went wrong, never what was sent.

import http from 'node:http';
import type { Socket } from 'node:net';
import type { FastifyBaseLogger } from 'fastify';
import { NOSNIFF } from './responseHeaders.js';

interface ClientErrorAnswer {
  status: number;
  message: string;
  label: string;
}

function answerFor(code: string | undefined): ClientErrorAnswer {
  if (code === 'ERR_HTTP_REQUEST_TIMEOUT') return { status: 408, message: 'Client Timeout', label: 'timeout' };
  if (code === 'HPE_HEADER_OVERFLOW') {
    return { status: 431, message: 'Exceeded maximum allowed HTTP header size', label: 'header_overflow' };
  }
  return { status: 400, message: 'Client Error', label: 'error' };
}

/** Fastify's `clientErrorHandler` option: `clientErrorHandler(logger)`. */
export function clientErrorHandler(log: FastifyBaseLogger): (err: NodeJS.ErrnoException, socket: Socket) => void {
  return (err, socket) => {
    // A reset: the socket is gone, nothing to answer.
    if (err.code === 'ECONNRESET' || socket.destroyed) return;
    const { status, message, label } = answerFor(err.code);
    // Only the parser's code and reason (`Invalid header value char`): never the bytes (`rawPacket`).
    log.trace({ code: err.code, reason: (err as { reason?: unknown }).reason }, `client ${label}`);
    if (socket.writable) {
      const statusText = http.STATUS_CODES[status]!;
      const body = `{"error":"${statusText}","message":"${message}","statusCode":${status}}`;
      socket.write(
        `HTTP/1.1 ${status} ${statusText}\r\nContent-Length: ${body.length}\r\nContent-Type: application/json\r\n` +
          `${NOSNIFF.name}: ${NOSNIFF.value}\r\n\r\n${body}`,
      );
    }
    socket.destroy(err);
  };
}
