// The one Server-Sent Events client of the tests: reads a watch stream in
// the background, as a browser does, and keeps each event as sent (and the
// text as received, pings included). Also a raw socket that sends a watch
// request and never reads (a stalled client).

import net from 'node:net';

export interface SseEvent<T = unknown> {
  type: string;
  data: T;
}

export interface SseStream<T = unknown> {
  status: number;
  headers: Headers;
  /** The JSON body of an answer other than 200. */
  error: unknown;
  events: SseEvent<T>[];
  /** Resolves when the service ends the stream. */
  ended: Promise<void>;
  /** Resolves with the first event of this type (already received or to come). */
  next(type: string): Promise<SseEvent<T>>;
  /**
   * Resolves with the next event of this type after the one the last read()
   * returned (already received or to come); events in between are passed over.
   */
  read(type: string): Promise<SseEvent<T>>;
  /** Everything received so far, as sent (pings included). */
  raw(): string;
  close(): void;
}

export interface SseOptions<T> {
  method?: string;
  /** Sent as JSON. */
  body?: unknown;
  /** Called with each event as it arrives (to time it, say). */
  onEvent?: (event: SseEvent<T>) => void;
}

export async function openSse<T = unknown>(
  url: string,
  token: string,
  init: SseOptions<T> = {},
): Promise<SseStream<T>> {
  const controller = new AbortController();
  const res = await fetch(url, {
    method: init.method ?? 'GET',
    headers: {
      authorization: `Bearer ${token}`,
      ...(init.body === undefined ? {} : { 'content-type': 'application/json' }),
    },
    ...(init.body === undefined ? {} : { body: JSON.stringify(init.body) }),
    signal: controller.signal,
  });
  const events: SseEvent<T>[] = [];
  const waiters: (() => void)[] = [];
  const wake = () => waiters.splice(0).forEach((w) => w());
  let isEnded = false;
  let resolveEnded: () => void = () => undefined;
  const ended = new Promise<void>((resolve) => (resolveEnded = resolve));
  const markEnded = () => {
    isEnded = true;
    resolveEnded();
  };
  let error: unknown;
  let raw = '';
  if (res.status === 200) {
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    void (async () => {
      let buffer = '';
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          raw += value;
          for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
            const event = /^event: (\w+)\ndata: (.*)$/s.exec(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
            if (!event) continue;
            const parsed = { type: event[1]!, data: JSON.parse(event[2]!) as T };
            events.push(parsed);
            init.onEvent?.(parsed);
          }
          wake();
        }
      } catch {
        // aborted
      }
      markEnded();
      wake();
    })();
  } else {
    error = await res.json();
    markEnded();
  }
  /** The first event of this type from `from` on, and its index, once there is one. */
  const first = async (type: string, from: number): Promise<[SseEvent<T>, number]> => {
    for (;;) {
      const index = events.findIndex((e, i) => i >= from && e.type === type);
      if (index >= 0) return [events[index]!, index];
      if (isEnded) throw new Error(`the stream ended without an event ${type}`);
      await new Promise<void>((resolve) => waiters.push(resolve));
    }
  };
  let readUpTo = 0;
  return {
    status: res.status,
    headers: res.headers,
    error,
    events,
    ended,
    next: async (type) => (await first(type, 0))[0],
    async read(type) {
      const [event, index] = await first(type, readUpTo);
      readUpTo = index + 1;
      return event;
    },
    raw: () => raw,
    close: () => controller.abort(),
  };
}

/** A client that sends a watch request and never reads what comes back. */
export async function stalledWatch(base: string, path: string, token: string): Promise<net.Socket> {
  const socket = net.connect(Number(new URL(base).port), '127.0.0.1');
  await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  socket.pause();
  socket.write(`GET ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n\r\n`);
  return socket;
}
