// The live page: every agent with its metadata, from GET /v1/agents (paged)
// and the POST /v1/agents/metadata/watch event stream, read with fetch so that
// the admin token travels in a header, never in a URL.
//
// This module is the page's panels (admin API disabled, sign-in, the fleet)
// and its start-up; index.html loads it and the browser fetches the rest:
// rows.ts (one agent's row), fleet.ts (all rows and their DOM writes),
// api.ts (the API and the session's stream) and sse.ts (the stream parser).

import { Api, Session } from './api.js';
import { byId } from './dom.js';

const TOKEN_KEY = 'metabatch.adminToken';

/** The page's panels: disabled, sign-in, or the fleet. */
export class Ui {
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
