// One SSE connection of the watch hub (watch.ts), and what it costs when its
// client does not keep up. The rule:
// - an event is serialized once and shared by every stream it goes to;
// - a stream hands its socket at most one slice of 64 Ki characters at a
//   time, the next only once the socket has drained: Node never holds more
//   than one slice of a stream's unsent bytes, whatever the event's size;
// - while the client is slow, a stream keeps at most the newest event per
//   agent it watches (older ones are dropped and counted);
// - when an event of a newer tick arrives and the stream is still more than
//   MAX_WATCH_BYTES_BEHIND (1 MiB) behind, it is closed and counted (`slow`):
//   a client gets one tick (a second) to take what it was sent.

import type { WatchMetrics } from './metrics.js';
import { MAX_WATCH_BYTES_BEHIND, type WatchOwner } from './watchLimits.js';
import type { WatchFormat } from './watchView.js';

/** Where a stream's events go: an HTTP response in production. */
export interface WatchSink {
  /** Returns false when the client is not keeping up (the chunk is still buffered). */
  write(chunk: string): boolean;
  /** Called once when the buffered chunks have been taken. */
  onceDrained(callback: () => void): void;
  end(): void;
  /** Drops the connection at once, unsent bytes and all. Default: end(). */
  destroy?(): void;
}

/** An event as sent, shared by every stream it goes to. */
export interface WatchEvent {
  text: string;
  /** Its UTF-8 length. */
  bytes: number;
  /** The hub's tick it was made in: a stream checks how far behind it is when a newer one arrives. */
  tick: number;
}

/**
 * The most a stream hands its socket at once: four times Node's 16 KiB
 * high-water mark, so a socket that takes everything needs few round trips
 * through 'drain', and a stream's copy in Node stays under 192 KiB (three
 * UTF-8 bytes a character at worst).
 */
const SLICE_CHARS = 64 * 1024;

export function watchEvent(text: string, tick: number): WatchEvent {
  return { text, bytes: Buffer.byteLength(text), tick };
}

/**
 * How a stream's life ends: `open` (writing), `finishing` (its last events
 * queued: it ends once they are written), `ended`.
 */
type StreamState = 'idle' | 'open' | 'finishing' | 'ended';

/** One SSE connection, watching some agents (or every agent). */
export class WatchStream {
  readonly agents = new Set<string>();
  lastPingAt = 0;
  private state: StreamState = 'idle';
  private sink: WatchSink | undefined;
  /** A slice is in the socket's buffer, waiting for 'drain'. */
  private blocked = false;
  /** Events not begun: the newest per agent, in arrival order. */
  private readonly outbox = new Map<string, WatchEvent>();
  /** The event being written, and how far. */
  private current: { event: WatchEvent; offset: number } | undefined;
  /** Bytes of the outbox and of the rest of the current event. */
  private unsentBytes = 0;
  /** The newest tick of an event sent to it. */
  private tick = -1;
  /** Set once the owner's token was revoked. */
  revoked: string | undefined;

  constructor(
    readonly format: WatchFormat,
    /** Every agent, those created later included. */
    readonly all: boolean,
    readonly owner: WatchOwner | undefined,
    private readonly metrics: WatchMetrics,
    /** Called when the stream ends by itself: its client too far behind, or its last events written. */
    private readonly onEnded: (stream: WatchStream) => void = () => undefined,
  ) {}

  get open(): boolean {
    return this.state === 'open';
  }

  connect(sink: WatchSink, now: number): void {
    this.sink = sink;
    this.state = 'open';
    this.lastPingAt = now;
  }

  /** Sends an agent's event, or keeps it as that agent's one pending event while the client is slow. */
  send(agentId: string, event: WatchEvent): void {
    if (this.state !== 'open') return;
    if (event.tick > this.tick) {
      this.tick = event.tick;
      if (this.unsentBytes > MAX_WATCH_BYTES_BEHIND) {
        this.metrics.closedTotal.inc({ reason: 'slow' });
        this.abort();
        this.onEnded(this);
        return;
      }
    }
    this.enqueue(agentId, event);
    this.pump();
  }

  /** A keep-alive; skipped while the client is slow (bytes are waiting for it anyway). */
  ping(now: number): void {
    this.lastPingAt = now;
    if (this.state === 'open' && !this.blocked) this.write(': ping\n\n');
  }

  /**
   * Ends the stream after these last events (what is pending besides is
   * dropped); the one being written is finished first. Returns whether
   * the stream ended already.
   */
  finish(last: readonly [string, WatchEvent][]): boolean {
    if (this.state === 'idle') this.state = 'ended';
    if (this.state !== 'open') return this.state === 'ended';
    this.state = 'finishing';
    for (const event of this.outbox.values()) this.unsentBytes -= event.bytes;
    this.metrics.eventsDroppedTotal.inc(this.outbox.size);
    this.outbox.clear();
    for (const [key, event] of last) this.enqueue(key, event);
    this.pump();
    return (this.state as StreamState) === 'ended';
  }

  /** Ends at once (shutdown): what is pending is not sent. */
  end(): void {
    const sink = this.sink;
    this.forget();
    sink?.end();
  }

  /** Drops the connection at once (a client too slow, or one that would not take its last events). */
  abort(): void {
    const sink = this.sink;
    this.forget();
    if (sink?.destroy) sink.destroy();
    else sink?.end();
  }

  /** Forgets the client without ending it (it went away). */
  detach(): void {
    this.forget();
  }

  private forget(): void {
    this.sink = undefined;
    this.state = 'ended';
    this.outbox.clear();
    this.current = undefined;
    this.unsentBytes = 0;
  }

  private enqueue(key: string, event: WatchEvent): void {
    const replaced = this.outbox.get(key);
    if (replaced) {
      this.outbox.delete(key);
      this.unsentBytes -= replaced.bytes;
      this.metrics.eventsDroppedTotal.inc();
    }
    this.outbox.set(key, event);
    this.unsentBytes += event.bytes;
  }

  /** Writes slices while the socket takes them; a finishing stream ends once all is written. */
  private pump(): void {
    while (this.sink && !this.blocked) {
      if (!this.current) {
        const next = this.outbox.entries().next();
        if (next.done) {
          if (this.state === 'finishing') {
            this.end();
            this.onEnded(this);
          }
          return;
        }
        const [key, event] = next.value;
        this.outbox.delete(key);
        this.current = { event, offset: 0 };
        this.metrics.eventsSentTotal.inc();
      }
      const { event, offset } = this.current;
      const end = sliceEnd(event.text, offset);
      const whole = offset === 0 && end === event.text.length;
      const slice = whole ? event.text : event.text.slice(offset, end);
      this.unsentBytes -= whole ? event.bytes : Buffer.byteLength(slice);
      if (end === event.text.length) this.current = undefined;
      else this.current.offset = end;
      this.write(slice);
    }
  }

  private write(chunk: string): void {
    if (this.sink!.write(chunk)) return;
    this.blocked = true;
    this.sink!.onceDrained(() => {
      this.blocked = false;
      this.pump();
    });
  }
}

/** Where the slice from `start` ends: SLICE_CHARS on, never between the two halves of a surrogate pair. */
function sliceEnd(text: string, start: number): number {
  let end = Math.min(text.length, start + SLICE_CHARS);
  if (end < text.length) {
    const last = text.charCodeAt(end - 1);
    if (last >= 0xd800 && last <= 0xdbff) end--;
  }
  return end;
}
