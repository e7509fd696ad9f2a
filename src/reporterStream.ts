// The reporter's stream transport: opening `GET /v1/agents/{agentId}/metadata/stream`
// (a WebSocket, `ws`), and one open stream with at most one message in flight.
// Every way a message ends (an answer, a refusal, a bad answer, a close code,
// no answer in time, an abort) becomes one `Outcome` (reporterOutcome.ts),
// heard once; a stream that ends with no message in flight is told to
// `onLost`. What the outcomes mean for the held keys is the loop's business
// (reporter.ts).

import WebSocket from 'ws';
import type { Clock } from './clock.js';
import {
  errorMessage,
  MAX_ANSWER_BYTES,
  MAX_ERROR_BODY_BYTES,
  ReporterError,
  retryAfterSeconds,
  tokenRefused,
  type Outcome,
  type OutcomeListener,
} from './reporterOutcome.js';
import type { Entry } from './reporterBook.js';

// The close codes of the stream protocol (README, "Agents that stay connected").
const CLOSE_NORMAL = 1000;
const CLOSE_TOO_BIG = 1009;
const CLOSE_TOKEN_REVOKED = 4001;
// A graceful close waits this long for the service's close frame, then cuts
// the socket: the service answers at once unless it is gone.
const CLOSE_HANDSHAKE_MS = 1000;

/** How opening the stream ended. */
export type OpenResult =
  | { kind: 'open'; socket: WebSocket }
  | { kind: 'answered'; status: number; message: string }
  | { kind: 'timeout' }
  | { kind: 'network'; error: Error }
  | { kind: 'aborted' };

export interface StreamTarget {
  streamUrl: URL;
  authorization: string;
  clock: Clock;
  requestTimeoutMs: number;
}

/** Opens the stream; `done` hears once how that ended. The answer is `abort()`, which ends it `aborted`. */
export function openStream(target: StreamTarget, done: (result: OpenResult) => void): { abort(): void } {
  const socket = new WebSocket(target.streamUrl, {
    headers: { authorization: target.authorization },
    perMessageDeflate: false,
    followRedirects: false,
    maxPayload: MAX_ANSWER_BYTES,
  });
  let finished = false;
  const finish = (result: OpenResult) => {
    if (finished) return;
    finished = true;
    target.clock.clearTimeout(timer);
    socket.off('open', onOpen);
    socket.off('close', onClosed);
    if (result.kind !== 'open') {
      // ws reports its own abort of the handshake as an error: heard, ignored.
      socket.on('error', () => undefined);
      socket.terminate();
    }
    socket.off('error', onFailed);
    done(result);
  };
  const onOpen = () => finish({ kind: 'open', socket });
  const onFailed = (error: Error) => finish({ kind: 'network', error });
  const onClosed = () => finish({ kind: 'network', error: new Error('connection closed') });
  const timer = target.clock.setTimeout(() => finish({ kind: 'timeout' }), target.requestTimeoutMs);
  socket.once('open', onOpen);
  socket.on('error', onFailed);
  socket.once('close', onClosed);
  // An HTTP answer instead of the upgrade: its status and the service's message.
  socket.once('unexpected-response', (_request, response) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const answered = () =>
      finish({
        kind: 'answered',
        status: response.statusCode ?? 0,
        message: errorMessage(Buffer.concat(chunks).toString('utf8')) || (response.statusMessage ?? ''),
      });
    response.on('data', (chunk: Buffer) => {
      if (size < MAX_ERROR_BODY_BYTES) chunks.push(chunk);
      size += chunk.length;
    });
    response.once('end', answered);
    response.once('error', answered);
    response.once('close', answered);
  });
  return { abort: () => finish({ kind: 'aborted' }) };
}

interface InFlight {
  seq: number;
  timer: unknown;
  done: OutcomeListener;
}

type Answer = { seq?: unknown; accepted?: unknown; dropped?: unknown; retry_after?: unknown; error?: unknown };

/** An open stream: one message in flight at most; ended for good by the service, a bad answer, or us. */
export class StreamLink {
  private inFlight: InFlight | undefined;
  private ended = false;

  constructor(
    private readonly socket: WebSocket,
    private readonly clock: Clock,
    private readonly requestTimeoutMs: number,
    /** The stream ended while no message was in flight (a close code, an answer nobody asked for). */
    private readonly onLost: OutcomeListener,
  ) {
    socket.on('error', () => undefined); // 'close' follows and says what happened
    socket.on('message', (data, isBinary) => this.onMessage(data, isBinary));
    socket.once('close', (code, reason) => this.onClose(code, reason.toString('utf8')));
  }

  /** The stream ended: nothing more can be sent on it. */
  get closed(): boolean {
    return this.ended;
  }

  /** Sends `batch` as message `seq`; `done` hears once how it ended. */
  send(seq: number, batch: readonly Entry[], done: OutcomeListener): void {
    if (this.ended || this.inFlight) throw new Error('StreamLink.send: the stream is closed or busy');
    const message = `{"seq":${seq},"metadata":[${batch.map((entry) => entry.json).join(',')}]}`;
    const timer = this.clock.setTimeout(() => {
      this.abandon({
        kind: 'failed',
        error: new ReporterError(`no answer on the stream within ${this.requestTimeoutMs} ms`),
      });
    }, this.requestTimeoutMs);
    this.inFlight = { seq, timer, done };
    this.socket.send(message, (err) => {
      if (err) this.abandon({ kind: 'failed', error: new ReporterError(`cannot send: ${err.message}`) });
    });
  }

  /** Cuts the stream: a message in flight ends `aborted`. */
  abort(): void {
    this.abandon({ kind: 'aborted' });
  }

  /** A graceful close, bounded: the service answers the close frame, or the socket is cut. */
  async close(): Promise<void> {
    this.abort();
    if (this.socket.readyState === WebSocket.CLOSED) return;
    await new Promise<void>((resolve) => {
      const timer = this.clock.setTimeout(() => this.socket.terminate(), CLOSE_HANDSHAKE_MS);
      this.socket.once('close', () => {
        this.clock.clearTimeout(timer);
        resolve();
      });
      this.socket.close(CLOSE_NORMAL, 'reporter closed');
    });
  }

  /** Gives up on this stream: what is in flight ends with `outcome`, the socket is cut. */
  private abandon(outcome: Outcome): void {
    if (this.ended) return;
    this.ended = true;
    // A message in flight is cut off; an idle stream closes gracefully in close().
    if (this.inFlight || outcome.kind !== 'aborted') this.socket.terminate();
    this.end(outcome);
  }

  private end(outcome: Outcome): void {
    const inFlight = this.inFlight;
    this.inFlight = undefined;
    if (inFlight) {
      this.clock.clearTimeout(inFlight.timer);
      inFlight.done(outcome);
    } else if (outcome.kind !== 'aborted') {
      this.onLost(outcome);
    }
  }

  private onMessage(data: WebSocket.RawData, isBinary: boolean): void {
    if (this.ended) return;
    const inFlight = this.inFlight;
    let answer: Answer;
    try {
      if (isBinary || !Buffer.isBuffer(data)) throw new Error('a binary message');
      answer = JSON.parse(data.toString('utf8')) as Answer;
      if (answer === null || typeof answer !== 'object') throw new Error('not a JSON object');
    } catch (err) {
      this.protocolError(`unreadable answer on the stream: ${(err as Error).message}`);
      return;
    }
    // `"seq": null` answers a message the service could not read: with one in flight, that one.
    const refusedUnread = answer.seq === null && typeof answer.error === 'string';
    if (!inFlight || (answer.seq !== inFlight.seq && !refusedUnread)) {
      const said = typeof answer.error === 'string' ? `: ${answer.error}` : '';
      this.protocolError(`unexpected answer on the stream (seq ${String(answer.seq)})${said}`);
      return;
    }
    if (typeof answer.error === 'string') {
      this.end({
        kind: 'refused',
        error: new ReporterError(`metabatch refused a report (nothing of it applied): ${answer.error}`),
      });
      return;
    }
    if (typeof answer.accepted !== 'number' || typeof answer.dropped !== 'number') {
      this.protocolError('an answer on the stream without accepted and dropped counts');
      return;
    }
    this.end({
      kind: 'ack',
      accepted: answer.accepted,
      dropped: answer.dropped,
      retryAfterS: retryAfterSeconds(answer.retry_after),
    });
  }

  /** An answer that does not follow the protocol: the stream is cut, what is in flight goes again after a backoff. */
  private protocolError(message: string): void {
    this.abandon({ kind: 'failed', error: new ReporterError(message) });
  }

  private onClose(code: number, reason: string): void {
    // Already abandoned (a timeout, a protocol error), or closed by us.
    if (this.ended) return;
    this.ended = true;
    const said = reason ? ` ${reason}` : '';
    if (code === CLOSE_TOKEN_REVOKED) {
      this.end({ kind: 'fatal', error: tokenRefused(undefined, reason || 'token revoked', code) });
    } else if (code === CLOSE_TOO_BIG) {
      this.end({
        kind: 'tooBig',
        error: new ReporterError(`metabatch closed the stream: message too big (${code}${said})`, { closeCode: code }),
      });
    } else {
      this.end({
        kind: 'failed',
        error: new ReporterError(`metabatch closed the stream (${code}${said}): reconnecting`, { closeCode: code }),
      });
    }
  }
}
