// The reporter's POST transport, for while the stream cannot be opened:
// `POST /v1/agents/{agentId}/metadata` over one keep-alive connection, one
// request at a time. Its answer (or no answer) becomes one `Outcome`
// (reporterOutcome.ts), as the stream's does.

import http from 'node:http';
import https from 'node:https';
import type { Clock } from './clock.js';
import {
  errorMessage,
  MAX_ANSWER_BYTES,
  ReporterError,
  retryAfterSeconds,
  tokenRefused,
  type Outcome,
  type OutcomeListener,
} from './reporterOutcome.js';
import type { Entry } from './reporterBook.js';

export interface PostTarget {
  postUrl: URL;
  authorization: string;
  clock: Clock;
  requestTimeoutMs: number;
}

/** What a POST's answer means: its status, body and Retry-After. */
export function postOutcome(status: number, body: string, retryAfter: string | undefined): Outcome {
  if (status === 202 || status === 429) {
    try {
      const counts = JSON.parse(body) as { accepted?: unknown; dropped?: unknown };
      if (typeof counts.accepted === 'number' && typeof counts.dropped === 'number') {
        return {
          kind: 'ack',
          accepted: counts.accepted,
          dropped: counts.dropped,
          retryAfterS: retryAfterSeconds(retryAfter),
        };
      }
    } catch {
      // An answer we cannot read: like a failure below.
    }
  }
  const message = errorMessage(body);
  if (status === 401 || status === 403) return { kind: 'fatal', error: tokenRefused(status, message) };
  if (status === 413) {
    return { kind: 'tooBig', error: new ReporterError(`metabatch refused a POST as too big: ${message}`, { status }) };
  }
  if (status === 400 || status === 415) {
    return {
      kind: 'refused',
      error: new ReporterError(`metabatch refused a report (${status}, nothing of it applied): ${message}`, { status }),
    };
  }
  return { kind: 'failed', error: new ReporterError(`metabatch answered the POST ${status}: ${message}`, { status }) };
}

/** POSTs one report at a time over a keep-alive connection of its own. */
export class PostLink {
  private agent: http.Agent | undefined;
  private abortCurrent: (() => void) | undefined;

  constructor(private readonly target: PostTarget) {}

  /** POSTs `batch`; `done` hears once how it ended. */
  send(batch: readonly Entry[], done: OutcomeListener): void {
    if (this.abortCurrent) throw new Error('PostLink.send: a POST is in flight already');
    const { postUrl, clock, requestTimeoutMs } = this.target;
    const body = `{"metadata":[${batch.map((entry) => entry.json).join(',')}]}`;
    const secure = postUrl.protocol === 'https:';
    this.agent ??= secure
      ? new https.Agent({ keepAlive: true, maxSockets: 1 })
      : new http.Agent({ keepAlive: true, maxSockets: 1 });
    let finished = false;
    const finish = (outcome: Outcome) => {
      if (finished) return;
      finished = true;
      clock.clearTimeout(timer);
      this.abortCurrent = undefined;
      done(outcome);
    };
    const request = (secure ? https : http).request(postUrl, {
      method: 'POST',
      agent: this.agent,
      headers: {
        authorization: this.target.authorization,
        'content-type': 'application/json',
        'content-length': Buffer.byteLength(body),
      },
    });
    const timer = clock.setTimeout(() => {
      finish({ kind: 'failed', error: new ReporterError(`no answer to the POST within ${requestTimeoutMs} ms`) });
      request.destroy();
    }, requestTimeoutMs);
    this.abortCurrent = () => {
      finish({ kind: 'aborted' });
      request.destroy();
    };
    request.once('error', (err) =>
      finish({ kind: 'failed', error: new ReporterError(`cannot reach metabatch: ${err.message}`, { cause: err }) }),
    );
    request.once('response', (response) => {
      const chunks: Buffer[] = [];
      let size = 0;
      response.on('data', (chunk: Buffer) => {
        if (size < MAX_ANSWER_BYTES) chunks.push(chunk);
        size += chunk.length;
      });
      response.once('error', (err) =>
        finish({ kind: 'failed', error: new ReporterError(`the POST's answer broke off: ${err.message}`) }),
      );
      response.once('end', () => {
        const status = response.statusCode ?? 0;
        finish(postOutcome(status, Buffer.concat(chunks).toString('utf8'), response.headers['retry-after']));
      });
    });
    request.end(body);
  }

  /** Ends the POST in flight (`aborted`) and closes the connection. */
  destroy(): void {
    this.abortCurrent?.();
    this.agent?.destroy();
    this.agent = undefined;
  }
}
