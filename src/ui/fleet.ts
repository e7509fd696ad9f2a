// Every agent row, in name order, and the DOM writes they wait for. It keeps
// the page cheap at thousands of agents: events only change the model and
// mark the agent dirty; one requestAnimationFrame pass writes the DOM of the
// dirty agents (within a time budget, the rest next frame). Ages tick every
// second from the age at receipt, but only rows on screen (an
// IntersectionObserver says which) get their age text rewritten; a row
// scrolled into view is brought up to date then. Off-screen rows skip layout
// and paint (CSS content-visibility).

import { byId } from './dom.js';
import { AgentRow, type AgentInfo, type Item } from './rows.js';

/** Where the fleet gets the name of an agent that joined later (GET /v1/agents/{id}); undefined once deleted. */
export interface AgentLookup {
  agent(id: string): Promise<AgentInfo | undefined>;
}

/** DOM work per animation frame before the rest waits for the next one. */
const FRAME_BUDGET_MS = 8;
const NAME_FETCHES_AT_ONCE = 4;

/** Every agent shown, in name order, and what the next frame must write. */
export class Fleet {
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

  constructor(private readonly api: AgentLookup) {
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
