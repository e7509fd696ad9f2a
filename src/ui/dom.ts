// Two DOM helpers that the rows, the fleet and the page's panels all use,
// kept in a module of their own so that none of those imports another just
// for them. byId throws, so that an index.html out of step with the script
// fails at start-up rather than on some later event.

export function element<K extends keyof HTMLElementTagNameMap>(tag: K, className: string): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  el.className = className;
  return el;
}

export function byId<T extends HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} is missing from index.html`);
  return el as T;
}
