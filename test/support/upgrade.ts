// The HTTP answer to a WebSocket upgrade the service refuses (401, 403, 429,
// ...), read whole; an upgrade that is accepted fails the test.

import type WebSocket from 'ws';

export interface RefusedUpgrade {
  status: number;
  headers: Record<string, unknown>;
  /** The body as text. */
  body: string;
}

export function refusedUpgrade(ws: WebSocket): Promise<RefusedUpgrade> {
  return new Promise((resolve, reject) => {
    ws.once('open', () => reject(new Error('the upgrade was accepted')));
    ws.once('error', reject);
    ws.once('unexpected-response', (request, response) => {
      let body = '';
      response.on('data', (chunk: Buffer) => (body += chunk.toString()));
      response.on('end', () => {
        request.destroy();
        resolve({ status: response.statusCode!, headers: response.headers, body });
      });
    });
  });
}
