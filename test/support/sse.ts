// A Server-Sent Events client for tests: reads a watch stream in the
// background, as a browser does, and keeps each event as sent. Also a raw
// socket that sends a watch request and never reads (a stalled client).

import net from 'node:net';

export interface SseEvent {
  type: string;
  data: unknown;
}

export interface SseStream {
  status: number;
  /** The JSON body of an answer other than 200. */
  error: unknown;
  events: SseEvent[];
  /** Resolves when the service ends the stream. */
  ended: Promise<void>;
  /** Resolves with the first event of this type (already received or to come). */
  next(type: string): Promise<SseEvent>;
  close(): void;
}

export async function openSse(
  url: string,
  token: string,
  init: { method?: string; body?: unknown } = {},
): Promise<SseStream> {
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
  const events: SseEvent[] = [];
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
  if (res.status === 200) {
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    void (async () => {
      let buffer = '';
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
            const event = /^event: (\w+)\ndata: (.*)$/s.exec(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
            if (event) events.push({ type: event[1]!, data: JSON.parse(event[2]!) });
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
  return {
    status: res.status,
    error,
    events,
    ended,
    async next(type) {
      for (;;) {
        const found = events.find((e) => e.type === type);
        if (found) return found;
        if (isEnded) throw new Error(`the stream ended without an event ${type}`);
        await new Promise<void>((resolve) => waiters.push(resolve));
      }
    },
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
