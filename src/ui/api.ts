// The admin API as the page uses it, and the session that keeps its event
// stream open. Everything goes through fetch (EventSource cannot send a
// header) so that the admin token travels in a header, never in a URL. A
// session reads the agent list on every connect while events already flow,
// so nothing created or deleted in between is missed, and reconnects with a
// jittered backoff; a refused token ends it and the page asks again.

import { Fleet } from './fleet.js';
import type { AgentInfo, Item } from './rows.js';
import { SseParser, type SseEvent } from './sse.js';

const PAGE_SIZE = 500;
const TICK_MS = 1000;
/** Pings come every 15 s and data at least every 5 s: this long without a byte means the stream is dead. */
const SILENCE_MS = 45_000;
const BACKOFF_MS = [1000, 2000, 5000, 10_000, 30_000];

class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }

  get unauthorized(): boolean {
    return this.status === 401 || this.status === 403;
  }

  get adminDisabled(): boolean {
    return this.status === 403 && this.message.startsWith('admin API disabled');
  }
}

async function apiError(res: Response): Promise<ApiError> {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = (await res.json()) as { error?: unknown };
    if (typeof body.error === 'string') message = body.error;
  } catch {
    // not JSON
  }
  return new ApiError(res.status, message);
}

/** The admin API, with the token in a header. */
export class Api {
  constructor(private readonly token: string) {}

  async json(path: string, signal?: AbortSignal): Promise<unknown> {
    const res = await fetch(path, { headers: this.headers(), cache: 'no-store', signal: signal ?? null });
    if (!res.ok) throw await apiError(res);
    return res.json();
  }

  /** Every agent, page by page. */
  async *agents(signal: AbortSignal): AsyncGenerator<AgentInfo[]> {
    let cursor: string | undefined;
    do {
      const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
      if (cursor !== undefined) query.set('cursor', cursor);
      const page = (await this.json(`/v1/agents?${query.toString()}`, signal)) as {
        agents: AgentInfo[];
        next_cursor?: string;
      };
      yield page.agents;
      cursor = page.next_cursor;
    } while (cursor !== undefined);
  }

  /** One agent; undefined when it is gone. */
  async agent(id: string): Promise<AgentInfo | undefined> {
    try {
      return (await this.json(`/v1/agents/${encodeURIComponent(id)}`)) as AgentInfo;
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return undefined;
      throw err;
    }
  }

  async watch(signal: AbortSignal): Promise<Response> {
    const res = await fetch('/v1/agents/metadata/watch', {
      method: 'POST',
      headers: { ...this.headers(), 'content-type': 'application/json', accept: 'text/event-stream' },
      body: JSON.stringify({ all: true }),
      cache: 'no-store',
      signal,
    });
    if (!res.ok) throw await apiError(res);
    if (!res.body) throw new Error('the watch answered without a body');
    return res;
  }

  private headers(): Record<string, string> {
    return { authorization: `Bearer ${this.token}` };
  }
}

/** What a session tells the page, and hears from it (the page's Ui). */
export interface SessionView {
  onFilter: (text: string) => void;
  status(text: string, state?: 'up' | 'down' | ''): void;
  statusText(): string;
  adminDisabled(): void;
  signIn(message: string): void;
}

/** One signed-in session: the stream, kept open with a backoff, and the list read on each connect. */
export class Session {
  private readonly fleet: Fleet;
  private readonly timer: number;
  private controller = new AbortController();
  private stopped = false;
  private failures = 0;

  constructor(
    private readonly api: Api,
    private readonly ui: SessionView,
  ) {
    this.fleet = new Fleet(api);
    ui.onFilter = (text) => this.fleet.setFilter(text);
    this.timer = window.setInterval(() => this.fleet.tick(), TICK_MS);
    void this.run();
  }

  stop(): void {
    this.stopped = true;
    window.clearInterval(this.timer);
    this.controller.abort();
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      this.controller = new AbortController();
      try {
        await this.connect(this.controller.signal);
        if (this.stopped) return;
        this.ui.status('stream ended');
      } catch (err) {
        if (this.stopped) return;
        if (err instanceof ApiError && err.unauthorized) {
          this.stop();
          if (err.adminDisabled) this.ui.adminDisabled();
          else this.ui.signIn(`Wrong token: ${err.message}.`);
          return;
        }
        this.ui.status(`disconnected: ${err instanceof Error ? err.message : String(err)}`);
      } finally {
        this.controller.abort();
      }
      const base = BACKOFF_MS[Math.min(this.failures, BACKOFF_MS.length - 1)]!;
      this.failures++;
      const delay = Math.round(base * (0.8 + Math.random() * 0.4));
      this.ui.status(`${this.ui.statusText()}; reconnecting in ${Math.ceil(delay / 1000)} s`, 'down');
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  /** Opens the stream, then reads the list while events flow; resolves when the stream ends. */
  private async connect(signal: AbortSignal): Promise<void> {
    this.ui.status('connecting…');
    const res = await this.api.watch(signal);
    const seen = new Set<string>();
    let listed = false;
    let failure: Error | undefined;
    const parser = new SseParser((event) => {
      this.failures = 0;
      this.onEvent(event, seen, listed);
    });
    const listing = this.list(signal, seen).then(
      () => {
        listed = true;
        this.ui.status('live', 'up');
      },
      (err: unknown) => {
        // A failed list fails the connection: the next one lists again.
        if (!signal.aborted) failure = err instanceof Error ? err : new Error(String(err));
        this.controller.abort();
      },
    );
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let silence = window.setTimeout(() => this.controller.abort(), SILENCE_MS);
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        window.clearTimeout(silence);
        silence = window.setTimeout(() => this.controller.abort(), SILENCE_MS);
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch (err) {
      if (failure === undefined && !this.stopped) {
        failure = signal.aborted ? new Error('no data for 45 s') : err instanceof Error ? err : new Error(String(err));
      }
    } finally {
      window.clearTimeout(silence);
    }
    await listing;
    if (failure !== undefined) throw failure;
  }

  /** Every agent, page by page; then drops those gone while we were away and names the newcomers. */
  private async list(signal: AbortSignal, seen: Set<string>): Promise<void> {
    const listed = new Set<string>();
    for await (const page of this.api.agents(signal)) {
      for (const info of page) {
        listed.add(info.id);
        this.fleet.info(info);
      }
    }
    this.fleet.keepOnly(new Set([...listed, ...seen]));
    this.fleet.nameTheUnnamed();
  }

  private onEvent(event: SseEvent, seen: Set<string>, listed: boolean): void {
    if (event.event === 'data') {
      const body = JSON.parse(event.data) as { agent_id: string; metadata: Item[] };
      seen.add(body.agent_id);
      this.fleet.data(body.agent_id, body.metadata, listed);
    } else if (event.event === 'deleted') {
      const body = JSON.parse(event.data) as { agent_id: string };
      this.fleet.remove(body.agent_id);
    }
  }
}
