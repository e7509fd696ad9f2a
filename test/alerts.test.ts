// The Prometheus alerting rules (deploy/prometheus/alerts.yml), kept true:
// promtool accepts them and passes their unit tests (alerts.test.yml); every
// alert has a `for:`, a severity, a summary, a description naming the
// instance and the value, and a runbook_url at its README anchor; the unit
// tests show every alert firing on a failing series and silent on a healthy
// one beside it; and every metric an alert reads is exposed by a real
// service's /metrics (but `up`, which Prometheus itself records for each
// scrape target). The promtool checks are skipped, saying how to install
// it, where promtool is missing.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { closedAfterEach, testDatabase } from './support/db.js';
import {
  expectReadsOfService,
  PROMTOOL,
  PROMTOOL_MISSING,
  promtool,
  scrapeAfterFlush,
  selectorsIn,
} from './support/metrics.js';
import { ROOT } from './support/process.js';
import { startTestService } from './support/service.js';

if (!PROMTOOL) console.warn(`test/alerts.test.ts: promtool checks skipped: ${PROMTOOL_MISSING}`);

interface Rule {
  alert?: string;
  record?: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

interface RuleFile {
  groups: { name: string; rules: Rule[] }[];
}

interface ExpectedAlert {
  exp_labels?: Record<string, string>;
  exp_annotations?: Record<string, string>;
}

interface RuleTestGroup {
  name?: string;
  interval?: string;
  input_series: { series: string; values: string }[];
  alert_rule_test?: { eval_time: string; alertname: string; exp_alerts?: ExpectedAlert[] | null }[];
}

interface RuleTests {
  rule_files: string[];
  evaluation_interval?: string;
  tests: RuleTestGroup[];
}

const DIR = path.join(ROOT, 'deploy', 'prometheus');
const ALERTS_PATH = path.join(DIR, 'alerts.yml');
const TESTS_PATH = path.join(DIR, 'alerts.test.yml');
const ruleFile = YAML.parse(fs.readFileSync(ALERTS_PATH, 'utf8')) as RuleFile;
const ruleTests = YAML.parse(fs.readFileSync(TESTS_PATH, 'utf8')) as RuleTests;
const alerts = ruleFile.groups.flatMap((g) => g.rules).filter((r): r is Rule & { alert: string } => !!r.alert);

/** A Prometheus duration (`90s`, `1h30m`) in seconds. */
function seconds(duration: string): number {
  const units: Record<string, number> = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400, w: 604800, y: 31536000 };
  const parts = [...duration.matchAll(/(\d+)(ms|s|m|h|d|w|y)/g)];
  if (parts.length === 0 || parts.map((p) => p[0]).join('') !== duration)
    throw new Error(`not a duration: ${duration}`);
  return parts.reduce((sum, p) => sum + Number(p[1]) * units[p[2]!]!, 0);
}

/** An input series `name{a="b", instance="x"}` → its name and instance. */
function seriesOf(series: string): { name: string; instance: string | undefined } {
  const parsed = /^([a-zA-Z_:][\w:]*)\s*(?:\{(.*)\})?$/.exec(series.trim());
  if (!parsed) throw new Error(`cannot read the series ${series}`);
  return { name: parsed[1]!, instance: /\binstance\s*=\s*"([^"]*)"/.exec(parsed[2] ?? '')?.[1] };
}

/** The names of the metrics an alert reads. */
function metricsOf(alert: Rule): string[] {
  return [...new Set(selectorsIn(alert.expr).map((s) => s.name))];
}

describe('deploy/prometheus/alerts.yml', () => {
  it('has its eight alerts, each with a for:, a severity and its annotations', () => {
    expect(alerts.map((a) => a.alert).sort()).toEqual(
      [
        'MetabatchChannelNearCapacity',
        'MetabatchDown',
        'MetabatchDatabaseDown',
        'MetabatchEventLoopLag',
        'MetabatchFlushesFailing',
        'MetabatchHeldKeysNearLimit',
        'MetabatchKeysDropped',
        'MetabatchNotReady',
      ].sort(),
    );
    for (const alert of alerts) {
      const where = alert.alert;
      expect(seconds(alert.for ?? '0s'), `${where} for:`).toBeGreaterThanOrEqual(60);
      expect(['critical', 'warning'], `${where} severity`).toContain(alert.labels?.severity);
      const annotations = alert.annotations ?? {};
      expect(annotations.summary?.trim(), `${where} summary`).toBeTruthy();
      expect(annotations.description, `${where} description`).toContain('{{ $labels.instance }}');
      expect(annotations.description, `${where} description`).toMatch(/\{\{ \$value( \| [^}]+)? \}\}/);
      expect(annotations.runbook_url, `${where} runbook_url`).toBe(
        `https://github.com/metabatch/metabatch#runbook-${alert.alert.toLowerCase()}`,
      );
    }
  });

  it('has a runbook line in the README for each alert, where its runbook_url points', () => {
    const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
    const runbook = readme.slice(
      readme.indexOf('## Runbook'),
      readme.indexOf('\n## ', readme.indexOf('## Runbook') + 1),
    );
    for (const alert of alerts) {
      expect(runbook, alert.alert).toContain(`<a id="runbook-${alert.alert.toLowerCase()}"></a>**${alert.alert}**`);
    }
    expect(runbook.match(/<a id="runbook-/g)).toHaveLength(alerts.length);
  });

  it.skipIf(!PROMTOOL)('passes promtool check rules', async () => {
    const checked = await promtool(['check', 'rules', ALERTS_PATH]);
    expect(checked.code, checked.output).toBe(0);
    expect(checked.output).toContain(`SUCCESS: ${alerts.length} rules found`);
  });

  it.skipIf(!PROMTOOL)('passes its unit tests: promtool test rules alerts.test.yml', async () => {
    expect(ruleTests.rule_files).toEqual(['alerts.yml']);
    const tested = await promtool(['test', 'rules', TESTS_PATH]);
    expect(tested.code, tested.output).toBe(0);
    expect(tested.output).toContain('SUCCESS');
  });

  it.skipIf(!PROMTOOL)(
    'would fail its unit tests if a healthy instance fired (exp_alerts is the exact list)',
    async () => {
      const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'metabatch-alerts-'));
      try {
        await fs.promises.copyFile(ALERTS_PATH, path.join(dir, 'alerts.yml'));
        // The healthy instance of the first group fails like the failing one.
        const broken = structuredClone(ruleTests);
        const group = broken.tests[0]!;
        const failing = group.input_series[0]!;
        for (const input of group.input_series) {
          if (seriesOf(input.series).name === seriesOf(failing.series).name) input.values = failing.values;
        }
        await fs.promises.writeFile(path.join(dir, 'alerts.test.yml'), YAML.stringify(broken));
        const tested = await promtool(['test', 'rules', path.join(dir, 'alerts.test.yml')]);
        expect(tested.code, tested.output).not.toBe(0);
        expect(tested.output).toContain('FAILED');
      } finally {
        await fs.promises.rm(dir, { recursive: true, force: true });
      }
    },
  );

  it('covers every alert in alerts.test.yml: firing on a failing series, silent on a healthy one after its for:', () => {
    const known = new Set(alerts.map((a) => a.alert));
    for (const group of ruleTests.tests) {
      for (const test of group.alert_rule_test ?? []) expect(known, `${group.name}`).toContain(test.alertname);
    }
    for (const alert of alerts) {
      const where = alert.alert;
      const forSeconds = seconds(alert.for ?? '0s');
      const metrics = metricsOf(alert);
      let firing = 0;
      const silent: string[] = [];
      for (const group of ruleTests.tests) {
        const inputs = group.input_series.map((s) => seriesOf(s.series));
        const tests = (group.alert_rule_test ?? []).filter((t) => t.alertname === alert.alert);
        const firingInstances = new Set<string | undefined>();
        for (const test of tests) {
          const expected = test.exp_alerts ?? [];
          if (seconds(test.eval_time) >= forSeconds) firing += expected.length;
          for (const exp of expected) {
            // Each expected alert names the instance that fails and carries the rule's labels.
            expect(exp.exp_labels, where).toMatchObject({ ...alert.labels, instance: expect.any(String) });
            expect(Object.keys(exp.exp_annotations ?? {}).sort(), where).toEqual(
              Object.keys(alert.annotations ?? {}).sort(),
            );
            firingInstances.add(exp.exp_labels?.instance);
          }
        }
        const after = tests.filter((t) => seconds(t.eval_time) >= forSeconds).map((t) => t.eval_time);
        if (after.length === 0) continue;
        // A healthy instance: a series of every metric the alert reads, and no alert expected for it at any
        // evaluation, one at least after the for: has elapsed.
        const instances = new Set(inputs.map((s) => s.instance).filter((i): i is string => i !== undefined));
        for (const instance of instances) {
          const complete = metrics.every((m) => inputs.some((s) => s.name === m && s.instance === instance));
          if (complete && !firingInstances.has(instance)) silent.push(`${group.name}:${instance}@${after.join(',')}`);
        }
      }
      expect(firing, `${where}: no test where it fires after its for: of ${alert.for}`).toBeGreaterThan(0);
      expect(
        silent.length,
        `${where}: no healthy instance (every metric it reads) silent after its for:`,
      ).toBeGreaterThan(0);
    }
  });

  describe('against a real service', () => {
    const db = testDatabase();
    const service = closedAfterEach(() => startTestService(db));

    it('reads only metrics a real service exposes at /metrics, counters through rate or increase', async () => {
      const exposition = await scrapeAfterFlush(await service());
      const uses = alerts.flatMap((alert) =>
        selectorsIn(alert.expr).map((selector) => ({ where: alert.alert, selector })),
      );
      // `up` is Prometheus's own series for a scrape target, not one of the service's.
      expectReadsOfService(exposition, uses, 'the alerts read', ['up']);
    });
  });
});
