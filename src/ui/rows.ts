// What one agent's row shows: the item and agent shapes the API sends, the
// stale rule re-applied as ages grow, and the row and chip elements. Rows
// and chips remember what they last wrote, so that a render touches the DOM
// only where the text, class or tooltip differs from what is shown; at
// thousands of agents that is most of the cost saved. There is one row per
// agent and one chip per key, so a report moves or replaces nothing.

import { element } from './dom.js';

export interface Item {
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

export interface AgentInfo {
  id: string;
  name: string;
  created_at: string;
  last_reported_at: string | null;
  declared_keys: number;
}

type Status = 'reporting' | 'stale' | 'never';

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

export class AgentRow {
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
