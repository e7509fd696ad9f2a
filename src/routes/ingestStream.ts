// One agent's ingest stream, the per-connection half of the streaming route
// (routes/stream.ts holds the route, the upgrade and the ping schedule): it
// reads reports, answers each in order with its counts or its error, holds
// back while its answers go unread, and closes as the protocol says. The
// per-message path allocates nothing beyond the parse, the report's arrays
// and its answer: no closure, no log line, no prom-client call.
//
// Just over 300 lines: one class whose states (reading, paused for unread
// answers, busy with an asynchronous sink, shutting down, closed) all guard
// the same queue of messages, kept together so each path can be checked
// against the others.

import type { Socket } from 'node:net';
import type { FastifyBaseLogger, FastifyRequest } from 'fastify';
import type { RawData, WebSocket } from 'ws';
import { BatcherClosedError, type AddResult } from '../batcher.js';
import type { Clock } from '../clock.js';
import type { StreamMetrics } from '../metrics.js';
import { normalizeReport, ReportError, type Report } from '../report.js';
import type { StreamReport } from '../schemas.js';
import { REVOKED_CLOSE_CODE, REVOKED_CLOSE_REASON, type RevocableStream } from '../streams.js';
import { hasUnicodeEscape } from '../jsonBody.js';
import { jsonTextProblem } from '../text.js';
import type { MetadataSink } from './ingest.js';

/** Unsent answers (the socket's buffered amount) above which the stream stops reading until they drain. */
export const BACKPRESSURE_BYTES = 1024 * 1024;

const SHUTTING_DOWN = 'shutting down: retry against another replica or later';
const SHUTDOWN_CLOSE_CODE = 1001;
const SHUTDOWN_CLOSE_REASON = 'shutting down';
const BINARY_CLOSE_CODE = 1003;
const BINARY_CLOSE_REASON = 'binary messages are not accepted: send each report as JSON text';
const MESSAGE_TOO_BIG_CLOSE_CODE = 1009;
/** What `terminate()` (no close frame) means to the peer, and to the closed-streams metric. */
const ABNORMAL_CLOSE_CODE = 1006;

/** A compiled validator, as ajv (through Fastify) returns it. */
type ValidationFunction = ReturnType<FastifyRequest['compileValidationSchema']>;

export interface StreamContext {
  sink: MetadataSink;
  clock: Clock;
  metrics: StreamMetrics;
  log: FastifyBaseLogger;
  /** The message validator, compiled once by the app's ajv (no coercion, no removal). */
  validate: ValidationFunction | undefined;
  /** A stream's socket closed. */
  closed(stream: IngestStream): void;
}

/** One agent's stream: reads reports, answers each in order, and closes as the protocol says. */
export class IngestStream implements RevocableStream {
  /** Answered a ping or sent a message since the last ping. */
  private alive = true;
  /** Closed or closing: nothing it sends is applied any more. */
  private closing = false;
  /** The code the service closed with, for the metric (else the peer's). */
  private closeCode: number | undefined;
  /** Reading stopped: over BACKPRESSURE_BYTES of answers unsent. */
  private paused = false;
  /** A report is with an asynchronous sink (the benchmark's naive one); the batcher answers at once. */
  private busy = false;
  /** Shutting down: answers no longer wait for the client to read, and the last one is followed by 1001. */
  private shuttingDown = false;
  /** Shutdown waits here for an asynchronous sink's answer. */
  private idleWaiter: (() => void) | undefined;
  /** Messages received while paused or busy, answered in order once it is neither. */
  private readonly queue: Buffer[] = [];
  /** Answers are corked until the end of the tick: one write for every report of a read. */
  private corked = false;
  private readonly settledClose: Promise<void>;
  private onSettledClose!: () => void;

  constructor(
    private readonly socket: WebSocket,
    /** The TCP socket under it (corked, and watched for 'drain'). */
    private readonly tcp: Socket,
    readonly agentId: string,
    private readonly context: StreamContext,
  ) {
    this.settledClose = new Promise((resolve) => (this.onSettledClose = resolve));
    socket.on('message', this.onMessage);
    socket.on('pong', this.onPong);
    socket.on('close', this.onClose);
    socket.on('error', this.onError);
  }

  revoke(): void {
    this.close(REVOKED_CLOSE_CODE, REVOKED_CLOSE_REASON);
  }

  close(code: number, reason: string): void {
    if (this.closing) return;
    this.closing = true;
    this.closeCode = code;
    this.queue.length = 0;
    this.socket.close(code, reason);
    // Read again, if reading had stopped: the client's close frame must come through (later messages are ignored).
    if (this.paused || this.busy) {
      this.paused = false;
      this.socket.resume();
    }
  }

  /** The ping schedule: terminates a stream silent since the last ping, pings the others. */
  beat(): void {
    if (this.closing) return;
    if (!this.alive) {
      this.closing = true;
      this.closeCode = ABNORMAL_CLOSE_CODE;
      this.socket.terminate();
      return;
    }
    this.alive = false;
    this.socket.ping();
  }

  /** Shutdown: answers what was received, closes with 1001, and cuts the client off if it does not answer. */
  async shutdown(graceMs: number): Promise<void> {
    if (!this.closing) {
      this.shuttingDown = true;
      this.paused = false;
      this.drainQueue();
      while (this.busy) await new Promise<void>((resolve) => (this.idleWaiter = resolve));
      this.close(SHUTDOWN_CLOSE_CODE, SHUTDOWN_CLOSE_REASON);
    }
    // Real time, as the handshake is: a bound on the network, not a schedule of the service's.
    const timer = setTimeout(() => this.socket.terminate(), graceMs);
    await this.settledClose;
    clearTimeout(timer);
  }

  private readonly onPong = (): void => {
    this.alive = true;
  };

  /** A protocol error: ws closes the stream with its code; remember which, for the metric. */
  private readonly onError = (error: Error): void => {
    const code = protocolCloseCode(error);
    if (code === undefined || this.closing) return;
    this.closing = true;
    this.closeCode = code;
    this.queue.length = 0;
    if (code === MESSAGE_TOO_BIG_CLOSE_CODE) this.context.metrics.rejected('too_big');
  };

  private readonly onClose = (code: number): void => {
    this.closing = true;
    this.queue.length = 0;
    this.context.metrics.closed(this.closeCode ?? code);
    this.context.closed(this);
    this.onSettledClose();
  };

  private readonly onMessage = (data: RawData, isBinary: boolean): void => {
    // Revoked or shutting down: the close frame is out, nothing more is applied.
    if (this.closing) return;
    this.alive = true;
    if (isBinary) {
      this.context.metrics.rejected('binary');
      this.close(BINARY_CLOSE_CODE, BINARY_CLOSE_REASON);
      return;
    }
    // With the default binaryType, a message is one Buffer.
    const message = data as Buffer;
    if (this.busy || this.paused) {
      this.queue.push(message);
      return;
    }
    this.handle(message);
  };

  /** One report: parse, validate, normalise, queue, answer. */
  private handle(data: Buffer): void {
    let seq: number | null = null;
    try {
      let message: unknown;
      try {
        message = JSON.parse(data.toString());
      } catch (err) {
        return this.refuse(null, (err as Error).message);
      }
      seq = seqOf(message);
      // The POST body parser's check (ws has already refused invalid UTF-8, with 1007).
      const textProblem = jsonTextProblem(message, hasUnicodeEscape(data));
      if (textProblem !== undefined) return this.refuse(seq, textProblem);
      const validate = this.context.validate!;
      if (!validate(message)) return this.refuse(seq, schemaErrors(validate.errors));
      const metadata = (message as StreamReport).metadata;
      let report: Report;
      try {
        report = normalizeReport(metadata, this.context.clock.Date.now() * 1000);
      } catch (err) {
        if (err instanceof ReportError) return this.refuse(seq, err.message);
        throw err;
      }
      const result = this.context.sink.add(
        this.agentId,
        report.keys,
        report.values,
        report.errors,
        report.collectedAtMicros,
      );
      if (result instanceof Promise) return this.waitFor(seq as number, result);
      this.answer(seq as number, result);
    } catch (err) {
      this.failed(seq, err);
    }
  }

  /** An asynchronous sink: reading stops until it answers, later messages wait in the queue. */
  private waitFor(seq: number, result: Promise<AddResult>): void {
    this.busy = true;
    this.socket.pause();
    result.then(
      (counts) => this.settle(() => this.answer(seq, counts)),
      (err: unknown) => this.settle(() => this.failed(seq, err)),
    );
  }

  private settle(answer: () => void): void {
    this.busy = false;
    // Revoked meanwhile: the close frame is out, no answer follows it.
    if (!this.closing) answer();
    this.drainQueue();
    if (this.busy) return;
    const waiter = this.idleWaiter;
    this.idleWaiter = undefined;
    if (waiter) waiter();
    else this.resumeIfIdle();
  }

  private drainQueue(): void {
    while (this.queue.length > 0 && !this.busy && !this.paused) this.handle(this.queue.shift()!);
  }

  private resumeIfIdle(): void {
    if (!this.closing && !this.busy && !this.paused) this.socket.resume();
  }

  private answer(seq: number, result: AddResult): void {
    this.context.metrics.reports++;
    this.send(
      result.dropped > 0
        ? `{"seq":${seq},"accepted":${result.accepted},"dropped":${result.dropped},"retry_after":${this.context.sink.retryAfterSeconds}}`
        : `{"seq":${seq},"accepted":${result.accepted},"dropped":${result.dropped}}`,
    );
  }

  private refuse(seq: number | null, message: string): void {
    this.context.metrics.invalid++;
    this.send(`{"seq":${seq},"error":${JSON.stringify(message)}}`);
  }

  private failed(seq: number | null, err: unknown): void {
    if (err instanceof BatcherClosedError) {
      this.send(`{"seq":${seq},"error":${JSON.stringify(SHUTTING_DOWN)}}`);
      this.close(SHUTDOWN_CLOSE_CODE, SHUTDOWN_CLOSE_REASON);
      return;
    }
    // A bug, as the POST's 500: logged, answered, and the stream goes on.
    this.context.log.error({ err, agent_id: this.agentId }, 'metadata stream report failed');
    this.send(`{"seq":${seq},"error":"internal error"}`);
  }

  private send(text: string): void {
    if (!this.corked) {
      this.corked = true;
      this.tcp.cork();
      process.nextTick(this.uncork);
    }
    this.socket.send(text);
    if (!this.paused && !this.shuttingDown && !this.closing && this.socket.bufferedAmount > BACKPRESSURE_BYTES) {
      this.paused = true;
      this.context.metrics.paused++;
      this.socket.pause();
      this.tcp.once('drain', this.onDrain);
    }
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.tcp.uncork();
  };

  private readonly onDrain = (): void => {
    if (!this.paused) return;
    this.paused = false;
    this.drainQueue();
    this.resumeIfIdle();
  };
}

/**
 * The close code ws closes a stream with after one of its protocol errors
 * (`WS_ERR_*`): 1009 a message over maxPayload, 1007 invalid UTF-8, 1002 a
 * bad frame; undefined for any other error.
 */
export function protocolCloseCode(error: Error): number | undefined {
  const code = (error as { code?: unknown }).code;
  if (typeof code !== 'string' || !code.startsWith('WS_ERR_')) return undefined;
  if (code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') return MESSAGE_TOO_BIG_CLOSE_CODE;
  if (code === 'WS_ERR_INVALID_UTF8') return 1007;
  return 1002;
}

/** The message's seq when it is a valid one, else null (its answer says `"seq":null`). */
function seqOf(message: unknown): number | null {
  if (typeof message !== 'object' || message === null) return null;
  const seq = (message as { seq?: unknown }).seq;
  return typeof seq === 'number' && Number.isSafeInteger(seq) && seq >= 0 ? seq : null;
}

/** Fastify's own wording of a body's validation errors, so that the stream's match the POST's 400s. */
function schemaErrors(errors: ValidationFunction['errors']): string {
  if (!errors || errors.length === 0) return 'body is invalid';
  let text = '';
  for (const error of errors) text += `${text ? ', ' : ''}body${error.instancePath} ${error.message ?? 'is invalid'}`;
  return text;
}
