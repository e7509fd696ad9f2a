// The Grafana dashboard (deploy/grafana/metabatch.json), kept true: the
// conventions of Grafana's dashboard linter (a templated Prometheus data
// source used by every panel and target; `job` and `instance` variables
// matched in every query; a title, a description and a unit on every panel;
// `$__rate_interval` in every rate and increase), a current schema, every
// query valid PromQL (promtool, as recording rules, with Grafana's variables
// substituted), and every metric it reads exposed by a real service's /metrics.
// The promtool check is skipped, saying how to install it, where promtool is
// missing.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { closedAfterEach, testDatabase } from './support/db.js';
import {
  expectReadsOfService,
  matchersOf,
  PROMTOOL,
  PROMTOOL_MISSING,
  promtool,
  scrapeAfterFlush,
  selectorsIn,
} from './support/metrics.js';
import { ROOT } from './support/process.js';
import { startTestService } from './support/service.js';

if (!PROMTOOL) console.warn(`test/dashboard.test.ts: promtool check skipped: ${PROMTOOL_MISSING}`);

interface DataSourceRef {
  type?: string;
  uid?: string;
}

interface Target {
  refId: string;
  expr: string;
  datasource?: DataSourceRef;
  format?: string;
}

interface Panel {
  id: number;
  type: string;
  title?: string;
  description?: string;
  datasource?: DataSourceRef;
  gridPos?: { x: number; y: number; w: number; h: number };
  fieldConfig?: { defaults?: { unit?: string; mappings?: unknown[] } };
  options?: { yAxis?: { unit?: string }; calculate?: boolean };
  targets?: Target[];
  panels?: Panel[];
}

interface Variable {
  name: string;
  label?: string;
  type: string;
  query?: string | { query: string };
  definition?: string;
  datasource?: DataSourceRef;
  multi?: boolean;
  includeAll?: boolean;
  allValue?: string;
  refresh?: number;
}

interface Dashboard {
  uid?: string;
  title?: string;
  schemaVersion: number;
  editable?: boolean;
  templating: { list: Variable[] };
  panels: Panel[];
}

const DASHBOARD_PATH = path.join(ROOT, 'deploy', 'grafana', 'metabatch.json');
const dashboard = JSON.parse(fs.readFileSync(DASHBOARD_PATH, 'utf8')) as Dashboard;
const panels = dashboard.panels.flatMap((p) => [p, ...(p.panels ?? [])]);
const targets = panels.flatMap((panel) => (panel.targets ?? []).map((target) => ({ panel, target })));
const variables = new Map(dashboard.templating.list.map((v) => [v.name, v]));

/** A query variable's query: `label_values(<selector>, <label>)` → the selector. */
function variableQuery(variable: Variable): { selector: string; label: string } {
  const query = typeof variable.query === 'string' ? variable.query : (variable.query?.query ?? '');
  const parsed = /^label_values\((.+),\s*(\w+)\)$/.exec(query.trim());
  if (!parsed) throw new Error(`variable ${variable.name}: not a label_values(<selector>, <label>) query: ${query}`);
  return { selector: parsed[1]!, label: parsed[2]! };
}

/** Every PromQL expression of the dashboard, named for a recording rule. */
function expressions(): { where: string; record: string; expr: string }[] {
  return [
    ...targets.map(({ panel, target }) => ({
      where: `panel ${panel.id} "${panel.title}" target ${target.refId}`,
      record: `dashboard:panel_${panel.id}_${target.refId}`,
      expr: target.expr,
    })),
    ...['job', 'instance'].map((name) => ({
      where: `variable ${name}`,
      record: `dashboard:variable_${name}`,
      expr: variableQuery(variables.get(name)!).selector,
    })),
  ];
}

/** Grafana's variables as Grafana would fill them in: `$__rate_interval` a duration, `$job` and `$instance` the "All" regex. */
function substitute(expr: string): string {
  const out = expr.replaceAll('$__rate_interval', '5m').replace(/\$\{?(job|instance)\}?/g, '.*');
  if (out.includes('$')) throw new Error(`a Grafana variable this test does not know is left in ${out}`);
  return out;
}

// Grafana unit ids the panels may use.
const UNITS = new Set([
  'none',
  'short',
  'percent',
  'percentunit',
  's',
  'ms',
  'bytes',
  'decbytes',
  'cps',
  'ops',
  'reqps',
]);
const TEMPLATED = ['${datasource}', '$datasource'];

describe('deploy/grafana/metabatch.json', () => {
  it('uses a current schema: a Grafana 11/12 schemaVersion, panels of type timeseries, heatmap or stat, not editable', () => {
    expect(dashboard.schemaVersion).toBeGreaterThanOrEqual(39);
    expect(dashboard.schemaVersion).toBeLessThanOrEqual(42);
    expect(dashboard.uid).toBe('metabatch');
    expect(dashboard.editable).toBe(false);
    expect(panels.length).toBeGreaterThan(0);
    for (const panel of panels) {
      expect(['timeseries', 'heatmap', 'stat'], `panel ${panel.id}`).toContain(panel.type);
      expect(panel.gridPos, `panel ${panel.id} gridPos`).toBeDefined();
      expect(panel.targets?.length, `panel ${panel.id} targets`).toBeGreaterThan(0);
      const refIds = panel.targets!.map((t) => t.refId);
      expect(new Set(refIds).size, `panel ${panel.id} refIds`).toBe(refIds.length);
    }
    const ids = panels.map((p) => p.id);
    expect(new Set(ids).size).toBe(ids.length);
  });

  it('has a templated Prometheus data source, used by every panel, target and query variable', () => {
    const datasource = variables.get('datasource');
    expect(datasource).toMatchObject({ type: 'datasource', query: 'prometheus', label: 'Data source' });
    const uses = [
      ...panels.map((p) => ({ where: `panel ${p.id}`, ref: p.datasource })),
      ...targets.map(({ panel, target }) => ({
        where: `panel ${panel.id} target ${target.refId}`,
        ref: target.datasource,
      })),
      ...['job', 'instance'].map((name) => ({ where: `variable ${name}`, ref: variables.get(name)?.datasource })),
    ];
    for (const { where, ref } of uses) {
      expect(ref?.type, where).toBe('prometheus');
      expect(TEMPLATED, where).toContain(ref?.uid);
    }
  });

  it('has job and instance variables: label_values queries on it, multi-select with All as .+, refreshed with the time range', () => {
    for (const [name, label] of [
      ['job', 'Job'],
      ['instance', 'Instance'],
    ] as const) {
      const variable = variables.get(name);
      expect(variable, name).toMatchObject({ type: 'query', label, multi: true, includeAll: true, allValue: '.+' });
      // 2: on time range change.
      expect(variable!.refresh, name).toBe(2);
      expect(variableQuery(variable!).label, name).toBe(name);
    }
    // The instances of the chosen jobs.
    const [instances] = selectorsIn(variableQuery(variables.get('instance')!).selector);
    expect(matchersOf(instances!)).toContainEqual({ label: 'job', op: '=~', value: '$job' });
  });

  it('gives every panel a title, a description and a known unit (a bare number only with value mappings)', () => {
    for (const panel of panels) {
      const where = `panel ${panel.id} "${panel.title}"`;
      expect(panel.title?.trim(), where).toBeTruthy();
      expect(panel.description?.trim(), where).toBeTruthy();
      const unit = panel.fieldConfig?.defaults?.unit;
      expect(UNITS, `${where} unit ${unit}`).toContain(unit);
      if (unit === 'none') expect(panel.fieldConfig?.defaults?.mappings?.length, where).toBeGreaterThan(0);
      if (panel.type === 'heatmap') {
        expect(UNITS, `${where} y axis unit`).toContain(panel.options?.yAxis?.unit);
        // Buckets from Prometheus, as they are.
        expect(panel.options?.calculate, where).toBe(false);
        expect(panel.targets!.map((t) => t.format)).toEqual(panel.targets!.map(() => 'heatmap'));
      }
    }
  });

  it('matches job and instance in every selector of every query, and uses $__rate_interval in every rate and increase', () => {
    for (const { panel, target } of targets) {
      const where = `panel ${panel.id} "${panel.title}" target ${target.refId}: ${target.expr}`;
      const selectors = selectorsIn(target.expr);
      expect(selectors.length, where).toBeGreaterThan(0);
      for (const selector of selectors) {
        const matchers = matchersOf(selector);
        expect(matchers, `${where}: ${selector.name}`).toContainEqual({ label: 'job', op: '=~', value: '$job' });
        expect(matchers, `${where}: ${selector.name}`).toContainEqual({
          label: 'instance',
          op: '=~',
          value: '$instance',
        });
        if (selector.range !== undefined) {
          expect(selector.range, where).toBe('$__rate_interval');
          expect(['rate', 'increase'], where).toContain(selector.fn);
        }
      }
      // Every rate and increase has its range selector (no subqueries).
      const calls = target.expr.match(/\b(rate|increase)\s*\(/g) ?? [];
      expect(selectors.filter((s) => s.fn === 'rate' || s.fn === 'increase').length, where).toBe(calls.length);
    }
  });

  it.skipIf(!PROMTOOL)(
    'has only valid PromQL: every query, variables substituted, passes promtool check rules',
    async () => {
      const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'metabatch-dashboard-'));
      try {
        const exprs = expressions();
        const rules = path.join(dir, 'dashboard.rules.yml');
        const recording = exprs.map(({ record, expr }) => ({ record, expr: substitute(expr) }));
        await fs.promises.writeFile(rules, YAML.stringify({ groups: [{ name: 'dashboard', rules: recording }] }));
        const checked = await promtool(['check', 'rules', rules]);
        expect(checked.code, checked.output).toBe(0);
        expect(checked.output).toContain(`SUCCESS: ${exprs.length} rules found`);
        // The check can fail: an unclosed call is refused.
        const broken = path.join(dir, 'broken.rules.yml');
        await fs.promises.writeFile(
          broken,
          YAML.stringify({ groups: [{ name: 'broken', rules: [{ record: 'broken', expr: 'rate(metabatch_x[5m]' }] }] }),
        );
        expect((await promtool(['check', 'rules', broken])).code).not.toBe(0);
      } finally {
        await fs.promises.rm(dir, { recursive: true, force: true });
      }
    },
  );

  describe('against a real service', () => {
    const db = testDatabase();
    const service = closedAfterEach(() => startTestService(db));

    it('reads only metrics a real service exposes at /metrics, counters and histogram buckets through rate or increase', async () => {
      const exposition = await scrapeAfterFlush(await service());
      const used = expressions().flatMap(({ where, expr }) =>
        selectorsIn(expr).map((selector) => ({ where, selector })),
      );
      expectReadsOfService(exposition, used, 'the dashboard reads');
    });
  });
});
