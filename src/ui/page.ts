// The live page: every agent with its metadata, from GET /v1/agents (paged)
// and the POST /v1/agents/metadata/watch event stream, read with fetch so that
// the admin token travels in a header, never in a URL.
//
// Cheap at thousands of agents: events only change the model and mark the
// agent dirty; one requestAnimationFrame pass writes the DOM of the dirty
// agents (within a time budget, the rest next frame), and each write happens
// only when the text, class or tooltip differs from what is shown. There is
// one row per agent, keyed by id, and one chip per key. Ages tick every
// second from the age at receipt, but only rows on screen (an
// IntersectionObserver says which) get their age text rewritten; a row
// scrolled into view is brought up to date then. Off-screen rows skip layout
// and paint (CSS content-visibility).

import { SseParser, type SseEvent } from './sse.js';

interface Item {
  key: string;
  display_name: string;
  display_order: number;
  interval: number;
  timeout: number;
  value: string;
  error: string;
  collected_at: string;
  /** Whole seconds when the event was sent. */
  age: number;
  stale: boolean;
  pending?: true;
}

interface AgentInfo {
  id: string;
  name: string;
  created_at: string;
  last_reported_at: string | null;
  declared_keys: number;
}

type Status = 'reporting' | 'stale' | 'never';

const TOKEN_KEY = 'metabatch.adminToken';
const PAGE_SIZE = 500;
const TICK_MS = 1000;
/** Pings come every 15 s and data at least every 5 s: this long without a byte means the stream is dead. */
const SILENCE_MS = 45_000;
const BACKOFF_MS = [1000, 2000, 5000, 10_000, 30_000];
/** DOM work per animation frame before the rest waits for the next one. */
const FRAME_BUDGET_MS = 8;
const NAME_FETCHES_AT_ONCE = 4;

/** The server's rule (src/watch.ts isStale), re-applied as ages grow. */
function isStale(interval: number, timeout: number, age: number): boolean {
  return interval > 0 && age > Math.max(interval + 2 * timeout, 5);
}

function formatAge(seconds: number): string {
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  if (seconds < 86_400) return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
  return `${Math.floor(seconds / 86_400)}d`;
}

function element<K extends keyof HTMLElementTagNameMap>(tag: K, className: string): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  el.className = className;
  return el;
}

function byId<T extends HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} is missing from index.html`);
  return el as T;
}

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

/** What one chip shows, to compare with what it shows already. */
class Chip {
  readonly el = element('span', 'item');
  private readonly label = element('span', 'k');
  private readonly value = element('span', 'v');
  private readonly error = element('span', 'err');
  private readonly age = element('span', 'age');
  private shown = { label: '', value: '', error: '', age: '', cls: '', title: '' };

  constructor(key: string) {
    this.el.dataset.key = key;
    this.error.hidden = true;
    this.el.append(this.label, this.value, this.error, this.age);
  }

  update(item: Item, age: number, stale: boolean, onScreen: boolean): void {
    const label = item.display_name || item.key;
    const value = item.pending ? 'pending' : item.value;
    const cls = `item${item.pending ? ' pending' : ''}${stale ? ' stale' : ''}${item.error ? ' has-error' : ''}`;
    if (label !== this.shown.label) this.label.textContent = this.shown.label = label;
    if (value !== this.shown.value) this.value.textContent = this.shown.value = value;
    if (item.error !== this.shown.error) {
      this.error.textContent = this.shown.error = item.error;
      this.error.hidden = item.error === '';
    }
    if (cls !== this.shown.cls) this.el.className = this.shown.cls = cls;
    // Ages and tooltips change every second: written for rows on screen only.
    if (!onScreen) return;
    const ageText = item.pending ? '' : formatAge(age);
    if (ageText !== this.shown.age) this.age.textContent = this.shown.age = ageText;
    const title = tooltip(item, age, stale);
    if (title !== this.shown.title) this.el.title = this.shown.title = title;
  }
}

function tooltip(item: Item, age: number, stale: boolean): string {
  const limit = Math.max(item.interval + 2 * item.timeout, 5);
  const schedule =
    item.interval > 0
      ? `interval ${item.interval} s, timeout ${item.timeout} s: stale after max(interval + 2 × timeout, 5) = ${limit} s`
      : 'no interval: never stale';
  const lines = [item.key];
  if (item.pending) lines.push('never reported');
  else if (stale) lines.push(`stale: age ${age} s, ${schedule}`);
  else lines.push(`age ${age} s (collected ${item.collected_at}), ${schedule}`);
  if (item.error) lines.push(`error: ${item.error}`);
  return lines.join('\n');
}

class AgentRow {
  readonly el = element('div', 'agent');
  private readonly dot = element('span', 'dot');
  private readonly nameEl = element('span', 'name');
  private readonly itemsEl = element('div', 'items');
  private readonly chips = new Map<string, Chip>();
  name: string;
  sortKey: string;
  named = false;
  /** Declared keys before the first event (from the agent list). */
  declaredKeys = 0;
  lastReportedAt: string | null = null;
  items: Item[] = [];
  hasData = false;
  /** performance.now() when `items` arrived. */
  receivedAt = 0;
  /** Stale flags per item, at the last tick. */
  staleFlags: boolean[] = [];
  status: Status = 'never';
  onScreen = false;
  /** The item list changed since it was rendered (keys added, removed or reordered). */
  itemsChanged = true;
  shownName = '';
  shownStatus = '';
  shownHidden = false;

  constructor(readonly id: string) {
    this.name = id;
    this.sortKey = `\uffff${id}`;
    this.el.dataset.id = id;
    this.el.setAttribute('role', 'listitem');
    const who = element('div', 'who');
    const idEl = element('span', 'id');
    idEl.textContent = id.slice(0, 8);
    idEl.title = id;
    who.append(this.dot, this.nameEl, idEl);
    this.el.append(who, this.itemsEl);
  }

  setName(name: string): void {
    this.name = name;
    this.named = true;
    this.sortKey = `${name.toLowerCase()}\u0000${this.id}`;
  }

  ageOf(index: number, now: number): number {
    const item = this.items[index]!;
    return item.age + Math.floor((now - this.receivedAt) / 1000);
  }

  /** Re-applies the stale rule at `now`; true when a flag or the status changed. */
  recompute(now: number): boolean {
    let changed = false;
    let reported = false;
    let anyStale = false;
    this.items.forEach((item, i) => {
      const stale = !item.pending && isStale(item.interval, item.timeout, this.ageOf(i, now));
      if (stale !== this.staleFlags[i]) changed = true;
      this.staleFlags[i] = stale;
      if (!item.pending) reported = true;
      if (stale) anyStale = true;
    });
    if (!this.hasData) reported = this.lastReportedAt !== null;
    const status: Status = !reported ? 'never' : anyStale ? 'stale' : 'reporting';
    if (status !== this.status) changed = true;
    this.status = status;
    return changed;
  }

  render(now: number): void {
    if (this.name !== this.shownName) this.nameEl.textContent = this.shownName = this.name;
    this.nameEl.classList.toggle('unnamed', !this.named);
    if (this.status !== this.shownStatus) {
      this.shownStatus = this.status;
      this.el.dataset.status = this.status;
      this.dot.title =
        this.status === 'never' ? 'never reported' : this.status === 'stale' ? 'some values are stale' : 'reporting';
    }
    if (!this.hasData) {
      if (this.itemsChanged) {
        this.itemsChanged = false;
        this.itemsEl.textContent = this.declaredKeys === 0 ? 'no keys declared' : `${this.declaredKeys} keys…`;
      }
      return;
    }
    if (this.itemsChanged) this.placeChips();
    this.items.forEach((item, i) => {
      this.chips.get(item.key)!.update(item, this.ageOf(i, now), this.staleFlags[i] ?? false, this.onScreen);
    });
  }

  /** One chip per key, in the list's order; moves and removes only what differs. */
  private placeChips(): void {
    this.itemsChanged = false;
    const keys = new Set(this.items.map((item) => item.key));
    for (const [key, chip] of this.chips) {
      if (!keys.has(key)) {
        chip.el.remove();
        this.chips.delete(key);
      }
    }
    if (this.chips.size === 0) this.itemsEl.textContent = '';
    if (this.items.length === 0) {
      this.itemsEl.textContent = 'no keys declared';
      return;
    }
    let next: ChildNode | null = this.itemsEl.firstChild;
    for (const item of this.items) {
      let chip = this.chips.get(item.key);
      if (!chip) {
        chip = new Chip(item.key);
        this.chips.set(item.key, chip);
      }
      if (chip.el !== next) this.itemsEl.insertBefore(chip.el, next);
      next = chip.el.nextSibling;
    }
  }
}

/** Every agent shown, in name order, and what the next frame must write. */
class Fleet {
  private readonly agents = new Map<string, AgentRow>();
  /** Ordered by sortKey. */
  private readonly order: AgentRow[] = [];
  private readonly deleted = new Set<string>();
  private readonly dirty = new Set<AgentRow>();
  private orderChanged = false;
  private filterChanged = false;
  private countsChanged = true;
  private filter = '';
  private frame = 0;
  private readonly observer: IntersectionObserver;
  private readonly list = byId('agents');
  private readonly empty = byId('empty');
  private readonly counts = {
    reporting: byId('count-reporting'),
    stale: byId('count-stale'),
    never: byId('count-never'),
    shown: byId('count-shown'),
  };
  private shownCounts = '';
  /** Agents whose name is still to be fetched, and how many fetches run. */
  private readonly unnamed: string[] = [];
  private fetching = 0;

  constructor(private readonly api: Api) {
    this.observer = new IntersectionObserver(
      (entries) => {
        for (const entry of entries) {
          const agent = this.agents.get((entry.target as HTMLElement).dataset.id ?? '');
          if (!agent) continue;
          agent.onScreen = entry.isIntersecting;
          if (agent.onScreen) this.markDirty(agent);
        }
      },
      { rootMargin: '200px 0px' },
    );
  }

  get size(): number {
    return this.agents.size;
  }

  ids(): string[] {
    return [...this.agents.keys()];
  }

  has(id: string): boolean {
    return this.agents.has(id);
  }

  setFilter(text: string): void {
    this.filter = text.trim().toLowerCase();
    this.filterChanged = true;
    this.schedule();
  }

  /** From the agent list (or GET /v1/agents/{id}). */
  info(info: AgentInfo): void {
    if (this.deleted.has(info.id)) return;
    let agent = this.agents.get(info.id);
    if (!agent) agent = this.add(info.id, info.name);
    else if (!agent.named || agent.name !== info.name) {
      agent.setName(info.name);
      this.reposition(agent);
    }
    agent.declaredKeys = info.declared_keys;
    agent.lastReportedAt = info.last_reported_at;
    if (!agent.hasData) agent.itemsChanged = true;
    agent.recompute(performance.now());
    this.markDirty(agent);
  }

  /** An `event: data` of the stream. */
  data(agentId: string, items: Item[], listed: boolean): void {
    if (this.deleted.has(agentId)) return;
    let agent = this.agents.get(agentId);
    if (!agent) {
      agent = this.add(agentId);
      // Created after the list was read (or the list is still being read: named then).
      if (listed) this.fetchName(agentId);
    }
    const before = agent.items;
    agent.itemsChanged ||=
      !agent.hasData || before.length !== items.length || items.some((item, i) => item.key !== before[i]?.key);
    agent.items = items;
    agent.hasData = true;
    agent.receivedAt = performance.now();
    agent.staleFlags = [];
    agent.recompute(agent.receivedAt);
    this.markDirty(agent);
  }

  remove(agentId: string): void {
    this.deleted.add(agentId);
    const agent = this.agents.get(agentId);
    if (!agent) return;
    this.agents.delete(agentId);
    this.dirty.delete(agent);
    this.observer.unobserve(agent.el);
    agent.el.remove();
    const index = this.indexOf(agent);
    if (this.order[index] === agent) this.order.splice(index, 1);
    this.countsChanged = true;
    this.schedule();
  }

  /** After a (re)connect's full list: agents neither listed nor streamed since are gone. */
  keepOnly(present: Set<string>): void {
    for (const id of this.ids()) if (!present.has(id)) this.remove(id);
  }

  /** Names agents the list did not have (created since it was read). */
  nameTheUnnamed(): void {
    for (const agent of this.agents.values()) if (!agent.named) this.fetchName(agent.id);
  }

  /** Once a second: ages grow, values go stale. */
  tick(): void {
    const now = performance.now();
    for (const agent of this.agents.values()) {
      if (!agent.hasData) continue;
      const changed = agent.recompute(now);
      if (changed) this.countsChanged = true;
      if (changed || agent.onScreen) this.dirty.add(agent);
    }
    this.schedule();
  }

  private add(id: string, name?: string): AgentRow {
    const agent = new AgentRow(id);
    if (name !== undefined) agent.setName(name);
    this.agents.set(id, agent);
    this.order.splice(this.indexOf(agent), 0, agent);
    this.orderChanged = true;
    this.filterChanged = true;
    this.observer.observe(agent.el);
    return agent;
  }

  private reposition(agent: AgentRow): void {
    const at = this.order.indexOf(agent);
    if (at !== -1) this.order.splice(at, 1);
    this.order.splice(this.indexOf(agent), 0, agent);
    this.orderChanged = true;
    this.filterChanged = true;
  }

  /** Where the agent belongs in `order` (binary search by sortKey). */
  private indexOf(agent: AgentRow): number {
    let low = 0;
    let high = this.order.length;
    while (low < high) {
      const mid = (low + high) >>> 1;
      const other = this.order[mid]!;
      if (other.sortKey < agent.sortKey || (other.sortKey === agent.sortKey && other.id < agent.id)) low = mid + 1;
      else high = mid;
    }
    return low;
  }

  private fetchName(id: string): void {
    if (!this.unnamed.includes(id)) this.unnamed.push(id);
    this.pumpNames();
  }

  /** A few GET /v1/agents/{id} at a time. */
  private pumpNames(): void {
    while (this.fetching < NAME_FETCHES_AT_ONCE && this.unnamed.length > 0) {
      const id = this.unnamed.shift()!;
      if (!this.agents.has(id)) continue;
      this.fetching++;
      void this.api
        .agent(id)
        .then(
          (info) => (info ? this.info(info) : this.remove(id)),
          () => undefined, // named by the next reconnect's list
        )
        .finally(() => {
          this.fetching--;
          this.pumpNames();
        });
    }
  }

  private markDirty(agent: AgentRow): void {
    this.dirty.add(agent);
    this.countsChanged = true;
    this.schedule();
  }

  private schedule(): void {
    if (this.frame === 0) this.frame = requestAnimationFrame(() => this.flush());
  }

  /** One frame's DOM writes. */
  private flush(): void {
    this.frame = 0;
    const start = performance.now();
    if (this.orderChanged) this.placeRows();
    if (this.filterChanged) this.applyFilter();
    if (this.countsChanged) this.writeCounts();
    for (const agent of this.dirty) {
      this.dirty.delete(agent);
      agent.render(start);
      if (performance.now() - start > FRAME_BUDGET_MS) break;
    }
    if (this.dirty.size > 0) this.schedule();
  }

  /** Rows in `order`: walks from the end, inserting only rows not already before their successor. */
  private placeRows(): void {
    this.orderChanged = false;
    let next: HTMLElement | null = null;
    for (let i = this.order.length - 1; i >= 0; i--) {
      const el = this.order[i]!.el;
      if (el.parentNode !== this.list || el.nextSibling !== next) this.list.insertBefore(el, next);
      next = el;
    }
  }

  private applyFilter(): void {
    this.filterChanged = false;
    this.countsChanged = true;
    for (const agent of this.order) {
      const hidden = this.filter !== '' && !agent.name.toLowerCase().includes(this.filter);
      if (hidden !== agent.shownHidden) agent.el.hidden = agent.shownHidden = hidden;
    }
  }

  private writeCounts(): void {
    this.countsChanged = false;
    const counts = { reporting: 0, stale: 0, never: 0 };
    let shown = 0;
    for (const agent of this.order) {
      counts[agent.status]++;
      if (!agent.shownHidden) shown++;
    }
    const shownText = this.filter === '' ? `${this.order.length} agents` : `showing ${shown} of ${this.order.length}`;
    const key = `${counts.reporting}/${counts.stale}/${counts.never}/${shownText}`;
    if (key === this.shownCounts) return;
    this.shownCounts = key;
    this.counts.reporting.textContent = String(counts.reporting);
    this.counts.stale.textContent = String(counts.stale);
    this.counts.never.textContent = String(counts.never);
    this.counts.shown.textContent = shownText;
    this.empty.hidden = this.order.length > 0;
  }
}

/** The admin API, with the token in a header. */
class Api {
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

/** One signed-in session: the stream, kept open with a backoff, and the list read on each connect. */
class Session {
  private readonly fleet: Fleet;
  private readonly timer: number;
  private controller = new AbortController();
  private stopped = false;
  private failures = 0;

  constructor(
    private readonly api: Api,
    private readonly ui: Ui,
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

/** The page's panels: disabled, sign-in, or the fleet. */
class Ui {
  onFilter: (text: string) => void = () => undefined;
  private readonly statusEl = byId('status');
  private readonly signOut = byId<HTMLButtonElement>('sign-out');
  private readonly form = byId<HTMLFormElement>('sign-in');
  private readonly tokenInput = byId<HTMLInputElement>('token');
  private readonly formError = byId('sign-in-error');
  private readonly fleet = byId('fleet');
  private readonly filter = byId<HTMLInputElement>('filter');
  private session: Session | undefined;

  constructor() {
    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      const token = this.tokenInput.value.trim();
      if (token === '') return;
      this.tokenInput.value = '';
      sessionStorage.setItem(TOKEN_KEY, token);
      this.start(token);
    });
    this.signOut.addEventListener('click', () => this.signIn(''));
    this.filter.addEventListener('input', () => this.onFilter(this.filter.value));
  }

  begin(): void {
    if (document.body.dataset.admin === 'disabled') return this.adminDisabled();
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) this.start(token);
    else this.signIn('');
  }

  adminDisabled(): void {
    this.show('disabled');
    this.status('admin API disabled', 'down');
  }

  signIn(message: string): void {
    this.session?.stop();
    this.session = undefined;
    sessionStorage.removeItem(TOKEN_KEY);
    byId('agents').textContent = '';
    this.formError.textContent = message;
    this.show('sign-in');
    this.status(message ? 'signed out' : '');
    this.tokenInput.focus();
  }

  status(text: string, state: 'up' | 'down' | '' = ''): void {
    this.statusEl.textContent = text;
    this.statusEl.dataset.state = state;
  }

  statusText(): string {
    return this.statusEl.textContent ?? '';
  }

  private start(token: string): void {
    this.session?.stop();
    byId('agents').textContent = '';
    this.show('fleet');
    this.filter.value = '';
    this.session = new Session(new Api(token), this);
  }

  private show(panel: 'disabled' | 'sign-in' | 'fleet'): void {
    byId('disabled').hidden = panel !== 'disabled';
    this.form.hidden = panel !== 'sign-in';
    this.fleet.hidden = panel !== 'fleet';
    this.signOut.hidden = panel !== 'fleet';
  }
}

new Ui().begin();
