// What the dashboard and alert tests share: Debian's promtool (or how to get
// it), the metric selectors a PromQL expression reads, the samples a real
// service exposes at /metrics once a flush has happened, and the check that
// what they read is exposed and read as its type wants.

import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'vitest';
import { ROOT } from './process.js';
import type { ServiceHarness } from './service.js';

function findPromtool(): string | undefined {
  const dirs = ['/usr/bin', ...(process.env.PATH ?? '').split(path.delimiter).filter(Boolean)];
  for (const dir of dirs) {
    const candidate = path.join(dir, 'promtool');
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Debian's promtool (package `prometheus`), or undefined when it is not installed. */
export const PROMTOOL = findPromtool();
export const PROMTOOL_MISSING =
  'no promtool: install it with `apt-get install -y prometheus` to run the promtool checks';

export interface PromtoolResult {
  code: number;
  output: string;
}

/** Runs promtool from the repository's root; resolves with its exit code and output, whatever they are. */
export function promtool(args: string[]): Promise<PromtoolResult> {
  const bin = PROMTOOL;
  if (!bin) throw new Error(PROMTOOL_MISSING);
  return new Promise((resolve) => {
    execFile(bin, args, { cwd: ROOT }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
      resolve({ code, output: `${stdout}${stderr}` });
    });
  });
}

// PromQL, as far as these tests need it: which metrics an expression reads,
// with their label matchers, range, and the function they are an argument of.

export interface Selector {
  /** The metric name, as written (a histogram's bucket series is `x_bucket`). */
  name: string;
  /** What is between the braces, or undefined without braces. */
  matchers: string | undefined;
  /** What is between the brackets of a range selector, or undefined. */
  range: string | undefined;
  /** The function whose direct argument the selector is (`rate`, `avg_over_time`, …), or undefined. */
  fn: string | undefined;
}

type Token = { kind: 'ident' | 'matchers' | 'range' | 'string' | 'number' | 'punct'; text: string };

/** The contents up to the bracket closing the one at `start`, skipping quoted strings. */
function bracketed(expr: string, start: number, close: string): { text: string; end: number } {
  let i = start + 1;
  while (i < expr.length && expr[i] !== close) {
    const c = expr[i]!;
    if (c === '"' || c === "'" || c === '`') {
      i++;
      while (i < expr.length && expr[i] !== c) i += expr[i] === '\\' && c !== '`' ? 2 : 1;
    }
    i++;
  }
  if (i >= expr.length) throw new Error(`unclosed ${expr[start]} in ${expr}`);
  return { text: expr.slice(start + 1, i), end: i + 1 };
}

function tokenize(expr: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  while (i < expr.length) {
    const c = expr[i]!;
    if (/\s/.test(c)) {
      i++;
    } else if (c === '{') {
      const { text, end } = bracketed(expr, i, '}');
      tokens.push({ kind: 'matchers', text });
      i = end;
    } else if (c === '[') {
      const { text, end } = bracketed(expr, i, ']');
      tokens.push({ kind: 'range', text });
      i = end;
    } else if (c === '"' || c === "'" || c === '`') {
      const { text, end } = bracketed(expr, i, c);
      tokens.push({ kind: 'string', text });
      i = end;
    } else if (/[a-zA-Z_:]/.test(c)) {
      const text = /^[a-zA-Z_:][\w:]*/.exec(expr.slice(i))![0];
      tokens.push({ kind: 'ident', text });
      i += text.length;
    } else if (/[0-9.]/.test(c)) {
      // Numbers, and durations such as 5m after `offset`.
      const text = /^[0-9.][\w.]*/.exec(expr.slice(i))![0];
      tokens.push({ kind: 'number', text });
      i += text.length;
    } else {
      tokens.push({ kind: 'punct', text: c });
      i++;
    }
  }
  return tokens;
}

const LABEL_LIST_KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right']);
const KEYWORDS = new Set([...LABEL_LIST_KEYWORDS, 'bool', 'and', 'or', 'unless', 'offset', 'atan2', 'inf', 'nan']);

/** Every metric selector of a PromQL expression, in order. */
export function selectorsIn(expr: string): Selector[] {
  const tokens = tokenize(expr);
  const selectors: Selector[] = [];
  for (let i = 0; i < tokens.length; i++) {
    const token = tokens[i]!;
    if (token.kind === 'matchers' && tokens[i - 1]?.kind !== 'ident') {
      throw new Error(`a selector without a metric name in ${expr}: {${token.text}}`);
    }
    if (token.kind !== 'ident') continue;
    const next = tokens[i + 1];
    if (LABEL_LIST_KEYWORDS.has(token.text.toLowerCase()) && next?.text === '(') {
      // A label list: skip to its `)`.
      while (i < tokens.length && tokens[i]!.text !== ')') i++;
      continue;
    }
    if (KEYWORDS.has(token.text.toLowerCase())) continue;
    // A function, or an aggregation whose `by`/`without` comes first.
    if (next?.text === '(' || (next?.kind === 'ident' && /^(by|without)$/i.test(next.text))) continue;
    let j = i + 1;
    const matchers = tokens[j]?.kind === 'matchers' ? tokens[j++]!.text : undefined;
    const range = tokens[j]?.kind === 'range' ? tokens[j]!.text : undefined;
    const fn = tokens[i - 1]?.text === '(' && tokens[i - 2]?.kind === 'ident' ? tokens[i - 2]!.text : undefined;
    selectors.push({ name: token.text, matchers, range, fn });
  }
  return selectors;
}

/** The label matchers of a selector's braces, e.g. `job=~"$job"` → { label: 'job', op: '=~', value: '$job' }. */
export function matchersOf(selector: Selector): { label: string; op: string; value: string }[] {
  const text = selector.matchers ?? '';
  return [...text.matchAll(/([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"/g)].map((m) => ({
    label: m[1]!,
    op: m[2]!,
    value: m[3]!,
  }));
}

// /metrics

export interface Exposition {
  /** Every sample name with at least one series (a histogram's are `x_bucket`, `x_sum`, `x_count`). */
  samples: Set<string>;
  /** Each family's `# TYPE`: counter, gauge, histogram, summary, untyped. */
  types: Map<string, string>;
  text: string;
}

export function parseExposition(text: string): Exposition {
  const samples = new Set<string>();
  const types = new Map<string, string>();
  for (const line of text.split('\n')) {
    const type = /^# TYPE (\S+) (\S+)/.exec(line);
    if (type) types.set(type[1]!, type[2]!);
    else if (line && !line.startsWith('#')) samples.add(/^[^\s{]+/.exec(line)![0]);
  }
  return { samples, types, text };
}

/** The type of the family a sample name belongs to: `x_bucket` of a histogram `x` is a histogram's. */
export function typeOfSample(exposition: Exposition, name: string): string | undefined {
  const exact = exposition.types.get(name);
  if (exact) return exact;
  const family = /^(.*)_(bucket|sum|count)$/.exec(name)?.[1];
  const type = family ? exposition.types.get(family) : undefined;
  return type === 'histogram' || type === 'summary' ? type : undefined;
}

/**
 * A real service's /metrics after one agent's report has been flushed, so
 * that the histograms and labelled series a flush makes exist.
 */
export async function scrapeAfterFlush(h: ServiceHarness): Promise<Exposition> {
  const { id, token } = await h.agent(['cpu', 'mem']);
  const posted = await h.post(id, token, {
    metadata: [
      { key: 'cpu', value: '12%' },
      { key: 'mem', value: '1G' },
    ],
  });
  if (posted.statusCode !== 202) throw new Error(`report: ${posted.statusCode} ${posted.body}`);
  await h.advance(5000);
  const flushed = await h.metric('metabatch_metadata_flushed_total');
  if (flushed !== 2) throw new Error(`expected the 2 keys flushed, metabatch_metadata_flushed_total is ${flushed}`);
  const scraped = await h.app.inject({ url: '/metrics' });
  if (scraped.statusCode !== 200) throw new Error(`/metrics: ${scraped.statusCode}`);
  return parseExposition(scraped.body);
}

/** Whether a sample is cumulative (a counter, or a histogram's bucket, sum or count), to be read through rate() or increase(). */
export function isCumulative(exposition: Exposition, name: string): boolean {
  const type = typeOfSample(exposition, name);
  if (type === 'counter') return true;
  return (type === 'histogram' || type === 'summary') && /_(bucket|sum|count)$/.test(name);
}

/** A selector an expression reads, and what reads it (a panel, an alert), for the messages. */
export interface SelectorUse {
  where: string;
  selector: Selector;
}

/**
 * What a dashboard or a rule file reads of a real service: every metric is
 * one its /metrics exposes (but `external` ones, which are not the
 * service's: Prometheus's own `up`), and cumulative samples, and only they,
 * are read through rate() or increase(). `readers` names them in the
 * message ("the alerts read").
 */
export function expectReadsOfService(
  exposition: Exposition,
  uses: readonly SelectorUse[],
  readers: string,
  external: readonly string[] = [],
): void {
  const own = uses.filter(({ selector }) => !external.includes(selector.name));
  const missing = [...new Set(own.map(({ selector }) => selector.name))].filter(
    (name) => !exposition.samples.has(name),
  );
  expect(missing, `metrics ${readers} that /metrics does not expose (after a flush): ${missing.join(', ')}`).toEqual(
    [],
  );
  for (const { where, selector } of own) {
    const cumulative = isCumulative(exposition, selector.name);
    const through = ['rate', 'increase'].includes(selector.fn ?? '');
    expect(
      through,
      `${where}: ${selector.name} is a ${typeOfSample(exposition, selector.name)}${cumulative ? ': read it through rate or increase' : ': not through rate or increase'}`,
    ).toBe(cumulative);
  }
}
